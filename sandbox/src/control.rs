//! The control API (`/sandbox/v1/…`): drive the sandbox like a WeChat user would, read what
//! it received and sent, and inject faults. Loopback tooling only: no authentication.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::faults::{FailSpec, Fault};
use crate::notify::{self, Delivery, Kind};
use crate::pay::{self, TradeState};
use crate::server::{Shared, lock};

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

#[derive(Debug, Deserialize)]
pub(crate) struct PayBody {
    /// SUCCESS (default), PAYERROR, USERPAYING or CLOSED.
    #[serde(default)]
    result: Option<String>,
}

/// `POST /sandbox/v1/transactions/{out_trade_no}/pay`: the user pays (or fails to).
pub(crate) async fn pay_order(
    State(shared): State<Arc<Shared>>,
    Path(no): Path<String>,
    body: Option<Json<PayBody>>,
) -> Response {
    let result = body.and_then(|b| b.0.result).unwrap_or_else(|| "SUCCESS".to_owned());
    let target = match result.as_str() {
        "SUCCESS" => TradeState::Success,
        "PAYERROR" => TradeState::PayError,
        "USERPAYING" => TradeState::UserPaying,
        "CLOSED" => TradeState::Closed,
        other => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!("result {other} is not one of SUCCESS, PAYERROR, USERPAYING, CLOSED"),
            );
        }
    };
    match pay::settle(&shared, &no, target) {
        Ok(transaction) => Json(transaction).into_response(),
        Err((status, message)) => problem(status, message),
    }
}

/// `GET /sandbox/v1/transactions/{out_trade_no}`: the order as a query would show it.
pub(crate) async fn get_order(State(shared): State<Arc<Shared>>, Path(no): Path<String>) -> Response {
    let state = lock(&shared.pay);
    match state.orders.get(&no) {
        Some(o) => Json(pay::transaction_json(o)).into_response(),
        None => problem(StatusCode::NOT_FOUND, "no such order"),
    }
}

