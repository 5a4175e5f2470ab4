//! Timeout close: orders nobody paid before their `pay_deadline` are closed — at WeChat first, then here.
//!
//! One pass ([`TimeoutCloser::close_due`]) reads the oldest due orders (`trade_state = 0 AND pay_deadline <= now`,
//! oldest deadline first, at most `timeout.batch`). For each:
//!
//! 1. If it has an open (waiting) payment, close its WeChat transaction first (`close`, idempotent at WeChat). Only
//!    a closed (or never created) WeChat transaction guarantees that no money can arrive for the order afterwards.
//!    WeChat saying it was paid (`ORDERPAID`, or any other refusal followed by a query answering `SUCCESS`) means the
//!    payment path must run instead: the query answer is published on `wechat.transaction` (source `query`) and the
//!    order is left alone. A transient failure leaves the order for the next pass.
//! 2. Then, in one transaction: lock the order; only if it still waits for payment, has no paid payment and its open
//!    payment is the one closed at WeChat: order 0 → -1, payment 0 → -1 (raw state `CLOSED`), and `order.status`,
//!    `payment.status` and an `order_closed` subscribe-message request into the outbox. Anything else (paid or
//!    closed meanwhile) changes nothing.
//!
//! An order a pass could not close (any skip reason) is remembered in `order_close_attempt`: the next attempt
//! waits `interval`, doubled each time up to [`MAX_RETRY_DELAY`]; after [`ATTENTION_AFTER`] attempts refused for a
//! reason that is not an outage it waits for a person (`paystream attention`) and leaves the passes, so a handful of
//! orders WeChat keeps refusing can neither fill every batch nor cost WeChat calls every pass.
//!
//! The race with a user paying at the deadline is decided by WeChat: either the payment wins (close → `ORDERPAID`,
//! the order gets paid) or the close wins (WeChat refuses the payment). A payment that still reaches a closed order
//! becomes a `refund.requested` in the order processor, so money is never kept for a closed order.
//!
//! ## Scaling: the deadline index, not JetStream scheduled messages
//!
//! Due orders are found through the partial index `homestay_order_unpaid_deadline (pay_deadline) WHERE
//! trade_state = 0`: it holds only unpaid orders, so its size follows the open orders, not the order history, and
//! a pass reads the first `batch` entries of a range scan. Scheduled messages (one delayed message per order) would
//! need nats-server ≥ 2.12's per-message scheduling, one more moving part per order, and a reconciliation between
//! the schedule and the table anyway (an order created while NATS is down, a deadline changed); the table is
//! already the source of truth and the index makes asking it cheap. Measured (`processors/tests/timeout.rs`,
//! `the_due_orders_query_uses_the_deadline_index_with_100k_open_orders`, EXPLAIN ANALYZE on the private test
//! cluster, PostgreSQL 15, 2-core build machine, Nov 2026): with 100,000 open orders, all due, next to 100,000 paid
//! ones, the pass's query (LIMIT 100) is an Index Scan on `homestay_order_unpaid_deadline` reading 5 buffers:
//! 0.05 ms execution, 0.3 ms planning, 0.6-0.8 ms for the whole call through diesel (best of 5). It reads only the
//! first `batch` index entries, so the cost does not grow with the number of open orders. The pass itself is bound
//! by WeChat: 50 orders closed in one pass in ~0.26 s against the sandbox (debug build, ~195 orders/s, one close
//! call and one transaction per order, sequential); `run` starts the next pass at once after a full batch, so a
//! backlog drains at that rate; against real WeChat at ~50 ms per close that is ~20 orders/s (72,000 an hour),
//! not measured here.
//!
//! ## Several replicas
//!
//! Passes may run concurrently in several processes. Correctness does not depend on exclusivity: WeChat's close is
//! idempotent, the query answer is published with a deterministic message id (the same answer twice is one event),
//! and the local close is a conditional transition under the order's row lock, so at most one replica closes an
//! order and enqueues its events (one `order_closed` request, whatever the number of replicas or passes). We do
//! not claim batches with `FOR UPDATE SKIP LOCKED`: a row lock only lives as long as its transaction, and holding a
//! transaction (and the order's lock, which the payment path also needs) across WeChat calls is exactly what must
//! not happen; without a lease column a claim would not survive its short transaction. The price of concurrency
//! is a duplicate idempotent close call per racing replica (replicas add availability, not throughput).

use std::sync::OnceLock;
use std::time::Duration;

