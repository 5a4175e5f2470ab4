//! The order lifecycle against real Postgres, JetStream and the WeChat sandbox.
//!
//! Timeout close: an unpaid order past its deadline is closed at WeChat and here, and its user told once; an order
//! paid at WeChat just before the close is paid, not closed; a payment after the close is refused by WeChat; a
//! failing close is retried on the next pass.
//!
//! Refunds: money that arrives for a closed order goes back once, even when WeChat's answer to the refund request
//! is lost and the request is retried; a user's refund refunds the payment and the order; `REFUND.SUCCESS` twice,
//! late or out of order changes state once; reports that do not match a refund are dead-lettered.

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use bus::{Publisher, Subject, Topology};
use chrono::{TimeDelta, Utc};
use diesel::QueryableByName;
use figment::Figment;
use figment::providers::{Format as _, Toml};
use processors::timeout::CloseReport;
use processors::{TimeoutCloser, TimeoutConfig};
use sandbox::{Control, InitOptions, RunningSandbox};
use storage::{
    AuthType, Conn, Fen, OrderSn, PayStatus, PaymentSn, PgPool, RefundStatus, RunQueryDsl, TradeState, UserId,
};
use testkit::TestDb;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

struct Env {
    /// Owned so the test's database lives as long as the test.
    _db: TestDb,
    pool: PgPool,
    js: jetstream::Context,
    publisher: Publisher,
    sandbox: RunningSandbox,
    control: Control,
    pay: wechat::PayClient,
    dir: std::path::PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.sandbox.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Env {
    async fn new() -> Env {
        let common::Stores { db, pool, js, publisher } = common::stores("t").await;
        let dir = std::env::temp_dir().join(testkit::unique("timeout-sandbox-"));
        // Nobody listens there: no callback reaches us, so only the closer's query can tell the pipeline about a
        // payment (port 1 refuses at once; the sandbox's retries run on WeChat's real, slow schedule).
        let notify_url = Some("http://127.0.0.1:1/notify".to_owned());
        sandbox::init(&dir, &InitOptions { notify_url, ..Default::default() }).unwrap();
        // A fast clock: a refund WeChat accepted stays PROCESSING for 3 s (long enough to see it), then SUCCESS.
        let options =
            sandbox::SandboxOptions { time_scale: 100.0, refund_delay: Duration::from_secs(300), ..Default::default() };
        let sandbox = sandbox::spawn_for_tests_with(&dir, options).await.unwrap();
        let mut cfg: wechat::WechatConfig =
            Figment::from(Toml::file(sandbox.identity.config_path())).extract_inner("wechat").unwrap();
        // Short enough that a late-answer fault of a second makes the refund call time out.
        cfg.request_timeout_ms = 700;
        let pay = wechat::PayClient::from_config(&cfg).unwrap();
        let control = sandbox.control();
        Env { _db: db, pool, js, publisher, sandbox, control, pay, dir }
    }

    fn closer(&self) -> TimeoutCloser {
        TimeoutCloser::new(self.pool.clone(), self.publisher.clone(), self.pay.clone(), TimeoutConfig::default())
    }

    fn t(&self) -> &Topology {
        self.publisher.topology()
    }

    /// The relay, both processors and the refund consumers, as `paystream all` runs them.
    fn start(&self) -> (CancellationToken, Vec<tokio::task::JoinHandle<()>>) {
        let token = CancellationToken::new();
        let cfg = common::consumer_config(8);
        let (appid, mchid) = (self.pay.settings().appid.as_str(), self.pay.settings().mchid.clone());
        let mut tasks = common::start_pipeline(&self.pool, &self.publisher, (appid, &mchid), &cfg, &token);
        let (p, pool, t, c1, pay) =
            (self.publisher.clone(), self.pool.clone(), token.clone(), cfg.clone(), self.pay.clone());
        tasks.push(tokio::spawn(async move { processors::run_refund_requests(p, pool, pay, c1, t).await.unwrap() }));
        let (p, pool, t) = (self.publisher.clone(), self.pool.clone(), token.clone());
        tasks.push(tokio::spawn(async move { processors::run_refund_status(p, pool, &mchid, cfg, t).await.unwrap() }));
        (token, tasks)
    }

    fn refund_reconciler(&self) -> processors::RefundReconciler {
        let cfg = processors::RefundConfig { query_after: Duration::from_secs(60), ..Default::default() };
        processors::RefundReconciler::new(self.pool.clone(), self.publisher.clone(), self.pay.clone(), cfg)
    }

    async fn refund_row(&self, b: &Booking) -> Option<storage::refunds::RefundRow> {
        storage::refunds::find_for_payment(&mut *self.conn().await, &b.payment).await.unwrap()
    }

    /// Waits until the refund of `b` is in `status` here.
    async fn until_refund(&self, b: &Booking, status: RefundStatus) -> storage::refunds::RefundRow {
        testkit::eventually(WAIT, &format!("refund {status:?}"), || async {
            self.refund_row(b).await.filter(|r| r.status() == status)
        })
        .await
    }

    /// Dead-letter reasons of `consumer`.
    async fn dead_letters(&self, consumer: &str) -> Vec<String> {
        let stream = self.js.get_stream(self.t().dlq_stream()).await.unwrap();
        let n = stream.get_info().await.unwrap().state.last_sequence;
        let mut reasons = Vec::new();
        for seq in 1..=n {
            if let Ok(m) = stream.get_raw_message(seq).await
                && m.subject.as_str() == self.t().dlq_subject(consumer)
            {
                reasons
                    .push(m.headers.get(bus::headers::DLQ_REASON).map(|v| v.as_str().to_owned()).unwrap_or_default());
            }
        }
        reasons
    }

    async fn conn(&self) -> storage::PooledConn {
        self.pool.get().await.unwrap()
    }

    /// Payloads stored on a subject (every duplicate that got past JetStream included).
    async fn payloads(&self, subject: Subject) -> Vec<String> {
        let stream = self.js.get_stream(self.t().stream_of(subject)).await.unwrap();
        let n = stream.get_info().await.unwrap().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=n {
            if let Ok(m) = stream.get_raw_message(seq).await
                && m.subject.as_str() == self.t().subject(subject)
            {
                out.push(String::from_utf8_lossy(&m.payload).into_owned());
            }
        }
        out
    }

    async fn count(&self, subject: Subject) -> usize {
        common::stored(&self.js, self.t(), subject).await as usize
    }

    async fn outbox_len(&self) -> i64 {
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut c = self.conn().await;
        diesel::sql_query("SELECT count(*) AS n FROM outbox").get_result::<N>(&mut *c).await.unwrap().n
    }

    async fn wechat_state(&self, b: &Booking) -> String {
        self.pay.query_by_out_trade_no(b.payment.as_str()).await.unwrap().trade_state.as_str().to_owned()
    }
}

struct Booking {
    order: OrderSn,
    payment: PaymentSn,
    deadline: chrono::DateTime<Utc>,
}

/// A user, an order due in 30 minutes, its waiting payment, and a real prepay at the sandbox (WeChat knows it).
async fn book(env: &Env) -> Booking {
    let mut pooled = env.conn().await;
    let conn: &mut Conn = &mut pooled;
    let openid = format!("oT{}", &uuid::Uuid::new_v4().simple().to_string()[..26]);
    let now = Utc::now();
    let deadline = now + TimeDelta::minutes(30);
    let b = common::booking(conn, &openid, None, deadline).await;
    let req = env.pay.new_prepay_request(
        "Lakeside cabin",
        b.payment.as_str(),
        common::TOTAL,
        wechat::OpenId::new(openid).unwrap(),
    );
    let answer = env.pay.prepay_jsapi(&req).await.unwrap();
    storage::payments::record_prepay(conn, &b.payment, &answer.prepay_id, now).await.unwrap();
    Booking { order: b.order, payment: b.payment, deadline }
}

async fn state(env: &Env, b: &Booking) -> (PayStatus, TradeState) {
    let mut c = env.conn().await;
    let p = storage::payments::find_by_sn(&mut c, &b.payment).await.unwrap().unwrap().status();
    let o = storage::orders::find_by_sn(&mut c, &b.order).await.unwrap().unwrap().state();
    (p, o)
}

/// A `now` just past the order's deadline.
fn past(b: &Booking) -> chrono::DateTime<Utc> {
    b.deadline + TimeDelta::seconds(1)
}

async fn stop(token: CancellationToken, tasks: Vec<tokio::task::JoinHandle<()>>) {
    token.cancel();
    for t in tasks {
        t.await.unwrap();
    }
}

fn order_closed(payload: &str) -> bool {
    payload.contains("\"order_closed\"")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unpaid_order_past_its_deadline_is_closed_at_wechat_and_here_and_its_user_told_once() {
    let env = Env::new().await;
    let b = book(&env).await;
    let (token, tasks) = env.start();
    let closer = env.closer();
    let first = closer.close_due(past(&b)).await.unwrap();
    assert_eq!(first, CloseReport { due: 1, closed: 1, ..Default::default() });
    assert_eq!(state(&env, &b).await, (PayStatus::Closed, TradeState::Cancelled));
    assert_eq!(env.wechat_state(&b).await, "CLOSED");
    let p = storage::payments::find_by_sn(&mut *env.conn().await, &b.payment).await.unwrap().unwrap();
    assert_eq!(p.trade_state, "CLOSED");
    // Later passes find nothing due: the closed order left the deadline index.
    for _ in 0..3 {
        assert_eq!(closer.close_due(past(&b) + TimeDelta::minutes(5)).await.unwrap(), CloseReport::default());
    }
    testkit::eventually(WAIT, "outbox drained", || async { (env.outbox_len().await == 0).then_some(()) }).await;
    testkit::eventually(WAIT, "one order_closed request", || async {
        let notes = env.payloads(Subject::NotifyMiniprogram).await;
        (notes.len() == 1).then_some(notes)
    })
    .await
    .iter()
    .for_each(|n| {
        assert!(order_closed(n) && n.contains(b.order.as_str()) && n.contains(&common::TOTAL.to_string()), "{n}")
    });
    assert_eq!(env.count(Subject::OrderStatus).await, 1);
    assert_eq!(env.count(Subject::PaymentStatus).await, 1);
    assert_eq!(env.count(Subject::RefundRequested).await, 0);
    stop(token, tasks).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_before_its_deadline_is_left_alone() {
    let env = Env::new().await;
    let b = book(&env).await;
    let report = env.closer().close_due(b.deadline - TimeDelta::seconds(1)).await.unwrap();
    assert_eq!(report, CloseReport::default());
    assert_eq!(state(&env, &b).await, (PayStatus::Waiting, TradeState::WaitPay));
    assert_eq!(env.wechat_state(&b).await, "NOTPAY");
    assert_eq!(env.outbox_len().await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_paid_at_wechat_just_before_the_close_is_paid_not_closed() {
    let env = Env::new().await;
    let b = book(&env).await;
    let (token, tasks) = env.start();
    // The user pays as the deadline passes; the callback never reaches us (nobody listens at the notify_url).
    env.control.pay(b.payment.as_str(), "SUCCESS").await.unwrap();
    let closer = env.closer();
    let report = closer.close_due(past(&b)).await.unwrap();
    assert_eq!(report, CloseReport { due: 1, paid_meanwhile: 1, ..Default::default() });
    testkit::eventually(WAIT, "order paid through the payment path", || async {
        (state(&env, &b).await == (PayStatus::Paid, TradeState::WaitUse)).then_some(())
    })
    .await;
    assert_eq!(env.wechat_state(&b).await, "SUCCESS");
    // Paid orders are no longer due.
    assert_eq!(closer.close_due(past(&b)).await.unwrap(), CloseReport::default());
    testkit::eventually(WAIT, "pay-success and check-in requests", || async {
        let notes = env.payloads(Subject::NotifyMiniprogram).await;
        (notes.len() == 2 && env.outbox_len().await == 0).then_some(notes)
    })
    .await
    .iter()
    .for_each(|n| assert!(!order_closed(n), "no order_closed for a paid order: {n}"));
    assert_eq!(env.count(Subject::RefundRequested).await, 0);
    stop(token, tasks).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payment_after_the_close_is_refused_by_wechat_and_no_money_is_kept() {
    let env = Env::new().await;
    let b = book(&env).await;
    let (token, tasks) = env.start();
    assert_eq!(env.closer().close_due(past(&b)).await.unwrap().closed, 1);
    // The user opens the payment sheet a moment too late.
    match env.control.pay(b.payment.as_str(), "SUCCESS").await {
        Err(sandbox::ControlError::Status { status: 409, .. }) => {}
        other => panic!("WeChat must refuse paying a closed transaction, got {other:?}"),
    }
    assert_eq!(env.wechat_state(&b).await, "CLOSED");
    testkit::eventually(WAIT, "outbox drained", || async { (env.outbox_len().await == 0).then_some(()) }).await;
    assert_eq!(state(&env, &b).await, (PayStatus::Closed, TradeState::Cancelled));
    // No money arrived, so there is nothing to refund; prepaying again is refused too.
    assert_eq!(env.count(Subject::RefundRequested).await, 0);
    let openid = wechat::OpenId::new("oUpF8uMuAJO_M2pxb1Q9zNjWeS6o").unwrap();
    let again = env.pay.new_prepay_request("Lakeside cabin", b.payment.as_str(), common::TOTAL, openid);
    assert_eq!(env.pay.prepay_jsapi(&again).await.unwrap_err().code(), Some("ORDER_CLOSED"));
    stop(token, tasks).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_wechat_close_is_skipped_and_retried_on_the_next_pass() {
    let env = Env::new().await;
    let b = book(&env).await;
    let fail = sandbox::Fault::Fail {
        api: sandbox::Api::CloseOrder,
        times: 1,
        status: Some(500),
        code: Some("SYSTEM_ERROR".into()),
        message: Some("系统错误".into()),
        errcode: None,
    };
    env.control.fault(&fail).await.unwrap();
    let closer = env.closer();
    let first = closer.close_due(past(&b)).await.unwrap();
    assert_eq!(first, CloseReport { due: 1, wechat_unavailable: 1, ..Default::default() });
    assert_eq!(state(&env, &b).await, (PayStatus::Waiting, TradeState::WaitPay));
    assert_eq!(env.wechat_state(&b).await, "NOTPAY");
    assert_eq!(env.outbox_len().await, 0, "nothing announced for an order that was not closed");
    // Not at once: the next attempt waits timeout.interval (doubling with each failed attempt).
    assert_eq!(closer.close_due(past(&b)).await.unwrap(), CloseReport::default());
    let second = closer.close_due(past(&b) + TimeDelta::seconds(5)).await.unwrap();
    assert_eq!(second, CloseReport { due: 1, closed: 1, ..Default::default() });
    assert_eq!(state(&env, &b).await, (PayStatus::Closed, TradeState::Cancelled));
    assert_eq!(env.wechat_state(&b).await, "CLOSED");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_the_payment_path_never_completes_goes_to_a_person_and_no_longer_takes_a_pass() {
    use processors::timeout::ATTENTION_AFTER;
    let env = Env::new().await;
    let stuck = book(&env).await;
    // Paid at WeChat, but the payment path never completes it (no payment processor runs here; in production it
    // dead-letters the report: another amount, another merchant, a refund made on the merchant platform).
    env.control.pay(stuck.payment.as_str(), "SUCCESS").await.unwrap();
    let closer = TimeoutCloser::new(
        env.pool.clone(),
        env.publisher.clone(),
        env.pay.clone(),
        TimeoutConfig { batch: 1, ..TimeoutConfig::default() },
    );
    let mut now = past(&stuck);
    for attempt in 1..=ATTENTION_AFTER {
        let r = closer.close_due(now).await.unwrap();
        assert_eq!((r.due, r.paid_meanwhile), (1, 1), "attempt {attempt}: {r:?}");
        // WeChat is not asked again before the attempt's delay has passed.
        assert_eq!(closer.close_due(now).await.unwrap().due, 0, "after attempt {attempt}");
        now += TimeDelta::from_std(processors::timeout::MAX_RETRY_DELAY).unwrap();
    }
    let r = closer.close_due(now).await.unwrap();
    assert_eq!((r.due, r.attention), (0, 1), "{r:?}");
    let waiting = storage::orders::attention(&mut *env.conn().await).await.unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!((waiting[0].sn.as_str(), waiting[0].attempts), (stuck.order.as_str(), ATTENTION_AFTER));
    assert!(waiting[0].reason.contains("payment path has not completed it"), "{}", waiting[0].reason);
    assert_eq!(
        state(&env, &stuck).await,
        (PayStatus::Waiting, TradeState::WaitPay),
        "nothing closed with money at WeChat"
    );

    // Another order past its deadline gets the pass's only slot.
    let other = book(&env).await;
    let r = closer.close_due(now.max(past(&other))).await.unwrap();
    assert_eq!((r.due, r.closed, r.attention), (1, 1, 1), "{r:?}");

    // A person looked (and, say, redrove the dead letter): the order is back in the passes.
    assert!(storage::orders::resolve_attention(&mut *env.conn().await, &stuck.order).await.unwrap());
    assert!(!storage::orders::resolve_attention(&mut *env.conn().await, &stuck.order).await.unwrap());
    let r = closer.close_due(now).await.unwrap();
    assert_eq!((r.due, r.paid_meanwhile, r.attention), (1, 1, 0), "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_passes_close_an_order_once() {
    let env = Env::new().await;
    let b = book(&env).await;
    let (a, c) = (env.closer(), env.closer());
    let (ra, rc) = tokio::join!(a.close_due(past(&b)), c.close_due(past(&b)));
    let (ra, rc) = (ra.unwrap(), rc.unwrap());
    assert_eq!(ra.closed + rc.closed, 1, "{ra:?} {rc:?}");
    assert_eq!(state(&env, &b).await, (PayStatus::Closed, TradeState::Cancelled));
    // One order.status, one payment.status, one order_closed request in the outbox.
    assert_eq!(env.outbox_len().await, 3);
}

/// The measurement quoted in `processors/src/timeout.rs`: 100,000 open orders, all due; the pass's query must be
/// a range scan of the partial deadline index, not a scan of the table.
#[tokio::test(flavor = "multi_thread")]
async fn the_due_orders_query_uses_the_deadline_index_with_100k_open_orders() {
    observability::init_for_tests();
    let db = TestDb::create().await;
    storage::migrate(&storage::DbConfig::new(&db.url)).await.unwrap();
    let pool = storage::pool(&storage::DbConfig::new(&db.url)).unwrap();
    let mut pooled = pool.get().await.unwrap();
    let conn: &mut Conn = &mut pooled;
    let user =
        storage::users::insert_with_auth(conn, &Default::default(), AuthType::WxMini, "oBulk").await.unwrap().id();
    // 100,000 open orders (all due) next to 100,000 paid ones (the history the partial index leaves out).
    let homestay = "INSERT INTO homestay (title, people_num, row_state, homestay_price) VALUES ('h', 2, 1, 100)";
    diesel::sql_query(homestay).execute(conn).await.unwrap();
    let orders = format!(
        "INSERT INTO homestay_order (sn, user_id, homestay_id, title, people_num, row_type, food_price, \
           homestay_price, live_start_date, live_end_date, live_people_num, trade_state, trade_code, \
           order_total_price, food_total_price, homestay_total_price, pay_deadline) \
         SELECT 'HSO20261127000000' || lpad(i::text, 8, '0'), {user}, (SELECT max(id) FROM homestay), 'h', 2, 0, 0, \
           100, now() + interval '3 days', now() + interval '4 days', 1, \
           CASE WHEN i <= 100000 THEN 0 ELSE 1 END, 'c', 100, 0, 100, \
           now() - interval '1 hour' + i * interval '10 ms' \
         FROM generate_series(1, 200000) AS i",
        user = user.0
    );
    diesel::sql_query(orders).execute(conn).await.unwrap();
    diesel::sql_query("ANALYZE homestay_order").execute(conn).await.unwrap();
    #[derive(QueryableByName)]
    struct Line {
        #[diesel(sql_type = diesel::sql_types::Text, column_name = "QUERY PLAN")]
        line: String,
    }
    let explain = "EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM homestay_order WHERE trade_state = 0 \
                   AND pay_deadline <= now() ORDER BY pay_deadline ASC LIMIT 100";
    let plan: Vec<String> =
        diesel::sql_query(explain).load::<Line>(conn).await.unwrap().into_iter().map(|l| l.line).collect();
    let plan = plan.join("\n");
    println!("{plan}");
    assert!(plan.contains("homestay_order_unpaid_deadline"), "the partial deadline index is used:\n{plan}");
    // The query as the closer runs it, through diesel: best of five, to keep a busy machine's noise out.
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        let due = storage::orders::unpaid_past_deadline(conn, Utc::now(), 100).await.unwrap();
        best = best.min(start.elapsed());
        assert_eq!(due.len(), 100);
    }
    println!("unpaid_past_deadline(batch 100) with 100,000 open orders: best of 5 = {best:?}");
}

/// The race of the issue, run for real several times: the user pays while the closer runs. Whoever WeChat lets win,
/// the end is exactly one of (paid order, no order_closed) or (closed order, payment refused by WeChat) — never a
/// closed order with money kept.
#[tokio::test(flavor = "multi_thread")]
async fn paying_while_the_closer_runs_ends_paid_or_closed_never_closed_with_money() {
    let env = Env::new().await;
    let (token, tasks) = env.start();
    let closer = env.closer();
    let (mut paid, mut closed) = (0, 0);
    for i in 0..8 {
        let b = book(&env).await;
        // The user's payment starts after `i` round trips to the sandbox: a spread of head starts around the
        // closer's own database reads, so both outcomes happen (which one, each time, is up to the scheduler).
        let user_pays = async {
            for _ in 0..i {
                env.control.order(b.payment.as_str()).await.unwrap();
            }
            env.control.pay(b.payment.as_str(), "SUCCESS").await
        };
        let (pay, report) = tokio::join!(user_pays, closer.close_due(past(&b)));
        let report = report.unwrap();
        match pay {
            Ok(_) => {
                paid += 1;
                assert_eq!((report.closed, report.paid_meanwhile), (0, 1), "{report:?}");
                testkit::eventually(WAIT, "the payment wins: order paid", || async {
                    (state(&env, &b).await == (PayStatus::Paid, TradeState::WaitUse)).then_some(())
                })
                .await;
                assert_eq!(env.wechat_state(&b).await, "SUCCESS");
            }
            Err(sandbox::ControlError::Status { status: 409, .. }) => {
                closed += 1;
                assert_eq!(report.closed, 1, "{report:?}");
                assert_eq!(state(&env, &b).await, (PayStatus::Closed, TradeState::Cancelled));
                assert_eq!(env.wechat_state(&b).await, "CLOSED");
            }
            Err(e) => panic!("unexpected answer to the payment: {e}"),
        }
    }
    println!("race outcomes: {paid} paid, {closed} closed");
    testkit::eventually(WAIT, "outbox drained", || async { (env.outbox_len().await == 0).then_some(()) }).await;
    let notes = env.payloads(Subject::NotifyMiniprogram).await;
    let closed_notes = notes.iter().filter(|n| order_closed(n)).count();
    assert_eq!(closed_notes, closed, "one order_closed per closed order, none for paid ones");
    assert_eq!(notes.len() - closed_notes, 2 * paid, "pay-success and check-in per paid order");
    assert_eq!(env.count(Subject::RefundRequested).await, 0, "no money arrived for a closed order");
    stop(token, tasks).await;
}

/// Paid here (the callback was processed) while the order processor has not moved the order yet: not closed.
#[tokio::test(flavor = "multi_thread")]
async fn an_order_whose_payment_is_already_paid_here_is_not_closed_nor_hides_due_orders() {
    let env = Env::new().await;
    let mut paid_here = Vec::new();
    for i in 0..3 {
        let b = book(&env).await;
        env.control.pay(b.payment.as_str(), "SUCCESS").await.unwrap();
        let paid = storage::payments::PaidDetails {
            transaction_id: format!("420000000000000000000000000{i}"),
            trade_type: "JSAPI".into(),
            trade_state: "SUCCESS".into(),
            trade_state_desc: String::new(),
            pay_time: Utc::now(),
        };
        storage::payments::mark_paid(&mut *env.conn().await, &b.payment, &paid).await.unwrap();
        paid_here.push(b);
    }
    // Due last (latest deadline), behind three paid-here orders, with a batch of two.
    let unpaid = book(&env).await;
    let closer = TimeoutCloser::new(
        env.pool.clone(),
        env.publisher.clone(),
        env.pay.clone(),
        TimeoutConfig { batch: 2, ..Default::default() },
    );
    let report = closer.close_due(past(&unpaid)).await.unwrap();
    assert_eq!(report, CloseReport { due: 1, closed: 1, ..Default::default() }, "the paid ones are not due");
    assert_eq!(state(&env, &unpaid).await, (PayStatus::Closed, TradeState::Cancelled));
    for b in &paid_here {
        // The order processor (not running here) moves these to waitUse; the closer leaves them alone.
        assert_eq!(state(&env, b).await, (PayStatus::Paid, TradeState::WaitPay));
    }
}

/// `run` closes what is due on its own schedule (an order whose prepay never happened: nothing to close at WeChat)
/// and stops on shutdown.
#[tokio::test(flavor = "multi_thread")]
async fn run_closes_due_orders_every_interval_and_stops_on_shutdown() {
    let env = Env::new().await;
    let order = {
        let mut pooled = env.conn().await;
        let conn: &mut Conn = &mut pooled;
        let user = common::user(conn, "oNoPrepay", None).await;
        let homestay = common::homestay(conn).await;
        let sn = OrderSn::generate(Utc::now());
        // Already past its deadline, and with no payment at all.
        let past = Utc::now() - TimeDelta::seconds(1);
        storage::orders::insert(conn, &common::new_order(&sn, user, homestay, past)).await.unwrap();
        sn
    };
    let cfg = TimeoutConfig { interval: Duration::from_millis(50), ..TimeoutConfig::default() };
    cfg.validate().unwrap();
    let closer = TimeoutCloser::new(env.pool.clone(), env.publisher.clone(), env.pay.clone(), cfg);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(closer.run(shutdown.clone()));
    testkit::eventually(WAIT, "order closed by run", || async {
        let o = storage::orders::find_by_sn(&mut *env.conn().await, &order).await.unwrap().unwrap();
        (o.state() == TradeState::Cancelled).then_some(())
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    // order.status and order_closed; no payment.status (there was no payment).
    assert_eq!(env.outbox_len().await, 2);
}

/// A full batch in one pass, oldest deadline first; the next pass takes the rest. Prints the pass's rate (WeChat
/// close + one transaction per order, sequential), the figure quoted in the module doc.
#[tokio::test(flavor = "multi_thread")]
async fn a_pass_closes_at_most_a_batch_oldest_deadline_first() {
    let env = Env::new().await;
    let mut bookings = Vec::new();
    for _ in 0..60 {
        bookings.push(book(&env).await);
    }
    let now = bookings.iter().map(|b| b.deadline).max().unwrap() + TimeDelta::seconds(1);
    let cfg = TimeoutConfig { batch: 50, ..TimeoutConfig::default() };
    let closer = TimeoutCloser::new(env.pool.clone(), env.publisher.clone(), env.pay.clone(), cfg);
    let start = Instant::now();
    let first = closer.close_due(now).await.unwrap();
    let took = start.elapsed();
    println!("one pass closed {} orders in {took:?} ({:.0} orders/s)", first.closed, 50.0 / took.as_secs_f64());
    assert_eq!(first, CloseReport { due: 50, closed: 50, ..Default::default() });
    // Deadlines grow with booking order, so the last ten are the ones left.
    for b in &bookings[..50] {
        assert_eq!(state(&env, b).await, (PayStatus::Closed, TradeState::Cancelled));
    }
    for b in &bookings[50..] {
        assert_eq!(state(&env, b).await, (PayStatus::Waiting, TradeState::WaitPay));
    }
    assert_eq!(closer.close_due(now).await.unwrap(), CloseReport { due: 10, closed: 10, ..Default::default() });
}

/// What WeChat says about the booking's transaction, as the reconciler would publish it.
async fn report_from_wechat(env: &Env, b: &Booking) {
    let t = env.pay.query_by_out_trade_no(b.payment.as_str()).await.unwrap();
    let report = processors::transaction_report(t);
    env.publisher.publish(&report.envelope()).await.unwrap();
}

/// WeChat's refund of the booking as a `REFUND.*` callback would bring it, with its own notification id.
fn refund_callback(refund: &wechat::Refund, notification_id: &str) -> bus::events::WechatRefundReported {
    let mut r = processors::refund::refund_report(refund.clone());
    r.source = bus::events::ReportSource::Callback;
    r.notification_id = Some(notification_id.to_owned());
    r
}

fn refund_success(payload: &str) -> bool {
    payload.contains("\"refund_success\"")
}

/// A close that never reached WeChat (closed here only), then the user pays: the payment processor asks for the
/// money back. WeChat's answer to the first refund call is lost (the call times out after WeChat made the refund);
/// the retry asks for the same out_refund_no and WeChat refunds once. The reconciler learns the refund succeeded.
#[tokio::test(flavor = "multi_thread")]
async fn money_paid_for_a_closed_order_goes_back_once_even_when_the_refund_answer_is_lost() {
    let env = Env::new().await;
    let b = book(&env).await;
    {
        let mut c = env.conn().await;
        storage::payments::transition(&mut c, &b.payment, PayStatus::Waiting, PayStatus::Closed, "CLOSED")
            .await
            .unwrap();
        storage::orders::transition(&mut c, &b.order, TradeState::WaitPay, TradeState::Cancelled).await.unwrap();
    }
    let late = sandbox::Fault::LateAnswer { api: sandbox::Api::CreateRefund, ms: 1500, times: Some(1) };
    env.control.fault(&late).await.unwrap();
    let (token, tasks) = env.start();
    env.control.pay(b.payment.as_str(), "SUCCESS").await.unwrap();
    report_from_wechat(&env, &b).await;
    let processing = env.until_refund(&b, RefundStatus::Processing).await;
    let at_wechat = env.control.refunds(Some(b.payment.as_str())).await.unwrap();
    assert_eq!(at_wechat.len(), 1, "the retried request made no second refund: {at_wechat:?}");
    assert_eq!(at_wechat[0].out_refund_no, processing.sn);
    assert_eq!(at_wechat[0].amount.refund, common::TOTAL);
    assert_eq!(processing.wechat_refund_id.as_deref(), Some(at_wechat[0].refund_id.as_str()));
    // The refund callback is lost (nobody listens at the notify_url); the reconciler asks once WeChat settled it.
    let reconciler = env.refund_reconciler();
    let done = testkit::eventually(WAIT, "WeChat settled the refund", || async {
        let r = env.control.refunds(Some(b.payment.as_str())).await.unwrap();
        (r[0].status == wechat::RefundStatus::Success).then_some(r[0].clone())
    })
    .await;
    let report = reconciler.reconcile_due(Utc::now() + TimeDelta::minutes(2)).await.unwrap();
    assert_eq!((report.checked, report.published), (1, 1), "{report:?}");
    let succeeded = env.until_refund(&b, RefundStatus::Succeeded).await;
    assert!(succeeded.success_time.is_some());
    // Settled refunds are not asked about again.
    assert_eq!(reconciler.reconcile_due(Utc::now() + TimeDelta::minutes(4)).await.unwrap().checked, 0);
    // WeChat's callback arrives after all, twice, then the PROCESSING answer again out of order: nothing changes.
    for id in ["n-1", "n-2"] {
        env.publisher.publish(&refund_callback(&done, id).envelope()).await.unwrap();
    }
    env.publisher.publish(&refund_callback(&at_wechat[0], "n-3").envelope()).await.unwrap();
    testkit::eventually(WAIT, "outbox drained and notification requested", || async {
        let notes = env.payloads(Subject::NotifyMiniprogram).await;
        (env.outbox_len().await == 0 && notes.iter().any(|n| refund_success(n))).then_some(())
    })
    .await;
    let again = env.refund_reconciler();
    assert_eq!(again.reconcile_due(Utc::now() + TimeDelta::minutes(10)).await.unwrap().checked, 0);
    stop(token, tasks).await;
    let notes = env.payloads(Subject::NotifyMiniprogram).await;
    assert_eq!(notes.iter().filter(|n| refund_success(n)).count(), 1, "the user is told once: {notes:?}");
    assert_eq!(state(&env, &b).await, (PayStatus::Closed, TradeState::Cancelled), "closed stays closed");
    assert_eq!(env.refund_row(&b).await.unwrap().status(), RefundStatus::Succeeded);
    assert_eq!(env.control.refunds(Some(b.payment.as_str())).await.unwrap().len(), 1);
    assert_eq!(env.count(Subject::RefundRequested).await, 1);
    assert!(env.dead_letters("refund").await.is_empty() && env.dead_letters("refund-status").await.is_empty());
}

/// The user asks for their money back (a paid order before the stay): the payment and the order are refunded
/// and the user told once; asking again changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_requested_refund_refunds_the_payment_and_the_order_once() {
    let env = Env::new().await;
    let b = book(&env).await;
    let (token, tasks) = env.start();
    env.control.pay(b.payment.as_str(), "SUCCESS").await.unwrap();
    report_from_wechat(&env, &b).await;
    testkit::eventually(WAIT, "order paid", || async {
        (state(&env, &b).await == (PayStatus::Paid, TradeState::WaitUse)).then_some(())
    })
    .await;
    let payment = storage::payments::find_by_sn(&mut *env.conn().await, &b.payment).await.unwrap().unwrap();
    let ask = bus::events::RefundRequested {
        payment_sn: b.payment.clone(),
        order_sn: b.order.clone(),
        user_id: UserId(payment.user_id),
        reason: bus::events::RefundReason::UserRequested,
        amount: payment.total(),
    };
    env.publisher.publish(&ask.clone().envelope()).await.unwrap();
    env.until_refund(&b, RefundStatus::Processing).await;
    let done = testkit::eventually(WAIT, "WeChat settled the refund", || async {
        let r = env.control.refunds(Some(b.payment.as_str())).await.unwrap();
        (r.len() == 1 && r[0].status == wechat::RefundStatus::Success).then_some(r[0].clone())
    })
    .await;
    // The callback this time (the same notification twice: WeChat's retry).
    env.publisher.publish(&refund_callback(&done, "r-1").envelope()).await.unwrap();
    env.publisher.publish(&refund_callback(&done, "r-1").envelope()).await.unwrap();
    env.until_refund(&b, RefundStatus::Succeeded).await;
    testkit::eventually(WAIT, "payment and order refunded", || async {
        (state(&env, &b).await == (PayStatus::Refunded, TradeState::Refunded)).then_some(())
    })
    .await;
    // A second request for the same payment: the refund exists and is settled, WeChat is not asked again.
    let mut again = ask.envelope();
    again.id = uuid::Uuid::new_v4();
    env.publisher.publish(&again).await.unwrap();
    let stream = env.js.get_stream(env.t().stream_of(Subject::RefundRequested)).await.unwrap();
    testkit::eventually(WAIT, "both requests handled", || {
        let s = stream.clone();
        async move {
            let mut c: jetstream::consumer::PullConsumer = s.get_consumer("refund").await.ok()?;
            let i = c.info().await.ok()?;
            (i.num_pending == 0 && i.num_ack_pending == 0 && i.delivered.stream_sequence >= 2).then_some(())
        }
    })
    .await;
    testkit::eventually(WAIT, "outbox drained", || async { (env.outbox_len().await == 0).then_some(()) }).await;
    stop(token, tasks).await;
    assert_eq!(env.control.refunds(Some(b.payment.as_str())).await.unwrap().len(), 1);
    let notes = env.payloads(Subject::NotifyMiniprogram).await;
    assert_eq!(notes.iter().filter(|n| refund_success(n)).count(), 1, "{notes:?}");
    let statuses = env.payloads(Subject::PaymentStatus).await;
    assert_eq!(statuses.iter().filter(|p| p.contains("\"refunded\"")).count(), 1, "{statuses:?}");
    let orders = env.payloads(Subject::OrderStatus).await;
    assert_eq!(orders.iter().filter(|p| p.contains("\"refunded\"")).count(), 1, "{orders:?}");
    assert!(env.dead_letters("refund").await.is_empty() && env.dead_letters("refund-status").await.is_empty());
}

/// Reports that match no refund of ours, or disagree with it, are dead-lettered and change nothing; a refund for
/// a payment that never got its money is refused.
#[tokio::test(flavor = "multi_thread")]
async fn refund_reports_that_do_not_match_are_dead_lettered() {
    let env = Env::new().await;
    let b = book(&env).await;
    let (token, tasks) = env.start();
    let mut c = env.conn().await;
    storage::payments::transition(&mut c, &b.payment, PayStatus::Waiting, PayStatus::Closed, "CLOSED").await.unwrap();
    let payment = storage::payments::find_by_sn(&mut c, &b.payment).await.unwrap().unwrap();
    storage::refunds::insert_or_get(&mut c, &storage::refunds::NewRefund::full(&payment, false)).await.unwrap();
    drop(c);
    let sn = storage::RefundSn::for_payment(&b.payment);
    let base = bus::events::WechatRefundReported {
        source: bus::events::ReportSource::Callback,
        notification_id: Some("x".into()),
        mchid: Some(env.pay.settings().mchid.clone()),
        out_trade_no: b.payment.to_string(),
        out_refund_no: sn.to_string(),
        refund_id: "50000000382019052709732678859".into(),
        status: "SUCCESS".into(),
        success_time: Some(Utc::now()),
        amount_refund: common::TOTAL,
        amount_total: common::TOTAL,
    };
    let cases = [
        (
            "wrong amount",
            bus::events::WechatRefundReported { amount_refund: 100, notification_id: Some("a".into()), ..base.clone() },
        ),
        (
            "unknown refund",
            bus::events::WechatRefundReported {
                out_refund_no: "RFD0000000000000000000001".into(),
                notification_id: Some("b".into()),
                ..base.clone()
            },
        ),
        (
            "not a refund sn",
            bus::events::WechatRefundReported {
                out_refund_no: "'; drop table refund".into(),
                notification_id: Some("c".into()),
                ..base.clone()
            },
        ),
        (
            "foreign merchant",
            bus::events::WechatRefundReported {
                mchid: Some("1900000109".into()),
                notification_id: Some("d".into()),
                ..base.clone()
            },
        ),
        (
            "unknown status",
            bus::events::WechatRefundReported {
                status: "MAYBE".into(),
                notification_id: Some("e".into()),
                ..base.clone()
            },
        ),
    ];
    for (_, r) in &cases {
        env.publisher.publish(&r.clone().envelope()).await.unwrap();
    }
    // A refund for a payment still waiting for its money: refused.
    let other = book(&env).await;
    let ask = bus::events::RefundRequested {
        payment_sn: other.payment.clone(),
        order_sn: other.order.clone(),
        user_id: UserId(payment.user_id),
        reason: bus::events::RefundReason::UserRequested,
        amount: Fen::new(common::TOTAL).unwrap(),
    };
    env.publisher.publish(&ask.envelope()).await.unwrap();
    let letters = testkit::eventually(WAIT, "every bad report dead-lettered", || async {
        let l = env.dead_letters("refund-status").await;
        (l.len() == cases.len()).then_some(l)
    })
    .await;
    let refused = testkit::eventually(WAIT, "the unpaid refund refused", || async {
        let l = env.dead_letters("refund").await;
        (!l.is_empty()).then_some(l)
    })
    .await;
    stop(token, tasks).await;
    assert!(letters.iter().any(|l| l.contains(&common::TOTAL.to_string()) && l.contains("100")), "{letters:?}");
    assert!(letters.iter().any(|l| l.contains("not ours")), "{letters:?}");
    assert!(letters.iter().any(|l| l.contains("MAYBE")), "{letters:?}");
    assert!(refused[0].contains("still waiting"), "{refused:?}");
    assert_eq!(env.refund_row(&b).await.unwrap().status(), RefundStatus::Requested, "nothing changed");
    assert!(env.refund_row(&other).await.is_none());
    assert!(env.control.refunds(None).await.unwrap().is_empty(), "WeChat was never asked");
}
