//! The development identity: merchant and platform keys, ids and secrets, written to a
//! directory as separate files (like the files a real merchant downloads) plus a
//! `paystream.toml` that points paystream at the sandbox.

use std::fmt;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use wechat::{RsaSigner, RsaVerifierKey};

use crate::util::{ALNUM, DIGITS, UPPER_HEX, random_string};

/// Where `paystream.toml` sends WeChat's callbacks unless told otherwise: paystream's ingress
/// on its default port, at the looklook callback path (DESIGN.md §5).
pub const DEFAULT_NOTIFY_URL: &str = "http://127.0.0.1:8080/payment/v1/thirdPayment/thirdPaymentWxPayCallback";

/// The listen address written into `paystream.toml` by `init` when none is given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

/// The config file written next to the keys.
pub const CONFIG_FILE: &str = "paystream.toml";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0} already holds an identity (pass force to overwrite it)")]
    AlreadyInitialized(PathBuf),
    #[error("key: {0}")]
    Key(#[from] wechat::KeyError),
}

/// Options of [`init`].
#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    /// Address the sandbox will listen on; the base URLs in `paystream.toml` point there.
    /// Defaults to [`DEFAULT_LISTEN`]. Serving rewrites them with the bound address anyway.
    pub listen: Option<SocketAddr>,
    /// `wechat.notify_url` in `paystream.toml`; defaults to [`DEFAULT_NOTIFY_URL`].
    pub notify_url: Option<String>,
    /// Overwrite an identity already in the directory.
    pub force: bool,
}

/// A complete merchant + WeChat identity. `Debug` hides every secret.
#[derive(Clone)]
pub struct Identity {
    /// Directory it was written to or loaded from.
    pub dir: PathBuf,
    pub mchid: String,
    pub appid: String,
    /// Merchant API key (apiclient_key.pem), PKCS#8 PEM.
    pub merchant_private_key_pem: String,
    /// Merchant certificate serial, 40 upper-case hex.
    pub merchant_serial_no: String,
    /// WeChat Pay's signing key, PKCS#8 PEM.
    pub platform_private_key_pem: String,
    /// WeChat Pay's public key (SPKI PEM), what a merchant downloads in public-key mode.
    pub platform_public_key_pem: String,
    /// `PUB_KEY_ID_` + digits.
    pub platform_public_key_id: String,
    /// 32 ASCII characters.
    pub apiv3_key: String,
    pub miniprogram_secret: String,
    pub sms_secret_id: String,
    pub sms_secret_key: String,
    pub sms_sdk_app_id: String,
    pub sms_sign_name: String,
    pub notify_url: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("dir", &self.dir)
            .field("mchid", &self.mchid)
            .field("appid", &self.appid)
            .field("merchant_serial_no", &self.merchant_serial_no)
            .field("platform_public_key_id", &self.platform_public_key_id)
            .field("sms_secret_id", &self.sms_secret_id)
            .finish_non_exhaustive()
    }
}

// File names inside the identity directory (one value per file, trailing newline ignored).
const F_MCHID: &str = "mchid";
const F_APPID: &str = "appid";
const F_MERCHANT_KEY: &str = "merchant_private_key.pem";
const F_MERCHANT_SERIAL: &str = "merchant_serial_no";
const F_PLATFORM_KEY: &str = "platform_private_key.pem";
const F_PLATFORM_PUB: &str = "platform_public_key.pem";
const F_PLATFORM_PUB_ID: &str = "platform_public_key_id";
const F_APIV3: &str = "apiv3_key";
const F_MP_SECRET: &str = "miniprogram_secret";
const F_SMS_ID: &str = "sms_secret_id";
const F_SMS_KEY: &str = "sms_secret_key";
const F_SMS_APP: &str = "sms_sdk_app_id";
const F_SMS_SIGN: &str = "sms_sign_name";
const F_NOTIFY: &str = "notify_url";

impl Identity {
    /// A fresh random identity (two RSA-2048 key generations: tens of milliseconds).
    pub fn generate(dir: &Path, notify_url: Option<String>) -> Result<Self, IdentityError> {
        let merchant = RsaSigner::generate()?;
        let platform = RsaSigner::generate()?;
        Ok(Self {
            dir: dir.to_path_buf(),
            mchid: format!("19{}", random_string(DIGITS, 8)),
            appid: format!("wx{}", random_string(b"0123456789abcdef", 16)),
            merchant_private_key_pem: merchant.to_pkcs8_pem(),
            merchant_serial_no: random_string(UPPER_HEX, 40),
            platform_private_key_pem: platform.to_pkcs8_pem(),
            platform_public_key_pem: platform.public_key_spki_pem(),
            platform_public_key_id: format!("PUB_KEY_ID_01{}", random_string(DIGITS, 26)),
            apiv3_key: random_string(ALNUM, 32),
            miniprogram_secret: random_string(b"0123456789abcdef", 32),
            sms_secret_id: format!("AKID{}", random_string(ALNUM, 32)),
            sms_secret_key: random_string(ALNUM, 32),
            sms_sdk_app_id: format!("1400{}", random_string(DIGITS, 6)),
            sms_sign_name: "paystream".to_owned(),
            notify_url: notify_url.unwrap_or_else(|| DEFAULT_NOTIFY_URL.to_owned()),
        })
    }

