use std::time::Duration;

use bus::events::ReportSource;
use reqwest::StatusCode;
use serde_json::json;
use storage::{OrderSn, PayStatus, payments};

use crate::common::{Options, WAIT, spawn_app, spawn_app_with};

const STATUS: &str = "/payment/v1/thirdPayment/thirdPaymentWxPayStatus";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepay_signs_pay_params_reuses_the_open_payment_and_refuses_paid_orders() {
    let app = spawn_app().await;
    let alice = app.wx_login("alice").await;
    let h = app.homestay(true, 2, 12_345, 0).await;
    let sn = app.order(&alice, h, 1, 1, false).await;

    let (status, first) = app.prepay(&alice, &sn).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let p = &first["data"];
    assert_eq!(p["appid"], app.wechat.appid.as_str());
    assert_eq!(p["signType"], "RSA");
    assert!(p["package"].as_str().unwrap().starts_with("prepay_id="));
    let merchant = wechat::RsaSigner::from_pkcs8_pem(&app.sandbox.identity.merchant_private_key_pem).unwrap();
    let msg = wechat::pay_sign_message(
        p["appid"].as_str().unwrap(),
        p["timestamp"].as_str().unwrap(),
        p["nonceStr"].as_str().unwrap(),
        p["package"].as_str().unwrap(),
    );
    merchant
        .verifier_key()
        .verify(&msg, p["paySign"].as_str().unwrap())
        .expect("paySign verifies with the merchant key");

    // WeChat has the order with our amount and deadline.
    let pay_sn = p["paySn"].as_str().unwrap().to_owned();
    let at_wechat = app.control.order(&pay_sn).await.unwrap().expect("WeChat knows the payment");
    assert_eq!(at_wechat["amount"]["total"], 12_345, "{at_wechat}");

    // A second prepay reuses the same payment (same out_trade_no).
    let (status, second) = app.prepay(&alice, &sn).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second["data"]["paySn"], pay_sn.as_str());
    let order_sn = OrderSn::parse(&sn).unwrap();
    let rows = payments::list_for_order(&mut *app.conn().await, &order_sn).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].prepay_id.is_some());

    // Bob cannot pay (or see) alice's order.
    let bob = app.wx_login("bob").await;
    let (status, body) = app.prepay(&bob, &sn).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = app.post(STATUS, &json!({ "orderSn": sn }), Some(&bob)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.post(STATUS, &json!({ "sn": pay_sn }), Some(&bob)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Paid (as the processors would record it): a second payment is refused.
    let mut conn = app.conn().await;
    let details = payments::PaidDetails {
        transaction_id: "4200000000000000000000000001".into(),
        trade_type: "JSAPI".into(),
        trade_state: "SUCCESS".into(),
        trade_state_desc: "支付成功".into(),
        pay_time: chrono::Utc::now(),
    };
    payments::mark_paid(&mut conn, &rows[0].sn(), &details).await.unwrap();
    drop(conn);
    let (status, body) = app.prepay(&alice, &sn).await;
    assert_eq!((status, body["code"].as_i64()), (StatusCode::CONFLICT, Some(40902)), "{body}");
    storage::orders::transition(
        &mut *app.conn().await,
        &order_sn,
        storage::TradeState::WaitPay,
        storage::TradeState::WaitUse,
    )
    .await
    .unwrap();
    let (status, body) = app.prepay(&alice, &sn).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let detail = app.ok("/order/v1/homestayOrder/userHomestayOrderDetail", &json!({ "sn": sn }), Some(&alice)).await;
    assert_eq!(detail["payType"], "WECHAT_PAY");
    assert!(detail["payTime"].as_i64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepay_needs_a_wechat_login_and_a_valid_request() {
    let app = spawn_app().await;
    let reg = app
        .ok("/usercenter/v1/user/register", &json!({ "mobile": "13800138000", "password": "password-1234" }), None)
        .await;
    let token = reg["accessToken"].as_str().unwrap();
    let h = app.homestay(true, 2, 100, 0).await;
    let sn = app.order(token, h, 1, 1, false).await;
    let (status, body) = app.prepay(token, &sn).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["msg"].as_str().unwrap().contains("log in with WeChat first"));

    let (status, body) = app
        .post(
            "/payment/v1/thirdPayment/thirdPaymentWxPay",
            &json!({ "orderSn": sn, "serviceType": "flight" }),
            Some(token),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["msg"].as_str().unwrap().contains("unknown variant"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_prepays_share_one_payment() {
    let app = spawn_app().await;
    let alice = app.wx_login("alice").await;
    let h = app.homestay(true, 2, 500, 0).await;
    let sn = app.order(&alice, h, 1, 1, false).await;
    let answers = futures::future::join_all((0..5).map(|_| app.prepay(&alice, &sn))).await;
    let mut pay_sns: Vec<String> = answers
        .iter()
        .map(|(s, b)| {
            assert_eq!(*s, StatusCode::OK, "{b}");
            b["data"]["paySn"].as_str().unwrap().to_owned()
        })
        .collect();
    pay_sns.dedup();
    assert_eq!(pay_sns.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_the_database_and_past_the_grace_reports_what_wechat_says() {
    let app = spawn_app_with(Options { status_grace: Duration::from_millis(1), ..Default::default() }).await;
    let alice = app.wx_login("alice").await;
    let h = app.homestay(true, 2, 777, 0).await;
    let sn = app.order(&alice, h, 1, 1, false).await;

    // Before any prepay: the order alone.
    let s = app.ok(STATUS, &json!({ "orderSn": sn }), Some(&alice)).await;
    assert_eq!(s["paySn"], serde_json::Value::Null);
    assert_eq!(s["tradeState"], 0);

    let (_, prepay) = app.prepay(&alice, &sn).await;
    let pay_sn = prepay["data"]["paySn"].as_str().unwrap().to_owned();
    // The user pays but the callback never arrives: polling must find out.
    app.control.fault(&sandbox::Fault::DropCallbacks { out_trade_no: pay_sn.clone() }).await.unwrap();

    // NOTPAY at WeChat: nothing is published.
    let s = app.ok(STATUS, &json!({ "sn": pay_sn }), Some(&alice)).await;
    assert_eq!((s["payStatus"].as_i64(), s["orderSn"].as_str()), (Some(0), Some(sn.as_str())), "{s}");
    assert!(app.events().await.is_empty());

    app.control.pay(&pay_sn, "SUCCESS").await.unwrap();
    let event = testkit::eventually(WAIT, "a Query report of the payment", || async {
        app.ok(STATUS, &json!({ "orderSn": sn }), Some(&alice)).await;
        app.events().await.into_iter().next()
    })
    .await;
    let r = &event.payload;
    assert_eq!(r.source, ReportSource::Query);
    assert_eq!(r.out_trade_no, pay_sn);
    assert_eq!(r.trade_state, "SUCCESS");
    assert_eq!(r.amount_total, Some(777));
    assert!(r.transaction_id.is_some() && r.success_time.is_some());
    assert_eq!(r.notification_id, None);

    // The answer is still the database's view (the processors, not the ingress, change it); repeated polls of the
    // same answer are one event.
    let s = app.ok(STATUS, &json!({ "orderSn": sn }), Some(&alice)).await;
    assert_eq!(s["payStatus"], PayStatus::Waiting.code());
    let events = app.events().await;
    assert!(events.iter().all(|e| e.id == event.id), "same fact, same event id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wechat_failures_are_502_with_a_readable_message_and_retrying_works() {
    let app = spawn_app().await;
    let alice = app.wx_login("alice").await;
    let h = app.homestay(true, 2, 300, 0).await;
    let sn = app.order(&alice, h, 1, 1, false).await;
    let fail = sandbox::Fault::Fail {
        api: sandbox::Api::Jsapi,
        times: 1,
        status: Some(500),
        code: Some("SYSTEM_ERROR".into()),
        message: Some("系统繁忙".into()),
        errcode: None,
    };
    app.control.fault(&fail).await.unwrap();
    let (status, body) = app.prepay(&alice, &sn).await;
    assert_eq!((status, body["code"].as_i64()), (StatusCode::BAD_GATEWAY, Some(50200)), "{body}");
    assert!(body["msg"].as_str().unwrap().contains("try again"), "{body}");
    // WeChat's own code and text stay in our log: they can name the merchant, the app and our configuration.
    assert!(!body.to_string().contains("SYSTEM_ERROR") && !body.to_string().contains("系统繁忙"), "{body}");
    let refusal = sandbox::Fault::Fail {
        api: sandbox::Api::Jsapi,
        times: 1,
        status: Some(400),
        code: Some("APPID_MCHID_NOT_MATCH".into()),
        message: Some("商户号1900000001与appid wx0000000000000000不匹配".into()),
        errcode: None,
    };
    app.control.fault(&refusal).await.unwrap();
    let (status, body) = app.prepay(&alice, &sn).await;
    assert_eq!((status, body["code"].as_i64()), (StatusCode::BAD_GATEWAY, Some(50201)), "{body}");
    let text = body.to_string();
    assert!(
        !text.contains("APPID_MCHID_NOT_MATCH") && !text.contains("1900000001") && !text.contains("appid"),
        "{body}"
    );
    let (status, body) = app.prepay(&alice, &sn).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Closed at WeChat (the user gave up, the order was closed there): the order can no longer be paid.
    let pay_sn = body["data"]["paySn"].as_str().unwrap().to_owned();
    app.control.pay(&pay_sn, "CLOSED").await.unwrap();
    let (status, body) = app.prepay(&alice, &sn).await;
    assert_eq!((status, body["code"].as_i64()), (StatusCode::CONFLICT, Some(40903)), "{body}");
    // ...and what WeChat said went into the pipeline, so the payment gets closed by the processors.
    let events = app.events().await;
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].payload.source, events[0].payload.trade_state.as_str()), (ReportSource::Query, "CLOSED"));
    assert_eq!(events[0].payload.out_trade_no, pay_sn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_leaves_wechat_alone_within_the_grace_and_prepay_refuses_orders_past_their_deadline() {
    let app = spawn_app().await; // grace 10 s
    let alice = app.wx_login("alice").await;
    let h = app.homestay(true, 2, 640, 0).await;
    let sn = app.order(&alice, h, 1, 1, false).await;
    let (_, prepay) = app.prepay(&alice, &sn).await;
    let pay_sn = prepay["data"]["paySn"].as_str().unwrap().to_owned();
    app.control.fault(&sandbox::Fault::DropCallbacks { out_trade_no: pay_sn.clone() }).await.unwrap();
    app.control.pay(&pay_sn, "SUCCESS").await.unwrap();
    for _ in 0..3 {
        let s = app.ok(STATUS, &json!({ "orderSn": sn }), Some(&alice)).await;
        assert_eq!(s["payStatus"], 0);
    }
    assert!(app.events().await.is_empty(), "just after the prepay the callback is the expected source: no query");

    // An order whose payment deadline has passed cannot be prepaid any more.
    let late = app.order(&alice, h, 1, 1, false).await;
    {
        use diesel::{ExpressionMethods as _, QueryDsl as _};
        use storage::RunQueryDsl as _;
        use storage::schema::homestay_order as o;
        diesel::update(o::table.filter(o::sn.eq(&late)))
            .set(o::pay_deadline.eq(chrono::Utc::now() - chrono::Duration::minutes(1)))
            .execute(&mut *app.conn().await)
            .await
            .unwrap();
    }
    let (status, body) = app.prepay(&alice, &late).await;
    assert_eq!((status, body["code"].as_i64()), (StatusCode::CONFLICT, Some(40904)), "{body}");
}
