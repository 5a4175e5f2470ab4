//! The mini-program client against a fake WeChat on port 0: the shared token cache, the
//! refresh on 40001/42001, value rules checked before sending, and errcode classification.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::ExposeSecret as _;
use serde_json::{Value, json};
use wechat::{
    Errcode, ErrorClass, Lang, MiniError, MiniProgramClient, MiniSettings, MiniprogramState, OpenId, SubscribeMessage,
};

#[derive(Clone, Default)]
struct Fake {
    token_calls: Arc<AtomicUsize>,
    forced_calls: Arc<AtomicUsize>,
    sends: Arc<std::sync::Mutex<Vec<(String, Value)>>>,
    /// `expires_in` of the tokens handed out (7200 unless a test changes it).
    expires_in: Arc<std::sync::atomic::AtomicU64>,
    /// Tokens the send endpoint treats as expired.
    expired: Arc<std::sync::Mutex<Vec<String>>>,
}

async fn stable_token(State(f): State<Fake>, Json(body): Json<Value>) -> Json<Value> {
    assert_eq!(body["grant_type"], "client_credential");
    assert_eq!(body["appid"], "wx_app");
    if body["secret"] != "s3cret" {
        return Json(json!({"errcode": 40125, "errmsg": "invalid appsecret"}));
    }
    if body["force_refresh"] == true {
        f.forced_calls.fetch_add(1, Ordering::SeqCst);
    }
    // A yield point so that concurrent callers really overlap with this refresh.
    tokio::task::yield_now().await;
    let n = f.token_calls.fetch_add(1, Ordering::SeqCst) + 1;
    Json(json!({"access_token": format!("T{n}"), "expires_in": f.expires_in.load(Ordering::SeqCst)}))
}

async fn send(
    State(f): State<Fake>,
    Query(q): Query<BTreeMap<String, String>>,
    Json(body): Json<Value>,
) -> Json<Value> {
    let token = q.get("access_token").cloned().unwrap_or_default();
    if f.expired.lock().unwrap().contains(&token) {
        return Json(json!({"errcode": 42001, "errmsg": "access_token expired"}));
    }
    let touser = body["touser"].as_str().unwrap_or_default().to_owned();
    f.sends.lock().unwrap().push((token, body));
    match touser.as_str() {
        "o_refused" => Json(json!({"errcode": 43101, "errmsg": "user refuse to accept the msg"})),
        "o_busy" => Json(json!({"errcode": -1, "errmsg": "system error"})),
        _ => Json(json!({"errcode": 0, "errmsg": "ok", "msgid": 1_700_000_000_123_i64})),
    }
}

async fn jscode2session(Query(q): Query<BTreeMap<String, String>>) -> Json<Value> {
    assert_eq!(q["grant_type"], "authorization_code");
    assert_eq!(q["secret"], "s3cret");
    let code = &q["js_code"];
    if code.starts_with("bad") {
        return Json(json!({"errcode": 40029, "errmsg": "invalid code"}));
    }
    Json(json!({"openid": format!("o_{code}"), "session_key": "tiihtNczf5v6AKRyjwEUhQ==", "unionid": "u1"}))
}

async fn spawn() -> (Fake, String) {
    let fake = Fake::default();
    fake.expires_in.store(7200, Ordering::SeqCst);
    let app = Router::new()
        .route("/cgi-bin/stable_token", post(stable_token))
        .route("/cgi-bin/message/subscribe/send", post(send))
        .route("/sns/jscode2session", get(jscode2session))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (fake, format!("http://{addr}"))
}

fn client(base: &str, secret: &str) -> MiniProgramClient {
    MiniProgramClient::new(MiniSettings {
        appid: "wx_app".into(),
        secret: secret.into(),
        base_url: base.into(),
        timeout: Duration::from_secs(5),
    })
    .unwrap()
}

