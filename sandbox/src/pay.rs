//! Pay API v3: merchant signature check, order and refund state with WeChat's rules and
//! errors, and platform-signed answers.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use wechat::{AuthorizationHeader, MAX_SKEW_SECS, nonce_str, response_message};

use crate::faults::{Api, FailSpec};
use crate::notify::{self, Delivery};
use crate::server::{Shared, SigningMode, lock};
use crate::util::{self, now_wechat_time, unix_now};

/// At most this many partial refunds per order (WeChat's limit).
const MAX_REFUNDS_PER_ORDER: u32 = 50;

/// Order state, WeChat's `trade_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TradeState {
    NotPay,
    UserPaying,
    PayError,
    Success,
    Refund,
    Closed,
}

impl TradeState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotPay => "NOTPAY",
            Self::UserPaying => "USERPAYING",
            Self::PayError => "PAYERROR",
            Self::Success => "SUCCESS",
            Self::Refund => "REFUND",
            Self::Closed => "CLOSED",
        }
    }

    fn desc(self) -> &'static str {
        match self {
            Self::NotPay => "订单未支付",
            Self::UserPaying => "用户支付中",
            Self::PayError => "支付失败，请重新下单支付",
            Self::Success => "支付成功",
            Self::Refund => "订单发生过退款",
            Self::Closed => "订单已关闭",
        }
    }

    /// Whether the user can still pay (re-entry with the same parameters is allowed).
    fn is_open(self) -> bool {
        matches!(self, Self::NotPay | Self::UserPaying | Self::PayError)
    }

    /// WeChat's order life cycle: an open order is paid, fails, or is closed; a paid order
    /// can be refunded. Nothing leaves CLOSED or REFUND except further refunds.
    pub fn can_transition(from: Self, to: Self) -> bool {
        use TradeState::*;
        matches!(
            (from, to),
            (NotPay | UserPaying | PayError, Success | Closed | PayError | UserPaying)
                | (Success, Refund)
                | (Refund, Refund)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefundStatus {
    Processing,
    Success,
}

impl RefundStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Processing => "PROCESSING",
            Self::Success => "SUCCESS",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Order {
    /// The whole prepay body as parsed JSON: re-entry must repeat it exactly.
    pub request: Value,
    pub appid: String,
    pub mchid: String,
    pub out_trade_no: String,
    pub attach: Option<String>,
    pub notify_url: String,
    pub total: i64,
    pub currency: String,
    pub openid: String,
    /// `time_expire`, when given: the user can no longer pay after it.
    pub time_expire: Option<chrono::DateTime<chrono::FixedOffset>>,
    pub state: TradeState,
    pub transaction_id: Option<String>,
    pub success_time: Option<String>,
    pub refunded: i64,
    pub refund_count: u32,
    /// The last notification sent for this order (for duplicate-callback faults).
    pub last_delivery: Option<Arc<Delivery>>,
}

#[derive(Debug, Clone)]
pub(crate) struct RefundRecord {
    pub refund_id: String,
    pub out_refund_no: String,
    pub out_trade_no: String,
    pub transaction_id: String,
    pub create_time: String,
    pub success_time: Option<String>,
    pub status: RefundStatus,
    pub total: i64,
    pub refund: i64,
    pub currency: String,
    pub notify_url: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct PayState {
    pub orders: HashMap<String, Order>,
    pub by_transaction_id: HashMap<String, String>,
    pub refunds: HashMap<String, RefundRecord>,
}

/// A WeChat Pay error answer: HTTP status + `{"code","message","detail"?}`.
#[derive(Debug)]
pub(crate) struct PayError {
    status: StatusCode,
    code: String,
    message: String,
    detail: Option<Value>,
}

impl PayError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self { status, code: code.to_owned(), message: message.into(), detail: None }
    }

    fn sign(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "SIGN_ERROR", message)
    }

    /// PARAM_ERROR naming the field like WeChat's `detail` does.
    fn param(field: &str, value: Option<&Value>, issue: &str) -> Self {
        let mut detail = json!({"field": field, "location": "body", "issue": issue});
        if let Some(v) = value {
            detail["value"] = v.clone();
        }
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "PARAM_ERROR".into(),
            message: format!("输入源“/body{field}”映射到值字段校验失败：{issue}"),
            detail: Some(detail),
        }
    }

    fn not_found(message: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "ORDER_NOT_EXIST", message)
    }

    fn from_fault(spec: FailSpec) -> Self {
        let status =
            spec.status.and_then(|s| StatusCode::from_u16(s).ok()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self::new(
            status,
            spec.code.as_deref().unwrap_or("SYSTEM_ERROR"),
            spec.message.unwrap_or_else(|| "系统错误（注入的故障）".to_owned()),
        )
    }

    fn body(&self) -> Vec<u8> {
        let mut v = json!({"code": self.code, "message": self.message});
        if let Some(d) = &self.detail {
            v["detail"] = d.clone();
        }
        serde_json::to_vec(&v).expect("JSON values serialize")
    }
}