use bus::Publisher;
use bus::events::{
    MiniprogramNotify, NotificationRequest, NotifyParams, NotifyTemplate, OrderStatusChanged, PaymentStatusChanged,
};
use chrono::{DateTime, Utc};
use prometheus::{IntCounter, IntCounterVec, Opts};
use serde::Deserialize;
use storage::{
    AsyncConnection, Conn, OrderSn, PayStatus, PaymentSn, PgPool, StorageError, TradeState, UserId, orders, payments,
};
use tokio_util::sync::CancellationToken;

/// `[timeout]` of `paystream.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutConfig {
    /// Time between two passes.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// At most this many due orders per pass (a full pass is followed at once by another).
    #[serde(default = "default_batch")]
    pub batch: i64,
    /// Whether this process closes expired orders at all.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
}

fn default_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_batch() -> i64 {
    100
}
fn default_enabled() -> bool {
    true
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        TimeoutConfig { interval: default_interval(), batch: default_batch(), enabled: default_enabled() }
    }
}

impl TimeoutConfig {
    /// Checks every value; the message names the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.interval < Duration::from_millis(10) || self.interval > Duration::from_secs(3600) {
            return Err(format!("timeout.interval ({:?}) must be between 10ms and 1 hour", self.interval));
        }
        if !(1..=10_000).contains(&self.batch) {
            return Err(format!("timeout.batch ({}) must be between 1 and 10000", self.batch));
        }
        Ok(())
    }
}

/// What one pass did. Every due order is counted once, in `closed`, `already_settled` or one skip reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloseReport {
    /// Due orders read.
    pub due: usize,
    /// Closed by this pass (order -1, payment -1, events enqueued).
    pub closed: usize,
    /// Not closed because WeChat or our database says it was paid; the payment path completes it.
    pub paid_meanwhile: usize,
    /// WeChat did not answer (5xx, 429, timeout): retried next pass.
    pub wechat_unavailable: usize,
    /// WeChat refused the close and the query did not settle it either (a configuration or signature problem,
    /// or a transaction still being paid): retried next pass, logged.
    pub wechat_error: usize,
    /// WeChat was paid but the report could not be published: retried next pass.
    pub publish_failed: usize,
    /// A different open payment appeared between the WeChat close and the local close: retried next pass.
    pub payment_changed: usize,
    /// No longer waiting when locked (closed by another replica, or moved on): nothing to do.
    pub already_settled: usize,
    /// Orders waiting for a person after this pass (all of them, not only this pass's): see [`ATTENTION_AFTER`].
    pub attention: i64,
}

/// After this many closing attempts refused for a reason that is not an outage (WeChat says paid but the payment
/// path does not complete the order, WeChat refuses the close, the open payment keeps changing), an order waits for
/// a person (`paystream attention list`) and leaves the passes. With the growing delays between attempts
/// (`timeout.interval`, doubled each time, at most [`MAX_RETRY_DELAY`]) that is about five minutes of trying.
pub const ATTENTION_AFTER: i32 = 6;
/// The longest wait between two attempts to close one order.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(600);

impl CloseReport {
    /// Orders left for a later pass.
    pub fn skipped(&self) -> usize {
        self.wechat_unavailable + self.wechat_error + self.publish_failed + self.payment_changed
    }
}

/// Closes unpaid orders past their deadline. Cheap to share: clone the parts, not the closer.
pub struct TimeoutCloser {
    pool: PgPool,
    publisher: Publisher,
    pay: wechat::PayClient,
    appid: String,
    mchid: String,
    cfg: TimeoutConfig,
}

/// What WeChat says about a payment we want to close.
enum AtWechat {
    /// Closed now, or no transaction exists: nobody can pay it any more.
    Closed,
    /// Paid: the report was published, the payment path completes the order.
    Paid,
    /// Try again next pass.
    Skip(&'static str),
}

/// What the local transaction did.
enum Local {
    Closed,
    PaidMeanwhile,
    PaymentChanged,
    AlreadySettled,
}

impl TimeoutCloser {
    /// `appid` and `mchid` come from `pay`'s settings (the merchant whose transactions we close).
    pub fn new(pool: PgPool, publisher: Publisher, pay: wechat::PayClient, cfg: TimeoutConfig) -> Self {
        let (appid, mchid) = (pay.settings().appid.clone(), pay.settings().mchid.clone());
        register_metrics();
        TimeoutCloser { pool, publisher, pay, appid, mchid, cfg }
    }

