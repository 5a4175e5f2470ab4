//! Tencent Cloud SMS signing (known answer from Python) and the client against a fake
//! endpoint; config parsing and validation.

use axum::Router;
use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use secrecy::ExposeSecret as _;
use wechat::{SmsClient, SmsConfig, SmsError, Tc3Authorization, WechatConfig, tc3_authorization, tc3_signature};

fn tc3() -> serde_json::Value {
    serde_json::from_str(include_str!("fixtures/tc3.json")).unwrap()
}

#[test]
fn tc3_matches_python_hmac() {
    let v = tc3();
    let s = |k: &str| v[k].as_str().unwrap().to_owned();
    let got = tc3_authorization(
        &s("secret_id"),
        &s("secret_key"),
        &s("service"),
        &s("host"),
        &s("content_type"),
        v["timestamp"].as_i64().unwrap(),
        s("payload").as_bytes(),
    );
    assert_eq!(got, s("authorization"));
}

const SECRET_KEY: &str = "testKeyEXAMPLE0000000000000000000";

/// Checks the request the way Tencent Cloud does, then answers per phone number.
async fn fake_sms(headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert_eq!(h("x-tc-action"), "SendSms");
    assert_eq!(h("x-tc-version"), "2021-01-11");
    assert_eq!(h("x-tc-region"), "ap-guangzhou");
    let auth = Tc3Authorization::parse(&h("authorization")).unwrap();
    let ts: i64 = h("x-tc-timestamp").parse().unwrap();
    let expected = tc3_signature(SECRET_KEY, &auth.service, &h("host"), &h("content-type"), ts, &body);
    if auth.signature != expected || auth.secret_id != "AKIDtest" {
        return axum::Json(serde_json::json!({"Response": {
            "Error": {"Code": "AuthFailure.SignatureFailure", "Message": "The provided credentials could not be validated."},
            "RequestId": "r-err"}}));
    }
    let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(req["SmsSdkAppId"], "1400006666");
    assert_eq!(req["SignName"], "腾讯云");
    assert_eq!(req["TemplateParamSet"][0], "1234");
    let set: Vec<_> = req["PhoneNumberSet"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let n = n.as_str().unwrap();
            let (code, msg) = if n.ends_with("0000") {
                ("LimitExceeded.PhoneNumberDailyLimit", "daily limit")
            } else {
                ("Ok", "send success")
            };
            serde_json::json!({"SerialNo": "2028:1", "PhoneNumber": n, "Fee": 1, "SessionContext": "",
                               "Code": code, "Message": msg, "IsoCode": "CN"})
        })
        .collect();
    axum::Json(serde_json::json!({"Response": {"SendStatusSet": set, "RequestId": "r-1"}}))
}

