//! `paystream demo`: walks one event through the pipeline the way every state change travels — committed with
//! its outbox row, relayed to JetStream, handled once by a consumer — and prints each step with its time.
//! It runs in a namespace of its own (`<prefix>-demo`), so it never touches a deployment's streams, and exits
//! non-zero if any step fails. (The full payment walk through HTTP joins when the ingress exists.)

use std::time::{Duration, Instant};

use bus::{Consumer, ConsumerSpec, Delivery, Envelope, Event, Handled, Handler, HandlerError, Subject};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use storage::{AsyncConnection, StorageError, processed};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{config::Config, roles::Infra};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DemoPing {
    note: String,
}

impl Event for DemoPing {
    const TYPE: &'static str = "demo.ping";
    const VERSION: u16 = 1;
    const SUBJECT: Subject = Subject::OrderStatus;
    fn aggregate(&self) -> String {
        "demo".into()
    }
}

struct Receiver {
    pool: storage::PgPool,
    done: mpsc::UnboundedSender<(Envelope<DemoPing>, Instant)>,
}

impl Handler for Receiver {
    type Event = DemoPing;
    async fn handle(&self, event: Envelope<DemoPing>, _: &Delivery) -> Result<Handled, HandlerError> {
        let mut conn = self.pool.get().await.map_err(|e| HandlerError::Transient(e.to_string()))?;
        let id = event.id.to_string();
        let fresh = conn.transaction::<_, StorageError, _>(async |c| processed::claim(c, "demo", &id).await).await?;
        if !fresh {
            return Ok(Handled::Duplicate);
        }
        let _ = self.done.send((event, Instant::now()));
        Ok(Handled::Done)
    }
}

fn step(t0: Instant, what: &str) {
    println!("[{:>8.1} ms] {what}", t0.elapsed().as_secs_f64() * 1000.0);
}

pub async fn run(cfg: &Config) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let applied = storage::migrate(cfg.database.url.expose_secret()).await?;
    step(t0, &format!("database migrated ({applied} migrations applied now)"));

    let mut cfg = cfg.clone();
    cfg.nats.prefix = format!("{}-demo", cfg.nats.prefix);
    let infra = Infra::connect(&cfg).await?;
    step(t0, &format!("connected to NATS {}; streams under prefix {:?} ready", cfg.nats.url, cfg.nats.prefix));

    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(infra.relay(&cfg).run(shutdown.clone()));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = Consumer::new(
        infra.publisher.clone(),
        ConsumerSpec { name: "demo".into(), config: cfg.consumer.clone() },
        Receiver { pool: infra.pool.clone(), done: tx },
    );
    let consumer_task = tokio::spawn(consumer.run(shutdown.clone()));
    step(t0, "outbox relay and a durable consumer running");

    let event = Envelope::new(DemoPing { note: "hello from the outbox".into() });
    let committed = Instant::now();
    let mut conn = infra.pool.get().await?;
    conn.transaction::<_, StorageError, _>(async |c| bus::enqueue(c, &event).await).await?;
    step(t0, &format!("event {} committed with its outbox row", event.id));

    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rx.recv().await {
                Some((got, at)) if got.id == event.id => return Some(at),
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await;
    shutdown.cancel();
    let _ = relay.await;
    let _ = consumer_task.await;
    // The demo namespace is scratch: remove its streams so repeated runs start clean.
    for stream in infra.publisher.topology().streams() {
        let _ = infra.publisher.jetstream().delete_stream(&stream).await;
    }
    match outcome {
        Ok(Some(at)) => {
            step(
                t0,
                &format!("consumer handled it once, {:.1} ms after commit", (at - committed).as_secs_f64() * 1000.0),
            );
            println!("demo OK");
            Ok(())
        }
        _ => anyhow::bail!("the event was not handled within 10 s: is the relay or NATS stuck? (see the log above)"),
    }
}
