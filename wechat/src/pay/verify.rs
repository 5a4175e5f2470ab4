//! Verification of WeChat's responses and callbacks (`Wechatpay-*` headers).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::pay::keys::RsaVerifierKey;
use crate::pay::sign::{AUTH_SCHEME, response_message_raw};

/// WeChat refuses requests whose timestamp is 5 minutes or more away from its clock, and asks
/// merchants to do the same with its responses and callbacks.
pub const MAX_SKEW_SECS: i64 = 300;

/// Prefix of the signatures WeChat sends to probe that a merchant really verifies callbacks.
pub const PROBE_PREFIX: &str = "WECHATPAY/SIGNTEST/";

/// Why a response or callback was not accepted as WeChat's.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("signature does not match")]
    BadSignature,
    #[error("no key for Wechatpay-Serial {0}")]
    UnknownSerial(String),
    #[error("timestamp is {skew_secs} s away from now (limit {MAX_SKEW_SECS} s)")]
    Stale { skew_secs: i64 },
    #[error("WECHATPAY/SIGNTEST probe signature")]
    Probe,
    #[error("malformed signature headers: {0}")]
    Malformed(String),
}

/// Checks a unix timestamp against `now_unix` with WeChat's 5-minute window (the sandbox uses
/// it for the merchant's `Authorization` timestamp).
pub fn check_timestamp(timestamp: i64, now_unix: i64) -> Result<(), VerifyError> {
    let skew = now_unix.saturating_sub(timestamp);
    if skew.saturating_abs() >= MAX_SKEW_SECS { Err(VerifyError::Stale { skew_secs: skew }) } else { Ok(()) }
}

/// The four `Wechatpay-*` headers that carry a signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeaders {
    pub timestamp: String,
    pub nonce: String,
    pub signature: String,
    pub serial: String,
}

impl SignatureHeaders {
    pub const TIMESTAMP: &'static str = "Wechatpay-Timestamp";
    pub const NONCE: &'static str = "Wechatpay-Nonce";
    pub const SIGNATURE: &'static str = "Wechatpay-Signature";
    pub const SERIAL: &'static str = "Wechatpay-Serial";
    pub const SIGNATURE_TYPE: &'static str = "Wechatpay-Signature-Type";

    /// Reads the headers; a `Wechatpay-Signature-Type` other than WECHATPAY2-SHA256-RSA2048 is
    /// refused (its absence is fine: older callbacks do not send it).
    pub fn from_headers(headers: &http::HeaderMap) -> Result<Self, VerifyError> {
        let get = |name: &str| -> Result<String, VerifyError> {
            let value = headers.get(name).ok_or_else(|| VerifyError::Malformed(format!("missing {name}")))?;
            value
                .to_str()
                .map(|s| s.trim().to_owned())
                .map_err(|_| VerifyError::Malformed(format!("{name} is not visible ASCII")))
        };
        if headers.contains_key(Self::SIGNATURE_TYPE) {
            let kind = get(Self::SIGNATURE_TYPE)?;
            if kind != AUTH_SCHEME {
                return Err(VerifyError::Malformed(format!("unsupported {}: {kind}", Self::SIGNATURE_TYPE)));
            }
        }
        Ok(Self {
            timestamp: get(Self::TIMESTAMP)?,
            nonce: get(Self::NONCE)?,
            signature: get(Self::SIGNATURE)?,
            serial: get(Self::SERIAL)?,
        })
    }

    /// Whether this is one of WeChat's SIGNTEST probes.
    pub fn is_probe(&self) -> bool {
        self.signature.starts_with(PROBE_PREFIX)
    }
}

/// WeChat's verifying keys by serial: `PUB_KEY_ID_…` (public-key mode) and 40-hex platform
/// certificate serials side by side, since a migration sends both for days.
///
/// Cloning is cheap and clones share the key set, so keys downloaded by one task are seen by all.
#[derive(Clone, Default)]
pub struct Verifier {
    keys: Arc<RwLock<HashMap<String, RsaVerifierKey>>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("serials", &self.serials()).finish()
    }
}

impl Verifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the key for `serial`.
    pub fn add_key(&self, serial: impl Into<String>, key: RsaVerifierKey) {
        self.write().insert(serial.into(), key);
    }

    /// Removes the key for `serial` (an expired platform certificate); returns whether it was there.
    pub fn remove_key(&self, serial: &str) -> bool {
        self.write().remove(serial).is_some()
    }

    /// The serials held, sorted.
    pub fn serials(&self) -> Vec<String> {
        let mut s: Vec<String> = self.read().keys().cloned().collect();
        s.sort();
        s
    }

    pub fn key(&self, serial: &str) -> Option<RsaVerifierKey> {
        self.read().get(serial).cloned()
    }

    /// Checks a response or callback: probe, timestamp window, key by serial, then the
    /// signature over `TIMESTAMP\nNONCE\nBODY\n` with the raw body bytes.
    pub fn verify(&self, headers: &SignatureHeaders, body: &[u8], now_unix: i64) -> Result<(), VerifyError> {
        // A probe is answered as a failure before anything else so that it can never pass,
        // whatever the rest of the headers say.
        if headers.is_probe() {
            return Err(VerifyError::Probe);
        }
        let ts = &headers.timestamp;
        if ts.is_empty() || ts.len() > 12 || !ts.bytes().all(|b| b.is_ascii_digit()) {
            return Err(VerifyError::Malformed("Wechatpay-Timestamp is not a unix time in seconds".into()));
        }
        let ts_num: i64 = ts.parse().map_err(|_| VerifyError::Malformed("Wechatpay-Timestamp out of range".into()))?;
        check_timestamp(ts_num, now_unix)?;
        let guard = self.read();
        let key = guard.get(&headers.serial).ok_or_else(|| VerifyError::UnknownSerial(headers.serial.clone()))?;
        key.verify(&response_message_raw(ts, &headers.nonce, body), &headers.signature)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, RsaVerifierKey>> {
        // A panic while holding the lock cannot leave the map half-updated (insert/remove are
        // atomic from our side), so a poisoned lock is still safe to use.
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, RsaVerifierKey>> {
        self.keys.write().unwrap_or_else(|e| e.into_inner())
    }
}
