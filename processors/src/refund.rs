//! Refunds, in three parts that share one state machine (`storage::RefundStatus`):
//!
//! - [`RefundRequester`] (consumer `refund`, on `refund.requested`): writes the payment's one refund row, then asks
//!   WeChat's refund API for it with `out_refund_no` = the refund sn, which is derived from the payment sn. A retry
//!   after a timeout, a crash or a redrive asks for the same refund, and WeChat answers with the refund it already
//!   has: a payment is never refunded twice. WeChat's answer goes to `wechat.refund`.
//! - [`RefundProcessor`] (consumer `refund-status`, on `wechat.refund`, fed by `REFUND.*` callbacks through the
//!   ingress, by the requester and by the reconciler): moves the refund to processing, succeeded or failed, only
//!   along the domain's arrows. On success, in the same transaction: the payment paid → refunded, the order
//!   waitUse → refunded when the user asked for it, and a `refund_success` message to the user.
//! - [`RefundReconciler`]: asks WeChat (refund query) about refunds it has not settled after `query_after`, so a
//!   lost `REFUND.SUCCESS` callback still completes the refund.

use std::time::Duration;

use bus::events::{
    NotifyTemplate, OrderStatusChanged, PaymentStatusChanged, RefundReason, RefundRequested, ReportSource,
    WechatRefundReported,
};
use bus::{Delivery, Envelope, Handled, Handler, HandlerError, Publisher};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use storage::refunds::{self, NewRefund, RefundRow, WechatRefund};
use storage::{
    AsyncConnection, DomainError, PayStatus, PgPool, RefundSn, RefundStatus, StorageError, TradeState, Transition,
    orders, payments,
};
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::metrics::Rejection;

/// The durable consumer of `refund.requested`.
pub const REQUEST_CONSUMER: &str = "refund";
/// The durable consumer of `wechat.refund`.
pub const STATUS_CONSUMER: &str = "refund-status";

/// The `[refund]` section of `paystream.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefundConfig {
    /// Run the refund reconciler at all (the two consumers always run with the lifecycle processor).
    pub reconcile: bool,
    /// Ask WeChat about a refund it has not settled once it has been this long without news, and again after
    /// each further period. WeChat settles most refunds within minutes; bank cards can take days.
    #[serde(with = "humantime_serde")]
    pub query_after: Duration,
    /// How often a reconciliation pass runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Refunds asked about per pass.
    pub batch: i64,
}

impl Default for RefundConfig {
    fn default() -> Self {
        RefundConfig {
            reconcile: true,
            query_after: Duration::from_secs(5 * 60),
            interval: Duration::from_secs(30),
            batch: 50,
        }
    }
}

impl RefundConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.query_after.is_zero() {
            return Err("refund.query_after must be positive".into());
        }
        if self.interval.is_zero() {
            return Err("refund.interval must be positive".into());
        }
        if self.batch < 1 {
            return Err("refund.batch must be at least 1".into());
        }
        Ok(())
    }
}

fn permanent(reason: Rejection, detail: String) -> HandlerError {
    metrics::rejected(reason);
    HandlerError::Permanent(detail)
}

fn wechat_error(sn: &RefundSn, e: wechat::PayError) -> HandlerError {
    if e.is_retryable() {
        HandlerError::Transient(format!("refund {sn}: {e}"))
    } else {
        HandlerError::Permanent(format!("refund {sn} refused by WeChat: {e}"))
    }
}

/// A signed answer of the refund API as the event the refund processor consumes.
pub fn refund_report(r: wechat::Refund) -> WechatRefundReported {
    WechatRefundReported {
        source: ReportSource::Query,
        notification_id: None,
        mchid: None,
        out_trade_no: r.out_trade_no,
        out_refund_no: r.out_refund_no,
        refund_id: r.refund_id,
        status: r.status.as_str().to_owned(),
        success_time: r.success_time.as_deref().and_then(wechat::wechat_time),
        amount_refund: r.amount.refund,
        amount_total: r.amount.total,
    }
}

/// Handler for the `refund` consumer.
pub struct RefundRequester {
    pool: PgPool,
    publisher: Publisher,
    pay: wechat::PayClient,
}

