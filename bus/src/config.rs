//! The `[nats]`, `[consumer]` and `[outbox]` sections of `paystream.toml`.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

/// `[nats]`: where JetStream is and how streams are made. `Debug` shows `url` without any password or token in it.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Seed servers, comma-separated. Credentials belong in `user`/`password`/`token`; any put in the URL anyway
    /// are masked wherever the URL is shown ([`NatsConfig::url_for_humans`]).
    pub url: String,
    /// First token of every subject and stream name; lets environments and tests share one server.
    pub prefix: String,
    /// Replicas per stream: 1 on one machine, 3 on a cluster.
    pub stream_replicas: usize,
    /// JetStream drops a repeated `Nats-Msg-Id` within this window.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// How long events are kept in their streams.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// How long dead letters are kept; 0 (the default) keeps them until they are redriven. A dead letter can
    /// stand for money (a refund WeChat refused), so none expires unless an operator says so.
    #[serde(with = "humantime_serde")]
    pub dlq_max_age: Duration,
    /// Timeout of JetStream API calls and PubAcks.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// User and password, when the server's `authorization`/`accounts` say so. `password` is secret.
    pub user: Option<String>,
    pub password: Option<SecretString>,
    /// A token, when the server's `authorization { token }` says so. Secret.
    pub token: Option<SecretString>,
    /// PEM of the CA that signed the servers' certificates (a private CA; public ones are trusted already).
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) when the server verifies clients (`tls { verify: true }`).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to talk to a server without TLS (`tls://` URLs imply it).
    pub require_tls: bool,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            prefix: "paystream".into(),
            stream_replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::from_secs(7 * 24 * 3600),
            dlq_max_age: Duration::ZERO,
            // Under the callback's 4 s budget: WeChat must get an answer within 5 s, and a FAIL lets it retry.
            request_timeout: Duration::from_secs(3),
            user: None,
            password: None,
            token: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            require_tls: false,
        }
    }
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &self.url_for_humans())
            .field("prefix", &self.prefix)
            .field("stream_replicas", &self.stream_replicas)
            .field("duplicate_window", &self.duplicate_window)
            .field("max_age", &self.max_age)
            .field("dlq_max_age", &self.dlq_max_age)
            .field("request_timeout", &self.request_timeout)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("token", &self.token)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("require_tls", &self.require_tls)
            .finish()
    }
}

impl NatsConfig {
    /// `url` for logs, errors and `paystream config`: the userinfo of each server (`nats://user:pass@host`,
    /// `nats://token@host`) replaced by `***`.
    pub fn url_for_humans(&self) -> String {
        self.url
            .split(',')
            .map(|u| match (u.find("://"), u.rfind('@')) {
                (Some(scheme), Some(at)) if at > scheme => format!("{}***{}", &u[..scheme + 3], &u[at..]),
                _ => u.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The seed servers of `url` (comma-separated); the client fails over between them and learns the rest of the
    /// cluster from the servers themselves.
    pub fn servers(&self) -> Vec<String> {
        self.url.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
    }

    pub fn validate(&self) -> Result<(), String> {
        crate::Topology::new(&self.prefix).map_err(|e| e.to_string())?;
        let servers = self.servers();
        if servers.is_empty() || servers.iter().any(|u| !(u.starts_with("nats://") || u.starts_with("tls://"))) {
            return Err(format!(
                "nats.url must be nats:// or tls:// URLs, comma-separated for several seeds, got {:?}",
                self.url_for_humans()
            ));
        }
        if !matches!(self.stream_replicas, 1 | 3 | 5) {
            return Err(format!("nats.stream_replicas must be 1, 3 or 5, got {}", self.stream_replicas));
        }
        if self.duplicate_window.is_zero() || self.duplicate_window > self.max_age {
            return Err("nats.duplicate_window must be positive and no longer than nats.max_age".into());
        }
        if self.user.is_some() != self.password.is_some() {
            return Err("nats.user and nats.password go together".into());
        }
        if self.user.is_some() && self.token.is_some() {
            return Err("nats: set user/password or token, not both".into());
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err("nats.tls_cert_file and nats.tls_key_file go together".into());
        }
        Ok(())
    }

    pub fn topology(&self) -> crate::Topology {
        crate::Topology::new(&self.prefix)
            .expect("validated")
            .with_replicas(self.stream_replicas)
            .with_duplicate_window(self.duplicate_window)
            .with_max_age(self.max_age, self.dlq_max_age)
    }
}

/// `[consumer]`: delivery settings shared by every consumer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    /// How long JetStream waits for an ack before redelivering. Must exceed `handler_timeout`, or a slow but
    /// healthy handler would see its message delivered a second time while it still works on the first.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Deliveries before a message that keeps failing goes to the DLQ.
    pub max_deliver: i64,
    /// Delay before the n-th retry of a transient failure (the last entry repeats). Also given to JetStream as
    /// the consumer's `backoff`, raised to at least `ack_wait`, for redeliveries after an ack timeout.
    #[serde(deserialize_with = "durations")]
    pub backoff: Vec<Duration>,
    /// Messages handled at once per consumer and process.
    pub concurrency: usize,
    /// A handler taking longer is abandoned and its message retried.
    #[serde(with = "humantime_serde")]
    pub handler_timeout: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            ack_wait: Duration::from_secs(30),
            max_deliver: 10,
            backoff: [1, 5, 30, 120, 300].into_iter().map(Duration::from_secs).collect(),
            concurrency: 32,
            handler_timeout: Duration::from_secs(10),
        }
    }
}

