use std::time::Duration;

use bus::events::ReportSource;
use reqwest::StatusCode;
use serde_json::{Value, json};
use wechat::{RsaSigner, encrypt_resource, nonce_str, response_message};

use crate::common::{Options, TestApp, WAIT, spawn_app, spawn_app_with};

/// An order of alice's with an open, prepaid payment; returns the payment sn (WeChat's out_trade_no).
async fn prepaid(app: &TestApp, amount: i64) -> String {
    let alice = app.wx_login("alice").await;
    let h = app.homestay(true, 2, amount, 0).await;
    let sn = app.order(&alice, h, 1, 1, false).await;
    let (status, body) = app.prepay(&alice, &sn).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"]["paySn"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_callback_is_published_then_acknowledged_and_duplicates_are_one_event() {
    let app = spawn_app().await;
    let pay_sn = prepaid(&app, 8_800).await;
    app.control.pay(&pay_sn, "SUCCESS").await.unwrap();

    let events = testkit::eventually(WAIT, "the callback's event on wechat.transaction", || async {
        Some(app.events().await).filter(|e| !e.is_empty())
    })
    .await;
    assert_eq!(events.len(), 1);
    let r = &events[0].payload;
    assert_eq!(
        (r.source, r.out_trade_no.as_str(), r.amount_total),
        (ReportSource::Callback, pay_sn.as_str(), Some(8_800))
    );
    assert_eq!(r.trade_state, "SUCCESS");
    assert_eq!((r.appid.as_str(), r.mchid.as_str()), (app.wechat.appid.as_str(), app.wechat.mchid.as_str()));
    let attempts = testkit::eventually(WAIT, "WeChat to record the acknowledgement", || async {
        let a = app.control.callbacks(Some(&pay_sn)).await.unwrap();
        Some(a).filter(|a| a.iter().any(|c| c.acknowledged))
    })
    .await;
    assert_eq!(attempts[0].status, Some(204));
    assert_eq!(r.notification_id.as_deref(), Some(attempts[0].id.as_str()));

    // WeChat sends the same notification again: acknowledged, and still one event (JetStream drops the repeat).
    app.control.fault(&sandbox::Fault::DuplicateCallback { out_trade_no: pay_sn.clone() }).await.unwrap();
    testkit::eventually(WAIT, "the duplicate to be acknowledged", || async {
        let a = app.control.callbacks(Some(&pay_sn)).await.unwrap();
        a.iter().any(|c| c.kind == "duplicate" && c.acknowledged).then_some(())
    })
    .await;
    assert_eq!(app.events().await.len(), 1);

    // WeChat's SIGNTEST probe is refused.
    app.control.fault(&sandbox::Fault::SigntestCallback { out_trade_no: pay_sn.clone() }).await.unwrap();
    let probe = testkit::eventually(WAIT, "the probe to be answered", || async {
        let a = app.control.callbacks(Some(&pay_sn)).await.unwrap();
        a.into_iter().find(|c| c.kind == "signtest" && c.status.is_some())
    })
    .await;
    assert_eq!(probe.status, Some(401));
    assert!(!probe.acknowledged);
    assert_eq!(app.events().await.len(), 1);
    let metrics = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("paystream_callbacks_total{outcome=\"probe\"}"), "{metrics}");
    assert!(metrics.contains("paystream_callbacks_total{outcome=\"published\"}"));
}

