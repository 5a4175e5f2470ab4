//! The processors' metrics, declared once, with bounded labels.

use std::sync::OnceLock;

use prometheus::{IntCounterVec, Opts};

struct Metrics {
    payment_transitions: IntCounterVec,
    order_transitions: IntCounterVec,
    rejected: IntCounterVec,
    refunds_requested: IntCounterVec,
}

fn m() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let payment_transitions = IntCounterVec::new(
            Opts::new("payment_transitions_total", "Payment status changes, by from and to status"),
            &["from", "to"],
        )
        .unwrap();
        let order_transitions = IntCounterVec::new(
            Opts::new("order_transitions_total", "Order state changes, by from and to state"),
            &["from", "to"],
        )
        .unwrap();
        let rejected = IntCounterVec::new(
            Opts::new(
                "wechat_reports_rejected_total",
                "WeChat transaction reports refused by the payment processor (dead-lettered), by reason",
            ),
            &["reason"],
        )
        .unwrap();
        let refunds_requested = IntCounterVec::new(
            Opts::new("refunds_requested_total", "Refunds requested by the pipeline, by reason"),
            &["reason"],
        )
        .unwrap();
        let r = observability::registry();
        for c in [&payment_transitions, &order_transitions, &rejected, &refunds_requested] {
            r.register(Box::new(c.clone())).expect("processor metrics are registered once");
        }
        Metrics { payment_transitions, order_transitions, rejected, refunds_requested }
    })
}

pub(crate) fn payment_transition(from: storage::PayStatus, to: storage::PayStatus) {
    m().payment_transitions.with_label_values(&[&format!("{from:?}"), &format!("{to:?}")]).inc();
}

pub(crate) fn order_transition(from: storage::TradeState, to: storage::TradeState) {
    m().order_transitions.with_label_values(&[&format!("{from:?}"), &format!("{to:?}")]).inc();
}

pub(crate) fn rejected(reason: &str) {
    m().rejected.with_label_values(&[reason]).inc();
}

pub(crate) fn refund_requested(reason: &str) {
    m().refunds_requested.with_label_values(&[reason]).inc();
}

/// Makes the families visible in `/metrics` from the start.
pub fn register() {
    let _ = m();
}
