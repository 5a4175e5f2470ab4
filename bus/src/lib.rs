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
pub use consumer::{
    Consumer, ConsumerSpec, Delivery, Handled, Handler, HandlerError, Item, finish_one_by_one, one_by_one,
};
pub use dlq::{DeadLetter, DlqError, RedriveAll, RedriveOutcome};
pub use envelope::{Envelope, Event, derived_id, headers};
pub use outbox::{Events, Outbox, Relay, TxBody, enqueue, enqueue_events};
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
///
/// One attempt is made first: a refused password or token, or a certificate that does not verify,
/// is a configuration error returned at once (the process stops with it, instead of retrying in silence). A server
/// that does not answer is waited for: the client keeps trying in the background, and `/readyz` says not ready.
pub async fn connect(cfg: &NatsConfig) -> Result<(async_nats::Client, async_nats::jetstream::Context), BusError> {
    use async_nats::ConnectErrorKind as Kind;
    for (key, path) in [("nats.tls_ca_file", &cfg.tls_ca_file), ("nats.tls_cert_file", &cfg.tls_cert_file)] {
        if let Some(p) = path
            && !p.is_file()
        {
            return Err(BusError::Config(format!("{key} {} does not exist", p.display())));
        }
    }
    let client = match options(cfg).connect(cfg.servers()).await {
        Ok(client) => client,
        Err(e) if matches!(e.kind(), Kind::AuthorizationViolation | Kind::Authentication) => {
            return Err(BusError::Config(format!("NATS at {} refused paystream: {e}", cfg.url_for_humans())));
        }
        Err(e) if e.kind() == Kind::Tls || tls_refused(&e) => {
            return Err(BusError::Config(format!("TLS with NATS at {} failed: {e}", cfg.url_for_humans())));
        }
        Err(e) => {
            tracing::warn!(error = %e, url = %cfg.url_for_humans(), "NATS not reachable yet; retrying in the background");
            // Keep reconnecting forever: a worker outliving a NATS restart is the point.
            options(cfg)
                .retry_on_initial_connect()
                .connect(cfg.servers())
                .await
                .map_err(|e| BusError::Unavailable(format!("cannot connect to {}: {e}", cfg.url_for_humans())))?
        }
    };
    let mut js = async_nats::jetstream::new(client.clone());
    js.set_timeout(cfg.request_timeout);
    Ok((client, js))
}

/// Whether an I/O error of a connection attempt is a TLS handshake that failed (an untrusted certificate, a server
/// without TLS when TLS is required): async-nats reports those as I/O errors of kind `InvalidData`, and no retry
/// fixes them.
fn tls_refused(e: &async_nats::ConnectError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData)
}

/// The connection options of `cfg`: credentials, TLS, and a log line for every connection event.
/// (NATS decentralized auth with `.creds` files is not supported: it needs async-nats's `nkeys` feature and an
/// operator setup to test against; user/password, token and TLS client certificates cover the Helm chart's modes.)
fn options(cfg: &NatsConfig) -> async_nats::ConnectOptions {
    use secrecy::ExposeSecret as _;
    let mut opts = match (&cfg.user, &cfg.password, &cfg.token) {
        (Some(user), Some(password), _) => {
            async_nats::ConnectOptions::with_user_and_password(user.clone(), password.expose_secret().to_owned())
        }
        (_, _, Some(token)) => async_nats::ConnectOptions::with_token(token.expose_secret().to_owned()),
        _ => async_nats::ConnectOptions::new(),
    };
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    opts.require_tls(cfg.require_tls).name("paystream").connection_timeout(Duration::from_secs(5)).event_callback(
        |event| async move {
            match event {
                async_nats::Event::ServerError(e) => tracing::error!(error = %e, "NATS server error"),
                async_nats::Event::ClientError(e) => tracing::error!(error = %e, "NATS client error"),
                async_nats::Event::SlowConsumer(sid) => tracing::warn!(sid, "NATS slow consumer"),
                other => tracing::info!(event = %other, "NATS connection"),
            }
        },
    )
}
