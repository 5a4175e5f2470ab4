//! The consumer runner: durable pull consumers provisioned explicitly, bounded concurrency, ack after the handler's
//! transaction committed, nak with growing delay on transient failure, dead-letter then `Term` on permanent
//! failure, poison, or the last allowed delivery, and a graceful stop.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{
    HeaderMap,
    jetstream::{
        self, AckKind,
        consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    },
};
use bytes::Bytes;
use chrono::Utc;
use futures::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{
    BusError, ConsumerConfig, Publisher,
    envelope::{Envelope, Event, headers},
    metrics::{self, Outcome},
};

/// Why a handler could not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying later: database or network down, a timeout, WeChat's 5xx.
    #[error("transient: {0}")]
    Transient(String),
    /// Retrying cannot help: unknown payment, amount mismatch, a refused transition. Goes to the DLQ.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<storage::StorageError> for HandlerError {
    fn from(e: storage::StorageError) -> Self {
        if e.is_transient() { HandlerError::Transient(e.to_string()) } else { HandlerError::Permanent(e.to_string()) }
    }
}

impl From<diesel::result::Error> for HandlerError {
    fn from(e: diesel::result::Error) -> Self {
        storage::StorageError::from(e).into()
    }
}

/// What a successful handler did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// The side effect happened (and committed).
    Done,
    /// It had already happened (a replay); nothing changed. Still acknowledged.
    Duplicate,
}

/// Delivery facts a handler may want.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub subject: String,
    /// 1 on the first delivery.
    pub delivered: i64,
    pub stream_sequence: u64,
    pub headers: HeaderMap,
}

/// One message of a batch: the decoded event, its delivery, and the span its work belongs to (it continues the
/// producer's trace; events announced for this message must be created in it, see [`Item::in_span`]).
#[derive(Debug)]
pub struct Item<E> {
    pub event: Envelope<E>,
    pub delivery: Delivery,
    pub span: tracing::Span,
}

impl<E> Item<E> {
    /// Runs `f` in this message's span: an envelope created there carries this message's trace.
    pub fn in_span<T>(&self, f: impl FnOnce() -> T) -> T {
        self.span.in_scope(f)
    }
}

/// The work a consumer does for one event. It must be idempotent: commit its side effect with the event's
/// `processed_event` claim or behind a conditional update, in one transaction.
pub trait Handler: Send + Sync + 'static {
    type Event: Event;

    /// The most messages [`Handler::handle_batch`] is given at once. The runner batches only what has already
    /// arrived while slots are free, so a quiet consumer still handles each message as it comes.
    const BATCH: usize = 1;

    fn handle(
        &self,
        event: Envelope<Self::Event>,
        delivery: &Delivery,
    ) -> impl Future<Output = Result<Handled, HandlerError>> + Send;

    /// Handles several messages, typically in one transaction; returns one result per item, in their order. A
    /// batch implementation must not let one message's failure decide its neighbours' fate: on a failure of the
    /// shared transaction, it handles the items one by one. The default does that from the start, concurrently.
    fn handle_batch(
        &self,
        items: Vec<Item<Self::Event>>,
    ) -> impl Future<Output = Vec<Result<Handled, HandlerError>>> + Send {
        one_by_one(self, items)
    }
}

/// Handles `items` with [`Handler::handle`], concurrently, each in its own span: the fallback of batch handlers.
pub async fn one_by_one<H: Handler + ?Sized>(
    handler: &H,
    items: Vec<Item<H::Event>>,
) -> Vec<Result<Handled, HandlerError>> {
    futures::future::join_all(items.into_iter().map(|item| {
        let Item { event, delivery, span } = item;
        async move { handler.handle(event, &delivery).await }.instrument(span)
    }))
    .await
}

/// The end of every batch handler: the items a shared transaction did not answer (`results[i]` still `None`) go
/// through [`one_by_one`], and every item comes back with its result, in order.
pub async fn finish_one_by_one<H: Handler + ?Sized>(
    handler: &H,
    items: Vec<Item<H::Event>>,
    mut results: Vec<Option<Result<Handled, HandlerError>>>,
) -> Vec<Result<Handled, HandlerError>> {
    let (rest_at, rest): (Vec<usize>, Vec<Item<H::Event>>) =
        items.into_iter().enumerate().filter(|(i, _)| results[*i].is_none()).unzip();
    for (i, r) in rest_at.into_iter().zip(one_by_one(handler, rest).await) {
        results[i] = Some(r);
    }
    results.into_iter().map(|r| r.expect("every item has a result")).collect()
}

