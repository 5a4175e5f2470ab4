//! The bus's Prometheus metrics, declared once, labelled by logical subject and consumer name only.

use std::sync::OnceLock;

use prometheus::{Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts};

struct Metrics {
    published: IntCounterVec,
    consumed: IntCounterVec,
    handler_seconds: HistogramVec,
    lag_seconds: HistogramVec,
    outbox_depth: IntGauge,
    outbox_oldest: Gauge,
    outbox_parked: IntGauge,
    outbox_relayed: IntCounterVec,
}

fn m() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let r = observability::registry();
        let published = IntCounterVec::new(
            Opts::new("events_published_total", "Events stored by JetStream (PubAck received), by subject; duplicate=true when JetStream dropped a repeat"),
            &["subject", "duplicate"],
        )
        .unwrap();
        let consumed = IntCounterVec::new(
            Opts::new("events_consumed_total", "Deliveries handled, by consumer and outcome (ack, duplicate, nak, term, dlq)"),
            &["consumer", "outcome"],
        )
        .unwrap();
        let handler_seconds = HistogramVec::new(
            HistogramOpts::new("handler_duration_seconds", "Time a consumer's handler took, including its transaction")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["consumer"],
        )
        .unwrap();
        let lag_seconds = HistogramVec::new(
            HistogramOpts::new("event_lag_seconds", "From an event's occurred_at to the start of its handling")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]),
            &["consumer"],
        )
        .unwrap();
        let outbox_depth = IntGauge::new("outbox_depth", "Outbox rows not yet published (counted up to 100,000)").unwrap();
        let outbox_oldest =
            Gauge::new("outbox_oldest_age_seconds", "Age of the oldest unpublished outbox row (0 when empty)").unwrap();
        let outbox_parked = IntGauge::new(
            "outbox_parked",
            "Outbox rows NATS refused for good, parked until retried (paystream outbox parked)",
        )
        .unwrap();
        let outbox_relayed =
            IntCounterVec::new(Opts::new("outbox_relayed_total", "Outbox rows published and deleted, by subject"), &["subject"])
                .unwrap();
        for c in [
            Box::new(published.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(consumed.clone()),
            Box::new(handler_seconds.clone()),
            Box::new(lag_seconds.clone()),
            Box::new(outbox_depth.clone()),
            Box::new(outbox_oldest.clone()),
            Box::new(outbox_parked.clone()),
            Box::new(outbox_relayed.clone()),
        ] {
            r.register(c).expect("bus metrics are registered once");
        }
        Metrics {
            published,
            consumed,
            handler_seconds,
            lag_seconds,
            outbox_depth,
            outbox_oldest,
            outbox_parked,
            outbox_relayed,
        }
    })
}

pub(crate) fn published(subject: &str, duplicate: bool) {
    m().published.with_label_values(&[subject, if duplicate { "true" } else { "false" }]).inc();
}

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ack,
    Duplicate,
    Nak,
    Term,
    Dlq,
    /// A dead letter could not be stored (the DLQ stream unavailable): the message was nak'ed and comes back.
    DlqFailed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ack => "ack",
            Outcome::Duplicate => "duplicate",
            Outcome::Nak => "nak",
            Outcome::Term => "term",
            Outcome::Dlq => "dlq",
            Outcome::DlqFailed => "dlq_failed",
        }
    }
}

pub(crate) fn consumed(consumer: &str, outcome: Outcome) {
    m().consumed.with_label_values(&[consumer, outcome.as_str()]).inc();
}

pub(crate) fn handler_seconds(consumer: &str, secs: f64) {
    m().handler_seconds.with_label_values(&[consumer]).observe(secs);
}

pub(crate) fn lag_seconds(consumer: &str, secs: f64) {
    m().lag_seconds.with_label_values(&[consumer]).observe(secs.max(0.0));
}

pub(crate) fn outbox(depth: i64, oldest_age_seconds: f64, parked: i64) {
    m().outbox_depth.set(depth);
    m().outbox_oldest.set(oldest_age_seconds);
    m().outbox_parked.set(parked);
}

pub(crate) fn relayed(subject: &str, n: u64) {
    m().outbox_relayed.with_label_values(&[subject]).inc_by(n);
}

/// Makes every bus metric family appear in `/metrics` from the start (at zero), so dashboards and alerts can
/// rely on them before the first event.
pub fn register() {
    for s in crate::Subject::ALL {
        m().published.with_label_values(&[s.name(), "false"]);
        m().published.with_label_values(&[s.name(), "true"]);
        m().outbox_relayed.with_label_values(&[s.name()]);
    }
}

/// Shows a consumer's outcome series at zero from its start.
pub(crate) fn register_consumer(consumer: &str) {
    for o in [Outcome::Ack, Outcome::Duplicate, Outcome::Nak, Outcome::Term, Outcome::Dlq, Outcome::DlqFailed] {
        m().consumed.with_label_values(&[consumer, o.as_str()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subject_is_exported_from_the_start() {
        register();
        let text = observability::render_metrics();
        for s in crate::Subject::ALL {
            for family in [
                format!(r#"paystream_events_published_total{{duplicate="false",subject="{}"}}"#, s.name()),
                format!(r#"paystream_events_published_total{{duplicate="true",subject="{}"}}"#, s.name()),
                format!(r#"paystream_outbox_relayed_total{{subject="{}"}}"#, s.name()),
            ] {
                assert!(text.contains(&family), "{family} missing");
            }
        }
    }
}