/// `GET /sandbox/v1/callbacks[?out_trade_no=&event_type=&kind=]`: every delivery attempt.
pub(crate) async fn callbacks(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Json<Value> {
    let records = lock(&shared.callbacks);
    let keep = |field: &str, value: &str| q.get(field).is_none_or(|want| want == value);
    let list: Vec<&notify::CallbackRecord> = records
        .iter()
        .filter(|r| keep("out_trade_no", &r.out_trade_no) && keep("event_type", &r.event_type) && keep("kind", &r.kind))
        .collect();
    Json(json!({"data": list}))
}

/// `GET /sandbox/v1/subscribe-messages[?touser=&after=MSGID&limit=N]`: `after` lists only messages newer than
/// that msgid (msgids increase), so a load run can read what arrived since its last look without the whole journal.
pub(crate) async fn subscribe_messages(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let number = |key: &str| q.get(key).map(|v| v.parse::<u64>().map_err(|_| format!("{key} must be a number")));
    let (after, limit) = match (number("after").transpose(), number("limit").transpose()) {
        (Ok(after), Ok(limit)) => (after.unwrap_or(0), limit.map_or(usize::MAX, |l| l as usize)),
        (Err(e), _) | (_, Err(e)) => return problem(StatusCode::BAD_REQUEST, e),
    };
    let mini = lock(&shared.mini);
    let list: Vec<_> = mini
        .messages
        .iter()
        .filter(|m| m.msgid > after && q.get("touser").is_none_or(|t| *t == m.touser))
        .take(limit)
        .collect();
    Json(json!({"data": list})).into_response()
}

/// `GET /sandbox/v1/sms`.
pub(crate) async fn sms_messages(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let sms = lock(&shared.sms);
    Json(json!({"data": sms.iter().collect::<Vec<_>>()}))
}

#[derive(Debug, Deserialize)]
pub(crate) struct Templates {
    template_ids: Vec<String>,
}

/// `GET /sandbox/v1/refunds[?out_trade_no=…]`: every refund the sandbox made, as the refund query returns it.
pub(crate) async fn refunds(
    State(shared): State<Arc<Shared>>,
    axum::extract::Query(q): axum::extract::Query<RefundFilter>,
) -> Json<Value> {
    let pay = lock(&shared.pay);
    let mut list: Vec<&pay::RefundRecord> =
        pay.refunds.values().filter(|r| q.out_trade_no.as_deref().is_none_or(|o| o == r.out_trade_no)).collect();
    list.sort_by(|a, b| a.refund_id.cmp(&b.refund_id));
    Json(json!({"data": list.into_iter().map(pay::refund_json).collect::<Vec<_>>()}))
}

#[derive(serde::Deserialize)]
pub(crate) struct RefundFilter {
    out_trade_no: Option<String>,
}

/// `PUT /sandbox/v1/templates {"template_ids":[…]}`: the known template ids (empty: any).
pub(crate) async fn set_templates(State(shared): State<Arc<Shared>>, Json(t): Json<Templates>) -> Json<Value> {
    let mut mini = lock(&shared.mini);
    mini.templates = t.template_ids.into_iter().collect();
    Json(json!({"template_ids": mini.templates.iter().collect::<Vec<_>>()}))
}

/// `POST /sandbox/v1/faults`: one [`Fault`].
pub(crate) async fn add_fault(State(shared): State<Arc<Shared>>, Json(fault): Json<Fault>) -> Response {
    match fault {
        Fault::Fail { api, times, status, code, message, errcode } => {
            lock(&shared.faults).add_fail(api, times, FailSpec { status, code, message, errcode });
        }
        Fault::Latency { api, ms, times } => {
            lock(&shared.faults).add_latency(api, Duration::from_millis(ms), times);
        }
        Fault::LateAnswer { api, ms, times } => {
            lock(&shared.faults).add_late_answer(api, Duration::from_millis(ms), times);
        }
        Fault::ExpireAccessToken => lock(&shared.mini).expire_all(),
        Fault::DropCallbacks { out_trade_no } => {
            lock(&shared.faults).dropped.insert(out_trade_no);
        }
        Fault::RefuseSubscribe { openid } => {
            lock(&shared.faults).refused.insert(openid);
        }
        Fault::Clear => lock(&shared.faults).clear(),
        Fault::DuplicateCallback { out_trade_no } => {
            let last = lock(&shared.pay).orders.get(&out_trade_no).map(|o| o.last_delivery.clone());
            match last {
                None => return problem(StatusCode::NOT_FOUND, "no such order"),
                Some(None) => return problem(StatusCode::CONFLICT, "no notification was sent for this order yet"),
                Some(Some(d)) => notify::deliver(shared.clone(), d, Kind::Duplicate),
            }
        }
        Fault::SigntestCallback { out_trade_no } => {
            let order =
                lock(&shared.pay).orders.get(&out_trade_no).map(|o| (o.notify_url.clone(), pay::transaction_json(o)));
            let Some((url, plain)) = order else {
                return problem(StatusCode::NOT_FOUND, "no such order");
            };
            let d = Delivery::build(
                &shared,
                url,
                "TRANSACTION.SUCCESS",
                "支付成功",
                "transaction",
                &plain,
                &out_trade_no,
                None,
            );
            notify::deliver(shared.clone(), d, Kind::Signtest);
        }
    }
    (StatusCode::ACCEPTED, Json(json!({"accepted": true}))).into_response()
}

/// Body of `POST /sandbox/v1/user-info`.
#[derive(Debug, Deserialize)]
pub(crate) struct UserInfoRequest {
    /// The `wx.login` code whose session key encrypts it (as WeChat's client uses the current session's key).
    code: String,
    #[serde(rename = "nickName", default)]
    nick_name: String,
    #[serde(rename = "avatarUrl", default)]
    avatar_url: String,
    /// The watermark's appid: this sandbox's mini-program unless a test asks for another one's.
    #[serde(default)]
    appid: Option<String>,
}

/// `POST /sandbox/v1/user-info`: what `wx.getUserInfo` hands the mini-program for a login, `{encryptedData, iv}`.
pub(crate) async fn user_info(State(shared): State<Arc<Shared>>, Json(r): Json<UserInfoRequest>) -> Response {
    let plain = wechat::UserInfoPlain {
        nick_name: r.nick_name,
        avatar_url: r.avatar_url,
        watermark: wechat::Watermark {
            appid: r.appid.unwrap_or_else(|| shared.identity.appid.clone()),
            timestamp: chrono::Utc::now().timestamp(),
        },
    };
    match wechat::encrypt_user_info(&crate::mini::session_key_for(&r.code), &plain) {
        Ok((encrypted_data, iv)) => Json(json!({"encryptedData": encrypted_data, "iv": iv})).into_response(),
        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