/// A durable consumer's identity and settings.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Durable name; also names its dead-letter subject `dlq.<name>` and its metrics.
    pub name: String,
    pub config: ConsumerConfig,
}

/// Runs one durable consumer.
pub struct Consumer<H: Handler> {
    publisher: Publisher,
    spec: ConsumerSpec,
    handler: Arc<H>,
}

impl<H: Handler> Consumer<H> {
    pub fn new(publisher: Publisher, spec: ConsumerSpec, handler: H) -> Self {
        Consumer { publisher, spec, handler: Arc::new(handler) }
    }

    /// Creates the durable consumer, or updates it to this configuration: settings are always re-applied at start,
    /// never inherited from whatever the server kept.
    pub async fn provision(&self) -> Result<PullConsumer, BusError> {
        provision::<H::Event>(&self.publisher, &self.spec).await
    }

    /// Pulls and handles messages until `shutdown`. Then it stops pulling, lets in-flight handlers finish (each acks
    /// or naks), naks what was pulled but not started, and flushes the connection. Nothing is lost: anything not
    /// acknowledged is redelivered.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), BusError> {
        let mut consumer = self.provision().await?;
        metrics::register();
        metrics::register_consumer(&self.spec.name);
        let concurrency = self.spec.config.concurrency;
        let permits = Arc::new(Semaphore::new(concurrency));
        // A batch holds a slot per message until its slowest message is done (the notifier waits for WeChat): at
        // most a quarter of the slots per batch keeps several batches moving at once.
        let batch_cap = H::BATCH.min(concurrency / 4).max(1);
        let ctx = Arc::new(Ctx { publisher: self.publisher.clone(), spec: self.spec.clone(), handler: self.handler });
        tracing::info!(consumer = %ctx.spec.name, concurrency, "consumer started");
        let mut failures = 0u32;

        'pulling: while !shutdown.is_cancelled() {
            // A continuous pull that keeps about one batch of `concurrency` messages ahead of the handlers, so a
            // busy consumer never waits a round trip for its next message. At most that batch waits in our buffer
            // while its ack_wait runs, which is why ack_wait must comfortably exceed the handler timeout.
            let stream = consumer
                .stream()
                .max_messages_per_batch(concurrency)
                .expires(Duration::from_secs(30))
                .heartbeat(Duration::from_secs(5))
                .messages()
                .await;
            let mut messages = match stream {
                Ok(m) => {
                    failures = 0;
                    m
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(consumer = %ctx.spec.name, error = %e, "pull failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100 * 2u64.pow(failures.min(6)))) => continue,
                    }
                }
            };
            loop {
                // Take a slot first: a message is only taken from the buffer when it can start right away.
                let permit = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
                };
                let next = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(msg)) => {
                        failures = 0;
                        // More of what has already arrived, while slots are free: handled together.
                        let mut batch = vec![msg];
                        let mut slots = vec![permit];
                        while batch.len() < batch_cap {
                            let Ok(slot) = permits.clone().try_acquire_owned() else { break };
                            match messages.next().now_or_never() {
                                Some(Some(Ok(msg))) => {
                                    batch.push(msg);
                                    slots.push(slot);
                                }
                                // Nothing more yet, or an interruption the next `next()` reports again.
                                _ => break,
                            }
                        }
                        let ctx = ctx.clone();
                        tokio::spawn(async move {
                            ctx.process(batch).await;
                            drop(slots);
                        });
                    }
                    Some(Err(e)) => {
                        // Missed heartbeats, a NATS reconnect, a server restart: the pull usually resumes by
                        // itself; if errors keep coming (the consumer was deleted, say), start a new pull.
                        failures += 1;
                        tracing::warn!(consumer = %ctx.spec.name, error = %e, failures, "pull interrupted");
                        if failures >= 3 {
                            tokio::select! {
                                _ = shutdown.cancelled() => break,
                                _ = tokio::time::sleep(Duration::from_millis(100 * 2u64.pow(failures.min(6)))) => {}
                            }
                            // Re-provisioning is idempotent and brings back a consumer someone deleted.
                            match provision::<H::Event>(&ctx.publisher, &ctx.spec).await {
                                Ok(c) => consumer = c,
                                Err(e) => {
                                    tracing::warn!(consumer = %ctx.spec.name, error = %e, "re-provisioning failed")
                                }
                            }
                            continue 'pulling;
                        }
                    }
                    None => continue 'pulling,
                }
            }
            // Stopping: hand back what already arrived, so it is redelivered now rather than after ack_wait.
            while let Some(Some(Ok(msg))) = messages.next().now_or_never() {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
            }
            break;
        }

        // Wait for in-flight handlers: each ends with an ack, nak or term.
        let _all = permits.acquire_many(concurrency as u32).await.expect("semaphore is never closed");
        let _ = ctx.publisher.jetstream().client().flush().await;
        tracing::info!(consumer = %ctx.spec.name, "consumer stopped");
        Ok(())
    }
}