impl ConsumerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.handler_timeout >= self.ack_wait {
            return Err(format!(
                "consumer.ack_wait ({:?}) must be longer than consumer.handler_timeout ({:?})",
                self.ack_wait, self.handler_timeout
            ));
        }
        if self.max_deliver < 1 {
            return Err("consumer.max_deliver must be at least 1".into());
        }
        if self.backoff.is_empty() {
            return Err("consumer.backoff needs at least one delay".into());
        }
        if self.max_deliver <= self.backoff.len() as i64 {
            return Err(format!(
                "consumer.max_deliver ({}) must be greater than the number of consumer.backoff entries ({})",
                self.max_deliver,
                self.backoff.len()
            ));
        }
        if self.concurrency == 0 {
            return Err("consumer.concurrency must be at least 1".into());
        }
        Ok(())
    }

    /// The delay before retrying after the `delivered`-th delivery failed.
    pub fn retry_delay(&self, delivered: i64) -> Duration {
        let i = (delivered.max(1) - 1) as usize;
        self.backoff[i.min(self.backoff.len() - 1)]
    }
}

fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let v: Vec<humantime_serde::Serde<Duration>> = Vec::deserialize(d)?;
    Ok(v.into_iter().map(|s| s.into_inner()).collect())
}

/// `[outbox]`: the relay.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Aggregates one relay claims per batch.
    pub batch_aggregates: i64,
    /// Rows one relay publishes per batch.
    pub batch_rows: i64,
    /// Relays are woken by NOTIFY; this is the fallback poll when a notification is missed.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// A row its writer publishes itself right after the commit is left to that writer this long; older, the
    /// relays publish it (the writer died between commit and publish, or NATS refused it). Longer than it takes a
    /// busy writer to publish and delete its rows, or relays publish them a second time (JetStream drops those).
    #[serde(with = "humantime_serde")]
    pub sweep_after: Duration,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            batch_aggregates: 256,
            batch_rows: 1024,
            poll_interval: Duration::from_secs(1),
            sweep_after: Duration::from_secs(5),
        }
    }
}

impl OutboxConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.batch_aggregates < 1 || self.batch_rows < 1 {
            return Err("outbox.batch_aggregates and outbox.batch_rows must be at least 1".into());
        }
        if self.poll_interval.is_zero() {
            return Err("outbox.poll_interval must be positive".into());
        }
        if self.sweep_after.is_zero() {
            return Err("outbox.sweep_after must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_the_url_never_show() {
        let cfg = NatsConfig {
            url: "nats://paystream:s3cret-pass@nats-0:4222, nats://tok3n@nats-1:4222,nats://nats-2:4222".into(),
            ..Default::default()
        };
        let shown = cfg.url_for_humans();
        assert_eq!(shown, "nats://***@nats-0:4222, nats://***@nats-1:4222,nats://nats-2:4222");
        let debug = format!("{cfg:?}");
        assert!(!debug.contains("s3cret-pass") && !debug.contains("tok3n") && debug.contains("nats-2"), "{debug}");
        let bad = NatsConfig { url: "http://u:s3cret-pass@x".into(), ..Default::default() };
        assert!(!bad.validate().unwrap_err().contains("s3cret-pass"));
    }

    #[test]
    fn defaults_are_valid() {
        NatsConfig::default().validate().unwrap();
        ConsumerConfig::default().validate().unwrap();
        OutboxConfig::default().validate().unwrap();
    }

    #[test]
    fn ack_wait_must_outlast_the_handler() {
        let c = ConsumerConfig { ack_wait: Duration::from_secs(5), ..Default::default() };
        let e = c.validate().unwrap_err();
        assert!(e.contains("consumer.ack_wait") && e.contains("consumer.handler_timeout"), "{e}");
    }

    #[test]
    fn max_deliver_must_exceed_backoff_entries() {
        let c = ConsumerConfig { max_deliver: 3, ..Default::default() };
        assert!(c.validate().unwrap_err().contains("consumer.max_deliver"));
    }

    #[test]
    fn retry_delays_grow_then_repeat_the_last() {
        let c = ConsumerConfig::default();
        assert_eq!(c.retry_delay(1), Duration::from_secs(1));
        assert_eq!(c.retry_delay(2), Duration::from_secs(5));
        assert_eq!(c.retry_delay(9), Duration::from_secs(300));
    }
}