type Headers = Vec<(&'static str, String)>;

/// A callback built by hand the way WeChat builds one, so each part can be spoiled on its own.
struct Forge {
    platform: RsaSigner,
    serial: String,
    apiv3: [u8; 32],
}

impl Forge {
    fn new(app: &TestApp) -> Self {
        let id = &app.sandbox.identity;
        Forge {
            platform: RsaSigner::from_pkcs8_pem(&id.platform_private_key_pem).unwrap(),
            serial: id.platform_public_key_id.clone(),
            apiv3: id.apiv3_key_bytes(),
        }
    }

    fn body(&self, app: &TestApp, out_trade_no: &str, key: &[u8; 32]) -> Vec<u8> {
        let tx = json!({
            "appid": app.wechat.appid, "mchid": app.wechat.mchid, "out_trade_no": out_trade_no,
            "transaction_id": "4200000000202611270000000001", "trade_type": "JSAPI", "trade_state": "SUCCESS",
            "trade_state_desc": "支付成功", "bank_type": "OTHERS", "success_time": "2026-11-27T10:00:00+08:00",
            "payer": { "openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" },
            "amount": { "total": 100, "payer_total": 100, "currency": "CNY", "payer_currency": "CNY" }
        });
        let nonce = &nonce_str()[..12];
        let ciphertext = encrypt_resource(key, nonce, "transaction", &serde_json::to_vec(&tx).unwrap()).unwrap();
        serde_json::to_vec(&json!({
            "id": uuid::Uuid::new_v4().to_string(), "create_time": "2026-11-27T10:00:01+08:00",
            "event_type": "TRANSACTION.SUCCESS", "resource_type": "encrypt-resource", "summary": "支付成功",
            "resource": { "original_type": "transaction", "algorithm": "AEAD_AES_256_GCM", "ciphertext": ciphertext,
                          "associated_data": "transaction", "nonce": nonce }
        }))
        .unwrap()
    }

    fn refund_body(&self, app: &TestApp) -> Vec<u8> {
        let notice = json!({
            "mchid": app.wechat.mchid, "out_trade_no": "PMT20261127100000000000009",
            "transaction_id": "4200000000202611270000000009", "out_refund_no": "RFD20261127100000000000009",
            "refund_id": "50000000002026112700000000009", "refund_status": "SUCCESS",
            "success_time": "2026-11-27T10:05:00+08:00", "user_received_account": "支付用户零钱",
            "amount": { "total": 100, "refund": 100, "payer_total": 100, "payer_refund": 100 }
        });
        let nonce = &nonce_str()[..12];
        let ciphertext = encrypt_resource(&self.apiv3, nonce, "refund", &serde_json::to_vec(&notice).unwrap()).unwrap();
        serde_json::to_vec(&json!({
            "id": uuid::Uuid::new_v4().to_string(), "create_time": "2026-11-27T10:05:01+08:00",
            "event_type": "REFUND.SUCCESS", "resource_type": "encrypt-resource", "summary": "退款成功",
            "resource": { "original_type": "refund", "algorithm": "AEAD_AES_256_GCM", "ciphertext": ciphertext,
                          "associated_data": "refund", "nonce": nonce }
        }))
        .unwrap()
    }

    fn headers(&self, signer: &RsaSigner, ts: i64, body: &[u8]) -> Headers {
        let nonce = nonce_str();
        vec![
            ("Wechatpay-Timestamp", ts.to_string()),
            ("Wechatpay-Nonce", nonce.clone()),
            ("Wechatpay-Signature", signer.sign(&response_message(ts, &nonce, body))),
            ("Wechatpay-Serial", self.serial.clone()),
            ("Wechatpay-Signature-Type", "WECHATPAY2-SHA256-RSA2048".into()),
        ]
    }
}

async fn send(app: &TestApp, headers: &[(&str, String)], body: Vec<u8>) -> (StatusCode, Value) {
    let mut req =
        app.http.post(format!("{}{}", app.base, ingress::CALLBACK_PATH)).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = req.body(body).send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tampered_stale_probe_and_undecryptable_callbacks_are_refused_and_not_published() {
    let app = spawn_app().await;
    let forge = Forge::new(&app);
    let now = chrono::Utc::now().timestamp();

    // The control case: a well-made callback is accepted.
    let good = forge.body(&app, "PMT20261127100000000000001", &forge.apiv3);
    let (status, body) = send(&app, &forge.headers(&forge.platform, now, &good), good.clone()).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(app.events().await.len(), 1);

    let other_key = RsaSigner::generate().unwrap();
    let body2 = forge.body(&app, "PMT20261127100000000000002", &forge.apiv3);
    let mut tampered = body2.clone();
    let pos = tampered.windows(4).position(|w| w == b"TRAN").unwrap();
    tampered[pos] = b'X';
    let mut probe = forge.headers(&forge.platform, now, &body2);
    probe[2].1 = format!("WECHATPAY/SIGNTEST/{}", probe[2].1);
    let wrong_aes = forge.body(&app, "PMT20261127100000000000003", &[7u8; 32]);
    let cases: Vec<(&str, Headers, Vec<u8>)> = vec![
        ("forged", forge.headers(&other_key, now, &body2), body2.clone()),
        ("tampered", forge.headers(&forge.platform, now, &body2), tampered),
        ("stale", forge.headers(&forge.platform, now - 600, &body2), body2.clone()),
        ("probe", probe, body2.clone()),
        ("undecryptable", forge.headers(&forge.platform, now, &wrong_aes), wrong_aes.clone()),
        ("unsigned", vec![], body2.clone()),
    ];
    for (what, headers, body) in cases {
        let (status, answer) = send(&app, &headers, body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {answer}");
        assert_eq!(answer["code"], "FAIL", "{what}: WeChat's body shape");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(app.events().await.len(), 1, "nothing refused was published");
    let metrics = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    for outcome in ["bad_signature", "stale", "probe", "undecryptable", "malformed"] {
        assert!(metrics.contains(&format!("paystream_callbacks_total{{outcome=\"{outcome}\"}}")), "{outcome}");
    }

    // The body names no check: a forger learns nothing from it.
    let (_, answer) = send(&app, &forge.headers(&other_key, now, &body2), body2.clone()).await;
    assert_eq!(answer["message"], "callback refused: verification failed");

    // A refund notice goes to wechat.refund, once however often WeChat sends it; a forged one nowhere.
    let refund = forge.refund_body(&app);
    for _ in 0..2 {
        let (status, answer) = send(&app, &forge.headers(&forge.platform, now, &refund), refund.clone()).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{answer}");
    }
    let (status, _) = send(&app, &forge.headers(&other_key, now, &refund), refund.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let refunds = app.events_on::<bus::events::WechatRefundReported>().await;
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    let r = &refunds[0].payload;
    assert_eq!(
        (r.out_refund_no.as_str(), r.status.as_str(), r.amount_refund),
        ("RFD20261127100000000000009", "SUCCESS", 100)
    );
    assert_eq!(r.mchid.as_deref(), Some(app.wechat.mchid.as_str()));
    assert!(r.success_time.is_some());
    assert_eq!(app.events().await.len(), 1, "no transaction event from a refund notice");

    // Properly signed but without a usable notification id: every such callback would be one event id, and the
    // later ones would be dropped as duplicates. Refused, nothing published.
    for id in ["", "   ", "x"] {
        let mut notice: Value =
            serde_json::from_slice(&forge.body(&app, "PMT20261127100000000000004", &forge.apiv3)).unwrap();
        notice["id"] = json!(id);
        let bad = serde_json::to_vec(&notice).unwrap();
        let (status, answer) = send(&app, &forge.headers(&forge.platform, now, &bad), bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "id {id:?}: {answer}");
        assert_eq!(answer["code"], "FAIL");
    }
    assert_eq!(app.events().await.len(), 1, "no event from a callback without a notification id");

    // Oversized bodies get WeChat's body shape too.
    let (status, answer) = send(&app, &[], vec![b' '; 100 * 1024]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer["code"], "FAIL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_down_the_callback_fails_and_wechats_retry_succeeds_after_it_returns() {
    let mut nats = testkit::NatsServer::start().await;
    let app = spawn_app_with(Options { nats_url: Some(nats.url()), ..Default::default() }).await;
    let pay_sn = prepaid(&app, 4_200).await;
    let ready = app.http.get(format!("{}/readyz", app.base)).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    nats.stop();
    app.control.pay(&pay_sn, "SUCCESS").await.unwrap();
    let failed = testkit::eventually(WAIT, "a refused delivery while NATS is down", || async {
        let a = app.control.callbacks(Some(&pay_sn)).await.unwrap();
        a.into_iter().find(|c| c.status.is_some())
    })
    .await;
    assert_eq!(failed.status, Some(503));
    assert!(!failed.acknowledged);
    let ready = app.http.get(format!("{}/readyz", app.base)).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    nats.restart().await;
    testkit::eventually(Duration::from_secs(60), "WeChat's retry to be acknowledged", || async {
        let a = app.control.callbacks(Some(&pay_sn)).await.unwrap();
        a.iter().any(|c| c.acknowledged).then_some(())
    })
    .await;
    let events = app.events().await;
    assert_eq!(events.len(), 1, "one event, however many attempts");
    assert_eq!(events[0].payload.out_trade_no, pay_sn);
    assert_eq!(events[0].payload.amount_total, Some(4_200));
}
