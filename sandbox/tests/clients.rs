//! The `wechat` crate's typed clients, configured from the `paystream.toml` the sandbox wrote,
//! against the sandbox: client and sandbox agree on every endpoint, error paths included.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Receiver, wait_for};
use figment::Figment;
use figment::providers::{Format as _, Toml};
use serde_json::json;
use wechat::{
    Errcode, Lang, MiniProgramClient, MiniprogramState, NotifyPayload, OpenId, PayClient, PayError, RefundRequest,
    RefundRequestAmount, SmsClient, SmsConfig, SubscribeMessage, TradeState, WechatConfig,
};

const DEADLINE: Duration = Duration::from_secs(10);

fn order_no() -> String {
    format!("HSO{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
}

fn configs(env: &common::Env) -> (WechatConfig, SmsConfig) {
    let fig = Figment::from(Toml::file(env.sandbox.identity.config_path()));
    let wechat: WechatConfig = fig.extract_inner("wechat").expect("[wechat] parses as WechatConfig");
    let sms: SmsConfig = fig.extract_inner("sms").expect("[sms] parses as SmsConfig");
    wechat.validate().expect("[wechat] is valid");
    sms.validate().expect("[sms] is valid");
    (wechat, sms)
}

fn api_code(e: &PayError) -> (u16, &str) {
    match e {
        PayError::Api { http_status, code, .. } => (*http_status, code.as_str()),
        other => panic!("expected a WeChat error, got {other:?}"),
    }
}

#[tokio::test]
async fn generated_config_points_at_the_sandbox() {
    let env = common::spawn().await;
    let (wechat, sms) = configs(&env);
    assert_eq!(wechat.pay_base_url, env.sandbox.base_url());
    assert_eq!(wechat.miniprogram_base_url, env.sandbox.base_url());
    assert_eq!(sms.base_url, env.sandbox.base_url());
    assert_eq!(wechat.mchid, env.sandbox.identity.mchid);
}

#[tokio::test]
async fn pay_client_and_sandbox_agree() {
    let env = common::spawn().await;
    let (mut cfg, _) = configs(&env);
    let rx = Receiver::start(0).await;
    cfg.notify_url = rx.url();
    let client = PayClient::from_config(&cfg).unwrap();
    let m = &env.merchant;
    let openid = OpenId::new("oUpF8uMuAJO_M2pxb1Q9zNjWeS6o").unwrap();

    // Prepay, re-entry, different parameters.
    let no = order_no();
    let req = client.new_prepay_request("民宿订单", &no, 880, openid.clone());
    let p1 = client.prepay_jsapi(&req).await.unwrap();
    let p2 = client.prepay_jsapi(&req).await.unwrap();
    assert_ne!(p1.prepay_id, p2.prepay_id);
    let params = client.jsapi_pay_params(&p2.prepay_id);
    assert_eq!(params.package, format!("prepay_id={}", p2.prepay_id));
    let mut other = req.clone();
    other.amount.total = 881;
    assert_eq!(api_code(&client.prepay_jsapi(&other).await.unwrap_err()), (400, "INVALID_REQUEST"));

    // Query: NOTPAY, then SUCCESS after the user pays; unknown order: 404.
    assert_eq!(client.query_by_out_trade_no(&no).await.unwrap().trade_state, TradeState::Notpay);
    let e = client.query_by_out_trade_no(&order_no()).await.unwrap_err();
    assert_eq!(api_code(&e), (404, "ORDER_NOT_EXIST"));
    assert!(!e.is_retryable());
    assert_eq!(m.pay(&no, "SUCCESS").await.status(), 200);
    let t = client.query_by_out_trade_no(&no).await.unwrap();
    assert_eq!(t.trade_state, TradeState::Success);
    let tid = t.transaction_id.clone().unwrap();
    assert_eq!(client.query_by_transaction_id(&tid).await.unwrap().out_trade_no, no);

    // The callback verifies and decrypts with the client's reader.
    let got = wait_for("callback", DEADLINE, || async { rx.received().first().cloned() }).await;
    let read = client.notification_reader().read(&got.headers, &got.body, chrono::Utc::now().timestamp()).unwrap();
    match read.payload {
        NotifyPayload::Transaction(t) => {
            assert_eq!((t.out_trade_no.as_str(), t.trade_state), (no.as_str(), TradeState::Success))
        }
        other => panic!("expected a transaction, got {other:?}"),
    }

    // Paid: prepay ORDERPAID.
    assert_eq!(api_code(&client.prepay_jsapi(&req).await.unwrap_err()), (403, "ORDERPAID"));

    // Refund, idempotent by out_refund_no; then its query and callback.
    let refund = RefundRequest {
        transaction_id: None,
        out_trade_no: Some(no.clone()),
        out_refund_no: format!("RFD{}", &no[3..]),
        reason: Some("客户取消".into()),
        notify_url: Some(rx.url()),
        funds_account: None,
        amount: RefundRequestAmount { refund: 300, total: 880, currency: "CNY".into() },
    };
    let r1 = client.create_refund(&refund).await.unwrap();
    let r2 = client.create_refund(&refund).await.unwrap();
    assert_eq!(r1.refund_id, r2.refund_id);
    wait_for("refund success", DEADLINE, || async {
        let r = client.query_refund(&refund.out_refund_no).await.unwrap();
        (r.status == wechat::RefundStatus::Success).then_some(())
    })
    .await;
    let refund_notice = wait_for("refund callback", DEADLINE, || async {
        rx.received().iter().find_map(|r| {
            match client.notification_reader().read(&r.headers, &r.body, chrono::Utc::now().timestamp()).ok()?.payload {
                NotifyPayload::Refund(n) => Some(n),
                NotifyPayload::Transaction(_) => None,
            }
        })
    })
    .await;
    assert_eq!(refund_notice.amount.refund, 300);

    // Close: twice fine on an open order; ORDER_CLOSED on prepay after.
    let no2 = order_no();
    let req2 = client.new_prepay_request("民宿订单", &no2, 1, openid.clone());
    client.prepay_jsapi(&req2).await.unwrap();
    client.close(&no2).await.unwrap();
    client.close(&no2).await.unwrap();
    assert_eq!(client.query_by_out_trade_no(&no2).await.unwrap().trade_state, TradeState::Closed);
    assert_eq!(api_code(&client.prepay_jsapi(&req2).await.unwrap_err()), (400, "ORDER_CLOSED"));

    // Injected system error: typed and retryable.
    m.fault(json!({"kind":"fail","api":"query_order","status":500,"code":"SYSTEM_ERROR"})).await;
    let e = client.query_by_out_trade_no(&no).await.unwrap_err();
    assert_eq!(api_code(&e), (500, "SYSTEM_ERROR"));
    assert!(e.is_retryable());

    // Certificate mode: the download decrypts and yields the platform certificate's serial.
    let serials = client.download_certificates().await.unwrap();
    assert_eq!(serials.len(), 1);
    assert_eq!(serials[0].len(), 40);
}

#[tokio::test]
async fn stale_or_unsigned_answers_are_refused_by_the_client() {
    // A client holding a different platform key must refuse the sandbox's answers.
    let env = common::spawn().await;
    let (mut cfg, _) = configs(&env);
    let wrong = wechat::RsaSigner::generate().unwrap();
    let path = env.dir.0.join("wrong_platform.pem");
    std::fs::write(&path, wrong.public_key_spki_pem()).unwrap();
    cfg.platform_public_key_path = Some(path);
    let client = PayClient::from_config(&cfg).unwrap();
    let e = client.query_by_out_trade_no(&order_no()).await.unwrap_err();
    assert!(matches!(e, PayError::Verify(_)), "{e:?}");
}

#[tokio::test]
async fn mini_program_client_and_sandbox_agree() {
    let env = common::spawn().await;
    let (cfg, _) = configs(&env);
    let client = MiniProgramClient::from_config(&cfg).unwrap();
    let s1 = client.jscode2session("dave:1").await.unwrap();
    let s2 = client.jscode2session("dave:2").await.unwrap();
    assert_eq!(s1.openid, s2.openid);
    let e = client.jscode2session("bad-code").await.unwrap_err();
    assert_eq!(e.errcode(), Some(Errcode::InvalidCode));

    let msg = |thing: &str| SubscribeMessage {
        touser: s1.openid.clone(),
        template_id: "TPL_PAID".into(),
        page: Some("pages/order/detail".into()),
        data: BTreeMap::from([("thing3".to_owned(), thing.to_owned()), ("amount1".to_owned(), "¥8.80".to_owned())]),
        miniprogram_state: MiniprogramState::Trial,
        lang: Lang::ZhCn,
    };
    assert!(client.send_subscribe_message(&msg("民宿订单已支付")).await.unwrap().is_some());

    // The token expires under the client: it refreshes once and the send still succeeds.
    env.merchant.fault(json!({"kind":"expire_access_token"})).await;
    assert!(client.send_subscribe_message(&msg("再次发送")).await.is_ok());

    // The user refused: 43101, typed.
    env.merchant.fault(json!({"kind":"refuse_subscribe","openid": s1.openid.expose()})).await;
    let e = client.send_subscribe_message(&msg("x")).await.unwrap_err();
    assert_eq!(e.errcode(), Some(Errcode::UserRefused));

    let sent = env.merchant.control_get("/sandbox/v1/subscribe-messages").await;
    let sent = sent["data"].as_array().unwrap();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|m| m["miniprogram_state"] == "trial"));
}

