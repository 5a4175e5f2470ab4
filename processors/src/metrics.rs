//! The processors' metrics, declared once, with bounded labels.

use std::sync::OnceLock;

use prometheus::{IntCounterVec, IntGauge, Opts};

struct Metrics {
    payment_transitions: IntCounterVec,
    order_transitions: IntCounterVec,
    rejected: IntCounterVec,
    refunds_requested: IntCounterVec,
    refunds: IntCounterVec,
    refund_queries: IntCounterVec,
    refunds_unsettled: IntGauge,
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
        let refunds = IntCounterVec::new(
            Opts::new(
                "refunds_total",
                "Refunds by outcome: requested_at_wechat (WeChat accepted the request), succeeded, failed (CLOSED or \
                 ABNORMAL at WeChat: an operator must act)",
            ),
            &["outcome"],
        )
        .unwrap();
        let refund_queries = IntCounterVec::new(
            Opts::new("refund_queries_total", "Refund queries by the refund reconciler, by WeChat's answer or error"),
            &["outcome"],
        )
        .unwrap();
        let refunds_unsettled =
            IntGauge::new("refunds_unsettled", "Refunds WeChat has not settled yet (requested or processing)").unwrap();
        let r = observability::registry();
        for c in [&payment_transitions, &order_transitions, &rejected, &refunds_requested, &refunds, &refund_queries] {
            r.register(Box::new(c.clone())).expect("processor metrics are registered once");
        }
        r.register(Box::new(refunds_unsettled.clone())).expect("processor metrics are registered once");
        // Every label value known in advance is exported at 0 from the start: a counter that has never moved is
        // still a series that dashboards and alerts can read.
        for outcome in ["requested_at_wechat", "succeeded", "failed"] {
            refunds.with_label_values(&[outcome]);
        }
        for reason in ["order_closed", "paid_after_close"] {
            refunds_requested.with_label_values(&[reason]);
        }
        for reason in [
            "unknown_payment",
            "amount_mismatch",
            "foreign_merchant",
            "currency_mismatch",
            "unknown_state",
            "unknown_refund",
            "refund_mismatch",
            "refund_unpaid",
        ] {
            rejected.with_label_values(&[reason]);
        }
        for outcome in ["SUCCESS", "PROCESSING", "CLOSED", "ABNORMAL", "not_at_wechat", "error"] {
            refund_queries.with_label_values(&[outcome]);
        }
        Metrics {
            payment_transitions,
            order_transitions,
            rejected,
            refunds_requested,
            refunds,
            refund_queries,
            refunds_unsettled,
        }
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

pub(crate) fn refund_outcome(outcome: &str) {
    m().refunds.with_label_values(&[outcome]).inc();
}

pub(crate) fn refund_query(outcome: &str) {
    m().refund_queries.with_label_values(&[outcome]).inc();
}

pub(crate) fn refunds_unsettled(n: i64) {
    m().refunds_unsettled.set(n);
}

/// Makes the families visible in `/metrics` from the start.
pub fn register() {
    let _ = m();
}