/// See [`Consumer::provision`].
async fn provision<E: Event>(publisher: &Publisher, spec: &ConsumerSpec) -> Result<PullConsumer, BusError> {
    let topology = publisher.topology();
    let cfg = &spec.config;
    let stream_name = topology.stream_of(E::SUBJECT);
    let stream =
        publisher.jetstream().get_stream(&stream_name).await.map_err(|e| {
            BusError::Nats(format!("stream {stream_name} is missing (streams are created at start): {e}"))
        })?;
    let consumer_cfg = pull::Config {
        durable_name: Some(spec.name.clone()),
        description: Some(format!("paystream {} consumer", spec.name)),
        filter_subject: topology.subject(E::SUBJECT),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: cfg.ack_wait,
        // Unlimited: the runner counts deliveries and dead-letters a message past `max_deliver` (also one whose
        // last attempt crashed or hung). If JetStream stopped on its own, a message whose dead letter could not be
        // stored (the DLQ stream unavailable) would stop in its stream, in neither place; this way the nak after a
        // failed dead letter brings it back until the letter is stored.
        max_deliver: -1,
        // Redeliveries after an ack timeout follow the same growing delays, never sooner than ack_wait.
        backoff: cfg.backoff.iter().map(|d| (*d).max(cfg.ack_wait)).collect(),
        max_ack_pending: (cfg.concurrency * 4).max(64) as i64,
        ..Default::default()
    };
    stream
        .create_consumer(consumer_cfg)
        .await
        .map_err(|e| BusError::Nats(format!("cannot provision consumer {}: {e}", spec.name)))
}

struct Ctx<H> {
    publisher: Publisher,
    spec: ConsumerSpec,
    handler: Arc<H>,
}

