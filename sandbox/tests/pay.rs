//! Pay v3 against a sandbox on port 0, with requests signed by hand from the protocol.

mod common;

use std::time::Duration;

use common::{Receiver, spawn, wait_for};
use serde_json::{Value, json};
use wechat::{AuthorizationHeader, nonce_str};

const DEADLINE: Duration = Duration::from_secs(10);

fn order_no() -> String {
    format!("HSO{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
}

#[tokio::test]
async fn unsigned_badly_signed_and_stale_requests_get_401_sign_error() {
    let env = spawn().await;
    let m = &env.merchant;
    let body = serde_json::to_vec(&m.prepay_body(&order_no(), 100, "https://example.com/notify")).unwrap();
    let path = "/v3/pay/transactions/jsapi";

    // No Authorization at all.
    let a = m.send("POST", path, body.clone(), None).await;
    assert_eq!((a.status, a.code().as_str()), (401, "SIGN_ERROR"));
    assert!(a.json()["message"].is_string());

    // Signed over other bytes than the ones sent (the raw body is what counts).
    let ts = chrono::Utc::now().timestamp();
    let mut other = body.clone();
    other.push(b' ');
    let auth = AuthorizationHeader::sign(&m.signer, &m.mchid, &m.serial_no, "POST", path, ts, &nonce_str(), &other);
    let a = m.send("POST", path, body.clone(), Some(auth.to_string())).await;
    assert_eq!((a.status, a.code().as_str()), (401, "SIGN_ERROR"));

    // Signed over another path and query than the one requested.
    let auth = AuthorizationHeader::sign(&m.signer, &m.mchid, &m.serial_no, "POST", "/v3/x", ts, &nonce_str(), &body);
    let a = m.send("POST", path, body.clone(), Some(auth.to_string())).await;
    assert_eq!(a.status, 401);

    // Correct signature but six minutes old.
    let stale = ts - 360;
    let auth = AuthorizationHeader::sign(&m.signer, &m.mchid, &m.serial_no, "POST", path, stale, &nonce_str(), &body);
    let a = m.send("POST", path, body.clone(), Some(auth.to_string())).await;
    assert_eq!((a.status, a.code().as_str()), (401, "SIGN_ERROR"));

    // Wrong certificate serial.
    let auth = AuthorizationHeader::sign(&m.signer, &m.mchid, &"0".repeat(40), "POST", path, ts, &nonce_str(), &body);
    let a = m.send("POST", path, body.clone(), Some(auth.to_string())).await;
    assert_eq!(a.status, 401);

    // Another key than the merchant's.
    let stranger = wechat::RsaSigner::generate().unwrap();
    let auth = AuthorizationHeader::sign(&stranger, &m.mchid, &m.serial_no, "POST", path, ts, &nonce_str(), &body);
    let a = m.send("POST", path, body.clone(), Some(auth.to_string())).await;
    assert_eq!(a.status, 401);

    // Fields in another order and with spaces still parse: the same request, reordered.
    let auth = AuthorizationHeader::sign(&m.signer, &m.mchid, &m.serial_no, "POST", path, ts, "NONCE123", &body);
    let reordered = format!(
        "WECHATPAY2-SHA256-RSA2048 signature=\"{}\", timestamp=\"{}\", serial_no=\"{}\", nonce_str=\"{}\", mchid=\"{}\"",
        auth.signature, auth.timestamp, auth.serial_no, auth.nonce_str, auth.mchid
    );
    let a = m.send("POST", path, body, Some(reordered)).await;
    assert_eq!(a.status, 200, "{}", a.text());
}

#[tokio::test]
async fn query_strings_are_signed_as_sent() {
    let env = spawn().await;
    let m = &env.merchant;
    let no = order_no();
    assert_eq!(m.prepay(&no, 1, "https://example.com/n").await.status, 200);
    // A signature over the path without its query is refused.
    let path = format!("/v3/pay/transactions/out-trade-no/{no}");
    let ts = chrono::Utc::now().timestamp();
    let auth = AuthorizationHeader::sign(&m.signer, &m.mchid, &m.serial_no, "GET", &path, ts, &nonce_str(), b"");
    let a = m.send("GET", &format!("{path}?mchid={}", m.mchid), Vec::new(), Some(auth.to_string())).await;
    assert_eq!(a.status, 401);
    assert_eq!(m.query(&no).await.status, 200);
}

#[tokio::test]
async fn field_rules_are_checked_like_wechat() {
    let env = spawn().await;
    let m = &env.merchant;
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        ("/description", json!("长".repeat(128)), 400, "PARAM_ERROR"),
        ("/out_trade_no", json!("short"), 400, "PARAM_ERROR"),
        ("/out_trade_no", json!("has space in it"), 400, "PARAM_ERROR"),
        ("/amount/total", json!(0), 400, "PARAM_ERROR"),
        ("/amount/currency", json!("USD"), 400, "PARAM_ERROR"),
        ("/notify_url", json!("http://example.com/notify"), 400, "PARAM_ERROR"),
        ("/notify_url", json!("https://example.com/notify?x=1"), 400, "PARAM_ERROR"),
        ("/time_expire", json!("tomorrow"), 400, "PARAM_ERROR"),
        ("/appid", json!("wx0000000000000000"), 400, "APPID_MCHID_NOT_MATCH"),
    ];
    for (field, value, status, code) in cases {
        let mut body = m.prepay_body(&order_no(), 100, "https://example.com/notify");
        match body.pointer_mut(field) {
            Some(slot) => *slot = value.clone(),
            None => body[&field[1..]] = value.clone(),
        }
        let a = m.call("POST", "/v3/pay/transactions/jsapi", Some(&body)).await;
        assert_eq!((a.status, a.code().as_str()), (status, code), "{field} = {value}: {}", a.text());
        if code == "PARAM_ERROR" {
            assert_eq!(a.json()["detail"]["field"], field, "{}", a.text());
        }
    }
    let mut body = m.prepay_body(&order_no(), 100, "https://example.com/notify");
    body["payer"].as_object_mut().unwrap().remove("openid");
    let a = m.call("POST", "/v3/pay/transactions/jsapi", Some(&body)).await;
    assert_eq!((a.status, a.code().as_str()), (400, "PARAM_ERROR"));
    // A loopback http notify_url is fine in the sandbox (it can only call local receivers).
    assert_eq!(m.prepay(&order_no(), 1, "http://127.0.0.1:9/notify").await.status, 200);
}

