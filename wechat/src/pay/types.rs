//! Wire types of WeChat Pay API v3, shared by the client and the sandbox.
//!
//! Responses are read leniently (unknown fields ignored, fields WeChat omits in some states
//! are `Option`); requests are written exactly as documented (absent options are not sent).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::openid::OpenId;
use crate::pay::aead::{ALGORITHM, CryptoError, decrypt_resource};

/// A callback body (`POST notify_url`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub id: String,
    pub create_time: String,
    pub event_type: EventType,
    pub resource_type: String,
    #[serde(default)]
    pub summary: String,
    pub resource: EncryptedResource,
}

/// `event_type` of a callback; unknown types are kept as text rather than refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum EventType {
    TransactionSuccess,
    RefundSuccess,
    RefundAbnormal,
    RefundClosed,
    Other(String),
}

impl EventType {
    pub fn as_str(&self) -> &str {
        match self {
            Self::TransactionSuccess => "TRANSACTION.SUCCESS",
            Self::RefundSuccess => "REFUND.SUCCESS",
            Self::RefundAbnormal => "REFUND.ABNORMAL",
            Self::RefundClosed => "REFUND.CLOSED",
            Self::Other(s) => s,
        }
    }
}

impl From<String> for EventType {
    fn from(s: String) -> Self {
        match s.as_str() {
            "TRANSACTION.SUCCESS" => Self::TransactionSuccess,
            "REFUND.SUCCESS" => Self::RefundSuccess,
            "REFUND.ABNORMAL" => Self::RefundAbnormal,
            "REFUND.CLOSED" => Self::RefundClosed,
            _ => Self::Other(s),
        }
    }
}

impl From<EventType> for String {
    fn from(e: EventType) -> Self {
        e.as_str().to_owned()
    }
}

/// The encrypted payload of a callback or certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedResource {
    /// `transaction` or `refund` in callbacks; absent in certificates.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub original_type: String,
    pub algorithm: String,
    pub ciphertext: String,
    #[serde(default)]
    pub associated_data: String,
    pub nonce: String,
}

impl EncryptedResource {
    /// Decrypts with the APIv3 key (refusing any algorithm but AEAD_AES_256_GCM).
    pub fn decrypt(&self, apiv3_key: &[u8; 32]) -> Result<Vec<u8>, CryptoError> {
        if self.algorithm != ALGORITHM {
            return Err(CryptoError::Algorithm(self.algorithm.clone()));
        }
        decrypt_resource(apiv3_key, &self.nonce, &self.associated_data, &self.ciphertext)
    }
}

/// `trade_state` of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TradeState {
    Success,
    Refund,
    Notpay,
    Closed,
    Revoked,
    Userpaying,
    Payerror,
    Accept,
}

impl TradeState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "SUCCESS",
            Self::Refund => "REFUND",
            Self::Notpay => "NOTPAY",
            Self::Closed => "CLOSED",
            Self::Revoked => "REVOKED",
            Self::Userpaying => "USERPAYING",
            Self::Payerror => "PAYERROR",
            Self::Accept => "ACCEPT",
        }
    }
}

/// The payer of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payer {
    pub openid: OpenId,
}

/// Amounts of a transaction, in fen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionAmount {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer_total: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer_currency: Option<String>,
}

/// An order as returned by query and in `TRANSACTION.SUCCESS` callbacks. A NOTPAY order has
/// no `transaction_id`, `payer` or `success_time`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    pub appid: String,
    pub mchid: String,
    pub out_trade_no: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
    /// JSAPI, NATIVE, APP, MICROPAY, MWEB or FACEPAY; absent before payment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trade_type: Option<String>,
    pub trade_state: TradeState,
    #[serde(default)]
    pub trade_state_desc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bank_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<String>,
    /// RFC 3339 with +08:00.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<Payer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<TransactionAmount>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub promotion_detail: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scene_info: Option<serde_json::Value>,
}

/// `status` / `refund_status` of a refund.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RefundStatus {
    Success,
    Closed,
    Processing,
    Abnormal,
}

impl RefundStatus {
    /// WeChat's spelling, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "SUCCESS",
            Self::Closed => "CLOSED",
            Self::Processing => "PROCESSING",
            Self::Abnormal => "ABNORMAL",
        }
    }
}

/// Amounts in a refund callback, in fen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundNoticeAmount {
    pub total: i64,
    pub refund: i64,
    pub payer_total: i64,
    pub payer_refund: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
}

/// The plaintext of a `REFUND.*` callback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundNotice {
    pub mchid: String,
    pub out_trade_no: String,
    pub transaction_id: String,
    pub out_refund_no: String,
    pub refund_id: String,
    pub refund_status: RefundStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_time: Option<String>,
    #[serde(default)]
    pub user_received_account: String,
    pub amount: RefundNoticeAmount,
}

/// Amounts of a refund as the refund API returns them, in fen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundAmount {
    pub total: i64,
    pub refund: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer_total: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer_refund: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settlement_refund: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settlement_total: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discount_refund: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
}