    /// Runs a pass every `interval` until `shutdown` (a full batch is followed by another pass at once). Errors of a
    /// pass (the database is down) are logged and the next pass tries again. With `enabled = false` it only waits
    /// for `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        if !self.cfg.enabled {
            // Idle rather than return: a role of `paystream all` that ends early reads as a failure.
            tracing::info!("timeout close disabled (timeout.enabled = false)");
            shutdown.cancelled().await;
            return;
        }
        loop {
            let full = match self.close_due(Utc::now()).await {
                Ok(r) => {
                    if r.due > 0 {
                        tracing::info!(
                            due = r.due,
                            closed = r.closed,
                            paid = r.paid_meanwhile,
                            skipped = r.skipped(),
                            "timeout pass"
                        );
                    }
                    // Only hurry when the pass settled orders for good: a batch of orders WeChat keeps refusing, or
                    // paid at WeChat and still on their way through the payment path, must not spin.
                    r.due as i64 >= self.cfg.batch && r.closed + r.already_settled > 0
                }
                Err(e) => {
                    tracing::warn!(error = %e, "timeout pass failed; retrying after the interval");
                    false
                }
            };
            if full {
                if shutdown.is_cancelled() {
                    return;
                }
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.cfg.interval) => {}
            }
        }
    }

    /// One pass over the orders due at `now`. Deterministic: tests drive passes with a `now` past the deadline.
    pub async fn close_due(&self, now: DateTime<Utc>) -> Result<CloseReport, StorageError> {
        let due = {
            let mut conn = self.pool.get().await?;
            orders::unpaid_past_deadline(&mut conn, now, self.cfg.batch).await?
        };
        let mut report = CloseReport { due: due.len(), ..Default::default() };
        for order in due {
            let sn = order.sn();
            let reason = match self.close_one(&order, &mut report).await? {
                None => continue,
                Some(reason) => reason,
            };
            skipped(&mut report, reason);
            self.defer(&sn, reason, now).await?;
        }
        report.attention = {
            let mut conn = self.pool.get().await?;
            orders::attention_count(&mut conn).await?
        };
        m().attention.set(report.attention);
        Ok(report)
    }

    /// Remembers that `sn` could not be closed: the next attempt waits longer each time, and past
    /// [`ATTENTION_AFTER`] attempts refused for a reason that is not an outage, the order waits for a person.
    async fn defer(&self, sn: &OrderSn, reason: &'static str, now: DateTime<Utc>) -> Result<(), StorageError> {
        let mut conn = self.pool.get().await?;
        let attempts = orders::close_deferred(&mut conn, sn, reason, now, self.cfg.interval, MAX_RETRY_DELAY).await?;
        let outage = matches!(reason, "wechat_unavailable" | "publish_failed");
        if attempts >= ATTENTION_AFTER && !outage {
            let why = match reason {
                "paid_meanwhile" => format!(
                    "WeChat says this order's payment was paid (or refunded), but the payment path has not completed \
                     it after {attempts} closing attempts: look for its report in `paystream dlq list --consumer payment`"
                ),
                "payment_changed" => {
                    format!("its open payment kept changing during {attempts} closing attempts")
                }
                _ => format!(
                    "WeChat refused to close its transaction {attempts} times and its query did not settle it (see \
                     the lifecycle role's logs for WeChat's answer)"
                ),
            };
            tracing::error!(order = %sn, attempts, reason, "order needs a person; left out of the timeout passes");
            orders::needs_attention(&mut conn, sn, &why, now).await?;
        }
        Ok(())
    }

    /// Closes one due order, or says why not (a skip reason).
    async fn close_one(
        &self,
        order: &orders::OrderRow,
        report: &mut CloseReport,
    ) -> Result<Option<&'static str>, StorageError> {
        // The connection goes back to the pool before WeChat is called: never hold one across a remote call.
        let open = {
            let mut conn = self.pool.get().await?;
            payments::find_open_for_order(&mut conn, &order.sn()).await?
        };
        if let Some(p) = &open {
            match self.close_at_wechat(&p.sn).await {
                AtWechat::Closed => {}
                AtWechat::Paid => return Ok(Some("paid_meanwhile")),
                AtWechat::Skip(reason) => return Ok(Some(reason)),
            }
        }
        let expected = open.map(|p| p.sn());
        match self.close_locally(&order.sn(), expected.as_ref()).await? {
            Local::Closed => {
                report.closed += 1;
                m().closed.inc();
                Ok(None)
            }
            Local::PaidMeanwhile => Ok(Some("paid_meanwhile")),
            Local::PaymentChanged => Ok(Some("payment_changed")),
            Local::AlreadySettled => {
                report.already_settled += 1;
                Ok(None)
            }
        }
    }

    async fn close_at_wechat(&self, sn: &str) -> AtWechat {
        let err = match self.pay.close(sn).await {
            Ok(()) => return AtWechat::Closed,
            // The prepay never reached WeChat (or failed there): there is nothing anyone could pay.
            Err(e) if e.code() == Some("ORDER_NOT_EXIST") => return AtWechat::Closed,
            Err(e) if e.is_retryable() => {
                tracing::warn!(pay_sn = sn, error = %e, "WeChat close failed; retrying next pass");
                return AtWechat::Skip("wechat_unavailable");
            }
            Err(e) => e,
        };
        // Refused (ORDERPAID, or anything unexpected): WeChat's own view of the transaction decides.
        let t = match self.pay.query_by_out_trade_no(sn).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(pay_sn = sn, close_error = %err, error = %e, "WeChat refused the close and the query failed");
                return AtWechat::Skip(if e.is_retryable() { "wechat_unavailable" } else { "wechat_error" });
            }
        };
        use wechat::TradeState as W;
        match t.trade_state {
            W::Success | W::Refund => {
                if t.appid != self.appid || t.mchid != self.mchid {
                    tracing::error!(pay_sn = sn, appid = %t.appid, mchid = %t.mchid, "WeChat answered for another merchant");
                    return AtWechat::Skip("wechat_error");
                }
                let report = crate::transaction_report(t);
                match self.publisher.publish(&report.envelope()).await {
                    Ok(_) => {
                        tracing::info!(pay_sn = sn, "paid at WeChat before the close: the payment path completes it");
                        AtWechat::Paid
                    }
                    Err(e) => {
                        tracing::warn!(pay_sn = sn, error = %e, "could not publish WeChat's answer; retrying next pass");
                        AtWechat::Skip("publish_failed")
                    }
                }
            }
            W::Closed | W::Revoked => AtWechat::Closed,
            // Still payable (the user is entering the password): not closed, try again.
            other => {
                tracing::warn!(pay_sn = sn, close_error = %err, state = other.as_str(), "WeChat refused the close");
                AtWechat::Skip("wechat_error")
            }
        }
    }

    /// The local half, in one transaction under the order's row lock. `expected` is the payment closed at WeChat.
    async fn close_locally(&self, sn: &OrderSn, expected: Option<&PaymentSn>) -> Result<Local, StorageError> {
        let mut conn = self.pool.get().await?;
        conn.transaction::<_, StorageError, _>(async |c| {
            // Lock order: order then payment. The payment processor locks only payments and the order processor only
            // orders in their transactions, so this order cannot deadlock with them.
            let Some(order) = orders::lock_by_sn(c, sn).await? else {
                return Ok(Local::AlreadySettled);
            };
            match order.state() {
                TradeState::WaitPay => {}
                TradeState::WaitUse | TradeState::Used | TradeState::Refunded | TradeState::Expired => {
                    return Ok(Local::PaidMeanwhile);
                }
                TradeState::Cancelled => return Ok(Local::AlreadySettled),
            }
            let all = payments::list_for_order(c, sn).await?;
            // Paid here but the order processor has not caught up yet: the order is about to become waitUse.
            if all.iter().any(|p| matches!(p.status(), PayStatus::Paid | PayStatus::Refunded)) {
                return Ok(Local::PaidMeanwhile);
            }
            let open = all.iter().find(|p| p.status() == PayStatus::Waiting);
            if open.map(|p| p.sn.as_str()) != expected.map(PaymentSn::as_str) {
                // A payment WeChat was not asked to close: closing the order now could leave it payable.
                return Ok(Local::PaymentChanged);
            }
            let user = UserId(order.user_id);
            if let Some(p) = open {
                let psn = p.sn();
                let locked = payments::lock_by_sn(c, &psn).await?;
                if locked.as_ref().map(|p| p.status()) != Some(PayStatus::Waiting) {
                    return Ok(Local::PaidMeanwhile);
                }
                payments::transition(c, &psn, PayStatus::Waiting, PayStatus::Closed, "CLOSED").await?;
                let changed = PaymentStatusChanged {
                    payment_sn: psn,
                    order_sn: sn.clone(),
                    user_id: user,
                    from: PayStatus::Waiting,
                    to: PayStatus::Closed,
                    pay_total: p.total(),
                    transaction_id: None,
                    pay_time: None,
                };
                bus::enqueue(c, &changed.envelope()).await?;
            }
            orders::transition(c, sn, TradeState::WaitPay, TradeState::Cancelled).await?;
            let changed = OrderStatusChanged {
                order_sn: sn.clone(),
                user_id: user,
                from: TradeState::WaitPay,
                to: TradeState::Cancelled,
            };
            bus::enqueue(c, &changed.envelope()).await?;
            notify_closed(c, &order, user).await?;
            Ok(Local::Closed)
        })
        .await
    }
}