#[tokio::test]
async fn order_rules_reentry_params_paid_closed_and_query() {
    let env = spawn().await;
    let m = &env.merchant;
    let no = order_no();

    // Unknown order: 404 ORDER_NOT_EXIST.
    let a = m.query(&no).await;
    assert_eq!((a.status, a.code().as_str()), (404, "ORDER_NOT_EXIST"));

    let first = m.prepay(&no, 100, "https://example.com/notify").await;
    assert_eq!(first.status, 200, "{}", first.text());
    let p1 = first.json()["prepay_id"].as_str().unwrap().to_owned();
    assert!(p1.starts_with("wx") && p1.len() <= 64);

    // Same parameters again: a new prepay_id.
    let again = m.prepay(&no, 100, "https://example.com/notify").await;
    assert_eq!(again.status, 200);
    assert_ne!(again.json()["prepay_id"].as_str().unwrap(), p1);

    // Different parameters: refused.
    let diff = m.prepay(&no, 101, "https://example.com/notify").await;
    assert_eq!((diff.status, diff.code().as_str()), (400, "INVALID_REQUEST"), "{}", diff.text());

    // NOTPAY query: no transaction_id, no payer.
    let q = m.query(&no).await.json();
    assert_eq!(q["trade_state"], "NOTPAY");
    assert!(q.get("transaction_id").is_none() && q.get("payer").is_none());
    assert_eq!(q["amount"]["total"], 100);

    // Pay it: SUCCESS with a 28-digit transaction id.
    assert_eq!(m.pay(&no, "SUCCESS").await.status(), 200);
    let q = m.query(&no).await.json();
    assert_eq!(q["trade_state"], "SUCCESS");
    assert_eq!(q["transaction_id"].as_str().unwrap().len(), 28);
    assert_eq!(q["payer"]["openid"], "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o");
    assert!(q["success_time"].as_str().unwrap().ends_with("+08:00"));
    let by_id = m
        .call(
            "GET",
            &format!("/v3/pay/transactions/id/{}?mchid={}", q["transaction_id"].as_str().unwrap(), m.mchid),
            None,
        )
        .await;
    assert_eq!(by_id.json()["out_trade_no"], no.as_str());

    // Paid: prepay again is 403 ORDERPAID, close is refused, paying twice is a conflict.
    let a = m.prepay(&no, 100, "https://example.com/notify").await;
    assert_eq!((a.status, a.code().as_str()), (403, "ORDERPAID"));
    let close = json!({"mchid": m.mchid});
    let a = m.call("POST", &format!("/v3/pay/transactions/out-trade-no/{no}/close"), Some(&close)).await;
    assert_eq!(a.status, 403);
    assert_eq!(m.pay(&no, "SUCCESS").await.status(), 409);
    // Its notify_url is off this machine: the callback is recorded as not sent, never sent.
    let rec = wait_for("refused delivery", DEADLINE, || async {
        let v = m.control_get(&format!("/sandbox/v1/callbacks?out_trade_no={no}")).await;
        v["data"].as_array().and_then(|a| a.first().cloned())
    })
    .await;
    assert!(rec["error"].as_str().unwrap().starts_with("not sent: notify_url is not on loopback"), "{rec}");
    assert!(rec["status"].is_null());

    // Close an open order twice: 204 with a signed empty body both times; then prepay is
    // ORDER_CLOSED and paying is impossible.
    let no2 = order_no();
    assert_eq!(m.prepay(&no2, 5, "https://example.com/notify").await.status, 200);
    for _ in 0..2 {
        let a = m.call("POST", &format!("/v3/pay/transactions/out-trade-no/{no2}/close"), Some(&close)).await;
        assert_eq!(a.status, 204);
        assert!(a.body.is_empty());
    }
    assert_eq!(m.query(&no2).await.json()["trade_state"], "CLOSED");
    let a = m.prepay(&no2, 5, "https://example.com/notify").await;
    assert_eq!((a.status, a.code().as_str()), (400, "ORDER_CLOSED"));
    assert_eq!(m.pay(&no2, "SUCCESS").await.status(), 409);

    // Closing an unknown order: 404.
    let a = m.call("POST", &format!("/v3/pay/transactions/out-trade-no/{}/close", order_no()), Some(&close)).await;
    assert_eq!(a.status, 404);

    // Past its time_expire an order can no longer be paid.
    let no4 = order_no();
    let mut body = m.prepay_body(&no4, 5, "https://example.com/notify");
    body["time_expire"] = json!("2020-01-01T00:00:00+08:00");
    assert_eq!(m.call("POST", "/v3/pay/transactions/jsapi", Some(&body)).await.status, 200);
    assert_eq!(m.pay(&no4, "SUCCESS").await.status(), 409);
    assert_eq!(m.query(&no4).await.json()["trade_state"], "NOTPAY");

    // A failed payment leaves the order open for another try.
    let no3 = order_no();
    assert_eq!(m.prepay(&no3, 5, "https://example.com/notify").await.status, 200);
    assert_eq!(m.pay(&no3, "PAYERROR").await.status(), 200);
    assert_eq!(m.query(&no3).await.json()["trade_state"], "PAYERROR");
    assert_eq!(m.prepay(&no3, 5, "https://example.com/notify").await.status, 200);
    assert_eq!(m.pay(&no3, "SUCCESS").await.status(), 200);
}