impl RefundRequester {
    pub fn new(pool: PgPool, publisher: Publisher, pay: wechat::PayClient) -> Self {
        RefundRequester { pool, publisher, pay }
    }
}

impl Handler for RefundRequester {
    type Event = RefundRequested;

    async fn handle(&self, event: Envelope<RefundRequested>, _: &Delivery) -> Result<Handled, HandlerError> {
        let req = event.payload;
        let mut conn = self.pool.get().await.map_err(StorageError::from)?;
        let refund = conn
            .transaction::<_, HandlerError, _>(async |c| {
                let payment = payments::lock_by_sn(c, &req.payment_sn).await?.ok_or_else(|| {
                    permanent(Rejection::UnknownPayment, format!("refund asked for unknown payment {}", req.payment_sn))
                })?;
                match payment.status() {
                    // Paid here, or closed here but paid at WeChat (the payment processor asks for those).
                    PayStatus::Paid | PayStatus::Closed => {}
                    PayStatus::Refunded => return Ok(None),
                    PayStatus::Waiting => {
                        return Err(permanent(
                            Rejection::RefundUnpaid,
                            format!("refund asked for {} which is still waiting for its money", req.payment_sn),
                        ));
                    }
                }
                let user_requested = req.reason == RefundReason::UserRequested;
                let (row, _) = refunds::insert_or_get(c, &NewRefund::full(&payment, user_requested)).await?;
                Ok(Some(row))
            })
            .await?;
        let Some(refund) = refund.filter(|r| r.status().is_open()) else {
            return Ok(Handled::Duplicate);
        };
        let sn = refund.sn();
        let reason = if refund.user_requested() { "用户申请退款" } else { "订单已关闭" };
        let answer = self
            .pay
            .create_refund(&wechat::RefundRequest {
                transaction_id: None,
                out_trade_no: Some(refund.payment_sn.clone()),
                out_refund_no: refund.sn.clone(),
                reason: Some(reason.to_owned()),
                notify_url: Some(self.pay.settings().notify_url.clone()),
                funds_account: None,
                amount: wechat::RefundRequestAmount {
                    refund: refund.refund_total,
                    total: refund.pay_total,
                    currency: "CNY".to_owned(),
                },
            })
            .await
            .map_err(|e| wechat_error(&sn, e))?;
        metrics::refund_outcome("requested_at_wechat");
        tracing::info!(refund = %sn, payment = %refund.payment_sn, status = answer.status.as_str(), "refund accepted by WeChat");
        // One path into the refund state: WeChat's answer goes where its callbacks go. A lost publish is retried
        // with the request (WeChat answers the same refund again).
        self.publisher
            .publish(&refund_report(answer).envelope())
            .await
            .map_err(|e| HandlerError::Transient(format!("refund {sn}: WeChat's answer not published: {e}")))?;
        Ok(Handled::Done)
    }
}

/// Handler for the `refund-status` consumer.
pub struct RefundProcessor {
    pool: PgPool,
    mchid: String,
}

impl RefundProcessor {
    pub fn new(pool: PgPool, mchid: &str) -> Self {
        RefundProcessor { pool, mchid: mchid.to_owned() }
    }
}

impl Handler for RefundProcessor {
    type Event = WechatRefundReported;

