//! Property tests: round trips, and any single-bit change is refused.

use std::sync::OnceLock;

use proptest::prelude::*;
use wechat::{
    AuthorizationHeader, RsaSigner, SignatureHeaders, Verifier, decrypt_resource, encrypt_resource, response_message,
};

fn signer() -> &'static RsaSigner {
    static KEY: OnceLock<RsaSigner> = OnceLock::new();
    KEY.get_or_init(|| RsaSigner::from_pkcs8_pem(include_str!("fixtures/test_platform_key.pem")).unwrap())
}

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let v = Verifier::new();
        v.add_key("PUB_KEY_ID_1", signer().verifier_key());
        v
    })
}

fn signed(ts: i64, nonce: &str, body: &[u8]) -> SignatureHeaders {
    SignatureHeaders {
        timestamp: ts.to_string(),
        nonce: nonce.to_owned(),
        signature: signer().sign(&response_message(ts, nonce, body)),
        serial: "PUB_KEY_ID_1".into(),
    }
}

/// Flips one bit of a string; `None` when the result is not UTF-8 (it could not be a header).
fn flip(s: &str, bit: usize) -> Option<String> {
    let mut b = s.as_bytes().to_vec();
    let i = bit % (b.len() * 8);
    b[i / 8] ^= 1 << (i % 8);
    String::from_utf8(b).ok()
}

const NOW: i64 = 1_700_000_000;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn sign_then_verify(body in proptest::collection::vec(any::<u8>(), 0..512),
                        nonce in "[A-Za-z0-9]{1,32}", skew in -299i64..300) {
        let h = signed(NOW + skew, &nonce, &body);
        prop_assert_eq!(verifier().verify(&h, &body, NOW), Ok(()));
    }

    #[test]
    fn any_bit_flip_is_refused(body in proptest::collection::vec(any::<u8>(), 1..256),
                               nonce in "[A-Za-z0-9]{1,32}", which in 0usize..4, bit in any::<usize>()) {
        let mut h = signed(NOW, &nonce, &body);
        let mut body = body;
        match which {
            0 => { let i = bit % (body.len() * 8); body[i / 8] ^= 1 << (i % 8); }
            1 => match flip(&h.timestamp, bit) { Some(t) => h.timestamp = t, None => return Ok(()) },
            2 => match flip(&h.nonce, bit) { Some(n) => h.nonce = n, None => return Ok(()) },
            _ => match flip(&h.signature, bit) { Some(s) => h.signature = s, None => return Ok(()) },
        }
        prop_assert!(verifier().verify(&h, &body, NOW).is_err());
    }

    #[test]
    fn authorization_header_fields_in_any_order(order in Just(vec![0usize, 1, 2, 3, 4]).prop_shuffle(),
                                                spaces in any::<bool>()) {
        let h = AuthorizationHeader {
            mchid: "1230000109".into(),
            nonce_str: wechat::nonce_str(),
            timestamp: 1_700_000_000,
            serial_no: "5157F09EFDC096DE15EBE81A47057A7232F1B8E1".into(),
            signature: signer().sign(b"x"),
        };
        let fields = [
            format!("mchid=\"{}\"", h.mchid),
            format!("nonce_str=\"{}\"", h.nonce_str),
            format!("timestamp=\"{}\"", h.timestamp),
            format!("serial_no=\"{}\"", h.serial_no),
            format!("signature=\"{}\"", h.signature),
        ];
        let sep = if spaces { ", " } else { "," };
        let joined: Vec<&str> = order.iter().map(|i| fields[*i].as_str()).collect();
        let value = format!("WECHATPAY2-SHA256-RSA2048 {}", joined.join(sep));
        prop_assert_eq!(AuthorizationHeader::parse(&value), Ok(h));
    }

    #[test]
    fn encrypt_then_decrypt(plain in proptest::collection::vec(any::<u8>(), 0..512),
                            key in any::<[u8; 32]>(), nonce in "[a-zA-Z0-9]{12}", aad in "[a-z]{0,16}",
                            bit in any::<usize>()) {
        let ct = encrypt_resource(&key, &nonce, &aad, &plain).unwrap();
        prop_assert_eq!(decrypt_resource(&key, &nonce, &aad, &ct).unwrap(), plain);
        // Tampering with the ciphertext or tag, nonce or AAD is refused.
        use base64::Engine as _;
        let mut raw = base64::engine::general_purpose::STANDARD.decode(&ct).unwrap();
        let i = bit % (raw.len() * 8);
        raw[i / 8] ^= 1 << (i % 8);
        let bad = base64::engine::general_purpose::STANDARD.encode(raw);
        prop_assert!(decrypt_resource(&key, &nonce, &aad, &bad).is_err());
        if let Some(n) = flip(&nonce, bit) {
            prop_assert!(decrypt_resource(&key, &n, &aad, &ct).is_err());
        }
        let other_aad = format!("{aad}x");
        prop_assert!(decrypt_resource(&key, &nonce, &other_aad, &ct).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever arrives in the headers or body, the checks answer with an error, never a panic.
    #[test]
    fn hostile_input_never_panics(ts in "\\PC{0,16}", nonce in "\\PC{0,40}", sig in "\\PC{0,400}",
                                  serial in prop_oneof![Just("PUB_KEY_ID_1".to_owned()), "\\PC{0,40}"],
                                  body in proptest::collection::vec(any::<u8>(), 0..64), now in any::<i64>()) {
        let h = SignatureHeaders { timestamp: ts.clone(), nonce: nonce.clone(), signature: sig.clone(), serial };
        let _ = verifier().verify(&h, &body, now);
        let _ = AuthorizationHeader::parse(&format!("WECHATPAY2-SHA256-RSA2048 {sig}"));
        let _ = AuthorizationHeader::parse(&sig);
        let _ = decrypt_resource(&[0u8; 32], &nonce, &ts, &sig);
        let _ = wechat::check_value(&ts, &sig);
        let _ = wechat::Tc3Authorization::parse(&sig);
    }

    #[test]
    fn probe_signatures_are_always_refused(suffix in "\\PC{0,64}", skew in -1000i64..1000) {
        let h = SignatureHeaders {
            timestamp: (NOW + skew).to_string(),
            nonce: "n".into(),
            signature: format!("{}{suffix}", wechat::PROBE_PREFIX),
            serial: "PUB_KEY_ID_1".into(),
        };
        prop_assert_eq!(verifier().verify(&h, b"{}", NOW), Err(wechat::VerifyError::Probe));
    }
}
