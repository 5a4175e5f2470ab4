//! `paystream bench e2e` runs for a few seconds at a low rate against the test infrastructure and loses nothing.
//! It reports speed; nothing here asserts it.

mod common;

use std::process::Stdio;

#[test]
fn bench_e2e_runs_at_a_low_rate_and_loses_nothing() {
    let out = common::paystream()
        .args(["bench", "e2e", "--rates", "20", "--duration", "3s", "--warmup", "1s"])
        .env("PAYSTREAM__DATABASE__URL", testkit::setting("DATABASE_URL"))
        .env("PAYSTREAM__NATS__URL", testkit::nats_url())
        .env("PAYSTREAM__TELEMETRY__LOG_FILTER", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench e2e failed ({}):\n{stdout}\n{stderr}", out.status);
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("bench e2e:") && last.ends_with("lost 0, duplicated 0"), "last line: {last}\n{stdout}");
}
