//! One error type for every endpoint, one mapping to HTTP, the response envelope, and the JSON extractor whose
//! rejections are JSON too.
//!
//! Success: `{"code":200,"msg":"OK","data":…}`. Failure: `{"code":<stable number>,"msg":<what to do>}` with the
//! HTTP status of its class. Internals (database, NATS, WeChat details) are logged, never sent.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, rejection::BytesRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

/// Why a request failed. Each variant has a stable numeric code (see [`ApiError::code`]).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not the JSON this endpoint takes (syntax, missing field, wrong type, unknown enum value).
    #[error("{0}")]
    BadRequest(String),
    /// The request is well-formed but breaks a rule (dates, capacity, …).
    #[error("{0}")]
    Invalid(String),
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Unauthorized(AuthProblem),
    #[error("{0}")]
    Forbidden(String),
    /// Also answered for things that exist but belong to someone else, so their existence is not revealed.
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{msg}")]
    Conflict { code: u32, msg: String },
    /// A rate limit (see `crate::limits`); `retry_after` seconds until the next request would pass.
    #[error("too many requests, try again in {retry_after} s")]
    RateLimited { retry_after: u64 },
    /// Too many requests of this kind are already waiting (password hashing): try again in a second.
    #[error("too busy right now, try again in a moment")]
    Busy,
    /// WeChat failed or refused; `retryable` says whether the same call may work later. `msg` is ours and is
    /// answered; `detail` is WeChat's own code and text, which is logged and never sent (it can name the merchant,
    /// the app id and our configuration).
    #[error("{msg}")]
    Upstream { msg: &'static str, detail: String, retryable: bool },
    /// Postgres or NATS is unreachable: retry later.
    #[error("service temporarily unavailable, try again shortly")]
    Unavailable(String),
    #[error("request took too long, try again")]
    Timeout,
    #[error("internal error")]
    Internal(String),
}

/// What is wrong with a request's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthProblem {
    #[error("log in first: send Authorization: Bearer <accessToken>")]
    Missing,
    #[error("access token expired: log in again")]
    Expired,
    #[error("access token is invalid: log in again")]
    Invalid,
    #[error("mobile or password is wrong")]
    WrongCredentials,
    #[error("WeChat login code is invalid or already used: call wx.login again")]
    BadLoginCode,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ApiError::Unavailable(_) | ApiError::Timeout | ApiError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code in the body: the HTTP status times 100 plus a number within the class.
    pub fn code(&self) -> u32 {
        match self {
            ApiError::BadRequest(_) => 40000,
            ApiError::Invalid(_) => 42200,
            ApiError::TooLarge(_) => 41300,
            ApiError::Unauthorized(p) => match p {
                AuthProblem::Missing => 40100,
                AuthProblem::Expired => 40101,
                AuthProblem::Invalid => 40102,
                AuthProblem::WrongCredentials => 40103,
                AuthProblem::BadLoginCode => 40104,
            },
            ApiError::Forbidden(_) => 40300,
            ApiError::NotFound(_) => 40400,
            ApiError::Conflict { code, .. } => *code,
            ApiError::RateLimited { .. } => 42900,
            ApiError::Upstream { retryable: true, .. } => 50200,
            ApiError::Upstream { retryable: false, .. } => 50201,
            ApiError::Unavailable(_) => 50300,
            ApiError::Timeout => 50301,
            ApiError::Busy => 50302,
            ApiError::Internal(_) => 50000,
        }
    }

    /// Seconds a client should wait before trying again, sent as `Retry-After`.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after } => Some((*retry_after).max(1)),
            ApiError::Busy => Some(1),
            _ => None,
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        ApiError::Invalid(msg.into())
    }

    pub fn conflict(code: u32, msg: impl Into<String>) -> Self {
        ApiError::Conflict { code, msg: msg.into() }
    }
}

/// Conflict codes, named once.
pub mod conflict {
    pub const MOBILE_TAKEN: u32 = 40900;
    pub const ORDER_NOT_WAITING: u32 = 40901;
    pub const ALREADY_PAID: u32 = 40902;
    pub const CLOSED_AT_WECHAT: u32 = 40903;
    pub const DEADLINE_PASSED: u32 = 40904;
    pub const CHANGED_AT_WECHAT: u32 = 40905;
    pub const NOT_REFUNDABLE: u32 = 40906;
    pub const STAY_STARTED: u32 = 40907;
    pub const TOO_MANY_UNPAID: u32 = 40908;
}

