//! Every subject and stream name, in one place, under a configurable prefix.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    stream::{Config as StreamConfig, DiscardPolicy, RetentionPolicy, StorageType},
};

use crate::BusError;

/// The logical subjects of the pipeline (DESIGN.md §2). On the wire each is `<prefix>.<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    /// What WeChat said about a transaction (callback, status poll or reconciliation).
    WechatTransaction,
    /// What WeChat said about a refund.
    WechatRefund,
    /// A payment's status changed.
    PaymentStatus,
    /// An order's state changed.
    OrderStatus,
    /// Send a mini-program subscribe message.
    NotifyMiniprogram,
    /// Send an SMS.
    NotifySms,
    /// Refund a payment.
    RefundRequested,
}

impl Subject {
    pub const ALL: [Subject; 7] = [
        Subject::WechatTransaction,
        Subject::WechatRefund,
        Subject::PaymentStatus,
        Subject::OrderStatus,
        Subject::NotifyMiniprogram,
        Subject::NotifySms,
        Subject::RefundRequested,
    ];

    /// The name without prefix, as stored in the outbox and used in metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Subject::WechatTransaction => "wechat.transaction",
            Subject::WechatRefund => "wechat.refund",
            Subject::PaymentStatus => "payment.status",
            Subject::OrderStatus => "order.status",
            Subject::NotifyMiniprogram => "notify.miniprogram",
            Subject::NotifySms => "notify.sms",
            Subject::RefundRequested => "refund.requested",
        }
    }

    pub fn from_name(name: &str) -> Option<Subject> {
        Subject::ALL.into_iter().find(|s| s.name() == name)
    }

    fn family(self) -> Family {
        match self {
            Subject::WechatTransaction | Subject::WechatRefund => Family::Wechat,
            Subject::PaymentStatus => Family::Payment,
            Subject::OrderStatus => Family::Order,
            Subject::NotifyMiniprogram | Subject::NotifySms => Family::Notify,
            Subject::RefundRequested => Family::Refund,
        }
    }
}

/// One stream per family: each is its own Raft group in a cluster, so families do not queue behind each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Wechat,
    Payment,
    Order,
    Notify,
    Refund,
    Dlq,
}

impl Family {
    const ALL: [Family; 6] =
        [Family::Wechat, Family::Payment, Family::Order, Family::Notify, Family::Refund, Family::Dlq];

    fn token(self) -> &'static str {
        match self {
            Family::Wechat => "wechat",
            Family::Payment => "payment",
            Family::Order => "order",
            Family::Notify => "notify",
            Family::Refund => "refund",
            Family::Dlq => "dlq",
        }
    }
}

/// Names and stream settings of one deployment. Tests use a random prefix each, so they can share a server.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    replicas: usize,
    duplicate_window: Duration,
    max_age: Duration,
    dlq_max_age: Duration,
}

impl Topology {
    /// `prefix` must be a single subject token: letters, digits, `_` and `-`.
    pub fn new(prefix: &str) -> Result<Topology, BusError> {
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err(BusError::Config(format!(
                "nats.prefix must be letters, digits, '_' or '-' (one subject token), got {prefix:?}"
            )));
        }
        Ok(Topology {
            prefix: prefix.to_owned(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::from_secs(7 * 24 * 3600),
            dlq_max_age: Duration::ZERO,
        })
    }

    pub fn with_replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    pub fn with_duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    pub fn with_max_age(mut self, events: Duration, dlq: Duration) -> Self {
        self.max_age = events;
        self.dlq_max_age = dlq;
        self
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn duplicate_window(&self) -> Duration {
        self.duplicate_window
    }

    /// `<prefix>.<subject>`.
    pub fn subject(&self, subject: Subject) -> String {
        format!("{}.{}", self.prefix, subject.name())
    }

    /// The wire subject for a logical name (as stored in the outbox).
    pub fn qualify(&self, logical: &str) -> String {
        format!("{}.{logical}", self.prefix)
    }

    /// The logical name of a wire subject of this deployment.
    pub fn logical<'a>(&self, wire: &'a str) -> Option<&'a str> {
        wire.strip_prefix(&self.prefix)?.strip_prefix('.')
    }

    /// Where a consumer's dead messages go: `<prefix>.dlq.<consumer>`.
    pub fn dlq_subject(&self, consumer: &str) -> String {
        format!("{}.dlq.{consumer}", self.prefix)
    }

    /// All dead-letter subjects: `<prefix>.dlq.>`.
    pub fn dlq_wildcard(&self) -> String {
        format!("{}.dlq.>", self.prefix)
    }

    fn stream_name_of(&self, family: Family) -> String {
        let p: String =
            self.prefix.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
        format!("{p}_{}", family.token().to_ascii_uppercase())
    }

    /// The stream that stores `subject`.
    pub fn stream_of(&self, subject: Subject) -> String {
        self.stream_name_of(subject.family())
    }

    /// The stream that stores dead letters.
    pub fn dlq_stream(&self) -> String {
        self.stream_name_of(Family::Dlq)
    }

    /// The names of every stream of this deployment.
    pub fn streams(&self) -> Vec<String> {
        Family::ALL.into_iter().map(|f| self.stream_name_of(f)).collect()
    }

    fn stream_config(&self, family: Family) -> StreamConfig {
        StreamConfig {
            name: self.stream_name_of(family),
            description: Some(format!("paystream {} events", family.token())),
            subjects: vec![format!("{}.{}.>", self.prefix, family.token())],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            // Refund requests are money owed: they are kept until a consumer handles them, whatever max_age says.
            max_age: match family {
                Family::Dlq => self.dlq_max_age,
                Family::Refund => Duration::ZERO,
                _ => self.max_age,
            },
            discard: DiscardPolicy::Old,
            // Events are small JSON documents; anything near this is a bug, not a payment.
            max_message_size: 1024 * 1024,
            ..Default::default()
        }
    }

    /// Creates every stream, or updates it to this configuration (idempotent; run at every start).
    pub async fn ensure_streams(&self, js: &jetstream::Context) -> Result<(), BusError> {
        for family in Family::ALL {
            let cfg = self.stream_config(family);
            let name = cfg.name.clone();
            js.create_or_update_stream(cfg)
                .await
                .map_err(|e| BusError::Nats(format!("cannot create or update stream {name}: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_live_under_the_prefix() {
        let t = Topology::new("paystream").unwrap();
        assert_eq!(t.subject(Subject::WechatTransaction), "paystream.wechat.transaction");
        assert_eq!(t.dlq_subject("payment"), "paystream.dlq.payment");
        assert_eq!(t.stream_of(Subject::NotifySms), "PAYSTREAM_NOTIFY");
        assert_eq!(t.logical("paystream.payment.status"), Some("payment.status"));
        assert_eq!(t.logical("other.payment.status"), None);
        for s in Subject::ALL {
            assert_eq!(Subject::from_name(s.name()), Some(s));
        }
        assert_eq!(Topology::new("t-1_x").unwrap().stream_of(Subject::PaymentStatus), "T_1_X_PAYMENT");
    }

    #[test]
    fn prefixes_that_would_break_subjects_are_refused() {
        for bad in ["", "a.b", "a*", "a>", "a b"] {
            assert!(Topology::new(bad).is_err(), "{bad:?}");
        }
    }
}