    async fn handle(&self, event: Envelope<WechatRefundReported>, _: &Delivery) -> Result<Handled, HandlerError> {
        let r = event.payload;
        if r.mchid.as_deref().is_some_and(|m| m != self.mchid) {
            return Err(permanent(
                Rejection::ForeignMerchant,
                format!("refund report for mchid {:?} is not ours", r.mchid),
            ));
        }
        let sn = RefundSn::parse(&r.out_refund_no)
            .map_err(|_| permanent(Rejection::UnknownRefund, format!("unknown refund {:?}", r.out_refund_no)))?;
        let to = match r.status.as_str() {
            "SUCCESS" => RefundStatus::Succeeded,
            "PROCESSING" => RefundStatus::Processing,
            "CLOSED" | "ABNORMAL" => RefundStatus::Failed,
            other => {
                return Err(permanent(Rejection::UnknownState, format!("unknown refund status {other:?} for {sn}")));
            }
        };
        let wechat = WechatRefund {
            refund_id: Some(r.refund_id.clone()),
            status: r.status.clone(),
            success_time: r.success_time,
        };
        let mut conn = self.pool.get().await.map_err(StorageError::from)?;
        conn.transaction::<_, HandlerError, _>(async |c| {
            let row = refunds::find_by_sn(c, &sn)
                .await?
                .ok_or_else(|| permanent(Rejection::UnknownRefund, format!("unknown refund {sn}")))?;
            if row.payment_sn != r.out_trade_no || row.refund_total != r.amount_refund || row.pay_total != r.amount_total
            {
                return Err(permanent(
                    Rejection::RefundMismatch,
                    format!(
                        "WeChat reports refund {sn} of {} fen for {} ({} fen), we asked {} of {} ({} fen)",
                        r.amount_refund, r.out_trade_no, r.amount_total, row.refund_total, row.payment_sn, row.pay_total
                    ),
                ));
            }
            match refunds::settle(c, &sn, to, &wechat).await {
                Ok(Transition::Changed) => {}
                Ok(Transition::Unchanged) => return Ok(Handled::Duplicate),
                // A report older than what we know (PROCESSING after SUCCESS): stale, nothing to do.
                Err(StorageError::Domain(DomainError::Refused { .. })) => return Ok(Handled::Duplicate),
                Err(e) => return Err(e.into()),
            }
            match to {
                RefundStatus::Succeeded => succeeded(c, &row).await?,
                RefundStatus::Failed => {
                    metrics::refund_outcome("failed");
                    tracing::error!(refund = %sn, payment = %row.payment_sn, status = %r.status, "WeChat could not pay the refund back: an operator must act (merchant console)");
                }
                RefundStatus::Processing | RefundStatus::Requested => {}
            }
            Ok(Handled::Done)
        })
        .await
    }
}

/// The money is back with the user: payment paid → refunded, the order refunded if the user asked, the user told.
async fn succeeded(c: &mut storage::Conn, row: &RefundRow) -> Result<(), HandlerError> {
    let payment_sn = row.payment_sn();
    let payment = payments::lock_by_sn(c, &payment_sn)
        .await?
        .ok_or_else(|| HandlerError::Permanent(format!("refund {} for unknown payment {payment_sn}", row.sn)))?;
    // A payment closed here but paid at WeChat stays closed: the refund row is the record of money in and out.
    if payment.status() == PayStatus::Paid {
        payments::transition(c, &payment_sn, PayStatus::Paid, PayStatus::Refunded, "REFUND").await?;
        let changed = PaymentStatusChanged {
            payment_sn: payment_sn.clone(),
            order_sn: payment.order_sn(),
            user_id: storage::UserId(payment.user_id),
            from: PayStatus::Paid,
            to: PayStatus::Refunded,
            pay_total: payment.total(),
            transaction_id: payment.transaction_id.clone(),
            pay_time: payment.pay_time,
        };
        bus::enqueue(c, &changed.envelope()).await?;
        metrics::payment_transition(PayStatus::Paid, PayStatus::Refunded);
    }
    let order_sn = row.order_sn();
    let order = orders::lock_by_sn(c, &order_sn)
        .await?
        .ok_or_else(|| HandlerError::Permanent(format!("refund {} for unknown order {order_sn}", row.sn)))?;
    if row.user_requested() {
        if order.state() == TradeState::WaitUse {
            orders::transition(c, &order_sn, TradeState::WaitUse, TradeState::Refunded).await?;
            let changed = OrderStatusChanged {
                order_sn: order_sn.clone(),
                user_id: storage::UserId(row.user_id),
                from: TradeState::WaitUse,
                to: TradeState::Refunded,
            };
            bus::enqueue(c, &changed.envelope()).await?;
            metrics::order_transition(TradeState::WaitUse, TradeState::Refunded);
        } else {
            tracing::warn!(order = %order_sn, state = ?order.state(), "refunded at the user's request, but the order is no longer waiting for its stay");
        }
    }
    let mut events = bus::Events::default();
    crate::order::request_notifications(
        c,
        &mut events,
        &order,
        storage::UserId(row.user_id),
        row.total(),
        &[NotifyTemplate::RefundSuccess],
        &[NotifyTemplate::RefundSuccess],
    )
    .await?;
    bus::enqueue_events(c, events).await?;
    metrics::refund_outcome("succeeded");
    tracing::info!(refund = %row.sn, payment = %payment_sn, order = %order_sn, "refund succeeded");
    Ok(())
}

