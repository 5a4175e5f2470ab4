//! RSA keys: the merchant's signing key and WeChat's verifying keys.
//!
//! Everything is RSASSA-PKCS1-v1_5 with SHA-256 over RSA-2048 (or larger), done by aws-lc-rs.

use std::fmt;

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{KeyPair as _, ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::pay::verify::VerifyError;
use crate::pem;

/// Why a key could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key PEM: {0}")]
    Pem(#[from] pem::PemError),
    #[error("no PRIVATE KEY or RSA PRIVATE KEY block in the PEM text")]
    NoPrivateKey,
    #[error("no PUBLIC KEY, RSA PUBLIC KEY or CERTIFICATE block in the PEM text")]
    NoPublicKey,
    #[error("key rejected: {0}")]
    Rejected(String),
    #[error("RSA key of {0} bits is too small: WeChat Pay uses RSA-2048")]
    TooSmall(usize),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("could not read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The merchant's RSA private key (apiclient_key.pem), used to sign requests and `paySign`.
///
/// The sandbox uses the same type for WeChat's platform key.
pub struct RsaSigner {
    key: KeyPair,
}

impl fmt::Debug for RsaSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material, not even the public half: the type name says enough.
        f.debug_struct("RsaSigner").field("bits", &(self.key.public_modulus_len() * 8)).finish_non_exhaustive()
    }
}

impl RsaSigner {
    /// Reads a PKCS#8 `PRIVATE KEY` PEM (what WeChat's certificate tool writes); a PKCS#1
    /// `RSA PRIVATE KEY` PEM is accepted too because `openssl genrsa` on old systems writes it.
    pub fn from_pkcs8_pem(pem_text: &str) -> Result<Self, KeyError> {
        let key = match pem::first_label(pem_text, &["PRIVATE KEY", "RSA PRIVATE KEY"]) {
            Some("PRIVATE KEY") => KeyPair::from_pkcs8(&pem::decode(pem_text, "PRIVATE KEY")?),
            Some(_) => KeyPair::from_der(&pem::decode(pem_text, "RSA PRIVATE KEY")?),
            None => return Err(KeyError::NoPrivateKey),
        }
        .map_err(|e| KeyError::Rejected(e.to_string()))?;
        Self::from_key_pair(key)
    }

    /// Reads a PKCS#8 DER private key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let key = KeyPair::from_pkcs8(der).map_err(|e| KeyError::Rejected(e.to_string()))?;
        Self::from_key_pair(key)
    }

    /// Reads the PEM file at `path`.
    pub fn from_pem_file(path: &std::path::Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| KeyError::Io { path: path.display().to_string(), source })?;
        Self::from_pkcs8_pem(&text)
    }

    fn from_key_pair(key: KeyPair) -> Result<Self, KeyError> {
        let bits = key.public_modulus_len() * 8;
        if bits < 2048 {
            return Err(KeyError::TooSmall(bits));
        }
        Ok(Self { key })
    }

    /// A fresh RSA-2048 key, for the sandbox and tests.
    pub fn generate() -> Result<Self, KeyError> {
        let key =
            KeyPair::generate(KeySize::Rsa2048).map_err(|_| KeyError::Rejected("RSA key generation failed".into()))?;
        Ok(Self { key })
    }

    /// PKCS#1 v1.5 SHA-256 signature of `msg`, base64 (standard alphabet, padded).
    pub fn sign(&self, msg: &[u8]) -> String {
        STANDARD.encode(self.sign_raw(msg))
    }

    /// The raw signature bytes.
    pub fn sign_raw(&self, msg: &[u8]) -> Vec<u8> {
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        // aws-lc-rs ignores the rng for PKCS#1 v1.5 (deterministic padding); the call can only
        // fail for a wrongly sized buffer, which `public_modulus_len` rules out.
        self.key
            .sign(&RSA_PKCS1_SHA256, &aws_lc_rs::rand::SystemRandom::new(), msg, &mut sig)
            .expect("RSA signing with a validated key and a modulus-sized buffer");
        sig
    }

    /// The public half as DER SubjectPublicKeyInfo.
    pub fn public_key_spki_der(&self) -> Vec<u8> {
        let der: PublicKeyX509Der<'static> =
            self.key.public_key().as_der().expect("DER encoding of a validated RSA public key");
        der.as_ref().to_vec()
    }

    /// The public half as a `PUBLIC KEY` PEM (the form WeChat hands out in public-key mode).
    pub fn public_key_spki_pem(&self) -> String {
        pem::encode(&self.public_key_spki_der(), "PUBLIC KEY")
    }

    /// The matching verifier key.
    pub fn verifier_key(&self) -> RsaVerifierKey {
        RsaVerifierKey::from_spki_der(&self.public_key_spki_der()).expect("a key's own public half parses")
    }

    /// The private key as a PKCS#8 `PRIVATE KEY` PEM. Write it only to files with mode 0600.
    pub fn to_pkcs8_pem(&self) -> String {
        let der: Pkcs8V1Der<'static> = self.key.as_der().expect("PKCS#8 encoding of a validated RSA key");
        pem::encode(der.as_ref(), "PRIVATE KEY")
    }
}

