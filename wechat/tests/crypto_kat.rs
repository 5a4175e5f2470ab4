//! Known answers from OpenSSL and Python `cryptography` (see tests/fixtures/README.md).

use wechat::{
    AuthorizationHeader, RsaSigner, RsaVerifierKey, SignatureHeaders, TradeState, Transaction, Verifier, VerifyError,
    decrypt_resource, encrypt_resource, pay_sign_message, request_message, response_message,
};

const MERCHANT_KEY: &str = include_str!("fixtures/test_merchant_key.pem");
const MERCHANT_PUB: &str = include_str!("fixtures/test_merchant_pub.pem");
const PLATFORM_PUB: &str = include_str!("fixtures/test_platform_pub.pem");
const PLATFORM_CERT: &str = include_str!("fixtures/test_platform_cert.pem");

fn kat() -> serde_json::Value {
    serde_json::from_str(include_str!("fixtures/kat.json")).unwrap()
}

fn s(v: &serde_json::Value, k: &str) -> String {
    v[k].as_str().unwrap_or_else(|| panic!("{k}")).to_owned()
}

fn apiv3_key(v: &serde_json::Value) -> [u8; 32] {
    s(v, "apiv3_key").as_bytes().try_into().unwrap()
}

#[test]
fn request_signature_matches_openssl() {
    let v = kat();
    let msg = request_message(
        "POST",
        "/v3/pay/transactions/jsapi",
        1_700_000_000,
        "593BEC0C930BF1AFEB40B4A08C8FB242",
        br#"{"appid":"wxd678efh567hg6787","mchid":"1230000109"}"#,
    );
    assert_eq!(msg, s(&v, "request_message").as_bytes());
    let signer = RsaSigner::from_pkcs8_pem(MERCHANT_KEY).unwrap();
    // PKCS#1 v1.5 is deterministic, so the signature must be byte-identical to OpenSSL's.
    assert_eq!(signer.sign(&msg), s(&v, "request_signature"));
    let public = RsaVerifierKey::from_spki_pem(MERCHANT_PUB).unwrap();
    public.verify(&msg, &s(&v, "request_signature")).unwrap();
    // Our public key export is the same SPKI OpenSSL wrote.
    assert_eq!(signer.public_key_spki_pem().trim(), MERCHANT_PUB.trim(), "SPKI PEM differs from openssl pkey -pubout");
}

#[test]
fn pay_sign_matches_openssl() {
    let v = kat();
    let msg = pay_sign_message(
        "wxd678efh567hg6787",
        "1700000000",
        "593BEC0C930BF1AFEB40B4A08C8FB242",
        "prepay_id=wx26112221580621e9b071c00d9e093b0000",
    );
    assert_eq!(msg, s(&v, "pay_sign_message").as_bytes());
    let signer = RsaSigner::from_pkcs8_pem(MERCHANT_KEY).unwrap();
    assert_eq!(signer.sign(&msg), s(&v, "pay_sign"));
}

#[test]
fn authorization_header_signed_by_us_verifies_with_openssl_key() {
    let v = kat();
    let signer = RsaSigner::from_pkcs8_pem(MERCHANT_KEY).unwrap();
    let body = br#"{"appid":"wxd678efh567hg6787","mchid":"1230000109"}"#;
    let header = AuthorizationHeader::sign(
        &signer,
        "1230000109",
        "3775B6A45ACD588826D15E583A95F5DD********",
        "POST",
        "/v3/pay/transactions/jsapi",
        1_700_000_000,
        "593BEC0C930BF1AFEB40B4A08C8FB242",
        body,
    );
    assert_eq!(header.signature, s(&v, "request_signature"));
    let parsed = AuthorizationHeader::parse(&header.to_string()).unwrap();
    assert_eq!(parsed, header);
    let public = RsaVerifierKey::from_spki_pem(MERCHANT_PUB).unwrap();
    parsed.verify(&public, "POST", "/v3/pay/transactions/jsapi", body).unwrap();
    assert_eq!(parsed.verify(&public, "POST", "/v3/pay/transactions/jsapi?x=1", body), Err(VerifyError::BadSignature));
}

fn response_headers(v: &serde_json::Value, serial: &str) -> SignatureHeaders {
    SignatureHeaders {
        timestamp: s(v, "response_timestamp"),
        nonce: s(v, "response_nonce"),
        signature: s(v, "response_signature"),
        serial: serial.to_owned(),
    }
}

#[test]
fn openssl_response_signature_verifies_in_both_key_modes() {
    let v = kat();
    let body = s(&v, "response_body");
    assert_eq!(
        response_message(1_700_000_000, &s(&v, "response_nonce"), body.as_bytes()),
        format!("1700000000\n{}\n{body}\n", s(&v, "response_nonce")).into_bytes()
    );
    let verifier = Verifier::new();
    verifier
        .add_key("PUB_KEY_ID_0112345678202411270000000000000000", RsaVerifierKey::from_spki_pem(PLATFORM_PUB).unwrap());
    let serial = s(&v, "certificate_serial");
    verifier.add_key(serial.clone(), RsaVerifierKey::from_certificate_pem(PLATFORM_CERT).unwrap());
    let now = 1_700_000_100;
    for id in ["PUB_KEY_ID_0112345678202411270000000000000000", serial.as_str()] {
        verifier.verify(&response_headers(&v, id), body.as_bytes(), now).unwrap();
    }
    assert_eq!(
        verifier.verify(&response_headers(&v, "PUB_KEY_ID_1"), body.as_bytes(), now),
        Err(VerifyError::UnknownSerial("PUB_KEY_ID_1".into()))
    );
    assert_eq!(
        verifier.verify(&response_headers(&v, &serial), format!("{body} ").as_bytes(), now),
        Err(VerifyError::BadSignature)
    );
}