    /// Reads an identity written by [`init`] and checks that the keys parse.
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let read = |name: &str| read_value(&dir.join(name));
        let id = Self {
            dir: dir.to_path_buf(),
            mchid: read(F_MCHID)?,
            appid: read(F_APPID)?,
            merchant_private_key_pem: read(F_MERCHANT_KEY)?,
            merchant_serial_no: read(F_MERCHANT_SERIAL)?,
            platform_private_key_pem: read(F_PLATFORM_KEY)?,
            platform_public_key_pem: read(F_PLATFORM_PUB)?,
            platform_public_key_id: read(F_PLATFORM_PUB_ID)?,
            apiv3_key: read(F_APIV3)?,
            miniprogram_secret: read(F_MP_SECRET)?,
            sms_secret_id: read(F_SMS_ID)?,
            sms_secret_key: read(F_SMS_KEY)?,
            sms_sdk_app_id: read(F_SMS_APP)?,
            sms_sign_name: read(F_SMS_SIGN)?,
            notify_url: read(F_NOTIFY).unwrap_or_else(|_| DEFAULT_NOTIFY_URL.to_owned()),
        };
        id.check()?;
        Ok(id)
    }

    fn check(&self) -> Result<(), IdentityError> {
        let invalid = |name: &str, message: &str| IdentityError::Invalid {
            path: self.dir.join(name),
            message: message.to_owned(),
        };
        if self.apiv3_key.len() != 32 {
            return Err(invalid(F_APIV3, "must be 32 bytes"));
        }
        if !self.platform_public_key_id.starts_with("PUB_KEY_ID_") {
            return Err(invalid(F_PLATFORM_PUB_ID, "must start with PUB_KEY_ID_"));
        }
        let platform = RsaSigner::from_pkcs8_pem(&self.platform_private_key_pem)?;
        let public = RsaVerifierKey::from_spki_pem(&self.platform_public_key_pem)?;
        if platform.public_key_spki_der() != public.spki_der() {
            return Err(invalid(F_PLATFORM_PUB, "is not the public half of platform_private_key.pem"));
        }
        RsaSigner::from_pkcs8_pem(&self.merchant_private_key_pem)?;
        Ok(())
    }

    /// The APIv3 key as AES-256 key bytes.
    pub fn apiv3_key_bytes(&self) -> [u8; 32] {
        let mut key = [0u8; 32];
        // `load` and `generate` guarantee 32 bytes; a hand-built identity with a wrong length
        // gets a zero-padded / truncated key, which then simply fails to decrypt.
        let src = self.apiv3_key.as_bytes();
        let n = src.len().min(32);
        key[..n].copy_from_slice(&src[..n]);
        key
    }

    /// The merchant's signer (what a merchant signs requests with).
    pub fn merchant_signer(&self) -> Result<RsaSigner, IdentityError> {
        Ok(RsaSigner::from_pkcs8_pem(&self.merchant_private_key_pem)?)
    }

    /// WeChat Pay's signer (what the sandbox signs answers and callbacks with).
    pub fn platform_signer(&self) -> Result<RsaSigner, IdentityError> {
        Ok(RsaSigner::from_pkcs8_pem(&self.platform_private_key_pem)?)
    }

    /// WeChat Pay's public key, for verifying the sandbox's answers.
    pub fn platform_verifier_key(&self) -> Result<RsaVerifierKey, IdentityError> {
        Ok(RsaVerifierKey::from_spki_pem(&self.platform_public_key_pem)?)
    }

    pub fn merchant_private_key_path(&self) -> PathBuf {
        self.dir.join(F_MERCHANT_KEY)
    }

    pub fn platform_public_key_path(&self) -> PathBuf {
        self.dir.join(F_PLATFORM_PUB)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    /// Writes every file of the identity into `self.dir` (secrets with mode 0600).
    pub fn write(&self) -> Result<(), IdentityError> {
        create_private_dir(&self.dir)?;
        let files: [(&str, &str, bool); 14] = [
            (F_MCHID, &self.mchid, false),
            (F_APPID, &self.appid, false),
            (F_MERCHANT_KEY, &self.merchant_private_key_pem, true),
            (F_MERCHANT_SERIAL, &self.merchant_serial_no, false),
            (F_PLATFORM_KEY, &self.platform_private_key_pem, true),
            (F_PLATFORM_PUB, &self.platform_public_key_pem, false),
            (F_PLATFORM_PUB_ID, &self.platform_public_key_id, false),
            (F_APIV3, &self.apiv3_key, true),
            (F_MP_SECRET, &self.miniprogram_secret, true),
            (F_SMS_ID, &self.sms_secret_id, false),
            (F_SMS_KEY, &self.sms_secret_key, true),
            (F_SMS_APP, &self.sms_sdk_app_id, false),
            (F_SMS_SIGN, &self.sms_sign_name, false),
            (F_NOTIFY, &self.notify_url, false),
        ];
        for (name, value, secret) in files {
            let mut text = value.to_owned();
            if !text.ends_with('\n') {
                text.push('\n');
            }
            write_file(&self.dir.join(name), text.as_bytes(), secret)?;
        }
        Ok(())
    }

    /// The `paystream.toml` text pointing at a sandbox served on `addr`. Its two sections are
    /// exactly `wechat::WechatConfig` and `wechat::SmsConfig` (both `deny_unknown_fields`).
    pub fn paystream_toml(&self, addr: SocketAddr) -> String {
        let base = format!("http://{addr}");
        let q = toml_string;
        format!(
            "# Written by `paystream sandbox`: points paystream at the WeChat sandbox on {addr}.\n\
             # Serving the sandbox rewrites this file with the address it is bound to.\n\
             [wechat]\n\
             mchid = {mchid}\n\
             appid = {appid}\n\
             merchant_serial_no = {serial}\n\
             merchant_private_key_path = {key_path}\n\
             apiv3_key = {apiv3}\n\
             platform_public_key_id = {pub_id}\n\
             platform_public_key_path = {pub_path}\n\
             notify_url = {notify}\n\
             pay_base_url = {base}\n\
             miniprogram_base_url = {base}\n\
             miniprogram_secret = {mp_secret}\n\
             request_timeout_ms = 5000\n\
             allow_insecure_loopback = true\n\
             \n\
             [sms]\n\
             base_url = {base}\n\
             secret_id = {sms_id}\n\
             secret_key = {sms_key}\n\
             sdk_app_id = {sms_app}\n\
             sign_name = {sms_sign}\n\
             region = \"ap-guangzhou\"\n",
            mchid = q(&self.mchid),
            appid = q(&self.appid),
            serial = q(&self.merchant_serial_no),
            key_path = q(&absolute(&self.merchant_private_key_path()).display().to_string()),
            apiv3 = q(&self.apiv3_key),
            pub_id = q(&self.platform_public_key_id),
            pub_path = q(&absolute(&self.platform_public_key_path()).display().to_string()),
            notify = q(&self.notify_url),
            base = q(&base),
            mp_secret = q(&self.miniprogram_secret),
            sms_id = q(&self.sms_secret_id),
            sms_key = q(&self.sms_secret_key),
            sms_app = q(&self.sms_sdk_app_id),
            sms_sign = q(&self.sms_sign_name),
        )
    }

    /// Writes `paystream.toml` (mode 0600: it holds the APIv3 key and other secrets).
    pub fn write_config(&self, addr: SocketAddr) -> Result<PathBuf, IdentityError> {
        let path = self.config_path();
        write_file(&path, self.paystream_toml(addr).as_bytes(), true)?;
        Ok(path)
    }
}

