//! Calls to WeChat and Tencent Cloud, metered: `paystream_wechat_api_calls_total{api,outcome}`,
//! `paystream_wechat_api_duration_seconds{api}` and `paystream_wechat_access_token_refreshes_total{reason}`. Labels are
//! fixed names, never an order, user or URL.

use std::sync::OnceLock;
use std::time::Instant;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

/// Every `api` label value.
const APIS: [&str; 10] = [
    "jsapi_prepay",
    "query_transaction",
    "close",
    "create_refund",
    "query_refund",
    "certificates",
    "jscode2session",
    "stable_token",
    "subscribe_send",
    "sms_send",
];

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    /// WeChat answered with an error that retrying will not fix.
    Error,
    /// 5xx, 429, network, timeout, or an error WeChat says to retry.
    Retryable,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Retryable => "retryable",
        }
    }
}

struct Metrics {
    calls: IntCounterVec,
    seconds: HistogramVec,
    refreshes: IntCounterVec,
}

fn m() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let calls = IntCounterVec::new(
            Opts::new("wechat_api_calls_total", "Calls to WeChat Pay, the mini-program API and Tencent SMS, by API and outcome (ok, error, retryable)"),
            &["api", "outcome"],
        )
        .expect("valid metric");
        let seconds = HistogramVec::new(
            HistogramOpts::new("wechat_api_duration_seconds", "Time of one call to WeChat or Tencent SMS, by API")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["api"],
        )
        .expect("valid metric");
        let refreshes = IntCounterVec::new(
            Opts::new(
                "wechat_access_token_refreshes_total",
                "Mini-program access tokens fetched, by reason (expiry: first use or near expiry; forced: after 40001/42001)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let r = observability::registry();
        for c in [Box::new(calls.clone()) as Box<dyn prometheus::core::Collector>, Box::new(seconds.clone()), Box::new(refreshes.clone())] {
            r.register(c).expect("wechat metrics are registered once");
        }
        for api in APIS {
            seconds.with_label_values(&[api]);
            for o in [Outcome::Ok, Outcome::Error, Outcome::Retryable] {
                calls.with_label_values(&[api, o.as_str()]);
            }
        }
        for reason in ["expiry", "forced"] {
            refreshes.with_label_values(&[reason]);
        }
        Metrics { calls, seconds, refreshes }
    })
}

/// An error of a metered call: whether trying again may succeed (counted as `retryable`, else `error`).
pub(crate) trait Retryable {
    fn retryable(&self) -> bool;
}

/// Runs one call to `api`, counting its outcome and timing it.
pub(crate) async fn metered<T, E: Retryable>(
    api: &'static str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = Instant::now();
    let result = call.await;
    let outcome = match &result {
        Ok(_) => Outcome::Ok,
        Err(e) if e.retryable() => Outcome::Retryable,
        Err(_) => Outcome::Error,
    };
    let m = m();
    m.calls.with_label_values(&[api, outcome.as_str()]).inc();
    m.seconds.with_label_values(&[api]).observe(started.elapsed().as_secs_f64());
    result
}

pub(crate) fn token_refreshed(forced: bool) {
    m().refreshes.with_label_values(&[if forced { "forced" } else { "expiry" }]).inc();
}

/// Makes the families visible in `/metrics` from the start (every API and outcome at 0).
pub fn register() {
    let _ = m();
}