#[tokio::test]
async fn callback_is_encrypted_signed_and_decryptable() {
    let env = spawn().await;
    let m = &env.merchant;
    let rx = Receiver::start(0).await;
    let no = order_no();
    assert_eq!(m.prepay(&no, 2500, &rx.url()).await.status, 200);
    assert_eq!(m.pay(&no, "SUCCESS").await.status(), 200);
    let got = wait_for("the callback", DEADLINE, || async { rx.received().first().cloned() }).await;

    // Signature over TIMESTAMP\nNONCE\nBODY\n with the platform key, serial = PUB_KEY_ID.
    let h = |k: &str| got.headers.get(k).unwrap().to_str().unwrap().to_owned();
    assert_eq!(h("wechatpay-serial"), m.platform_key_id);
    let ts: i64 = h("wechatpay-timestamp").parse().unwrap();
    let msg = wechat::response_message(ts, &h("wechatpay-nonce"), &got.body);
    m.platform_key.verify(&msg, &h("wechatpay-signature")).expect("callback signed by the platform key");

    let n: wechat::Notification = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(n.id.len(), 36);
    assert!(n.create_time.ends_with("+08:00"));
    assert_eq!(n.event_type.as_str(), "TRANSACTION.SUCCESS");
    assert_eq!(n.resource_type, "encrypt-resource");
    assert_eq!(n.resource.associated_data, "transaction");
    assert_eq!(n.resource.nonce.len(), 12);
    let plain = n.resource.decrypt(&m.apiv3_key).unwrap();
    let t: wechat::Transaction = serde_json::from_slice(&plain).unwrap();
    assert_eq!(t.out_trade_no, no);
    assert_eq!(t.trade_state, wechat::TradeState::Success);
    assert_eq!(t.amount.unwrap().total, Some(2500));

    // The control API lists the attempt as acknowledged.
    let list = m.control_get(&format!("/sandbox/v1/callbacks?out_trade_no={no}")).await;
    let list = list["data"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["attempt"], 1);
    assert_eq!(list[0]["status"], 204);
    assert_eq!(list[0]["acknowledged"], true);
    assert_eq!(list[0]["id"], n.id.as_str());
}