type PayResult = Result<(StatusCode, Vec<u8>), PayError>;

fn ok_json(v: &Value) -> PayResult {
    Ok((StatusCode::OK, serde_json::to_vec(v).expect("JSON values serialize")))
}

/// The request as WeChat sees it, checked against the merchant's key.
struct SignedRequest<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    body: &'a [u8],
}

impl Shared {
    /// WeChat's gate: User-Agent present, Authorization well formed for our merchant and
    /// certificate serial, timestamp within 5 minutes, and an RSA signature over the method,
    /// the path and query exactly as received, the timestamp, the nonce and the raw body.
    fn authenticate(&self, req: &SignedRequest<'_>) -> Result<(), PayError> {
        if self.options.require_user_agent && req.headers.get(axum::http::header::USER_AGENT).is_none() {
            return Err(PayError::new(StatusCode::BAD_REQUEST, "PARAM_ERROR", "HTTP头缺少User-Agent"));
        }
        let value = req
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| PayError::sign("Http头Authorization值为空"))?;
        let auth = AuthorizationHeader::parse(value).map_err(|e| {
            PayError::sign(format!("Http头Authorization值格式错误，请参考《微信支付商户REST API签名规则》: {e}"))
        })?;
        if auth.mchid != self.identity.mchid {
            return Err(PayError::sign("商户号不存在或与签名不匹配"));
        }
        if !auth.serial_no.eq_ignore_ascii_case(&self.identity.merchant_serial_no) {
            return Err(PayError::sign("商户证书序列号有误。请使用签名私钥匹配的证书序列号"));
        }
        if (unix_now() - auth.timestamp).abs() > MAX_SKEW_SECS {
            return Err(PayError::sign("签名过期，Http头Authorization中的timestamp与当前时间相差超过5分钟"));
        }
        let path_and_query = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or_else(|| req.uri.path());
        auth.verify(&self.merchant_key, req.method.as_str(), path_and_query, req.body)
            .map_err(|_| PayError::sign("签名错误，请检查后再试"))
    }

    /// Signs an answer with the platform key; every answer, errors included, is signed.
    fn signed(&self, req_headers: &HeaderMap, status: StatusCode, body: Vec<u8>) -> Response {
        let serial = match req_headers.get("Wechatpay-Serial").and_then(|v| v.to_str().ok()) {
            Some(s) if s.eq_ignore_ascii_case(&self.certificate.serial_no) => self.certificate.serial_no.clone(),
            Some(s) if s == self.identity.platform_public_key_id => s.to_owned(),
            _ => match self.options.signing {
                SigningMode::PublicKey => self.identity.platform_public_key_id.clone(),
                SigningMode::Certificate => self.certificate.serial_no.clone(),
            },
        };
        let ts = unix_now();
        let nonce = nonce_str();
        let signature = self.platform.sign(&response_message(ts, &nonce, &body));
        let mut resp = (status, body).into_response();
        let h = resp.headers_mut();
        let put = |h: &mut HeaderMap, name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        };
        if !resp_is_empty(status) {
            h.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
        }
        put(h, "Wechatpay-Timestamp", ts.to_string());
        put(h, "Wechatpay-Nonce", nonce);
        put(h, "Wechatpay-Signature", signature);
        put(h, "Wechatpay-Serial", serial);
        put(h, "Wechatpay-Signature-Type", wechat::AUTH_SCHEME.to_owned());
        put(h, "Request-ID", util::request_id());
        resp
    }

    /// The common path of every Pay endpoint: injected latency, authentication, injected
    /// failure, then the endpoint itself; the answer is signed whatever it is.
    async fn pay_call(
        self: &Arc<Self>,
        api: Api,
        req: SignedRequest<'_>,
        f: impl FnOnce(&Arc<Self>) -> PayResult,
    ) -> Response {
        self.injected_latency(api).await;
        let result = self.authenticate(&req).and_then(|()| match self.take_fail(api) {
            Some(spec) => Err(PayError::from_fault(spec)),
            None => f(self),
        });
        // The work is done (or refused); a late-answer fault holds what the caller hears about it.
        self.late_answer(api).await;
        match result {
            Ok((status, body)) => self.signed(req.headers, status, body),
            Err(e) => {
                tracing::debug!(code = %e.code, status = %e.status, "pay api error");
                let body = e.body();
                self.signed(req.headers, e.status, body)
            }
        }
    }
}

