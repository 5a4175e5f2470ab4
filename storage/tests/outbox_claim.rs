//! The outbox claim against a real PostgreSQL with two open transactions: a relay takes only aggregates whose oldest
//! row (head) it locked, another relay never gets rows of those aggregates while the first holds them, and every
//! aggregate's rows come back in id order.

use diesel_async::RunQueryDsl;
use storage::{Conn, outbox};
use testkit::TestDb;

async fn connect(db: &TestDb) -> Conn {
    storage::connect(&storage::DbConfig::new(&db.url)).await.unwrap()
}

async fn write(conn: &mut Conn, aggregate: &str) {
    let row = outbox::NewOutboxRow {
        event_id: uuid::Uuid::new_v4(),
        aggregate: aggregate.to_owned(),
        subject: "payment.status".into(),
        headers: serde_json::json!({}),
        payload: aggregate.as_bytes().to_vec(),
    };
    outbox::insert(conn, &row).await.unwrap();
}

async fn claim(conn: &mut Conn, aggregates: i64, rows: i64) -> Vec<(String, i64)> {
    outbox::claim_batch(conn, aggregates, rows, std::time::Duration::from_secs(5))
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.aggregate, r.id))
        .collect()
}

fn of(rows: &[(String, i64)], aggregate: &str) -> Vec<i64> {
    rows.iter().filter(|(a, _)| a == aggregate).map(|(_, id)| *id).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_relays_never_hold_the_same_aggregate_and_each_gets_it_in_order() {
    let db = TestDb::create().await;
    storage::migrate(&storage::DbConfig::new(&db.url)).await.unwrap();
    let mut writer = connect(&db).await;
    // Interleaved: a1 b1 a2 c1 b2 a3
    for agg in ["a", "b", "a", "c", "b", "a"] {
        write(&mut writer, agg).await;
    }
    let all = claim(&mut writer, 100, 100).await; // outside a transaction: locks nothing, lists every row
    let ids: std::collections::HashMap<&str, Vec<i64>> = ["a", "b", "c"].map(|a| (a, of(&all, a))).into();
    assert_eq!(ids["a"].len() + ids["b"].len() + ids["c"].len(), 6);

    let (mut one, mut two) = (connect(&db).await, connect(&db).await);
    diesel::sql_query("BEGIN").execute(&mut one).await.unwrap();
    // Relay one takes one aggregate: the one with the oldest head, a, with all its rows in order.
    let first = claim(&mut one, 1, 100).await;
    assert_eq!(of(&first, "a"), ids["a"]);
    assert!(of(&first, "b").is_empty() && of(&first, "c").is_empty(), "{first:?}");

    // While one holds a's head, relay two gets b and c, in order, and nothing of a (a2 and a3 are not heads).
    diesel::sql_query("BEGIN").execute(&mut two).await.unwrap();
    let second = claim(&mut two, 100, 100).await;
    assert!(of(&second, "a").is_empty(), "two took rows of an aggregate one holds: {second:?}");
    assert_eq!(of(&second, "b"), ids["b"]);
    assert_eq!(of(&second, "c"), ids["c"]);
    let ordered: Vec<i64> = second.iter().map(|(_, id)| *id).collect();
    assert!(ordered.windows(2).all(|w| w[0] < w[1]), "id order: {second:?}");

    // One publishes a1 only (the row limit cut a's tail) and commits; a2 becomes a's head, free for anyone.
    outbox::delete(&mut one, &ids["a"][..1]).await.unwrap();
    diesel::sql_query("COMMIT").execute(&mut one).await.unwrap();
    diesel::sql_query("ROLLBACK").execute(&mut two).await.unwrap();
    let third = claim(&mut one, 100, 100).await;
    assert_eq!(of(&third, "a"), ids["a"][1..]);
    assert_eq!(of(&third, "b"), ids["b"]);
}
