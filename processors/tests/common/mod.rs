//! Shared by the processors' tests: their own database, streams and outbox relay; the payment and order processors
//! as `paystream all` runs them; and test data (a user, the "Lakeside cabin" homestay, an order for two nights and
//! its waiting payment of ¥598.00).

#![allow(dead_code)] // each test crate uses part of it

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bus::{ConsumerConfig, OutboxConfig, Publisher, Relay, Subject, Topology};
use chrono::{DateTime, TimeDelta, Utc};
use futures::StreamExt as _;
use storage::{AuthType, Conn, Fen, OrderSn, PaymentSn, PgPool, UserId, homestays, orders, payments, users};
use testkit::TestDb;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A migrated database of the test's own, and streams under a prefix of its own.
pub struct Stores {
    pub db: TestDb,
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub publisher: Publisher,
}

pub async fn stores(prefix: &str) -> Stores {
    observability::init_for_tests();
    let db = TestDb::create().await;
    let db_cfg = storage::DbConfig::new(&db.url);
    storage::migrate(&db_cfg).await.unwrap();
    let pool = storage::pool(&db_cfg).unwrap();
    let js = jetstream::new(testkit::nats().await);
    let topology = Topology::new(&testkit::unique(prefix)).unwrap();
    topology.ensure_streams(&js).await.unwrap();
    let publisher = Publisher::new(js.clone(), Arc::new(topology));
    Stores { db, pool, js, publisher }
}

/// Quick retries, so failure paths finish within a test's deadline.
pub fn consumer_config(concurrency: usize) -> ConsumerConfig {
    ConsumerConfig {
        ack_wait: Duration::from_secs(5),
        handler_timeout: Duration::from_secs(2),
        backoff: vec![Duration::from_millis(50), Duration::from_millis(100)],
        max_deliver: 3,
        concurrency,
    }
}

/// The outbox relay, the payment processor (for merchant `appid`/`mchid`) and the order processor, until `token`.
pub fn start_pipeline(
    pool: &PgPool,
    publisher: &Publisher,
    (appid, mchid): (&str, &str),
    cfg: &ConsumerConfig,
    token: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    let relay = Relay::new(
        pool.clone(),
        publisher.clone(),
        OutboxConfig { poll_interval: Duration::from_millis(200), ..Default::default() },
    );
    let (p, pl, t, c) = (publisher.clone(), pool.clone(), token.clone(), cfg.clone());
    let (appid, mchid) = (appid.to_owned(), mchid.to_owned());
    let payment = tokio::spawn(async move { processors::run_payment(p, pl, &appid, &mchid, c, t).await.unwrap() });
    let (p, pl, t, c) = (publisher.clone(), pool.clone(), token.clone(), cfg.clone());
    let order = tokio::spawn(async move { processors::run_order(p, pl, c, t).await.unwrap() });
    let relay = tokio::spawn(relay.run(token.clone()));
    vec![payment, order, relay]
}

/// Messages stored on a subject (a count that includes every duplicate that got past JetStream).
pub async fn stored(js: &jetstream::Context, t: &Topology, subject: Subject) -> u64 {
    let stream = js.get_stream(t.stream_of(subject)).await.unwrap();
    let info = stream.info_with_subjects(t.subject(subject)).await.unwrap();
    let n: Vec<_> = info.collect().await;
    n.into_iter().map(|r| r.unwrap().1 as u64).sum()
}

/// The order's total, in fen.
pub const TOTAL: i64 = 59800;

/// What [`booking`] wrote.
pub struct Booked {
    pub user: UserId,
    pub order: OrderSn,
    pub payment: PaymentSn,
}

pub async fn user(conn: &mut Conn, openid: &str, mobile: Option<&str>) -> UserId {
    let new = users::NewUser { mobile: mobile.map(str::to_owned), ..Default::default() };
    users::insert_with_auth(conn, &new, AuthType::WxMini, openid).await.unwrap().id()
}

/// The homestay's id.
pub async fn homestay(conn: &mut Conn) -> i64 {
    let new = homestays::NewHomestay {
        title: "Lakeside cabin".into(),
        sub_title: String::new(),
        info: String::new(),
        people_num: 4,
        row_state: 1,
        row_type: 0,
        food_info: String::new(),
        food_price: 0,
        homestay_price: 29900,
        market_homestay_price: 0,
    };
    homestays::insert(conn, &new).await.unwrap().id
}

/// Two nights from three days ahead, [`TOTAL`], payable until `deadline`.
pub fn new_order(sn: &OrderSn, user: UserId, homestay: i64, deadline: DateTime<Utc>) -> orders::NewOrder {
    let now = Utc::now();
    orders::NewOrder {
        sn: sn.to_string(),
        user_id: user.0,
        homestay_id: homestay,
        title: "Lakeside cabin".into(),
        sub_title: String::new(),
        cover: String::new(),
        info: String::new(),
        people_num: 4,
        row_type: 0,
        need_food: false,
        food_info: String::new(),
        food_price: 0,
        homestay_price: 29900,
        market_homestay_price: 0,
        homestay_business_id: 0,
        homestay_user_id: 0,
        live_start_date: now + TimeDelta::days(3),
        live_end_date: now + TimeDelta::days(5),
        live_people_num: 2,
        trade_code: "20261127".into(),
        remark: String::new(),
        order_total_price: TOTAL,
        food_total_price: 0,
        homestay_total_price: TOTAL,
        pay_deadline: deadline,
    }
}

/// A user, a homestay, an order payable until `deadline` and its waiting payment (no prepay yet).
pub async fn booking(conn: &mut Conn, openid: &str, mobile: Option<&str>, deadline: DateTime<Utc>) -> Booked {
    let user = user(conn, openid, mobile).await;
    let homestay = homestay(conn).await;
    let now = Utc::now();
    let order = OrderSn::generate(now);
    orders::insert(conn, &new_order(&order, user, homestay, deadline)).await.unwrap();
    let payment = PaymentSn::generate(now);
    payments::insert(conn, &payments::NewPayment::homestay_order(&payment, user, Fen::new(TOTAL).unwrap(), &order))
        .await
        .unwrap();
    Booked { user, order, payment }
}