/// Writes a new identity and `paystream.toml` into `dir`.
pub fn init(dir: &Path, options: &InitOptions) -> Result<Identity, IdentityError> {
    if !options.force && dir.join(F_MCHID).exists() {
        return Err(IdentityError::AlreadyInitialized(dir.to_path_buf()));
    }
    let identity = Identity::generate(dir, options.notify_url.clone())?;
    identity.write()?;
    let listen = options.listen.unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default address"));
    identity.write_config(listen)?;
    Ok(identity)
}

/// Loads the identity in `dir`, creating one first if the directory holds none.
pub fn load_or_init(dir: &Path) -> Result<Identity, IdentityError> {
    if dir.join(F_MCHID).exists() { Identity::load(dir) } else { init(dir, &InitOptions::default()) }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A TOML basic string (quotes and backslashes escaped).
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn read_value(path: &Path) -> Result<String, IdentityError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| IdentityError::Io { path: path.to_path_buf(), source })?;
    let value = if text.contains("-----BEGIN") { text } else { text.trim().to_owned() };
    if value.is_empty() {
        return Err(IdentityError::Invalid { path: path.to_path_buf(), message: "is empty".into() });
    }
    Ok(value)
}

fn create_private_dir(dir: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| IdentityError::Io { path: dir.to_path_buf(), source })
}

/// Writes via a temporary file and a rename so a reader never sees half a key, with the mode
/// set at creation (no window where a secret is world-readable).
fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), IdentityError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let io = |source| IdentityError::Io { path: path.to_path_buf(), source };
    let mode = if secret { 0o600 } else { 0o644 };
    // Unique per process and call: two sandboxes in one test process may rewrite the same file.
    let tmp = path.with_extension(format!("tmp{}-{}", std::process::id(), crate::util::next_seq()));
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(io)?;
    // An existing tmp file keeps its old mode: set it explicitly.
    f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
