//! Tencent Cloud SMS `SendSms` (API 2021-01-11) with TC3-HMAC-SHA256 request signing.

use std::time::Duration;

use aws_lc_rs::{digest, hmac};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, SmsConfig};

pub const TC3_ALGORITHM: &str = "TC3-HMAC-SHA256";
pub const SMS_SERVICE: &str = "sms";
pub const SMS_VERSION: &str = "2021-01-11";
pub const CONTENT_TYPE_JSON: &str = "application/json; charset=utf-8";
/// The headers this client signs, in the canonical (sorted, lower-case) order.
pub const SIGNED_HEADERS: &str = "content-type;host";

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, data))
}

fn hmac256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), msg).as_ref().to_vec()
}

/// The UTC date (`YYYY-MM-DD`) of a unix time, as TC3 scopes credentials by it.
pub fn tc3_date(timestamp: i64) -> String {
    chrono::DateTime::from_timestamp(timestamp, 0).unwrap_or_default().format("%Y-%m-%d").to_string()
}

/// The TC3 signature (hex) of a POST to `/` with no query, signing `content-type` and `host`.
pub fn tc3_signature(
    secret_key: &str,
    service: &str,
    host: &str,
    content_type: &str,
    timestamp: i64,
    payload: &[u8],
) -> String {
    let canonical_request = format!(
        "POST\n/\n\ncontent-type:{}\nhost:{}\n\n{SIGNED_HEADERS}\n{}",
        content_type.trim().to_ascii_lowercase(),
        host.trim().to_ascii_lowercase(),
        sha256_hex(payload)
    );
    let date = tc3_date(timestamp);
    let scope = format!("{date}/{service}/tc3_request");
    let string_to_sign = format!("{TC3_ALGORITHM}\n{timestamp}\n{scope}\n{}", sha256_hex(canonical_request.as_bytes()));
    let k_date = hmac256(format!("TC3{secret_key}").as_bytes(), date.as_bytes());
    let k_service = hmac256(&k_date, service.as_bytes());
    let k_signing = hmac256(&k_service, b"tc3_request");
    hex::encode(hmac256(&k_signing, string_to_sign.as_bytes()))
}

/// The `Authorization` header value:
/// `TC3-HMAC-SHA256 Credential=ID/DATE/SERVICE/tc3_request, SignedHeaders=content-type;host, Signature=HEX`.
pub fn tc3_authorization(
    secret_id: &str,
    secret_key: &str,
    service: &str,
    host: &str,
    content_type: &str,
    timestamp: i64,
    payload: &[u8],
) -> String {
    let signature = tc3_signature(secret_key, service, host, content_type, timestamp, payload);
    format!(
        "{TC3_ALGORITHM} Credential={secret_id}/{}/{service}/tc3_request, SignedHeaders={SIGNED_HEADERS}, Signature={signature}",
        tc3_date(timestamp)
    )
}

/// A parsed TC3 `Authorization` header (for the sandbox, which checks it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tc3Authorization {
    pub secret_id: String,
    pub date: String,
    pub service: String,
    pub signed_headers: String,
    pub signature: String,
}

impl Tc3Authorization {
    pub fn parse(value: &str) -> Option<Self> {
        let rest = value.trim().strip_prefix(TC3_ALGORITHM)?.trim_start();
        let (mut credential, mut signed, mut signature) = (None, None, None);
        for part in rest.split(',') {
            let (k, v) = part.trim().split_once('=')?;
            match k {
                "Credential" => credential = Some(v),
                "SignedHeaders" => signed = Some(v),
                "Signature" => signature = Some(v),
                _ => return None,
            }
        }
        let mut cred = credential?.split('/');
        let (secret_id, date, service, term) = (cred.next()?, cred.next()?, cred.next()?, cred.next()?);
        if term != "tc3_request" || cred.next().is_some() {
            return None;
        }
        Some(Self {
            secret_id: secret_id.to_owned(),
            date: date.to_owned(),
            service: service.to_owned(),
            signed_headers: signed?.to_owned(),
            signature: signature?.to_owned(),
        })
    }
}

/// The status of one phone number in a `SendSms` answer.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SendStatus {
    #[serde(default)]
    pub serial_no: String,
    pub phone_number: String,
    #[serde(default)]
    pub fee: i64,
    #[serde(default)]
    pub session_context: String,
    /// `Ok` on success, otherwise an error code such as `LimitExceeded.PhoneNumberDailyLimit`.
    pub code: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub iso_code: String,
}