/// An RSA public key that checks WeChat's signatures (or, in the sandbox, the merchant's).
#[derive(Clone)]
pub struct RsaVerifierKey {
    key: ParsedPublicKey,
    spki_der: Vec<u8>,
}

impl fmt::Debug for RsaVerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RsaVerifierKey").finish_non_exhaustive()
    }
}

impl RsaVerifierKey {
    /// From a `PUBLIC KEY` (SubjectPublicKeyInfo) PEM; `RSA PUBLIC KEY` (PKCS#1) and
    /// `CERTIFICATE` PEMs are accepted too, since WeChat hands out both keys and certificates.
    pub fn from_spki_pem(pem_text: &str) -> Result<Self, KeyError> {
        match pem::first_label(pem_text, &["PUBLIC KEY", "RSA PUBLIC KEY", "CERTIFICATE"]) {
            Some("CERTIFICATE") => Self::from_certificate_pem(pem_text),
            Some(label) => Self::from_spki_der(&pem::decode(pem_text, label)?),
            None => Err(KeyError::NoPublicKey),
        }
    }

    /// From DER SubjectPublicKeyInfo (or PKCS#1 RSAPublicKey: aws-lc-rs takes both).
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        let key =
            ParsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, der).map_err(|e| KeyError::Rejected(e.to_string()))?;
        Ok(Self { key, spki_der: der.to_vec() })
    }

    /// Reads the PEM file at `path`.
    pub fn from_pem_file(path: &std::path::Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| KeyError::Io { path: path.display().to_string(), source })?;
        Self::from_spki_pem(&text)
    }

    /// From an X.509 `CERTIFICATE` PEM (a WeChat Pay platform certificate).
    pub fn from_certificate_pem(pem_text: &str) -> Result<Self, KeyError> {
        Self::from_certificate_der(&pem::decode(pem_text, "CERTIFICATE")?)
    }

    /// From a DER X.509 certificate: its subject public key.
    pub fn from_certificate_der(der: &[u8]) -> Result<Self, KeyError> {
        let spki = crate::pay::cert::subject_public_key_info(der).map_err(|e| KeyError::Certificate(e.to_string()))?;
        Self::from_spki_der(spki)
    }

    /// The key bytes as given (SPKI DER in the usual case).
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// Checks a base64 PKCS#1 v1.5 SHA-256 signature over `msg`.
    pub fn verify(&self, msg: &[u8], signature_b64: &str) -> Result<(), VerifyError> {
        let sig =
            STANDARD.decode(signature_b64).map_err(|_| VerifyError::Malformed("signature is not base64".into()))?;
        self.verify_raw(msg, &sig)
    }

    /// Checks raw signature bytes over `msg`.
    pub fn verify_raw(&self, msg: &[u8], signature: &[u8]) -> Result<(), VerifyError> {
        self.key.verify_sig(msg, signature).map_err(|_| VerifyError::BadSignature)
    }
}
