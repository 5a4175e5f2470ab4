//! A tiny PEM codec.
//!
//! aws-lc-rs only takes DER, and the only PEM we meet is the plain RFC 7468 kind (one labelled
//! block of base64, no encryption headers). A dozen lines here are cheaper than another crate
//! (`pem`, `rustls-pemfile`) in the build and in the audit.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Why a PEM text could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PemError {
    #[error("no `-----BEGIN {0}-----` line")]
    MissingBegin(String),
    #[error("no `-----END {0}-----` line")]
    MissingEnd(String),
    #[error("the body of the {0} block is not base64")]
    BadBase64(String),
}

/// Decodes the first block labelled `label` (for example `PRIVATE KEY`) in `text`.
pub fn decode(text: &str, label: &str) -> Result<Vec<u8>, PemError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin).ok_or_else(|| PemError::MissingBegin(label.to_owned()))? + begin.len();
    let stop = text[start..].find(&end).ok_or_else(|| PemError::MissingEnd(label.to_owned()))? + start;
    let body: String = text[start..stop].chars().filter(|c| !c.is_ascii_whitespace()).collect();
    STANDARD.decode(body).map_err(|_| PemError::BadBase64(label.to_owned()))
}

/// Which of `labels` labels the first block found in `text`, if any.
pub fn first_label<'a>(text: &str, labels: &[&'a str]) -> Option<&'a str> {
    labels
        .iter()
        .filter_map(|l| text.find(&format!("-----BEGIN {l}-----")).map(|at| (at, *l)))
        .min_by_key(|(at, _)| *at)
        .map(|(_, l)| l)
}

/// Encodes `der` as one PEM block, lines of 64 characters as OpenSSL writes them.
pub fn encode(der: &[u8], label: &str) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let der: Vec<u8> = (0..=255u8).collect();
        let pem = encode(&der, "PUBLIC KEY");
        assert!(pem.lines().all(|l| l.len() <= 64));
        assert_eq!(decode(&pem, "PUBLIC KEY").unwrap(), der);
        assert_eq!(decode(&pem, "PRIVATE KEY"), Err(PemError::MissingBegin("PRIVATE KEY".into())));
        assert_eq!(decode("-----BEGIN X-----\n!!\n-----END X-----", "X"), Err(PemError::BadBase64("X".into())));
        assert_eq!(decode("-----BEGIN X-----\nAAAA\n", "X"), Err(PemError::MissingEnd("X".into())));
        assert_eq!(first_label(&pem, &["PRIVATE KEY", "PUBLIC KEY"]), Some("PUBLIC KEY"));
    }
}