/// What one refund reconciliation pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefundReconcileReport {
    /// Refunds claimed and asked about.
    pub checked: u64,
    /// Answers published to `wechat.refund`.
    pub published: u64,
    /// WeChat has no such refund: the request never reached it (it is still being retried, or is in the DLQ).
    pub not_at_wechat: u64,
    /// Queries or publishes that failed; asked again after `query_after`.
    pub errors: u64,
}

/// Asks WeChat about refunds it has not settled. Several replicas share the work (claims skip locked rows).
pub struct RefundReconciler {
    pool: PgPool,
    publisher: Publisher,
    pay: wechat::PayClient,
    cfg: RefundConfig,
}

impl RefundReconciler {
    pub fn new(pool: PgPool, publisher: Publisher, pay: wechat::PayClient, cfg: RefundConfig) -> Self {
        metrics::register();
        RefundReconciler { pool, publisher, pay, cfg }
    }

    /// One pass at `now`.
    pub async fn reconcile_due(&self, now: DateTime<Utc>) -> Result<RefundReconcileReport, StorageError> {
        let since = now - chrono::Duration::from_std(self.cfg.query_after).unwrap_or(chrono::Duration::MAX);
        let mut conn = self.pool.get().await?;
        metrics::refunds_unsettled(refunds::count_unsettled(&mut conn).await?);
        let claims = conn
            .transaction::<_, StorageError, _>(async |c| refunds::claim_unsettled(c, since, self.cfg.batch).await)
            .await?;
        drop(conn);
        let mut report = RefundReconcileReport::default();
        for refund in claims {
            report.checked += 1;
            let answer = match self.pay.query_refund(&refund.sn).await {
                Ok(a) => a,
                Err(e) if e.code() == Some("RESOURCE_NOT_EXISTS") => {
                    metrics::refund_query("not_at_wechat");
                    report.not_at_wechat += 1;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(refund = %refund.sn, error = %e, "refund query failed; asked again later");
                    metrics::refund_query("error");
                    report.errors += 1;
                    continue;
                }
            };
            metrics::refund_query(answer.status.as_str());
            match self.publisher.publish(&refund_report(answer).envelope()).await {
                Ok(_) => report.published += 1,
                Err(e) => {
                    tracing::warn!(refund = %refund.sn, error = %e, "refund answer not published; asked again later");
                    report.errors += 1;
                }
            }
        }
        if report.checked > 0 {
            tracing::info!(
                checked = report.checked,
                published = report.published,
                not_at_wechat = report.not_at_wechat,
                errors = report.errors,
                "refund reconciliation pass"
            );
        }
        Ok(report)
    }

    /// A pass every `interval` until `shutdown` (waits for shutdown only when disabled).
    pub async fn run(self, shutdown: CancellationToken) {
        if !self.cfg.reconcile {
            shutdown.cancelled().await;
            return;
        }
        let what = "refund reconciliation pass";
        crate::periodic::every(self.cfg.interval, shutdown, what, || self.reconcile_due(Utc::now())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_validation_names_the_key() {
        assert_eq!(RefundConfig::default().validate(), Ok(()));
        let bad = RefundConfig { query_after: Duration::ZERO, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("refund.query_after"));
        let bad = RefundConfig { batch: 0, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("refund.batch"));
    }

    #[test]
    fn the_section_parses_humantime_and_refuses_unknown_keys() {
        use figment::Figment;
        use figment::providers::{Format as _, Toml};
        let parse = |toml: &str| {
            Figment::from(Toml::string(toml)).extract_inner::<RefundConfig>("refund").map_err(|e| e.to_string())
        };
        let c = parse("[refund]\nquery_after = \"2m\"\ninterval = \"5s\"").unwrap();
        assert_eq!(c.query_after, Duration::from_secs(120));
        assert_eq!(c.interval, Duration::from_secs(5));
        assert!(parse("[refund]\nquery_afer = \"2m\"").is_err());
    }
}
