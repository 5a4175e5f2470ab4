//! The whole system through its real binaries, as an operator runs it: the WeChat sandbox, `paystream all`, and a
//! mini-program's calls over HTTP. Real NATS and Postgres (a fresh database and subject prefix per test).

mod common;

use std::time::Duration;

use common::System;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_walk_passes_against_the_running_binaries() {
    let sys = System::start().await;
    let out = sys.paystream().args(["demo", "--api", &sys.api, "--sandbox", &sys.sandbox]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}");
    assert!(stdout.contains("order paid") && stdout.ends_with("demo OK\n"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_callbacks_change_the_order_once_and_other_users_see_nothing() {
    let sys = System::start().await;
    let alice = sys.login("alice").await;
    let (order, payment) = sys.book_and_prepay(&alice).await;
    sys.sandbox(&format!("/sandbox/v1/transactions/{payment}/pay"), json!({ "result": "SUCCESS" })).await;
    for _ in 0..5 {
        sys.sandbox("/sandbox/v1/faults", json!({ "kind": "duplicate_callback", "out_trade_no": payment })).await;
    }
    sys.until_paid(&alice, &order).await;
    testkit::eventually(Duration::from_secs(20), "pay-success and check-in requested", || async {
        (sys.count("NOTIFY", "notify.miniprogram").await == 2).then_some(())
    })
    .await;
    assert_eq!(sys.count("PAYMENT", "payment.status").await, 1, "one state change for six deliveries");
    let delivered = testkit::eventually(Duration::from_secs(20), "two messages at WeChat", || async {
        let all: Value = sys
            .http
            .get(format!("{}/sandbox/v1/subscribe-messages", sys.sandbox))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let mine: Vec<Value> =
            all["data"].as_array()?.iter().filter(|m| m.to_string().contains(&order)).cloned().collect();
        (mine.len() >= 2).then_some(mine)
    })
    .await;
    let mut templates: Vec<&str> = delivered.iter().map(|m| m["template_id"].as_str().unwrap()).collect();
    templates.sort();
    assert_eq!(templates, ["TPL_CHECKIN", "TPL_PAY_SUCCESS"], "one of each, not one per callback");
    assert!(delivered.iter().all(|m| m["miniprogram_state"] == "formal"), "state from config: {delivered:?}");
    assert_eq!(sys.count("ORDER", "order.status").await, 1);

    // paying a paid order again is refused; another user cannot see, pay or poll it
    let (status, _) = sys
        .call(
            "/payment/v1/thirdPayment/thirdPaymentWxPay",
            Some(&alice),
            json!({ "orderSn": order, "serviceType": "homestayOrder" }),
        )
        .await;
    assert_eq!(status, 409);
    let bob = sys.login("bob").await;
    for (path, body) in [
        ("/order/v1/homestayOrder/userHomestayOrderDetail", json!({ "sn": order })),
        ("/payment/v1/thirdPayment/thirdPaymentWxPayStatus", json!({ "orderSn": order })),
    ] {
        let (status, answer) = sys.call(path, Some(&bob), body).await;
        assert_eq!(status, 404, "{path}: {answer}");
    }
    let (status, _) = sys
        .call(
            "/payment/v1/thirdPayment/thirdPaymentWxPay",
            Some(&bob),
            json!({ "orderSn": order, "serviceType": "homestayOrder" }),
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_callback_whose_amount_does_not_match_is_dead_lettered_and_the_order_stays_unpaid() {
    let sys = System::start().await;
    let alice = sys.login("alice").await;
    let (order, payment) = sys.book_and_prepay(&alice).await;
    // The payment row disagrees with what WeChat will report (as after a bug or tampering).
    let mut conn = storage::connect(&sys.db.url).await.unwrap();
    storage::RunQueryDsl::execute(
        diesel::sql_query(format!("UPDATE third_payment SET pay_total = pay_total + 1 WHERE sn = '{payment}'")),
        &mut conn,
    )
    .await
    .unwrap();
    sys.sandbox(&format!("/sandbox/v1/transactions/{payment}/pay"), json!({ "result": "SUCCESS" })).await;
    testkit::eventually(Duration::from_secs(20), "the report in the payment DLQ", || async {
        (sys.count("DLQ", "dlq.payment").await == 1).then_some(())
    })
    .await;
    let s = sys.ok("/payment/v1/thirdPayment/thirdPaymentWxPayStatus", Some(&alice), json!({ "orderSn": order })).await;
    assert_eq!((s["payStatus"].clone(), s["tradeState"].clone()), (json!(0), json!(0)), "{s}");
    assert_eq!(sys.count("PAYMENT", "payment.status").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_nobody_pays_is_closed_at_wechat_and_here_after_its_deadline() {
    let sys = System::start().await;
    let alice = sys.login("alice").await;
    let (order, payment) = sys.book_and_prepay(&alice).await;
    // The deadline passes (30 minutes in production; moved here rather than waited for).
    sys.sql(format!("UPDATE homestay_order SET pay_deadline = now() - interval '1 second' WHERE sn = '{order}'")).await;
    testkit::eventually(Duration::from_secs(20), "order closed", || async {
        (sys.order_status(&alice, &order).await == (json!(-1), json!(-1))).then_some(())
    })
    .await;
    let at_wechat: Value = sys
        .http
        .get(format!("{}/sandbox/v1/transactions/{payment}", sys.sandbox))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(at_wechat.to_string().contains("CLOSED"), "WeChat's transaction is closed too: {at_wechat}");
    // the user can no longer pay it
    let r = sys
        .http
        .post(format!("{}/sandbox/v1/transactions/{payment}/pay", sys.sandbox))
        .json(&json!({ "result": "SUCCESS" }))
        .send()
        .await
        .unwrap();
    assert!(!r.status().is_success(), "a closed transaction cannot be paid");
    assert_eq!(sys.order_status(&alice, &order).await, (json!(-1), json!(-1)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_refund_goes_through_wechat_and_its_callback_and_the_user_is_told_once() {
    let sys = System::start().await;
    let alice = sys.login("alice").await;
    let (order, payment) = sys.book_and_prepay(&alice).await;
    sys.sandbox(&format!("/sandbox/v1/transactions/{payment}/pay"), json!({ "result": "SUCCESS" })).await;
    sys.until_paid(&alice, &order).await;
    let asked = sys.ok("/order/v1/homestayOrder/refundHomestayOrder", Some(&alice), json!({ "sn": order })).await;
    assert_eq!(asked["refundState"], "requested", "{asked}");
    // Refunded at WeChat, told by WeChat's REFUND.SUCCESS callback through the ingress.
    testkit::eventually(Duration::from_secs(30), "payment and order refunded", || async {
        (sys.order_status(&alice, &order).await == (json!(2), json!(3))).then_some(())
    })
    .await;
    let callbacks: Value = sys
        .http
        .get(format!("{}/sandbox/v1/callbacks?out_trade_no={payment}", sys.sandbox))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(callbacks.to_string().contains("REFUND.SUCCESS"), "{callbacks}");
    let refunds: Value = sys
        .http
        .get(format!("{}/sandbox/v1/refunds?out_trade_no={payment}", sys.sandbox))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(refunds["data"].as_array().map(Vec::len), Some(1), "{refunds}");
    let told = testkit::eventually(Duration::from_secs(20), "refund message at WeChat", || async {
        let m: Vec<Value> =
            sys.subscribe_messages_for(&order).await.into_iter().filter(|m| m["template_id"] == "TPL_REFUND").collect();
        (!m.is_empty()).then_some(m)
    })
    .await;
    assert_eq!(told.len(), 1, "{told:?}");
    // Asking again shows the refund, and refunds nothing more.
    let again = sys.ok("/order/v1/homestayOrder/refundHomestayOrder", Some(&alice), json!({ "sn": order })).await;
    assert_eq!(again["refundState"], "succeeded", "{again}");
    assert_eq!(sys.count("REFUND", "refund.requested").await, 1);
}
