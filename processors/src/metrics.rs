//! The processors' metrics, declared once, with bounded labels.

use std::sync::OnceLock;

use prometheus::{IntCounterVec, IntGauge, Opts};
use storage::{PayStatus, TradeState, Transition};

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
        for reason in Rejection::ALL {
            rejected.with_label_values(&[reason.as_str()]);
        }
        // Every arrow of the two state machines, from the same transition functions the code obeys.
        every_arrow(&PayStatus::ALL, |a, b| a.transition(b) == Ok(Transition::Changed), &payment_transitions);
        every_arrow(&TradeState::ALL, |a, b| a.transition(b) == Ok(Transition::Changed), &order_transitions);
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

/// Exports `counter{from, to}` at 0 for every pair of `states` that `changes`.
fn every_arrow<S: Copy + std::fmt::Debug>(states: &[S], changes: impl Fn(S, S) -> bool, counter: &IntCounterVec) {
    for &from in states {
        for &to in states.iter().filter(|&&to| changes(from, to)) {
            counter.with_label_values(&[&format!("{from:?}"), &format!("{to:?}")]);
        }
    }
}

pub(crate) fn payment_transition(from: storage::PayStatus, to: storage::PayStatus) {
    m().payment_transitions.with_label_values(&[&format!("{from:?}"), &format!("{to:?}")]).inc();
}

pub(crate) fn order_transition(from: storage::TradeState, to: storage::TradeState) {
    m().order_transitions.with_label_values(&[&format!("{from:?}"), &format!("{to:?}")]).inc();
}

/// Why a processor refused a WeChat report (the `reason` label of `wechat_reports_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    UnknownPayment,
    AmountMismatch,
    /// Another merchant's or app's report.
    ForeignMerchant,
    CurrencyMismatch,
    /// A SUCCESS report without the fields paying needs.
    Incomplete,
    /// WeChat says refunded while the payment still waits here.
    RefundedWhileWaiting,
    UnknownState,
    UnknownRefund,
    RefundMismatch,
    RefundUnpaid,
}

impl Rejection {
    const ALL: [Rejection; 10] = [
        Rejection::UnknownPayment,
        Rejection::AmountMismatch,
        Rejection::ForeignMerchant,
        Rejection::CurrencyMismatch,
        Rejection::Incomplete,
        Rejection::RefundedWhileWaiting,
        Rejection::UnknownState,
        Rejection::UnknownRefund,
        Rejection::RefundMismatch,
        Rejection::RefundUnpaid,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Rejection::UnknownPayment => "unknown_payment",
            Rejection::AmountMismatch => "amount_mismatch",
            Rejection::ForeignMerchant => "foreign_merchant",
            Rejection::CurrencyMismatch => "currency_mismatch",
            Rejection::Incomplete => "incomplete",
            Rejection::RefundedWhileWaiting => "refunded_while_waiting",
            Rejection::UnknownState => "unknown_state",
            Rejection::UnknownRefund => "unknown_refund",
            Rejection::RefundMismatch => "refund_mismatch",
            Rejection::RefundUnpaid => "refund_unpaid",
        }
    }
}

pub(crate) fn rejected(reason: Rejection) {
    m().rejected.with_label_values(&[reason.as_str()]).inc();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Dashboards and alerts read these before anything happened: the refund's arrows (Paid → Refunded, WaitUse →
    /// Refunded) and every refusal reason the code can count are there at 0 from the start, and nothing else.
    #[test]
    fn every_arrow_and_reason_the_code_can_count_exists_from_the_start() {
        register();
        let text = observability::render_metrics();
        let series = |family: &str| -> Vec<String> {
            text.lines().filter(|l| l.starts_with(&format!("paystream_{family}{{"))).map(str::to_owned).collect()
        };
        let payments = series("payment_transitions_total");
        for arrow in [("Waiting", "Paid"), ("Waiting", "Closed"), ("Paid", "Refunded")] {
            let want = format!(r#"paystream_payment_transitions_total{{from="{}",to="{}"}}"#, arrow.0, arrow.1);
            assert!(payments.iter().any(|l| l.starts_with(&want)), "{want} missing: {payments:?}");
        }
        assert_eq!(payments.len(), 3, "only allowed arrows: {payments:?}");
        let orders = series("order_transitions_total");
        for arrow in [("WaitPay", "WaitUse"), ("WaitPay", "Cancelled"), ("WaitUse", "Used"), ("WaitUse", "Refunded")] {
            let want = format!(r#"paystream_order_transitions_total{{from="{}",to="{}"}}"#, arrow.0, arrow.1);
            assert!(orders.iter().any(|l| l.starts_with(&want)), "{want} missing: {orders:?}");
        }
        assert_eq!(orders.len(), 5, "only allowed arrows: {orders:?}");
        let rejected = series("wechat_reports_rejected_total");
        assert_eq!(rejected.len(), Rejection::ALL.len(), "{rejected:?}");
        assert!(rejected.iter().any(|l| l.contains(r#"reason="refunded_while_waiting""#)), "{rejected:?}");
    }
}