fn message(touser: &str) -> SubscribeMessage {
    SubscribeMessage {
        touser: OpenId::new(touser).unwrap(),
        template_id: "TPL_PAID".into(),
        page: Some("pages/order/detail?sn=PS1".into()),
        data: BTreeMap::from([
            ("thing1".to_owned(), "咖啡豆 500g".to_owned()),
            ("amount2".to_owned(), "¥88.00".to_owned()),
            ("character_string3".to_owned(), "PS20261127000001".to_owned()),
            ("time4".to_owned(), "2026年11月27日 10:00".to_owned()),
        ]),
        miniprogram_state: MiniprogramState::Developer,
        lang: Lang::ZhCn,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_token_refresh_serves_many_concurrent_tasks() {
    let (fake, url) = spawn().await;
    let c = client(&url, "s3cret");
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.access_token().await.unwrap().expose_secret().to_owned() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), "T1");
    }
    assert_eq!(fake.token_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_expired_token_is_refreshed_and_the_send_retried_once() {
    let (fake, url) = spawn().await;
    let c = client(&url, "s3cret");
    assert_eq!(c.access_token().await.unwrap().expose_secret(), "T1");
    fake.expired.lock().unwrap().push("T1".into());
    let msgid = c.send_subscribe_message(&message("o_user1")).await.unwrap();
    assert_eq!(msgid, Some(1_700_000_000_123));
    assert_eq!(fake.token_calls.load(Ordering::SeqCst), 2);
    assert_eq!(fake.forced_calls.load(Ordering::SeqCst), 1, "the refresh after 42001 is forced");
    let sends = fake.sends.lock().unwrap().clone();
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].0, "T2");
    assert_eq!(sends[0].1["miniprogram_state"], "developer");
    assert_eq!(sends[0].1["data"]["amount2"]["value"], "¥88.00");
    // If the new token is refused too, the error comes back (one retry only).
    fake.expired.lock().unwrap().extend(["T2".to_owned(), "T3".to_owned()]);
    let e = c.send_subscribe_message(&message("o_user1")).await.unwrap_err();
    assert_eq!(e.errcode(), Some(Errcode::TokenExpired));
    assert_eq!(e.class(), ErrorClass::Token);
    assert_eq!(fake.token_calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn invalidate_forces_a_new_token() {
    let (fake, url) = spawn().await;
    let c = client(&url, "s3cret");
    assert_eq!(c.access_token().await.unwrap().expose_secret(), "T1");
    c.invalidate().await;
    assert_eq!(c.access_token().await.unwrap().expose_secret(), "T2");
    assert_eq!(c.access_token().await.unwrap().expose_secret(), "T2");
    assert_eq!(fake.forced_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_expired_token_is_refetched_without_forcing() {
    let (fake, url) = spawn().await;
    fake.expires_in.store(0, Ordering::SeqCst);
    let c = client(&url, "s3cret");
    assert_eq!(c.access_token().await.unwrap().expose_secret(), "T1");
    assert_eq!(c.access_token().await.unwrap().expose_secret(), "T2");
    assert_eq!(fake.forced_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn errcodes_are_typed_and_classified() {
    let (_fake, url) = spawn().await;
    let c = client(&url, "s3cret");
    let e = c.send_subscribe_message(&message("o_refused")).await.unwrap_err();
    assert_eq!(e.errcode(), Some(Errcode::UserRefused));
    assert_eq!(e.class(), ErrorClass::Permanent);
    let e = c.send_subscribe_message(&message("o_busy")).await.unwrap_err();
    assert_eq!(e.errcode(), Some(Errcode::SystemBusy));
    assert!(e.is_retryable());
    let bad_secret = client(&url, "wrong");
    let e = bad_secret.access_token().await.unwrap_err();
    assert_eq!(e.errcode(), Some(Errcode::Other(40125)));
    assert!(!e.to_string().contains("wrong"));
}

#[tokio::test]
async fn value_rules_are_checked_before_sending() {
    let (fake, url) = spawn().await;
    let c = client(&url, "s3cret");
    let mut m = message("o_user1");
    m.data.insert("thing1".into(), "这是一个超过二十个字符的商品名称，肯定会被拒绝的".into());
    match c.send_subscribe_message(&m).await {
        Err(MiniError::Invalid(e)) => assert_eq!(e.key, "thing1"),
        other => panic!("{other:?}"),
    }
    assert!(fake.sends.lock().unwrap().is_empty());
    assert_eq!(fake.token_calls.load(Ordering::SeqCst), 0, "no token fetched for a message that cannot be sent");
}

#[tokio::test]
async fn jscode2session_maps_openid_and_errors() {
    let (_fake, url) = spawn().await;
    let c = client(&url, "s3cret");
    let s = c.jscode2session("081abc").await.unwrap();
    assert_eq!(s.openid.expose(), "o_081abc");
    assert_eq!(s.unionid.as_deref(), Some("u1"));
    assert!(!format!("{s:?}").contains("tiihtNczf5v6AKRyjwEUhQ"), "session_key must not be in Debug");
    assert!(!format!("{s:?}").contains("o_081abc"), "openid must be masked in Debug");
    assert!(!format!("{s:?}").contains("u1"), "unionid must be masked in Debug");
    let e = c.jscode2session("bad_code").await.unwrap_err();
    assert_eq!(e.errcode(), Some(Errcode::InvalidCode));
    assert_eq!(e.class(), ErrorClass::Permanent);
}

#[tokio::test]
async fn network_errors_do_not_leak_the_secret() {
    let c = client("http://127.0.0.1:1", "s3cret");
    let e = c.jscode2session("081abc").await.unwrap_err();
    assert!(matches!(e, MiniError::Network(_)), "{e:?}");
    assert!(!e.to_string().contains("s3cret"), "{e}");
    assert!(e.is_retryable());
}