fn resp_is_empty(status: StatusCode) -> bool {
    status == StatusCode::NO_CONTENT
}

// ---------------------------------------------------------------------------------------
// Field rules, checked like WeChat does: the first broken rule is reported with its field.

fn parse_body(body: &[u8]) -> Result<Value, PayError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(PayError::new(StatusCode::BAD_REQUEST, "PARAM_ERROR", "请求体不是合法的JSON对象")),
    }
}

fn pointer<'a>(v: &'a Value, field: &str) -> Option<&'a Value> {
    v.pointer(field)
}

fn required_str<'a>(v: &'a Value, field: &str) -> Result<&'a str, PayError> {
    match pointer(v, field) {
        None | Some(Value::Null) => Err(PayError::param(field, None, "此字段为必填项")),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(PayError::param(field, Some(other), "应为字符串")),
    }
}

fn optional_str<'a>(v: &'a Value, field: &str) -> Result<Option<&'a str>, PayError> {
    match pointer(v, field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(PayError::param(field, Some(other), "应为字符串")),
    }
}

fn required_int(v: &Value, field: &str) -> Result<i64, PayError> {
    match pointer(v, field) {
        None | Some(Value::Null) => Err(PayError::param(field, None, "此字段为必填项")),
        Some(n @ Value::Number(_)) => n.as_i64().ok_or_else(|| PayError::param(field, Some(n), "应为整数")),
        Some(other) => Err(PayError::param(field, Some(other), "应为整数")),
    }
}

fn check_len(v: &Value, field: &str, s: &str, min: usize, max: usize) -> Result<(), PayError> {
    let n = s.chars().count();
    if n < min || n > max {
        return Err(PayError::param(field, pointer(v, field), &format!("长度应为{min}到{max}个字符")));
    }
    Ok(())
}

fn out_trade_no_ok(s: &str) -> bool {
    (6..=32).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'|' | b'*'))
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// https, at most 255 characters, no query string. The sandbox also takes plain http on a
/// loopback host, since it can only deliver to local receivers anyway, and on any host when it may call back
/// remote hosts (`SandboxOptions::allow_remote_callbacks`: a sandbox in a development cluster).
fn check_notify_url(shared: &Shared, v: &Value, field: &str, url: &str) -> Result<(), PayError> {
    let bad = |issue: &str| Err(PayError::param(field, pointer(v, field), issue));
    if url.len() > 255 {
        return bad("长度不能超过255");
    }
    if url.contains('?') {
        return bad("通知地址不能携带参数");
    }
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return bad("不是合法的URL");
    };
    let host = parsed.host_str().unwrap_or("").trim_start_matches('[').trim_end_matches(']');
    match parsed.scheme() {
        "https" if !host.is_empty() => Ok(()),
        "http" if is_loopback_host(host) => Ok(()),
        "http" if shared.options.allow_remote_callbacks && !host.is_empty() => Ok(()),
        _ => bad("通知地址须为https"),
    }
}

