//! Mini-program server API: jscode2session, access tokens, subscribe messages. Errors are
//! WeChat's: HTTP 200 with `{"errcode","errmsg"}`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::faults::{Api, FailSpec};
use crate::rules;
use crate::server::{Journal, Shared, lock};
use crate::util::{self, hmac_sha256, sha256};

/// What WeChat says a token lives for.
const TOKEN_TTL: Duration = Duration::from_secs(7200);
/// An old token stays valid this long after a new one is issued.
const TOKEN_OVERLAP: Duration = Duration::from_secs(300);

/// A subscribe message the sandbox accepted, as `GET /sandbox/v1/subscribe-messages` lists it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SubscribeRecord {
    pub msgid: u64,
    pub touser: String,
    pub template_id: String,
    pub page: Option<String>,
    pub data: Value,
    pub miniprogram_state: String,
    pub lang: String,
    /// RFC 3339 time it was accepted, UTC with milliseconds (as in callback records): load runs time delivery by it.
    pub at: String,
}

pub(crate) struct MiniState {
    /// token → when it stops working.
    tokens: HashMap<String, Instant>,
    /// The token `/cgi-bin/stable_token` hands out while it is valid.
    stable: Option<String>,
    used_codes: HashSet<String>,
    /// Empty: any template id is accepted.
    pub templates: HashSet<String>,
    pub messages: Journal<SubscribeRecord>,
    next_msgid: u64,
}

impl MiniState {
    pub fn new(templates: &[String], max_records: usize) -> Self {
        Self {
            tokens: HashMap::new(),
            stable: None,
            used_codes: HashSet::new(),
            templates: templates.iter().cloned().collect(),
            messages: Journal::new(max_records),
            next_msgid: 2_000_000_000_000_000,
        }
    }

    /// A new token; every older token keeps working at most [`TOKEN_OVERLAP`] longer.
    fn issue(&mut self, now: Instant) -> String {
        let cutoff = now + TOKEN_OVERLAP;
        for exp in self.tokens.values_mut() {
            *exp = (*exp).min(cutoff);
        }
        let token = format!("SANDBOX_{}", util::random_string(util::ALNUM, 120));
        self.tokens.insert(token.clone(), now + TOKEN_TTL);
        token
    }

    fn remaining(&self, token: &str, now: Instant) -> Option<Duration> {
        self.tokens.get(token).and_then(|exp| exp.checked_duration_since(now)).filter(|d| !d.is_zero())
    }

    pub fn expire_all(&mut self) {
        let now = Instant::now();
        for exp in self.tokens.values_mut() {
            *exp = now;
        }
    }
}

fn err(errcode: i64, msg: &str) -> Json<Value> {
    // Real errmsgs end with a request id; clients must match on errcode, not on the text.
    Json(json!({"errcode": errcode, "errmsg": format!("{msg} rid: {}", util::random_string(b"0123456789abcdef", 8))}))
}

fn fault_answer(spec: FailSpec) -> Json<Value> {
    err(spec.errcode.unwrap_or(-1), spec.message.as_deref().unwrap_or("system error (injected fault)"))
}

/// openid = `o` + 15 characters derived from (appid, user) + 12 characters of a MAC over
/// them. Stable per user, and recognisable as issued by this identity even after a restart.
pub(crate) fn openid_for(shared: &Shared, user: &str) -> String {
    let head = URL_SAFE_NO_PAD.encode(sha256(format!("openid:{}:{user}", shared.identity.appid).as_bytes()));
    let head = &head[..15];
    format!("o{head}{}", openid_check(shared, head))
}

fn openid_check(shared: &Shared, head: &str) -> String {
    let mac = hmac_sha256(shared.identity.miniprogram_secret.as_bytes(), head.as_bytes());
    URL_SAFE_NO_PAD.encode(mac)[..12].to_owned()
}

/// Whether the sandbox issued this openid (any user, any run of this identity).
pub(crate) fn openid_known(shared: &Shared, openid: &str) -> bool {
    openid.len() == 28
        && openid.is_ascii()
        && openid.starts_with('o')
        && openid_check(shared, &openid[1..16]) == openid[16..]
}

