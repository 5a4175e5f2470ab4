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
    sys.pay_at_wechat(&payment).await;
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
        let mine = sys.subscribe_messages_for(&order).await;
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
    let mut conn = storage::connect(&storage::DbConfig::new(&sys.db.url)).await.unwrap();
    storage::RunQueryDsl::execute(
        diesel::sql_query(format!("UPDATE third_payment SET pay_total = pay_total + 1 WHERE sn = '{payment}'")),
        &mut conn,
    )
    .await
    .unwrap();
    sys.pay_at_wechat(&payment).await;
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
    sys.pay_at_wechat(&payment).await;
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

/// An OTLP/HTTP trace receiver: what a collector would get from `paystream all`.
struct Collector {
    url: String,
    spans: std::sync::Arc<std::sync::Mutex<Vec<SpanRec>>>,
}

#[derive(Debug, Clone)]
struct SpanRec {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    attributes: Vec<(String, String)>,
}

impl Collector {
    async fn start() -> Collector {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message as _;
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let store = store.clone();
                async move {
                    let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    let mut out = store.lock().unwrap();
                    for rs in req.resource_spans {
                        for ss in rs.scope_spans {
                            for s in ss.spans {
                                let attributes = s
                                    .attributes
                                    .iter()
                                    .map(|kv| {
                                        let v = kv.value.as_ref().and_then(|v| v.value.as_ref());
                                        (kv.key.clone(), format!("{v:?}"))
                                    })
                                    .collect();
                                out.push(SpanRec {
                                    trace_id: hex::encode(&s.trace_id),
                                    span_id: hex::encode(&s.span_id),
                                    parent: hex::encode(&s.parent_span_id),
                                    name: s.name,
                                    attributes,
                                });
                            }
                        }
                    }
                    ([(axum::http::header::CONTENT_TYPE, "application/x-protobuf")], Vec::<u8>::new())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Collector { url, spans }
    }

    fn spans(&self) -> Vec<SpanRec> {
        self.spans.lock().unwrap().clone()
    }
}

/// The trace of one payment: the callback span that names it, and every span of its trace.
fn trace_of(spans: &[SpanRec], payment: &str) -> Option<Vec<SpanRec>> {
    let callback = spans
        .iter()
        .find(|s| s.name == "callback" && s.attributes.iter().any(|(k, v)| k == "payment_sn" && v.contains(payment)))?;
    Some(spans.iter().filter(|s| s.trace_id == callback.trace_id).cloned().collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn each_payment_is_one_trace_from_callback_to_notification_and_logs_carry_no_secret() {
    let collector = Collector::start().await;
    let sys = System::start_with(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ("PAYSTREAM__TELEMETRY__LOG_FILTER", "debug".into()),
    ])
    .await;
    let alice = sys.login("alice").await;
    let mobile = "13812345678";
    sys.ok("/usercenter/v1/user/register", None, json!({ "mobile": mobile, "password": "correct horse battery" }))
        .await;
    let mut payments = Vec::new();
    for _ in 0..2 {
        let (order, payment) = sys.book_and_prepay(&alice).await;
        sys.pay_at_wechat(&payment).await;
        payments.push((order, payment));
    }
    for (order, _) in &payments {
        sys.until_paid(&alice, order).await;
    }
    let expected = ["callback", "consume payment", "consume order", "consume notifier-miniprogram"];
    let traces = testkit::eventually(Duration::from_secs(30), "both payments traced to the notifier", || async {
        let spans = collector.spans();
        payments
            .iter()
            .map(|(_, p)| {
                let t = trace_of(&spans, p)?;
                // Two notifier spans per payment (pay-success and check-in).
                let complete = expected.iter().all(|n| t.iter().any(|s| &s.name == n))
                    && t.iter().filter(|s| s.name == "consume notifier-miniprogram").count() >= 2;
                complete.then_some(t)
            })
            .collect::<Option<Vec<_>>>()
    })
    .await;
    assert_ne!(traces[0][0].trace_id, traces[1][0].trace_id, "two payments, two traces");
    for trace in &traces {
        // Parented across NATS: every consumer span's parent is a span of the same trace.
        for s in trace.iter().filter(|s| s.name.starts_with("consume ")) {
            assert!(trace.iter().any(|p| p.span_id == s.parent), "{} has its parent in the trace: {trace:#?}", s.name);
        }
        let order = trace.iter().find(|s| s.name == "consume order").unwrap();
        let payment = trace.iter().find(|s| s.name == "consume payment").unwrap();
        assert_eq!(order.parent, payment.span_id, "the order processor continues the payment processor's span");
    }

    // Log lines of handled events carry the trace id; nothing secret or personal is in any line.
    let log = sys.log();
    let trace_id = &traces[0][0].trace_id;
    assert!(log.lines().any(|l| l.contains(trace_id.as_str()) && l.contains("consume")), "trace id in the log");
    let mut conn = storage::connect(&storage::DbConfig::new(&sys.db.url)).await.unwrap();
    #[derive(diesel::QueryableByName)]
    struct Key {
        #[diesel(sql_type = diesel::sql_types::Text)]
        auth_key: String,
    }
    let openids: Vec<Key> = storage::RunQueryDsl::load(
        diesel::sql_query("SELECT auth_key FROM user_auth WHERE auth_type = 'wxMini'"),
        &mut conn,
    )
    .await
    .unwrap();
    assert!(!openids.is_empty());
    let toml = std::fs::read_to_string(sys.dir.join("all.toml")).unwrap();
    let secret = |key: &str| {
        toml.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split('"').nth(1))
            .unwrap_or_else(|| panic!("{key} in the sandbox's config"))
            .to_owned()
    };
    let mut forbidden = vec![
        ("mobile", mobile.to_owned()),
        ("access token", alice.clone()),
        ("apiv3 key", secret("apiv3_key")),
        ("mini-program secret", secret("miniprogram_secret")),
    ];
    forbidden.extend(openids.into_iter().map(|k| ("openid", k.auth_key)));
    for (what, value) in &forbidden {
        assert!(!log.contains(value.as_str()), "the log contains a {what}");
    }
    assert!(log.lines().count() > 20, "the run was logged at debug: {} lines", log.lines().count());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_metric_is_exported_and_one_payment_moves_the_counters_by_one() {
    let sys = System::start().await;
    let alice = sys.login("alice").await;
    let (order, payment) = sys.book_and_prepay(&alice).await;
    sys.pay_at_wechat(&payment).await;
    sys.until_paid(&alice, &order).await;
    testkit::eventually(Duration::from_secs(20), "two messages sent", || async {
        (sys.metrics().await.contains("paystream_notifications_total{channel=\"miniprogram\",outcome=\"sent\"} 2"))
            .then_some(())
    })
    .await;
    let text = sys.metrics().await;
    let families =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../k8s/observability/metrics.txt")).unwrap();
    let missing: Vec<&str> = families
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|name| !text.contains(&format!("# TYPE {name} ")))
        .collect();
    assert!(missing.is_empty(), "families the dashboards and alerts use but paystream does not export: {missing:?}");
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{series} not exported:\n{text}"))
    };
    assert_eq!(value("paystream_payment_transitions_total{from=\"Waiting\",to=\"Paid\"}"), 1.0);
    assert_eq!(value("paystream_order_transitions_total{from=\"WaitPay\",to=\"WaitUse\"}"), 1.0);
    assert_eq!(value("paystream_callbacks_total{outcome=\"published\"}"), 1.0);
    assert_eq!(value("paystream_events_consumed_total{consumer=\"payment\",outcome=\"ack\"}"), 1.0);
    assert_eq!(value("paystream_events_consumed_total{consumer=\"order\",outcome=\"ack\"}"), 1.0);
    assert_eq!(value("paystream_wechat_api_calls_total{api=\"jsapi_prepay\",outcome=\"ok\"}"), 1.0);
    assert_eq!(value("paystream_wechat_api_calls_total{api=\"subscribe_send\",outcome=\"ok\"}"), 2.0);
    assert_eq!(value("paystream_wechat_access_token_refreshes_total{reason=\"expiry\"}"), 1.0);
    assert_eq!(value("paystream_dlq_depth{consumer=\"payment\"}"), 0.0);
    assert!(value("paystream_build_info{version=\"0.1.0\"}") == 1.0);
}
