//! Payment and order processors against real JetStream and Postgres: a verified WeChat report goes in, a paid
//! order, one `payment.status` and one pair of notification requests come out — whatever the replays, crashes
//! and bad input.

mod common;

use common::Booked;

use std::time::Duration;

use async_nats::jetstream;
use bus::events::{ReportSource, WechatTransactionReported};
use bus::{Publisher, Subject, Topology, headers};
use chrono::{TimeDelta, Utc};
use storage::{Conn, PayStatus, PaymentSn, PgPool, TradeState};
use testkit::TestDb;
use tokio_util::sync::CancellationToken;

const APPID: &str = "wxtestappid000001";
const MCHID: &str = "1900000001";

struct Env {
    /// Owned so the test's database lives as long as the test.
    _db: TestDb,
    pool: PgPool,
    js: jetstream::Context,
    publisher: Publisher,
}

impl Env {
    async fn new() -> Env {
        let common::Stores { db, pool, js, publisher } = common::stores("p").await;
        Env { _db: db, pool, js, publisher }
    }

    fn t(&self) -> &Topology {
        self.publisher.topology()
    }

    /// Starts the relay and both processors; returns the token that stops them and their tasks.
    fn start(&self) -> (CancellationToken, Vec<tokio::task::JoinHandle<()>>) {
        let token = CancellationToken::new();
        let cfg = common::consumer_config(16);
        (token.clone(), common::start_pipeline(&self.pool, &self.publisher, (APPID, MCHID), &cfg, &token))
    }

    async fn conn(&self) -> storage::PooledConn {
        self.pool.get().await.unwrap()
    }

    /// Messages stored on a subject (a count that includes every duplicate that got past JetStream).
    async fn count(&self, subject: Subject) -> u64 {
        common::stored(&self.js, self.t(), subject).await
    }

    async fn dead_letters(&self, consumer: &str) -> Vec<String> {
        let stream = self.js.get_stream(self.t().dlq_stream()).await.unwrap();
        let n = stream.get_info().await.unwrap().state.messages;
        let mut reasons = Vec::new();
        for seq in 1..=n {
            if let Ok(m) = stream.get_raw_message(seq).await
                && m.subject.as_str() == self.t().dlq_subject(consumer)
            {
                reasons.push(m.headers.get(headers::DLQ_REASON).map(|v| v.as_str().to_owned()).unwrap_or_default());
            }
        }
        reasons
    }

    async fn report(&self, r: WechatTransactionReported) {
        self.publisher.publish(&r.envelope()).await.unwrap();
    }
}

async fn book(conn: &mut Conn, mobile: Option<&str>) -> Booked {
    let deadline = Utc::now() + TimeDelta::minutes(30);
    common::booking(conn, &testkit::unique("openid-"), mobile, deadline).await
}

fn success(b: &Booked, notification: &str) -> WechatTransactionReported {
    WechatTransactionReported {
        source: ReportSource::Callback,
        notification_id: Some(notification.to_owned()),
        appid: APPID.into(),
        mchid: MCHID.into(),
        out_trade_no: b.payment.to_string(),
        transaction_id: Some(format!("42000{:023}", b.user.0)),
        trade_type: Some("JSAPI".into()),
        trade_state: "SUCCESS".into(),
        trade_state_desc: "支付成功".into(),
        success_time: Some(Utc::now()),
        amount_total: Some(common::TOTAL),
        currency: Some("CNY".into()),
    }
}

async fn state(env: &Env, b: &Booked) -> (PayStatus, TradeState) {
    let mut c = env.conn().await;
    let p = storage::payments::find_by_sn(&mut c, &b.payment).await.unwrap().unwrap().status();
    let o = storage::orders::find_by_sn(&mut c, &b.order).await.unwrap().unwrap().state();
    (p, o)
}