pub(crate) async fn jscode2session(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Json<Value> {
    shared.injected_latency(Api::Jscode2session).await;
    if let Some(spec) = shared.take_fail(Api::Jscode2session) {
        return fault_answer(spec);
    }
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or("");
    if get("appid") != shared.identity.appid {
        return err(40013, "invalid appid");
    }
    if get("secret") != shared.identity.miniprogram_secret {
        return err(40125, "invalid appsecret");
    }
    if get("grant_type") != "authorization_code" {
        return err(40002, "invalid grant_type");
    }
    let code = get("js_code");
    if code.is_empty() {
        return err(41008, "missing code");
    }
    if code.starts_with("bad") {
        return err(40029, "invalid code");
    }
    if code.starts_with("blocked") {
        return err(40226, "invalid code, this user is blocked");
    }
    // A code works once, as with WeChat's wx.login codes.
    if !lock(&shared.mini).used_codes.insert(code.to_owned()) {
        return err(40163, "code been used");
    }
    let user = code.split(':').next().unwrap_or(code);
    Json(json!({"openid": openid_for(&shared, user), "session_key": session_key_for(code)}))
}

/// The session key WeChat gives a login code (base64 of 16 bytes), the same every time for one code.
pub(crate) fn session_key_for(code: &str) -> String {
    STANDARD.encode(&sha256(format!("session:{code}").as_bytes())[..16])
}

pub(crate) async fn token(State(shared): State<Arc<Shared>>, Query(q): Query<HashMap<String, String>>) -> Json<Value> {
    shared.injected_latency(Api::Token).await;
    if let Some(spec) = shared.take_fail(Api::Token) {
        return fault_answer(spec);
    }
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or("");
    if get("grant_type") != "client_credential" {
        return err(40002, "invalid grant_type");
    }
    if get("appid") != shared.identity.appid {
        return err(40013, "invalid appid");
    }
    if get("secret") != shared.identity.miniprogram_secret {
        return err(40125, "invalid appsecret");
    }
    let token = lock(&shared.mini).issue(Instant::now());
    Json(json!({"access_token": token, "expires_in": TOKEN_TTL.as_secs()}))
}

pub(crate) async fn stable_token(State(shared): State<Arc<Shared>>, body: Bytes) -> Json<Value> {
    shared.injected_latency(Api::StableToken).await;
    if let Some(spec) = shared.take_fail(Api::StableToken) {
        return fault_answer(spec);
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return err(47001, "data format error");
    };
    let get = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    if get("grant_type") != "client_credential" {
        return err(40002, "invalid grant_type");
    }
    if get("appid") != shared.identity.appid {
        return err(40013, "invalid appid");
    }
    if get("secret") != shared.identity.miniprogram_secret {
        return err(40125, "invalid appsecret");
    }
    let force = v.get("force_refresh").and_then(Value::as_bool).unwrap_or(false);
    let now = Instant::now();
    let mut mini = lock(&shared.mini);
    // The stable token is the same for every caller until it expires or is force-refreshed,
    // which is what makes it safe for several replicas.
    let current = mini.stable.clone().and_then(|t| mini.remaining(&t, now).map(|left| (t, left)));
    let (token, left) = match current {
        Some((t, left)) if !force => (t, left),
        _ => {
            let t = mini.issue(now);
            mini.stable = Some(t.clone());
            (t, TOKEN_TTL)
        }
    };
    Json(json!({"access_token": token, "expires_in": left.as_secs()}))
}

pub(crate) async fn subscribe_send(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Json<Value> {
    shared.injected_latency(Api::SubscribeSend).await;
    let Some(token) = q.get("access_token").filter(|t| !t.is_empty()) else {
        return err(41001, "access_token missing");
    };
    {
        let mini = lock(&shared.mini);
        match mini.tokens.get(token.as_str()) {
            None => return err(40001, "invalid credential, access_token is invalid or not latest"),
            Some(_) if mini.remaining(token, Instant::now()).is_none() => {
                return err(42001, "access_token expired");
            }
            Some(_) => {}
        }
    }
    if let Some(spec) = shared.take_fail(Api::SubscribeSend) {
        return fault_answer(spec);
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return err(47001, "data format error");
    };
    let get = |k: &str| v.get(k).and_then(Value::as_str);
    let Some(touser) = get("touser").filter(|t| openid_known(&shared, t)) else {
        return err(40003, "invalid openid");
    };
    let Some(template_id) = get("template_id").filter(|t| !t.is_empty()) else {
        return err(40037, "invalid template_id");
    };
    let state = get("miniprogram_state").unwrap_or("formal");
    if !matches!(state, "developer" | "trial" | "formal") {
        return err(47003, "argument invalid! miniprogram_state invalid");
    }
    let lang = get("lang").unwrap_or("zh_CN");
    if !matches!(lang, "zh_CN" | "en_US" | "zh_HK" | "zh_TW") {
        return err(47003, "argument invalid! lang invalid");
    }
    let Some(data) = v.get("data").and_then(Value::as_object).filter(|d| !d.is_empty()) else {
        return err(47003, "argument invalid! data is empty");
    };
    for (key, item) in data {
        let ok = item.get("value").and_then(Value::as_str).is_some_and(|val| rules::value_ok(key, val));
        if !ok {
            return err(47003, &format!("argument invalid! data.{key}.value invalid"));
        }
    }
    if let Some(page) = v.get("page")
        && !page.is_string()
    {
        return err(41030, "invalid page");
    }
    // One lock at a time: the faults lock is never taken while holding another.
    let refused = lock(&shared.faults).refused.contains(touser);
    let mut mini = lock(&shared.mini);
    if !mini.templates.is_empty() && !mini.templates.contains(template_id) {
        return err(40037, "invalid template_id");
    }
    if refused {
        return err(43101, "user refuse to accept the msg");
    }
    mini.next_msgid += 1;
    let msgid = mini.next_msgid;
    mini.messages.push(SubscribeRecord {
        msgid,
        touser: touser.to_owned(),
        template_id: template_id.to_owned(),
        page: get("page").map(str::to_owned),
        data: Value::Object(data.clone()),
        miniprogram_state: state.to_owned(),
        lang: lang.to_owned(),
        at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    Json(json!({"errcode": 0, "errmsg": "ok", "msgid": msgid}))
}