#[tokio::test]
async fn failed_callbacks_are_retried_on_the_scaled_schedule() {
    let env = spawn().await; // time_scale 1000: retries after 15 ms, 15 ms, 30 ms, …
    let m = &env.merchant;
    let rx = Receiver::start(2).await;
    let no = order_no();
    assert_eq!(m.prepay(&no, 1, &rx.url()).await.status, 200);
    assert_eq!(m.pay(&no, "SUCCESS").await.status(), 200);

    let attempts = wait_for("three attempts, the last acknowledged", DEADLINE, || async {
        let v = m.control_get(&format!("/sandbox/v1/callbacks?out_trade_no={no}")).await;
        let list = v["data"].as_array().cloned().unwrap_or_default();
        list.iter().any(|a| a["acknowledged"] == true).then_some(list)
    })
    .await;
    let statuses: Vec<_> = attempts.iter().map(|a| (a["attempt"].as_u64().unwrap(), a["status"].as_u64())).collect();
    assert_eq!(statuses, vec![(1, Some(500)), (2, Some(500)), (3, Some(204))]);

    // Same notification every time (same id), spaced by at least the scaled delays.
    let got = rx.received();
    assert_eq!(got.len(), 3);
    let ids: Vec<Value> = got.iter().map(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["id"].clone()).collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]));
    assert!(got[1].at - got[0].at >= Duration::from_millis(15));
    assert!(got[2].at - got[1].at >= Duration::from_millis(15));
}

