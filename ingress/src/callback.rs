//! `POST /payment/v1/thirdPayment/thirdPaymentWxPayCallback`: WeChat tells us a payment succeeded
//! (`TRANSACTION.SUCCESS`) or a refund settled (`REFUND.SUCCESS`, `REFUND.ABNORMAL`, `REFUND.CLOSED`; refund
//! requests name this same URL).
//!
//! Verify the signature over the raw body, decrypt, publish `wechat.transaction` or `wechat.refund` with WeChat's
//! notification id as the message id, and answer 204 only after JetStream's PubAck. Anything else is answered with
//! WeChat's `{"code":"FAIL","message"}` so WeChat tries again later: 401 for what we will never accept (forged,
//! stale, probe, undecryptable; the body says only that verification failed, the reason goes to the log and the
//! metric), 503 for what we could not store (NATS down; WeChat retries for 24 hours).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest as _, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bus::events::{ReportSource, WechatRefundReported};
use bus::{Envelope, Event};
use serde_json::json;
use tracing::Instrument as _;
use wechat::{NotifyError, NotifyPayload, VerifyError};

use crate::AppState;
use crate::metrics::{self, CallbackOutcome};
use crate::routes::{payment::report, unix_now};

/// WeChat waits 5 s for an answer; a publish that has not been acknowledged by then is answered as a failure so
/// that WeChat's retry, not a timeout on its side, decides what happens next.
const PUBLISH_BUDGET: Duration = Duration::from_secs(4);

fn fail(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "code": "FAIL", "message": message }))).into_response()
}

fn outcome_of(e: &NotifyError) -> CallbackOutcome {
    match e {
        NotifyError::Verify(VerifyError::Probe) => CallbackOutcome::Probe,
        NotifyError::Verify(VerifyError::Stale { .. }) => CallbackOutcome::Stale,
        NotifyError::Verify(VerifyError::BadSignature | VerifyError::UnknownSerial(_)) => CallbackOutcome::BadSignature,
        NotifyError::Verify(VerifyError::Malformed(_)) | NotifyError::Decode(_) => CallbackOutcome::Malformed,
        NotifyError::Crypto(_) => CallbackOutcome::Undecryptable,
    }
}

pub async fn handle(State(state): State<AppState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match Bytes::from_request(Request::from_parts(parts.clone(), body), &()).await {
        Ok(b) => b,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            metrics::callback(CallbackOutcome::Malformed);
            return fail(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
        }
        Err(_) => {
            metrics::callback(CallbackOutcome::Malformed);
            return fail(StatusCode::BAD_REQUEST, "body could not be read");
        }
    };
    let headers = &parts.headers;
    let mut read = state.reader.read(headers, &body, unix_now());
    // Certificate mode: WeChat rotated its platform certificate. Fetch the list once and check again (public-key
    // ids are configured, never downloaded).
    if let Err(NotifyError::Verify(VerifyError::UnknownSerial(serial))) = &read
        && state.deps.wechat.platform_certificates
        && is_certificate_serial(serial)
        && state.cert_refresh.try_refresh()
    {
        match state.deps.pay.download_certificates().await {
            Ok(_) => read = state.reader.read(headers, &body, unix_now()),
            Err(e) => tracing::warn!(error = %e, "certificate download for an unknown callback serial failed"),
        }
    }
    let verified = match read {
        Ok(v) => v,
        Err(e) => {
            let outcome = outcome_of(&e);
            metrics::callback(outcome);
            tracing::warn!(outcome = outcome.as_str(), error = %e, "callback refused");
            // The caller may be anyone: the body does not say which check failed.
            return fail(StatusCode::UNAUTHORIZED, "callback refused: verification failed");
        }
    };
    let notification_id = verified.notification.id.clone();
    // The id becomes the event id (JetStream drops repeats by it): an empty or made-up one would make every later
    // notification with the same id a "duplicate". WeChat's are UUID-like; refuse what cannot be one.
    if !(8..=64).contains(&notification_id.len())
        || !notification_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        metrics::callback(CallbackOutcome::Malformed);
        tracing::warn!(outcome = "malformed", "callback refused: notification id missing or malformed");
        return fail(StatusCode::BAD_REQUEST, "callback refused: malformed notification");
    }
    match verified.payload {
        NotifyPayload::Transaction(t) => {
            let report = report(ReportSource::Callback, Some(notification_id.clone()), t);
            let out_trade_no = report.out_trade_no.clone();
            let span = tracing::info_span!("callback", kind = "transaction", payment_sn = %out_trade_no);
            // Created in the span: the event carries its trace context to the processors.
            let env = span.in_scope(|| report.envelope());
            publish(&state, env, &notification_id, &out_trade_no).instrument(span).await
        }
        NotifyPayload::Refund(r) => {
            let report = WechatRefundReported {
                source: ReportSource::Callback,
                notification_id: Some(notification_id.clone()),
                mchid: Some(r.mchid),
                out_trade_no: r.out_trade_no,
                out_refund_no: r.out_refund_no,
                refund_id: r.refund_id,
                status: r.refund_status.as_str().to_owned(),
                success_time: r.success_time.as_deref().and_then(wechat::wechat_time),
                amount_refund: r.amount.refund,
                amount_total: r.amount.total,
            };
            let out_trade_no = report.out_trade_no.clone();
            let span = tracing::info_span!("callback", kind = "refund", payment_sn = %out_trade_no);
            let env = span.in_scope(|| report.envelope());
            publish(&state, env, &notification_id, &out_trade_no).instrument(span).await
        }
    }
}

