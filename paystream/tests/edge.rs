//! The public edge under abuse, against the real binary: what a stranger on the internet can make `paystream all`
//! spend. Resident sizes come from /proc, never from timing.

mod common;

use common::System;
use serde_json::json;

/// `VmRSS` and `VmHWM` (peak resident) of a process, in MiB.
fn resident_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_wrong_password_logins_keeps_memory_bounded_and_gives_it_back() {
    let sys = System::start().await;
    let pid = sys.children[1].id();
    // A registered user, so some of the guesses are checked against a real hash and the rest against the dummy.
    let (status, _) = sys
        .call("/usercenter/v1/user/register", None, json!({ "mobile": "13800000000", "password": "right password" }))
        .await;
    assert_eq!(status, 200);
    let (idle, _) = resident_mib(pid);

    let flood = (0..1_000).map(|i| {
        let mobile = if i % 2 == 0 { "13800000000".to_owned() } else { format!("139{i:08}") };
        let sys = &sys;
        async move {
            let resp = sys
                .http
                .post(format!("{}/usercenter/v1/user/login", sys.api))
                .json(&json!({ "mobile": mobile, "password": "wrong password" }))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let retry_after = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            let body: serde_json::Value = resp.json().await.unwrap();
            (status, retry_after, body)
        }
    });
    let answers = futures::future::join_all(flood).await;
    let (_, peak) = resident_mib(pid);
    assert!(peak <= 256, "peak resident {peak} MiB during 1,000 concurrent logins (idle {idle} MiB)");
    let mut refused = 0;
    for (status, retry_after, body) in &answers {
        match status {
            401 => assert_eq!(body["code"], 40103, "{body}"),
            // Hashing saturated, or the number locked after its wrong guesses: told when to come back.
            503 | 429 => {
                assert!(retry_after.is_some(), "{status} without Retry-After: {body}");
                refused += 1;
            }
            _ => panic!("a wrong password answered {status}: {body}"),
        }
    }
    assert!(refused < answers.len(), "some guesses were checked");

    // Afterwards the process is back near where it was: the hashing memory is held, not grown per login.
    let (after, _) = resident_mib(pid);
    eprintln!("resident: idle {idle} MiB, peak {peak} MiB, after {after} MiB; {refused} of 1000 told to retry");
    // Allowed above idle: the hashing threads' blocks (19 MiB each, kept by design) and the buffers of a thousand
    // connections that the allocator keeps for reuse.
    assert!(after <= idle + 96, "resident {after} MiB after the flood, {idle} MiB before");
    // And hashing still works for the next user.
    let (status, body) = sys
        .call("/usercenter/v1/user/register", None, json!({ "mobile": "13700000000", "password": "another password" }))
        .await;
    assert_eq!(status, 200, "{body}");
}