#[tokio::test]
async fn refunds_are_idempotent_by_out_refund_no_and_notify_on_success() {
    let env = spawn().await;
    let m = &env.merchant;
    let rx = Receiver::start(0).await;
    let no = order_no();
    assert_eq!(m.prepay(&no, 1000, &rx.url()).await.status, 200);

    let refund = |out_refund_no: &str, amount: i64| {
        json!({"out_trade_no": no, "out_refund_no": out_refund_no, "reason": "客户取消",
               "notify_url": rx.url(), "amount": {"refund": amount, "total": 1000, "currency": "CNY"}})
    };
    // Not paid yet: refused.
    let a = m.call("POST", "/v3/refund/domestic/refunds", Some(&refund("RFD-1", 400))).await;
    assert_eq!(a.status, 400, "{}", a.text());

    assert_eq!(m.pay(&no, "SUCCESS").await.status(), 200);
    let first = m.call("POST", "/v3/refund/domestic/refunds", Some(&refund("RFD-1", 400))).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let r1 = first.json();
    assert_eq!(r1["status"], "PROCESSING");
    assert_eq!(r1["amount"]["refund"], 400);

    // The same out_refund_no again: the same refund, not a second one.
    let again = m.call("POST", "/v3/refund/domestic/refunds", Some(&refund("RFD-1", 400))).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["refund_id"], r1["refund_id"]);
    // The same out_refund_no with another amount: refused.
    let a = m.call("POST", "/v3/refund/domestic/refunds", Some(&refund("RFD-1", 500))).await;
    assert_eq!(a.status, 400);
    // More than what is left: refused (400 refunded + 700 > 1000).
    let a = m.call("POST", "/v3/refund/domestic/refunds", Some(&refund("RFD-2", 700))).await;
    assert_eq!((a.status, a.code().as_str()), (403, "NOT_ENOUGH"));

    // PROCESSING → SUCCESS after the scaled delay, with a REFUND.SUCCESS callback.
    let done = wait_for("refund SUCCESS", DEADLINE, || async {
        let a = m.call("GET", "/v3/refund/domestic/refunds/RFD-1", None).await;
        let v = a.json();
        (v["status"] == "SUCCESS").then_some(v)
    })
    .await;
    assert!(done["success_time"].is_string());
    let n = wait_for("refund callback", DEADLINE, || async {
        rx.received()
            .iter()
            .map(|r| serde_json::from_slice::<wechat::Notification>(&r.body).unwrap())
            .find(|n| n.event_type.as_str() == "REFUND.SUCCESS")
    })
    .await;
    assert_eq!(n.resource.associated_data, "refund");
    let notice: wechat::RefundNotice = serde_json::from_slice(&n.resource.decrypt(&m.apiv3_key).unwrap()).unwrap();
    assert_eq!(notice.out_refund_no, "RFD-1");
    assert_eq!(notice.amount.refund, 400);
    assert_eq!(m.query(&no).await.json()["trade_state"], "REFUND");

    let a = m.call("GET", "/v3/refund/domestic/refunds/NOPE", None).await;
    assert_eq!(a.status, 404);
}

#[tokio::test]
async fn certificates_are_encrypted_and_hold_the_platform_key() {
    let env = spawn().await;
    let m = &env.merchant;
    let a = m.call("GET", "/v3/certificates", None).await;
    assert_eq!(a.status, 200);
    let list: wechat::CertificateList = serde_json::from_slice(&a.body).unwrap();
    let c = &list.data[0];
    assert_eq!(c.serial_no.len(), 40);
    assert_eq!(c.encrypt_certificate.associated_data, "certificate");
    let pem = String::from_utf8(c.encrypt_certificate.decrypt(&m.apiv3_key).unwrap()).unwrap();
    let key = wechat::RsaVerifierKey::from_certificate_pem(&pem).unwrap();
    assert_eq!(key.spki_der(), m.platform_key.spki_der());
}

