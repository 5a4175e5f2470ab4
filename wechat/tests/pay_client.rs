//! The Pay client against a small fake WeChat on port 0: request signing as WeChat checks it,
//! answer verification, error mapping and field rules.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use wechat::{
    AuthorizationHeader, EncryptedResource, NotifyPayload, OpenId, PayClient, PayError, PaySettings, RefundRequest,
    RefundRequestAmount, RefundStatus, RsaSigner, RsaVerifierKey, TradeState, Verifier, VerifyError, encrypt_resource,
    nonce_str, pay_sign_message, response_message,
};

const MERCHANT_KEY: &str = include_str!("fixtures/test_merchant_key.pem");
const MERCHANT_PUB: &str = include_str!("fixtures/test_merchant_pub.pem");
const PLATFORM_KEY: &str = include_str!("fixtures/test_platform_key.pem");
const PLATFORM_PUB: &str = include_str!("fixtures/test_platform_pub.pem");
const PLATFORM_CERT: &str = include_str!("fixtures/test_platform_cert.pem");
const PUB_KEY_ID: &str = "PUB_KEY_ID_0114232134912410000000000000000000";
const CERT_SERIAL: &str = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1";
const APIV3_KEY: &[u8; 32] = b"0123456789abcdefghijklmnopqrstuv";

/// What the fake answers: status, body, which serial to sign with (`None`: unsigned), and
/// whether to spoil the signature.
#[derive(Clone)]
struct Answer {
    status: u16,
    body: String,
    serial: Option<&'static str>,
    spoil: bool,
}

fn ok(body: &str) -> Answer {
    Answer { status: 200, body: body.into(), serial: Some(PUB_KEY_ID), spoil: false }
}

/// Method, path and query, body, and the `Wechatpay-Serial` header of a request received.
type Seen = (String, String, Vec<u8>, Option<String>);

