//! `PayClient`: the typed WeChat Pay v3 client. Every request is signed, every answer verified.

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretBox};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{ConfigError, WechatConfig};
use crate::openid::OpenId;
use crate::pay::aead::CryptoError;
use crate::pay::keys::{RsaSigner, RsaVerifierKey};
use crate::pay::notify::NotificationReader;
use crate::pay::rules::{self, FieldError};
use crate::pay::sign::{AuthorizationHeader, nonce_str};
use crate::pay::types::{
    CertificateList, CloseRequest, ErrorDetail, JsapiPayParams, Payer, PrepayAmount, PrepayRequest, PrepayResponse,
    Refund, RefundRequest, Transaction, WechatErrorBody, pay_sign_message,
};
use crate::pay::verify::{SignatureHeaders, Verifier, VerifyError};

/// What went wrong with a Pay v3 call.
#[derive(Debug, thiserror::Error)]
pub enum PayError {
    /// WeChat answered with an error body.
    #[error("WeChat Pay {http_status} {code}: {message}")]
    Api { http_status: u16, code: String, message: String, detail: Option<Box<ErrorDetail>> },
    #[error("network: {0}")]
    Network(String),
    #[error("request timed out")]
    Timeout,
    /// The answer did not carry a valid WeChat signature.
    #[error("answer not verified: {0}")]
    Verify(#[from] VerifyError),
    #[error("answer could not be decoded: {0}")]
    Decode(String),
    #[error("payload could not be decrypted: {0}")]
    Crypto(#[from] CryptoError),
    /// A field broke WeChat's rules; nothing was sent.
    #[error("invalid request: {0}")]
    Invalid(#[from] FieldError),
}

impl PayError {
    /// Whether the same call may succeed later: 429, 5xx, SYSTEM_ERROR-like codes, NOT_ENOUGH (the merchant
    /// account lacks the funds for a refund until it is topped up), network
    /// failures and timeouts, and an answer signed with a key we do not hold yet (a
    /// certificate download fixes it). Parameter, signature and order-state errors are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Api { http_status, code, .. } => {
                *http_status == 429
                    || *http_status >= 500
                    || matches!(
                        code.as_str(),
                        "SYSTEM_ERROR" | "FREQUENCY_LIMITED" | "BANK_ERROR" | "SYSTEMERROR" | "NOT_ENOUGH"
                    )
            }
            Self::Network(_) | Self::Timeout => true,
            Self::Verify(VerifyError::UnknownSerial(_)) => true,
            Self::Verify(_) | Self::Decode(_) | Self::Crypto(_) | Self::Invalid(_) => false,
        }
    }

    /// WeChat's error code, when WeChat answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Everything a [`PayClient`] needs besides its keys; built from [`WechatConfig`] by
/// [`PayClient::from_config`], or by hand in tests.
#[derive(Debug, Clone)]
pub struct PaySettings {
    pub mchid: String,
    pub appid: String,
    pub merchant_serial_no: String,
    pub notify_url: String,
    pub base_url: String,
    pub timeout: Duration,
    pub allow_insecure_loopback: bool,
    /// Hosts a notify_url may name over plain http (`wechat.insecure_http_hosts`).
    pub insecure_http_hosts: Vec<String>,
    /// Sent as `Wechatpay-Serial` so WeChat signs its answers with the public key (public-key mode).
    pub platform_public_key_id: Option<String>,
}

struct Inner {
    http: reqwest::Client,
    settings: PaySettings,
    base: String,
    signer: RsaSigner,
    verifier: Verifier,
    apiv3_key: Arc<SecretBox<[u8; 32]>>,
}

/// The WeChat Pay v3 client. Cheap to clone (shared connection pool and keys).
#[derive(Clone)]
pub struct PayClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayClient")
            .field("mchid", &self.inner.settings.mchid)
            .field("base_url", &self.inner.base)
            .field("verifier", &self.inner.verifier)
            .finish_non_exhaustive()
    }
}

const USER_AGENT: &str = concat!("paystream-wechat/", env!("CARGO_PKG_VERSION"));

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

