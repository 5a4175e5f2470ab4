//! Storage against a real PostgreSQL: migrations, constraints and conditional updates.

use chrono::{TimeDelta, Utc};
use diesel::prelude::*;
use storage::{
    AsyncConnection, AuthType, Conn, DomainError, Fen, OrderSn, PayStatus, PaymentSn, StorageError, TradeState,
    Transition, UserId, homestays, orders, payments, processed, users,
};
use testkit::TestDb;

async fn fresh() -> (TestDb, Conn) {
    let db = TestDb::create().await;
    storage::migrate(&storage::DbConfig::new(&db.url)).await.expect("migrations apply");
    let conn = storage::connect(&storage::DbConfig::new(&db.url)).await.unwrap();
    (db, conn)
}

async fn user(conn: &mut Conn, openid: &str) -> UserId {
    users::insert_with_auth(conn, &users::NewUser::default(), AuthType::WxMini, openid).await.unwrap().id()
}

async fn order(conn: &mut Conn, user: UserId, deadline_in: TimeDelta) -> OrderSn {
    let h = homestays::insert(
        conn,
        &homestays::NewHomestay {
            title: "Lakeside cabin".into(),
            sub_title: String::new(),
            info: String::new(),
            people_num: 4,
            row_state: 1,
            row_type: 0,
            food_info: String::new(),
            food_price: 0,
            homestay_price: 29900,
            market_homestay_price: 39900,
        },
    )
    .await
    .unwrap();
    let now = Utc::now();
    let sn = OrderSn::generate(now);
    orders::insert(
        conn,
        &orders::NewOrder {
            sn: sn.to_string(),
            user_id: user.0,
            homestay_id: h.id,
            title: h.title.clone(),
            sub_title: String::new(),
            cover: String::new(),
            info: String::new(),
            people_num: 4,
            row_type: 0,
            need_food: false,
            food_info: String::new(),
            food_price: 0,
            homestay_price: 29900,
            market_homestay_price: 39900,
            homestay_business_id: 0,
            homestay_user_id: 0,
            live_start_date: now + TimeDelta::days(3),
            live_end_date: now + TimeDelta::days(4),
            live_people_num: 2,
            trade_code: "12345678".into(),
            remark: String::new(),
            order_total_price: 29900,
            food_total_price: 0,
            homestay_total_price: 29900,
            pay_deadline: now + deadline_in,
        },
    )
    .await
    .unwrap();
    sn
}

