use reqwest::StatusCode;
use serde_json::json;

use crate::common::{spawn_app, tomorrow};

const CREATE: &str = "/order/v1/homestayOrder/createHomestayOrder";
const LIST: &str = "/order/v1/homestayOrder/userHomestayOrderList";
const DETAIL: &str = "/order/v1/homestayOrder/userHomestayOrderDetail";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_prices_in_fen_and_refuses_every_broken_rule() {
    let app = spawn_app().await;
    let token = app.wx_login("alice").await;
    let listed = app.homestay(true, 3, 20_000, 1_500).await;
    let unlisted = app.homestay(false, 3, 20_000, 0).await;

    let sn = app.order(&token, listed, 2, 3, true).await;
    let d = app.ok(DETAIL, &json!({ "sn": sn }), Some(&token)).await;
    assert_eq!(d["homestayTotalPrice"], 40_000, "{d}");
    assert_eq!(d["foodTotalPrice"], 1_500 * 3 * 2);
    assert_eq!(d["orderTotalPrice"], 40_000 + 9_000);
    assert_eq!(d["tradeState"], 0);
    assert_eq!(d["payTime"], 0);
    assert_eq!(d["tradeCode"].as_str().unwrap().len(), 8);
    let deadline = d["payDeadline"].as_i64().unwrap() - d["createTime"].as_i64().unwrap();
    assert!((1799..=1801).contains(&deadline), "30 minutes to pay, got {deadline}s");
    let no_food = app.order(&token, listed, 1, 1, false).await;
    let d = app.ok(DETAIL, &json!({ "sn": no_food }), Some(&token)).await;
    assert_eq!((d["orderTotalPrice"].as_i64(), d["foodTotalPrice"].as_i64()), (Some(20_000), Some(0)));

    let start = tomorrow();
    let body = |homestay: i64, s: i64, e: i64, people: i64| json!({ "homestayId": homestay, "isFood": false, "liveStartTime": s, "liveEndTime": e, "livePeopleNum": people, "remark": "" });
    let cases = [
        (body(999_999, start, start + 86400, 1), StatusCode::NOT_FOUND, "homestay not found"),
        (body(unlisted, start, start + 86400, 1), StatusCode::UNPROCESSABLE_ENTITY, "not open for booking"),
        (body(listed, start, start + 86400, 4), StatusCode::UNPROCESSABLE_ENTITY, "between 1 and 3"),
        (body(listed, start, start + 86400, 0), StatusCode::UNPROCESSABLE_ENTITY, "between 1 and 3"),
        (body(listed, start, start, 1), StatusCode::UNPROCESSABLE_ENTITY, "after liveStartTime"),
        (body(listed, start + 86400, start, 1), StatusCode::UNPROCESSABLE_ENTITY, "after liveStartTime"),
        (body(listed, start, start + 86400 + 3600, 1), StatusCode::UNPROCESSABLE_ENTITY, "whole nights"),
        (body(listed, start - 3 * 86400, start - 2 * 86400, 1), StatusCode::UNPROCESSABLE_ENTITY, "in the past"),
        // Far apart: the subtraction itself would overflow.
        (body(listed, i64::MIN, i64::MAX, 1), StatusCode::UNPROCESSABLE_ENTITY, "real dates"),
    ];
    for (req, status, msg) in cases {
        let (got, b) = app.post(CREATE, &req, Some(&token)).await;
        assert_eq!(got, status, "{req} -> {b}");
        assert!(b["msg"].as_str().unwrap().contains(msg), "{req} -> {b}");
    }
    let (status, _) = app.post(CREATE, &body(listed, start, start + 86400, 1), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_newest_first_filter_by_state_and_users_see_only_their_own() {
    let app = spawn_app().await;
    let alice = app.wx_login("alice").await;
    let bob = app.wx_login("bob").await;
    let h = app.homestay(true, 2, 10_000, 0).await;
    let mut mine = Vec::new();
    for _ in 0..5 {
        mine.push(app.order(&alice, h, 1, 1, false).await);
    }
    let bobs = app.order(&bob, h, 1, 1, false).await;

    let page1 = app.ok(LIST, &json!({ "pageSize": 2 }), Some(&alice)).await["list"].clone();
    let sns = |page: &serde_json::Value| {
        page.as_array().unwrap().iter().map(|o| o["sn"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
    };
    assert_eq!(sns(&page1), vec![mine[4].clone(), mine[3].clone()]);
    let last = page1[1]["id"].as_i64().unwrap();
    let page2 = app.ok(LIST, &json!({ "lastId": last, "pageSize": 2 }), Some(&alice)).await["list"].clone();
    assert_eq!(sns(&page2), vec![mine[2].clone(), mine[1].clone()]);
    let last = page2[1]["id"].as_i64().unwrap();
    let page3 = app.ok(LIST, &json!({ "lastId": last, "pageSize": 2 }), Some(&alice)).await["list"].clone();
    assert_eq!(sns(&page3), vec![mine[0].clone()]);
    let all = app.ok(LIST, &json!({}), Some(&alice)).await["list"].clone();
    assert_eq!(all.as_array().unwrap().len(), 5, "default page size 10, and none of bob's");

    // Filter by state: mark one paid directly in the database.
    let paid = storage::OrderSn::parse(&mine[2]).unwrap();
    storage::orders::transition(
        &mut *app.conn().await,
        &paid,
        storage::TradeState::WaitPay,
        storage::TradeState::WaitUse,
    )
    .await
    .unwrap();
    let waiting_use = app.ok(LIST, &json!({ "tradeState": 1 }), Some(&alice)).await["list"].clone();
    assert_eq!(sns(&waiting_use), vec![mine[2].clone()]);
    // looklook's front end asks for every state with -99.
    let every = app.ok(LIST, &json!({ "tradeState": -99, "pageSize": 50 }), Some(&alice)).await["list"].clone();
    assert_eq!(sns(&every).len(), mine.len(), "{every}");
    for bad in [json!({ "pageSize": 0 }), json!({ "pageSize": 51 }), json!({ "tradeState": 7 })] {
        let (status, b) = app.post(LIST, &bad, Some(&alice)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad} -> {b}");
    }

    // Bob cannot see alice's order, nor learn that it exists.
    let (status, b) = app.post(DETAIL, &json!({ "sn": mine[0] }), Some(&bob)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{b}");
    let (status, unknown) = app.post(DETAIL, &json!({ "sn": "HSO20260101000000012345678" }), Some(&bob)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(b, unknown, "someone else's order looks exactly like one that does not exist");
    let bob_list = app.ok(LIST, &json!({}), Some(&bob)).await["list"].clone();
    assert_eq!(sns(&bob_list), vec![bobs]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_inserts_demo_homestays_once() {
    let app = spawn_app().await;
    let mut conn = app.conn().await;
    let first = ingress::seed(&mut conn).await.unwrap();
    assert!(first >= 2);
    assert_eq!(ingress::seed(&mut conn).await.unwrap(), 0, "idempotent");
    drop(conn);
    let token = app.wx_login("erin").await;
    // The first demo homestay is listed and bookable; the unlisted one is refused.
    app.order(&token, 1, 1, 1, true).await;
    let start = tomorrow();
    let (status, _) = app
        .post(
            CREATE,
            &json!({ "homestayId": first as i64, "liveStartTime": start, "liveEndTime": start + 86400, "livePeopleNum": 1 }),
            Some(&token),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "the last demo homestay is unlisted");
}

const REFUND: &str = "/order/v1/homestayOrder/refundHomestayOrder";

/// Marks the order's open payment paid and the order waiting for its stay, as the processors would.
async fn pay_directly(app: &crate::common::TestApp, token: &str, order: &str) -> storage::PaymentSn {
    let (status, b) = app.prepay(token, order).await;
    assert_eq!(status, StatusCode::OK, "{b}");
    let order = storage::OrderSn::parse(order).unwrap();
    let mut c = app.conn().await;
    let payment = storage::payments::find_open_for_order(&mut c, &order).await.unwrap().unwrap().sn();
    let paid = storage::payments::PaidDetails {
        transaction_id: "4200000000202611270000000001".into(),
        trade_type: "JSAPI".into(),
        trade_state: "SUCCESS".into(),
        trade_state_desc: "支付成功".into(),
        pay_time: chrono::Utc::now(),
    };
    storage::payments::mark_paid(&mut c, &payment, &paid).await.unwrap();
    storage::orders::transition(&mut c, &order, storage::TradeState::WaitPay, storage::TradeState::WaitUse)
        .await
        .unwrap();
    payment
}

async fn refund_requests_queued(app: &crate::common::TestApp) -> i64 {
    use diesel::QueryableByName;
    use storage::RunQueryDsl as _;
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut c = app.conn().await;
    diesel::sql_query("SELECT count(*) AS n FROM outbox WHERE subject = 'refund.requested'")
        .get_result::<N>(&mut *c)
        .await
        .unwrap()
        .n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_queues_one_request_for_a_paid_order_before_the_stay_and_only_for_its_owner() {
    let app = spawn_app().await;
    let alice = app.wx_login("alice").await;
    let bob = app.wx_login("bob").await;
    let h = app.homestay(true, 2, 10_000, 0).await;
    let unpaid = app.order(&alice, h, 2, 1, false).await;
    let paid = app.order(&alice, h, 2, 1, false).await;
    let payment = pay_directly(&app, &alice, &paid).await;

    // Bob cannot refund alice's order, nor learn that it exists.
    let (status, for_bob) = app.post(REFUND, &json!({ "sn": paid }), Some(&bob)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{for_bob}");
    let (_, unknown) = app.post(REFUND, &json!({ "sn": "HSO20260101000000012345678" }), Some(&bob)).await;
    assert_eq!(for_bob, unknown);
    // Bad input: a clear 4xx each, nothing queued.
    let (status, b) = app.post(REFUND, &json!({ "sn": paid }), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{b}");
    for bad in [json!({}), json!({ "sn": 7 }), json!({ "sn": paid, "all": true })] {
        let (status, b) = app.post(REFUND, &bad, Some(&alice)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad} -> {b}");
    }
    let (status, b) = app.post_raw(REFUND, b"{\"sn\":".to_vec(), Some(&alice)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{b}");
    let (status, b) = app.post(REFUND, &json!({ "sn": "not-a-serial" }), Some(&alice)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{b}");
    // An unpaid order has nothing to give back.
    let (status, b) = app.post(REFUND, &json!({ "sn": unpaid }), Some(&alice)).await;
    assert_eq!((status, b["code"].as_i64()), (StatusCode::CONFLICT, Some(40906)), "{b}");
    assert_eq!(refund_requests_queued(&app).await, 0);

    // The owner asks, twice (a double tap): one request queued, the same answer both times.
    for _ in 0..2 {
        let r = app.ok(REFUND, &json!({ "sn": paid }), Some(&alice)).await;
        assert_eq!(r, json!({ "orderSn": paid, "refundState": "requested", "refundTotal": 20_000 }));
    }
    assert_eq!(refund_requests_queued(&app).await, 1);

    // Once the refund exists, its state is what the user sees.
    let mut c = app.conn().await;
    let row = storage::payments::find_by_sn(&mut c, &payment).await.unwrap().unwrap();
    let refund =
        storage::refunds::insert_or_get(&mut c, &storage::refunds::NewRefund::full(&row, true)).await.unwrap().0;
    let wechat = storage::refunds::WechatRefund { status: "PROCESSING".into(), ..Default::default() };
    storage::refunds::settle(&mut c, &refund.sn(), storage::RefundStatus::Processing, &wechat).await.unwrap();
    drop(c);
    let r = app.ok(REFUND, &json!({ "sn": paid }), Some(&alice)).await;
    assert_eq!(r["refundState"], "processing");
    assert_eq!(refund_requests_queued(&app).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_is_refused_once_the_stay_has_started() {
    use storage::RunQueryDsl as _;
    let app = spawn_app().await;
    let alice = app.wx_login("alice").await;
    let h = app.homestay(true, 2, 10_000, 0).await;
    let order = app.order(&alice, h, 1, 1, false).await;
    pay_directly(&app, &alice, &order).await;
    diesel::sql_query("UPDATE homestay_order SET live_start_date = now() - interval '1 hour' WHERE sn = $1")
        .bind::<diesel::sql_types::Text, _>(&order)
        .execute(&mut *app.conn().await)
        .await
        .unwrap();
    let (status, b) = app.post(REFUND, &json!({ "sn": order }), Some(&alice)).await;
    assert_eq!((status, b["code"].as_i64()), (StatusCode::CONFLICT, Some(40907)), "{b}");
    assert!(b["msg"].as_str().is_some_and(|m| m.contains("stay has started")), "{b}");
    assert_eq!(refund_requests_queued(&app).await, 0);
}
