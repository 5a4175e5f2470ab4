//! The HTTP edge of paystream (DESIGN.md §5): users, orders, WeChat Pay prepay, WeChat's payment callback and the
//! status endpoint the front end polls, with `/healthz`, `/readyz`, `/metrics` and `/openapi.json`.
//!
//! What it keeps (DESIGN.md §3): a callback is answered 204 only after JetStream acknowledged the event it became;
//! an unverified callback is refused (401, counted, nothing published); an order has at most one open payment and
//! a paid order is never prepaid again; users only ever see their own orders and payments.
//!
//! ```no_run
//! # async fn run(deps: ingress::Deps) -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind(deps.config.listen).await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! ingress::serve(deps, listener, shutdown).await
//! # }
//! ```

mod auth;
mod callback;
mod config;
mod error;
mod limits;
mod metrics;
mod openapi;
mod passwords;
mod routes;
mod seed;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderName, Method, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router, extract::State};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use auth::{Claims, TokenAnswer};
pub use config::IngressConfig;
pub use error::{ApiError, AuthProblem};
pub use limits::{Limit, RateLimits};
pub use seed::seed;

/// Where WeChat posts payment callbacks (the path part of `wechat.notify_url`).
pub const CALLBACK_PATH: &str = "/payment/v1/thirdPayment/thirdPaymentWxPayCallback";

/// Everything the ingress needs from the process that runs it.
#[derive(Clone)]
pub struct Deps {
    pub pool: storage::PgPool,
    /// Publishes to `wechat.transaction` (callbacks and status queries) and waits for the PubAck.
    pub publisher: bus::Publisher,
    pub pay: wechat::PayClient,
    pub mini: wechat::MiniProgramClient,
    /// For the app id and merchant id callbacks and queries must carry, and the certificate mode.
    pub wechat: wechat::WechatConfig,
    pub config: IngressConfig,
}

/// Shared by every handler.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Inner>);

pub(crate) struct Inner {
    pub deps: Deps,
    pub tokens: auth::Tokens,
    pub reader: wechat::NotificationReader,
    pub status_limiter: routes::payment::QueryLimiter,
    pub limits: limits::Limiter,
    pub passwords: passwords::PasswordPool,
    pub cert_refresh: callback::CertRefresh,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Inner {
    pub async fn conn(&self) -> Result<storage::db::PooledConn, ApiError> {
        Ok(self.deps.pool.get().await?)
    }
}

/// The client's address (see [`limits::client_ip`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientIp(pub std::net::IpAddr);

impl axum::extract::FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut http::request::Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
        let header = state.deps.config.client_ip_header.as_deref();
        Ok(ClientIp(limits::client_ip(&parts.headers, peer, header)))
    }
}

/// Builds a route's handler for the method its row gives.
type Endpoint = fn(axum::routing::MethodFilter) -> axum::routing::MethodRouter<AppState>;

/// The API's routes: method, path and handler, each once. The router is built from this table, and the HTTP
/// metrics of every route exist from the start (at 0), so a rate or an increase counts a route's first request
/// after a restart.
const ENDPOINTS: [(Method, &str, Endpoint); 13] = {
    use axum::routing::on;
    [
        (Method::POST, "/usercenter/v1/user/register", |m| on(m, routes::user::register)),
        (Method::POST, "/usercenter/v1/user/login", |m| on(m, routes::user::login)),
        (Method::POST, "/usercenter/v1/user/wxMiniAuth", |m| on(m, routes::user::wx_mini_auth)),
        (Method::POST, "/usercenter/v1/user/detail", |m| on(m, routes::user::detail)),
        (Method::POST, "/order/v1/homestayOrder/createHomestayOrder", |m| on(m, routes::order::create)),
        (Method::POST, "/order/v1/homestayOrder/userHomestayOrderList", |m| on(m, routes::order::list)),
        (Method::POST, "/order/v1/homestayOrder/userHomestayOrderDetail", |m| on(m, routes::order::detail)),
        (Method::POST, "/order/v1/homestayOrder/refundHomestayOrder", |m| on(m, routes::order::refund)),
        (Method::POST, "/payment/v1/thirdPayment/thirdPaymentWxPay", |m| on(m, routes::payment::prepay)),
        (Method::POST, "/payment/v1/thirdPayment/thirdPaymentWxPayStatus", |m| on(m, routes::payment::status)),
        (Method::POST, CALLBACK_PATH, |m| on(m, callback::handle)),
        (Method::GET, "/healthz", |m| on(m, || async { "ok" })),
        (Method::GET, "/openapi.json", |m| on(m, || async { Json(openapi::document()) })),
    ]
};

/// The API's routes and their methods, as the router serves them.
pub fn api_routes() -> impl Iterator<Item = (&'static Method, &'static str)> {
    ENDPOINTS.iter().map(|(method, path, _)| (method, *path))
}

