//! The merchant side of WeChat: Pay API v3, the mini-program server API, and Tencent Cloud SMS.
//!
//! - Crypto primitives of Pay v3, shared with the `sandbox` crate: [`RsaSigner`] signs requests
//!   ([`AuthorizationHeader`] over [`request_message`]); [`Verifier`] checks responses and
//!   callbacks by `Wechatpay-Serial` ([`SignatureHeaders`], [`response_message`]) in both
//!   public-key (`PUB_KEY_ID_…`) and platform-certificate modes; [`decrypt_resource`] opens
//!   callback and certificate payloads (AEAD_AES_256_GCM under the APIv3 key).
//! - Wire types ([`Notification`], [`Transaction`], [`RefundNotice`], [`PrepayRequest`], …).
//!
//! Everything cryptographic is aws-lc-rs (not the `rsa` crate: RUSTSEC-2023-0071 and speed).

pub mod config;
pub mod miniprogram;
pub mod openid;
pub mod pay;
pub mod pem;
pub mod sms;

pub use config::{ConfigError, SmsConfig, WechatConfig};
pub use miniprogram::subscribe::{DataRuleError, Lang, MiniprogramState, SubscribeMessage, check_value};
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
    WechatErrorBody, pay_sign_message,
};
pub use pay::verify::{MAX_SKEW_SECS, PROBE_PREFIX, SignatureHeaders, Verifier, VerifyError, check_timestamp};
pub use sms::{SendStatus, SmsClient, SmsError, Tc3Authorization, tc3_authorization, tc3_signature};