async fn notify_closed(c: &mut Conn, order: &orders::OrderRow, user: UserId) -> Result<(), StorageError> {
    let params = NotifyParams {
        order_sn: order.sn(),
        title: order.title.clone(),
        amount: order.total(),
        live_start: order.live_start_date,
        live_end: order.live_end_date,
        trade_code: order.trade_code.clone(),
        live_people_num: order.live_people_num,
    };
    let req = NotificationRequest { template: NotifyTemplate::OrderClosed, user_id: user, params };
    // The envelope id is derived from (order, template, channel): one request per order, whatever happens.
    bus::enqueue(c, &MiniprogramNotify(req).envelope()).await
}

fn skipped(report: &mut CloseReport, reason: &'static str) {
    match reason {
        "paid_meanwhile" => report.paid_meanwhile += 1,
        "wechat_unavailable" => report.wechat_unavailable += 1,
        "publish_failed" => report.publish_failed += 1,
        "payment_changed" => report.payment_changed += 1,
        _ => report.wechat_error += 1,
    }
    m().skipped.with_label_values(&[reason]).inc();
}

struct Metrics {
    closed: IntCounter,
    skipped: IntCounterVec,
    attention: prometheus::IntGauge,
}

fn m() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let closed =
            IntCounter::new("orders_closed_total", "Unpaid orders closed after their payment deadline").unwrap();
        let skipped = IntCounterVec::new(
            Opts::new(
                "timeout_close_skipped_total",
                "Due orders a timeout pass did not close, by reason (paid_meanwhile, wechat_unavailable, wechat_error, \
                 publish_failed, payment_changed)",
            ),
            &["reason"],
        )
        .unwrap();
        let attention = prometheus::IntGauge::new(
            "orders_needing_attention",
            "Unpaid orders the timeout closer gave up on until a person looks at them (paystream attention list)",
        )
        .unwrap();
        let r = observability::registry();
        r.register(Box::new(closed.clone())).expect("timeout metrics are registered once");
        r.register(Box::new(skipped.clone())).expect("timeout metrics are registered once");
        r.register(Box::new(attention.clone())).expect("timeout metrics are registered once");
        for reason in ["paid_meanwhile", "wechat_unavailable", "wechat_error", "publish_failed", "payment_changed"] {
            skipped.with_label_values(&[reason]);
        }
        Metrics { closed, skipped, attention }
    })
}

