//! `POST /payment/v1/thirdPayment/thirdPaymentWxPayCallback`: WeChat tells us a payment succeeded.
//!
//! Verify the signature over the raw body, decrypt, publish `wechat.transaction` with WeChat's notification id as
//! the message id, and answer 204 only after JetStream's PubAck. Anything else is answered with WeChat's
//! `{"code":"FAIL","message"}` so WeChat tries again later: 401 for what we will never accept (forged, stale,
//! probe, undecryptable), 503 for what we could not store (NATS down) or cannot store yet (refund notices, until
//! `bus` has an event for them; WeChat retries for 24 hours).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest as _, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bus::events::ReportSource;
use serde_json::json;
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
        && !serial.starts_with("PUB_KEY_ID_")
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
            return fail(StatusCode::UNAUTHORIZED, &format!("callback refused: {e}"));
        }
    };
    let notification_id = verified.notification.id.clone();
    let t = match verified.payload {
        NotifyPayload::Transaction(t) => t,
        NotifyPayload::Refund(r) => {
            metrics::callback(CallbackOutcome::RefundDeferred);
            tracing::warn!(
                notification_id,
                out_refund_no = %r.out_refund_no,
                "refund callback not accepted yet: WeChat will retry it"
            );
            return fail(StatusCode::SERVICE_UNAVAILABLE, "refund notifications are not accepted yet, retry later");
        }
    };
    let report = report(ReportSource::Callback, Some(notification_id.clone()), t);
    let out_trade_no = report.out_trade_no.clone();
    match tokio::time::timeout(PUBLISH_BUDGET, state.deps.publisher.publish(&report.envelope())).await {
        Ok(Ok(ack)) => {
            metrics::callback(CallbackOutcome::Published);
            tracing::info!(notification_id, out_trade_no, duplicate = ack.duplicate, "callback published");
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
