//! Shared set-up for bus tests: a fresh database, a private prefix with its own streams, and a test event.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bus::{Envelope, Event, Publisher, Subject, Topology};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use storage::PgPool;
use testkit::TestDb;

pub struct Env {
    pub db: TestDb,
    pub pool: PgPool,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub publisher: Publisher,
}

impl Env {
    pub async fn new() -> Env {
        Env::with_topology(|t| t).await
    }

    pub async fn with_topology(f: impl FnOnce(Topology) -> Topology) -> Env {
        observability::init_for_tests();
        let db = TestDb::create().await;
        storage::migrate(&storage::DbConfig::new(&db.url)).await.unwrap();
        let pool = storage::pool(&storage::DbConfig::new(&db.url)).unwrap();
        let client = testkit::nats().await;
        let js = jetstream::new(client.clone());
        let topology = f(Topology::new(&testkit::unique("t")).unwrap());
        topology.ensure_streams(&js).await.unwrap();
        let publisher = Publisher::new(js.clone(), Arc::new(topology));
        Env { db, pool, client, js, publisher }
    }

    pub fn topology(&self) -> &Topology {
        self.publisher.topology()
    }

    /// Every message stored on a subject, in stream order (an ephemeral ordered consumer).
    pub async fn read_all(&self, subject: &str, expected: usize) -> Vec<jetstream::Message> {
        let stream_name = self.stream_for(subject);
        let stream = self.js.get_stream(&stream_name).await.unwrap();
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: subject.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut out = Vec::new();
        while out.len() < expected {
            match tokio::time::timeout(Duration::from_secs(20), messages.next()).await {
                Ok(Some(Ok(m))) => out.push(m),
                other => panic!("stopped reading {subject} after {} of {expected} messages: {other:?}", out.len()),
            }
        }
        out
    }

    /// Messages stored in a stream.
    pub async fn stream_count(&self, stream: &str) -> u64 {
        self.js.get_stream(stream).await.unwrap().info().await.unwrap().state.messages
    }

    fn stream_for(&self, subject: &str) -> String {
        let logical = self.topology().logical(subject).unwrap();
        if logical.starts_with("dlq.") {
            self.topology().dlq_stream()
        } else {
            self.topology().stream_of(Subject::from_name(logical).unwrap())
        }
    }
}

/// What the test handler should do with a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    Succeed,
    /// Fail transiently on the first n deliveries.
    FailFirst(i64),
    Permanent,
    AlwaysTransient,
}

/// The test event: a job of an aggregate, numbered within it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub aggregate: String,
    pub seq: u64,
    pub mode: Mode,
}

impl Event for Job {
    const TYPE: &'static str = "test.job";
    const VERSION: u16 = 1;
    const SUBJECT: Subject = Subject::OrderStatus;
    fn aggregate(&self) -> String {
        self.aggregate.clone()
    }
}

pub fn job(aggregate: &str, seq: u64, mode: Mode) -> Envelope<Job> {
    Envelope::new(Job { aggregate: aggregate.into(), seq, mode })
}
