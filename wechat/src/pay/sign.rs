//! Request signing: the message layouts and the `Authorization` header.

use std::fmt;

use crate::pay::keys::{RsaSigner, RsaVerifierKey};
use crate::pay::verify::VerifyError;

/// The only scheme WeChat Pay v3 defines.
pub const AUTH_SCHEME: &str = "WECHATPAY2-SHA256-RSA2048";

/// The bytes a merchant signs: `METHOD\nURL\nTIMESTAMP\nNONCE\nBODY\n`, where URL is the path
/// and query exactly as sent. A GET has an empty body, so its message ends in `\n\n`.
pub fn request_message(method: &str, path_and_query: &str, timestamp: i64, nonce: &str, body: &[u8]) -> Vec<u8> {
    let ts = timestamp.to_string();
    let mut msg = Vec::with_capacity(method.len() + path_and_query.len() + ts.len() + nonce.len() + body.len() + 5);
    for part in [method.as_bytes(), path_and_query.as_bytes(), ts.as_bytes(), nonce.as_bytes(), body] {
        msg.extend_from_slice(part);
        msg.push(b'\n');
    }
    msg
}

/// The bytes WeChat signs in responses and callbacks: `TIMESTAMP\nNONCE\nBODY\n`.
pub fn response_message(timestamp: i64, nonce: &str, body: &[u8]) -> Vec<u8> {
    response_message_raw(&timestamp.to_string(), nonce, body)
}

/// Same as [`response_message`] but with the timestamp text as received, so that a header
/// like `0123` is checked as written rather than as the number it parses to.
pub fn response_message_raw(timestamp: &str, nonce: &str, body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(timestamp.len() + nonce.len() + body.len() + 3);
    for part in [timestamp.as_bytes(), nonce.as_bytes(), body] {
        msg.extend_from_slice(part);
        msg.push(b'\n');
    }
    msg
}

/// 32 random characters of `[A-Z0-9]`, the shape WeChat's SDKs use for `nonce_str`.
pub fn nonce_str() -> String {
    const ALPHABET: &[u8; 36] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut out = String::with_capacity(32);
    let mut buf = [0u8; 64];
    while out.len() < 32 {
        aws_lc_rs::rand::fill(&mut buf).expect("the system random source is available");
        // Reject bytes >= 252 (= 7 * 36) so every character is equally likely.
        for b in buf.iter().filter(|b| **b < 252) {
            if out.len() == 32 {
                break;
            }
            out.push(ALPHABET[usize::from(*b % 36)] as char);
        }
    }
    out
}

/// Why an `Authorization` header could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("authorization scheme is not {AUTH_SCHEME}")]
    WrongScheme,
    #[error("authorization header is malformed: {0}")]
    Malformed(String),
    #[error("authorization header lacks {0}")]
    MissingField(&'static str),
    #[error("authorization header repeats {0}")]
    DuplicateField(String),
    #[error("authorization timestamp is not a unix time in seconds")]
    BadTimestamp,
}

/// The `Authorization: WECHATPAY2-SHA256-RSA2048 mchid="…",nonce_str="…",…` header.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthorizationHeader {
    pub mchid: String,
    pub nonce_str: String,
    pub timestamp: i64,
    pub serial_no: String,
    pub signature: String,
}

impl fmt::Debug for AuthorizationHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The signature is not a secret, but it is noise in logs; everything else is useful.
        f.debug_struct("AuthorizationHeader")
            .field("mchid", &self.mchid)
            .field("nonce_str", &self.nonce_str)
            .field("timestamp", &self.timestamp)
            .field("serial_no", &self.serial_no)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for AuthorizationHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{AUTH_SCHEME} mchid=\"{}\",nonce_str=\"{}\",timestamp=\"{}\",serial_no=\"{}\",signature=\"{}\"",
            self.mchid, self.nonce_str, self.timestamp, self.serial_no, self.signature
        )
    }
}