impl PayClient {
    /// Builds a client from explicit parts; `verifier` should already hold WeChat's public key
    /// (public-key mode) or be filled by [`PayClient::download_certificates`].
    pub fn new(
        settings: PaySettings,
        signer: RsaSigner,
        verifier: Verifier,
        apiv3_key: [u8; 32],
    ) -> Result<Self, PayError> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| PayError::Network(e.to_string()))?;
        let base = settings.base_url.trim_end_matches('/').to_owned();
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base,
                settings,
                signer,
                verifier,
                apiv3_key: Arc::new(SecretBox::new(Box::new(apiv3_key))),
            }),
        })
    }

    /// Validates the config, reads the key files and builds the client. In certificate mode,
    /// call [`PayClient::download_certificates`] before the first request.
    pub fn from_config(cfg: &WechatConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let key_err = |key: &str, e: crate::KeyError| ConfigError::new(key, e.to_string());
        let signer = RsaSigner::from_pem_file(&cfg.merchant_private_key_path)
            .map_err(|e| key_err("wechat.merchant_private_key_path", e))?;
        let verifier = Verifier::new();
        if let (Some(id), Some(path)) = (&cfg.platform_public_key_id, &cfg.platform_public_key_path) {
            let key = RsaVerifierKey::from_pem_file(path).map_err(|e| key_err("wechat.platform_public_key_path", e))?;
            verifier.add_key(id.clone(), key);
        }
        for extra in &cfg.additional_platform_public_keys {
            let key = RsaVerifierKey::from_pem_file(&extra.path)
                .map_err(|e| key_err("wechat.additional_platform_public_keys", e))?;
            verifier.add_key(extra.id.clone(), key);
        }
        let settings = PaySettings {
            mchid: cfg.mchid.clone(),
            appid: cfg.appid.clone(),
            merchant_serial_no: cfg.merchant_serial_no.clone(),
            notify_url: cfg.notify_url.clone(),
            base_url: cfg.pay_base_url.clone(),
            timeout: Duration::from_millis(cfg.request_timeout_ms),
            allow_insecure_loopback: cfg.allow_insecure_loopback,
            insecure_http_hosts: cfg.insecure_http_hosts.clone(),
            platform_public_key_id: cfg.platform_public_key_id.clone(),
        };
        Self::new(settings, signer, verifier, cfg.apiv3_key_bytes()?)
            .map_err(|e| ConfigError::new("wechat", e.to_string()))
    }

    pub fn settings(&self) -> &PaySettings {
        &self.inner.settings
    }

    /// The key set answers and callbacks are checked against (shared, so additions are seen
    /// everywhere).
    pub fn verifier(&self) -> &Verifier {
        &self.inner.verifier
    }

    /// A callback reader sharing this client's keys.
    pub fn notification_reader(&self) -> NotificationReader {
        NotificationReader::new(self.inner.verifier.clone(), *self.inner.apiv3_key.expose_secret())
    }

    /// A prepay request with appid, mchid and notify_url from the settings.
    pub fn new_prepay_request(
        &self,
        description: impl Into<String>,
        out_trade_no: impl Into<String>,
        total_fen: i64,
        openid: OpenId,
    ) -> PrepayRequest {
        PrepayRequest {
            appid: self.inner.settings.appid.clone(),
            mchid: self.inner.settings.mchid.clone(),
            description: description.into(),
            out_trade_no: out_trade_no.into(),
            time_expire: None,
            attach: None,
            notify_url: self.inner.settings.notify_url.clone(),
            amount: PrepayAmount { total: total_fen, currency: "CNY".to_owned() },
            payer: Payer { openid },
        }
    }

    /// Checks a prepay request against WeChat's field rules without sending it.
    pub fn check_prepay(&self, req: &PrepayRequest) -> Result<(), FieldError> {
        rules::id32("appid", &req.appid)?;
        rules::id32("mchid", &req.mchid)?;
        rules::description(&req.description)?;
        rules::out_trade_no(&req.out_trade_no)?;
        rules::amount("amount.total", req.amount.total)?;
        if let Some(a) = &req.attach {
            rules::attach(a)?;
        }
        if let Some(t) = &req.time_expire {
            rules::time_expire(t)?;
        }
        let s = &self.inner.settings;
        rules::notify_url(&req.notify_url, s.allow_insecure_loopback, &s.insecure_http_hosts)
            .map_err(|rule| FieldError { field: "notify_url", rule })
    }

    /// `POST /v3/pay/transactions/jsapi`: creates (or re-enters) a JSAPI order.
    pub async fn prepay_jsapi(&self, req: &PrepayRequest) -> Result<PrepayResponse, PayError> {
        self.check_prepay(req)?;
        self.call_json("jsapi_prepay", "POST", "/v3/pay/transactions/jsapi", Some(req)).await
    }

    /// The parameters the mini-program passes to `wx.requestPayment`, signed with the merchant key.
    pub fn jsapi_pay_params(&self, prepay_id: &str) -> JsapiPayParams {
        self.jsapi_pay_params_at(prepay_id, now_unix(), nonce_str())
    }

    /// As [`PayClient::jsapi_pay_params`] with a given time and nonce (reproducible in tests).
    pub fn jsapi_pay_params_at(&self, prepay_id: &str, now_unix: i64, nonce: String) -> JsapiPayParams {
        let app_id = self.inner.settings.appid.clone();
        let time_stamp = now_unix.to_string();
        let package = format!("prepay_id={prepay_id}");
        let pay_sign = self.inner.signer.sign(&pay_sign_message(&app_id, &time_stamp, &nonce, &package));
        JsapiPayParams { app_id, time_stamp, nonce_str: nonce, package, sign_type: "RSA".to_owned(), pay_sign }
    }

    /// `GET /v3/pay/transactions/out-trade-no/{no}?mchid=`.
    pub async fn query_by_out_trade_no(&self, out_trade_no: &str) -> Result<Transaction, PayError> {
        rules::out_trade_no(out_trade_no)?;
        let path = format!("/v3/pay/transactions/out-trade-no/{out_trade_no}?mchid={}", self.inner.settings.mchid);
        self.call_json::<(), _>("query_transaction", "GET", &path, None).await
    }

    /// `GET /v3/pay/transactions/id/{transaction_id}?mchid=`.
    pub async fn query_by_transaction_id(&self, transaction_id: &str) -> Result<Transaction, PayError> {
        rules::transaction_id(transaction_id)?;
        let path = format!("/v3/pay/transactions/id/{transaction_id}?mchid={}", self.inner.settings.mchid);
        self.call_json::<(), _>("query_transaction", "GET", &path, None).await
    }

    /// `POST /v3/pay/transactions/out-trade-no/{no}/close` (204; idempotent on WeChat's side).
    pub async fn close(&self, out_trade_no: &str) -> Result<(), PayError> {
        rules::out_trade_no(out_trade_no)?;
        let path = format!("/v3/pay/transactions/out-trade-no/{out_trade_no}/close");
        let body = CloseRequest { mchid: self.inner.settings.mchid.clone() };
        self.call("close", "POST", &path, Some(&body)).await.map(|_| ())
    }

    /// Checks a refund request against WeChat's field rules without sending it.
    pub fn check_refund(&self, req: &RefundRequest) -> Result<(), FieldError> {
        match (&req.transaction_id, &req.out_trade_no) {
            (Some(t), _) => rules::transaction_id(t)?,
            (None, Some(o)) => rules::out_trade_no(o)?,
            (None, None) => {
                return Err(FieldError { field: "transaction_id", rule: "or out_trade_no must be given" });
            }
        }
        if let (Some(_), Some(o)) = (&req.transaction_id, &req.out_trade_no) {
            rules::out_trade_no(o)?;
        }
        rules::out_refund_no(&req.out_refund_no)?;
        if let Some(r) = &req.reason {
            rules::refund_reason(r)?;
        }
        if let Some(u) = &req.notify_url {
            let s = &self.inner.settings;
            rules::notify_url(u, s.allow_insecure_loopback, &s.insecure_http_hosts)
                .map_err(|rule| FieldError { field: "notify_url", rule })?;
        }
        rules::amount("amount.refund", req.amount.refund)?;
        rules::amount("amount.total", req.amount.total)?;
        if req.amount.refund > req.amount.total {
            return Err(FieldError { field: "amount.refund", rule: "must not exceed amount.total" });
        }
        Ok(())
    }

    /// `POST /v3/refund/domestic/refunds`.
    pub async fn create_refund(&self, req: &RefundRequest) -> Result<Refund, PayError> {
        self.check_refund(req)?;
        self.call_json("create_refund", "POST", "/v3/refund/domestic/refunds", Some(req)).await
    }

    /// `GET /v3/refund/domestic/refunds/{out_refund_no}`.
    pub async fn query_refund(&self, out_refund_no: &str) -> Result<Refund, PayError> {
        rules::out_refund_no(out_refund_no)?;
        let path = format!("/v3/refund/domestic/refunds/{out_refund_no}");
        self.call_json::<(), _>("query_refund", "GET", &path, None).await
    }

    /// `GET /v3/certificates`: decrypts the platform certificates (AAD `certificate`) and adds
    /// their keys to the verifier by serial; returns the serials added.
    ///
    /// The first download cannot be checked with a key we do not have yet, so the answer is
    /// verified with the keys it carries (they are authenticated by the APIv3 key, which only
    /// WeChat and we hold) and only then are they added.
    pub async fn download_certificates(&self) -> Result<Vec<String>, PayError> {
        crate::metrics::metered("certificates", self.download_certificates_unmetered()).await
    }

    async fn download_certificates_unmetered(&self) -> Result<Vec<String>, PayError> {
        let raw = self.send("GET", "/v3/certificates", None).await?;
        if !(200..300).contains(&raw.status) {
            return Err(raw.into_api_error(&self.inner.verifier));
        }
        let list: CertificateList = serde_json::from_slice(&raw.body).map_err(|e| PayError::Decode(e.to_string()))?;
        let candidate = Verifier::new();
        for serial in self.inner.verifier.serials() {
            if let Some(k) = self.inner.verifier.key(&serial) {
                candidate.add_key(serial, k);
            }
        }
        let mut added = Vec::new();
        let now = chrono::Utc::now();
        for cert in &list.data {
            // An expired certificate can no longer sign anything we should accept.
            if chrono::DateTime::parse_from_rfc3339(&cert.expire_time).is_ok_and(|t| t < now) {
                continue;
            }
            let pem = cert.encrypt_certificate.decrypt(self.inner.apiv3_key.expose_secret())?;
            let pem = String::from_utf8(pem).map_err(|_| PayError::Decode("certificate is not UTF-8 PEM".into()))?;
            let key = RsaVerifierKey::from_spki_pem(&pem).map_err(|e| PayError::Decode(e.to_string()))?;
            candidate.add_key(cert.serial_no.clone(), key.clone());
            added.push((cert.serial_no.clone(), key));
        }
        candidate.verify(&raw.signature?, &raw.body, now_unix())?;
        let serials = added.iter().map(|(s, _)| s.clone()).collect();
        for (serial, key) in added {
            self.inner.verifier.add_key(serial, key);
        }
        Ok(serials)
    }

    async fn call_json<B: Serialize, T: DeserializeOwned>(
        &self,
        api: &'static str,
        method: &str,
        path_and_query: &str,
        body: Option<&B>,
    ) -> Result<T, PayError> {
        let raw = self.call(api, method, path_and_query, body).await?;
        serde_json::from_slice(&raw).map_err(|e| PayError::Decode(e.to_string()))
    }

    /// Signs and sends, verifies the answer, maps errors; returns the verified 2xx body. Metered as `api`.
    async fn call<B: Serialize>(
        &self,
        api: &'static str,
        method: &str,
        path_and_query: &str,
        body: Option<&B>,
    ) -> Result<Vec<u8>, PayError> {
        crate::metrics::metered(api, self.call_unmetered(method, path_and_query, body)).await
    }

    async fn call_unmetered<B: Serialize>(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&B>,
    ) -> Result<Vec<u8>, PayError> {
        let body = body.map(serde_json::to_vec).transpose().map_err(|e| PayError::Decode(e.to_string()))?;
        let raw = self.send(method, path_and_query, body).await?;
        if !(200..300).contains(&raw.status) {
            return Err(raw.into_api_error(&self.inner.verifier));
        }
        let signature = raw.signature?;
        match self.inner.verifier.verify(&signature, &raw.body, now_unix()) {
            // A platform-certificate serial we do not hold yet: WeChat rotated its certificate
            // (or this is the first call in certificate mode). Fetch the list once and retry
            // the check on the same answer. Public-key ids are configured, never downloaded.
            Err(VerifyError::UnknownSerial(serial)) if !serial.starts_with("PUB_KEY_ID_") => {
                tracing::info!(serial = %serial, "unknown platform certificate serial; downloading certificates");
                self.download_certificates().await?;
                self.inner.verifier.verify(&signature, &raw.body, now_unix())?;
            }
            other => other?,
        }
        Ok(raw.body)
    }

    async fn send(&self, method: &str, path_and_query: &str, body: Option<Vec<u8>>) -> Result<RawAnswer, PayError> {
        let s = &self.inner.settings;
        let body_bytes = body.as_deref().unwrap_or_default();
        let auth = AuthorizationHeader::sign(
            &self.inner.signer,
            &s.mchid,
            &s.merchant_serial_no,
            method,
            path_and_query,
            now_unix(),
            &nonce_str(),
            body_bytes,
        );
        let http_method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| PayError::Decode(format!("bad method {method}")))?;
        let url = format!("{}{path_and_query}", self.inner.base);
        let mut req = self
            .inner
            .http
            .request(http_method, &url)
            .header(http::header::AUTHORIZATION, auth.to_string())
            .header(http::header::ACCEPT, "application/json");
        if let Some(id) = &s.platform_public_key_id {
            req = req.header(SignatureHeaders::SERIAL, id);
        }
        if let Some(body) = body {
            req = req.header(http::header::CONTENT_TYPE, "application/json").body(body);
        }
        let resp = req.send().await.map_err(map_reqwest)?;
        let status = resp.status().as_u16();
        let signature = SignatureHeaders::from_headers(resp.headers());
        let request_id = resp.headers().get("Request-ID").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = resp.bytes().await.map_err(map_reqwest)?.to_vec();
        tracing::debug!(method, path = %path_and_query.split('?').next().unwrap_or_default(), status, request_id = ?request_id, "wechat pay call");
        Ok(RawAnswer { status, signature, body })
    }
}

