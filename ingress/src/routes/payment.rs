//! `/payment/v1/thirdPayment/thirdPaymentWxPay` (JSAPI prepay) and `…WxPayStatus` (the polling endpoint).

use std::time::Duration;

use axum::extract::State;
use bus::events::{ReportSource, WechatTransactionReported};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use storage::payments::{self, NewPayment, PaymentRow};
use storage::{AuthType, OrderSn, PayStatus, PaymentSn, TradeState, orders, users};

use crate::auth::AuthUser;
use crate::error::{ApiError, ApiJson, ApiResult, Data, conflict};
use crate::limits::{Action, Who};
use crate::metrics;
use crate::routes::order::order_sn;
use crate::{AppState, ClientIp};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ServiceType {
    #[serde(rename = "homestayOrder")]
    HomestayOrder,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrepayReq {
    order_sn: String,
    #[allow(dead_code)] // one service today; the field is checked by deserialisation
    service_type: ServiceType,
}

/// What `wx.requestPayment` takes, with looklook's field names.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PrepayResp {
    appid: String,
    nonce_str: String,
    package: String,
    pay_sign: String,
    sign_type: String,
    timestamp: String,
    /// The payment's serial, for `thirdPaymentWxPayStatus`.
    pay_sn: String,
}

/// WeChat's `time_expire` format, in Beijing time as WeChat shows it.
fn time_expire(t: DateTime<Utc>) -> String {
    let beijing = chrono::FixedOffset::east_opt(8 * 3600).expect("UTC+8 is a valid offset");
    t.with_timezone(&beijing).format("%Y-%m-%dT%H:%M:%S%:z").to_string()
}

