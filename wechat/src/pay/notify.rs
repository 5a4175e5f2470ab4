//! Reading WeChat's payment and refund callbacks: verify, then decrypt, then parse.

use secrecy::{ExposeSecret as _, SecretBox};

use crate::pay::aead::CryptoError;
use crate::pay::types::{EventType, Notification, RefundNotice, Transaction};
use crate::pay::verify::{SignatureHeaders, Verifier, VerifyError};

/// Why a callback was not accepted. Every variant should be answered with a 4xx/5xx so that
/// WeChat resends (a probe included).
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("callback signature: {0}")]
    Verify(#[from] VerifyError),
    #[error("callback resource: {0}")]
    Crypto(#[from] CryptoError),
    #[error("callback body: {0}")]
    Decode(String),
}

/// A verified, decrypted callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyPayload {
    /// `TRANSACTION.*`
    Transaction(Transaction),
    /// `REFUND.*`
    Refund(RefundNotice),
}

/// A callback after verification: the envelope and its decrypted payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedNotification {
    pub notification: Notification,
    pub payload: NotifyPayload,
}

/// Verifies and opens callbacks. Cheap to clone; shares keys with the [`crate::PayClient`] it
/// came from, so certificates downloaded later are used at once.
#[derive(Clone)]
pub struct NotificationReader {
    verifier: Verifier,
    apiv3_key: std::sync::Arc<SecretBox<[u8; 32]>>,
}

impl std::fmt::Debug for NotificationReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotificationReader").field("verifier", &self.verifier).finish_non_exhaustive()
    }
}

impl NotificationReader {
    pub fn new(verifier: Verifier, apiv3_key: [u8; 32]) -> Self {
        Self { verifier, apiv3_key: std::sync::Arc::new(SecretBox::new(Box::new(apiv3_key))) }
    }

    /// Verifies the `Wechatpay-*` headers over the raw `body` at `now_unix`, then decrypts and
    /// parses the resource according to `event_type` (or `original_type`).
    pub fn read(
        &self,
        headers: &http::HeaderMap,
        body: &[u8],
        now_unix: i64,
    ) -> Result<VerifiedNotification, NotifyError> {
        let sig = SignatureHeaders::from_headers(headers)?;
        self.verifier.verify(&sig, body, now_unix)?;
        let notification: Notification =
            serde_json::from_slice(body).map_err(|e| NotifyError::Decode(e.to_string()))?;
        let plain = notification.resource.decrypt(self.apiv3_key.expose_secret())?;
        let is_refund = match &notification.event_type {
            EventType::TransactionSuccess => false,
            EventType::RefundSuccess | EventType::RefundAbnormal | EventType::RefundClosed => true,
            EventType::Other(_) => notification.resource.original_type == "refund",
        };
        let payload = if is_refund {
            NotifyPayload::Refund(serde_json::from_slice(&plain).map_err(|e| NotifyError::Decode(e.to_string()))?)
        } else {
            NotifyPayload::Transaction(serde_json::from_slice(&plain).map_err(|e| NotifyError::Decode(e.to_string()))?)
        };
        Ok(VerifiedNotification { notification, payload })
    }
}