/// Makes the timeout families visible in `/metrics` from the start.
pub fn register_metrics() {
    let _ = m();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation_name_the_key() {
        let cfg = TimeoutConfig::default();
        assert_eq!((cfg.interval, cfg.batch, cfg.enabled), (Duration::from_secs(5), 100, true));
        cfg.validate().unwrap();
        let bad = TimeoutConfig { batch: 0, ..TimeoutConfig::default() };
        assert!(bad.validate().unwrap_err().starts_with("timeout.batch"));
        let bad = TimeoutConfig { interval: Duration::ZERO, ..TimeoutConfig::default() };
        assert!(bad.validate().unwrap_err().starts_with("timeout.interval"));
    }

    #[test]
    fn the_section_parses_humantime_and_refuses_unknown_keys() {
        use figment::Figment;
        use figment::providers::{Format as _, Toml};
        let parse = |toml: &str| {
            Figment::from(Toml::string(toml)).extract_inner::<TimeoutConfig>("timeout").map_err(|e| e.to_string())
        };
        let cfg = parse("[timeout]\ninterval = \"250ms\"\nbatch = 20\nenabled = false\n").unwrap();
        assert_eq!((cfg.interval, cfg.batch, cfg.enabled), (Duration::from_millis(250), 20, false));
        assert_eq!(parse("[timeout]\n").unwrap().batch, 100);
        assert!(parse("[timeout]\nintervall = \"1s\"\n").unwrap_err().contains("intervall"));
        assert!(parse("[timeout]\ninterval = \"soon\"\n").is_err());
    }
}