#[tokio::test]
async fn sms_client_and_sandbox_agree() {
    let env = common::spawn().await;
    let (_, cfg) = configs(&env);
    let client = SmsClient::from_config(&cfg).unwrap();
    let statuses = client
        .send_sms("1234567", &["HSO1".to_owned()], &["+8613800138000".to_owned(), "+8613900139000".to_owned()])
        .await
        .unwrap();
    assert_eq!(statuses.len(), 2);
    assert!(statuses.iter().all(|s| s.is_ok()), "{statuses:?}");
    let sent = env.merchant.control_get("/sandbox/v1/sms").await;
    assert_eq!(sent["data"][0]["phone_numbers"].as_array().unwrap().len(), 2);

    env.merchant.fault(json!({"kind":"fail","api":"sms_send","code":"LimitExceeded.PhoneNumberDailyLimit"})).await;
    let e = client.send_sms("1234567", &[], &["+8613800138000".to_owned()]).await.unwrap_err();
    assert!(e.to_string().contains("LimitExceeded.PhoneNumberDailyLimit"), "{e}");
}

#[tokio::test]
async fn certificate_mode_client_and_sandbox_agree() {
    // The sandbox signs under its certificate serial; the client knows no public key and
    // starts by downloading /v3/certificates.
    let options = sandbox::SandboxOptions {
        time_scale: 1000.0,
        signing: sandbox::SigningMode::Certificate,
        ..Default::default()
    };
    let env = common::spawn_with(options).await;
    let (mut cfg, _) = configs(&env);
    cfg.platform_public_key_id = None;
    cfg.platform_public_key_path = None;
    cfg.platform_certificates = true;
    let rx = Receiver::start(0).await;
    cfg.notify_url = rx.url();
    let client = PayClient::from_config(&cfg).unwrap();
    let serials = client.download_certificates().await.unwrap();
    assert_eq!(serials.len(), 1);

    let no = order_no();
    let openid = OpenId::new("oUpF8uMuAJO_M2pxb1Q9zNjWeS6o").unwrap();
    client.prepay_jsapi(&client.new_prepay_request("证书模式", &no, 10, openid)).await.unwrap();
    assert_eq!(env.merchant.pay(&no, "SUCCESS").await.status(), 200);
    let got = wait_for("callback", DEADLINE, || async { rx.received().first().cloned() }).await;
    assert_eq!(got.headers.get("wechatpay-serial").unwrap().to_str().unwrap(), serials[0]);
    let read = client.notification_reader().read(&got.headers, &got.body, chrono::Utc::now().timestamp()).unwrap();
    assert!(matches!(read.payload, NotifyPayload::Transaction(t) if t.trade_state == TradeState::Success));
}