fn truncate_chars(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// The order's open payment, reused so that `out_trade_no` stays the same across retries; created when there is
/// none. Refused when the order already has a paid payment.
async fn open_payment(
    conn: &mut storage::Conn,
    user: storage::UserId,
    order: &orders::OrderRow,
) -> Result<PaymentRow, ApiError> {
    let sn = order.sn();
    let existing = payments::list_for_order(conn, &sn).await?;
    if existing.iter().any(|p| matches!(p.status(), PayStatus::Paid | PayStatus::Refunded)) {
        return Err(ApiError::conflict(conflict::ALREADY_PAID, "this order is already paid"));
    }
    if let Some(open) = existing.into_iter().find(|p| p.status() == PayStatus::Waiting) {
        return Ok(open);
    }
    for _ in 0..3 {
        let pay_sn = PaymentSn::generate(Utc::now());
        match payments::insert(conn, &NewPayment::homestay_order(&pay_sn, user, order.total(), &sn)).await {
            Ok(p) => return Ok(p),
            // Another prepay of the same order won the race: use its payment.
            Err(e) if e.conflict() == Some("third_payment_one_open_per_order") => {
                return payments::find_open_for_order(conn, &sn).await?.ok_or_else(|| {
                    ApiError::conflict(conflict::ORDER_NOT_WAITING, "the order's payment just changed, try again")
                });
            }
            Err(e) if e.conflict() == Some("third_payment_sn_unique") => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Unavailable("could not draw a unique payment serial".into()))
}

fn prepay_error(e: wechat::PayError) -> ApiError {
    match e.code() {
        Some("ORDERPAID") => ApiError::conflict(conflict::ALREADY_PAID, "this order is already paid"),
        Some("ORDER_CLOSED") => ApiError::conflict(
            conflict::CLOSED_AT_WECHAT,
            "this payment was closed at WeChat: the order can no longer be paid",
        ),
        Some("INVALID_REQUEST") => ApiError::conflict(
            conflict::CHANGED_AT_WECHAT,
            "WeChat holds this payment with other parameters and refuses to change it",
        ),
        _ if e.is_retryable() => ApiError::Upstream {
            msg: "WeChat Pay is unavailable, try again shortly",
            detail: e.to_string(),
            retryable: true,
        },
        _ => ApiError::Upstream {
            msg: "WeChat Pay refused the payment; the merchant has been told",
            detail: e.to_string(),
            retryable: false,
        },
    }
}

pub async fn prepay(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<PrepayReq>,
) -> ApiResult<PrepayResp> {
    // Each prepay is a signed call on the merchant's WeChat quota (about 500/s for the whole merchant).
    state.limits.check(Action::Prepay, ip, Some(Who::User(user)))?;
    let sn = order_sn(&req.order_sn)?;
    let (order, payment, openid) = {
        let mut conn = state.conn().await?;
        let order = orders::find_for_user(&mut conn, user, &sn).await?.ok_or(ApiError::NotFound("order"))?;
        match order.state() {
            TradeState::WaitPay => {}
            TradeState::WaitUse | TradeState::Used => {
                return Err(ApiError::conflict(conflict::ALREADY_PAID, "this order is already paid"));
            }
            other => {
                return Err(ApiError::conflict(
                    conflict::ORDER_NOT_WAITING,
                    format!("this order is not waiting for payment (state {other:?})"),
                ));
            }
        }
        // WeChat refuses a time_expire less than a minute ahead; past the deadline the order is about to close.
        if order.pay_deadline <= Utc::now() + chrono::Duration::seconds(60) {
            return Err(ApiError::conflict(conflict::DEADLINE_PASSED, "the payment deadline of this order has passed"));
        }
        let openid = users::auth_key(&mut conn, user, AuthType::WxMini)
            .await?
            .ok_or_else(|| ApiError::invalid("log in with WeChat first: paying needs your WeChat openid"))?;
        let payment = open_payment(&mut conn, user, &order).await?;
        (order, payment, openid)
    };
    // The connection went back to the pool above: never hold one across a call to WeChat.
    let openid = wechat::OpenId::new(openid).map_err(|e| ApiError::Internal(format!("stored openid: {e}")))?;
    let pay = &state.deps.pay;
    let mut prepay_req =
        pay.new_prepay_request(truncate_chars(&order.title, 127), payment.sn.clone(), payment.pay_total, openid);
    prepay_req.time_expire = Some(time_expire(order.pay_deadline));
    let answer = match pay.prepay_jsapi(&prepay_req).await {
        Ok(a) => a,
        Err(e) => {
            // WeChat knows more than our database (a lost callback, a close): feed what it says into the pipeline,
            // so the payment and the order catch up without waiting for reconciliation.
            if matches!(e.code(), Some("ORDERPAID" | "ORDER_CLOSED")) {
                ask_wechat(&state, &payment.sn).await;
            }
            return Err(prepay_error(e));
        }
    };
    {
        let mut conn = state.conn().await?;
        // false: the payment stopped waiting meanwhile (a callback arrived); the params are still valid for WeChat,
        // which will refuse a second payment itself.
        payments::record_prepay(&mut conn, &payment.sn(), &answer.prepay_id, Utc::now()).await?;
    }
    tracing::info!(order_sn = %order.sn, pay_sn = %payment.sn, "prepay done");
    let p = pay.jsapi_pay_params(&answer.prepay_id);
    Ok(Data(PrepayResp {
        appid: p.app_id,
        nonce_str: p.nonce_str,
        package: p.package,
        pay_sign: p.pay_sign,
        sign_type: p.sign_type,
        timestamp: p.time_stamp,
        pay_sn: payment.sn,
    }))
}

/// At most one WeChat query per payment per interval, in this process (a few extra queries across replicas are
/// harmless; WeChat's rate limit is per merchant and far above this). A governor keyed limiter with a burst of one.
pub struct QueryLimiter {
    per_payment: governor::DefaultKeyedRateLimiter<String>,
}

impl QueryLimiter {
    pub fn new(interval: Duration) -> Self {
        // A zero interval is refused by the configuration; a nanosecond is the nearest meaningful value.
        let quota = governor::Quota::with_period(interval.max(Duration::from_nanos(1))).expect("a positive period");
        QueryLimiter { per_payment: governor::RateLimiter::keyed(quota) }
    }

    /// Whether a query for `key` may go now (and if so, records it).
    pub fn try_acquire(&self, key: &str) -> bool {
        if self.per_payment.len() > 10_000 {
            // Payments whose interval has passed are forgotten: memory follows the payments polled lately.
            self.per_payment.retain_recent();
        }
        self.per_payment.check_key(&key.to_owned()).is_ok()
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StatusReq {
    #[serde(default)]
    order_sn: Option<String>,
    /// A payment serial (`PMT…`) or an order serial (`HSO…`).
    #[serde(default)]
    sn: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusResp {
    /// Null before the first prepay.
    pay_sn: Option<String>,
    /// -1 closed, 0 waiting, 1 paid, 2 refunded; null before the first prepay.
    pay_status: Option<i16>,
    order_sn: String,
    /// The order's state: -1 cancelled, 0 waitPay, 1 waitUse, 2 used, 3 refunded, 4 expired.
    trade_state: i16,
    /// Unix seconds of WeChat's success_time; 0 while unpaid.
    pay_time: i64,
}

/// The payment and order as stored. While the payment still waits, past `status_grace` after its prepay, WeChat
/// is asked (at most once per `status_query_interval`) and anything but NOTPAY is published to
/// `wechat.transaction`, the same path as a callback, so the processors move the state; the answer is the stored
/// state either way.
pub async fn status(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<StatusReq>,
) -> ApiResult<StatusResp> {
    state.limits.check(Action::Status, ip, Some(Who::User(user)))?;
    let key = req.order_sn.or(req.sn).ok_or_else(|| ApiError::BadRequest("give orderSn (or sn)".into()))?;
    let mut conn = state.conn().await?;
    let (order, payment) = if key.starts_with(PaymentSn::PREFIX) {
        let pay_sn = PaymentSn::parse(&key).map_err(|_| ApiError::NotFound("payment"))?;
        let p = payments::find_by_sn(&mut conn, &pay_sn)
            .await?
            .filter(|p| p.user_id == user.0)
            .ok_or(ApiError::NotFound("payment"))?;
        let order =
            orders::find_for_user(&mut conn, user, &p.order_sn()).await?.ok_or(ApiError::NotFound("payment"))?;
        (order, Some(p))
    } else {
        let sn: OrderSn = order_sn(&key)?;
        let order = orders::find_for_user(&mut conn, user, &sn).await?.ok_or(ApiError::NotFound("order"))?;
        // The newest payment tells the story: an older one was closed or failed.
        let p = payments::list_for_order(&mut conn, &sn).await?.into_iter().next();
        (order, p)
    };
    drop(conn);
    if let Some(p) = &payment
        && p.status() == PayStatus::Waiting
        && let Some(prepaid) = p.prepay_time
        && Utc::now() - prepaid >= chrono::Duration::from_std(state.deps.config.status_grace).unwrap_or_default()
        && state.status_limiter.try_acquire(&p.sn)
    {
        ask_wechat(&state, &p.sn).await;
    }
    Ok(Data(StatusResp {
        pay_sn: payment.as_ref().map(|p| p.sn.clone()),
        pay_status: payment.as_ref().map(|p| p.pay_status),
        order_sn: order.sn,
        trade_state: order.trade_state,
        pay_time: payment.as_ref().and_then(|p| p.pay_time).map_or(0, |t| t.timestamp()),
    }))
}

/// Queries WeChat for a payment and publishes what it learned. Failures are logged and counted, never returned:
/// the caller still gets the stored state and polls again.
async fn ask_wechat(state: &AppState, pay_sn: &str) {
    let t = match state.deps.pay.query_by_out_trade_no(pay_sn).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(pay_sn, error = %e, "status query to WeChat failed");
            metrics::status_query("query_failed");
            return;
        }
    };
    if t.trade_state == wechat::TradeState::Notpay {
        metrics::status_query("notpay");
        return;
    }
    let report = report(ReportSource::Query, None, t);
    match state.deps.publisher.publish(&report.envelope()).await {
        Ok(_) => metrics::status_query("published"),
        Err(e) => {
            tracing::warn!(pay_sn, error = %e, "could not publish a status query answer");
            metrics::status_query("publish_failed");
        }
    }
}

/// A verified WeChat transaction as the event the payment processor consumes.
pub(crate) fn report(
    source: ReportSource,
    notification_id: Option<String>,
    t: wechat::Transaction,
) -> WechatTransactionReported {
    let amount = t.amount.as_ref();
    WechatTransactionReported {
        source,
        notification_id,
        appid: t.appid,
        mchid: t.mchid,
        out_trade_no: t.out_trade_no,
        transaction_id: t.transaction_id,
        trade_type: t.trade_type,
        trade_state: t.trade_state.as_str().to_owned(),
        trade_state_desc: t.trade_state_desc,
        success_time: t.success_time.as_deref().and_then(wechat::wechat_time),
        amount_total: amount.and_then(|a| a.total),
        currency: amount.and_then(|a| a.currency.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_allows_one_query_per_interval_per_payment() {
        let l = QueryLimiter::new(Duration::from_secs(60));
        assert!(l.try_acquire("PMT1"));
        assert!(!l.try_acquire("PMT1"));
        assert!(l.try_acquire("PMT2"));
    }

    #[test]
    fn time_expire_is_beijing_rfc3339() {
        let t = DateTime::parse_from_rfc3339("2026-11-26T16:30:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(time_expire(t), "2026-11-27T00:30:00+08:00");
        assert_eq!(truncate_chars(&"民".repeat(200), 127).chars().count(), 127);
    }
}
