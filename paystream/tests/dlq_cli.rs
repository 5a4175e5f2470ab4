//! `paystream dlq` as an operator runs it, against a running `paystream all` and the WeChat sandbox: a message
//! forced into the DLQ is listed and, after the cause is fixed and it is redriven, processed. Real NATS and Postgres.

mod common;

use std::process::{Output, Stdio};
use std::time::Duration;

use common::System;
use serde_json::{Value, json};

/// Runs `paystream dlq ARGS` and returns its output.
fn dlq(sys: &System, args: &[&str]) -> Output {
    sys.paystream().arg("dlq").args(args).stderr(Stdio::piped()).output().unwrap()
}

fn dlq_ok(sys: &System, args: &[&str]) -> String {
    let out = dlq(sys, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "dlq {args:?}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn dead_letters(sys: &System, consumer: &str) -> Vec<Value> {
    let out = dlq_ok(sys, &["list", "--consumer", consumer, "--json"]);
    serde_json::from_str::<Value>(&out).unwrap().as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_lettered_payment_report_is_listed_and_after_the_fix_and_a_redrive_pays_the_order() {
    let sys = System::start().await;
    assert_eq!(dlq_ok(&sys, &["list"]), "no dead letters\n");
    let alice = sys.login("alice").await;
    let (order, payment) = sys.book_and_prepay(&alice).await;
    // The payment row disagrees with what WeChat reports: the payment processor dead-letters the report.
    sys.sql(format!("UPDATE third_payment SET pay_total = pay_total + 1 WHERE sn = '{payment}'")).await;
    sys.pay_at_wechat(&payment).await;
    let letters = testkit::eventually(Duration::from_secs(20), "the report in the payment DLQ", || async {
        let l = dead_letters(&sys, "payment");
        (l.len() == 1).then_some(l)
    })
    .await;
    let letter = &letters[0];
    assert!(letter["reason"].as_str().unwrap().contains("amount mismatch"), "{letter}");
    assert_eq!(letter["consumer"], "payment");
    assert_eq!(letter["deliveries"], 1);
    assert_eq!(letter["subject"], format!("{}.wechat.transaction", sys.prefix));
    assert!(letter["age_seconds"].as_u64().unwrap() < 60);
    assert_eq!(letter["payload"]["payload"]["out_trade_no"], payment.as_str());
    let id = letter["id"].as_u64().unwrap().to_string();

    // The table an operator reads.
    let table = dlq_ok(&sys, &["list"]);
    let mut lines = table.lines();
    let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(head, ["ID", "CONSUMER", "AGE", "DELIVERIES", "REASON", "SUBJECT"], "{table}");
    let row = lines.next().unwrap();
    assert!(
        row.starts_with(&format!("{id} ")) && row.contains(" payment ") && row.contains("amount mismatch"),
        "{row}"
    );
    assert!(row.ends_with(&format!("{}.wechat.transaction", sys.prefix)), "{row}");
    assert_eq!(sys.order_status(&alice, &order).await, (json!(0), json!(0)), "unpaid while dead-lettered");

    // Unknown IDs are refused with a message; nothing changes.
    let out = dlq(&sys, &["redrive", "999999"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no dead letter 999999"));

    // The row is fixed; the operator redrives the letter and the order gets paid.
    sys.sql(format!("UPDATE third_payment SET pay_total = pay_total - 1 WHERE sn = '{payment}'")).await;
    let out = dlq_ok(&sys, &["redrive", &id]);
    assert!(out.contains(&format!("redriven {id} (payment) → {}.wechat.transaction", sys.prefix)), "{out}");
    testkit::eventually(Duration::from_secs(20), "the order paid after the redrive", || async {
        (sys.order_status(&alice, &order).await == (json!(1), json!(1))).then_some(())
    })
    .await;
    assert_eq!(dlq_ok(&sys, &["list"]), "no dead letters\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_notifications_are_reopened_and_sent_when_their_letters_are_redriven() {
    let sys = System::start().await;
    // WeChat's quota is exhausted for longer than the notifier retries: both messages end `failed` in the DLQ.
    sys.sandbox(
        "/sandbox/v1/faults",
        json!({ "kind": "fail", "api": "subscribe_send", "times": 1000, "errcode": 45009,
                "message": "reach max api daily quota limit" }),
    )
    .await;
    let alice = sys.login("alice").await;
    let (order, payment) = sys.book_and_prepay(&alice).await;
    sys.pay_at_wechat(&payment).await;
    let letters = testkit::eventually(Duration::from_secs(30), "both notifications dead-lettered", || async {
        let l = dead_letters(&sys, "notifier-miniprogram");
        (l.len() == 2).then_some(l)
    })
    .await;
    assert!(letters.iter().all(|l| l["deliveries"] == 3), "{letters:?}");
    assert!(sys.subscribe_messages_for(&order).await.is_empty());

    // The quota is back; redriving every notifier-miniprogram letter reopens the failed rows and sends once each.
    sys.sandbox("/sandbox/v1/faults", json!({ "kind": "clear" })).await;
    let out = dlq_ok(&sys, &["redrive", "--all", "--consumer", "notifier-miniprogram"]);
    assert_eq!(out.matches("failed → retrying").count(), 2, "{out}");
    assert!(out.contains("2 redriven, 0 left in the DLQ"), "{out}");
    let sent = testkit::eventually(Duration::from_secs(20), "two messages at WeChat", || async {
        let m = sys.subscribe_messages_for(&order).await;
        (m.len() >= 2).then_some(m)
    })
    .await;
    let mut templates: Vec<&str> = sent.iter().map(|m| m["template_id"].as_str().unwrap()).collect();
    templates.sort();
    assert_eq!(templates, ["TPL_CHECKIN", "TPL_PAY_SUCCESS"]);
    assert!(dead_letters(&sys, "notifier-miniprogram").is_empty());
}
