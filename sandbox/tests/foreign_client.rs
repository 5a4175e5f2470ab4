//! "A client written by someone else works unchanged": `foreign_client.py` implements the
//! merchant side from the published protocol with Python's `cryptography` package only, and
//! runs against a sandbox on port 0.
//!
//! Needs python3 with `cryptography` (`pip install cryptography`). Without it the test says so
//! and passes, unless SANDBOX_REQUIRE_PYTHON=1 makes the absence a failure.

mod common;

use tokio::process::Command;

#[tokio::test]
async fn python_client_from_the_published_protocol_works_unchanged() {
    let probe = Command::new("python3").args(["-c", "import cryptography"]).output().await;
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var("SANDBOX_REQUIRE_PYTHON").is_err(),
            "python3 with the cryptography package is required (pip install cryptography)"
        );
        eprintln!("SKIPPED: python3 with `cryptography` not available");
        return;
    }
    let env = common::spawn().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/foreign_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(env.sandbox.base_url())
        .arg(&env.dir.0)
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stdout.trim_end().ends_with("OK"), "stdout:\n{stdout}\nstderr:\n{stderr}");
}
