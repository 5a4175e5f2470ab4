//! The transactional outbox: [`enqueue`] writes an event in the caller's transaction; [`Relay`] publishes committed
//! rows to JetStream and deletes them after the PubAck.
//!
//! Delivery guarantee: a row is deleted only in the transaction that published it, after every PubAck of its batch.
//! If the relay dies between PubAck and commit, the rows stay and are published again by the next relay with the
//! same `Nats-Msg-Id` (the event id), which JetStream drops as a duplicate within its window. Downstream consumers
//! also claim the event id in `processed_event`, which covers a relay that stays down longer than the window.

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use diesel_async::AsyncConnection;
use futures::StreamExt;
use storage::{Conn, PgPool, StorageError, outbox as table};
use tokio_util::sync::CancellationToken;

use crate::{
    BusError, OutboxConfig, Publisher,
    envelope::{Envelope, Event},
    metrics,
};

/// Writes `env` to the outbox in the caller's transaction. It is published after the transaction commits.
pub async fn enqueue<E: Event>(conn: &mut Conn, env: &Envelope<E>) -> Result<(), StorageError> {
    let mut headers = serde_json::Map::new();
    for (name, values) in env.headers().iter() {
        if let Some(v) = values.first() {
            headers.insert(name.to_string(), v.as_str().into());
        }
    }
    table::insert(
        conn,
        &table::NewOutboxRow {
            event_id: env.id,
            aggregate: env.payload.aggregate(),
            subject: E::SUBJECT.name().to_owned(),
            headers: serde_json::Value::Object(headers),
            payload: env.to_bytes(),
        },
    )
    .await
}

/// Publishes outbox rows. Run one or several per deployment; they share the work without breaking per-aggregate
/// order (see [`storage::outbox::claim_batch`]).
pub struct Relay {
    pool: PgPool,
    publisher: Publisher,
    cfg: OutboxConfig,
}

impl Relay {
    pub fn new(pool: PgPool, publisher: Publisher, cfg: OutboxConfig) -> Self {
        Relay { pool, publisher, cfg }
    }

    /// Publishes one batch: claim, publish with pipelined PubAcks, delete, commit. Returns the rows published.
    pub async fn drain_once(&self) -> Result<usize, BusError> {
        let started = std::time::Instant::now();
        let mut conn = self.pool.get().await.map_err(StorageError::from)?;
        let (aggs, rows) = (self.cfg.batch_aggregates, self.cfg.batch_rows);
        let publisher = &self.publisher;
        let published = conn
            .transaction::<_, BusError, _>(async move |c| {
                let batch = table::claim_batch(c, aggs, rows).await?;
                if batch.is_empty() {
                    return Ok(Vec::new());
                }
                // Send everything first, then collect the acks: one round trip per batch instead of per row.
                // Rows go out in id order on one connection, so JetStream stores each aggregate's events in order.
                let mut pending = Vec::with_capacity(batch.len());
                for row in &batch {
                    let subject = publisher.topology().qualify(&row.subject);
                    let ack =
                        publisher.send(&subject, json_headers(&row.headers), Bytes::from(row.payload.clone())).await?;
                    pending.push((row.subject.as_str(), ack));
                }
                for (subject, ack) in pending {
                    let ack = ack.await.map_err(crate::publisher::publish_error)?;
                    metrics::published(subject, ack.duplicate);
                }
                let ids: Vec<i64> = batch.iter().map(|r| r.id).collect();
                table::delete(c, &ids).await?;
                Ok(batch.into_iter().map(|r| r.subject).collect())
            })
            .await?;
        if !published.is_empty() {
            tracing::debug!(
                rows = published.len(),
                elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
                "outbox batch relayed"
            );
        }
        let mut by_subject: std::collections::BTreeMap<&str, u64> = Default::default();
        for s in &published {
            *by_subject.entry(s.as_str()).or_default() += 1;
        }
        for (s, n) in by_subject {
            metrics::relayed(s, n);
        }
        Ok(published.len())
    }

    /// Publishes until the outbox is empty.
    pub async fn drain(&self) -> Result<usize, BusError> {
        let mut total = 0;
        loop {
            let n = self.drain_once().await?;
            total += n;
            if n == 0 {
                return Ok(total);
            }
        }
    }

    /// Runs until `shutdown`: drains, then sleeps until a NOTIFY from a committing writer or the poll interval.
    /// Failures (database or NATS down) are logged and retried with a growing pause; nothing is lost meanwhile,
    /// the rows wait in the outbox.
    pub async fn run(self, shutdown: CancellationToken) {
        let (wake_tx, mut wake_rx) = tokio::sync::mpsc::channel::<()>(1);
        let listener = tokio::spawn(listen(self.pool.clone(), wake_tx, shutdown.clone()));
        let mut failures = 0u32;
        let mut last_stats = Instant::now() - Duration::from_secs(60);
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let pause = match self.drain().await {
                Ok(_) => {
                    failures = 0;
                    None
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "outbox relay failed; rows stay in the outbox and are retried");
                    Some(Duration::from_millis(100 * 2u64.pow(failures.min(6))))
                }
            };
            if last_stats.elapsed() >= Duration::from_secs(1) {
                last_stats = Instant::now();
                self.report_depth().await;
            }
            let wait = pause.unwrap_or(self.cfg.poll_interval);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake_rx.recv(), if pause.is_none() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        listener.abort();
        // Whatever we published has its PubAck; make sure our acks and deletes are not left in a client buffer.
        let _ = self.publisher.jetstream().client().flush().await;
    }

    async fn report_depth(&self) {
        let Ok(mut conn) = self.pool.get().await else { return };
        if let Ok(s) = table::stats(&mut conn).await {
            metrics::outbox(s.depth, s.oldest_age_seconds);
        }
    }
}

fn json_headers(v: &serde_json::Value) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(map) = v.as_object() {
        for (k, v) in map {
            if let Some(s) = v.as_str() {
                h.insert(k.as_str(), s);
            }
        }
    }
    h
}

/// Holds a dedicated connection (made by the pool, then detached from it) with `LISTEN` and forwards every
/// notification as a wake-up. Reconnects with a pause when the connection drops; the relay's poll interval covers
/// the gap.
async fn listen(pool: PgPool, wake: tokio::sync::mpsc::Sender<()>, shutdown: CancellationToken) {
    use diesel_async::RunQueryDsl;
    while !shutdown.is_cancelled() {
        let result: Result<(), StorageError> = async {
            let mut conn = storage::detach(&pool).await?;
            diesel::sql_query(format!("LISTEN {}", table::NOTIFY_CHANNEL)).execute(&mut conn).await?;
            // Anything committed before LISTEN took effect sent its NOTIFY to nobody: drain once now.
            let _ = wake.try_send(());
            let mut notes = std::pin::pin!(conn.notifications_stream());
            while let Some(n) = notes.next().await {
                n?;
                // A full channel already holds a wake-up; the relay drains everything when it wakes.
                let _ = wake.try_send(());
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "outbox LISTEN connection lost; polling until it is back");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
