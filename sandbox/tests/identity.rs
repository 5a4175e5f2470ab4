//! The identity directory and the server's life cycle.

mod common;

use std::os::unix::fs::PermissionsExt as _;

use common::TestDir;
use sandbox::{Identity, IdentityError, InitOptions};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_writes_a_complete_identity_with_private_secrets() {
    let dir = TestDir::new();
    let listen = "127.0.0.1:7171".parse().unwrap();
    let id = sandbox::init(&dir.0, &InitOptions { listen: Some(listen), ..Default::default() }).unwrap();

    for (file, secret) in [
        ("mchid", false),
        ("appid", false),
        ("merchant_private_key.pem", true),
        ("merchant_serial_no", false),
        ("platform_private_key.pem", true),
        ("platform_public_key.pem", false),
        ("platform_public_key_id", false),
        ("apiv3_key", true),
        ("miniprogram_secret", true),
        ("sms_secret_id", false),
        ("sms_secret_key", true),
        ("paystream.toml", true),
    ] {
        let path = dir.0.join(file);
        assert!(path.exists(), "{file}");
        if secret {
            assert_eq!(mode(&path), 0o600, "{file}");
        }
    }
    assert_eq!(mode(&dir.0), 0o700);
    assert!(std::fs::read_to_string(dir.0.join("merchant_private_key.pem")).unwrap().contains("BEGIN PRIVATE KEY"));
    assert_eq!(id.merchant_serial_no.len(), 40);
    assert!(id.merchant_serial_no.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(id.platform_public_key_id.starts_with("PUB_KEY_ID_"));
    assert!(id.platform_public_key_id["PUB_KEY_ID_".len()..].bytes().all(|b| b.is_ascii_digit()));
    assert_eq!(id.apiv3_key.len(), 32);

    let toml = std::fs::read_to_string(dir.0.join("paystream.toml")).unwrap();
    assert!(toml.contains("pay_base_url = \"http://127.0.0.1:7171\""), "{toml}");
    let sections: Vec<&str> = toml.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(sections, ["[wechat]", "[sms]"]);

    // Load reads the same identity back; Debug shows no secret.
    let loaded = Identity::load(&dir.0).unwrap();
    assert_eq!(loaded.mchid, id.mchid);
    assert_eq!(loaded.apiv3_key, id.apiv3_key);
    assert_eq!(loaded.merchant_private_key_pem, id.merchant_private_key_pem);
    let debug = format!("{loaded:?}");
    assert!(!debug.contains(&id.apiv3_key) && !debug.contains("PRIVATE KEY") && !debug.contains(&id.sms_secret_key));

    // A second init does not clobber it, unless forced.
    assert!(matches!(sandbox::init(&dir.0, &InitOptions::default()), Err(IdentityError::AlreadyInitialized(_))));
    let forced = sandbox::init(&dir.0, &InitOptions { force: true, ..Default::default() }).unwrap();
    assert_ne!(forced.apiv3_key, id.apiv3_key);
}

#[test]
fn load_refuses_a_mismatched_platform_key() {
    let dir = TestDir::new();
    sandbox::init(&dir.0, &InitOptions::default()).unwrap();
    let other = wechat::RsaSigner::generate().unwrap();
    std::fs::write(dir.0.join("platform_public_key.pem"), other.public_key_spki_pem()).unwrap();
    assert!(matches!(Identity::load(&dir.0), Err(IdentityError::Invalid { .. })));
    std::fs::remove_file(dir.0.join("apiv3_key")).unwrap();
    assert!(matches!(Identity::load(&dir.0), Err(IdentityError::Io { .. })));
}

#[tokio::test]
async fn serving_rewrites_the_config_with_the_bound_port_and_stops_on_shutdown() {
    let env = common::spawn().await;
    let toml = std::fs::read_to_string(env.dir.0.join("paystream.toml")).unwrap();
    assert!(toml.contains(&format!("pay_base_url = \"{}\"", env.sandbox.base_url())), "{toml}");
    assert_ne!(env.sandbox.addr.port(), 0);
    let base = env.sandbox.base_url();
    env.sandbox.stop().await.unwrap();
    let after =
        reqwest::Client::builder().no_proxy().build().unwrap().get(format!("{base}/sandbox/v1/healthz")).send().await;
    assert!(after.is_err(), "no longer listening");
}

#[tokio::test]
async fn a_bad_time_scale_is_refused() {
    let dir = TestDir::new();
    for scale in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let options = sandbox::SandboxOptions { time_scale: scale, ..Default::default() };
        assert!(matches!(
            sandbox::spawn_for_tests_with(&dir.0, options).await,
            Err(sandbox::SandboxError::BadTimeScale(_))
        ));
    }
}
