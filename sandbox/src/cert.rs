//! A self-signed X.509 certificate around the platform public key, for certificate mode
//! (`GET /v3/certificates`). Built by hand in DER: the sandbox needs one tiny certificate and
//! no certificate-building crate is in the dependency set.

use chrono::{DateTime, Duration, Utc};
use wechat::RsaSigner;

use crate::util::{sha256, wechat_time};

/// The platform certificate and what `/v3/certificates` lists about it.
#[derive(Debug, Clone)]
pub(crate) struct PlatformCertificate {
    /// 40 upper-case hex digits, the `Wechatpay-Serial` of certificate mode.
    pub serial_no: String,
    pub pem: String,
    pub effective_time: String,
    pub expire_time: String,
}

impl PlatformCertificate {
    /// Issues a certificate for `platform`'s public key. The serial is derived from the key so
    /// it stays the same across restarts of one identity.
    pub fn issue(platform: &RsaSigner, mchid: &str) -> Self {
        let spki = platform.public_key_spki_der();
        let mut serial = sha256(&spki)[..20].to_vec();
        // A positive INTEGER without a leading zero byte: top bit clear, top byte non-zero.
        serial[0] = (serial[0] & 0x7f) | 0x10;
        let not_before = Utc::now() - Duration::days(1);
        let not_after = not_before + Duration::days(5 * 365);
        let sig_alg = seq(&[oid(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b]), vec![0x05, 0x00]]);
        let tbs = seq(&[
            tlv(0xa0, &tlv(0x02, &[2])),
            tlv(0x02, &serial),
            sig_alg.clone(),
            name(&[("CN", "Tenpay.com Root CA (sandbox)")]),
            seq(&[utc_time(not_before), utc_time(not_after)]),
            name(&[("C", "CN"), ("O", "Tenpay.com (sandbox)"), ("OU", mchid), ("CN", "Tenpay.com")]),
            spki,
        ]);
        let signature = platform.sign_raw(&tbs);
        let mut bits = vec![0u8];
        bits.extend_from_slice(&signature);
        let der = seq(&[tbs, sig_alg, tlv(0x03, &bits)]);
        Self {
            serial_no: hex::encode_upper(&serial),
            pem: wechat::pem::encode(&der, "CERTIFICATE"),
            effective_time: wechat_time(not_before),
            expire_time: wechat_time(not_after),
        }
    }
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

fn seq(parts: &[Vec<u8>]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

fn oid(encoded: &[u8]) -> Vec<u8> {
    tlv(0x06, encoded)
}

fn name(rdns: &[(&str, &str)]) -> Vec<u8> {
    let parts: Vec<Vec<u8>> = rdns
        .iter()
        .map(|(kind, value)| {
            let attr = match *kind {
                "C" => 6,
                "O" => 10,
                "OU" => 11,
                _ => 3, // CN
            };
            // C is a PrintableString by RFC 5280; the rest UTF8String.
            let value = if *kind == "C" { tlv(0x13, value.as_bytes()) } else { tlv(0x0c, value.as_bytes()) };
            tlv(0x31, &seq(&[oid(&[0x55, 0x04, attr]), value]))
        })
        .collect();
    seq(&parts)
}

fn utc_time(t: DateTime<Utc>) -> Vec<u8> {
    tlv(0x17, t.format("%y%m%d%H%M%SZ").to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_parses_and_carries_the_key() {
        let signer = RsaSigner::generate().unwrap();
        let cert = PlatformCertificate::issue(&signer, "1900000001");
        assert_eq!(cert.serial_no.len(), 40);
        let key = wechat::RsaVerifierKey::from_certificate_pem(&cert.pem).unwrap();
        assert_eq!(key.spki_der(), signer.public_key_spki_der());
        let der = wechat::pem::decode(&cert.pem, "CERTIFICATE").unwrap();
        assert_eq!(wechat::pay::cert::serial_hex(&der).unwrap(), cert.serial_no);
    }
}