impl AuthorizationHeader {
    /// Signs a request and builds its header.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        signer: &RsaSigner,
        mchid: &str,
        serial_no: &str,
        method: &str,
        path_and_query: &str,
        timestamp: i64,
        nonce: &str,
        body: &[u8],
    ) -> Self {
        let msg = request_message(method, path_and_query, timestamp, nonce, body);
        Self {
            mchid: mchid.to_owned(),
            nonce_str: nonce.to_owned(),
            timestamp,
            serial_no: serial_no.to_owned(),
            signature: signer.sign(&msg),
        }
    }

    /// Checks the header's signature for a request (the sandbox's side). The caller checks the
    /// timestamp window and picks `key` by `serial_no`.
    pub fn verify(
        &self,
        key: &RsaVerifierKey,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<(), VerifyError> {
        let msg = request_message(method, path_and_query, self.timestamp, &self.nonce_str, body);
        key.verify(&msg, &self.signature)
    }

    /// Parses a header value. Fields may come in any order, separated by commas with optional
    /// spaces; values are double-quoted; unknown fields are ignored, repeated ones refused.
    pub fn parse(value: &str) -> Result<Self, AuthError> {
        let rest = value.trim().strip_prefix(AUTH_SCHEME).ok_or(AuthError::WrongScheme)?;
        if !rest.starts_with([' ', '\t']) {
            return Err(AuthError::WrongScheme);
        }
        let mut rest = rest.trim_start();
        let mut fields: [Option<&str>; 5] = [None; 5];
        const NAMES: [&str; 5] = ["mchid", "nonce_str", "timestamp", "serial_no", "signature"];
        while !rest.is_empty() {
            let (name, after) =
                rest.split_once('=').ok_or_else(|| AuthError::Malformed("expected name=\"value\"".into()))?;
            let name = name.trim();
            let after = after
                .trim_start()
                .strip_prefix('"')
                .ok_or_else(|| AuthError::Malformed(format!("value of {name} is not quoted")))?;
            let (val, after) = after
                .split_once('"')
                .ok_or_else(|| AuthError::Malformed(format!("value of {name} is unterminated")))?;
            if let Some(slot) = NAMES.iter().position(|n| *n == name)
                && fields[slot].replace(val).is_some()
            {
                return Err(AuthError::DuplicateField(name.to_owned()));
            }
            let after = after.trim_start();
            rest = match after.strip_prefix(',') {
                Some(r) => r.trim_start(),
                None if after.is_empty() => after,
                None => return Err(AuthError::Malformed("expected a comma".into())),
            };
        }
        let take = |i: usize| fields[i].ok_or(AuthError::MissingField(NAMES[i]));
        let ts = take(2)?;
        if ts.is_empty() || !ts.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AuthError::BadTimestamp);
        }
        Ok(Self {
            mchid: take(0)?.to_owned(),
            nonce_str: take(1)?.to_owned(),
            timestamp: ts.parse().map_err(|_| AuthError::BadTimestamp)?,
            serial_no: take(3)?.to_owned(),
            signature: take(4)?.to_owned(),
        })
    }
}

impl std::str::FromStr for AuthorizationHeader {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_the_documented_layout() {
        assert_eq!(
            request_message("GET", "/v3/certificates", 1554208460, "N", b""),
            b"GET\n/v3/certificates\n1554208460\nN\n\n"
        );
        assert_eq!(response_message(1, "n", b"{}"), b"1\nn\n{}\n");
    }

    #[test]
    fn nonce_is_32_upper_alnum() {
        let a = nonce_str();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()));
        assert_ne!(a, nonce_str());
    }

    #[test]
    fn header_parse_rejects_garbage() {
        assert_eq!(AuthorizationHeader::parse("Bearer x"), Err(AuthError::WrongScheme));
        assert_eq!(AuthorizationHeader::parse("WECHATPAY2-SHA256-RSA2048X mchid=\"1\""), Err(AuthError::WrongScheme));
        assert_eq!(
            AuthorizationHeader::parse("WECHATPAY2-SHA256-RSA2048 mchid=\"1\""),
            Err(AuthError::MissingField("timestamp"))
        );
        assert!(matches!(
            AuthorizationHeader::parse("WECHATPAY2-SHA256-RSA2048 mchid=1"),
            Err(AuthError::Malformed(_))
        ));
        assert_eq!(
            AuthorizationHeader::parse(
                "WECHATPAY2-SHA256-RSA2048 mchid=\"1\",mchid=\"2\",nonce_str=\"n\",timestamp=\"1\",serial_no=\"s\",signature=\"x\""
            ),
            Err(AuthError::DuplicateField("mchid".into()))
        );
        assert_eq!(
            AuthorizationHeader::parse(
                "WECHATPAY2-SHA256-RSA2048 mchid=\"1\",nonce_str=\"n\",timestamp=\"-1\",serial_no=\"s\",signature=\"x\""
            ),
            Err(AuthError::BadTimestamp)
        );
    }
}