#[tokio::test]
async fn faults_fail_calls_probe_duplicate_and_drop_callbacks() {
    let env = spawn().await;
    let m = &env.merchant;
    let rx = Receiver::start(0).await;

    // The next two prepay calls fail with the injected error; the third goes through.
    m.fault(
        json!({"kind":"fail","api":"jsapi","times":2,"status":429,"code":"FREQUENCY_LIMITED","message":"频率超限"}),
    )
    .await;
    let no = order_no();
    for _ in 0..2 {
        let a = m.prepay(&no, 1, &rx.url()).await;
        assert_eq!((a.status, a.code().as_str()), (429, "FREQUENCY_LIMITED"));
    }
    assert_eq!(m.prepay(&no, 1, &rx.url()).await.status, 200);

    // Latency is added to the chosen API only.
    m.fault(json!({"kind":"latency","api":"query_order","ms":150,"times":1})).await;
    let t = std::time::Instant::now();
    assert_eq!(m.query(&no).await.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(150));

    // Paid → one delivery; a duplicate carries the same id; a SIGNTEST probe does not verify.
    assert_eq!(m.pay(&no, "SUCCESS").await.status(), 200);
    wait_for("delivery", DEADLINE, || async { (rx.received().len() == 1).then_some(()) }).await;
    m.fault(json!({"kind":"duplicate_callback","out_trade_no": no})).await;
    wait_for("duplicate", DEADLINE, || async { (rx.received().len() == 2).then_some(()) }).await;
    m.fault(json!({"kind":"signtest_callback","out_trade_no": no})).await;
    let got = wait_for("probe", DEADLINE, || async { (rx.received().len() == 3).then(|| rx.received()) }).await;
    let id = |r: &common::Received| serde_json::from_slice::<Value>(&r.body).unwrap()["id"].clone();
    assert_eq!(id(&got[0]), id(&got[1]));
    let probe_sig = got[2].headers.get("wechatpay-signature").unwrap().to_str().unwrap();
    assert!(probe_sig.starts_with("WECHATPAY/SIGNTEST/"));
    let kinds = m.control_get(&format!("/sandbox/v1/callbacks?out_trade_no={no}")).await;
    let kinds: Vec<_> =
        kinds["data"].as_array().unwrap().iter().map(|r| r["kind"].as_str().unwrap().to_owned()).collect();
    assert_eq!(kinds, ["delivery", "duplicate", "signtest"]);

    // Dropped callbacks are never sent, only recorded.
    let no2 = order_no();
    assert_eq!(m.prepay(&no2, 1, &rx.url()).await.status, 200);
    m.fault(json!({"kind":"drop_callbacks","out_trade_no": no2})).await;
    assert_eq!(m.pay(&no2, "SUCCESS").await.status(), 200);
    let rec = wait_for("dropped record", DEADLINE, || async {
        let v = m.control_get(&format!("/sandbox/v1/callbacks?out_trade_no={no2}")).await;
        v["data"].as_array().and_then(|a| a.first().cloned())
    })
    .await;
    assert_eq!(rec["error"], "dropped by fault");
    assert_eq!(rx.received().len(), 3);
    // …while the order is paid, as a polling merchant would find out.
    assert_eq!(m.query(&no2).await.json()["trade_state"], "SUCCESS");
}

