use std::sync::OnceLock;

use axum::{Router, http::header, response::IntoResponse, routing::get};
use prometheus::{Encoder, Registry, TextEncoder};

/// The process-wide registry. Every crate registers its metrics here exactly once (in a `OnceLock`), with bounded
/// labels only: never an order, user or openid.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let registry = Registry::new_custom(Some("paystream".into()), None).expect("static prefix is valid");
        // `paystream_build_info{version="…"} 1`: lets dashboards show which version each pod runs.
        let info = prometheus::IntGaugeVec::new(
            prometheus::Opts::new("build_info", "Always 1; the labels say which build is running"),
            &["version"],
        )
        .expect("valid metric");
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(info)).expect("registered once");
        registry
    })
}

/// The registry in Prometheus' text exposition format.
pub fn render_metrics() -> String {
    let mut buf = Vec::new();
    // Encoding into a Vec cannot fail for a well-formed registry.
    let _ = TextEncoder::new().encode(&registry().gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// `GET /metrics`.
pub fn metrics_router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route(
        "/metrics",
        get(|| async { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], render_metrics()).into_response() }),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn build_info_is_always_exported() {
        let text = super::render_metrics();
        assert!(
            text.contains(&format!("paystream_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))),
            "{text}"
        );
    }
}
