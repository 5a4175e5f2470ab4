//! `paystream outbox` as an operator runs it against a real PostgreSQL: parked rows are listed with their reason,
//! and retried by id or all at once; an id that is not parked is an error, not a silent no-op.

use std::process::{Command, Output};

use serde_json::Value;

fn outbox(db_url: &str, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_paystream"));
    for (k, _) in std::env::vars() {
        if k.starts_with("PAYSTREAM") {
            c.env_remove(k);
        }
    }
    // The command reads PostgreSQL only: no other section's secret is needed.
    c.current_dir(std::env::temp_dir()).env("PAYSTREAM__DATABASE__URL", db_url).arg("outbox").args(args);
    c.output().unwrap()
}

fn ok(db_url: &str, args: &[&str]) -> String {
    let out = outbox(db_url, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "outbox {args:?}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn parked_rows_are_listed_with_their_reason_and_retried() {
    let db = testkit::TestDb::create().await;
    let cfg = storage::DbConfig::new(&db.url);
    storage::migrate(&cfg).await.unwrap();
    assert_eq!(ok(&db.url, &["parked"]), "no parked outbox rows\n");

    let mut conn = storage::connect(&cfg).await.unwrap();
    let row = |aggregate: &str| storage::outbox::NewOutboxRow {
        event_id: uuid::Uuid::new_v4(),
        aggregate: aggregate.into(),
        subject: "order.status".into(),
        headers: serde_json::json!({}),
        payload: vec![b'x'; 1000],
    };
    let written =
        storage::outbox::insert_all(&mut conn, &[row("order:HSO1"), row("order:HSO1")], &[], false).await.unwrap();
    let id = written.iter().map(|w| w.id).min().unwrap();
    storage::outbox::park(&mut conn, id, "max payload size exceeded: 2097152 > 1048576").await.unwrap();

    let listed: Value = serde_json::from_str(&ok(&db.url, &["parked", "--json"])).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id);
    assert_eq!(listed[0]["aggregate"], "order:HSO1");
    assert_eq!(listed[0]["payload_bytes"], 1000);
    assert_eq!(listed[0]["waiting_behind"], 1);
    assert_eq!(listed[0]["reason"], "max payload size exceeded: 2097152 > 1048576");
    let table = ok(&db.url, &["parked"]);
    assert!(table.lines().any(|l| l.trim_start().starts_with(&id.to_string()) && l.contains("max payload")), "{table}");

    let wrong = outbox(&db.url, &["retry", &(id + 100).to_string()]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("0 of 1 rows unparked"), "{wrong:?}");
    assert_eq!(ok(&db.url, &["retry", &id.to_string()]), "1 rows unparked; the relays try them again\n");
    assert!(storage::outbox::parked(&mut conn).await.unwrap().is_empty());
    assert_eq!(ok(&db.url, &["retry", "--all"]), "0 rows unparked; the relays try them again\n");
}