struct Prepay {
    time_expire: Option<chrono::DateTime<chrono::FixedOffset>>,
    appid: String,
    mchid: String,
    out_trade_no: String,
    attach: Option<String>,
    notify_url: String,
    total: i64,
    currency: String,
    openid: String,
}

fn check_prepay(shared: &Shared, v: &Value) -> Result<Prepay, PayError> {
    let appid = required_str(v, "/appid")?;
    check_len(v, "/appid", appid, 1, 32)?;
    let mchid = required_str(v, "/mchid")?;
    check_len(v, "/mchid", mchid, 1, 32)?;
    let description = required_str(v, "/description")?;
    check_len(v, "/description", description, 1, 127)?;
    let out_trade_no = required_str(v, "/out_trade_no")?;
    if !out_trade_no_ok(out_trade_no) {
        return Err(PayError::param(
            "/out_trade_no",
            pointer(v, "/out_trade_no"),
            "长度应为6到32个字符，只能是数字、大小写字母_-|*",
        ));
    }
    if let Some(t) = optional_str(v, "/time_expire")?
        && chrono::DateTime::parse_from_rfc3339(t).is_err()
    {
        return Err(PayError::param("/time_expire", pointer(v, "/time_expire"), "应为rfc3339格式的时间"));
    }
    let attach = optional_str(v, "/attach")?;
    if let Some(a) = attach {
        check_len(v, "/attach", a, 0, 128)?;
    }
    let notify_url = required_str(v, "/notify_url")?;
    check_notify_url(shared, v, "/notify_url", notify_url)?;
    let total = required_int(v, "/amount/total")?;
    if total < 1 {
        return Err(PayError::param("/amount/total", pointer(v, "/amount/total"), "订单金额必须大于0"));
    }
    let currency = optional_str(v, "/amount/currency")?.unwrap_or("CNY");
    if currency != "CNY" {
        return Err(PayError::param("/amount/currency", pointer(v, "/amount/currency"), "币种只支持CNY"));
    }
    let openid = required_str(v, "/payer/openid")?;
    check_len(v, "/payer/openid", openid, 1, 128)?;
    if mchid != shared.identity.mchid {
        return Err(PayError::new(
            StatusCode::BAD_REQUEST,
            "PARAM_ERROR",
            "请确认请求头中的商户号与请求体中的商户号一致",
        ));
    }
    if appid != shared.identity.appid {
        return Err(PayError::new(StatusCode::BAD_REQUEST, "APPID_MCHID_NOT_MATCH", "appid和mch_id不匹配"));
    }
    Ok(Prepay {
        time_expire: optional_str(v, "/time_expire")?.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()),
        appid: appid.to_owned(),
        mchid: mchid.to_owned(),
        out_trade_no: out_trade_no.to_owned(),
        attach: attach.map(str::to_owned),
        notify_url: notify_url.to_owned(),
        total,
        currency: currency.to_owned(),
        openid: openid.to_owned(),
    })
}

