//! The JetStream side of paystream: subject and stream names ([`Topology`]), the versioned event [`Envelope`],
//! a [`Publisher`] that waits for PubAcks, the transactional outbox ([`enqueue`] + [`Relay`]) and the consumer
//! runner ([`Consumer`]) with retries, dead letters and graceful shutdown.
//!
//! The rules it keeps (DESIGN.md §3): nothing is acknowledged that is not stored; a state change and its event
//! commit together; every consumer is idempotent and acks only after its transaction commits; failures are
//! classified, and what cannot succeed is dead-lettered with its reason, never dropped.

mod config;
mod consumer;
pub mod dlq;
mod envelope;
pub mod events;
pub mod metrics;
mod outbox;
mod publisher;
mod topology;

use std::time::Duration;

pub use config::{ConsumerConfig, NatsConfig, OutboxConfig};
pub use consumer::{Consumer, ConsumerSpec, Delivery, Handled, Handler, HandlerError};
pub use dlq::{DeadLetter, DlqError, RedriveAll, RedriveOutcome};
pub use envelope::{Envelope, Event, derived_id, headers};
pub use outbox::{Relay, enqueue};
pub use publisher::Publisher;
pub use topology::{Subject, Topology};

/// Errors of the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// NATS or JetStream is unreachable or timed out: retry later.
    #[error("NATS unavailable: {0}")]
    Unavailable(String),
    /// JetStream refused something (a missing stream, a bad consumer configuration).
    #[error("JetStream: {0}")]
    Nats(String),
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    #[error("configuration: {0}")]
    Config(String),
}

impl From<diesel::result::Error> for BusError {
    fn from(e: diesel::result::Error) -> Self {
        BusError::Storage(e.into())
    }
}

/// Connects to NATS and returns a JetStream context whose API calls and PubAcks time out after `cfg.request_timeout`.
pub async fn connect(cfg: &NatsConfig) -> Result<(async_nats::Client, async_nats::jetstream::Context), BusError> {
    let client = async_nats::ConnectOptions::new()
        .name("paystream")
        .connection_timeout(Duration::from_secs(5))
        // Keep reconnecting forever: a worker outliving a NATS restart is the point.
        .retry_on_initial_connect()
        .connect(cfg.servers())
        .await
        .map_err(|e| BusError::Unavailable(format!("cannot connect to {}: {e}", cfg.url)))?;
    let mut js = async_nats::jetstream::new(client.clone());
    js.set_timeout(cfg.request_timeout);
    Ok((client, js))
}
