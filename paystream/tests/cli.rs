//! The binary as an operator runs it: bad configuration stops start-up with a message naming the key; `all`
//! comes up ready, serves its admin endpoints and stops cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn paystream() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_paystream"));
    // Only what each test sets: nothing inherited from the caller's shell or `make test`.
    for (k, _) in std::env::vars() {
        if k.starts_with("PAYSTREAM") {
            c.env_remove(k);
        }
    }
    c.current_dir(std::env::temp_dir());
    c
}

fn write_config(body: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("{}.toml", testkit::unique("paystream-cli-")));
    std::fs::write(&path, body).unwrap();
    path
}

fn refused(config: &str, env: &[(&str, &str)]) -> String {
    let path = write_config(config);
    let out = paystream().arg("--config").arg(&path).args(["config"]).envs(env.iter().copied()).output().unwrap();
    assert!(!out.status.success(), "must refuse to start");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn bad_configuration_stops_start_up_with_the_key_named() {
    let db = "[database]\nurl = \"postgres://postgres@127.0.0.1/x\"\n";
    let e = refused(&format!("{db}[nats]\nurl = \"nats://127.0.0.1:4222\"\nprefx = \"oops\"\n"), &[]);
    assert!(e.contains("prefx"), "unknown key: {e}");
    let e = refused("[nats]\nprefix = \"x\"\n", &[]);
    assert!(e.contains("database"), "missing secret: {e}");
    let e = refused(db, &[("PAYSTREAM__CONSUMER__ACK_WAIT", "5s")]);
    assert!(e.contains("consumer.ack_wait") && e.contains("consumer.handler_timeout"), "{e}");
    let e = refused(&format!("{db}[wechat]\nmchid = \"1\"\n"), &[]);
    assert!(e.contains("wechat"), "incomplete [wechat]: {e}");
    let out = paystream().args(["--config", "/nonexistent/paystream.toml", "config"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/paystream.toml"));
}

#[test]
fn a_role_needs_only_the_secrets_of_the_sections_it_reads() {
    // A shared file: [http] for the ingress, without its JWT secret here.
    let path = write_config("[database]\nurl = \"postgres://postgres@127.0.0.1/x\"\n[http]\njwt_ttl = \"2h\"\n");
    let check =
        |role: &[&str]| paystream().arg("--config").arg(&path).args(["config", "--role"]).args(role).output().unwrap();
    let relay = check(&["relay"]);
    assert!(relay.status.success(), "{}", String::from_utf8_lossy(&relay.stderr));
    assert!(check(&["processor", "order"]).status.success());
    let ingress = check(&["ingress"]);
    assert!(!ingress.status.success());
    assert!(String::from_utf8_lossy(&ingress.stderr).contains("jwt_secret"), "the ingress needs its key");
    let unknown = check(&["cashier"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown role"));
}

#[tokio::test(flavor = "multi_thread")]
async fn all_comes_up_ready_and_stops_on_sigterm() {
    let db = testkit::TestDb::create().await;
    // The configuration an operator starts from: a sandbox identity's paystream.toml, plus the environment.
    let dir = std::env::temp_dir().join(testkit::unique("paystream-cli-id-"));
    let init = paystream().args(["sandbox", "init", "--dir"]).arg(&dir).output().unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let mut child = paystream()
        .arg("--config")
        .arg(dir.join("paystream.toml"))
        .arg("all")
        .env("PAYSTREAM__DATABASE__URL", &db.url)
        .env("PAYSTREAM__NATS__URL", testkit::nats_url())
        .env("PAYSTREAM__NATS__PREFIX", testkit::unique("cli"))
        .env("PAYSTREAM__ADMIN__LISTEN", "127.0.0.1:0")
        .env("PAYSTREAM__TELEMETRY__LOG_FILTER", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let base =
        first.split_whitespace().find(|w| w.starts_with("http://")).unwrap_or_else(|| panic!("{first}")).to_owned();

    let client = reqwest_free_get;
    assert_eq!(client(&format!("{base}/healthz")).await.0, 200);
    // Ready once every consumer of `all` is provisioned (the roles do it as they start).
    let body = testkit::eventually(Duration::from_secs(30), "paystream all ready", || async {
        let (status, body) = client(&format!("{base}/readyz")).await;
        (status == 200).then_some(body)
    })
    .await;
    for check in ["postgres", "nats", "streams", "consumers"] {
        assert!(body.contains(&format!("\"{check}\":\"ok\"")), "{check}: {body}");
    }
    let (_, metrics) = client(&format!("{base}/metrics")).await;
    for family in [
        "paystream_events_published_total",
        "paystream_outbox_depth",
        r#"paystream_events_consumed_total{consumer="payment",outcome="dlq"}"#,
        r#"paystream_events_consumed_total{consumer="order",outcome="ack"}"#,
    ] {
        assert!(metrics.contains(family), "{family} missing from /metrics");
    }

    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = testkit::eventually(Duration::from_secs(15), "paystream all to exit after SIGTERM", || {
        let s = child.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert!(status.success(), "graceful exit: {status:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A minimal HTTP GET over a TcpStream: the binary is what is under test, not an HTTP client.
async fn reqwest_free_get(url: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}