#[tokio::test]
async fn retries_follow_wechats_whole_schedule_then_give_up() {
    // 24 h 4 min of schedule divided by 100,000: under a second.
    let env = common::spawn_with(sandbox::SandboxOptions { time_scale: 100_000.0, ..Default::default() }).await;
    let m = &env.merchant;
    let rx = Receiver::start(usize::MAX).await; // never acknowledges
    let no = order_no();
    assert_eq!(m.prepay(&no, 1, &rx.url()).await.status, 200);
    assert_eq!(m.pay(&no, "SUCCESS").await.status(), 200);

    wait_for("16 attempts", DEADLINE, || async { (rx.received().len() >= 16).then_some(()) }).await;
    // A later event, recorded after anything the retry task could still have sent.
    m.fault(json!({"kind":"duplicate_callback","out_trade_no": no})).await;
    let records = wait_for("the duplicate", DEADLINE, || async {
        let v = m.control_get(&format!("/sandbox/v1/callbacks?out_trade_no={no}")).await;
        let list = v["data"].as_array().cloned().unwrap_or_default();
        list.iter().any(|r| r["kind"] == "duplicate").then_some(list)
    })
    .await;
    let deliveries: Vec<u64> =
        records.iter().filter(|r| r["kind"] == "delivery").map(|r| r["attempt"].as_u64().unwrap()).collect();
    assert_eq!(deliveries, (1..=16).collect::<Vec<_>>(), "1 attempt + 15 retries, then no more");
    assert!(records.iter().all(|r| r["acknowledged"] == false));

    // Gaps follow the schedule: the last one (6 h / 100,000 = 216 ms) is far longer than the
    // first (15 s / 100,000 = 0.15 ms).
    let at: Vec<std::time::Instant> = rx.received().iter().take(16).map(|r| r.at).collect();
    assert!(at[15] - at[14] >= Duration::from_millis(216));
    assert!(at[10] - at[9] >= Duration::from_millis(36)); // 60 m
}

#[tokio::test]
async fn the_typed_control_client_drives_the_sandbox() {
    let env = spawn().await;
    let control = env.sandbox.control();
    let m = &env.merchant;
    let rx = Receiver::start(0).await;
    let no = order_no();
    assert!(control.order(&no).await.unwrap().is_none());
    assert_eq!(m.prepay(&no, 7, &rx.url()).await.status, 200);
    control
        .fault(&sandbox::Fault::Fail {
            api: sandbox::Api::QueryOrder,
            times: 1,
            status: Some(503),
            code: Some("SYSTEM_ERROR".into()),
            message: None,
            errcode: None,
        })
        .await
        .unwrap();
    assert_eq!(m.query(&no).await.status, 503);
    let paid = control.pay(&no, "SUCCESS").await.unwrap();
    assert_eq!(paid["trade_state"], "SUCCESS");
    assert!(matches!(control.pay(&no, "SUCCESS").await, Err(sandbox::ControlError::Status { status: 409, .. })));
    let attempts = wait_for("acknowledged callback", DEADLINE, || async {
        let list = control.callbacks(Some(&no)).await.unwrap();
        list.iter().any(|a| a.acknowledged).then_some(list)
    })
    .await;
    assert_eq!(attempts[0].event_type, "TRANSACTION.SUCCESS");
    assert!(control.sms().await.unwrap().is_empty());
    assert!(control.subscribe_messages().await.unwrap().is_empty());
    control.set_templates(&["TPL"]).await.unwrap();
}

#[tokio::test]
async fn remote_callbacks_over_http_only_when_allowed() {
    // A sandbox in a development cluster calls back the ingress's Service by name, over http.
    let env = common::spawn_with(sandbox::SandboxOptions { allow_remote_callbacks: true, ..Default::default() }).await;
    let m = &env.merchant;
    let no = order_no();
    let a = m.prepay(&no, 1, "http://paystream-ingress.invalid:8080/notify").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(m.pay(&no, "SUCCESS").await.status(), 200);
    // Delivery is attempted (and fails: the name does not resolve) instead of being refused unsent.
    let rec = wait_for("attempted delivery", DEADLINE, || async {
        let v = m.control_get(&format!("/sandbox/v1/callbacks?out_trade_no={no}")).await;
        v["data"].as_array().and_then(|a| a.first().cloned())
    })
    .await;
    let error = rec["error"].as_str().unwrap_or_default();
    assert!(!error.is_empty() && !error.starts_with("not sent"), "{rec}");
    // https is still required of everyone else, and the default sandbox refuses a remote http notify_url.
    let env = spawn().await;
    let a = env.merchant.prepay(&order_no(), 1, "http://paystream-ingress.invalid:8080/notify").await;
    assert_eq!((a.status, a.code().as_str()), (400, "PARAM_ERROR"));
}