#[derive(Clone, Default)]
struct Fake {
    answers: Arc<Mutex<Vec<Answer>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn handle(State(fake): State<Fake>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    // Check the merchant's signature the way WeChat does.
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let merchant = RsaVerifierKey::from_spki_pem(MERCHANT_PUB).unwrap();
    let verdict = AuthorizationHeader::parse(auth)
        .map_err(|e| e.to_string())
        .and_then(|h| {
            assert_eq!(h.mchid, "1230000109");
            assert!((chrono::Utc::now().timestamp() - h.timestamp).abs() < 300);
            h.verify(&merchant, method.as_str(), &path, &body).map_err(|e| e.to_string())
        })
        .err();
    let serial_hdr = headers.get("wechatpay-serial").and_then(|v| v.to_str().ok()).map(str::to_owned);
    fake.seen.lock().unwrap().push((method.to_string(), path, body.to_vec(), serial_hdr));
    let answer = if let Some(err) = verdict {
        Answer {
            status: 401,
            body: format!(r#"{{"code":"SIGN_ERROR","message":"{err}"}}"#),
            serial: Some(PUB_KEY_ID),
            spoil: false,
        }
    } else {
        fake.answers.lock().unwrap().remove(0)
    };
    if answer.status == 999 {
        // Never answer: the client's timeout must fire.
        std::future::pending::<()>().await;
    }
    signed(answer)
}

fn signed(a: Answer) -> Response {
    let mut resp = (StatusCode::from_u16(a.status).unwrap(), a.body.clone()).into_response();
    if let Some(serial) = a.serial {
        let platform = RsaSigner::from_pkcs8_pem(PLATFORM_KEY).unwrap();
        let ts = chrono::Utc::now().timestamp();
        let nonce = nonce_str();
        let mut sig = platform.sign(&response_message(ts, &nonce, a.body.as_bytes()));
        if a.spoil {
            sig = platform.sign(b"something else");
        }
        let h = resp.headers_mut();
        h.insert("Wechatpay-Timestamp", ts.to_string().parse().unwrap());
        h.insert("Wechatpay-Nonce", nonce.parse().unwrap());
        h.insert("Wechatpay-Signature", sig.parse().unwrap());
        h.insert("Wechatpay-Serial", serial.parse().unwrap());
        h.insert("Wechatpay-Signature-Type", "WECHATPAY2-SHA256-RSA2048".parse().unwrap());
    }
    if a.body.is_empty() {
        resp.headers_mut().remove("content-type");
    }
    resp
}

async fn spawn(answers: Vec<Answer>) -> (Fake, String) {
    let fake = Fake { answers: Arc::new(Mutex::new(answers)), ..Default::default() };
    let app = Router::new().fallback(handle).with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (fake, format!("http://{addr}"))
}

fn client(base_url: &str, public_key_mode: bool) -> PayClient {
    let verifier = Verifier::new();
    if public_key_mode {
        verifier.add_key(PUB_KEY_ID, RsaVerifierKey::from_spki_pem(PLATFORM_PUB).unwrap());
    }
    PayClient::new(
        PaySettings {
            mchid: "1230000109".into(),
            appid: "wxd678efh567hg6787".into(),
            merchant_serial_no: "3775B6A45ACD588826D15E583A95F5DD00000000".into(),
            notify_url: "https://pay.example.com/wechat/notify".into(),
            base_url: base_url.into(),
            timeout: Duration::from_millis(500),
            allow_insecure_loopback: false,
            insecure_http_hosts: Vec::new(),
            platform_public_key_id: public_key_mode.then(|| PUB_KEY_ID.to_owned()),
        },
        RsaSigner::from_pkcs8_pem(MERCHANT_KEY).unwrap(),
        verifier,
        *APIV3_KEY,
    )
    .unwrap()
}

fn openid() -> OpenId {
    OpenId::new("oUpF8uMuAJO_M2pxb1Q9zNjWeS6o").unwrap()
}

#[tokio::test]
async fn prepay_is_signed_and_its_answer_verified() {
    let (fake, url) = spawn(vec![ok(r#"{"prepay_id":"wx201410272009395522657a690389285100"}"#)]).await;
    let c = client(&url, true);
    let req = c.new_prepay_request("Image形象店-深圳腾大-QQ公仔", "1217752501201407033233368018", 100, openid());
    let resp = c.prepay_jsapi(&req).await.unwrap();
    assert_eq!(resp.prepay_id, "wx201410272009395522657a690389285100");
    let seen = fake.seen.lock().unwrap();
    assert_eq!(seen[0].0, "POST");
    assert_eq!(seen[0].1, "/v3/pay/transactions/jsapi");
    let body: serde_json::Value = serde_json::from_slice(&seen[0].2).unwrap();
    assert_eq!(body["payer"]["openid"], "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o");
    assert_eq!(body["amount"]["total"], 100);
    assert!(body.get("time_expire").is_none());
    assert_eq!(seen[0].3.as_deref(), Some(PUB_KEY_ID));
}

#[tokio::test]
async fn prepay_field_rules_are_checked_before_sending() {
    let (fake, url) = spawn(vec![]).await;
    let c = client(&url, true);
    let base = c.new_prepay_request("desc", "ORDER_123456", 1, openid());
    type Spoil = Box<dyn Fn(&mut wechat::PrepayRequest)>;
    let cases: Vec<(&str, Spoil)> = vec![
        ("description", Box::new(|r| r.description = "字".repeat(128))),
        ("out_trade_no", Box::new(|r| r.out_trade_no = "12345".into())),
        ("out_trade_no", Box::new(|r| r.out_trade_no = "abc/def".into())),
        ("amount.total", Box::new(|r| r.amount.total = 0)),
        ("notify_url", Box::new(|r| r.notify_url = "https://a.example.com/n?x=1".into())),
        ("notify_url", Box::new(|r| r.notify_url = "http://127.0.0.1:9/n".into())),
        ("time_expire", Box::new(|r| r.time_expire = Some("tomorrow".into()))),
        ("attach", Box::new(|r| r.attach = Some("a".repeat(129)))),
    ];
    for (field, spoil) in cases {
        let mut r = base.clone();
        spoil(&mut r);
        match c.prepay_jsapi(&r).await {
            Err(PayError::Invalid(e)) => assert_eq!(e.field, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    assert!(fake.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn loopback_notify_url_is_allowed_only_when_configured() {
    let (_fake, url) = spawn(vec![]).await;
    let mut settings = client(&url, true).settings().clone();
    settings.allow_insecure_loopback = true;
    let c = PayClient::new(settings, RsaSigner::from_pkcs8_pem(MERCHANT_KEY).unwrap(), Verifier::new(), *APIV3_KEY)
        .unwrap();
    let mut r = c.new_prepay_request("d", "ORDER_123456", 1, openid());
    r.notify_url = "http://127.0.0.1:8080/notify".into();
    assert_eq!(c.check_prepay(&r), Ok(()));
}

#[tokio::test]
async fn wechat_errors_are_typed_and_classified() {
    let err = |status, code: &str| Answer {
        status,
        body: format!(
            r#"{{"code":"{code}","message":"m","detail":{{"field":"/amount/total","value":0,"issue":"must be >= 1","location":"body"}}}}"#
        ),
        serial: Some(PUB_KEY_ID),
        spoil: false,
    };
    let (_fake, url) = spawn(vec![
        err(400, "PARAM_ERROR"),
        err(404, "ORDER_NOT_EXIST"),
        err(429, "FREQUENCY_LIMITED"),
        err(500, "SYSTEM_ERROR"),
        Answer { status: 502, body: "bad gateway".into(), serial: None, spoil: false },
        err(403, "OUT_TRADE_NO_USED"),
    ])
    .await;
    let c = client(&url, true);
    let expect = [
        (400, "PARAM_ERROR", false),
        (404, "ORDER_NOT_EXIST", false),
        (429, "FREQUENCY_LIMITED", true),
        (500, "SYSTEM_ERROR", true),
        (502, "HTTP_502", true),
        (403, "OUT_TRADE_NO_USED", false),
    ];
    for (status, code, retryable) in expect {
        let e = c.query_by_out_trade_no("ORDER_123456").await.unwrap_err();
        match &e {
            PayError::Api { http_status, code: c, detail, .. } => {
                assert_eq!((*http_status, c.as_str()), (status, code));
                if status != 502 {
                    assert_eq!(detail.as_ref().unwrap().field.as_deref(), Some("/amount/total"));
                }
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.is_retryable(), retryable, "{code}");
    }
}

#[tokio::test]
async fn unverifiable_answers_are_refused() {
    let (_fake, url) = spawn(vec![
        Answer { spoil: true, ..ok(r#"{"prepay_id":"x"}"#) },
        Answer { serial: None, ..ok(r#"{"prepay_id":"x"}"#) },
        Answer { serial: Some("PUB_KEY_ID_999"), ..ok(r#"{"prepay_id":"x"}"#) },
    ])
    .await;
    let c = client(&url, true);
    let req = c.new_prepay_request("d", "ORDER_123456", 1, openid());
    assert!(matches!(c.prepay_jsapi(&req).await, Err(PayError::Verify(VerifyError::BadSignature))));
    assert!(matches!(c.prepay_jsapi(&req).await, Err(PayError::Verify(VerifyError::Malformed(_)))));
    let e = c.prepay_jsapi(&req).await.unwrap_err();
    assert!(matches!(&e, PayError::Verify(VerifyError::UnknownSerial(s)) if s == "PUB_KEY_ID_999"));
    assert!(e.is_retryable());
}

#[tokio::test]
async fn query_close_and_refunds() {
    let notpay = r#"{"appid":"wxd678efh567hg6787","mchid":"1230000109","out_trade_no":"ORDER_123456","trade_state":"NOTPAY","trade_state_desc":"订单未支付","amount":{"total":100,"currency":"CNY"}}"#;
    let refund = r#"{"refund_id":"50000000382019052709732678859","out_refund_no":"R_123456","transaction_id":"4200000000202311270000000001","out_trade_no":"ORDER_123456","channel":"ORIGINAL","user_received_account":"招商银行信用卡0403","create_time":"2026-11-27T10:00:00+08:00","status":"PROCESSING","amount":{"total":100,"refund":40,"payer_total":100,"payer_refund":40,"currency":"CNY"}}"#;
    let (fake, url) = spawn(vec![
        ok(notpay),
        Answer { status: 204, body: String::new(), serial: Some(PUB_KEY_ID), spoil: false },
        ok(refund),
        ok(&refund.replace("PROCESSING", "SUCCESS")),
    ])
    .await;
    let c = client(&url, true);
    let t = c.query_by_out_trade_no("ORDER_123456").await.unwrap();
    assert_eq!(t.trade_state, TradeState::Notpay);
    c.close("ORDER_123456").await.unwrap();
    let req = RefundRequest {
        transaction_id: None,
        out_trade_no: Some("ORDER_123456".into()),
        out_refund_no: "R_123456".into(),
        reason: Some("商品已售完".into()),
        notify_url: None,
        funds_account: None,
        amount: RefundRequestAmount { refund: 40, total: 100, currency: "CNY".into() },
    };
    assert_eq!(c.create_refund(&req).await.unwrap().status, RefundStatus::Processing);
    assert_eq!(c.query_refund("R_123456").await.unwrap().status, RefundStatus::Success);
    let seen = fake.seen.lock().unwrap().clone();
    let paths: Vec<(&str, &str)> = seen.iter().map(|s| (s.0.as_str(), s.1.as_str())).collect();
    assert_eq!(
        paths,
        [
            ("GET", "/v3/pay/transactions/out-trade-no/ORDER_123456?mchid=1230000109"),
            ("POST", "/v3/pay/transactions/out-trade-no/ORDER_123456/close"),
            ("POST", "/v3/refund/domestic/refunds"),
            ("GET", "/v3/refund/domestic/refunds/R_123456"),
        ]
    );
    assert_eq!(seen[1].2, br#"{"mchid":"1230000109"}"#);
    assert!(seen[0].2.is_empty());
    // Refund rules are checked before sending.
    let mut bad = req.clone();
    bad.amount.refund = 101;
    assert!(matches!(c.create_refund(&bad).await, Err(PayError::Invalid(e)) if e.field == "amount.refund"));
    bad = req.clone();
    bad.out_trade_no = None;
    assert!(matches!(c.create_refund(&bad).await, Err(PayError::Invalid(_))));
}

#[tokio::test]
async fn certificates_are_downloaded_decrypted_and_used() {
    let list = certificate_list("2031-01-01T00:00:00+08:00");
    let (_fake, url) = spawn(vec![
        Answer { serial: Some(CERT_SERIAL), ..ok(&list) },
        Answer { serial: Some(CERT_SERIAL), ..ok(r#"{"prepay_id":"p1"}"#) },
    ])
    .await;
    let c = client(&url, false);
    assert!(c.verifier().serials().is_empty());
    assert_eq!(c.download_certificates().await.unwrap(), [CERT_SERIAL]);
    assert_eq!(c.verifier().serials(), [CERT_SERIAL]);
    let req = c.new_prepay_request("d", "ORDER_123456", 1, openid());
    assert_eq!(c.prepay_jsapi(&req).await.unwrap().prepay_id, "p1");
}

#[tokio::test]
async fn certificates_with_the_wrong_apiv3_key_are_refused() {
    let ct = encrypt_resource(&[9u8; 32], "4de73afd28b6", "certificate", PLATFORM_CERT.as_bytes()).unwrap();
    let list = format!(
        r#"{{"data":[{{"serial_no":"{CERT_SERIAL}","effective_time":"","expire_time":"","encrypt_certificate":{{"algorithm":"AEAD_AES_256_GCM","nonce":"4de73afd28b6","associated_data":"certificate","ciphertext":"{ct}"}}}}]}}"#
    );
    let (_fake, url) = spawn(vec![Answer { serial: Some(CERT_SERIAL), ..ok(&list) }]).await;
    let c = client(&url, false);
    assert!(matches!(c.download_certificates().await, Err(PayError::Crypto(_))));
    assert!(c.verifier().serials().is_empty());
}

#[tokio::test]
async fn a_silent_server_times_out_and_is_retryable() {
    let (_fake, url) = spawn(vec![Answer { status: 999, ..ok("") }]).await;
    let c = client(&url, true);
    let e = c.query_by_out_trade_no("ORDER_123456").await.unwrap_err();
    assert!(matches!(e, PayError::Timeout), "{e:?}");
    assert!(e.is_retryable());
}

#[tokio::test]
async fn network_errors_are_retryable() {
    let c = client("http://127.0.0.1:1", true);
    let e = c.query_by_out_trade_no("ORDER_123456").await.unwrap_err();
    assert!(matches!(e, PayError::Network(_)), "{e:?}");
    assert!(e.is_retryable());
}

#[test]
fn jsapi_pay_params_are_signed_with_the_merchant_key() {
    let c = client("http://127.0.0.1:1", true);
    let p = c.jsapi_pay_params("wx2614");
    assert_eq!(p.package, "prepay_id=wx2614");
    assert_eq!(p.sign_type, "RSA");
    assert_eq!(p.nonce_str.len(), 32);
    let msg = pay_sign_message(&p.app_id, &p.time_stamp, &p.nonce_str, &p.package);
    RsaVerifierKey::from_spki_pem(MERCHANT_PUB).unwrap().verify(&msg, &p.pay_sign).unwrap();
}

fn callback(body: &str, signature: Option<&str>, ts: i64) -> HeaderMap {
    let platform = RsaSigner::from_pkcs8_pem(PLATFORM_KEY).unwrap();
    let nonce = nonce_str();
    let sig =
        signature.map(str::to_owned).unwrap_or_else(|| platform.sign(&response_message(ts, &nonce, body.as_bytes())));
    let mut h = HeaderMap::new();
    h.insert("Wechatpay-Timestamp", ts.to_string().parse().unwrap());
    h.insert("Wechatpay-Nonce", nonce.parse().unwrap());
    h.insert("Wechatpay-Signature", sig.parse().unwrap());
    h.insert("Wechatpay-Serial", PUB_KEY_ID.parse().unwrap());
    h
}

fn notification(event: &str, original: &str, plaintext: &str) -> String {
    let nonce = &nonce_str()[..12];
    let resource = EncryptedResource {
        original_type: original.into(),
        algorithm: "AEAD_AES_256_GCM".into(),
        ciphertext: encrypt_resource(APIV3_KEY, nonce, original, plaintext.as_bytes()).unwrap(),
        associated_data: original.into(),
        nonce: nonce.into(),
    };
    serde_json::json!({
        "id": "EV-2018022511223320873", "create_time": "2026-11-27T10:00:00+08:00",
        "event_type": event, "resource_type": "encrypt-resource", "summary": "支付成功",
        "resource": resource,
    })
    .to_string()
}

#[test]
fn callbacks_are_verified_then_decrypted() {
    let c = client("http://127.0.0.1:1", true);
    let reader = c.notification_reader();
    let now = chrono::Utc::now().timestamp();
    let tx = r#"{"appid":"wxd678efh567hg6787","mchid":"1230000109","out_trade_no":"ORDER_123456","transaction_id":"4200000000202311270000000001","trade_type":"JSAPI","trade_state":"SUCCESS","trade_state_desc":"支付成功","bank_type":"CMC","attach":"","success_time":"2026-11-27T10:00:00+08:00","payer":{"openid":"oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},"amount":{"total":100,"payer_total":100,"currency":"CNY","payer_currency":"CNY"}}"#;
    let body = notification("TRANSACTION.SUCCESS", "transaction", tx);
    let got = reader.read(&callback(&body, None, now), body.as_bytes(), now).unwrap();
    match got.payload {
        NotifyPayload::Transaction(t) => assert_eq!(t.transaction_id.as_deref(), Some("4200000000202311270000000001")),
        other => panic!("{other:?}"),
    }
    let refund = r#"{"mchid":"1230000109","out_trade_no":"ORDER_123456","transaction_id":"4200000000202311270000000001","out_refund_no":"R_123456","refund_id":"50000000382019052709732678859","refund_status":"SUCCESS","success_time":"2026-11-27T10:00:00+08:00","user_received_account":"招商银行信用卡0403","amount":{"total":100,"refund":40,"payer_total":100,"payer_refund":40}}"#;
    let body = notification("REFUND.SUCCESS", "refund", refund);
    let got = reader.read(&callback(&body, None, now), body.as_bytes(), now).unwrap();
    assert!(matches!(got.payload, NotifyPayload::Refund(r) if r.refund_status == RefundStatus::Success));
    // A probe, a stale callback and a tampered body are all refused.
    let probe = callback(&body, Some("WECHATPAY/SIGNTEST/abc"), now);
    assert!(matches!(reader.read(&probe, body.as_bytes(), now), Err(wechat::NotifyError::Verify(VerifyError::Probe))));
    let stale = callback(&body, None, now - 301);
    assert!(matches!(
        reader.read(&stale, body.as_bytes(), now),
        Err(wechat::NotifyError::Verify(VerifyError::Stale { .. }))
    ));
    let tampered = body.replace("REFUND.SUCCESS", "REFUND.CLOSED");
    assert!(matches!(
        reader.read(&callback(&body, None, now), tampered.as_bytes(), now),
        Err(wechat::NotifyError::Verify(VerifyError::BadSignature))
    ));
}

fn certificate_list(expire_time: &str) -> String {
    let ct = encrypt_resource(APIV3_KEY, "4de73afd28b6", "certificate", PLATFORM_CERT.as_bytes()).unwrap();
    serde_json::json!({"data": [{
        "serial_no": CERT_SERIAL,
        "effective_time": "2026-01-01T00:00:00+08:00",
        "expire_time": expire_time,
        "encrypt_certificate": {"algorithm": "AEAD_AES_256_GCM", "nonce": "4de73afd28b6",
                                "associated_data": "certificate", "ciphertext": ct}
    }]})
    .to_string()
}

#[tokio::test]
async fn an_unknown_certificate_serial_triggers_one_download() {
    let (fake, url) = spawn(vec![
        Answer { serial: Some(CERT_SERIAL), ..ok(r#"{"prepay_id":"p2"}"#) },
        Answer { serial: Some(CERT_SERIAL), ..ok(&certificate_list("2099-01-01T00:00:00+08:00")) },
    ])
    .await;
    let c = client(&url, false);
    let req = c.new_prepay_request("d", "ORDER_123456", 1, openid());
    assert_eq!(c.prepay_jsapi(&req).await.unwrap().prepay_id, "p2");
    assert_eq!(fake.seen.lock().unwrap()[1].1, "/v3/certificates");
    assert_eq!(c.verifier().serials(), [CERT_SERIAL]);
}

#[tokio::test]
async fn expired_certificates_are_not_trusted() {
    let (_fake, url) =
        spawn(vec![Answer { serial: Some(CERT_SERIAL), ..ok(&certificate_list("2020-01-01T00:00:00+08:00")) }]).await;
    let c = client(&url, false);
    let e = c.download_certificates().await.unwrap_err();
    assert!(matches!(e, PayError::Verify(VerifyError::UnknownSerial(_))), "{e:?}");
    assert!(c.verifier().serials().is_empty());
}
