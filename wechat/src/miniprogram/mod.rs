//! The mini-program server API: login (`jscode2session`), the stable access token, and
//! subscribe messages.

pub mod subscribe;
pub mod user_info;

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::{ConfigError, WechatConfig};
use crate::openid::OpenId;
use subscribe::{DataRuleError, SubscribeMessage};

/// The mini-program API's errcodes that paystream reacts to; the rest are `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Errcode {
    /// -1: system busy.
    SystemBusy,
    /// 40001: the access token is invalid.
    InvalidToken,
    /// 42001: the access token expired.
    TokenExpired,
    /// 40003: openid is not a user of this app.
    InvalidOpenId,
    /// 40037: template id is wrong.
    InvalidTemplate,
    /// 43101: the user refused or has used up their subscription.
    UserRefused,
    /// 47003: a data value breaks its rule.
    InvalidData,
    /// 41030: page does not exist in the released version.
    InvalidPage,
    /// 45009: daily quota reached.
    QuotaExceeded,
    /// 45011: calling too often.
    RateLimited,
    /// 40029: the login code is invalid or used.
    InvalidCode,
    /// 40226: the user is blocked (high-risk).
    Blocked,
    Other(i64),
}

/// What a caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Try again later (busy, quota, network).
    Retryable,
    /// Will fail again: record and move on.
    Permanent,
    /// The access token is bad: refresh it and retry once.
    Token,
}

impl Errcode {
    pub fn from_code(code: i64) -> Self {
        match code {
            -1 => Self::SystemBusy,
            40001 => Self::InvalidToken,
            42001 => Self::TokenExpired,
            40003 => Self::InvalidOpenId,
            40037 => Self::InvalidTemplate,
            43101 => Self::UserRefused,
            47003 => Self::InvalidData,
            41030 => Self::InvalidPage,
            45009 => Self::QuotaExceeded,
            45011 => Self::RateLimited,
            40029 => Self::InvalidCode,
            40226 => Self::Blocked,
            other => Self::Other(other),
        }
    }

    pub fn code(self) -> i64 {
        match self {
            Self::SystemBusy => -1,
            Self::InvalidToken => 40001,
            Self::TokenExpired => 42001,
            Self::InvalidOpenId => 40003,
            Self::InvalidTemplate => 40037,
            Self::UserRefused => 43101,
            Self::InvalidData => 47003,
            Self::InvalidPage => 41030,
            Self::QuotaExceeded => 45009,
            Self::RateLimited => 45011,
            Self::InvalidCode => 40029,
            Self::Blocked => 40226,
            Self::Other(c) => c,
        }
    }

    pub fn class(self) -> ErrorClass {
        match self {
            Self::SystemBusy | Self::QuotaExceeded | Self::RateLimited => ErrorClass::Retryable,
            Self::InvalidToken | Self::TokenExpired => ErrorClass::Token,
            _ => ErrorClass::Permanent,
        }
    }
}