#[tokio::test]
async fn callback_signer_builds_the_notification_the_sandbox_sends() {
    use axum::http::{HeaderMap, HeaderName};
    use wechat::Transaction;

    let env = common::spawn().await;
    let (mut cfg, _) = configs(&env);
    let rx = Receiver::start(0).await;
    cfg.notify_url = rx.url();
    let client = PayClient::from_config(&cfg).unwrap();
    let (no, openid) = (order_no(), "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o");
    client.prepay_jsapi(&client.new_prepay_request("民宿订单", &no, 880, OpenId::new(openid).unwrap())).await.unwrap();
    assert_eq!(env.merchant.pay(&no, "SUCCESS").await.status(), 200);
    let got = wait_for("callback", DEADLINE, || async { rx.received().first().cloned() }).await;
    let read = |headers: &HeaderMap, body: &[u8]| {
        let read = client.notification_reader().read(headers, body, chrono::Utc::now().timestamp()).unwrap();
        match read.payload {
            NotifyPayload::Transaction(t) => (read.notification, t),
            other => panic!("expected a transaction, got {other:?}"),
        }
    };
    let (sent_notification, sent) = read(&got.headers, &got.body);

    let signer = sandbox::CallbackSigner::new(&env.sandbox.identity).unwrap();
    let body = signer.transaction_success(&no, 880, openid);
    let mut headers = HeaderMap::new();
    for (name, value) in signer.headers(&body) {
        headers.insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
    }
    let names = |h: &HeaderMap| {
        let mut n: Vec<String> =
            h.keys().map(|k| k.as_str().to_owned()).filter(|k| k.starts_with("wechatpay-")).collect();
        n.sort();
        n
    };
    assert_eq!(names(&headers), names(&got.headers));
    let (built_notification, built) = read(&headers, &body);
    assert_eq!(built_notification.event_type, sent_notification.event_type);
    assert_eq!(built_notification.summary, sent_notification.summary);
    assert_eq!(built.transaction_id.as_ref().map(String::len), Some(28));
    assert!(built.success_time.is_some());
    // The same transaction as the sandbox's own callback, but for its (fresh) id and payment time.
    let unstamped = |t: Transaction| Transaction { transaction_id: None, success_time: None, ..t };
    assert_eq!(unstamped(built), unstamped(sent));
}