/// A refund as `POST /v3/refund/domestic/refunds` and its query return it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub refund_id: String,
    pub out_refund_no: String,
    #[serde(default)]
    pub transaction_id: String,
    #[serde(default)]
    pub out_trade_no: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_received_account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<String>,
    pub status: RefundStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub funds_account: Option<String>,
    pub amount: RefundAmount,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub promotion_detail: Vec<serde_json::Value>,
}

/// `amount` of a prepay request, in fen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepayAmount {
    pub total: i64,
    #[serde(default = "cny")]
    pub currency: String,
}

fn cny() -> String {
    "CNY".to_owned()
}

/// `POST /v3/pay/transactions/jsapi` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepayRequest {
    pub appid: String,
    pub mchid: String,
    pub description: String,
    pub out_trade_no: String,
    /// RFC 3339, for example `2026-11-27T12:00:00+08:00`; WeChat's default is 7 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_expire: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<String>,
    pub notify_url: String,
    pub amount: PrepayAmount,
    pub payer: Payer,
}

/// Answer to a prepay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepayResponse {
    pub prepay_id: String,
}

/// `POST /v3/pay/transactions/out-trade-no/{no}/close` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseRequest {
    pub mchid: String,
}

/// `amount` of a refund request, in fen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundRequestAmount {
    pub refund: i64,
    pub total: i64,
    #[serde(default = "cny")]
    pub currency: String,
}

/// `POST /v3/refund/domestic/refunds` body: one of `transaction_id` or `out_trade_no`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_trade_no: Option<String>,
    pub out_refund_no: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub funds_account: Option<String>,
    pub amount: RefundRequestAmount,
}

/// `detail` of a WeChat error body.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ErrorDetail {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

/// The body of every 4xx/5xx answer: `{"code","message","detail"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WechatErrorBody {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<ErrorDetail>,
}

/// What the mini-program front end passes to `wx.requestPayment`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JsapiPayParams {
    pub app_id: String,
    pub time_stamp: String,
    pub nonce_str: String,
    /// `prepay_id=…`
    pub package: String,
    /// Always `RSA` for v3.
    pub sign_type: String,
    pub pay_sign: String,
}

/// The message signed into `paySign`: `appId\ntimeStamp\nnonceStr\npackage\n`.
pub fn pay_sign_message(app_id: &str, time_stamp: &str, nonce_str: &str, package: &str) -> Vec<u8> {
    format!("{app_id}\n{time_stamp}\n{nonce_str}\n{package}\n").into_bytes()
}

/// One entry of `GET /v3/certificates`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformCertificate {
    pub serial_no: String,
    pub effective_time: String,
    pub expire_time: String,
    pub encrypt_certificate: EncryptedResource,
}

/// `GET /v3/certificates` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateList {
    pub data: Vec<PlatformCertificate>,
}

/// A WeChat time (`success_time` and the like: RFC 3339 with offset, e.g. `2026-11-27T10:05:00+08:00`) in UTC;
/// `None` when malformed.
pub fn wechat_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|d| d.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trade_state_and_event_type_wire_names() {
        assert_eq!(serde_json::to_string(&TradeState::Userpaying).unwrap(), "\"USERPAYING\"");
        for s in [
            TradeState::Success,
            TradeState::Refund,
            TradeState::Notpay,
            TradeState::Closed,
            TradeState::Revoked,
            TradeState::Userpaying,
            TradeState::Payerror,
            TradeState::Accept,
        ] {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{}\"", s.as_str()));
        }
        let e: EventType = serde_json::from_str("\"REFUND.CLOSED\"").unwrap();
        assert_eq!(e, EventType::RefundClosed);
        let e: EventType = serde_json::from_str("\"X.Y\"").unwrap();
        assert_eq!(serde_json::to_string(&e).unwrap(), "\"X.Y\"");
    }

    #[test]
    fn notpay_query_body_parses() {
        let body = r#"{"amount":{"currency":"CNY","payer_currency":"CNY","total":100},"appid":"wxd678efh567hg6787","mchid":"1230000109","out_trade_no":"1217752501201407033233368018","promotion_detail":[],"scene_info":{"device_id":"013467007045764"},"trade_state":"NOTPAY","trade_state_desc":"订单未支付"}"#;
        let t: Transaction = serde_json::from_str(body).unwrap();
        assert_eq!(t.trade_state, TradeState::Notpay);
        assert!(t.transaction_id.is_none() && t.payer.is_none());
    }

    #[test]
    fn pay_params_are_camel_case() {
        let p = JsapiPayParams {
            app_id: "a".into(),
            time_stamp: "1".into(),
            nonce_str: "n".into(),
            package: "prepay_id=x".into(),
            sign_type: "RSA".into(),
            pay_sign: "s".into(),
        };
        let v = serde_json::to_value(&p).unwrap();
        for k in ["appId", "timeStamp", "nonceStr", "package", "signType", "paySign"] {
            assert!(v.get(k).is_some(), "{k}");
        }
    }
}
