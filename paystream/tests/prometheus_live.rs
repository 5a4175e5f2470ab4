//! Observability checked live: a real Prometheus server (Debian's `prometheus` package, which `make test`'s rules
//! step installs) scrapes a running `paystream all` once a second through a payment, a refund, a restart of the
//! process and another payment. Every query of the
//! Grafana dashboard must be accepted by that Prometheus (`$namespace`, `$__range` and `$__rate_interval` filled in
//! as Grafana would); the funnel's four steps and the refund's arrows count what happened (their series exist from
//! the start, so `increase()` sees the first one, also after the restart).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::System;
use serde_json::Value;

struct Prometheus {
    child: Child,
    url: String,
    dir: PathBuf,
    http: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = std::env::temp_dir().join(testkit::unique("paystream-prometheus-"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: paystream\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let bin = std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into());
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{bin}: {e} (Debian's prometheus package; make test's rules step installs it)"));
        Prometheus { child, url: format!("http://127.0.0.1:{port}"), dir, http: reqwest::Client::new() }
    }

    /// Evaluates `expr` now: `Err` with Prometheus's message when it refuses the query, else the result vector.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let url = reqwest::Url::parse_with_params(&format!("{}/api/v1/query", self.url), &[("query", expr)])
            .map_err(|e| e.to_string())?;
        let resp = self.http.get(url).send().await.map_err(|e| e.to_string())?;
        let v: Value = resp.json().await.map_err(|e| e.to_string())?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The single value of `expr`, if it has one.
    async fn value(&self, expr: &str) -> Option<f64> {
        let r = self.query(expr).await.ok()?;
        r.first()?["value"][1].as_str()?.parse().ok()
    }
}

/// Every `expr` of the dashboard, as Grafana would send it.
fn dashboard_queries() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../k8s/observability/dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                if let Some(Value::String(e)) = o.get("expr") {
                    out.push(e.clone());
                }
                o.values().for_each(|v| walk(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(&dashboard, &mut exprs);
    exprs
        .into_iter()
        .map(|e| e.replace("$namespace", ".*").replace("$__rate_interval", "1m").replace("$__range", "10m"))
        .collect()
}

/// Every alert's `expr` (all written as `expr: |` blocks in alerts.yml).
fn alert_expressions() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../k8s/observability/alerts.yml");
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.trim_start() == "expr: |" {
            let indent = line.len() - line.trim_start().len();
            let mut body = Vec::new();
            i += 1;
            while i < lines.len()
                && (lines[i].trim().is_empty() || lines[i].len() - lines[i].trim_start().len() > indent)
            {
                body.push(lines[i].trim());
                i += 1;
            }
            exprs.push(body.join(" ").trim().to_owned());
            continue;
        }
        i += 1;
    }
    exprs
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_accepts_every_panel_and_the_funnel_counts_a_payment() {
    let sys = System::start().await;
    let prom = Prometheus::start(sys.admin.trim_start_matches("http://"));
    testkit::eventually(Duration::from_secs(30), "Prometheus scraping paystream all", || async {
        (prom.value(r#"up{job="paystream"}"#).await == Some(1.0)).then_some(())
    })
    .await;
    // The funnel's series exist before the first payment (at 0), so increase() will count it.
    let funnel = [
        r#"sum(increase(paystream_http_requests_total{route="/payment/v1/thirdPayment/thirdPaymentWxPay",status_class="2xx"}[10m]))"#,
        r#"sum(increase(paystream_callbacks_total{outcome="published"}[10m]))"#,
        r#"sum(increase(paystream_payment_transitions_total{from="Waiting",to="Paid"}[10m]))"#,
        r#"sum(increase(paystream_order_transitions_total{from="WaitPay",to="WaitUse"}[10m]))"#,
    ];
    testkit::eventually(Duration::from_secs(30), "every funnel series scraped at 0", || async {
        for step in funnel {
            prom.value(step).await?;
        }
        Some(())
    })
    .await;

    let alice = sys.login("alice").await;
    let (order, payment) = sys.book_and_prepay(&alice).await;
    sys.pay_at_wechat(&payment).await;
    sys.until_paid(&alice, &order).await;
    for step in funnel {
        let counted = testkit::eventually(Duration::from_secs(30), "the payment counted by the funnel", || async {
            prom.value(step).await.filter(|v| *v >= 0.5)
        })
        .await;
        assert!(counted < 3.0, "{step} = {counted}: one payment");
    }

    // A refund: both refund arrows and the refund outcome show (their series exist from the start too).
    let asked =
        sys.ok("/order/v1/homestayOrder/refundHomestayOrder", Some(&alice), serde_json::json!({ "sn": order })).await;
    assert_eq!(asked["refundState"], "requested", "{asked}");
    for panel in [
        r#"sum(increase(paystream_payment_transitions_total{from="Paid",to="Refunded"}[10m]))"#,
        r#"sum(increase(paystream_order_transitions_total{from="WaitUse",to="Refunded"}[10m]))"#,
        r#"sum(increase(paystream_refunds_total{outcome="succeeded"}[10m]))"#,
    ] {
        let counted = testkit::eventually(Duration::from_secs(30), "the refund counted", || async {
            prom.value(panel).await.filter(|v| *v >= 0.5)
        })
        .await;
        assert!(counted < 3.0, "{panel} = {counted}: one refund");
    }

    // A restart (a deployment): the counters start again at 0, and the next payment is still counted, so the
    // funnel over the range holds both.
    let mut sys = sys;
    sys.restart_all().await;
    // Prometheus tells a restart from a counter going down: it must scrape the new process's zeros before the next
    // payment moves them (a counter that goes 1 → restart → 1 between two scrapes looks unchanged to any Prometheus).
    testkit::eventually(Duration::from_secs(30), "the restarted process scraped at 0", || async {
        let prepays = r#"sum(paystream_http_requests_total{route="/payment/v1/thirdPayment/thirdPaymentWxPay",status_class="2xx"})"#;
        (prom.value(prepays).await == Some(0.0)).then_some(())
    })
    .await;
    let bob = sys.login("bob").await;
    let (order, payment) = sys.book_and_prepay(&bob).await;
    sys.pay_at_wechat(&payment).await;
    sys.until_paid(&bob, &order).await;
    for step in funnel {
        testkit::eventually(Duration::from_secs(30), "both payments in the funnel after the restart", || async {
            prom.value(step).await.filter(|v| *v >= 1.5)
        })
        .await;
    }

    let queries = dashboard_queries();
    assert!(queries.len() > 40, "{} queries: the dashboard was read", queries.len());
    let mut refused = Vec::new();
    for q in &queries {
        if let Err(e) = prom.query(q).await {
            refused.push(format!("{q}\n  -> {e}"));
        }
    }
    assert!(refused.is_empty(), "Prometheus refused {} panel queries:\n{}", refused.len(), refused.join("\n"));

    // Every alert expression evaluates, and none fires on this healthy run (a `for:` aside, the condition is false).
    let alerts = alert_expressions();
    assert!(alerts.len() >= 15, "{} alert expressions read", alerts.len());
    for expr in &alerts {
        let firing = prom.query(expr).await.unwrap_or_else(|e| panic!("Prometheus refused {expr}: {e}"));
        assert!(firing.is_empty(), "{expr} holds on a healthy system: {firing:?}");
    }
}