/// The whole API with its middleware: request ids (`X-Request-Id`, generated when absent, echoed), tracing, HTTP
/// metrics per route template, JSON error bodies for every failure, the request timeout, the body limit and CORS.
pub fn router(deps: Deps) -> Router {
    let cfg = deps.config.clone();
    let state = AppState(Arc::new(Inner {
        tokens: auth::Tokens::new(&cfg.jwt_secret, &cfg.jwt_previous_secrets, cfg.jwt_ttl),
        reader: deps.pay.notification_reader(),
        status_limiter: routes::payment::QueryLimiter::new(cfg.status_query_interval),
        limits: limits::Limiter::new(&cfg.rate_limits),
        passwords: passwords::PasswordPool::new(cfg.password_hashers(), cfg.password_queue),
        cert_refresh: callback::CertRefresh::new(),
        deps,
    }));

    // Built from ENDPOINTS, whose every route and status class the metrics export at 0 from the start.
    metrics::preregister(api_routes());
    let api = ENDPOINTS.iter().fold(Router::new(), |api, (method, path, endpoint)| {
        let filter = axum::routing::MethodFilter::try_from(method.clone()).expect("ENDPOINTS holds standard methods");
        api.route(path, endpoint(filter))
    });
    let api = if cfg.public_ops_routes { api.route("/readyz", get(readyz)) } else { api };
    let api = api
        .fallback(|| async { error::error_body(StatusCode::NOT_FOUND, 40400, "no such endpoint") })
        .with_state(state);
    let api = if cfg.public_ops_routes { api.merge(observability::metrics_router()) } else { api };
    let trust_traceparent = cfg.trust_traceparent;

    let request_id = HeaderName::from_static("x-request-id");
    let layers = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
        .layer(TraceLayer::new_for_http().make_span_with(move |req: &axum::http::Request<_>| {
            let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default();
            // The path only: bodies and headers carry tokens, mobiles and openids, and are never logged. The span
            // is named by route template (as the metrics are), so a scanner's paths cannot grow the set of names.
            let span = tracing::info_span!(
                "http",
                otel.name = %format!("{} {}", req.method(), metrics::route_label(req)),
                otel.kind = "server",
                method = %req.method(),
                path = %req.uri().path(),
                request_id = %id,
                trace_id = tracing::field::Empty,
            );
            // A trusted gateway's `traceparent` is continued (`http.trust_traceparent`); a stranger's is ignored, so
            // that no caller chooses our trace ids or makes us sample (and export) every one of its requests.
            let parent = req.headers().get("traceparent").and_then(|v| v.to_str().ok()).filter(|_| trust_traceparent);
            observability::trace::continue_trace(&span, parent);
            span
        }))
        .layer(axum::middleware::from_fn(traceparent_header))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(axum::middleware::from_fn(metrics::track))
        .layer(axum::Extension(error::BodyLimit(cfg.body_limit_bytes)))
        .layer(axum::middleware::from_fn(error::json_errors))
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, cfg.request_timeout))
        .layer(RequestBodyLimitLayer::new(cfg.body_limit_bytes));
    let mut app = api.layer(layers);
    if !cfg.cors_allowed_origins.is_empty() {
        let origins = cfg.cors_allowed_origins.iter().filter_map(|o| o.parse().ok()).collect::<Vec<_>>();
        app = app.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, request_id.clone()])
                .expose_headers([request_id])
                .max_age(Duration::from_secs(600)),
        );
    }
    app
}

/// Answers carry the request span's `traceparent`, so a caller can find the trace of any request it made.
async fn traceparent_header(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let mut resp = next.run(req).await;
    if let Some(tp) = observability::trace::current_traceparent()
        && let Ok(v) = axum::http::HeaderValue::from_str(&tp)
    {
        resp.headers_mut().insert("traceparent", v);
    }
    resp
}

/// Serves [`router`] on `listener` until `shutdown` fires, then lets in-flight requests finish.
pub async fn serve(deps: Deps, listener: tokio::net::TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "ingress listening");
    }
    let app = router(deps).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

/// Ready when Postgres answers and the NATS connection is up with the `wechat.transaction` stream present:
/// without either, callbacks could not be acknowledged.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let db = async {
        let mut conn = state.deps.pool.get().await.map_err(|e| e.to_string())?;
        diesel_async::RunQueryDsl::execute(diesel::sql_query("SELECT 1"), &mut *conn)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    .await;
    let js = state.deps.publisher.jetstream();
    let nats = match js.client().connection_state() {
        async_nats::connection::State::Connected => {
            let stream = state.deps.publisher.topology().stream_of(bus::Subject::WechatTransaction);
            js.get_stream(&stream).await.map(|_| ()).map_err(|e| format!("stream {stream}: {e}"))
        }
        other => Err(format!("{other:?}")),
    };
    let ok = db.is_ok() && nats.is_ok();
    let show = |r: Result<(), String>| r.err().map_or(json!("ok"), serde_json::Value::String);
    let body = json!({ "postgres": show(db), "nats": show(nats) });
    (if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}