fn paid(txid: &str) -> payments::PaidDetails {
    payments::PaidDetails {
        transaction_id: txid.into(),
        trade_type: "JSAPI".into(),
        trade_state: "SUCCESS".into(),
        trade_state_desc: "支付成功".into(),
        pay_time: Utc::now(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn migrations_are_idempotent_and_match_the_diesel_schema() {
    let (db, mut conn) = fresh().await;
    assert_eq!(storage::migrate(&storage::DbConfig::new(&db.url)).await.unwrap(), 0, "second run applies nothing");

    // Every column diesel knows must exist in the migrated database: run each table's full select.
    use storage::schema::*;
    let selects = [
        diesel::debug_query::<diesel::pg::Pg, _>(&users::table.select(users::all_columns)).to_string(),
        diesel::debug_query::<diesel::pg::Pg, _>(&user_auth::table.select(user_auth::all_columns)).to_string(),
        diesel::debug_query::<diesel::pg::Pg, _>(&homestay::table.select(homestay::all_columns)).to_string(),
        diesel::debug_query::<diesel::pg::Pg, _>(&homestay_order::table.select(homestay_order::all_columns))
            .to_string(),
        diesel::debug_query::<diesel::pg::Pg, _>(&third_payment::table.select(third_payment::all_columns)).to_string(),
        diesel::debug_query::<diesel::pg::Pg, _>(&refund::table.select(refund::all_columns)).to_string(),
        diesel::debug_query::<diesel::pg::Pg, _>(&notification::table.select(notification::all_columns)).to_string(),
        diesel::debug_query::<diesel::pg::Pg, _>(&outbox::table.select(outbox::all_columns)).to_string(),
        diesel::debug_query::<diesel::pg::Pg, _>(&processed_event::table.select(processed_event::all_columns))
            .to_string(),
    ];
    for sql in selects {
        let sql = sql.split(" -- binds").next().unwrap();
        storage::RunQueryDsl::execute(diesel::sql_query(format!("{sql} LIMIT 0")), &mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_user_per_login_and_one_login_of_each_type_per_user() {
    let (_db, mut conn) = fresh().await;
    let u = user(&mut conn, "openid-a").await;
    let again = users::insert_with_auth(&mut conn, &users::NewUser::default(), AuthType::WxMini, "openid-a").await;
    assert_eq!(again.unwrap_err().conflict(), Some("user_auth_type_key_unique"));
    let second = users::add_auth(&mut conn, u, AuthType::WxMini, "openid-b").await;
    assert_eq!(second.unwrap_err().conflict(), Some("user_auth_user_type_unique"));
    users::add_auth(&mut conn, u, AuthType::System, "13800138000").await.unwrap();
    let found = users::find_by_auth(&mut conn, AuthType::WxMini, "openid-a").await.unwrap().unwrap();
    assert_eq!(found.id(), u);
    assert_eq!(users::auth_key(&mut conn, u, AuthType::System).await.unwrap().as_deref(), Some("13800138000"));
}

#[tokio::test(flavor = "multi_thread")]
async fn at_most_one_open_payment_per_order() {
    let (_db, mut conn) = fresh().await;
    let u = user(&mut conn, "openid-a").await;
    let o = order(&mut conn, u, TimeDelta::minutes(30)).await;
    let total = Fen::new(29900).unwrap();
    let first = PaymentSn::generate(Utc::now());
    payments::insert(&mut conn, &payments::NewPayment::homestay_order(&first, u, total, &o)).await.unwrap();
    let second = PaymentSn::generate(Utc::now());
    let err =
        payments::insert(&mut conn, &payments::NewPayment::homestay_order(&second, u, total, &o)).await.unwrap_err();
    assert_eq!(err.conflict(), Some("third_payment_one_open_per_order"));
    assert_eq!(payments::find_open_for_order(&mut conn, &o).await.unwrap().unwrap().sn(), first);

    // once the first is closed, a new open payment may exist
    let t = payments::transition(&mut conn, &first, PayStatus::Waiting, PayStatus::Closed, "CLOSED").await.unwrap();
    assert_eq!(t, Transition::Changed);
    payments::insert(&mut conn, &payments::NewPayment::homestay_order(&second, u, total, &o)).await.unwrap();
    assert_eq!(payments::list_for_order(&mut conn, &o).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn payment_updates_apply_from_their_state_only() {
    let (_db, mut conn) = fresh().await;
    let u = user(&mut conn, "openid-a").await;
    let o = order(&mut conn, u, TimeDelta::minutes(30)).await;
    let sn = PaymentSn::generate(Utc::now());
    payments::insert(&mut conn, &payments::NewPayment::homestay_order(&sn, u, Fen::new(29900).unwrap(), &o))
        .await
        .unwrap();

    assert_eq!(
        payments::mark_paid(&mut conn, &sn, &paid("4200000000000000000000000001")).await.unwrap(),
        Transition::Changed
    );
    assert_eq!(
        payments::mark_paid(&mut conn, &sn, &paid("4200000000000000000000000001")).await.unwrap(),
        Transition::Unchanged,
        "a replayed success is a no-op"
    );
    let row = payments::find_by_sn(&mut conn, &sn).await.unwrap().unwrap();
    assert_eq!(row.status(), PayStatus::Paid);
    assert_eq!(row.transaction_id.as_deref(), Some("4200000000000000000000000001"));
    assert!(row.pay_time.is_some());

    let close = payments::transition(&mut conn, &sn, PayStatus::Waiting, PayStatus::Closed, "CLOSED").await;
    assert!(
        matches!(close, Err(StorageError::Domain(DomainError::Refused { ref from, .. })) if from == "Paid"),
        "a paid payment cannot be closed: {close:?}"
    );
    let refund = payments::transition(&mut conn, &sn, PayStatus::Paid, PayStatus::Refunded, "REFUND").await.unwrap();
    assert_eq!(refund, Transition::Changed);
    let late = payments::mark_paid(&mut conn, &sn, &paid("4200000000000000000000000001")).await;
    assert!(matches!(late, Err(StorageError::Domain(DomainError::Refused { .. }))), "{late:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_successes_change_a_payment_once() {
    let (db, mut conn) = fresh().await;
    let u = user(&mut conn, "openid-a").await;
    let o = order(&mut conn, u, TimeDelta::minutes(30)).await;
    let sn = PaymentSn::generate(Utc::now());
    payments::insert(&mut conn, &payments::NewPayment::homestay_order(&sn, u, Fen::new(29900).unwrap(), &o))
        .await
        .unwrap();

    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (url, sn) = (db.url.clone(), sn.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = storage::connect(&storage::DbConfig::new(&url)).await.unwrap();
            payments::mark_paid(&mut c, &sn, &paid("4200000000000000000000000002")).await.unwrap()
        }));
    }
    let mut changed = 0;
    for t in tasks {
        if t.await.unwrap() == Transition::Changed {
            changed += 1;
        }
    }
    assert_eq!(changed, 1, "exactly one of eight concurrent callbacks changes the payment");
}

#[tokio::test(flavor = "multi_thread")]
async fn order_transitions_are_conditional_and_say_where_the_order_really_is() {
    let (_db, mut conn) = fresh().await;
    let u = user(&mut conn, "openid-a").await;
    let o = order(&mut conn, u, TimeDelta::minutes(30)).await;
    assert_eq!(
        orders::transition(&mut conn, &o, TradeState::WaitPay, TradeState::WaitUse).await.unwrap(),
        Transition::Changed
    );
    assert_eq!(
        orders::transition(&mut conn, &o, TradeState::WaitPay, TradeState::WaitUse).await.unwrap(),
        Transition::Unchanged
    );
    // the 30-minute closer must not cancel a paid order
    let cancel = orders::transition(&mut conn, &o, TradeState::WaitPay, TradeState::Cancelled).await;
    assert!(
        matches!(cancel, Err(StorageError::Domain(DomainError::Refused { ref from, .. })) if from == "WaitUse"),
        "{cancel:?}"
    );
    // a refused arrow never reaches the database
    assert!(orders::transition(&mut conn, &o, TradeState::Used, TradeState::WaitPay).await.is_err());
    assert_eq!(orders::find_by_sn(&mut conn, &o).await.unwrap().unwrap().state(), TradeState::WaitUse);
    let missing = OrderSn::generate(Utc::now());
    assert!(orders::transition(&mut conn, &missing, TradeState::WaitPay, TradeState::WaitUse).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn users_see_only_their_orders_with_cursor_paging() {
    let (_db, mut conn) = fresh().await;
    let alice = user(&mut conn, "openid-alice").await;
    let bob = user(&mut conn, "openid-bob").await;
    let mut alices = Vec::new();
    for _ in 0..5 {
        alices.push(order(&mut conn, alice, TimeDelta::minutes(30)).await);
    }
    let bobs = order(&mut conn, bob, TimeDelta::minutes(30)).await;
    orders::transition(&mut conn, &alices[1], TradeState::WaitPay, TradeState::WaitUse).await.unwrap();

    assert!(orders::find_for_user(&mut conn, alice, &bobs).await.unwrap().is_none(), "alice cannot read bob's order");
    assert!(orders::find_for_user(&mut conn, bob, &bobs).await.unwrap().is_some());

    let page1 = orders::list_for_user(&mut conn, alice, None, None, 2).await.unwrap();
    let page2 = orders::list_for_user(&mut conn, alice, None, Some(page1[1].id()), 2).await.unwrap();
    let page3 = orders::list_for_user(&mut conn, alice, None, Some(page2[1].id()), 2).await.unwrap();
    let seen: Vec<String> = page1.iter().chain(&page2).chain(&page3).map(|o| o.sn.clone()).collect();
    let expected: Vec<String> = alices.iter().rev().map(|s| s.to_string()).collect();
    assert_eq!(seen, expected, "newest first, no gaps, no repeats");
    let paid = orders::list_for_user(&mut conn, alice, Some(TradeState::WaitUse), None, 10).await.unwrap();
    assert_eq!(paid.iter().map(|o| o.sn()).collect::<Vec<_>>(), vec![alices[1].clone()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn unpaid_orders_are_found_by_deadline() {
    let (_db, mut conn) = fresh().await;
    let u = user(&mut conn, "openid-a").await;
    let overdue = order(&mut conn, u, TimeDelta::minutes(-1)).await;
    let _fresh = order(&mut conn, u, TimeDelta::minutes(30)).await;
    let paid_overdue = order(&mut conn, u, TimeDelta::minutes(-2)).await;
    orders::transition(&mut conn, &paid_overdue, TradeState::WaitPay, TradeState::WaitUse).await.unwrap();
    let due = orders::unpaid_past_deadline(&mut conn, Utc::now(), 100).await.unwrap();
    assert_eq!(due.iter().map(|o| o.sn()).collect::<Vec<_>>(), vec![overdue]);
}

#[tokio::test(flavor = "multi_thread")]
async fn processed_events_are_claimed_once_per_consumer() {
    let (_db, mut conn) = fresh().await;
    assert!(processed::claim(&mut conn, "payment", "evt-1").await.unwrap());
    assert!(!processed::claim(&mut conn, "payment", "evt-1").await.unwrap());
    assert!(processed::claim(&mut conn, "order", "evt-1").await.unwrap(), "keys are per consumer");
    assert!(processed::seen(&mut conn, "payment", "evt-1").await.unwrap());

    // a claim inside a rolled-back transaction leaves nothing behind
    let _ = conn
        .transaction::<(), StorageError, _>(async |c| {
            assert!(processed::claim(c, "payment", "evt-2").await?);
            Err(StorageError::Unavailable("handler failed".into()))
        })
        .await;
    assert!(!processed::seen(&mut conn, "payment", "evt-2").await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn processed_events_are_pruned_only_past_their_retention() {
    let (_db, mut conn) = fresh().await;
    for i in 0..5 {
        assert!(processed::claim(&mut conn, "order", &format!("old-{i}")).await.unwrap());
    }
    let age = diesel::sql_query("UPDATE processed_event SET processed_time = now() - interval '9 days'");
    storage::RunQueryDsl::execute(age, &mut conn).await.unwrap();
    assert!(processed::claim(&mut conn, "order", "recent").await.unwrap());
    let week = std::time::Duration::from_secs(8 * 86_400);
    assert_eq!(processed::prune(&mut conn, week, 3).await.unwrap(), 3, "at most the limit per call");
    assert_eq!(processed::prune(&mut conn, week, 3).await.unwrap(), 2);
    assert_eq!(processed::prune(&mut conn, week, 3).await.unwrap(), 0);
    assert!(processed::seen(&mut conn, "order", "recent").await.unwrap(), "a key inside its retention stays");
    assert!(!processed::seen(&mut conn, "order", "old-0").await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_refuses_invalid_values_even_if_code_would_not() {
    let (_db, mut conn) = fresh().await;
    for sql in [
        "INSERT INTO homestay (title, people_num, homestay_price) VALUES ('x', 2, -1)",
        "INSERT INTO homestay (title, people_num, homestay_price) VALUES ('x', 0, 100)",
        "INSERT INTO \"user\" (mobile) VALUES ('not-a-phone')",
        "INSERT INTO user_auth (user_id, auth_type, auth_key) VALUES (1, 'facebook', 'k')",
        "INSERT INTO processed_event (consumer, key) VALUES ('c', 'k'), ('c', 'k')",
    ] {
        let r = storage::RunQueryDsl::execute(diesel::sql_query(sql), &mut conn).await;
        assert!(r.is_err(), "{sql} must be refused");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pooled_connections_carry_the_statement_and_lock_timeouts() {
    #[derive(diesel::QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        value: String,
    }
    let db = TestDb::create().await;
    let cfg = storage::DbConfig {
        statement_timeout: std::time::Duration::from_millis(200),
        lock_timeout: std::time::Duration::from_millis(150),
        ..storage::DbConfig::new(&db.url)
    };
    let pool = storage::pool(&cfg).unwrap();
    let mut conn = pool.get().await.unwrap();
    let show = |name: &str| diesel::sql_query(format!("SELECT current_setting('{name}') AS value"));
    let s: Setting = storage::RunQueryDsl::get_result(show("statement_timeout"), &mut *conn).await.unwrap();
    let l: Setting = storage::RunQueryDsl::get_result(show("lock_timeout"), &mut *conn).await.unwrap();
    assert_eq!((s.value.as_str(), l.value.as_str()), ("200ms", "150ms"));
    // A runaway statement is cancelled, as a transient failure the caller may retry.
    let slow = storage::RunQueryDsl::execute(diesel::sql_query("SELECT pg_sleep(5)"), &mut *conn).await;
    let err = storage::StorageError::from(slow.unwrap_err());
    assert!(err.is_transient() && err.to_string().contains("statement timeout"), "{err}");
    // Tools and migrations connect without them.
    let mut tool = storage::connect(&cfg).await.unwrap();
    let s: Setting = storage::RunQueryDsl::get_result(show("statement_timeout"), &mut tool).await.unwrap();
    assert_eq!(s.value, "0");
}

/// A statement prepared on a pooled connection while its table was empty (a new database) must not keep the plan it
/// got then once the table has grown: a sequential scan cached as a generic plan made every hot statement read the
/// whole table until the next ANALYZE.
#[tokio::test(flavor = "multi_thread")]
async fn pooled_connections_plan_for_the_table_as_it_is_now() {
    #[derive(diesel::QueryableByName)]
    struct Scans {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        seq_scan: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        idx_scan: i64,
    }
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let db = TestDb::create().await;
    let pool = storage::pool(&storage::DbConfig::new(&db.url)).unwrap();
    let mut conn = pool.get().await.unwrap();
    let run =
        async |conn: &mut Conn, sql: &str| storage::RunQueryDsl::execute(diesel::sql_query(sql), conn).await.unwrap();
    run(&mut conn, "CREATE TABLE queue (id bigserial PRIMARY KEY, key text NOT NULL UNIQUE, body text NOT NULL)").await;
    let lookup = |keys: Vec<String>| {
        storage::prepared(
            // The shape of the hot batch statements: a join with the batch's keys.
            diesel::sql_query("SELECT count(*) AS n FROM queue q JOIN unnest($1::text[]) AS v(k) ON q.key = v.k")
                .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(keys),
        )
    };
    // Batches, often enough on the empty table for PostgreSQL to settle on a generic plan (it may after five).
    for i in 0..10 {
        let keys = (0..10).map(|k| format!("k-{i}-{k}")).collect();
        let c: Count = storage::RunQueryDsl::get_result(lookup(keys), &mut *conn).await.unwrap();
        assert_eq!(c.n, 0);
    }
    // The table fills before any ANALYZE, as a new database's does under load.
    run(&mut conn, "INSERT INTO queue (key, body) SELECT 'k-' || g, repeat('x', 200) FROM generate_series(1, 50000) g")
        .await;
    let count_scans = "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'queue'";
    let (before, after): (Scans, Scans) = conn
        .transaction::<_, diesel::result::Error, _>(async |c| {
            // The session's counters not yet reported, which hold still inside one transaction.
            let before = storage::RunQueryDsl::get_result(diesel::sql_query(count_scans), c).await?;
            let found: Count =
                storage::RunQueryDsl::get_result(lookup(vec!["k-7".into(), "k-49999".into()]), c).await?;
            assert_eq!(found.n, 2);
            Ok((before, storage::RunQueryDsl::get_result(diesel::sql_query(count_scans), c).await?))
        })
        .await
        .unwrap();
    assert_eq!(after.seq_scan - before.seq_scan, 0, "the lookup must not read the whole table");
    assert!(after.idx_scan > before.idx_scan, "the lookup must use the key's index");
}
