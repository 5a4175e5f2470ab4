//! The merchant side of WeChat: Pay API v3, the mini-program server API, and Tencent Cloud SMS.
//!
//! - [`PayClient`]: JSAPI prepay (field rules checked before sending), the front-end
//!   [`JsapiPayParams`] with `paySign`, query, close, refund create and query, and platform
//!   certificate download. Every request is signed with the merchant key; every answer is
//!   verified by `Wechatpay-Serial` (public-key `PUB_KEY_ID_…` and 40-hex certificate serials
//!   side by side). Errors are [`PayError`] with [`PayError::is_retryable`].
//! - [`NotificationReader`] (from [`PayClient::notification_reader`]): verifies a callback over
//!   its raw body, decrypts it and parses a [`Transaction`] or [`RefundNotice`]; any error
//!   (including the `WECHATPAY/SIGNTEST/` probe) must be answered 4xx/5xx.
//! - [`MiniProgramClient`]: `jscode2session`, the stable access token (one cache shared by all
//!   clones, refreshed before expiry and after 40001/42001), subscribe messages with the value
//!   rules per key type checked before sending; errors are [`MiniError`] classified by
//!   [`ErrorClass`].
//! - [`SmsClient`]: Tencent Cloud `SendSms` signed with TC3-HMAC-SHA256 ([`tc3_authorization`]).
//! - [`WechatConfig`] / [`SmsConfig`]: the `[wechat]` and `[sms]` sections of paystream.toml.
//! - The Pay v3 primitives the `sandbox` crate also uses: [`RsaSigner`], [`RsaVerifierKey`],
//!   [`AuthorizationHeader`], [`request_message`], [`response_message`], [`Verifier`],
//!   [`encrypt_resource`] / [`decrypt_resource`], and the wire types in [`pay::types`].
//!
//! ```no_run
//! # async fn demo(cfg: wechat::WechatConfig) -> Result<(), Box<dyn std::error::Error>> {
//! let pay = wechat::PayClient::from_config(&cfg)?;
//! if cfg.platform_certificates {
//!     pay.download_certificates().await?; // certificate mode: fetch keys before callbacks arrive
//! }
//! let openid = wechat::OpenId::new("oUpF8uMuAJO_M2pxb1Q9zNjWeS6o")?;
//! let req = pay.new_prepay_request("coffee", "PS20261127000001", 100, openid);
//! let prepay = pay.prepay_jsapi(&req).await?;
//! let params = pay.jsapi_pay_params(&prepay.prepay_id); // hand to wx.requestPayment
//! # let _ = params; Ok(()) }
//! ```
//!
//! Every call is metered in [`metrics`] (`paystream_wechat_api_calls_total{api,outcome}` and its duration).
//!
//! Everything cryptographic is aws-lc-rs (not the `rsa` crate: RUSTSEC-2023-0071 and speed).

pub mod config;
pub mod metrics;
pub mod miniprogram;
pub mod openid;
pub mod pay;
pub mod pem;
pub mod sms;

pub use config::{ConfigError, PlatformPublicKey, SmsConfig, WechatConfig};
pub use miniprogram::subscribe::{DataRuleError, Lang, MiniprogramState, SubscribeMessage, check_value};
pub use miniprogram::user_info::{
    UserInfo, UserInfoError, UserInfoPlain, Watermark, decrypt_user_info, encrypt_user_info,
};
pub use miniprogram::{Errcode, ErrorClass, MiniError, MiniProgramClient, MiniSettings, Session};
pub use pay::client::{PayClient, PayError, PaySettings};
pub use pay::notify::{NotificationReader, NotifyError, NotifyPayload, VerifiedNotification};
pub use pay::rules::FieldError;

pub use openid::{InvalidOpenId, OpenId};
pub use pay::aead::{CryptoError, decrypt_resource, encrypt_resource};
pub use pay::keys::{KeyError, RsaSigner, RsaVerifierKey};
pub use pay::sign::{AUTH_SCHEME, AuthError, AuthorizationHeader, nonce_str, request_message, response_message};
pub use pay::types::{
    CertificateList, CloseRequest, EncryptedResource, ErrorDetail, EventType, JsapiPayParams, Notification, Payer,
    PlatformCertificate, PrepayAmount, PrepayRequest, PrepayResponse, Refund, RefundAmount, RefundNotice,
    RefundNoticeAmount, RefundRequest, RefundRequestAmount, RefundStatus, TradeState, Transaction, TransactionAmount,
    WechatErrorBody, pay_sign_message, wechat_time,
};
pub use pay::verify::{MAX_SKEW_SECS, PROBE_PREFIX, SignatureHeaders, Verifier, VerifyError, check_timestamp};
pub use sms::{SendStatus, SmsClient, SmsError, Tc3Authorization, tc3_authorization, tc3_signature};