async fn until_paid(env: &Env, b: &Booked) {
    testkit::eventually(Duration::from_secs(20), "order paid", || async {
        (state(env, b).await == (PayStatus::Paid, TradeState::WaitUse)).then_some(())
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

#[tokio::test(flavor = "multi_thread")]
async fn a_verified_success_pays_the_payment_and_the_order_and_requests_messages() {
    let env = Env::new().await;
    let b = book(&mut *env.conn().await, Some("13800138000")).await;
    let (token, tasks) = env.start();
    env.report(success(&b, "notify-1")).await;
    until_paid(&env, &b).await;
    until_count(&env, Subject::PaymentStatus, 1).await;
    until_count(&env, Subject::OrderStatus, 1).await;
    until_count(&env, Subject::NotifyMiniprogram, 2).await;
    until_count(&env, Subject::NotifySms, 1).await;
    stop(token, tasks).await;
    let mut c = env.conn().await;
    let p = storage::payments::find_by_sn(&mut c, &b.payment).await.unwrap().unwrap();
    assert_eq!(p.trade_state, "SUCCESS");
    assert_eq!(p.trade_type, "JSAPI");
    assert!(p.transaction_id.is_some() && p.pay_time.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_success_reported_five_times_and_concurrently_changes_state_once() {
    let env = Env::new().await;
    let b = book(&mut *env.conn().await, None).await;
    let (token, tasks) = env.start();
    let mut sends = Vec::new();
    for i in 0..5 {
        // different notification ids: JetStream cannot dedupe these, the processors must
        let (p, r) = (env.publisher.clone(), success(&b, &format!("notify-{i}")));
        sends.push(tokio::spawn(async move { p.publish(&r.envelope()).await.unwrap() }));
    }
    for s in sends {
        s.await.unwrap();
    }
    env.report(success(&b, "notify-0")).await; // and one exact repeat
    until_paid(&env, &b).await;
    until_count(&env, Subject::NotifyMiniprogram, 2).await;
    let consumer = env.js.get_stream(env.t().stream_of(Subject::WechatTransaction)).await.unwrap();
    testkit::eventually(Duration::from_secs(20), "all reports handled", || {
        let s = consumer.clone();
        async move {
            let mut c: jetstream::consumer::PullConsumer = s.get_consumer(processors::PAYMENT_CONSUMER).await.ok()?;
            let i = c.info().await.ok()?;
            (i.num_pending == 0 && i.num_ack_pending == 0).then_some(())
        }
    })
    .await;
    stop(token, tasks).await;
    assert_eq!(env.count(Subject::WechatTransaction).await, 5, "the exact repeat was dropped by JetStream");
    assert_eq!(env.count(Subject::PaymentStatus).await, 1);
    assert_eq!(env.count(Subject::OrderStatus).await, 1);
    assert_eq!(env.count(Subject::NotifyMiniprogram).await, 2);
    assert_eq!(env.count(Subject::NotifySms).await, 0, "no mobile, no SMS");
    assert!(env.dead_letters("payment").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn mismatches_and_unknown_payments_are_dead_lettered_and_change_nothing() {
    let env = Env::new().await;
    let b = book(&mut *env.conn().await, None).await;
    let (token, tasks) = env.start();
    let mut wrong_amount = success(&b, "n-amount");
    wrong_amount.amount_total = Some(1);
    let mut wrong_merchant = success(&b, "n-merchant");
    wrong_merchant.mchid = "1900009999".into();
    let mut unknown = success(&b, "n-unknown");
    unknown.out_trade_no = PaymentSn::generate(Utc::now()).to_string();
    let mut garbage = success(&b, "n-garbage");
    garbage.out_trade_no = "not-ours".into();
    let mut no_currency = success(&b, "n-currency");
    no_currency.currency = None;
    for r in [wrong_amount, wrong_merchant, unknown, garbage, no_currency] {
        env.report(r).await;
    }
    let reasons = testkit::eventually(Duration::from_secs(20), "five dead letters", || async {
        let r = env.dead_letters("payment").await;
        (r.len() == 5).then_some(r)
    })
    .await;
    stop(token, tasks).await;
    assert!(reasons.iter().any(|r| r.contains("payments are in CNY")), "a success must say CNY: {reasons:?}");
    assert!(reasons.iter().any(|r| r.starts_with("amount mismatch") && r.contains("WeChat says 1 fen")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("is not ours")), "{reasons:?}");
    assert_eq!(reasons.iter().filter(|r| r.starts_with("unknown payment")).count(), 2, "{reasons:?}");
    assert_eq!(state(&env, &b).await, (PayStatus::Waiting, TradeState::WaitPay));
    assert_eq!(env.count(Subject::PaymentStatus).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn money_for_an_order_that_no_longer_waits_is_sent_back() {
    let env = Env::new().await;
    let b = book(&mut *env.conn().await, None).await;
    storage::orders::transition(&mut *env.conn().await, &b.order, TradeState::WaitPay, TradeState::Cancelled)
        .await
        .unwrap();
    let (token, tasks) = env.start();
    env.report(success(&b, "late")).await;
    until_count(&env, Subject::RefundRequested, 1).await;
    stop(token, tasks).await;
    assert_eq!(state(&env, &b).await, (PayStatus::Paid, TradeState::Cancelled), "the order stays closed");
    assert_eq!(env.count(Subject::NotifyMiniprogram).await, 0, "no pay-success for a closed order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processors_killed_mid_batch_still_pay_every_order_exactly_once() {
    let env = Env::new().await;
    let mut bookings = Vec::new();
    {
        let mut c = env.conn().await;
        for _ in 0..150 {
            bookings.push(book(&mut c, None).await);
        }
    }
    for (i, b) in bookings.iter().enumerate() {
        env.report(success(b, &format!("n-{i}"))).await;
    }
    // Kill everything (no graceful stop) twice while it works, then let a fresh set finish.
    for round in 1..=2u64 {
        let (_token, tasks) = env.start();
        testkit::eventually(Duration::from_secs(30), "some progress", || async {
            (env.count(Subject::PaymentStatus).await >= 40 * round).then_some(())
        })
        .await;
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }
    let (token, tasks) = env.start();
    for b in &bookings {
        until_paid(&env, b).await;
    }
    until_count(&env, Subject::NotifyMiniprogram, 300).await;
    stop(token, tasks).await;
    assert_eq!(env.count(Subject::PaymentStatus).await, 150, "one payment.status per payment");
    assert_eq!(env.count(Subject::OrderStatus).await, 150);
    assert_eq!(env.count(Subject::NotifyMiniprogram).await, 300, "one pay-success and one check-in each");
    assert!(env.dead_letters("payment").await.is_empty());
    assert!(env.dead_letters("order").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn money_for_a_payment_closed_here_is_sent_back_and_a_late_success_after_a_refund_is_a_no_op() {
    let env = Env::new().await;
    let closed = book(&mut *env.conn().await, None).await;
    storage::payments::transition(
        &mut *env.conn().await,
        &closed.payment,
        PayStatus::Waiting,
        PayStatus::Closed,
        "CLOSED",
    )
    .await
    .unwrap();
    let refunded = book(&mut *env.conn().await, None).await;
    let (token, tasks) = env.start();
    env.report(success(&closed, "after-close")).await;
    until_count(&env, Subject::RefundRequested, 1).await;
    env.report(success(&refunded, "first")).await;
    until_paid(&env, &refunded).await;
    storage::payments::transition(
        &mut *env.conn().await,
        &refunded.payment,
        PayStatus::Paid,
        PayStatus::Refunded,
        "REFUND",
    )
    .await
    .unwrap();
    env.report(success(&refunded, "late-replay")).await;
    let mut wrong_currency = success(&closed, "usd");
    wrong_currency.currency = Some("USD".into());
    env.report(wrong_currency).await;
    let reasons = testkit::eventually(Duration::from_secs(20), "the USD report dead-lettered", || async {
        let r = env.dead_letters("payment").await;
        (!r.is_empty()).then_some(r)
    })
    .await;
    let consumer = env.js.get_stream(env.t().stream_of(Subject::WechatTransaction)).await.unwrap();
    testkit::eventually(Duration::from_secs(20), "all reports handled", || {
        let s = consumer.clone();
        async move {
            let mut c: jetstream::consumer::PullConsumer = s.get_consumer(processors::PAYMENT_CONSUMER).await.ok()?;
            let i = c.info().await.ok()?;
            (i.num_pending == 0 && i.num_ack_pending == 0).then_some(())
        }
    })
    .await;
    stop(token, tasks).await;
    assert_eq!(reasons.len(), 1, "only the foreign currency is refused: {reasons:?}");
    assert!(reasons[0].contains("CNY"), "{reasons:?}");
    assert_eq!(env.count(Subject::RefundRequested).await, 1, "the closed payment's money is asked back, once");
    assert_eq!(state(&env, &closed).await.0, PayStatus::Closed);
    assert_eq!(state(&env, &refunded).await.0, PayStatus::Refunded, "a late success does not undo a refund");
}

#[tokio::test(flavor = "multi_thread")]
async fn reports_handled_in_batches_each_get_their_own_outcome() {
    let env = Env::new().await;
    let mut booked = Vec::new();
    for i in 0..20 {
        let mobile = (i < 10).then(|| format!("1380013{i:04}"));
        booked.push(book(&mut *env.conn().await, mobile.as_deref()).await);
    }
    let mismatched = book(&mut *env.conn().await, None).await;
    // Everything is in the stream before the processors start, so they take it in batches: good reports, a
    // second report of one payment, a wrong amount and an unknown payment side by side.
    for (i, b) in booked.iter().enumerate() {
        env.report(success(b, &format!("batch-{i}"))).await;
    }
    env.report(success(&booked[0], "batch-again")).await;
    let mut wrong_amount = success(&mismatched, "batch-amount");
    wrong_amount.amount_total = Some(1);
    env.report(wrong_amount).await;
    let mut unknown = success(&booked[1], "batch-unknown");
    unknown.out_trade_no = PaymentSn::generate(Utc::now()).to_string();
    env.report(unknown).await;

    let (token, tasks) = env.start();
    for b in &booked {
        until_paid(&env, b).await;
    }
    until_count(&env, Subject::NotifyMiniprogram, 40).await;
    until_count(&env, Subject::NotifySms, 10).await;
    let reasons = testkit::eventually(Duration::from_secs(20), "two dead letters", || async {
        let r = env.dead_letters("payment").await;
        (r.len() == 2).then_some(r)
    })
    .await;
    stop(token, tasks).await;
    assert!(reasons.iter().any(|r| r.contains("amount mismatch")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("unknown payment")), "{reasons:?}");
    assert_eq!(state(&env, &mismatched).await, (PayStatus::Waiting, TradeState::WaitPay));
    assert_eq!(env.count(Subject::PaymentStatus).await, 20, "one state change per payment");
    assert_eq!(env.count(Subject::OrderStatus).await, 20);
    assert_eq!(env.count(Subject::NotifyMiniprogram).await, 40);
    assert_eq!(env.count(Subject::NotifySms).await, 10, "SMS only for the users with a mobile");
    assert!(env.dead_letters("order").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paid_event_replayed_after_the_order_was_refunded_changes_nothing_and_refunds_nothing() {
    let env = Env::new().await;
    let b = book(&mut *env.conn().await, None).await;
    let (token, tasks) = env.start();
    env.report(success(&b, "replay-1")).await;
    until_paid(&env, &b).await;
    until_count(&env, Subject::NotifyMiniprogram, 2).await;
    // The user's refund went through meanwhile.
    let mut c = env.conn().await;
    storage::payments::transition(&mut c, &b.payment, PayStatus::Paid, PayStatus::Refunded, "REFUND").await.unwrap();
    storage::orders::transition(&mut c, &b.order, TradeState::WaitUse, TradeState::Refunded).await.unwrap();
    drop(c);

    // The payment's Paid event comes back long after JetStream's duplicate window (a redrive, say): another
    // message id, the same event.
    let stream = env.js.get_stream(env.t().stream_of(Subject::PaymentStatus)).await.unwrap();
    let original = stream.get_raw_message(1).await.unwrap();
    let mut h = original.headers.clone();
    h.insert(headers::MSG_ID, "redrive:replay-1");
    env.publisher.publish_raw(&original.subject, h, original.payload.clone()).await.unwrap();
    until_count(&env, Subject::PaymentStatus, 2).await;
    testkit::eventually(Duration::from_secs(20), "the replay handled", || async {
        let mut c: jetstream::consumer::PullConsumer = stream.get_consumer(processors::ORDER_CONSUMER).await.ok()?;
        let i = c.info().await.ok()?;
        (i.delivered.stream_sequence == 2 && i.num_pending == 0 && i.num_ack_pending == 0).then_some(())
    })
    .await;
    stop(token, tasks).await;
    assert_eq!(state(&env, &b).await, (PayStatus::Refunded, TradeState::Refunded));
    assert_eq!(env.count(Subject::RefundRequested).await, 0, "a replay is not money for a closed order");
    assert_eq!(env.count(Subject::OrderStatus).await, 1);
    assert!(env.dead_letters("order").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_success_for_a_closed_payment_whose_refund_request_still_waits_is_no_dead_letter() {
    let env = Env::new().await;
    let b = book(&mut *env.conn().await, None).await;
    let mut c = env.conn().await;
    storage::payments::transition(&mut c, &b.payment, PayStatus::Waiting, PayStatus::Closed, "CLOSED").await.unwrap();
    // The refund request of the first SUCCESS is still in the outbox (no relay runs here, and this writer died
    // before publishing it): exactly the request a replay would write again.
    let ask = bus::events::RefundRequested {
        payment_sn: b.payment.clone(),
        order_sn: b.order.clone(),
        user_id: b.user,
        reason: bus::events::RefundReason::OrderClosed,
        amount: storage::Fen::new(common::TOTAL).unwrap(),
    };
    storage::AsyncConnection::transaction::<_, storage::StorageError, _>(&mut *c, async |c| {
        bus::enqueue(c, &ask.clone().envelope()).await
    })
    .await
    .unwrap();
    drop(c);
    let token = CancellationToken::new();
    let cfg = common::consumer_config(4);
    let (p, pool, t) = (env.publisher.clone(), env.pool.clone(), token.clone());
    let payment = tokio::spawn(async move { processors::run_payment(p, pool, APPID, MCHID, cfg, t).await.unwrap() });
    env.report(success(&b, "replayed")).await;
    let stream = env.js.get_stream(env.t().stream_of(Subject::WechatTransaction)).await.unwrap();
    testkit::eventually(Duration::from_secs(20), "the replay handled", || async {
        let mut c: jetstream::consumer::PullConsumer = stream.get_consumer(processors::PAYMENT_CONSUMER).await.ok()?;
        let i = c.info().await.ok()?;
        (i.delivered.stream_sequence == 1 && i.num_pending == 0 && i.num_ack_pending == 0).then_some(())
    })
    .await;
    token.cancel();
    payment.await.unwrap();
    assert!(env.dead_letters("payment").await.is_empty(), "the same request again is not an error");
    // Both requests wait for the relays, the repeat behind the first; JetStream keeps one.
    let relay = bus::Relay::new(env.pool.clone(), env.publisher.clone(), bus::OutboxConfig::default());
    assert_eq!(relay.drain().await.unwrap(), 2);
    assert_eq!(env.count(Subject::RefundRequested).await, 1, "the money is asked back once");
}