impl SendStatus {
    pub fn is_ok(&self) -> bool {
        self.code == "Ok"
    }
}

impl std::fmt::Debug for SendStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Phone numbers are personal data: keep only the last four digits in logs.
        let tail: String = {
            let chars: Vec<char> = self.phone_number.chars().collect();
            chars[chars.len().saturating_sub(4)..].iter().collect()
        };
        f.debug_struct("SendStatus")
            .field("phone_number", &format!("***{tail}"))
            .field("code", &self.code)
            .field("message", &self.message)
            .field("serial_no", &self.serial_no)
            .finish_non_exhaustive()
    }
}

/// What went wrong with a `SendSms` call as a whole (per-number failures are in [`SendStatus`]).
#[derive(Debug, thiserror::Error)]
pub enum SmsError {
    #[error("Tencent Cloud {code}: {message}")]
    Api { code: String, message: String, request_id: String },
    #[error("network: {0}")]
    Network(String),
    #[error("request timed out")]
    Timeout,
    #[error("answer could not be decoded: {0}")]
    Decode(String),
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl SmsError {
    /// Internal errors, rate limits, network failures and timeouts may pass later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Api { code, .. } => code.starts_with("InternalError") || code.starts_with("RequestLimitExceeded"),
            Self::Network(_) | Self::Timeout => true,
            Self::Decode(_) | Self::Invalid(_) => false,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct SendSmsBody<'a> {
    phone_number_set: &'a [String],
    sms_sdk_app_id: &'a str,
    sign_name: &'a str,
    template_id: &'a str,
    template_param_set: &'a [String],
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TcError {
    code: String,
    message: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TcResponse {
    #[serde(default)]
    send_status_set: Vec<SendStatus>,
    error: Option<TcError>,
    #[serde(default)]
    request_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TcEnvelope {
    response: TcResponse,
}

/// Whether `n` is a phone number Tencent Cloud takes: E.164 (`+8613800138000`) or a mainland
/// 11-digit number.
pub fn is_phone_number(n: &str) -> bool {
    match n.strip_prefix('+') {
        Some(d) => (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()),
        None => n.len() == 11 && n.starts_with('1') && n.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// The Tencent Cloud SMS client.
#[derive(Clone)]
pub struct SmsClient {
    http: reqwest::Client,
    url: reqwest::Url,
    host: String,
    secret_id: String,
    secret_key: SecretString,
    sdk_app_id: String,
    sign_name: String,
    region: String,
}

impl std::fmt::Debug for SmsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmsClient")
            .field("url", &self.url.as_str())
            .field("sdk_app_id", &self.sdk_app_id)
            .finish_non_exhaustive()
    }
}

impl SmsClient {
    pub fn from_config(cfg: &SmsConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let url = reqwest::Url::parse(&cfg.base_url)
            .map_err(|_| ConfigError::new("sms.base_url", "must be an absolute URL"))?;
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => return Err(ConfigError::new("sms.base_url", "must have a host")),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.request_timeout_ms))
            .build()
            .map_err(|e| ConfigError::new("sms", e.to_string()))?;
        Ok(Self {
            http,
            url,
            host,
            secret_id: cfg.secret_id.clone(),
            secret_key: cfg.secret_key.clone(),
            sdk_app_id: cfg.sdk_app_id.clone(),
            sign_name: cfg.sign_name.clone(),
            region: cfg.region.clone(),
        })
    }

    /// Sends template `template_id` with `params` to each of `phone_numbers` (at most 200).
    /// A whole-request failure is an `Err`; per-number results come back in order.
    pub async fn send_sms(
        &self,
        template_id: &str,
        params: &[String],
        phone_numbers: &[String],
    ) -> Result<Vec<SendStatus>, SmsError> {
        if template_id.is_empty() || !template_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SmsError::Invalid("TemplateId must be digits".into()));
        }
        if phone_numbers.is_empty() || phone_numbers.len() > 200 {
            return Err(SmsError::Invalid("PhoneNumberSet must hold 1 to 200 numbers".into()));
        }
        if let Some(i) = phone_numbers.iter().position(|n| !is_phone_number(n)) {
            return Err(SmsError::Invalid(format!("PhoneNumberSet[{i}] is not a phone number")));
        }
        let payload = serde_json::to_vec(&SendSmsBody {
            phone_number_set: phone_numbers,
            sms_sdk_app_id: &self.sdk_app_id,
            sign_name: &self.sign_name,
            template_id,
            template_param_set: params,
        })
        .map_err(|e| SmsError::Decode(e.to_string()))?;
        crate::metrics::metered("sms_send", async {
            let timestamp = chrono::Utc::now().timestamp();
            let authorization = tc3_authorization(
                &self.secret_id,
                self.secret_key.expose_secret(),
                SMS_SERVICE,
                &self.host,
                CONTENT_TYPE_JSON,
                timestamp,
                &payload,
            );
            let resp = self
                .http
                .post(self.url.clone())
                .header(http::header::AUTHORIZATION, authorization)
                .header(http::header::CONTENT_TYPE, CONTENT_TYPE_JSON)
                .header(http::header::HOST, &self.host)
                .header("X-TC-Action", "SendSms")
                .header("X-TC-Version", SMS_VERSION)
                .header("X-TC-Timestamp", timestamp.to_string())
                .header("X-TC-Region", &self.region)
                .body(payload)
                .send()
                .await
                .map_err(|e| {
                    if e.is_timeout() { SmsError::Timeout } else { SmsError::Network(e.without_url().to_string()) }
                })?;
            let status = resp.status();
            let body = resp.bytes().await.map_err(|e| SmsError::Network(e.without_url().to_string()))?;
            let env: TcEnvelope =
                serde_json::from_slice(&body).map_err(|e| SmsError::Decode(format!("HTTP {status}: {e}")))?;
            if let Some(err) = env.response.error {
                return Err(SmsError::Api {
                    code: err.code,
                    message: err.message,
                    request_id: env.response.request_id,
                });
            }
            Ok(env.response.send_status_set)
        })
        .await
    }
}

