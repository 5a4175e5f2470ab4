//! Every role's admin endpoints: `/healthz` (alive), `/readyz` (Postgres and NATS reachable, streams present, and
//! the durable consumers the role runs provisioned) and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use futures::StreamExt as _;
use serde_json::json;
use storage::{PgPool, RunQueryDsl};
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct Readiness {
    pub pool: PgPool,
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub topology: Arc<bus::Topology>,
    /// Durable consumers this role runs; ready once each exists (the role provisions them as it starts).
    pub consumers: Vec<String>,
}

impl Readiness {
    /// Each check by name: `true` when it passed.
    pub async fn check(&self) -> Vec<(&'static str, Result<(), String>)> {
        let db = async {
            let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
            diesel::sql_query("SELECT 1").execute(&mut conn).await.map(|_| ()).map_err(|e| e.to_string())
        }
        .await;
        let nats = match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            other => Err(format!("{other:?}")),
        };
        // One look at each stream: that it exists and, for a role with consumers, which consumers it holds.
        let mut streams = Ok(());
        let mut provisioned = std::collections::HashSet::new();
        let dlq = self.topology.dlq_stream();
        'streams: for name in self.topology.streams() {
            match self.js.get_stream(&name).await {
                // The dead-letter stream holds no durable consumer (only `dlq list`'s ordered ones): not listed.
                Ok(s) if name != dlq && self.consumers.iter().any(|c| !provisioned.contains(c)) => {
                    let mut names = s.consumer_names();
                    while let Some(c) = names.next().await {
                        match c {
                            Ok(c) => provisioned.insert(c),
                            Err(e) => {
                                streams = Err(format!("stream {name}: listing consumers: {e}"));
                                break 'streams;
                            }
                        };
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    streams = Err(format!("stream {name}: {e}"));
                    break;
                }
            }
        }
        let consumers = match self.consumers.iter().find(|c| !provisioned.contains(*c)) {
            Some(name) => Err(format!("consumer {name} not provisioned yet")),
            None => Ok(()),
        };
        vec![("postgres", db), ("nats", nats), ("streams", streams), ("consumers", consumers)]
    }
}

pub fn router(ready: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ready)
}

/// `GET /metrics`: reads the DLQ depth per consumer first (one JetStream call per dead-letter subject, bounded to a
/// second), so `paystream_dlq_depth` is as fresh as the scrape; a slow or absent NATS leaves the last value.
async fn metrics(State(ready): State<Readiness>) -> impl IntoResponse {
    let fresh = tokio::time::timeout(std::time::Duration::from_secs(1), bus::dlq::depth(&ready.js, &ready.topology));
    if let Ok(Err(e)) = fresh.await {
        tracing::debug!(error = %e, "DLQ depth not refreshed for this scrape");
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], observability::render_metrics())
}

async fn readyz(State(ready): State<Readiness>) -> impl IntoResponse {
    let checks = ready.check().await;
    let ok = checks.iter().all(|(_, r)| r.is_ok());
    let body: serde_json::Map<String, serde_json::Value> = checks
        .into_iter()
        .map(|(name, r)| (name.to_owned(), r.err().map_or(json!("ok"), serde_json::Value::String)))
        .collect();
    (if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}

/// Serves the admin router until `shutdown`. Returns the bound address (port 0 allowed).
pub async fn serve(
    addr: SocketAddr,
    ready: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on admin.listen {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router(ready)).with_graceful_shutdown(shutdown.cancelled_owned()).await;
    });
    Ok((bound, task))
}
