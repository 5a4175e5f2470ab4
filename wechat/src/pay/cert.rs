//! X.509 platform certificates: only the subject public key and serial are used.
//!
//! Trust comes from the channel (the `/v3/certificates` answer is signed and its payload
//! AES-GCM-encrypted under the APIv3 key), so no chain validation happens here.

use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a certificate could not be read.
#[derive(Debug, thiserror::Error)]
#[error("not a DER X.509 certificate: {0}")]
pub struct CertError(String);

/// The DER SubjectPublicKeyInfo inside a DER certificate.
pub fn subject_public_key_info(der: &[u8]) -> Result<&[u8], CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError(e.to_string()))?;
    Ok(cert.tbs_certificate.subject_pki.raw)
}

/// The certificate serial as upper-case hex, the form WeChat puts in `Wechatpay-Serial`.
pub fn serial_hex(der: &[u8]) -> Result<String, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError(e.to_string()))?;
    Ok(hex::encode_upper(cert.tbs_certificate.raw_serial()))
}
