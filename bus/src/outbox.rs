//! The transactional outbox. [`Outbox::transaction`] writes a state change and the events that announce it in one
//! transaction and, right after the commit, publishes those events itself (the fast path); [`enqueue`] writes an
//! event for the relays only; [`Relay`] publishes committed rows nobody published (a writer that crashed between
//! its commit and its publish, or rows that had to wait for an earlier event of their aggregate) and deletes them
//! after the PubAck.
//!
//! The fast path keeps the outbox's promise: the rows are committed before anything is published, and a row is
//! deleted only after its PubAck (in batches, by a background task). Until then the relays can see it and may
//! publish it again: with the same `Nats-Msg-Id`, which JetStream drops. Order within an aggregate holds because a
//! writer publishes a row itself only if no older row of its aggregate was still in the outbox when it wrote
//! (`storage::outbox::insert_all`); otherwise the row waits for the relays, which publish each aggregate in order.
//!
//! Delivery guarantee: a row is deleted only in the transaction that published it, after every PubAck of its batch.
//! If the relay dies between PubAck and commit, the rows stay and are published again by the next relay with the
//! same `Nats-Msg-Id` (the event id), which JetStream drops as a duplicate within its window. Past the window,
//! downstream consumers are idempotent themselves (the state they change, or their `processed_event` claim).

use std::future::Future;
use std::sync::Arc;
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

/// Writes `env` to the outbox in the caller's transaction, for the relays: it is published after the transaction
/// commits, by a relay; once, if the same event is already waiting there. Paths where latency matters use
/// [`Outbox::transaction`] instead.
pub async fn enqueue<E: Event>(conn: &mut Conn, env: &Envelope<E>) -> Result<(), StorageError> {
    table::insert(conn, &row_of(env)).await
}

/// Writes staged `events` in the caller's transaction, for the relays (as [`enqueue`] does for one).
pub async fn enqueue_events(conn: &mut Conn, events: Events) -> Result<(), StorageError> {
    if events.is_empty() {
        return Ok(());
    }
    table::insert_all(conn, &events.rows, &[], false).await?;
    table::wake_relays(conn).await
}

fn row_of<E: Event>(env: &Envelope<E>) -> table::NewOutboxRow {
    let mut headers = serde_json::Map::new();
    for (name, values) in env.headers().iter() {
        if let Some(v) = values.first() {
            headers.insert(name.to_string(), v.as_str().into());
        }
    }
    table::NewOutboxRow {
        event_id: env.id,
        aggregate: env.payload.aggregate(),
        subject: E::SUBJECT.name().to_owned(),
        headers: serde_json::Value::Object(headers),
        payload: env.to_bytes(),
    }
}

/// The events of one transaction, staged by the code inside [`Outbox::transaction`] and written when it ends.
#[derive(Debug, Default)]
pub struct Events {
    rows: Vec<table::NewOutboxRow>,
}