/// What went wrong with a mini-program API call.
#[derive(Debug, thiserror::Error)]
pub enum MiniError {
    #[error("mini-program API errcode {}: {errmsg}", code.code())]
    Api { code: Errcode, errmsg: String },
    #[error("network: {0}")]
    Network(String),
    #[error("request timed out")]
    Timeout,
    #[error("answer could not be decoded: {0}")]
    Decode(String),
    /// The message broke a value rule; nothing was sent.
    #[error("invalid message: {0}")]
    Invalid(#[from] DataRuleError),
}

impl MiniError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Api { code, .. } => code.class(),
            Self::Network(_) | Self::Timeout => ErrorClass::Retryable,
            Self::Decode(_) | Self::Invalid(_) => ErrorClass::Permanent,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.class() == ErrorClass::Retryable
    }

    /// The errcode, when WeChat answered with one.
    pub fn errcode(&self) -> Option<Errcode> {
        match self {
            Self::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn map_reqwest(e: reqwest::Error) -> MiniError {
    if e.is_timeout() {
        MiniError::Timeout
    } else {
        // The URL carries the AppSecret or the access token: never let it into a message.
        MiniError::Network(e.without_url().to_string())
    }
}

/// A login session from `jscode2session`.
#[derive(Clone)]
pub struct Session {
    pub openid: OpenId,
    pub session_key: SecretString,
    pub unionid: Option<String>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The unionid identifies a person across apps: only say whether there is one.
        f.debug_struct("Session")
            .field("openid", &self.openid)
            .field("unionid", &self.unionid.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

/// Settings of a [`MiniProgramClient`].
#[derive(Debug, Clone)]
pub struct MiniSettings {
    pub appid: String,
    pub secret: SecretString,
    pub base_url: String,
    pub timeout: Duration,
}

/// Refresh this long before WeChat's expiry, so no request carries a token about to lapse.
pub const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// How long a token with WeChat's `expires_in` is used before refreshing: up to
/// `TOKEN_REFRESH_MARGIN` before expiry, but at least half its life (a sandbox with scaled
/// time hands out short-lived tokens).
pub fn usable_lifetime(lifetime: Duration) -> Duration {
    lifetime.checked_sub(TOKEN_REFRESH_MARGIN).filter(|d| *d >= lifetime / 2).unwrap_or(lifetime / 2)
}

struct CachedToken {
    token: SecretString,
    refresh_at: Instant,
}

#[derive(Default)]
struct TokenState {
    current: Option<CachedToken>,
    /// Set by an invalidation: the next fetch asks for a new token, not the cached one.
    force_refresh: bool,
}

struct Inner {
    http: reqwest::Client,
    settings: MiniSettings,
    base: String,
    // One lock for the whole cache: whoever finds it stale refreshes while holding it, so
    // concurrent tasks wait for that one refresh instead of each asking WeChat.
    token: Mutex<TokenState>,
}

/// The mini-program API client. Cheap to clone; clones share one access-token cache.
#[derive(Clone)]
pub struct MiniProgramClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MiniProgramClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniProgramClient")
            .field("appid", &self.inner.settings.appid)
            .field("base_url", &self.inner.base)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ErrFields {
    #[serde(default)]
    errcode: i64,
    #[serde(default)]
    errmsg: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(flatten)]
    err: ErrFields,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct SessionAnswer {
    #[serde(flatten)]
    err: ErrFields,
    openid: Option<String>,
    session_key: Option<String>,
    unionid: Option<String>,
}

#[derive(Deserialize)]
struct SendAnswer {
    #[serde(flatten)]
    err: ErrFields,
    msgid: Option<i64>,
}

fn check_err(e: ErrFields) -> Result<(), MiniError> {
    if e.errcode == 0 { Ok(()) } else { Err(MiniError::Api { code: Errcode::from_code(e.errcode), errmsg: e.errmsg }) }
}

impl MiniProgramClient {
    pub fn new(settings: MiniSettings) -> Result<Self, MiniError> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .user_agent(concat!("paystream-wechat/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(map_reqwest)?;
        let base = settings.base_url.trim_end_matches('/').to_owned();
        Ok(Self { inner: Arc::new(Inner { http, settings, base, token: Mutex::new(TokenState::default()) }) })
    }

    pub fn from_config(cfg: &WechatConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Self::new(MiniSettings {
            appid: cfg.appid.clone(),
            secret: cfg.miniprogram_secret()?.clone(),
            base_url: cfg.miniprogram_base_url.clone(),
            timeout: Duration::from_millis(cfg.request_timeout_ms),
        })
        .map_err(|e| ConfigError::new("wechat", e.to_string()))
    }

    async fn read<T: serde::de::DeserializeOwned>(resp: reqwest::Response) -> Result<T, MiniError> {
        let status = resp.status();
        let body = resp.bytes().await.map_err(map_reqwest)?;
        if !status.is_success() {
            return Err(MiniError::Network(format!("HTTP {status}")));
        }
        serde_json::from_slice(&body).map_err(|e| MiniError::Decode(e.to_string()))
    }

    /// Base URL + path + percent-encoded query (reqwest's `query` needs a feature we do not build).
    fn url(&self, path: &str, query: &[(&str, &str)]) -> Result<reqwest::Url, MiniError> {
        reqwest::Url::parse_with_params(&format!("{}{path}", self.inner.base), query)
            .map_err(|_| MiniError::Decode("bad miniprogram base URL".into()))
    }

    /// `GET /sns/jscode2session`: exchanges a `wx.login` code for the user's openid.
    /// The mini-program's appid (what the watermark of its users' encrypted data must name).
    pub fn appid(&self) -> &str {
        &self.inner.settings.appid
    }

    pub async fn jscode2session(&self, code: &str) -> Result<Session, MiniError> {
        if code.is_empty() || code.len() > 128 {
            let rule = "must be 1 to 128 characters";
            let key = "js_code".to_owned();
            return Err(DataRuleError { key, rule }.into());
        }
        crate::metrics::metered("jscode2session", async {
            let s = &self.inner.settings;
            let resp = self
                .inner
                .http
                .get(self.url(
                    "/sns/jscode2session",
                    &[
                        ("appid", s.appid.as_str()),
                        ("secret", s.secret.expose_secret()),
                        ("js_code", code),
                        ("grant_type", "authorization_code"),
                    ],
                )?)
                .send()
                .await
                .map_err(map_reqwest)?;
            let a: SessionAnswer = Self::read(resp).await?;
            check_err(a.err)?;
            let openid = a
                .openid
                .ok_or_else(|| MiniError::Decode("no openid".into()))
                .and_then(|o| OpenId::new(o).map_err(|e| MiniError::Decode(e.to_string())))?;
            let session_key = a.session_key.ok_or_else(|| MiniError::Decode("no session_key".into()))?;
            Ok(Session { openid, session_key: SecretString::from(session_key), unionid: a.unionid })
        })
        .await
    }

    /// The shared access token, from `POST /cgi-bin/stable_token`. Fetched at most once at a
    /// time, and again `TOKEN_REFRESH_MARGIN` before it expires or after an invalidation.
    pub async fn access_token(&self) -> Result<SecretString, MiniError> {
        let mut state = self.inner.token.lock().await;
        if let Some(t) = &state.current
            && Instant::now() < t.refresh_at
        {
            return Ok(t.token.clone());
        }
        let force = state.force_refresh;
        let fetched: Result<_, MiniError> = crate::metrics::metered("stable_token", async {
            let s = &self.inner.settings;
            let resp = self
                .inner
                .http
                .post(format!("{}/cgi-bin/stable_token", self.inner.base))
                .json(&serde_json::json!({
                    "grant_type": "client_credential",
                    "appid": s.appid,
                    "secret": s.secret.expose_secret(),
                    "force_refresh": force,
                }))
                .send()
                .await
                .map_err(map_reqwest)?;
            let a: TokenAnswer = Self::read(resp).await?;
            check_err(a.err)?;
            let token =
                a.access_token.filter(|t| !t.is_empty()).ok_or_else(|| MiniError::Decode("no access_token".into()))?;
            Ok((token, a.expires_in))
        })
        .await;
        let (token, expires_in) = fetched?;
        crate::metrics::token_refreshed(force);
        let lifetime = Duration::from_secs(expires_in.unwrap_or(7200));
        let usable = usable_lifetime(lifetime);
        let token = SecretString::from(token);
        state.current = Some(CachedToken { token: token.clone(), refresh_at: Instant::now() + usable });
        state.force_refresh = false;
        tracing::debug!(force, lifetime_secs = lifetime.as_secs(), "mini-program access token refreshed");
        Ok(token)
    }

    /// Drops the cached token so the next call fetches a new one (after 40001/42001).
    pub async fn invalidate(&self) {
        let mut state = self.inner.token.lock().await;
        state.current = None;
        state.force_refresh = true;
    }

    /// Drops the cached token only if it is still `stale`: a task that saw 40001 late must
    /// not throw away the fresh token another task already fetched.
    async fn invalidate_if(&self, stale: &SecretString) {
        let mut state = self.inner.token.lock().await;
        if state.current.as_ref().is_some_and(|t| t.token.expose_secret() == stale.expose_secret()) {
            state.current = None;
            state.force_refresh = true;
        }
    }

    /// `POST /cgi-bin/message/subscribe/send`; checks the value rules first, and on a token
    /// error refreshes the token and tries once more. Returns WeChat's `msgid`.
    pub async fn send_subscribe_message(&self, msg: &SubscribeMessage) -> Result<Option<i64>, MiniError> {
        msg.validate()?;
        let mut retried = false;
        loop {
            let token = self.access_token().await?;
            let answer: Result<_, MiniError> = crate::metrics::metered("subscribe_send", async {
                let resp = self
                    .inner
                    .http
                    .post(self.url("/cgi-bin/message/subscribe/send", &[("access_token", token.expose_secret())])?)
                    .json(msg)
                    .send()
                    .await
                    .map_err(map_reqwest)?;
                let a: SendAnswer = Self::read(resp).await?;
                check_err(a.err)?;
                Ok(a.msgid)
            })
            .await;
            match answer {
                Ok(msgid) => return Ok(msgid),
                Err(e) if e.class() == ErrorClass::Token && !retried => {
                    self.invalidate_if(&token).await;
                    retried = true;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl crate::metrics::Retryable for MiniError {
    fn retryable(&self) -> bool {
        // A token error is fixed by the refresh that follows it, as a retry would.
        matches!(self.class(), ErrorClass::Retryable | ErrorClass::Token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_refreshed_five_minutes_early_or_at_half_life() {
        assert_eq!(usable_lifetime(Duration::from_secs(7200)), Duration::from_secs(6900));
        assert_eq!(usable_lifetime(Duration::from_secs(600)), Duration::from_secs(300));
        assert_eq!(usable_lifetime(Duration::from_secs(60)), Duration::from_secs(30));
        assert_eq!(usable_lifetime(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn errcodes_round_trip_and_classify() {
        for code in [-1, 40001, 42001, 40003, 40037, 43101, 47003, 41030, 45009, 45011, 40029, 40226, 12345] {
            assert_eq!(Errcode::from_code(code).code(), code);
        }
        assert_eq!(Errcode::from_code(42001).class(), ErrorClass::Token);
        assert_eq!(Errcode::from_code(45009).class(), ErrorClass::Retryable);
        assert_eq!(Errcode::from_code(47003).class(), ErrorClass::Permanent);
    }
}
