//! Small helpers: randomness, WeChat-shaped ids and times.

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, FixedOffset, Utc};

/// Fills a buffer from the system CSPRNG. Identity secrets come from here, so a weak source
/// would be a real problem: we fail loudly rather than fall back.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    aws_lc_rs::rand::fill(&mut buf).expect("the system random source is available");
    buf
}

/// `len` characters drawn uniformly from `alphabet` (rejection sampling keeps it unbiased).
pub(crate) fn random_string(alphabet: &[u8], len: usize) -> String {
    let limit = 256 - (256 % alphabet.len());
    let mut out = String::with_capacity(len);
    while out.len() < len {
        for b in random_bytes::<64>() {
            if out.len() == len {
                break;
            }
            if usize::from(b) < limit {
                out.push(char::from(alphabet[usize::from(b) % alphabet.len()]));
            }
        }
    }
    out
}

pub(crate) const DIGITS: &[u8] = b"0123456789";
pub(crate) const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
pub(crate) const UPPER_HEX: &[u8] = b"0123456789ABCDEF";

/// The 12-character nonce WeChat puts in encrypted resources (used raw as the GCM nonce).
pub(crate) fn resource_nonce() -> String {
    random_string(ALNUM, 12)
}

/// China Standard Time, the offset WeChat writes in every timestamp.
pub(crate) fn cst() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).expect("+08:00 is a valid offset")
}

/// RFC 3339 with +08:00 and second precision, as in `success_time` and `create_time`.
pub(crate) fn wechat_time(t: DateTime<Utc>) -> String {
    t.with_timezone(&cst()).format("%Y-%m-%dT%H:%M:%S%:z").to_string()
}

pub(crate) fn now_wechat_time() -> String {
    wechat_time(Utc::now())
}

/// A process-wide sequence so generated ids never collide inside one run even when two
/// are made in the same second.
static SEQ: AtomicU64 = AtomicU64::new(1);

pub(crate) fn next_seq() -> u64 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// 28 digits: `4200` + yyyymmdd + 16 digits, the shape of a real transaction_id.
pub(crate) fn transaction_id() -> String {
    let day = Utc::now().with_timezone(&cst()).format("%Y%m%d");
    format!("4200{day}{:08}{}", next_seq() % 100_000_000, random_string(DIGITS, 8))
}

/// 29 digits starting with 50, like a real refund_id.
pub(crate) fn refund_id() -> String {
    format!("50{:010}{}", next_seq() % 10_000_000_000, random_string(DIGITS, 17))
}

/// `wx` + ddHHmmss-ish + random, 36 characters, like a real prepay_id.
pub(crate) fn prepay_id() -> String {
    let stamp = Utc::now().with_timezone(&cst()).format("%d%H%M%S");
    format!("wx{stamp}{}", random_string(b"0123456789abcdef", 26))
}

/// An id for the `Request-ID` response header.
pub(crate) fn request_id() -> String {
    let stamp = Utc::now().timestamp();
    format!("{:X}{}", stamp, random_string(UPPER_HEX, 24))
}

pub(crate) fn unix_now() -> i64 {
    Utc::now().timestamp()
}

/// SHA-256 digest.
pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

pub(crate) fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    aws_lc_rs::hmac::sign(&k, data).as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_wechat_shapes() {
        let t = transaction_id();
        assert_eq!(t.len(), 28, "{t}");
        assert!(t.bytes().all(|b| b.is_ascii_digit()));
        let r = refund_id();
        assert_eq!(r.len(), 29, "{r}");
        assert!(r.starts_with("50"));
        assert_eq!(prepay_id().len(), 36);
        assert_eq!(resource_nonce().len(), 12);
        assert!(wechat_time(Utc::now()).ends_with("+08:00"));
    }
}
