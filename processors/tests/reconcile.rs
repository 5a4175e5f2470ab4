//! Reconciliation against real Postgres, JetStream and the WeChat sandbox: a payment whose callbacks are all lost
//! still completes its order, NOTPAY is asked about along the schedule and then left alone, payments WeChat never
//! saw are counted and not published, replicas share the work, and a failed query is retried at the next delay.

mod common;

use common::Booked;

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;
use bus::{Publisher, Subject};
use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use figment::Figment;
use figment::providers::{Format as _, Toml};
use processors::reconcile::{self, ReconcileConfig, ReconcileReport, Reconciler};
use sandbox::{Api, Fault, RunningSandbox, SandboxOptions};
use storage::{Conn, PayStatus, PgPool, TradeState, payments};
use testkit::TestDb;
use tokio_util::sync::CancellationToken;
use wechat::{OpenId, PayClient, WechatConfig};

/// Tests that fix a payment move the process-wide `paystream_reconcile_fixed_total`; they take this lock so each
/// can check that it moved by exactly its own fixes.
static FIXES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Env {
    /// Owned so the test's database lives as long as the test.
    _db: TestDb,
    pool: PgPool,
    js: jetstream::Context,
    publisher: Publisher,
    sandbox: RunningSandbox,
    pay: PayClient,
    wechat: WechatConfig,
    dir: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.sandbox.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Env {
    async fn new() -> Env {
        let common::Stores { db, pool, js, publisher } = common::stores("r").await;
        let dir = std::env::temp_dir().join(testkit::unique("reconcile-sandbox-"));
        let sandbox = sandbox::spawn_for_tests_with(&dir, SandboxOptions { time_scale: 1000.0, ..Default::default() })
            .await
            .expect("sandbox starts");
        let wechat: WechatConfig =
            Figment::from(Toml::file(sandbox.identity.config_path())).extract_inner("wechat").expect("[wechat]");
        let pay = PayClient::from_config(&wechat).unwrap();
        Env { _db: db, pool, js, publisher, sandbox, pay, wechat, dir }
    }

    fn reconciler(&self, cfg: ReconcileConfig) -> Reconciler {
        Reconciler::new(self.pool.clone(), self.publisher.clone(), self.pay.clone(), cfg)
    }

    /// The default schedule (1, 5, 15, 30 minutes), unthrottled enough for tests.
    fn config() -> ReconcileConfig {
        ReconcileConfig { max_queries_per_second: 1000, ..Default::default() }
    }

    /// Starts the relay and both processors (for the merchant of the sandbox identity).
    fn start(&self) -> (CancellationToken, Vec<tokio::task::JoinHandle<()>>) {
        let token = CancellationToken::new();
        let cfg = common::consumer_config(16);
        let merchant = (self.wechat.appid.as_str(), self.wechat.mchid.as_str());
        (token.clone(), common::start_pipeline(&self.pool, &self.publisher, merchant, &cfg, &token))
    }

    async fn conn(&self) -> storage::PooledConn {
        self.pool.get().await.unwrap()
    }

    /// Messages stored on a subject.
    async fn count(&self, subject: Subject) -> u64 {
        common::stored(&self.js, self.publisher.topology(), subject).await
    }

    async fn payment(&self, b: &Booked) -> payments::PaymentRow {
        payments::find_by_sn(&mut *self.conn().await, &b.payment).await.unwrap().unwrap()
    }

    async fn state(&self, b: &Booked) -> (PayStatus, TradeState) {
        let mut c = self.conn().await;
        let p = payments::find_by_sn(&mut c, &b.payment).await.unwrap().unwrap().status();
        let o = storage::orders::find_by_sn(&mut c, &b.order).await.unwrap().unwrap().state();
        (p, o)
    }

    /// A real prepay at the sandbox, recorded as the ingress records it. Returns the stored prepay time.
    async fn prepay(&self, b: &Booked) -> DateTime<Utc> {
        let openid = OpenId::new("oUpF8uMuAJO_M2pxb1Q9zNjWeS6o").unwrap();
        let req = self.pay.new_prepay_request("Lakeside cabin", b.payment.as_str(), common::TOTAL, openid);
        let prepay = self.pay.prepay_jsapi(&req).await.unwrap();
        self.record_prepay(b, &prepay.prepay_id).await
    }

    /// Records a prepay (whether WeChat saw it or not). Millisecond precision, so the stored time is exactly the
    /// returned one and schedule arithmetic in the tests is exact.
    async fn record_prepay(&self, b: &Booked, prepay_id: &str) -> DateTime<Utc> {
        let at = Utc::now().trunc_subsecs(3);
        assert!(payments::record_prepay(&mut *self.conn().await, &b.payment, prepay_id, at).await.unwrap());
        at
    }
}

async fn book(conn: &mut Conn) -> Booked {
    let deadline = Utc::now() + TimeDelta::minutes(30);
    common::booking(conn, &testkit::unique("openid-"), None, deadline).await
}

/// The user pays at WeChat, but WeChat never manages to call us back.
async fn pay_without_callbacks(env: &Env, b: &Booked) {
    let control = env.sandbox.control();
    control.fault(&Fault::DropCallbacks { out_trade_no: b.payment.to_string() }).await.unwrap();
    control.pay(b.payment.as_str(), "SUCCESS").await.unwrap();
    // The sandbox records the dropped delivery: from here on, nothing but a query can tell us.
    testkit::eventually(Duration::from_secs(10), "the callback dropped", || async {
        let records = control.callbacks(Some(b.payment.as_str())).await.unwrap();
        records.iter().any(|r| r.error.as_deref().is_some_and(|e| e.contains("dropped"))).then_some(())
    })
    .await;
}

async fn until_paid(env: &Env, b: &Booked) {
    testkit::eventually(Duration::from_secs(20), "order paid", || async {
        (env.state(b).await == (PayStatus::Paid, TradeState::WaitUse)).then_some(())
    })
    .await;
}

async fn until_count(env: &Env, subject: Subject, n: u64) {
    testkit::eventually(Duration::from_secs(20), &format!("{n} messages on {}", subject.name()), || async {
        (env.count(subject).await == n).then_some(())
    })
    .await;
}

async fn stop(token: CancellationToken, tasks: Vec<tokio::task::JoinHandle<()>>) {
    token.cancel();
    for t in tasks {
        t.await.unwrap();
    }
}

fn minutes(n: i64) -> TimeDelta {
    TimeDelta::minutes(n)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payment_whose_callbacks_are_all_lost_is_completed_by_reconciliation() {
    let _fixes = FIXES.lock().await;
    let env = Env::new().await;
    let b = book(&mut *env.conn().await).await;
    let prepaid = env.prepay(&b).await;
    let (token, tasks) = env.start();
    pay_without_callbacks(&env, &b).await;
    // Paid at WeChat, lost here: nothing moves by itself.
    assert_eq!(env.state(&b).await, (PayStatus::Waiting, TradeState::WaitPay));
    assert_eq!(env.count(Subject::WechatTransaction).await, 0);

    let r = env.reconciler(Env::config());
    // Before the first delay the payment is left alone.
    assert_eq!(r.reconcile_due(prepaid + TimeDelta::seconds(30)).await.unwrap().checked, 0);
    let fixed_before = reconcile::fixed_total();
    let report = r.reconcile_due(prepaid + minutes(2)).await.unwrap();
    assert_eq!(
        report,
        ReconcileReport { checked: 1, fixed: 1, waiting_past_threshold: 1, ..Default::default() },
        "one payment asked about, its SUCCESS published"
    );
    assert_eq!(reconcile::fixed_total() - fixed_before, 1);
    until_paid(&env, &b).await;
    until_count(&env, Subject::PaymentStatus, 1).await;
    until_count(&env, Subject::OrderStatus, 1).await;
    let p = env.payment(&b).await;
    assert_eq!(p.trade_state, "SUCCESS");
    assert!(p.transaction_id.is_some() && p.pay_time.is_some());

    // Paid now: the rest of the schedule asks nothing, and nothing is published twice.
    let later = r.reconcile_due(prepaid + minutes(20)).await.unwrap();
    assert_eq!((later.checked, later.waiting_past_threshold), (0, 0));
    stop(token, tasks).await;
    assert_eq!(env.count(Subject::PaymentStatus).await, 1);
    assert_eq!(env.count(Subject::WechatTransaction).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn notpay_is_asked_about_along_the_schedule_then_left_alone() {
    let env = Env::new().await;
    let b = book(&mut *env.conn().await).await;
    let prepaid = env.prepay(&b).await;
    let r = env.reconciler(Env::config());
    let still_waiting =
        ReconcileReport { checked: 1, still_waiting: 1, waiting_past_threshold: 1, ..Default::default() };
    let idle = ReconcileReport { waiting_past_threshold: 1, ..Default::default() };

    assert_eq!(r.reconcile_due(prepaid + TimeDelta::seconds(59)).await.unwrap(), ReconcileReport::default());
    // Each delay of the schedule: asked once, the next query scheduled at prepay + the following delay.
    for (attempt, (at, next)) in [(1, 5), (5, 15), (15, 30)].into_iter().enumerate() {
        assert_eq!(r.reconcile_due(prepaid + minutes(at)).await.unwrap(), still_waiting, "at {at} min");
        assert_eq!(r.reconcile_due(prepaid + minutes(at)).await.unwrap(), idle, "asked once at {at} min");
        let p = env.payment(&b).await;
        assert_eq!(p.reconcile_attempts as usize, attempt + 1);
        assert_eq!(p.next_reconcile_time, Some(prepaid + minutes(next)));
        assert_eq!(r.reconcile_due(prepaid + minutes(next) - TimeDelta::seconds(1)).await.unwrap(), idle);
    }
    assert_eq!(r.reconcile_due(prepaid + minutes(30)).await.unwrap(), still_waiting);
    // The schedule is used up: the timeout closer owns the payment from here.
    let p = env.payment(&b).await;
    assert_eq!((p.reconcile_attempts, p.next_reconcile_time), (4, None));
    assert_eq!(r.reconcile_due(prepaid + minutes(600)).await.unwrap(), idle);
    assert_eq!(env.count(Subject::WechatTransaction).await, 0, "NOTPAY is never published");
    assert_eq!(env.state(&b).await, (PayStatus::Waiting, TradeState::WaitPay));
}

#[tokio::test(flavor = "multi_thread")]
async fn payments_wechat_never_saw_are_not_due_or_counted_as_not_at_wechat() {
    let env = Env::new().await;
    let never_prepaid = book(&mut *env.conn().await).await;
    let r = env.reconciler(Env::config());
    // No prepay time: the user never reached WeChat's cashier, there is nothing to ask.
    assert_eq!(r.reconcile_due(Utc::now() + minutes(60)).await.unwrap(), ReconcileReport::default());

    // A prepay recorded here that WeChat does not know (lost on the way): 404 ORDER_NOT_EXIST.
    let lost = book(&mut *env.conn().await).await;
    let prepaid = env.record_prepay(&lost, "wx_never_reached_wechat").await;
    let report = r.reconcile_due(prepaid + minutes(1)).await.unwrap();
    assert_eq!(
        report,
        ReconcileReport { checked: 1, not_at_wechat: 1, waiting_past_threshold: 1, ..Default::default() }
    );
    assert_eq!(env.count(Subject::WechatTransaction).await, 0);
    assert_eq!(env.payment(&lost).await.reconcile_attempts, 1);
    assert_eq!(env.payment(&never_prepaid).await.reconcile_attempts, 0);
    assert_eq!(env.state(&lost).await, (PayStatus::Waiting, TradeState::WaitPay));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_reconcilers_share_the_work_and_ask_about_each_payment_once() {
    let env = Env::new().await;
    let mut bookings = Vec::new();
    let mut latest = Utc::now();
    for _ in 0..6 {
        let b = book(&mut *env.conn().await).await;
        latest = env.prepay(&b).await;
        bookings.push(b);
    }
    // Slow answers keep both passes in flight together; small batches make each claim several times.
    env.sandbox.control().fault(&Fault::Latency { api: Api::QueryOrder, ms: 100, times: None }).await.unwrap();
    let cfg = ReconcileConfig { batch: 2, ..Env::config() };
    let (r1, r2) = (env.reconciler(cfg.clone()), env.reconciler(cfg));
    let at = latest + minutes(1);
    let drain = async |r: &Reconciler| {
        let mut checked = Vec::new();
        loop {
            let report = r.reconcile_due(at).await.unwrap();
            assert_eq!(report.checked, report.still_waiting, "{report:?}");
            if report.checked == 0 {
                return checked;
            }
            checked.push(report.checked);
        }
    };
    let (c1, c2) = tokio::join!(drain(&r1), drain(&r2));
    let total: u64 = c1.iter().chain(&c2).sum();
    assert_eq!(total, 6, "each payment asked about once between the two ({c1:?} + {c2:?})");
    assert!(!c1.is_empty() && !c2.is_empty(), "both took a share ({c1:?} + {c2:?})");
    for b in &bookings {
        assert_eq!(env.payment(b).await.reconcile_attempts, 1, "{}", b.payment);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_query_is_counted_and_the_next_delay_fixes_the_payment() {
    let _fixes = FIXES.lock().await;
    let env = Env::new().await;
    let b = book(&mut *env.conn().await).await;
    let prepaid = env.prepay(&b).await;
    let (token, tasks) = env.start();
    pay_without_callbacks(&env, &b).await;
    let control = env.sandbox.control();
    let fail = Fault::Fail {
        api: Api::QueryOrder,
        times: 1,
        status: Some(500),
        code: Some("SYSTEM_ERROR".into()),
        message: Some("系统错误".into()),
        errcode: None,
    };
    control.fault(&fail).await.unwrap();
    let r = env.reconciler(Env::config());
    let fixed_before = reconcile::fixed_total();
    let report = r.reconcile_due(prepaid + minutes(1)).await.unwrap();
    assert_eq!(report, ReconcileReport { checked: 1, errors: 1, waiting_past_threshold: 1, ..Default::default() });
    assert_eq!(env.count(Subject::WechatTransaction).await, 0);
    assert_eq!(env.state(&b).await, (PayStatus::Waiting, TradeState::WaitPay));
    // Not asked again before the next delay, even though the query failed.
    assert_eq!(r.reconcile_due(prepaid + minutes(4)).await.unwrap().checked, 0);

    let report = r.reconcile_due(prepaid + minutes(5)).await.unwrap();
    assert_eq!((report.checked, report.fixed, report.errors), (1, 1, 0));
    assert_eq!(reconcile::fixed_total() - fixed_before, 1);
    until_paid(&env, &b).await;
    until_count(&env, Subject::PaymentStatus, 1).await;
    stop(token, tasks).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_running_reconciler_completes_a_lost_payment_on_its_own() {
    // It fixes a payment, which moves the counter the other fixing tests compare.
    let _fixes = FIXES.lock().await;
    let env = Env::new().await;
    let b = book(&mut *env.conn().await).await;
    env.prepay(&b).await;
    let (token, tasks) = env.start();
    pay_without_callbacks(&env, &b).await;
    // A short first delay so the first pass of `run` finds the payment due; the long second one shows it is asked
    // about once.
    let cfg = ReconcileConfig {
        schedule: vec![Duration::from_millis(10), Duration::from_secs(3600)],
        interval: Duration::from_millis(50),
        ..Env::config()
    };
    let run = tokio::spawn(env.reconciler(cfg).run(token.clone()));
    until_paid(&env, &b).await;
    until_count(&env, Subject::PaymentStatus, 1).await;
    stop(token, tasks).await;
    run.await.unwrap();
    assert_eq!(env.payment(&b).await.reconcile_attempts, 1);
    assert_eq!(env.count(Subject::WechatTransaction).await, 1);
}
