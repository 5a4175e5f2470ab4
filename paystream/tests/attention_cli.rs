//! `paystream attention` as an operator runs it against a running system: an order the timeout closer gave up on
//! is listed with its reason and, once resolved, is back in the automatic passes. Real NATS and Postgres.

mod common;

use std::process::{Output, Stdio};

use common::System;
use serde_json::Value;

fn attention(sys: &System, args: &[&str]) -> Output {
    sys.paystream().arg("attention").args(args).stderr(Stdio::piped()).output().unwrap()
}

fn ok(sys: &System, args: &[&str]) -> String {
    let out = attention(sys, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "attention {args:?}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_waiting_for_a_person_is_listed_with_its_reason_and_resolved() {
    let sys = System::start().await;
    assert_eq!(ok(&sys, &["list"]), "no orders wait for a person\n");
    let alice = sys.login("alice").await;
    let (order, _payment) = sys.book_and_prepay(&alice).await;
    // As the closer leaves it after its last attempt (processors/tests/lifecycle.rs drives the closer itself).
    sys.sql(format!(
        "INSERT INTO order_close_attempt (order_sn, attempts, retry_at, last_reason, attention_reason, attention_since) \
         VALUES ('{order}', 6, now(), 'paid_meanwhile', 'WeChat says this order''s payment was paid', now())"
    ))
    .await;

    let listed: Value = serde_json::from_str(&ok(&sys, &["list", "--json"])).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["order_sn"], order.as_str());
    assert_eq!(listed[0]["attempts"], 6);
    assert_eq!(listed[0]["trade_state"], 0);
    assert_eq!(listed[0]["reason"], "WeChat says this order's payment was paid");
    let table = ok(&sys, &["list"]);
    assert!(table.lines().any(|l| l.starts_with(&order) && l.contains("was paid")), "{table}");
    assert!(sys.metrics().await.contains("paystream_orders_needing_attention"), "the gauge is exported");

    let bad = attention(&sys, &["resolve", "HSO-not-a-serial"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not an order number"), "{bad:?}");
    assert_eq!(ok(&sys, &["resolve", &order]), format!("order {order} is back in the automatic passes\n"));
    let again = attention(&sys, &["resolve", &order]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not waiting for a person"), "{again:?}");
    assert_eq!(ok(&sys, &["list"]), "no orders wait for a person\n");
}
