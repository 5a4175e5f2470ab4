//! `paystream bench e2e` runs for a few seconds at a low rate against the test infrastructure and loses nothing.
//! It reports speed; nothing here asserts it.

mod common;

#[test]
fn bench_e2e_runs_at_a_low_rate_and_loses_nothing() {
    let (stdout, last) = common::bench(&["e2e", "--rates", "20", "--duration", "3s", "--warmup", "1s"]);
    assert!(last.starts_with("bench e2e:") && last.ends_with("lost 0, duplicated 0"), "last line: {last}\n{stdout}");
}
