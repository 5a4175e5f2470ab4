//! Rate limits and caps on what costs money, WeChat quota or CPU: 429 in the API's envelope with `Retry-After`,
//! counted per client address and per user, so one client cannot use up another's quota.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{Options, TestApp, spawn_app_with};

const PREPAY: &str = "/payment/v1/thirdPayment/thirdPaymentWxPay";
const LOGIN: &str = "/usercenter/v1/user/login";
const REGISTER: &str = "/usercenter/v1/user/register";

fn limited(per_ip: u32, per_user: u32) -> ingress::Limit {
    ingress::Limit { per_ip_per_minute: per_ip, per_user_per_minute: per_user }
}

/// POST from a given client address (the proxy header the test app trusts).
async fn post_from(
    app: &TestApp,
    ip: &str,
    path: &str,
    body: &Value,
    token: Option<&str>,
) -> (StatusCode, Option<String>, Value) {
    let mut req =
        app.http.post(format!("{}{path}", app.base)).header("x-forwarded-for", format!("10.9.9.9, {ip}")).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    (status, retry, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepay_is_limited_per_user_and_per_address_with_retry_after() {
    let rate_limits = ingress::RateLimits { prepay: limited(3, 2), ..Default::default() };
    let app =
        spawn_app_with(Options { rate_limits, client_ip_header: Some("x-forwarded-for".into()), ..Default::default() })
            .await;
    let alice = app.wx_login("alice").await;
    let bob = app.wx_login("bob").await;
    let h = app.homestay(true, 2, 300, 0).await;
    let sn = app.order(&alice, h, 1, 1, false).await;
    let bobs = app.order(&bob, h, 1, 1, false).await;
    let pay = |sn: &str| json!({ "orderSn": sn, "serviceType": "homestayOrder" });
    for _ in 0..2 {
        let (status, _, body) = post_from(&app, "203.0.113.1", PREPAY, &pay(&sn), Some(&alice)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, retry, body) = post_from(&app, "203.0.113.1", PREPAY, &pay(&sn), Some(&alice)).await;
    assert_eq!((status, body["code"].as_i64()), (StatusCode::TOO_MANY_REQUESTS, Some(42900)), "{body}");
    let retry: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(body["msg"].as_str().unwrap().contains("try again"), "{body}");
    // Bob from the same address still has the address's third request; then the address is used up for all.
    let (status, _, body) = post_from(&app, "203.0.113.1", PREPAY, &pay(&bobs), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, _) = post_from(&app, "203.0.113.1", PREPAY, &pay(&bobs), Some(&bob)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // From another address Bob is fine: one address cannot use up everyone's quota.
    let (status, _, body) = post_from(&app, "198.51.100.2", PREPAY, &pay(&bobs), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_guessing_a_password_cannot_lock_its_owner_out() {
    let rate_limits = ingress::RateLimits { login: limited(100, 3), ..Default::default() };
    let app =
        spawn_app_with(Options { rate_limits, client_ip_header: Some("x-forwarded-for".into()), ..Default::default() })
            .await;
    let creds = |password: &str| json!({ "mobile": "13900000001", "password": password });
    let (status, _, body) = post_from(&app, "198.51.100.9", REGISTER, &creds("the real password"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for _ in 0..3 {
        let (status, _, _) = post_from(&app, "203.0.113.66", LOGIN, &creds("a guess"), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, retry, body) = post_from(&app, "203.0.113.66", LOGIN, &creds("the real password"), None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "the guesser's address is stopped: {body}");
    assert!(retry.is_some());
    let (status, _, body) = post_from(&app, "198.51.100.9", LOGIN, &creds("the real password"), None).await;
    assert_eq!(status, StatusCode::OK, "the owner, elsewhere, still logs in: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_forwarded_for_header_does_not_buy_a_new_quota() {
    let rate_limits = ingress::RateLimits { register: limited(2, 0), ..Default::default() };
    let app = spawn_app_with(Options { rate_limits, ..Default::default() }).await;
    let mut statuses = Vec::new();
    for i in 0..3 {
        let body = json!({ "mobile": format!("1390000010{i}"), "password": "a fine password" });
        let (status, _, _) = post_from(&app, &format!("203.0.113.{i}"), REGISTER, &body, None).await;
        statuses.push(status);
    }
    assert_eq!(statuses, [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS], "the peer address counts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_has_at_most_the_configured_number_of_unpaid_orders() {
    let app = spawn_app_with(Options { max_unpaid_orders: 2, ..Default::default() }).await;
    let alice = app.wx_login("alice").await;
    let h = app.homestay(true, 2, 300, 0).await;
    app.order(&alice, h, 1, 1, false).await;
    app.order(&alice, h, 1, 1, false).await;
    let start = chrono::Utc::now().timestamp() / 86_400 * 86_400 + 86_400;
    let body = json!({ "homestayId": h, "isFood": false, "liveStartTime": start, "liveEndTime": start + 86_400, "livePeopleNum": 1, "remark": "" });
    let (status, answer) = app.post("/order/v1/homestayOrder/createHomestayOrder", &body, Some(&alice)).await;
    assert_eq!((status, answer["code"].as_i64()), (StatusCode::CONFLICT, Some(40908)), "{answer}");
    let bob = app.wx_login("bob").await;
    app.order(&bob, h, 1, 1, false).await;
}
