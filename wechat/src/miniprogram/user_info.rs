//! The user info a mini-program gets from WeChat's client (`wx.getUserInfo`, `open-data`) and passes to its server
//! as `encryptedData` and `iv`: base64(AES-128-CBC(key = the login's `session_key`, iv, PKCS#7(JSON))). The JSON
//! carries a `watermark` naming the appid it was issued for; a server must refuse one issued for another
//! mini-program (someone else's session replayed at us). WeChat documents the scheme as "开放数据校验与解密".
//!
//! AES-CBC comes from aws-lc-rs, the crate that already does the AES-GCM of WeChat Pay here.

use aws_lc_rs::cipher::{
    AES_128, DecryptionContext, PaddedBlockDecryptingKey, PaddedBlockEncryptingKey, UnboundCipherKey,
};
use aws_lc_rs::iv::FixedLength;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// What a server may keep of the decrypted user info (WeChat sends more: gender, city, language …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub nick_name: String,
    pub avatar_url: String,
}

/// The plaintext as WeChat's client produces it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserInfoPlain {
    #[serde(rename = "nickName", default)]
    pub nick_name: String,
    #[serde(rename = "avatarUrl", default)]
    pub avatar_url: String,
    pub watermark: Watermark,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Watermark {
    pub appid: String,
    pub timestamp: i64,
}

/// Why `encryptedData` was refused. Never carries the data, the key or the user's details.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserInfoError {
    #[error("{0} is not base64")]
    BadBase64(&'static str),
    #[error("iv must be 16 bytes, got {0}")]
    BadIv(usize),
    #[error("session_key must be 16 bytes")]
    BadKey,
    #[error("encryptedData does not decrypt with this login's session key (tampered, or from another login)")]
    Decrypt,
    #[error("the decrypted user info is not the JSON WeChat sends")]
    NotJson,
    #[error("the user info was issued for another mini-program")]
    WrongApp,
}

fn key(session_key: &str) -> Result<UnboundCipherKey, UserInfoError> {
    let key = STANDARD.decode(session_key).map_err(|_| UserInfoError::BadKey)?;
    if key.len() != 16 {
        return Err(UserInfoError::BadKey);
    }
    UnboundCipherKey::new(&AES_128, &key).map_err(|_| UserInfoError::BadKey)
}

/// Decrypts `encrypted_data` with the login's `session_key` and `iv` (all base64, as WeChat hands them over) and
/// checks that it was issued for `appid`.
pub fn decrypt_user_info(
    session_key: &SecretString,
    encrypted_data: &str,
    iv: &str,
    appid: &str,
) -> Result<UserInfo, UserInfoError> {
    let iv = STANDARD.decode(iv).map_err(|_| UserInfoError::BadBase64("iv"))?;
    let iv: [u8; 16] = iv.as_slice().try_into().map_err(|_| UserInfoError::BadIv(iv.len()))?;
    let mut data = STANDARD.decode(encrypted_data).map_err(|_| UserInfoError::BadBase64("encryptedData"))?;
    let key =
        PaddedBlockDecryptingKey::cbc_pkcs7(key(session_key.expose_secret())?).map_err(|_| UserInfoError::BadKey)?;
    let plain =
        key.decrypt(&mut data, DecryptionContext::Iv128(FixedLength::from(iv))).map_err(|_| UserInfoError::Decrypt)?;
    let info: UserInfoPlain = serde_json::from_slice(plain).map_err(|_| UserInfoError::NotJson)?;
    if info.watermark.appid != appid {
        return Err(UserInfoError::WrongApp);
    }
    Ok(UserInfo { nick_name: info.nick_name, avatar_url: info.avatar_url })
}

/// What WeChat's client does (for the sandbox and tests): encrypts `info` with `session_key` (base64) under a fresh
/// random iv; returns `(encryptedData, iv)`, both base64.
pub fn encrypt_user_info(session_key: &str, info: &UserInfoPlain) -> Result<(String, String), UserInfoError> {
    let key = PaddedBlockEncryptingKey::cbc_pkcs7(key(session_key)?).map_err(|_| UserInfoError::BadKey)?;
    let mut data = serde_json::to_vec(info).map_err(|_| UserInfoError::NotJson)?;
    let context = key.encrypt(&mut data).map_err(|_| UserInfoError::Decrypt)?;
    let iv: &[u8] = (&context).try_into().map_err(|_| UserInfoError::BadIv(0))?;
    Ok((STANDARD.encode(&data), STANDARD.encode(iv)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "tiihtNczf5v6AKRyjwEUhQ=="; // 16 bytes, base64

    fn plain(appid: &str) -> UserInfoPlain {
        UserInfoPlain {
            nick_name: "Band".into(),
            avatar_url: "https://thirdwx.qlogo.cn/mmopen/vi_32/x/132".into(),
            watermark: Watermark { appid: appid.into(), timestamp: 1_477_314_187 },
        }
    }

    #[test]
    fn round_trip_and_every_refusal() {
        let secret = SecretString::from(KEY.to_owned());
        let (data, iv) = encrypt_user_info(KEY, &plain("wx4f4bc4dec97d474b")).unwrap();
        let info = decrypt_user_info(&secret, &data, &iv, "wx4f4bc4dec97d474b").unwrap();
        assert_eq!(info.nick_name, "Band");
        assert_eq!(decrypt_user_info(&secret, &data, &iv, "wxanother").unwrap_err(), UserInfoError::WrongApp);
        // One flipped bit in the last block breaks the padding (or the JSON): never a silent success.
        let mut bytes = STANDARD.decode(&data).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let tampered = STANDARD.encode(&bytes);
        assert!(matches!(
            decrypt_user_info(&secret, &tampered, &iv, "wx4f4bc4dec97d474b"),
            Err(UserInfoError::Decrypt | UserInfoError::NotJson)
        ));
        let other = SecretString::from(STANDARD.encode([7u8; 16]));
        assert!(decrypt_user_info(&other, &data, &iv, "wx4f4bc4dec97d474b").is_err());
        assert_eq!(decrypt_user_info(&secret, &data, "AAAA", "x").unwrap_err(), UserInfoError::BadIv(3));
        assert_eq!(decrypt_user_info(&secret, "%%", &iv, "x").unwrap_err(), UserInfoError::BadBase64("encryptedData"));
    }
}
