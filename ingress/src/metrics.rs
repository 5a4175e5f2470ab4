//! The ingress's metrics, declared once with bounded labels: the route template (never a raw path), the method,
//! the status class, the callback outcome.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

struct Metrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    callbacks: IntCounterVec,
    status_queries: IntCounterVec,
}

fn m() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests answered, by route template, method and status class"),
            &["route", "method", "status_class"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "Time to answer an HTTP request, by route template")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["route", "method"],
        )
        .expect("valid metric");
        let callbacks = IntCounterVec::new(
            Opts::new(
                "callbacks_total",
                "WeChat Pay callbacks by outcome (published, bad_signature, stale, probe, undecryptable, malformed, \
                 publish_failed)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let status_queries = IntCounterVec::new(
            Opts::new(
                "status_queries_total",
                "WeChat order queries made by the status endpoint, by outcome (notpay, published, query_failed, \
                 publish_failed)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let r = observability::registry();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(callbacks.clone()),
            Box::new(status_queries.clone()),
        ] {
            r.register(c).expect("ingress metrics are registered once");
        }
        // Exported at 0 from the start, so alerts and dashboards read a series before the first event.
        for outcome in ["notpay", "published", "query_failed", "publish_failed"] {
            status_queries.with_label_values(&[outcome]);
        }
        for outcome in ["published", "bad_signature", "stale", "probe", "undecryptable", "malformed", "publish_failed"]
        {
            callbacks.with_label_values(&[outcome]);
        }
        Metrics { requests, duration, callbacks, status_queries }
    })
}

/// Callback outcomes (the only values the `outcome` label takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackOutcome {
    Published,
    BadSignature,
    Stale,
    Probe,
    Undecryptable,
    Malformed,
    PublishFailed,
}

impl CallbackOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CallbackOutcome::Published => "published",
            CallbackOutcome::BadSignature => "bad_signature",
            CallbackOutcome::Stale => "stale",
            CallbackOutcome::Probe => "probe",
            CallbackOutcome::Undecryptable => "undecryptable",
            CallbackOutcome::Malformed => "malformed",
            CallbackOutcome::PublishFailed => "publish_failed",
        }
    }
}

pub fn callback(outcome: CallbackOutcome) {
    m().callbacks.with_label_values(&[outcome.as_str()]).inc();
}

pub fn status_query(outcome: &'static str) {
    m().status_queries.with_label_values(&[outcome]).inc();
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Exports every route's request counter at 0 for each status class it can answer with (and the unmatched paths'
/// 4xx), so `rate()` and `increase()` count the first request of a process, and a ratio reads 0 rather than no
/// data while nothing failed.
pub fn preregister<'a>(routes: impl IntoIterator<Item = (&'a Method, &'a str)>) {
    let m = m();
    for (method, route) in routes {
        for class in ["2xx", "4xx", "5xx"] {
            m.requests.with_label_values(&[route, method_label(method), class]);
        }
    }
    for method in ["GET", "POST"] {
        m.requests.with_label_values(&["unmatched", method, "4xx"]);
    }
}

/// The route template a request matched; paths no route matched share `unmatched`, so a scanner cannot grow the set
/// of labels or span names.
pub fn route_label<B>(req: &axum::http::Request<B>) -> String {
    req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned())
}

/// Counts and times every request under its route template.
pub async fn track(req: Request, next: Next) -> Response {
    let route = route_label(&req);
    let method = method_label(req.method());
    let started = Instant::now();
    let resp = next.run(req).await;
    let class = match resp.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    let m = m();
    m.requests.with_label_values(&[route.as_str(), method, class]).inc();
    m.duration.with_label_values(&[route.as_str(), method]).observe(started.elapsed().as_secs_f64());
    resp
}