impl crate::metrics::Retryable for SmsError {
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_header_shape_and_parse() {
        let h = tc3_authorization(
            "AKID1",
            "key",
            "sms",
            "sms.tencentcloudapi.com",
            CONTENT_TYPE_JSON,
            1_700_000_000,
            b"{}",
        );
        assert!(h.starts_with(
            "TC3-HMAC-SHA256 Credential=AKID1/2023-11-14/sms/tc3_request, SignedHeaders=content-type;host, Signature="
        ));
        let p = Tc3Authorization::parse(&h).unwrap();
        assert_eq!(p.secret_id, "AKID1");
        assert_eq!(p.date, "2023-11-14");
        assert_eq!(p.signed_headers, SIGNED_HEADERS);
        assert_eq!(p.signature.len(), 64);
        assert!(Tc3Authorization::parse("Bearer x").is_none());
    }

    /// Tencent Cloud's documented TC3 example (CVM DescribeInstances, 2019-02-25).
    #[test]
    fn tc3_matches_tencents_published_example() {
        let body = br#"{"Limit": 1, "Filters": [{"Values": ["\u672a\u547d\u540d"], "Name": "instance-name"}]}"#;
        let sig = tc3_signature(
            "Gu5t9xGARNpq86cd98joQYCN3*******",
            "cvm",
            "cvm.tencentcloudapi.com",
            "application/json; charset=utf-8",
            1551113065,
            body,
        );
        assert_eq!(sig, "2230eefd229f582d8b1b891af7107b91597240707d778ab3738f756258d7652c");
    }

    #[test]
    fn phone_numbers() {
        assert!(is_phone_number("+8613800138000"));
        assert!(is_phone_number("13800138000"));
        assert!(!is_phone_number("+86 138"));
        assert!(!is_phone_number("23800138000"));
    }

    #[test]
    fn send_status_debug_masks_number() {
        let s: SendStatus = serde_json::from_str(
            r#"{"SerialNo":"2028:1","PhoneNumber":"+8613800138000","Fee":1,"SessionContext":"","Code":"Ok","Message":"send success","IsoCode":"CN"}"#,
        )
        .unwrap();
        assert!(s.is_ok());
        let d = format!("{s:?}");
        assert!(d.contains("***8000") && !d.contains("13800138000"));
    }
}