impl From<storage::StorageError> for ApiError {
    fn from(e: storage::StorageError) -> Self {
        if e.is_transient() { ApiError::Unavailable(e.to_string()) } else { ApiError::Internal(e.to_string()) }
    }
}

impl From<storage::DomainError> for ApiError {
    fn from(e: storage::DomainError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<diesel::result::Error> for ApiError {
    fn from(e: diesel::result::Error) -> Self {
        storage::StorageError::from(e).into()
    }
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for ApiError {
    fn from(e: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Internal(detail) => tracing::error!(code = self.code(), error = %detail, "request failed"),
            ApiError::Unavailable(detail) => {
                tracing::warn!(code = self.code(), error = %detail, "dependency unavailable")
            }
            ApiError::Upstream { detail, .. } => {
                tracing::warn!(code = self.code(), error = %detail, "WeChat call failed")
            }
            _ => tracing::debug!(code = self.code(), msg = %self, "request refused"),
        }
        let mut resp = error_body(status, self.code(), &self.to_string());
        if let Some(secs) = self.retry_after() {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// `{"code","msg"}` with the given status.
pub fn error_body(status: StatusCode, code: u32, msg: &str) -> Response {
    (status, axum::Json(json!({ "code": code, "msg": msg }))).into_response()
}

/// A successful answer in the envelope.
pub struct Data<T>(pub T);

impl<T: Serialize> IntoResponse for Data<T> {
    fn into_response(self) -> Response {
        axum::Json(json!({ "code": 200, "msg": "OK", "data": self.0 })).into_response()
    }
}

pub type ApiResult<T> = Result<Data<T>, ApiError>;

/// A JSON body whose every rejection is an [`ApiError`]. The content type is not required (some mini-program
/// HTTP clients omit it) and an empty body reads as `{}`, so endpoints whose fields are all optional take none.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req.extensions().get::<BodyLimit>().map_or(0, |l| l.0);
        let bytes = Bytes::from_request(req, state).await.map_err(|r| bytes_rejection(r, limit))?;
        let bytes = if bytes.iter().all(u8::is_ascii_whitespace) { Bytes::from_static(b"{}") } else { bytes };
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let value = T::deserialize(&mut de).map_err(|e| {
            let what = match e.classify() {
                serde_json::error::Category::Data => "invalid request body",
                _ => "request body is not valid JSON",
            };
            ApiError::BadRequest(format!("{what}: {e}"))
        })?;
        de.end().map_err(|e| ApiError::BadRequest(format!("request body is not valid JSON: {e}")))?;
        Ok(ApiJson(value))
    }
}

/// The body could not be read: too large, or the client went away.
pub fn bytes_rejection(r: BytesRejection, limit: usize) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(limit)
    } else {
        ApiError::BadRequest(format!("request body could not be read: {}", r.body_text()))
    }
}

/// Last layer before the client: any error answer that is not JSON (axum's 405, the body-limit layer's 413, the
/// timeout layer's 503) gets the envelope's error body, so clients only ever parse one shape. The WeChat callback
/// gets WeChat's `{"code":"FAIL","message"}` instead.
pub async fn json_errors(req: Request, next: axum::middleware::Next) -> Response {
    let is_callback = req.uri().path() == crate::CALLBACK_PATH;
    let limit = req.extensions().get::<BodyLimit>().map(|l| l.0);
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let msg = match status {
        StatusCode::PAYLOAD_TOO_LARGE => match limit {
            Some(l) => format!("request body is larger than {l} bytes"),
            None => "request body is too large".to_owned(),
        },
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed: this API takes POST with a JSON body".to_owned(),
        StatusCode::NOT_FOUND => "no such endpoint".to_owned(),
        StatusCode::SERVICE_UNAVAILABLE => ApiError::Timeout.to_string(),
        s => s.canonical_reason().unwrap_or("request failed").to_owned(),
    };
    let mut out = if is_callback {
        (status, axum::Json(json!({ "code": "FAIL", "message": msg }))).into_response()
    } else {
        let code = match status {
            StatusCode::SERVICE_UNAVAILABLE => ApiError::Timeout.code(),
            s => u32::from(s.as_u16()) * 100,
        };
        error_body(status, code, &msg)
    };
    // Keep headers such as Allow and the request id.
    for (name, value) in resp.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    out
}

/// The configured body limit, put in request extensions so error messages can quote it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);