impl Events {
    /// Announces `env` if (and only if) the transaction commits.
    pub fn add<E: Event>(&mut self, env: &Envelope<E>) {
        self.rows.push(row_of(env));
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// The body of an [`Outbox::transaction`]: like diesel-async's transaction closures, with the events to stage.
pub trait TxBody<'r, R, E>: FnOnce(&'r mut Conn, &'r mut Events) -> <Self as TxBody<'r, R, E>>::Fut {
    type Fut: Future<Output = Result<R, E>> + Send;
}

impl<'r, F, Fut, R, E> TxBody<'r, R, E> for F
where
    F: FnOnce(&'r mut Conn, &'r mut Events) -> Fut,
    Fut: Future<Output = Result<R, E>> + Send,
{
    type Fut = Fut;
}

/// Transactions that announce what they changed, and publish it themselves once committed. Cheap to clone; the
/// deletes of published rows run on a background task that ends once every clone is dropped and the rows it knows
/// of are deleted.
#[derive(Clone)]
pub struct Outbox {
    publisher: Publisher,
    acked: Arc<Acked>,
}

/// Rows this process published (PubAck in) and has not deleted yet. A new row of the same aggregate may still go
/// out at once: its predecessor is already in the stream. Rows published by other processes are not known here, so
/// a row behind one of those waits for the relays (rare: writers of one aggregate follow each other closely only
/// inside one processor).
#[derive(Default)]
struct Acked {
    ids: std::sync::Mutex<Vec<i64>>,
    arrived: tokio::sync::Notify,
}

impl Acked {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<i64>> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Published rows deleted per statement, at most; also the most ids a writer passes as already published.
const DELETE_BATCH: usize = 512;
/// The delete task's pace: at most one DELETE per this interval (unless a full batch is waiting), so that under
/// load each statement removes many rows instead of one statement per PubAck. Rows live this much longer; writers
/// do not wait for it (see [`Acked`]).
const DELETE_EVERY: Duration = Duration::from_millis(10);

impl Outbox {
    /// Must be called inside a tokio runtime (it starts the delete task).
    pub fn new(pool: PgPool, publisher: Publisher) -> Self {
        let acked = Arc::new(Acked::default());
        tokio::spawn(delete_published(pool, Arc::downgrade(&acked)));
        Outbox { publisher, acked }
    }

    /// Runs `body` in a transaction on `conn`; the events it stages are written in the same transaction (one
    /// statement) and, after the commit, published here with their event id as `Nats-Msg-Id`. Nothing waits for
    /// the PubAcks: a crash before them leaves the rows to the relays.
    pub async fn transaction<R, E, F>(&self, conn: &mut Conn, body: F) -> Result<R, E>
    where
        F: for<'r> AsyncFnOnce(&'r mut Conn, &'r mut Events) -> Result<R, E> + for<'r> TxBody<'r, R, E> + Send,
        E: From<StorageError> + From<diesel::result::Error> + Send,
        R: Send,
    {
        let mut events = Events::default();
        let events_ref = &mut events;
        let acked = &self.acked;
        let (result, written) = conn
            .transaction::<_, E, _>(async move |c| {
                let result = body(c, events_ref).await?;
                if events_ref.rows.is_empty() {
                    return Ok((result, Vec::new()));
                }
                let published: Vec<i64> = acked.lock().iter().take(DELETE_BATCH).copied().collect();
                let written = table::insert_all(c, &events_ref.rows, &published, true).await?;
                if written.iter().any(|w| !w.fast) {
                    // An earlier event of the aggregate is still on its way: the relays publish this one after it.
                    table::wake_relays(c).await?;
                }
                Ok((result, written))
            })
            .await?;
        self.publish_committed(events.rows, written).await;
        Ok(result)
    }

    /// The fast path: sends the committed heads in order, then hands their ids to the delete task once each PubAck
    /// is in. A failure here loses nothing: the rows stay for the relays.
    async fn publish_committed(&self, rows: Vec<table::NewOutboxRow>, written: Vec<table::Written>) {
        let mut pending = Vec::with_capacity(rows.len());
        let mut written: std::collections::HashMap<uuid::Uuid, table::Written> =
            written.into_iter().map(|w| (w.event_id, w)).collect();
        for row in rows {
            // RETURNING promises no order: match by event id (a row missing from it is left to the relays).
            let Some(w) = written.remove(&row.event_id) else { break };
            if !w.fast {
                // An earlier event of its aggregate is still on its way; so are, by construction, the rows after it.
                break;
            }
            let subject = self.publisher.topology().qualify(&row.subject);
            match self.publisher.send(&subject, json_headers(&row.headers), Bytes::from(row.payload)).await {
                Ok(ack) => pending.push((w.id, row.subject, ack)),
                Err(e) => {
                    tracing::warn!(error = %e, "publish after commit failed; the relays will publish the rest");
                    break;
                }
            }
        }
        if pending.is_empty() {
            return;
        }
        let acked = self.acked.clone();
        tokio::spawn(async move {
            for (id, subject, ack) in pending {
                match ack.await {
                    Ok(ack) => {
                        metrics::published(&subject, ack.duplicate);
                        metrics::relayed(&subject, 1);
                        acked.lock().push(id);
                        acked.arrived.notify_one();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "no PubAck after commit; the relays will publish it");
                        return;
                    }
                }
            }
        });
    }
}

/// Deletes published rows in batches: one statement for whatever was acknowledged while the previous one ran. A
/// failed delete is retried; rows it leaves behind would only be published again (and dropped by JetStream).
async fn delete_published(pool: PgPool, acked: std::sync::Weak<Acked>) {
    let mut failures = 0u32;
    loop {
        let Some(acked) = acked.upgrade() else { return };
        let batch: Vec<i64> = acked.lock().iter().take(DELETE_BATCH).copied().collect();
        if batch.is_empty() {
            // Woken by the next PubAck, or after a while to see whether the outbox is still in use.
            let _ = tokio::time::timeout(Duration::from_secs(1), acked.arrived.notified()).await;
            continue;
        }
        let result = async {
            let mut conn = pool.get().await.map_err(StorageError::from)?;
            table::delete(&mut conn, &batch).await
        }
        .await;
        match result {
            Ok(_) => {
                failures = 0;
                // Only now may writers stop treating these rows as published-and-present.
                let left = {
                    let mut ids = acked.lock();
                    ids.drain(..batch.len());
                    ids.len()
                };
                if left < DELETE_BATCH {
                    drop(acked);
                    tokio::time::sleep(DELETE_EVERY).await;
                }
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, rows = batch.len(), "deleting published outbox rows failed; retrying");
                tokio::time::sleep(Duration::from_millis(50 * 2u64.pow(failures.min(6)))).await;
            }
        }
    }
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
        let (aggs, rows, sweep_after) = (self.cfg.batch_aggregates, self.cfg.batch_rows, self.cfg.sweep_after);
        let publisher = &self.publisher;
        let published = conn
            .transaction::<_, BusError, _>(async move |c| {
                let batch = table::claim_batch(c, aggs, rows, sweep_after).await?;
                if batch.is_empty() {
                    return Ok(Vec::new());
                }
                // Send everything first, then collect the acks: one round trip per batch instead of per row.
                // Rows go out in id order on one connection, so JetStream stores each aggregate's events in order.
                let mut pending = Vec::with_capacity(batch.len());
                // Aggregates with a row NATS refused for good: that row is parked, the rest of the aggregate waits
                // behind it (order holds), and the other aggregates of the batch go on.
                let mut stopped: std::collections::HashSet<&str> = Default::default();
                for row in &batch {
                    if stopped.contains(row.aggregate.as_str()) {
                        continue;
                    }
                    let subject = publisher.topology().qualify(&row.subject);
                    match publisher.send(&subject, json_headers(&row.headers), Bytes::from(row.payload.clone())).await {
                        Ok(ack) => pending.push((row, ack)),
                        Err(BusError::Nats(reason)) => {
                            tracing::error!(
                                outbox_id = row.id,
                                event_id = %row.event_id,
                                subject = %row.subject,
                                aggregate = %row.aggregate,
                                %reason,
                                "NATS refuses this outbox row for good; parked (paystream outbox parked)"
                            );
                            table::park(c, row.id, &reason).await?;
                            stopped.insert(row.aggregate.as_str());
                        }
                        Err(e) => return Err(e),
                    }
                }
                let mut ids = Vec::with_capacity(pending.len());
                let mut subjects = Vec::with_capacity(pending.len());
                for (row, ack) in pending {
                    let ack = ack.await.map_err(crate::publisher::publish_error)?;
                    metrics::published(&row.subject, ack.duplicate);
                    ids.push(row.id);
                    subjects.push(row.subject.clone());
                }
                table::delete(c, &ids).await?;
                Ok(subjects)
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
            metrics::outbox(s.depth, s.oldest_age_seconds, s.parked);
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