async fn spawn() -> String {
    let app = Router::new().fallback(fake_sms);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn sms_config(base_url: &str, secret_key: &str) -> SmsConfig {
    serde_json::from_value(serde_json::json!({
        "base_url": base_url, "secret_id": "AKIDtest", "secret_key": secret_key,
        "sdk_app_id": "1400006666", "sign_name": "腾讯云",
    }))
    .unwrap()
}

#[tokio::test]
async fn send_sms_is_signed_and_per_number_status_parsed() {
    let url = spawn().await;
    let c = SmsClient::from_config(&sms_config(&url, SECRET_KEY)).unwrap();
    let got =
        c.send_sms("1234567", &["1234".into()], &["+8613800138001".into(), "+8613800130000".into()]).await.unwrap();
    assert_eq!(got.len(), 2);
    assert!(got[0].is_ok());
    assert_eq!(got[1].code, "LimitExceeded.PhoneNumberDailyLimit");
    let bad = SmsClient::from_config(&sms_config(&url, "wrong-key")).unwrap();
    match bad.send_sms("1234567", &["1234".into()], &["+8613800138001".into()]).await {
        Err(e @ SmsError::Api { .. }) => {
            assert!(!e.is_retryable());
            assert!(
                matches!(&e, SmsError::Api { code, request_id, .. } if code == "AuthFailure.SignatureFailure" && request_id == "r-err")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(c.send_sms("1234567", &[], &["12345".into()]).await, Err(SmsError::Invalid(_))));
    assert!(matches!(c.send_sms("abc", &[], &["+8613800138001".into()]).await, Err(SmsError::Invalid(_))));
}

fn wechat_json() -> serde_json::Value {
    serde_json::json!({
        "mchid": "1230000109",
        "appid": "wxd678efh567hg6787",
        "merchant_serial_no": "3775B6A45ACD588826D15E583A95F5DD00000000",
        "merchant_private_key_path": concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/test_merchant_key.pem"),
        "apiv3_key": "0123456789abcdefghijklmnopqrstuv",
        "platform_public_key_id": "PUB_KEY_ID_0114232134912410000000000000000000",
        "platform_public_key_path": concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/test_platform_pub.pem"),
        "notify_url": "https://pay.example.com/wechat/notify",
        "miniprogram_secret": "mp-secret-value",
    })
}

fn wechat_config(patch: serde_json::Value) -> WechatConfig {
    let mut v = wechat_json();
    for (k, val) in patch.as_object().unwrap() {
        if val.is_null() {
            v.as_object_mut().unwrap().remove(k);
        } else {
            v[k] = val.clone();
        }
    }
    serde_json::from_value(v).unwrap()
}

#[test]
fn wechat_config_defaults_and_secret_masking() {
    let c = wechat_config(serde_json::json!({}));
    c.validate().unwrap();
    assert_eq!(c.pay_base_url, "https://api.mch.weixin.qq.com");
    assert_eq!(c.miniprogram_base_url, "https://api.weixin.qq.com");
    assert_eq!(c.request_timeout_ms, 10_000);
    assert!(!c.allow_insecure_loopback && !c.platform_certificates);
    let debug = format!("{c:?}");
    assert!(!debug.contains("0123456789abcdef") && !debug.contains("mp-secret-value"), "{debug}");
    assert_eq!(c.miniprogram_secret().unwrap().expose_secret(), "mp-secret-value");
    wechat::PayClient::from_config(&c).unwrap();
    wechat::MiniProgramClient::from_config(&c).unwrap();
}

#[test]
fn wechat_config_errors_name_the_key() {
    let cases = [
        (serde_json::json!({"apiv3_key": "short"}), "wechat.apiv3_key must be 32 bytes"),
        (serde_json::json!({"notify_url": "https://a.example.com/n?x=1"}), "wechat.notify_url"),
        (serde_json::json!({"notify_url": "http://127.0.0.1:8080/n"}), "wechat.notify_url"),
        (serde_json::json!({"platform_public_key_path": null}), "wechat.platform_public_key_path"),
        (
            serde_json::json!({"platform_public_key_id": null, "platform_public_key_path": null}),
            "wechat.platform_public_key_id",
        ),
        (serde_json::json!({"platform_public_key_id": "KEY1"}), "wechat.platform_public_key_id"),
        (serde_json::json!({"pay_base_url": "http://api.mch.weixin.qq.com"}), "wechat.pay_base_url"),
        (serde_json::json!({"request_timeout_ms": 0}), "wechat.request_timeout_ms"),
        (serde_json::json!({"mchid": ""}), "wechat.mchid"),
    ];
    for (patch, want) in cases {
        let e = wechat_config(patch.clone()).validate().unwrap_err();
        assert!(e.to_string().starts_with(want), "{patch}: {e}");
    }
    // Loopback http is fine once allowed; certificate mode alone is fine.
    wechat_config(serde_json::json!({"notify_url": "http://127.0.0.1:8080/n", "allow_insecure_loopback": true}))
        .validate()
        .unwrap();
    // A development cluster: the sandbox's and the ingress's Services over http, by name only.
    let dev = serde_json::json!({
        "notify_url": "http://paystream-ingress:8080/n",
        "pay_base_url": "http://wechat-sandbox:8090",
        "miniprogram_base_url": "http://wechat-sandbox:8090",
        "insecure_http_hosts": ["wechat-sandbox", "paystream-ingress"],
    });
    wechat_config(dev).validate().unwrap();
    let e = wechat_config(serde_json::json!({
        "pay_base_url": "http://wechat-sandbox:8090",
        "insecure_http_hosts": ["paystream-ingress"],
    }))
    .validate()
    .unwrap_err();
    assert!(e.to_string().starts_with("wechat.pay_base_url"), "{e}");
    let e = wechat_config(serde_json::json!({"insecure_http_hosts": ["http://wechat-sandbox:8090"]}))
        .validate()
        .unwrap_err();
    assert!(e.to_string().starts_with("wechat.insecure_http_hosts"), "{e}");
    wechat_config(serde_json::json!({"platform_public_key_id": null, "platform_public_key_path": null, "platform_certificates": true}))
        .validate()
        .unwrap();
    // A missing key file is reported with its key.
    let e = wechat::PayClient::from_config(&wechat_config(
        serde_json::json!({"merchant_private_key_path": "/nonexistent.pem"}),
    ))
    .unwrap_err();
    assert_eq!(e.key, "wechat.merchant_private_key_path");
}

#[test]
fn a_role_without_a_secret_is_refused_only_the_client_that_needs_it() {
    // The payment processor is given neither secret, the notifier no APIv3 key.
    let ids_only = wechat_config(serde_json::json!({"apiv3_key": null, "miniprogram_secret": null}));
    ids_only.validate().unwrap();
    let e = wechat::PayClient::from_config(&ids_only).unwrap_err();
    assert_eq!(e.key, "wechat.apiv3_key");
    let e = wechat::MiniProgramClient::from_config(&ids_only).unwrap_err();
    assert_eq!(e.key, "wechat.miniprogram_secret");
    let notifier = wechat_config(serde_json::json!({"apiv3_key": null}));
    wechat::MiniProgramClient::from_config(&notifier).unwrap();
    let e = wechat_config(serde_json::json!({"miniprogram_secret": ""})).validate().unwrap_err();
    assert_eq!(e.key, "wechat.miniprogram_secret");
}

#[test]
fn unknown_keys_are_refused() {
    let mut v = wechat_json();
    v["apiv3key"] = "typo".into();
    let e = serde_json::from_value::<WechatConfig>(v).unwrap_err();
    assert!(e.to_string().contains("apiv3key"), "{e}");
}

#[test]
fn sms_config_validation() {
    let c = sms_config("https://sms.tencentcloudapi.com", "k");
    c.validate().unwrap();
    assert_eq!(c.region, "ap-guangzhou");
    assert!(!format!("{c:?}").contains("\"k\""));
    let mut bad = c.clone();
    bad.sdk_app_id = "abc".into();
    assert!(bad.validate().unwrap_err().to_string().starts_with("sms.sdk_app_id"));
    let mut bad = c;
    bad.base_url = "http://sms.example.com".into();
    assert!(bad.validate().unwrap_err().to_string().starts_with("sms.base_url"));
}

#[test]
fn a_key_rotation_accepts_both_wechat_pay_public_keys() {
    let pem = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/test_platform_pub.pem");
    let next = "PUB_KEY_ID_0114232134912410000000000000000001";
    let c = wechat_config(serde_json::json!({ "additional_platform_public_keys": [{ "id": next, "path": pem }] }));
    let pay = wechat::PayClient::from_config(&c).unwrap();
    let mut serials = pay.verifier().serials();
    serials.sort();
    assert_eq!(serials, vec!["PUB_KEY_ID_0114232134912410000000000000000000".to_owned(), next.to_owned()]);
    assert_eq!(pay.settings().platform_public_key_id.as_deref(), Some("PUB_KEY_ID_0114232134912410000000000000000000"));
    let bad = wechat_config(serde_json::json!({ "additional_platform_public_keys": [{ "id": "KEY2", "path": pem }] }));
    assert!(bad.validate().unwrap_err().to_string().contains("wechat.additional_platform_public_keys"));
    let missing = wechat_config(
        serde_json::json!({ "additional_platform_public_keys": [{ "id": next, "path": "/nonexistent/next.pem" }] }),
    );
    assert!(
        wechat::PayClient::from_config(&missing).unwrap_err().to_string().contains("additional_platform_public_keys")
    );
}
