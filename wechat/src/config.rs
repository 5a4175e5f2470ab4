//! The `[wechat]` and `[sms]` sections of paystream.toml.
//!
//! Secrets are `secrecy` types (their `Debug` prints `[REDACTED]`), and `validate()` names the
//! offending key so an operator can fix the file without reading code.

use std::path::PathBuf;

use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

use crate::pay::rules;

/// A config value that is wrong, with the key that holds it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{key} {message}")]
pub struct ConfigError {
    /// Full dotted key, for example `wechat.apiv3_key`.
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: key.into(), message: message.into() }
    }
}

fn default_pay_base_url() -> String {
    "https://api.mch.weixin.qq.com".to_owned()
}
fn default_miniprogram_base_url() -> String {
    "https://api.weixin.qq.com".to_owned()
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_sms_base_url() -> String {
    "https://sms.tencentcloudapi.com".to_owned()
}
fn default_region() -> String {
    "ap-guangzhou".to_owned()
}

/// One WeChat Pay public key: its `PUB_KEY_ID_…` and the PEM file holding it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PlatformPublicKey {
    pub id: String,
    pub path: PathBuf,
}

/// `[wechat]`: merchant identity, keys and endpoints for Pay v3 and the mini-program API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WechatConfig {
    /// Merchant id (商户号), digits.
    pub mchid: String,
    /// The mini-program's app id, bound to the merchant.
    pub appid: String,
    /// Serial of the merchant API certificate (40 hex), sent as `serial_no`.
    pub merchant_serial_no: String,
    /// PKCS#8 PEM of the merchant API key (apiclient_key.pem).
    pub merchant_private_key_path: PathBuf,
    /// The APIv3 key: 32 ASCII bytes, decrypts callbacks and certificates. Needed by the roles that build a
    /// [`crate::PayClient`]; a role that does not is not given it (paystream's role table says which).
    #[serde(default)]
    pub apiv3_key: Option<SecretString>,
    /// `PUB_KEY_ID_…` of WeChat Pay's public key (public-key mode).
    #[serde(default)]
    pub platform_public_key_id: Option<String>,
    /// PEM of WeChat Pay's public key (public-key mode).
    #[serde(default)]
    pub platform_public_key_path: Option<PathBuf>,
    /// More WeChat Pay public keys accepted when verifying (public-key mode): during a key rotation, the key WeChat
    /// is moving to or from, so callbacks and answers signed with either verify. `platform_public_key_id` stays the
    /// one sent as `Wechatpay-Serial`.
    #[serde(default)]
    pub additional_platform_public_keys: Vec<PlatformPublicKey>,
    /// Download platform certificates from `/v3/certificates` (certificate mode); may be on
    /// together with public-key mode during a migration.
    #[serde(default)]
    pub platform_certificates: bool,
    /// Where WeChat posts payment and refund callbacks.
    pub notify_url: String,
    #[serde(default = "default_pay_base_url")]
    pub pay_base_url: String,
    #[serde(default = "default_miniprogram_base_url")]
    pub miniprogram_base_url: String,
    /// The mini-program's AppSecret. Needed by the roles that build a [`crate::MiniProgramClient`].
    #[serde(default)]
    pub miniprogram_secret: Option<SecretString>,
    #[serde(default = "default_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Lets `notify_url` and base URLs be plain http on loopback (development and tests only).
    #[serde(default)]
    pub allow_insecure_loopback: bool,
    /// Hosts that `notify_url` and the base URLs may name over plain http: the sandbox's and the ingress's Services
    /// in a development cluster. Empty (and refused by the prod overlay's checks) in production.
    #[serde(default)]
    pub insecure_http_hosts: Vec<String>,
}

