//! Throughput of the Pay v3 crypto on one core, next to `openssl speed rsa2048` when the
//! `openssl` CLI is installed. Run with `cargo run -p wechat --release --example crypto_bench`.
//!
//! Criterion-free on purpose: a fixed-duration loop is enough to compare with OpenSSL's own
//! fixed-duration loop, and keeps the dependency set small.

use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

use wechat::{
    EncryptedResource, NotificationReader, RsaSigner, Verifier, decrypt_resource, encrypt_resource, nonce_str,
    response_message,
};

const MERCHANT_KEY: &str = include_str!("../tests/fixtures/test_merchant_key.pem");
const RUN: Duration = Duration::from_secs(2);

fn per_second(mut f: impl FnMut()) -> f64 {
    // Warm up caches and lazy initialisation before timing.
    for _ in 0..10 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN {
        for _ in 0..16 {
            f();
        }
        n += 16;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// `(sign/s, verify/s)` from `openssl speed rsa2048`, if the CLI is there.
fn openssl_speed() -> Option<(f64, f64)> {
    let out = Command::new("openssl").args(["speed", "-seconds", "2", "rsa2048"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let header: Vec<&str> = text.lines().find(|l| l.contains("sign/s"))?.split_whitespace().collect();
    let row: Vec<&str> =
        text.lines().find(|l| l.starts_with("rsa 2048") || l.starts_with("rsa  2048"))?.split_whitespace().collect();
    // The row is "rsa 2048 bits" followed by one value per header column.
    let values = &row[row.iter().position(|t| *t == "bits")? + 1..];
    let col = |name: &str| header.iter().position(|h| *h == name).and_then(|i| values.get(i)?.parse::<f64>().ok());
    Some((col("sign/s")?, col("verify/s")?))
}

fn main() {
    let signer = RsaSigner::from_pkcs8_pem(MERCHANT_KEY).expect("fixture key");
    let verifier_key = signer.verifier_key();
    let msg = b"POST\n/v3/pay/transactions/jsapi\n1700000000\n593BEC0C930BF1AFEB40B4A08C8FB242\n{\"appid\":\"wxd678efh567hg6787\",\"mchid\":\"1230000109\",\"description\":\"coffee\",\"out_trade_no\":\"PS20261127000001\",\"notify_url\":\"https://pay.example.com/notify\",\"amount\":{\"total\":100,\"currency\":\"CNY\"},\"payer\":{\"openid\":\"oUpF8uMuAJO_M2pxb1Q9zNjWeS6o\"}}\n";
    let sig = signer.sign(msg);

    let sign = per_second(|| {
        black_box(signer.sign(black_box(msg)));
    });
    let verify = per_second(|| {
        black_box(verifier_key.verify(black_box(msg), &sig)).expect("valid");
    });

    // A typical TRANSACTION.SUCCESS callback resource (about 600 bytes of JSON).
    let key = *b"0123456789abcdefghijklmnopqrstuv";
    let plain = r#"{"appid":"wxd678efh567hg6787","mchid":"1230000109","out_trade_no":"PS20261127000001","transaction_id":"4200000000202311270000000001","trade_type":"JSAPI","trade_state":"SUCCESS","trade_state_desc":"支付成功","bank_type":"CMC","attach":"","success_time":"2026-11-27T10:00:00+08:00","payer":{"openid":"oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},"amount":{"total":100,"payer_total":100,"currency":"CNY","payer_currency":"CNY"}}"#.as_bytes();
    let nonce = "fdasfwefsrdq";
    let ct = encrypt_resource(&key, nonce, "transaction", plain).expect("encrypt");
    let decrypt = per_second(|| {
        black_box(decrypt_resource(&key, nonce, "transaction", black_box(&ct))).expect("decrypt");
    });

    // The whole callback path: verify headers, decrypt, parse.
    let verifier = Verifier::new();
    verifier.add_key("PUB_KEY_ID_1", signer.verifier_key());
    let reader = NotificationReader::new(verifier, key);
    let body = serde_json::json!({
        "id": "EV-1", "create_time": "2026-11-27T10:00:00+08:00", "event_type": "TRANSACTION.SUCCESS",
        "resource_type": "encrypt-resource", "summary": "支付成功",
        "resource": EncryptedResource { original_type: "transaction".into(), algorithm: "AEAD_AES_256_GCM".into(),
            ciphertext: ct.clone(), associated_data: "transaction".into(), nonce: nonce.into() },
    })
    .to_string();
    let ts = 1_700_000_000;
    let cb_nonce = nonce_str();
    let mut headers = http::HeaderMap::new();
    headers.insert("Wechatpay-Timestamp", ts.to_string().parse().expect("header"));
    headers.insert("Wechatpay-Nonce", cb_nonce.parse().expect("header"));
    headers.insert(
        "Wechatpay-Signature",
        signer.sign(&response_message(ts, &cb_nonce, body.as_bytes())).parse().expect("header"),
    );
    headers.insert("Wechatpay-Serial", "PUB_KEY_ID_1".parse().expect("header"));
    let callback = per_second(|| {
        black_box(reader.read(&headers, body.as_bytes(), ts)).expect("callback");
    });

    println!("one core, {} s per figure", RUN.as_secs());
    println!("RSA-2048 PKCS#1 v1.5 SHA-256 sign   (aws-lc-rs): {sign:>10.0}/s");
    println!("RSA-2048 PKCS#1 v1.5 SHA-256 verify (aws-lc-rs): {verify:>10.0}/s");
    println!("AES-256-GCM decrypt of a callback resource    : {decrypt:>10.0}/s");
    println!("full callback (verify + decrypt + parse)      : {callback:>10.0}/s");
    match openssl_speed() {
        Some((os, ov)) => {
            println!(
                "openssl speed rsa2048 sign                    : {os:>10.0}/s  (ours / openssl = {:.2})",
                sign / os
            );
            println!(
                "openssl speed rsa2048 verify                  : {ov:>10.0}/s  (ours / openssl = {:.2})",
                verify / ov
            );
        }
        None => println!("openssl CLI not found: no comparison"),
    }
}