/// Platform certificate serials are 40 hex digits (up to 40: leading zeros may be dropped). Anything else cannot
/// be one of WeChat's certificates, so it never triggers a download.
fn is_certificate_serial(serial: &str) -> bool {
    (8..=40).contains(&serial.len()) && serial.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Publishes a verified notification and answers WeChat: 204 after the PubAck, 503 otherwise.
async fn publish<E: Event>(state: &AppState, env: Envelope<E>, notification_id: &str, out_trade_no: &str) -> Response {
    match tokio::time::timeout(PUBLISH_BUDGET, state.deps.publisher.publish(&env)).await {
        Ok(Ok(ack)) => {
            metrics::callback(CallbackOutcome::Published);
            tracing::info!(
                notification_id,
                out_trade_no,
                kind = E::TYPE,
                duplicate = ack.duplicate,
                "callback published"
            );
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(Err(e)) => {
            metrics::callback(CallbackOutcome::PublishFailed);
            tracing::error!(notification_id, out_trade_no, error = %e, "callback not stored: NATS unavailable");
            fail(StatusCode::SERVICE_UNAVAILABLE, "temporarily unable to store the notification, retry later")
        }
        Err(_) => {
            metrics::callback(CallbackOutcome::PublishFailed);
            tracing::error!(notification_id, out_trade_no, "callback not stored: no PubAck in time");
            fail(StatusCode::SERVICE_UNAVAILABLE, "temporarily unable to store the notification, retry later")
        }
    }
}

/// Certificate downloads triggered by callbacks with an unknown serial: one at a time, at most one a minute, so
/// forged callbacks cannot make us hammer WeChat (each download is a signed API call on the merchant's quota).
pub(crate) struct CertRefresh<C: governor::clock::Clock = governor::clock::DefaultClock> {
    once_a_minute: governor::RateLimiter<
        governor::state::NotKeyed,
        governor::state::InMemoryState,
        C,
        governor::middleware::NoOpMiddleware<C::Instant>,
    >,
}

impl CertRefresh {
    pub(crate) fn new() -> Self {
        Self::with_clock(governor::clock::DefaultClock::default())
    }
}

impl<C: governor::clock::Clock> CertRefresh<C> {
    fn with_clock(clock: C) -> Self {
        let quota = governor::Quota::per_minute(std::num::NonZeroU32::MIN);
        CertRefresh { once_a_minute: governor::RateLimiter::direct_with_clock(quota, clock) }
    }

    /// Whether this caller may download now (it then holds the minute); callers in the same minute are refused.
    fn try_refresh(&self) -> bool {
        self.once_a_minute.check().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hex_serials_can_name_a_certificate() {
        assert!(is_certificate_serial("5157F09EFDC096DE15EBE81A47057A7232F1B8E1"));
        assert!(is_certificate_serial("45f59d4dabf31918afcec556d5d2c6e376675d57"));
        assert!(!is_certificate_serial("PUB_KEY_ID_0114232134912410000000000000"));
        assert!(!is_certificate_serial("../../etc/passwd"));
        assert!(!is_certificate_serial(&"A".repeat(41)));
        assert!(!is_certificate_serial(""));
    }

    #[test]
    fn certificate_downloads_are_at_most_one_a_minute() {
        let clock = governor::clock::FakeRelativeClock::default();
        let r = CertRefresh::with_clock(clock.clone());
        assert!(r.try_refresh());
        assert!(!r.try_refresh());
        clock.advance(Duration::from_secs(59));
        assert!(!r.try_refresh());
        clock.advance(Duration::from_secs(2));
        assert!(r.try_refresh());
    }
}