impl WechatConfig {
    /// Checks every value; the first problem found is returned, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, msg: &str| Err(ConfigError::new(format!("wechat.{key}"), msg));
        if self.mchid.is_empty() || self.mchid.len() > 32 {
            return err("mchid", "must be 1 to 32 characters");
        }
        if self.appid.is_empty() || self.appid.len() > 32 {
            return err("appid", "must be 1 to 32 characters");
        }
        if self.merchant_serial_no.is_empty() || !self.merchant_serial_no.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return err("merchant_serial_no", "must be the merchant certificate serial (hex digits)");
        }
        if self.merchant_private_key_path.as_os_str().is_empty() {
            return err("merchant_private_key_path", "must not be empty");
        }
        if self.apiv3_key.as_ref().is_some_and(|k| k.expose_secret().len() != 32) {
            return err("apiv3_key", "must be 32 bytes");
        }
        if self.miniprogram_secret.as_ref().is_some_and(|k| k.expose_secret().is_empty()) {
            return err("miniprogram_secret", "must not be empty");
        }
        match (&self.platform_public_key_id, &self.platform_public_key_path) {
            (Some(id), Some(_)) if !id.starts_with("PUB_KEY_ID_") => {
                return err("platform_public_key_id", "must start with PUB_KEY_ID_");
            }
            (Some(_), None) => {
                return err("platform_public_key_path", "must be set when platform_public_key_id is");
            }
            (None, Some(_)) => {
                return err("platform_public_key_id", "must be set when platform_public_key_path is");
            }
            (None, None) if !self.platform_certificates => {
                return err(
                    "platform_public_key_id",
                    "or wechat.platform_certificates = true is needed to verify WeChat's answers",
                );
            }
            _ => {}
        }
        if self.additional_platform_public_keys.iter().any(|k| !k.id.starts_with("PUB_KEY_ID_")) {
            return err("additional_platform_public_keys", "every id must start with PUB_KEY_ID_");
        }
        if let Err(rule) = rules::insecure_http_hosts(&self.insecure_http_hosts) {
            return err("insecure_http_hosts", rule);
        }
        if let Err(rule) = rules::notify_url(&self.notify_url, self.allow_insecure_loopback, &self.insecure_http_hosts)
        {
            return err("notify_url", rule);
        }
        for (key, url) in [("pay_base_url", &self.pay_base_url), ("miniprogram_base_url", &self.miniprogram_base_url)] {
            if let Err(rule) = rules::base_url(url, &self.insecure_http_hosts) {
                return err(key, rule);
            }
        }
        if self.request_timeout_ms == 0 || self.request_timeout_ms > 120_000 {
            return err("request_timeout_ms", "must be between 1 and 120000");
        }
        Ok(())
    }

    /// The APIv3 key as the 32 bytes AES-256 takes (after `validate`).
    pub fn apiv3_key_bytes(&self) -> Result<[u8; 32], ConfigError> {
        self.apiv3_key
            .as_ref()
            .ok_or_else(|| ConfigError::new("wechat.apiv3_key", "is missing (WeChat Pay calls need it)"))?
            .expose_secret()
            .as_bytes()
            .try_into()
            .map_err(|_| ConfigError::new("wechat.apiv3_key", "must be 32 bytes"))
    }

    /// The AppSecret (after `validate`).
    pub fn miniprogram_secret(&self) -> Result<&SecretString, ConfigError> {
        self.miniprogram_secret
            .as_ref()
            .ok_or_else(|| ConfigError::new("wechat.miniprogram_secret", "is missing (mini-program calls need it)"))
    }
}

/// `[sms]`: Tencent Cloud SMS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmsConfig {
    #[serde(default = "default_sms_base_url")]
    pub base_url: String,
    pub secret_id: String,
    pub secret_key: SecretString,
    /// `SmsSdkAppId`, for example `1400006666`.
    pub sdk_app_id: String,
    /// The approved signature (签名) content.
    pub sign_name: String,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default = "default_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Hosts `base_url` may name over plain http (the sandbox's Service in a development cluster).
    #[serde(default)]
    pub insecure_http_hosts: Vec<String>,
}

impl SmsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, msg: &str| Err(ConfigError::new(format!("sms.{key}"), msg));
        if let Err(rule) = rules::insecure_http_hosts(&self.insecure_http_hosts) {
            return err("insecure_http_hosts", rule);
        }
        if let Err(rule) = rules::base_url(&self.base_url, &self.insecure_http_hosts) {
            return err("base_url", rule);
        }
        if self.secret_id.is_empty() {
            return err("secret_id", "must not be empty");
        }
        if self.secret_key.expose_secret().is_empty() {
            return err("secret_key", "must not be empty");
        }
        if self.sdk_app_id.is_empty() || !self.sdk_app_id.bytes().all(|b| b.is_ascii_digit()) {
            return err("sdk_app_id", "must be digits");
        }
        if self.sign_name.is_empty() {
            return err("sign_name", "must not be empty");
        }
        if self.region.is_empty() {
            return err("region", "must not be empty");
        }
        if self.request_timeout_ms == 0 || self.request_timeout_ms > 120_000 {
            return err("request_timeout_ms", "must be between 1 and 120000");
        }
        Ok(())
    }
}
