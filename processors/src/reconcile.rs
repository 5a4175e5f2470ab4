//! Reconciliation: asks WeChat (query by out_trade_no) about payments still waiting at fixed delays after their
//! prepay, and feeds every answer other than NOTPAY/USERPAYING into `wechat.transaction` — the same path as a
//! callback — so a lost callback still completes the order. The payment processor makes the state change; this
//! worker never touches payment state itself.
//!
//! Each pass claims due payments in a short transaction (`FOR UPDATE SKIP LOCKED`) and schedules their next query
//! before asking WeChat, so several replicas never ask about the same payment at once and a crash does not lead
//! to an immediate second query. Queries are paced (`max_queries_per_second`) so reconciliation never crowds out
//! prepay calls on the merchant's WeChat quota.

use std::sync::OnceLock;
use std::time::Duration;

use bus::Publisher;
use bus::events::{ReportSource, WechatTransactionReported};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use serde::Deserialize;
use storage::{AsyncConnection, PgPool, StorageError, payments};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The `[reconcile]` section of `paystream.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// Run the reconciler at all.
    pub enabled: bool,
    /// Delays after the prepay at which WeChat is asked about a payment that is still waiting (increasing).
    #[serde(deserialize_with = "durations")]
    pub schedule: Vec<Duration>,
    /// How often a pass runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Payments claimed per pass.
    pub batch: i64,
    /// Queries per second at most, across one reconciler. WeChat allows far more, but the quota is the merchant's
    /// and prepay must never be the one refused.
    pub max_queries_per_second: u32,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            enabled: true,
            schedule: [60, 5 * 60, 15 * 60, 30 * 60].into_iter().map(Duration::from_secs).collect(),
            interval: Duration::from_secs(5),
            batch: 100,
            max_queries_per_second: 50,
        }
    }
}

fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let v: Vec<humantime_serde::Serde<Duration>> = Vec::deserialize(d)?;
    Ok(v.into_iter().map(|s| s.into_inner()).collect())
}

impl ReconcileConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.schedule.is_empty() {
            return Err("reconcile.schedule needs at least one delay".into());
        }
        if self.schedule.len() > i16::MAX as usize {
            return Err("reconcile.schedule has too many entries".into());
        }
        if self.schedule[0].is_zero() {
            return Err("reconcile.schedule must start after the prepay (first delay above 0s)".into());
        }
        if self.schedule.windows(2).any(|w| w[1] <= w[0]) {
            return Err(format!("reconcile.schedule must be strictly increasing, got {:?}", self.schedule));
        }
        if self.interval.is_zero() {
            return Err("reconcile.interval must be positive".into());
        }
        if self.batch < 1 {
            return Err("reconcile.batch must be at least 1".into());
        }
        if self.max_queries_per_second == 0 {
            return Err("reconcile.max_queries_per_second must be at least 1".into());
        }
        Ok(())
    }

    fn schedule_ms(&self) -> Vec<i64> {
        self.schedule.iter().map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).collect()
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Payments claimed and asked about.
    pub checked: u64,
    /// Answers other than NOTPAY/USERPAYING, published to `wechat.transaction`.
    pub fixed: u64,
    /// NOTPAY or USERPAYING: asked again at the next delay of the schedule.
    pub still_waiting: u64,
    /// 404 ORDER_NOT_EXIST: the prepay never reached WeChat, so nobody can have paid (the timeout closer closes it).
    pub not_at_wechat: u64,
    /// Queries or publishes that failed; retried at the next delay of the schedule.
    pub errors: u64,
    /// Waiting payments prepaid longer ago than the first delay (also the gauge).
    pub waiting_past_threshold: i64,
}

/// The reconciliation worker. Cheap to run on several replicas: they share the work.
pub struct Reconciler {
    pool: PgPool,
    publisher: Publisher,
    pay: wechat::PayClient,
    cfg: ReconcileConfig,
    pace: Pace,
}

enum Outcome {
    StillWaiting,
    Fixed,
    NotAtWechat,
    Error,
}

impl Reconciler {
    pub fn new(pool: PgPool, publisher: Publisher, pay: wechat::PayClient, cfg: ReconcileConfig) -> Self {
        register_metrics();
        let pace = Pace::new(cfg.max_queries_per_second);
        Reconciler { pool, publisher, pay, cfg, pace }
    }

    /// One pass at `now`: claims due payments, asks WeChat about each, publishes what it learned.
    pub async fn reconcile_due(&self, now: DateTime<Utc>) -> Result<ReconcileReport, StorageError> {
        let schedule = self.cfg.schedule_ms();
        let first = chrono::Duration::milliseconds(schedule.first().copied().unwrap_or_default());
        let mut conn = self.pool.get().await?;
        let waiting = payments::count_waiting_prepaid_before(&mut conn, now - first).await?;
        m().waiting_past_threshold.set(waiting);
        // Claim and schedule in a transaction of its own, committed before any query: the row locks are held
        // only for the claim, never across a call to WeChat.
        let claims = conn
            .transaction::<_, StorageError, _>(async |c| {
                payments::claim_for_reconcile(c, now, &schedule, self.cfg.batch).await
            })
            .await?;
        drop(conn);
        let mut report = ReconcileReport { waiting_past_threshold: waiting, ..Default::default() };
        let concurrency = (self.cfg.max_queries_per_second as usize).clamp(1, 16);
        let mut outcomes =
            futures::stream::iter(claims.into_iter().map(|c| self.check(c.sn))).buffer_unordered(concurrency);
        while let Some(outcome) = outcomes.next().await {
            report.checked += 1;
            match outcome {
                Outcome::StillWaiting => report.still_waiting += 1,
                Outcome::Fixed => report.fixed += 1,
                Outcome::NotAtWechat => report.not_at_wechat += 1,
                Outcome::Error => report.errors += 1,
            }
        }
        if report.checked > 0 {
            tracing::info!(
                checked = report.checked,
                fixed = report.fixed,
                still_waiting = report.still_waiting,
                not_at_wechat = report.not_at_wechat,
                errors = report.errors,
                "reconciliation pass"
            );
        }
        Ok(report)
    }

    // Takes the serial by value: a future borrowing from the claim list would not be `Send` for `tokio::spawn`
    // (a higher-ranked lifetime the compiler cannot prove).
    async fn check(&self, sn: String) -> Outcome {
        let sn = sn.as_str();
        self.pace.wait().await;
        let t = match self.pay.query_by_out_trade_no(sn).await {
            Ok(t) => t,
            Err(e) if e.code() == Some("ORDER_NOT_EXIST") => {
                query_outcome("not_at_wechat");
                return Outcome::NotAtWechat;
            }
            Err(e) => {
                tracing::warn!(pay_sn = sn, error = %e, "reconciliation query failed; retried at the next delay");
                query_outcome("error");
                return Outcome::Error;
            }
        };
        match t.trade_state {
            wechat::TradeState::Notpay | wechat::TradeState::Userpaying => {
                query_outcome("notpay");
                return Outcome::StillWaiting;
            }
            wechat::TradeState::Success => query_outcome("success"),
            wechat::TradeState::Closed | wechat::TradeState::Revoked | wechat::TradeState::Payerror => {
                query_outcome("closed")
            }
            wechat::TradeState::Refund | wechat::TradeState::Accept => query_outcome("other"),
        }
        // The envelope id comes from (out_trade_no, trade_state): the same answer found twice (or by the status
        // endpoint too) is one event.
        match self.publisher.publish(&transaction_report(t).envelope()).await {
            Ok(_) => {
                m().fixed.inc();
                Outcome::Fixed
            }
            Err(e) => {
                tracing::warn!(pay_sn = sn, error = %e, "could not publish a reconciliation answer; retried later");
                Outcome::Error
            }
        }
    }

    /// A pass every `interval` until `shutdown` (does nothing but wait when disabled). A failed pass is logged and
    /// the next one tries again.
    pub async fn run(self, shutdown: CancellationToken) {
        if !self.cfg.enabled {
            shutdown.cancelled().await;
            return;
        }
        crate::periodic::every(self.cfg.interval, shutdown, "reconciliation pass", || self.reconcile_due(Utc::now()))
            .await
    }
}

/// A verified query answer as the event the payment processor consumes (the ingress maps callbacks the same way;
/// the timeout closer uses this too).
pub fn transaction_report(t: wechat::Transaction) -> WechatTransactionReported {
    let amount = t.amount.as_ref();
    WechatTransactionReported {
        source: ReportSource::Query,
        notification_id: None,
        appid: t.appid.clone(),
        mchid: t.mchid.clone(),
        out_trade_no: t.out_trade_no.clone(),
        transaction_id: t.transaction_id.clone(),
        trade_type: t.trade_type.clone(),
        trade_state: t.trade_state.as_str().to_owned(),
        trade_state_desc: t.trade_state_desc.clone(),
        success_time: t.success_time.as_deref().and_then(wechat::wechat_time),
        amount_total: amount.and_then(|a| a.total),
        currency: amount.and_then(|a| a.currency.clone()),
    }
}

/// Spaces queries at least `1 / max_queries_per_second` apart (no burst: the quota is shared with prepay).
struct Pace {
    every: Duration,
    next: tokio::sync::Mutex<Instant>,
}

impl Pace {
    fn new(per_second: u32) -> Pace {
        Pace { every: Duration::from_secs(1) / per_second.max(1), next: tokio::sync::Mutex::new(Instant::now()) }
    }

    async fn wait(&self) {
        // Holding the lock while sleeping queues the callers in order, each taking the next slot.
        let mut next = self.next.lock().await;
        tokio::time::sleep_until(*next).await;
        *next = Instant::now().max(*next) + self.every;
    }
}

struct Metrics {
    queries: IntCounterVec,
    fixed: IntCounter,
    waiting_past_threshold: IntGauge,
}

fn m() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let queries = IntCounterVec::new(
            Opts::new(
                "reconcile_queries_total",
                "WeChat queries made by reconciliation, by outcome (notpay, success, closed, other, not_at_wechat, error)",
            ),
            &["outcome"],
        )
        .unwrap();
        let fixed = IntCounter::new(
            "reconcile_fixed_total",
            "Payments whose state other than NOTPAY was learned by reconciliation and published",
        )
        .unwrap();
        let waiting_past_threshold = IntGauge::new(
            "payments_waiting_past_threshold",
            "Waiting payments prepaid longer ago than the first reconciliation delay (set each pass)",
        )
        .unwrap();
        let r = observability::registry();
        r.register(Box::new(queries.clone())).expect("reconcile metrics are registered once");
        r.register(Box::new(fixed.clone())).expect("reconcile metrics are registered once");
        r.register(Box::new(waiting_past_threshold.clone())).expect("reconcile metrics are registered once");
        for outcome in ["notpay", "success", "closed", "other", "not_at_wechat", "error"] {
            queries.with_label_values(&[outcome]);
        }
        Metrics { queries, fixed, waiting_past_threshold }
    })
}

fn query_outcome(outcome: &str) {
    m().queries.with_label_values(&[outcome]).inc();
}

/// Makes the reconciliation families visible in `/metrics` from the start.
pub fn register_metrics() {
    let _ = m();
}

/// `paystream_reconcile_fixed_total` now (for tests and the demo).
pub fn fixed_total() -> u64 {
    m().fixed.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = ReconcileConfig::default();
        c.validate().unwrap();
        assert_eq!(c.schedule_ms(), vec![60_000, 300_000, 900_000, 1_800_000]);
    }

    #[test]
    fn validate_names_the_key() {
        let c = ReconcileConfig { schedule: vec![], ..Default::default() };
        assert!(c.validate().unwrap_err().contains("reconcile.schedule"));
        let c =
            ReconcileConfig { schedule: vec![Duration::from_secs(5), Duration::from_secs(5)], ..Default::default() };
        assert!(c.validate().unwrap_err().contains("reconcile.schedule"));
        let c = ReconcileConfig { batch: 0, ..Default::default() };
        assert!(c.validate().unwrap_err().contains("reconcile.batch"));
        let c = ReconcileConfig { max_queries_per_second: 0, ..Default::default() };
        assert!(c.validate().unwrap_err().contains("reconcile.max_queries_per_second"));
        let c = ReconcileConfig { interval: Duration::ZERO, ..Default::default() };
        assert!(c.validate().unwrap_err().contains("reconcile.interval"));
    }

    #[test]
    fn the_schedule_parses_as_human_durations() {
        let c: ReconcileConfig =
            serde_json::from_str(r#"{"schedule":["30s","2m"],"interval":"1s","enabled":false}"#).unwrap();
        assert_eq!(c.schedule, vec![Duration::from_secs(30), Duration::from_secs(120)]);
        assert_eq!(c.interval, Duration::from_secs(1));
        assert!(!c.enabled);
        assert_eq!(c.batch, 100);
        assert!(serde_json::from_str::<ReconcileConfig>(r#"{"shedule":["1m"]}"#).is_err());
    }
}