#[test]
fn stale_timestamps_are_refused_both_ways() {
    let v = kat();
    let body = s(&v, "response_body");
    let verifier = Verifier::new();
    verifier.add_key("K", RsaVerifierKey::from_spki_pem(PLATFORM_PUB).unwrap());
    let h = response_headers(&v, "K");
    let ts = 1_700_000_000;
    verifier.verify(&h, body.as_bytes(), ts + 299).unwrap();
    verifier.verify(&h, body.as_bytes(), ts - 299).unwrap();
    assert_eq!(verifier.verify(&h, body.as_bytes(), ts + 300), Err(VerifyError::Stale { skew_secs: 300 }));
    assert_eq!(verifier.verify(&h, body.as_bytes(), ts - 301), Err(VerifyError::Stale { skew_secs: -301 }));
}

#[test]
fn signtest_probe_is_refused_cleanly() {
    let v = kat();
    let verifier = Verifier::new();
    verifier.add_key("K", RsaVerifierKey::from_spki_pem(PLATFORM_PUB).unwrap());
    let mut h = response_headers(&v, "K");
    h.signature = "WECHATPAY/SIGNTEST/1a2b3c".into();
    assert_eq!(verifier.verify(&h, b"{}", 1_700_000_000), Err(VerifyError::Probe));
    // Also with an unknown serial and a stale timestamp: still a probe, never a crash.
    h.serial = "nope".into();
    h.timestamp = "1".into();
    assert_eq!(verifier.verify(&h, b"{}", 1_700_000_000), Err(VerifyError::Probe));
    // Garbage that is not base64 is malformed, not a panic.
    let mut h = response_headers(&v, "K");
    h.signature = "@@not base64@@".into();
    assert!(matches!(verifier.verify(&h, b"{}", 1_700_000_000), Err(VerifyError::Malformed(_))));
}

#[test]
fn signature_headers_from_http_headers() {
    let mut map = http::HeaderMap::new();
    map.insert("wechatpay-timestamp", "1700000000".parse().unwrap());
    map.insert("Wechatpay-Nonce", "n".parse().unwrap());
    map.insert("Wechatpay-Signature", "c2ln".parse().unwrap());
    map.insert("Wechatpay-Serial", "PUB_KEY_ID_1".parse().unwrap());
    let h = SignatureHeaders::from_headers(&map).unwrap();
    assert_eq!(h.serial, "PUB_KEY_ID_1");
    map.insert("Wechatpay-Signature-Type", "OTHER".parse().unwrap());
    assert!(matches!(SignatureHeaders::from_headers(&map), Err(VerifyError::Malformed(_))));
    map.remove("Wechatpay-Signature-Type");
    map.remove("Wechatpay-Serial");
    assert_eq!(SignatureHeaders::from_headers(&map), Err(VerifyError::Malformed("missing Wechatpay-Serial".into())));
}

#[test]
fn aes_gcm_matches_python_cryptography() {
    let v = kat();
    let key = apiv3_key(&v);
    let plain = decrypt_resource(
        &key,
        &s(&v, "transaction_nonce"),
        &s(&v, "transaction_aad"),
        &s(&v, "transaction_ciphertext"),
    )
    .unwrap();
    assert_eq!(plain, s(&v, "transaction_plaintext").as_bytes());
    let t: Transaction = serde_json::from_slice(&plain).unwrap();
    assert_eq!(t.trade_state, TradeState::Success);
    assert_eq!(t.payer.unwrap().openid.expose(), "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o");
    // Same key, nonce and AAD give the same ciphertext: GCM is deterministic.
    assert_eq!(
        encrypt_resource(&key, &s(&v, "transaction_nonce"), &s(&v, "transaction_aad"), &plain).unwrap(),
        s(&v, "transaction_ciphertext")
    );
}

#[test]
fn encrypted_certificate_decrypts_to_a_usable_key() {
    let v = kat();
    let pem =
        decrypt_resource(&apiv3_key(&v), &s(&v, "certificate_nonce"), "certificate", &s(&v, "certificate_ciphertext"))
            .unwrap();
    let pem = String::from_utf8(pem).unwrap();
    let der = wechat::pem::decode(&pem, "CERTIFICATE").unwrap();
    assert_eq!(wechat::pay::cert::serial_hex(&der).unwrap(), s(&v, "certificate_serial"));
    let key = RsaVerifierKey::from_certificate_der(&der).unwrap();
    let msg = response_message(1_700_000_000, &s(&v, "response_nonce"), s(&v, "response_body").as_bytes());
    key.verify(&msg, &s(&v, "response_signature")).unwrap();
}

#[test]
fn generated_keys_round_trip_through_pem() {
    let signer = RsaSigner::generate().unwrap();
    let again = RsaSigner::from_pkcs8_pem(&signer.to_pkcs8_pem()).unwrap();
    let public = RsaVerifierKey::from_spki_pem(&signer.public_key_spki_pem()).unwrap();
    public.verify(b"hello", &again.sign(b"hello")).unwrap();
    assert_eq!(public.verify(b"hellO", &again.sign(b"hello")), Err(VerifyError::BadSignature));
    assert!(!format!("{signer:?}").contains("BEGIN"));
}