impl<H: Handler> Ctx<H> {
    /// Handles a batch of messages: each is checked on its own (deliveries used up, undecodable), the rest go to the
    /// handler together, and each is then acked, nak'ed or dead-lettered by its own result.
    async fn process(&self, batch: Vec<jetstream::Message>) {
        let name = self.spec.name.as_str();
        let cfg = &self.spec.config;
        let mut taken = Vec::with_capacity(batch.len());
        let mut items = Vec::with_capacity(batch.len());
        for msg in batch {
            let (delivered, stream, stream_sequence) = match msg.info() {
                Ok(i) => (i.delivered, i.stream.to_owned(), i.stream_sequence),
                Err(_) => (1, String::new(), 0),
            };
            let delivery = Delivery {
                subject: msg.subject.to_string(),
                delivered,
                stream_sequence,
                headers: msg.headers.clone().unwrap_or_default(),
            };
            if delivered > cfg.max_deliver {
                let reason = format!(
                    "no answer after {} deliveries (the handler crashed or hung, or its dead letter could not be stored)",
                    cfg.max_deliver
                );
                self.dead_letter(&msg, &delivery, &stream, &reason).await;
                continue;
            }
            let event = match Envelope::<H::Event>::decode(&msg.payload) {
                Ok(e) => e,
                Err(reason) => {
                    self.dead_letter(&msg, &delivery, &stream, &format!("poison: {reason}")).await;
                    continue;
                }
            };
            // One span per delivery, continuing the producer's trace (the envelope's `traceparent`, which the NATS
            // header copies).
            let span = tracing::info_span!(
                "consume",
                otel.name = %format!("consume {name}"),
                otel.kind = "consumer",
                consumer = name,
                subject = %delivery.subject,
                event_id = %event.id,
                aggregate = %event.payload.aggregate(),
                delivered,
                trace_id = tracing::field::Empty,
            );
            observability::trace::continue_trace(&span, event.traceparent.as_deref());
            let lag = (Utc::now() - event.occurred_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            metrics::lag_seconds(name, lag);
            taken.push((msg, delivery.clone(), stream, span.clone()));
            items.push(Item { event, delivery, span });
        }
        if items.is_empty() {
            return;
        }

        let started = Instant::now();
        let results = match tokio::time::timeout(cfg.handler_timeout, self.handler.handle_batch(items)).await {
            Ok(r) => r,
            Err(_) => {
                let reason = format!("handler timed out after {:?}", cfg.handler_timeout);
                vec![Err(HandlerError::Transient(reason)); taken.len()]
            }
        };
        let elapsed = started.elapsed().as_secs_f64();
        debug_assert_eq!(results.len(), taken.len(), "a batch handler answers every item");
        for ((msg, delivery, stream, span), result) in taken.into_iter().zip(results) {
            metrics::handler_seconds(name, elapsed);
            self.settle(msg, delivery, stream, result).instrument(span).await;
        }
    }

    /// Acks, naks or dead-letters one message by its handler's result.
    async fn settle(
        &self,
        msg: jetstream::Message,
        delivery: Delivery,
        stream: String,
        result: Result<Handled, HandlerError>,
    ) {
        let name = self.spec.name.as_str();
        let cfg = &self.spec.config;
        let delivered = delivery.delivered;
        match result {
            Ok(handled) => {
                let _ = msg.ack().await;
                metrics::consumed(name, if handled == Handled::Done { Outcome::Ack } else { Outcome::Duplicate });
            }
            Err(HandlerError::Permanent(reason)) => self.dead_letter(&msg, &delivery, &stream, &reason).await,
            Err(HandlerError::Transient(reason)) if delivered >= cfg.max_deliver => {
                let reason = format!("still failing after {delivered} deliveries: {reason}");
                self.dead_letter(&msg, &delivery, &stream, &reason).await
            }
            Err(HandlerError::Transient(reason)) => {
                let delay = cfg.retry_delay(delivered);
                tracing::warn!(consumer = name, delivered, ?delay, %reason, "transient failure; redelivering later");
                let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
                metrics::consumed(name, Outcome::Nak);
            }
        }
    }

    /// Publishes the message to `dlq.<consumer>` with the reason and the original headers, waits for the PubAck,
    /// and only then terminates the original. If the DLQ publish fails the message is nak'ed instead: it comes back
    /// and is dead-lettered later, never dropped.
    async fn dead_letter(&self, msg: &jetstream::Message, delivery: &Delivery, stream: &str, reason: &str) {
        let name = self.spec.name.as_str();
        let mut h = delivery.headers.clone();
        if let Some(original) = delivery.headers.get(headers::MSG_ID) {
            h.insert(headers::DLQ_ORIGINAL_MSG_ID, original.as_str());
        }
        // One dead letter per stored message, even if the Term below is lost and the message comes back.
        let id = if stream.is_empty() {
            // No delivery info: a fixed id would make JetStream drop every later letter of this kind as a duplicate.
            format!("dlq:{name}:{}", uuid::Uuid::new_v4())
        } else {
            format!("dlq:{name}:{stream}:{}", delivery.stream_sequence)
        };
        h.insert(headers::MSG_ID, id.as_str());
        h.insert(headers::DLQ_REASON, truncate(reason, 1000).as_str());
        h.insert(headers::DLQ_CONSUMER, name);
        h.insert(headers::DLQ_SUBJECT, delivery.subject.as_str());
        h.insert(headers::DLQ_STREAM, stream);
        h.insert(headers::DLQ_STREAM_SEQ, delivery.stream_sequence.to_string().as_str());
        h.insert(headers::DLQ_DELIVERIES, delivery.delivered.to_string().as_str());
        h.insert(headers::DLQ_FAILED_AT, Utc::now().to_rfc3339().as_str());
        let subject = self.publisher.topology().dlq_subject(name);
        match self.publisher.publish_raw(&subject, h, Bytes::copy_from_slice(&msg.payload)).await {
            Ok(_) => {
                tracing::error!(consumer = name, stream_sequence = delivery.stream_sequence, %reason, "message dead-lettered");
                let _ = msg.ack_with(AckKind::Term).await;
                metrics::consumed(name, Outcome::Dlq);
            }
            Err(e) => {
                tracing::error!(consumer = name, error = %e, %reason, "dead-letter publish failed; message will come back");
                let _ = msg.ack_with(AckKind::Nak(Some(self.spec.config.retry_delay(delivery.delivered)))).await;
                metrics::consumed(name, Outcome::DlqFailed);
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    // Header values must be one line.
    let one_line: String = s.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }).collect();
    one_line.chars().take(max).collect()
}
