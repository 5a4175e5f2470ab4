use jsonwebtoken::{EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::json;

use crate::common::{SECRET, spawn_app};

const DETAIL: &str = "/usercenter/v1/user/detail";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wechat_login_creates_the_user_once_and_codes_work_once() {
    let app = spawn_app().await;
    let first = app.ok("/usercenter/v1/user/wxMiniAuth", &json!({ "code": "alice:1" }), None).await;
    assert!(first["accessExpire"].as_i64().unwrap() > first["refreshAfter"].as_i64().unwrap());
    let second = app.ok("/usercenter/v1/user/wxMiniAuth", &json!({ "code": "alice:2" }), None).await;
    let me = |t: &serde_json::Value| {
        let token = t["accessToken"].as_str().unwrap().to_owned();
        let app = &app;
        async move { app.ok(DETAIL, &json!({}), Some(&token)).await["userInfo"]["id"].as_i64().unwrap() }
    };
    assert_eq!(me(&first).await, me(&second).await, "the same openid is the same user");
    let users: i64 = {
        use diesel::QueryDsl as _;
        use storage::RunQueryDsl as _;
        storage::schema::users::table.count().get_result(&mut *app.conn().await).await.unwrap()
    };
    assert_eq!(users, 1);

    // A used code and a bad code are the client's problem, with a message to act on.
    let (status, body) = app.post("/usercenter/v1/user/wxMiniAuth", &json!({ "code": "alice:1" }), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["code"], 40104);
    let (status, body) = app.post("/usercenter/v1/user/wxMiniAuth", &json!({ "code": "bad-code" }), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body["msg"].as_str().unwrap().contains("wx.login"), "{body}");
}

/// looklook's front end logs in with `{code, iv, encryptedData}` from wx.getUserInfo: the first login fills nickname
/// and avatar; user info that does not open with the login's session key, or was issued for another mini-program,
/// is refused and creates no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wechat_login_with_looklooks_encrypted_user_info() {
    const AUTH: &str = "/usercenter/v1/user/wxMiniAuth";
    let app = spawn_app().await;
    let avatar = "https://thirdwx.qlogo.cn/mmopen/vi_32/dana/132";
    let (data, iv) = app.control.user_info("dana:1", "丹娜", avatar, None).await.unwrap();
    let t = app.ok(AUTH, &json!({ "code": "dana:1", "iv": iv, "encryptedData": data }), None).await;
    let me = app.ok(DETAIL, &json!({}), Some(t["accessToken"].as_str().unwrap())).await;
    assert_eq!((me["userInfo"]["nickname"].as_str(), me["userInfo"]["avatar"].as_str()), (Some("丹娜"), Some(avatar)));

    // Another mini-program's user info (its watermark), a tampered ciphertext, or one of another login: refused.
    let (data, iv) = app.control.user_info("erin:1", "Erin", avatar, Some("wx0000000000000000")).await.unwrap();
    let (status, body) = app.post(AUTH, &json!({ "code": "erin:1", "iv": iv, "encryptedData": data }), None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["msg"].as_str().unwrap().contains("another mini-program"), "{body}");
    let (data, iv) = app.control.user_info("erin:2", "Erin", avatar, None).await.unwrap();
    let mut bytes = base64_decode(&data);
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    let tampered = base64_encode(&bytes);
    let (status, body) = app.post(AUTH, &json!({ "code": "erin:2", "iv": iv, "encryptedData": tampered }), None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (data, iv) = app.control.user_info("erin:3", "Erin", avatar, None).await.unwrap();
    let (status, body) = app.post(AUTH, &json!({ "code": "erin:4", "iv": iv, "encryptedData": data }), None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["msg"].as_str().unwrap().contains("session key"), "{body}");
    // Half of the pair is a client bug, answered before WeChat is asked.
    let (status, body) = app.post(AUTH, &json!({ "code": "erin:5", "iv": "AAAA" }), None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["msg"].as_str().unwrap().contains("together"), "{body}");
    let users: i64 = {
        use diesel::QueryDsl as _;
        use storage::RunQueryDsl as _;
        storage::schema::users::table.count().get_result(&mut *app.conn().await).await.unwrap()
    };
    assert_eq!(users, 1, "only dana exists");
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_logins_make_one_user() {
    let app = spawn_app().await;
    let logins = (0..6).map(|i| {
        let app = &app;
        async move { app.ok("/usercenter/v1/user/wxMiniAuth", &json!({ "code": format!("carol:{i}") }), None).await }
    });
    let tokens = futures::future::join_all(logins).await;
    let mut ids = Vec::new();
    for t in tokens {
        let d = app.ok(DETAIL, &json!({}), Some(t["accessToken"].as_str().unwrap())).await;
        ids.push(d["userInfo"]["id"].as_i64().unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_login_and_wrong_passwords() {
    let app = spawn_app().await;
    let creds = json!({ "mobile": "13800138000", "password": "correct horse battery" });
    let reg = app.ok("/usercenter/v1/user/register", &creds, None).await;
    let token = reg["accessToken"].as_str().unwrap();
    let me = app.ok(DETAIL, &json!({}), Some(token)).await;
    assert_eq!(me["userInfo"]["mobile"], "13800138000", "the owner sees their own mobile");
    assert_eq!(me["userInfo"]["wxMiniBound"], false);

    let (status, body) = app.post("/usercenter/v1/user/register", &creds, None).await;
    assert_eq!((status, body["code"].as_i64()), (StatusCode::CONFLICT, Some(40900)), "{body}");

    let login = app.ok("/usercenter/v1/user/login", &creds, None).await;
    assert!(login["accessToken"].as_str().is_some());
    for wrong in [
        json!({ "mobile": "13800138000", "password": "wrong password!" }),
        json!({ "mobile": "13900139000", "password": "correct horse battery" }),
    ] {
        let (status, body) = app.post("/usercenter/v1/user/login", &wrong, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["msg"], "mobile or password is wrong", "same answer for unknown mobile and wrong password");
    }
    // Guessing is slowed by the rate limits (tests/api/limits.rs), which this app runs without.

    let (status, body) = app
        .post("/usercenter/v1/user/register", &json!({ "mobile": "12ab", "password": "long enough pw" }), None)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, _) =
        app.post("/usercenter/v1/user/register", &json!({ "mobile": "13700137000", "password": "short" }), None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_missing_expired_or_forged_are_refused() {
    let app = spawn_app().await;
    let token = app.wx_login("dave").await;
    app.ok(DETAIL, &json!({}), Some(&token)).await;

    let (status, body) = app.post(DETAIL, &json!({}), None).await;
    assert_eq!((status, body["code"].as_i64()), (StatusCode::UNAUTHORIZED, Some(40100)), "{body}");

    let now = chrono::Utc::now().timestamp();
    let claims = |exp: i64| json!({ "sub": "1", "userId": 1, "iat": exp - 7200, "exp": exp });
    let sign = |secret: &str, exp: i64| {
        jsonwebtoken::encode(&Header::default(), &claims(exp), &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    };
    let expired = sign(SECRET, now - 3600);
    let (status, body) = app.post(DETAIL, &json!({}), Some(&expired)).await;
    assert_eq!((status, body["code"].as_i64()), (StatusCode::UNAUTHORIZED, Some(40101)), "{body}");

    let forged = sign("another-secret-that-is-long-enough-0123", now + 3600);
    let (status, body) = app.post(DETAIL, &json!({}), Some(&forged)).await;
    assert_eq!((status, body["code"].as_i64()), (StatusCode::UNAUTHORIZED, Some(40102)), "{body}");

    // A valid token with its payload swapped for another user's: the signature no longer matches.
    let parts: Vec<&str> = token.split('.').collect();
    let other = sign(SECRET, now + 3600);
    let swapped = format!("{}.{}.{}", parts[0], other.split('.').nth(1).unwrap(), parts[2]);
    let (status, _) = app.post(DETAIL, &json!({}), Some(&swapped)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