impl crate::metrics::Retryable for PayError {
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
}

fn map_reqwest(e: reqwest::Error) -> PayError {
    if e.is_timeout() { PayError::Timeout } else { PayError::Network(e.without_url().to_string()) }
}

struct RawAnswer {
    status: u16,
    signature: Result<SignatureHeaders, VerifyError>,
    body: Vec<u8>,
}

impl RawAnswer {
    /// Maps a non-2xx answer. A signed error answer must verify; an unsigned one (a gateway in
    /// front of WeChat answering 5xx, for example) is still reported as an API error, since
    /// trusting it can at worst make us retry or give up, never record a payment.
    fn into_api_error(self, verifier: &Verifier) -> PayError {
        if let Ok(sig) = &self.signature
            && let Err(e) = verifier.verify(sig, &self.body, now_unix())
        {
            return PayError::Verify(e);
        }
        match serde_json::from_slice::<WechatErrorBody>(&self.body) {
            Ok(b) => PayError::Api {
                http_status: self.status,
                code: b.code,
                message: b.message,
                detail: b.detail.map(Box::new),
            },
            Err(_) => PayError::Api {
                http_status: self.status,
                code: format!("HTTP_{}", self.status),
                message: String::from_utf8_lossy(&self.body).chars().take(200).collect(),
                detail: None,
            },
        }
    }
}
