//! AEAD_AES_256_GCM as WeChat uses it for callback resources and platform certificates:
//! key = the 32-byte APIv3 key, nonce = 12 ASCII characters used as bytes, AAD =
//! `associated_data`, ciphertext = base64(ct || 16-byte tag).

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Why a resource could not be encrypted or decrypted.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("nonce must be exactly 12 bytes, got {0}")]
    BadNonce(usize),
    #[error("ciphertext is not base64")]
    BadBase64,
    #[error("ciphertext is shorter than the 16-byte tag")]
    TooShort,
    #[error("decryption failed: wrong key, nonce, associated data or tampered ciphertext")]
    Decrypt,
    #[error("unsupported algorithm {0} (expected AEAD_AES_256_GCM)")]
    Algorithm(String),
    #[error("encryption failed")]
    Encrypt,
}

/// The only algorithm WeChat Pay v3 uses for resources.
pub const ALGORITHM: &str = "AEAD_AES_256_GCM";

fn key_and_nonce(apiv3_key: &[u8; 32], nonce: &str) -> Result<(LessSafeKey, Nonce), CryptoError> {
    let nonce: [u8; NONCE_LEN] = nonce.as_bytes().try_into().map_err(|_| CryptoError::BadNonce(nonce.len()))?;
    // A 32-byte key is exactly what AES-256 takes, so this cannot fail.
    let key = UnboundKey::new(&AES_256_GCM, apiv3_key).map_err(|_| CryptoError::Encrypt)?;
    Ok((LessSafeKey::new(key), Nonce::assume_unique_for_key(nonce)))
}

/// Encrypts `plaintext`; returns base64(ct || tag). The caller must never reuse a nonce with
/// the same key (use [`crate::nonce_str`]`[..12]` or another random 12-character string).
pub fn encrypt_resource(
    apiv3_key: &[u8; 32],
    nonce: &str,
    associated_data: &str,
    plaintext: &[u8],
) -> Result<String, CryptoError> {
    let (key, nonce) = key_and_nonce(apiv3_key, nonce)?;
    let mut buf = plaintext.to_vec();
    key.seal_in_place_append_tag(nonce, Aad::from(associated_data.as_bytes()), &mut buf)
        .map_err(|_| CryptoError::Encrypt)?;
    Ok(STANDARD.encode(buf))
}

/// Decrypts base64(ct || tag) and checks the tag.
pub fn decrypt_resource(
    apiv3_key: &[u8; 32],
    nonce: &str,
    associated_data: &str,
    ciphertext_b64: &str,
) -> Result<Vec<u8>, CryptoError> {
    let (key, nonce) = key_and_nonce(apiv3_key, nonce)?;
    let mut buf = STANDARD.decode(ciphertext_b64.trim()).map_err(|_| CryptoError::BadBase64)?;
    if buf.len() < AES_256_GCM.tag_len() {
        return Err(CryptoError::TooShort);
    }
    let plain_len = key
        .open_in_place(nonce, Aad::from(associated_data.as_bytes()), &mut buf)
        .map_err(|_| CryptoError::Decrypt)?
        .len();
    buf.truncate(plain_len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let key = [7u8; 32];
        let ct = encrypt_resource(&key, "abcdefghijkl", "transaction", b"{}").unwrap();
        assert_eq!(decrypt_resource(&key, "abcdefghijkl", "transaction", &ct).unwrap(), b"{}");
        assert_eq!(decrypt_resource(&key, "abcdefghijkl", "refund", &ct), Err(CryptoError::Decrypt));
        assert_eq!(decrypt_resource(&key, "short", "", &ct), Err(CryptoError::BadNonce(5)));
        assert_eq!(decrypt_resource(&key, "abcdefghijkl", "", "%%"), Err(CryptoError::BadBase64));
        assert_eq!(decrypt_resource(&key, "abcdefghijkl", "", "AAAA"), Err(CryptoError::TooShort));
    }
}
