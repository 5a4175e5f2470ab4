//! `paystream bench …`: throughput and latency figures printed next to a reference measured in the same run.
//! Benchmarks, not tests: they assert nothing about speed; they report it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::pull};
use bus::{Consumer, ConsumerSpec, Delivery, Envelope, Event, Handled, Handler, HandlerError, Subject, Topology};
use chrono::Utc;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use storage::{AsyncConnection, StorageError, processed};
use tokio_util::sync::CancellationToken;

use crate::{config::Config, roles::Infra};

#[derive(Debug, clap::Subcommand)]
pub enum Which {
    /// The outbox → relay → consumer path next to a raw JetStream publish → consume round trip.
    Bus {
        /// Events per run.
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        /// Concurrent writers (each commits one event per transaction, like a state change does).
        #[arg(long, default_value_t = 8)]
        writers: usize,
    },
    /// N users through login → order → prepay → pay → paid against a running system (`make bench-pipeline`).
    Pipeline {
        #[arg(long, default_value_t = 500)]
        users: usize,
        /// Users in flight at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// paystream's HTTP API.
        #[arg(long)]
        api: String,
        /// The WeChat sandbox.
        #[arg(long)]
        sandbox: String,
    },
    /// Open loop, end to end: signed callbacks at fixed rates → order paid → notifications delivered, on a system
    /// it starts itself (`make bench-e2e`).
    E2e(crate::bench_e2e::E2eArgs),
    /// Prepay (two RSA-2048 signatures each) per CPU-second of the ingress, beside one thread's RSA-2048 signing
    /// rate, on an ingress it starts itself (`make bench-prepay`).
    Prepay(crate::bench_edge::PrepayArgs),
    /// Callback ingest (verify, decrypt, publish, PubAck) beside RSA-2048 verification and JetStream publishing
    /// with PubAck, on an ingress it starts itself (`make bench-ingest`).
    Ingest(crate::bench_edge::IngestArgs),
}

