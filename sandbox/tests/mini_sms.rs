//! Mini-program and SMS endpoints, called with plain HTTP as a foreign client would.

mod common;

use common::spawn;
use serde_json::{Value, json};

struct Mini {
    base: String,
    appid: String,
    secret: String,
    http: reqwest::Client,
}

impl Mini {
    fn new(env: &common::Env) -> Self {
        Self {
            base: env.sandbox.base_url(),
            appid: env.sandbox.identity.appid.clone(),
            secret: env.sandbox.identity.miniprogram_secret.clone(),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    async fn get(&self, path: &str) -> Value {
        self.http.get(format!("{}{path}", self.base)).send().await.unwrap().json().await.unwrap()
    }

    async fn post(&self, path: &str, body: &Value) -> Value {
        self.http.post(format!("{}{path}", self.base)).json(body).send().await.unwrap().json().await.unwrap()
    }

    async fn session(&self, code: &str) -> Value {
        self.get(&format!(
            "/sns/jscode2session?appid={}&secret={}&js_code={code}&grant_type=authorization_code",
            self.appid, self.secret
        ))
        .await
    }

    async fn stable_token(&self, force: bool) -> Value {
        self.post(
            "/cgi-bin/stable_token",
            &json!({"grant_type":"client_credential","appid":self.appid,"secret":self.secret,"force_refresh":force}),
        )
        .await
    }

    async fn send(&self, token: &str, msg: &Value) -> Value {
        self.post(&format!("/cgi-bin/message/subscribe/send?access_token={token}"), msg).await
    }
}

fn message(openid: &str, thing: &str) -> Value {
    json!({
        "touser": openid,
        "template_id": "TPL_PAID",
        "page": "pages/order/detail?id=1",
        "miniprogram_state": "trial",
        "lang": "zh_CN",
        "data": {"thing3": {"value": thing}, "amount1": {"value": "¥25.00"}, "time2": {"value": "2026-11-27 10:00"}},
    })
}

#[tokio::test]
async fn jscode2session_gives_stable_openids_and_wechat_errors() {
    let env = spawn().await;
    let mp = Mini::new(&env);
    let a = mp.session("alice:1").await;
    let b = mp.session("alice:2").await;
    let c = mp.session("bob:1").await;
    assert_eq!(a["openid"], b["openid"], "same user part, same openid");
    assert_ne!(a["openid"], c["openid"]);
    let openid = a["openid"].as_str().unwrap();
    assert_eq!(openid.len(), 28);
    assert!(wechat::OpenId::new(openid).is_ok());
    assert!(a["session_key"].is_string());

    assert_eq!(mp.session("alice:1").await["errcode"], 40163, "a code works once");
    assert_eq!(mp.session("bad-code").await["errcode"], 40029);
    let wrong_secret = mp
        .get(&format!("/sns/jscode2session?appid={}&secret=nope&js_code=x&grant_type=authorization_code", mp.appid))
        .await;
    assert_eq!(wrong_secret["errcode"], 40125);
}

#[tokio::test]
async fn tokens_expire_on_fault_and_subscribe_rules_are_enforced() {
    let env = spawn().await;
    let mp = Mini::new(&env);
    let openid = mp.session("carol").await["openid"].as_str().unwrap().to_owned();

    let t =
        mp.get(&format!("/cgi-bin/token?grant_type=client_credential&appid={}&secret={}", mp.appid, mp.secret)).await;
    assert_eq!(t["expires_in"], 7200);
    let stable = mp.stable_token(false).await;
    assert_eq!(stable["expires_in"], 7200);
    let token = stable["access_token"].as_str().unwrap().to_owned();
    assert_eq!(mp.stable_token(false).await["access_token"], token.as_str(), "stable while valid");

    let ok = mp.send(&token, &message(&openid, "民宿订单已支付")).await;
    assert_eq!(ok["errcode"], 0, "{ok}");
    assert!(ok["msgid"].is_u64());
    let recorded = env.merchant.control_get("/sandbox/v1/subscribe-messages").await;
    assert_eq!(recorded["data"][0]["miniprogram_state"], "trial");
    assert_eq!(recorded["data"][0]["touser"], openid.as_str());

    // Value rules per key type: thing ≤ 20 characters.
    let too_long = mp.send(&token, &message(&openid, &"长".repeat(21))).await;
    assert_eq!(too_long["errcode"], 47003);
    assert!(too_long["errmsg"].as_str().unwrap().starts_with("argument invalid! data.thing3.value invalid"));

    assert_eq!(mp.send(&token, &message("oNotIssuedByThisSandbox00000", "x")).await["errcode"], 40003);
    assert_eq!(mp.send("not-a-token", &message(&openid, "x")).await["errcode"], 40001);

    // Templates: any id until a list is registered, then 40037 for others.
    let resp = env
        .merchant
        .http
        .put(format!("{}/sandbox/v1/templates", mp.base))
        .json(&json!({"template_ids": ["TPL_OTHER"]}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    assert_eq!(mp.send(&token, &message(&openid, "x")).await["errcode"], 40037);
    env.merchant
        .http
        .put(format!("{}/sandbox/v1/templates", mp.base))
        .json(&json!({"template_ids": []}))
        .send()
        .await
        .unwrap();

    // A user who refused: 43101.
    env.merchant.fault(json!({"kind":"refuse_subscribe","openid": openid})).await;
    assert_eq!(mp.send(&token, &message(&openid, "x")).await["errcode"], 43101);
    env.merchant.fault(json!({"kind":"clear"})).await;

    // Expiry fault: 42001, then a fresh stable token works.
    env.merchant.fault(json!({"kind":"expire_access_token"})).await;
    assert_eq!(mp.send(&token, &message(&openid, "x")).await["errcode"], 42001);
    let fresh = mp.stable_token(false).await["access_token"].as_str().unwrap().to_owned();
    assert_ne!(fresh, token);
    assert_eq!(mp.send(&fresh, &message(&openid, "x")).await["errcode"], 0);

    // Injected errcode on the next send only.
    env.merchant
        .fault(
            json!({"kind":"fail","api":"subscribe_send","errcode":45009,"message":"reach max api daily quota limit"}),
        )
        .await;
    assert_eq!(mp.send(&fresh, &message(&openid, "x")).await["errcode"], 45009);
    assert_eq!(mp.send(&fresh, &message(&openid, "x")).await["errcode"], 0);
}

// ------------------------------------------------------------------------------------------
// SMS: TC3-HMAC-SHA256 written here from Tencent's published algorithm.

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    aws_lc_rs::hmac::sign(&aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key), data).as_ref().to_vec()
}

fn tc3(secret_id: &str, secret_key: &str, host: &str, ts: i64, body: &str) -> String {
    let date = chrono::DateTime::from_timestamp(ts, 0).unwrap().format("%Y-%m-%d").to_string();
    let canonical = format!(
        "POST\n/\n\ncontent-type:application/json; charset=utf-8\nhost:{host}\n\ncontent-type;host\n{}",
        sha256_hex(body.as_bytes())
    );
    let scope = format!("{date}/sms/tc3_request");
    let to_sign = format!("TC3-HMAC-SHA256\n{ts}\n{scope}\n{}", sha256_hex(canonical.as_bytes()));
    let k = hmac(format!("TC3{secret_key}").as_bytes(), date.as_bytes());
    let k = hmac(&k, b"sms");
    let k = hmac(&k, b"tc3_request");
    let sig = hex::encode(hmac(&k, to_sign.as_bytes()));
    format!("TC3-HMAC-SHA256 Credential={secret_id}/{scope}, SignedHeaders=content-type;host, Signature={sig}")
}

async fn send_sms(env: &common::Env, secret_key: &str, ts: i64, body: &Value) -> Value {
    let id = &env.sandbox.identity;
    let host = env.sandbox.addr.to_string();
    let body = body.to_string();
    env.merchant
        .http
        .post(env.sandbox.base_url())
        .header("Content-Type", "application/json; charset=utf-8")
        .header("Authorization", tc3(&id.sms_secret_id, secret_key, &host, ts, &body))
        .header("X-TC-Action", "SendSms")
        .header("X-TC-Version", "2021-01-11")
        .header("X-TC-Region", "ap-guangzhou")
        .header("X-TC-Timestamp", ts.to_string())
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn sms_checks_the_tc3_signature_and_answers_per_number() {
    let env = spawn().await;
    let id = env.sandbox.identity.clone();
    let body = json!({
        "SmsSdkAppId": id.sms_sdk_app_id, "SignName": id.sms_sign_name, "TemplateId": "1234567",
        "TemplateParamSet": ["HSO2026", "25.00"], "PhoneNumberSet": ["+8613800138000", "+86abc"],
    });
    let now = chrono::Utc::now().timestamp();

    let ok = send_sms(&env, &id.sms_secret_key, now, &body).await;
    let set = ok["Response"]["SendStatusSet"].as_array().unwrap_or_else(|| panic!("{ok}"));
    assert_eq!(set[0]["Code"], "Ok");
    assert_eq!(set[0]["PhoneNumber"], "+8613800138000");
    assert_eq!(set[1]["Code"], "InvalidParameterValue.IncorrectPhoneNumber");
    assert!(ok["Response"]["RequestId"].is_string());

    let bad = send_sms(&env, "wrong-secret-key", now, &body).await;
    assert_eq!(bad["Response"]["Error"]["Code"], "AuthFailure.SignatureFailure");
    let stale = send_sms(&env, &id.sms_secret_key, now - 600, &body).await;
    assert_eq!(stale["Response"]["Error"]["Code"], "AuthFailure.SignatureExpire");

    let recorded = env.merchant.control_get("/sandbox/v1/sms").await;
    let recorded = recorded["data"].as_array().unwrap();
    assert_eq!(recorded.len(), 1, "only the accepted request is recorded");
    assert_eq!(recorded[0]["template_params"], json!(["HSO2026", "25.00"]));
}
