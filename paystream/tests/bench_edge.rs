//! `paystream bench prepay` and `bench ingest` run briefly against the test infrastructure, end with their
//! headline and lose nothing. They report speed; nothing here asserts it.

mod common;

use common::bench;

#[test]
fn bench_prepay_runs_briefly_and_every_prepay_is_answered_and_stored() {
    let (stdout, last) =
        bench(&["prepay", "--prepays", "20", "--concurrency", "1,4", "--warmup", "4", "--reference", "200ms"]);
    check_prepay(&stdout, &last);
}

/// Through `--roles-bin` (here the same binary), the ingress still gets the demo homestays and no rate limits or
/// unpaid-order cap (20 orders per user): the binary is asked whether it knows those keys.
#[test]
fn bench_prepay_through_roles_bin_books_and_prepays_as_without() {
    let roles_bin = env!("CARGO_BIN_EXE_paystream");
    let (stdout, last) = bench(&[
        "prepay",
        "--prepays",
        "20",
        "--concurrency",
        "1,4",
        "--warmup",
        "4",
        "--reference",
        "200ms",
        "--roles-bin",
        roles_bin,
    ]);
    assert!(stdout.contains(&format!("the ingress run by {roles_bin} (paystream ")), "{stdout}");
    check_prepay(&stdout, &last);
}

fn check_prepay(stdout: &str, last: &str) {
    assert!(
        last.starts_with("bench prepay: ")
            && last.ends_with("of the RSA-2048 signing rate per core ÷ 2 (target ≥ 0.80)"),
        "last line: {last}\n{stdout}"
    );
    // 4 + 2 × 20 prepays, each answered with a paySign that verifies and stored once.
    assert!(
        stdout.contains("checked: 44 prepays answered, 0 failed, 0 paySigns that do not verify; 44 payments with a prepay id for 44 of 44 orders"),
        "{stdout}"
    );
}

/// Also through `--roles-bin` (here the same binary): the ingress and the migrations run from the path given.
#[test]
fn bench_ingest_runs_briefly_and_every_callback_is_stored_once() {
    let roles_bin = env!("CARGO_BIN_EXE_paystream");
    let (stdout, last) = bench(&[
        "ingest",
        "--callbacks",
        "200",
        "--warmup",
        "20",
        "--in-flight",
        "8",
        "--reference",
        "200ms",
        "--roles-bin",
        roles_bin,
    ]);
    assert!(stdout.contains(&format!("the ingress run by {roles_bin} (paystream ")), "{stdout}");
    assert!(
        last.starts_with("bench ingest: ")
            && last.ends_with("of min(RSA verify, JetStream publish+PubAck) (target ≥ 0.50)"),
        "last line: {last}\n{stdout}"
    );
    assert!(
        stdout.contains("answered 204: 220 of 220 (warm-up included), errors 0; stored in JetStream 220, lost 0"),
        "{stdout}"
    );
}