fn check_mchid_query(shared: &Shared, uri: &Uri) -> Result<(), PayError> {
    let mchid = uri.query().unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("mchid=")).ok_or_else(|| {
        PayError::new(
            StatusCode::BAD_REQUEST,
            "PARAM_ERROR",
            "输入源“/query/mchid”映射到值字段“直连商户号”必填性规则校验失败，此字段为必填项",
        )
    })?;
    if mchid != shared.identity.mchid {
        return Err(PayError::new(
            StatusCode::BAD_REQUEST,
            "PARAM_ERROR",
            "请确认请求头中的商户号与请求参数中的商户号一致",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// JSON shapes

pub(crate) fn transaction_json(o: &Order) -> Value {
    let mut v = json!({
        "appid": o.appid,
        "mchid": o.mchid,
        "out_trade_no": o.out_trade_no,
        "trade_state": o.state.as_str(),
        "trade_state_desc": o.state.desc(),
        "promotion_detail": [],
    });
    if let Some(a) = &o.attach {
        v["attach"] = json!(a);
    }
    match &o.transaction_id {
        Some(tid) => {
            v["transaction_id"] = json!(tid);
            v["trade_type"] = json!("JSAPI");
            v["bank_type"] = json!("OTHERS");
            v["payer"] = json!({"openid": o.openid});
            v["amount"] =
                json!({"total": o.total, "payer_total": o.total, "currency": o.currency, "payer_currency": o.currency});
            if let Some(t) = &o.success_time {
                v["success_time"] = json!(t);
            }
        }
        // WeChat leaves the payer and the transaction id out while nothing was paid.
        None => v["amount"] = json!({"total": o.total, "currency": o.currency, "payer_currency": o.currency}),
    }
    v
}

/// The transaction of a JSAPI order of `total` fen (CNY) by `openid` that was paid just now, as [`settle`] reports
/// it: for notifications built outside a running sandbox ([`crate::CallbackSigner`]).
pub(crate) fn paid_transaction_json(appid: &str, mchid: &str, out_trade_no: &str, total: i64, openid: &str) -> Value {
    transaction_json(&Order {
        request: Value::Null,
        appid: appid.to_owned(),
        mchid: mchid.to_owned(),
        out_trade_no: out_trade_no.to_owned(),
        attach: None,
        notify_url: String::new(),
        total,
        currency: "CNY".to_owned(),
        openid: openid.to_owned(),
        time_expire: None,
        state: TradeState::Success,
        transaction_id: Some(util::transaction_id()),
        success_time: Some(now_wechat_time()),
        refunded: 0,
        refund_count: 0,
        last_delivery: None,
    })
}

pub(crate) fn refund_json(r: &RefundRecord) -> Value {
    let mut v = json!({
        "refund_id": r.refund_id,
        "out_refund_no": r.out_refund_no,
        "transaction_id": r.transaction_id,
        "out_trade_no": r.out_trade_no,
        "channel": "ORIGINAL",
        "user_received_account": "支付用户零钱",
        "create_time": r.create_time,
        "status": r.status.as_str(),
        "funds_account": "AVAILABLE",
        "amount": {
            "total": r.total, "refund": r.refund, "from": [],
            "payer_total": r.total, "payer_refund": r.refund,
            "settlement_refund": r.refund, "settlement_total": r.total,
            "discount_refund": 0, "currency": r.currency, "refund_fee": 0,
        },
        "promotion_detail": [],
    });
    if let Some(t) = &r.success_time {
        v["success_time"] = json!(t);
    }
    v
}

pub(crate) fn refund_notice_json(r: &RefundRecord, mchid: &str) -> Value {
    let mut v = json!({
        "mchid": mchid,
        "out_trade_no": r.out_trade_no,
        "transaction_id": r.transaction_id,
        "out_refund_no": r.out_refund_no,
        "refund_id": r.refund_id,
        "refund_status": r.status.as_str(),
        "user_received_account": "支付用户零钱",
        "amount": {"total": r.total, "refund": r.refund, "payer_total": r.total, "payer_refund": r.refund},
    });
    if let Some(t) = &r.success_time {
        v["success_time"] = json!(t);
    }
    v
}

// ---------------------------------------------------------------------------------------
// Handlers

pub(crate) async fn prepay_jsapi(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = SignedRequest { method: &method, uri: &uri, headers: &headers, body: &body };
    shared
        .pay_call(Api::Jsapi, req, |shared| {
            let v = parse_body(&body)?;
            let p = check_prepay(shared, &v)?;
            let mut state = lock(&shared.pay);
            if let Some(o) = state.orders.get(&p.out_trade_no) {
                match o.state {
                    TradeState::Success | TradeState::Refund => {
                        return Err(PayError::new(StatusCode::FORBIDDEN, "ORDERPAID", "该订单已支付"));
                    }
                    TradeState::Closed => {
                        return Err(PayError::new(StatusCode::BAD_REQUEST, "ORDER_CLOSED", "该订单已关闭"));
                    }
                    _ if o.request != v => {
                        return Err(PayError::new(
                            StatusCode::BAD_REQUEST,
                            "INVALID_REQUEST",
                            "201 商户订单号重复，二次下单的参数须与首次一致",
                        ));
                    }
                    // Same parameters on an open order: WeChat hands out a fresh prepay_id.
                    _ => return ok_json(&json!({"prepay_id": util::prepay_id()})),
                }
            }
            state.orders.insert(
                p.out_trade_no.clone(),
                Order {
                    request: v,
                    appid: p.appid,
                    mchid: p.mchid,
                    out_trade_no: p.out_trade_no,
                    attach: p.attach,
                    notify_url: p.notify_url,
                    total: p.total,
                    currency: p.currency,
                    openid: p.openid,
                    time_expire: p.time_expire,
                    state: TradeState::NotPay,
                    transaction_id: None,
                    success_time: None,
                    refunded: 0,
                    refund_count: 0,
                    last_delivery: None,
                },
            );
            drop(state);
            ok_json(&json!({"prepay_id": util::prepay_id()}))
        })
        .await
}

pub(crate) async fn query_by_out_trade_no(
    State(shared): State<Arc<Shared>>,
    Path(no): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = SignedRequest { method: &method, uri: &uri, headers: &headers, body: &body };
    shared
        .pay_call(Api::QueryOrder, req, |shared| {
            check_mchid_query(shared, &uri)?;
            let state = lock(&shared.pay);
            let o = state.orders.get(&no).ok_or_else(|| PayError::not_found("订单不存在"))?;
            ok_json(&transaction_json(o))
        })
        .await
}

pub(crate) async fn query_by_transaction_id(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = SignedRequest { method: &method, uri: &uri, headers: &headers, body: &body };
    shared
        .pay_call(Api::QueryOrder, req, |shared| {
            check_mchid_query(shared, &uri)?;
            let state = lock(&shared.pay);
            let o = state
                .by_transaction_id
                .get(&id)
                .and_then(|no| state.orders.get(no))
                .ok_or_else(|| PayError::not_found("订单不存在"))?;
            ok_json(&transaction_json(o))
        })
        .await
}

pub(crate) async fn close(
    State(shared): State<Arc<Shared>>,
    Path(no): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = SignedRequest { method: &method, uri: &uri, headers: &headers, body: &body };
    shared
        .pay_call(Api::CloseOrder, req, |shared| {
            let v = parse_body(&body)?;
            let mchid = required_str(&v, "/mchid")?;
            if mchid != shared.identity.mchid {
                return Err(PayError::new(
                    StatusCode::BAD_REQUEST,
                    "PARAM_ERROR",
                    "请确认请求头中的商户号与请求体中的商户号一致",
                ));
            }
            let mut state = lock(&shared.pay);
            let o = state.orders.get_mut(&no).ok_or_else(|| PayError::not_found("订单不存在"))?;
            match o.state {
                // Closing twice is fine: WeChat answers 204 again.
                TradeState::Closed => {}
                s if s.is_open() => o.state = TradeState::Closed,
                _ => return Err(PayError::new(StatusCode::FORBIDDEN, "ORDERPAID", "订单已支付，不能关闭")),
            }
            Ok((StatusCode::NO_CONTENT, Vec::new()))
        })
        .await
}

pub(crate) async fn create_refund(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = SignedRequest { method: &method, uri: &uri, headers: &headers, body: &body };
    shared.pay_call(Api::CreateRefund, req, |shared| refund(shared, &body)).await
}

fn refund(shared: &Arc<Shared>, body: &[u8]) -> PayResult {
    let v = parse_body(body)?;
    let out_refund_no = required_str(&v, "/out_refund_no")?;
    check_len(&v, "/out_refund_no", out_refund_no, 1, 64)?;
    if !out_refund_no.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'|' | b'*' | b'@')) {
        return Err(PayError::param("/out_refund_no", pointer(&v, "/out_refund_no"), "只能是数字、大小写字母_-|*@"));
    }
    let transaction_id = optional_str(&v, "/transaction_id")?;
    let out_trade_no = optional_str(&v, "/out_trade_no")?;
    if transaction_id.is_none() && out_trade_no.is_none() {
        return Err(PayError::param("/out_trade_no", None, "transaction_id和out_trade_no必须二选一"));
    }
    if let Some(r) = optional_str(&v, "/reason")? {
        check_len(&v, "/reason", r, 0, 80)?;
    }
    let notify_url = optional_str(&v, "/notify_url")?;
    if let Some(u) = notify_url {
        check_notify_url(shared, &v, "/notify_url", u)?;
    }
    let amount_refund = required_int(&v, "/amount/refund")?;
    let amount_total = required_int(&v, "/amount/total")?;
    let currency = required_str(&v, "/amount/currency")?;
    if currency != "CNY" {
        return Err(PayError::param("/amount/currency", pointer(&v, "/amount/currency"), "币种只支持CNY"));
    }
    if amount_refund < 1 {
        return Err(PayError::param("/amount/refund", pointer(&v, "/amount/refund"), "退款金额必须大于0"));
    }

    let mut state = lock(&shared.pay);
    let order_no = match (out_trade_no, transaction_id) {
        (Some(no), _) => Some(no.to_owned()),
        (None, Some(tid)) => state.by_transaction_id.get(tid).cloned(),
        (None, None) => None,
    };
    // A retry with the same out_refund_no returns the refund already made: never twice.
    if let Some(existing) = state.refunds.get(out_refund_no) {
        let same_order = order_no.as_deref() == Some(existing.out_trade_no.as_str());
        if same_order && existing.refund == amount_refund && existing.total == amount_total {
            return ok_json(&refund_json(existing));
        }
        return Err(PayError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "同一商户退款单号的请求参数与首次不一致",
        ));
    }
    let order_no = order_no.ok_or_else(|| PayError::new(StatusCode::NOT_FOUND, "RESOURCE_NOT_EXISTS", "订单不存在"))?;
    let order = state
        .orders
        .get_mut(&order_no)
        .ok_or_else(|| PayError::new(StatusCode::NOT_FOUND, "RESOURCE_NOT_EXISTS", "订单不存在"))?;
    if let (Some(tid), Some(own)) = (transaction_id, &order.transaction_id)
        && tid != own
    {
        return Err(PayError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", "transaction_id与out_trade_no不匹配"));
    }
    if !matches!(order.state, TradeState::Success | TradeState::Refund) {
        return Err(PayError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", "订单未支付，不能退款"));
    }
    if amount_total != order.total {
        return Err(PayError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", "订单金额与原订单金额不一致"));
    }
    if order.refunded + amount_refund > order.total {
        return Err(PayError::new(StatusCode::FORBIDDEN, "NOT_ENOUGH", "申请退款金额超过订单可退金额"));
    }
    if order.refund_count >= MAX_REFUNDS_PER_ORDER {
        return Err(PayError::new(StatusCode::FORBIDDEN, "NO_AUTH", "订单退款次数已达上限50次"));
    }
    order.refunded += amount_refund;
    order.refund_count += 1;
    order.state = TradeState::Refund;
    let record = RefundRecord {
        refund_id: util::refund_id(),
        out_refund_no: out_refund_no.to_owned(),
        out_trade_no: order.out_trade_no.clone(),
        transaction_id: order.transaction_id.clone().unwrap_or_default(),
        create_time: now_wechat_time(),
        success_time: None,
        status: RefundStatus::Processing,
        total: order.total,
        refund: amount_refund,
        currency: currency.to_owned(),
        notify_url: notify_url.map(str::to_owned),
    };
    let answer = refund_json(&record);
    state.refunds.insert(record.out_refund_no.clone(), record);
    drop(state);
    notify::complete_refund_later(shared.clone(), out_refund_no.to_owned());
    ok_json(&answer)
}

pub(crate) async fn query_refund(
    State(shared): State<Arc<Shared>>,
    Path(no): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = SignedRequest { method: &method, uri: &uri, headers: &headers, body: &body };
    shared
        .pay_call(Api::QueryRefund, req, |shared| {
            let state = lock(&shared.pay);
            let r = state
                .refunds
                .get(&no)
                .ok_or_else(|| PayError::new(StatusCode::NOT_FOUND, "RESOURCE_NOT_EXISTS", "退款单不存在"))?;
            ok_json(&refund_json(r))
        })
        .await
}

pub(crate) async fn certificates(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = SignedRequest { method: &method, uri: &uri, headers: &headers, body: &body };
    shared
        .pay_call(Api::Certificates, req, |shared| {
            let nonce = util::resource_nonce();
            let ciphertext =
                wechat::encrypt_resource(&shared.apiv3_key, &nonce, "certificate", shared.certificate.pem.as_bytes())
                    .map_err(|e| PayError::new(StatusCode::INTERNAL_SERVER_ERROR, "SYSTEM_ERROR", e.to_string()))?;
            let c = &shared.certificate;
            ok_json(&json!({"data": [{
                "serial_no": c.serial_no,
                "effective_time": c.effective_time,
                "expire_time": c.expire_time,
                "encrypt_certificate": {
                    "algorithm": "AEAD_AES_256_GCM",
                    "nonce": nonce,
                    "associated_data": "certificate",
                    "ciphertext": ciphertext,
                },
            }]}))
        })
        .await
}

/// Control: settle an order the way a user paying in WeChat would.
pub(crate) fn settle(
    shared: &Arc<Shared>,
    out_trade_no: &str,
    result: TradeState,
) -> Result<Value, (StatusCode, String)> {
    let mut state = lock(&shared.pay);
    let order = state.orders.get_mut(out_trade_no).ok_or((StatusCode::NOT_FOUND, "no such order".to_owned()))?;
    if !TradeState::can_transition(order.state, result) {
        return Err((
            StatusCode::CONFLICT,
            format!("order is {}, cannot become {}", order.state.as_str(), result.as_str()),
        ));
    }
    if result == TradeState::Success && order.time_expire.is_some_and(|t| t < chrono::Utc::now()) {
        return Err((StatusCode::CONFLICT, "the order's time_expire has passed: it can no longer be paid".to_owned()));
    }
    order.state = result;
    if matches!(result, TradeState::Success | TradeState::PayError) && order.transaction_id.is_none() {
        order.transaction_id = Some(util::transaction_id());
    }
    if result == TradeState::Success {
        order.success_time = Some(now_wechat_time());
    }
    let plain = transaction_json(order);
    let url = order.notify_url.clone();
    let tid = order.transaction_id.clone();
    if let Some(tid) = tid {
        state.by_transaction_id.insert(tid, out_trade_no.to_owned());
    }
    drop(state);
    // WeChat only notifies successful payments.
    if result == TradeState::Success {
        let delivery =
            Delivery::build(shared, url, "TRANSACTION.SUCCESS", "支付成功", "transaction", &plain, out_trade_no, None);
        if let Some(o) = lock(&shared.pay).orders.get_mut(out_trade_no) {
            o.last_delivery = Some(delivery.clone());
        }
        notify::deliver(shared.clone(), delivery, notify::Kind::Delivery);
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::TradeState::*;
    use super::*;

    #[test]
    fn every_arrow_of_the_order_life_cycle() {
        for from in [NotPay, UserPaying, PayError] {
            for to in [Success, Closed, PayError, UserPaying] {
                assert!(TradeState::can_transition(from, to), "{from:?} -> {to:?}");
            }
            assert!(!TradeState::can_transition(from, Refund));
        }
        assert!(TradeState::can_transition(Success, Refund));
        assert!(TradeState::can_transition(Refund, Refund));
        for to in [NotPay, Success, Closed, PayError] {
            assert!(!TradeState::can_transition(Success, to));
            assert!(!TradeState::can_transition(Closed, to));
            assert!(!TradeState::can_transition(Refund, to));
        }
        assert!(!TradeState::can_transition(Closed, Refund));
    }

    #[test]
    fn out_trade_no_rule() {
        assert!(out_trade_no_ok("HSO20261127000000123"));
        assert!(out_trade_no_ok("a_b-c|d*"));
        assert!(!out_trade_no_ok("short"));
        assert!(!out_trade_no_ok("has space"));
        assert!(!out_trade_no_ok(&"x".repeat(33)));
    }
}