pub async fn run(cfg: &Config, which: Which) -> anyhow::Result<()> {
    match which {
        Which::Bus { events, writers } => bus_bench(cfg, events, writers.max(1)).await,
        Which::Pipeline { users, concurrency, api, sandbox } => {
            crate::bench_pipeline::run(cfg, users, concurrency.max(1), &api, &sandbox).await
        }
        Which::E2e(args) => crate::bench_e2e::run(cfg, args).await,
        Which::Prepay(args) => crate::bench_edge::prepay(cfg, args).await,
        Which::Ingest(args) => crate::bench_edge::ingest(cfg, args).await,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BenchEvent {
    n: u64,
}

impl Event for BenchEvent {
    const TYPE: &'static str = "bench.event";
    const VERSION: u16 = 1;
    const SUBJECT: Subject = Subject::PaymentStatus;
    fn aggregate(&self) -> String {
        // 64 aggregates: several relays' worth of parallelism, order kept within each.
        format!("bench:{}", self.n % 64)
    }
}

pub(crate) struct Figures {
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

pub(crate) fn figures(mut latencies: Vec<f64>, elapsed: Duration) -> Figures {
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize] * 1000.0;
    Figures { per_second: latencies.len() as f64 / elapsed.as_secs_f64(), p50_ms: pick(0.5), p99_ms: pick(0.99) }
}

async fn bus_bench(cfg: &Config, events: usize, writers: usize) -> anyhow::Result<()> {
    storage::migrate(&cfg.database).await?;
    let mut cfg = cfg.clone();
    cfg.nats.prefix = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let infra = Infra::connect(&cfg).await?;
    let topology = infra.publisher.topology().clone();
    println!(
        "bus benchmark: {events} events, {writers} concurrent writers, NATS {} , {} cores",
        cfg.nats.url,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let raw = raw_round_trip(infra.publisher.jetstream(), &topology, events, writers).await?;
    println!(
        "  raw JetStream publish(PubAck) → pull consume → ack: {:>8.0} ev/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
        raw.per_second, raw.p50_ms, raw.p99_ms
    );
    let outbox = outbox_round_trip(&cfg, &infra, events, writers).await?;
    println!(
        "  outbox commit → publish → consumer (+processed_event): {:>8.0} ev/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
        outbox.per_second, outbox.p50_ms, outbox.p99_ms
    );
    println!(
        "  ratio outbox/raw: throughput {:.2}, p50 latency {:.2}x, p99 latency {:.2}x",
        outbox.per_second / raw.per_second,
        outbox.p50_ms / raw.p50_ms,
        outbox.p99_ms / raw.p99_ms
    );
    for stream in topology.streams() {
        let _ = infra.publisher.jetstream().delete_stream(&stream).await;
    }
    Ok(())
}

/// Writers publish with an awaited PubAck each; one pull consumer acks each message.
pub(crate) async fn raw_round_trip(
    js: &jetstream::Context,
    t: &Topology,
    events: usize,
    writers: usize,
) -> anyhow::Result<Figures> {
    let subject = t.subject(Subject::OrderStatus);
    let stream = js.get_stream(t.stream_of(Subject::OrderStatus)).await?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("bench-raw".into()),
            filter_subject: subject.clone(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await?;
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut messages = consumer.messages().await?;
        let mut latencies = Vec::with_capacity(events);
        while latencies.len() < events {
            let Some(msg) = tokio::time::timeout(Duration::from_secs(30), messages.next()).await? else { break };
            let msg = msg.map_err(|e| anyhow::anyhow!("{e}"))?;
            let sent: i64 = std::str::from_utf8(&msg.payload)?.parse()?;
            latencies.push((Utc::now().timestamp_micros() - sent) as f64 / 1e6);
            msg.ack_with(AckKind::Ack).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        anyhow::Ok((latencies, start.elapsed()))
    });
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (js, subject) = (js.clone(), subject.clone());
        tasks.push(tokio::spawn(async move {
            for i in (w..events).step_by(writers) {
                let publish = jetstream::message::PublishMessage::build()
                    .message_id(format!("raw-{i}"))
                    .payload(Utc::now().timestamp_micros().to_string().into());
                js.send_publish(subject.clone(), publish).await?.await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let (latencies, elapsed) = reader.await??;
    anyhow::ensure!(latencies.len() == events, "raw run lost messages: {} of {events}", latencies.len());
    Ok(figures(latencies, elapsed))
}

struct Recorder {
    pool: storage::PgPool,
    latencies: Arc<Mutex<Vec<f64>>>,
}

impl Handler for Recorder {
    type Event = BenchEvent;
    async fn handle(&self, event: Envelope<BenchEvent>, _: &Delivery) -> Result<Handled, HandlerError> {
        let mut conn = self.pool.get().await.map_err(|e| HandlerError::Transient(e.to_string()))?;
        let id = event.id.to_string();
        let fresh = conn.transaction::<_, StorageError, _>(async |c| processed::claim(c, "bench", &id).await).await?;
        if fresh {
            let lag = (Utc::now() - event.occurred_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            self.latencies.lock().expect("not poisoned").push(lag);
            Ok(Handled::Done)
        } else {
            Ok(Handled::Duplicate)
        }
    }
}

/// Writers commit one event per transaction and publish it after the commit (a relay sweeps); one consumer claims
/// each in `processed_event`.
async fn outbox_round_trip(cfg: &Config, infra: &Infra, events: usize, writers: usize) -> anyhow::Result<Figures> {
    let shutdown = CancellationToken::new();
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(events)));
    let consumer = Consumer::new(
        infra.publisher.clone(),
        ConsumerSpec { name: "bench".into(), config: cfg.consumer.clone() },
        Recorder { pool: infra.pool.clone(), latencies: latencies.clone() },
    );
    let consumer_task = tokio::spawn(consumer.run(shutdown.clone()));
    let relay_task = tokio::spawn(infra.relay(cfg).run(shutdown.clone()));
    let start = Instant::now();
    // Writers as the processors write: the event staged in the transaction, published by the writer right after
    // its commit (the relay runs too, for whatever that misses).
    let outbox = bus::Outbox::new(infra.pool.clone(), infra.publisher.clone());
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (pool, outbox) = (infra.pool.clone(), outbox.clone());
        tasks.push(tokio::spawn(async move {
            for n in (w..events).step_by(writers) {
                let env = Envelope::new(BenchEvent { n: n as u64 });
                let mut conn = pool.get().await?;
                outbox
                    .transaction::<_, StorageError, _>(&mut conn, async |_c, staged| {
                        staged.add(&env);
                        Ok(())
                    })
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last_report = Instant::now();
    loop {
        let done = latencies.lock().expect("not poisoned").len();
        if done >= events {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "outbox run stalled at {done} of {events}");
        if last_report.elapsed() > Duration::from_secs(2) {
            eprintln!("  … {done} of {events} handled");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    shutdown.cancel();
    let _ = relay_task.await;
    let _ = consumer_task.await;
    let latencies = std::mem::take(&mut *latencies.lock().expect("not poisoned"));
    Ok(figures(latencies, elapsed))
}
