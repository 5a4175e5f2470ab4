//! The transactional outbox against real Postgres and JetStream: nothing lost, nothing duplicated, order kept.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use bus::{Envelope, OutboxConfig, Relay, Subject, enqueue};
use common::{Env, Job, Mode, job};
use storage::{AsyncConnection, RunQueryDsl, StorageError};
use tokio_util::sync::CancellationToken;

fn relay(env: &Env, cfg: OutboxConfig) -> Relay {
    Relay::new(env.pool.clone(), env.publisher.clone(), cfg)
}

async fn write(env: &Env, events: &[Envelope<Job>]) {
    let mut conn = env.pool.get().await.unwrap();
    conn.transaction::<_, StorageError, _>(async |c| {
        for e in events {
            enqueue(c, e).await?;
        }
        Ok(())
    })
    .await
    .unwrap();
}

async fn outbox_depth(env: &Env) -> i64 {
    let mut conn = env.pool.get().await.unwrap();
    storage::outbox::stats(&mut conn).await.unwrap().depth
}

/// Asserts every aggregate's jobs arrived exactly once each and in order.
fn assert_in_order_exactly_once(messages: &[async_nats::jetstream::Message], aggregates: usize, per_aggregate: u64) {
    let mut next: BTreeMap<String, u64> = BTreeMap::new();
    let mut ids = HashSet::new();
    for m in messages {
        let e = Envelope::<Job>::decode(&m.payload).unwrap();
        assert!(ids.insert(e.id), "event {} delivered twice", e.id);
        let expected = next.entry(e.payload.aggregate.clone()).or_default();
        assert_eq!(e.payload.seq, *expected, "aggregate {} out of order or with a gap", e.payload.aggregate);
        *expected += 1;
    }
    assert_eq!(next.len(), aggregates);
    assert!(next.values().all(|n| *n == per_aggregate), "every aggregate complete: {next:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_events_through_two_relays_arrive_once_each_in_aggregate_order() {
    let env = Env::new().await;
    let (aggregates, per_aggregate) = (50usize, 200u64);
    let shutdown = CancellationToken::new();
    let small_batches = OutboxConfig {
        batch_aggregates: 8,
        batch_rows: 64,
        poll_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let relays = [
        tokio::spawn(relay(&env, small_batches.clone()).run(shutdown.clone())),
        tokio::spawn(relay(&env, small_batches).run(shutdown.clone())),
    ];

    // Four writers, each owning some aggregates, commit while the relays run.
    let mut writers = Vec::new();
    for w in 0..4 {
        let pool = env.pool.clone();
        writers.push(tokio::spawn(async move {
            for seq in 0..per_aggregate {
                let mut conn = pool.get().await.unwrap();
                conn.transaction::<_, StorageError, _>(async |c| {
                    for a in (w..aggregates).step_by(4) {
                        enqueue(c, &job(&format!("agg-{a}"), seq, Mode::Succeed)).await?;
                    }
                    Ok(())
                })
                .await
                .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }

    let subject = env.topology().subject(Subject::OrderStatus);
    let total = aggregates * per_aggregate as usize;
    let messages = env.read_all(&subject, total).await;
    assert_in_order_exactly_once(&messages, aggregates, per_aggregate);
    testkit::eventually(Duration::from_secs(10), "outbox empty", || async {
        (outbox_depth(&env).await == 0).then_some(())
    })
    .await;
    shutdown.cancel();
    for r in relays {
        r.await.unwrap();
    }
    assert_eq!(
        env.stream_count(&env.topology().stream_of(Subject::OrderStatus)).await,
        total as u64,
        "no duplicates stored"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_that_dies_after_the_puback_but_before_the_delete_duplicates_nothing() {
    let env = Env::new().await;
    let events: Vec<_> = (0..100).map(|i| job("agg", i, Mode::Succeed)).collect();
    write(&env, &events).await;

    // Make the relay's DELETE fail, as if the process died right after JetStream acknowledged the batch.
    let mut conn = storage::connect(&storage::DbConfig::new(&env.db.url)).await.unwrap();
    diesel::sql_query(
        "CREATE FUNCTION crash() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'relay crashed'; END $$",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    diesel::sql_query("CREATE TRIGGER crash BEFORE DELETE ON outbox FOR EACH STATEMENT EXECUTE FUNCTION crash()")
        .execute(&mut conn)
        .await
        .unwrap();

    let r = relay(&env, OutboxConfig::default());
    assert!(r.drain_once().await.is_err(), "the delete fails, so the batch's transaction rolls back");
    assert!(r.drain_once().await.is_err(), "and again: the same rows are published a second time");
    assert_eq!(outbox_depth(&env).await, 100, "rows stay until a relay deletes them");

    diesel::sql_query("DROP TRIGGER crash ON outbox").execute(&mut conn).await.unwrap();
    assert_eq!(r.drain().await.unwrap(), 100);
    assert_eq!(outbox_depth(&env).await, 0);

    let subject = env.topology().subject(Subject::OrderStatus);
    let messages = env.read_all(&subject, 100).await;
    assert_in_order_exactly_once(&messages, 1, 100);
    assert_eq!(
        env.stream_count(&env.topology().stream_of(Subject::OrderStatus)).await,
        100,
        "JetStream dropped both re-publishes by Nats-Msg-Id"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn events_committed_while_no_relay_runs_or_while_it_is_killed_are_delivered_once() {
    let env = Env::new().await;
    // committed while nothing relays (the process was down)
    let before: Vec<_> = (0..500).map(|i| job("agg", i, Mode::Succeed)).collect();
    write(&env, &before).await;

    // a relay starts and is killed mid-stream, repeatedly
    let subject = env.topology().subject(Subject::OrderStatus);
    let stream = env.topology().stream_of(Subject::OrderStatus);
    let cfg = OutboxConfig {
        batch_aggregates: 1,
        batch_rows: 10,
        poll_interval: Duration::from_millis(50),
        ..Default::default()
    };
    for round in 0..3u64 {
        let token = CancellationToken::new();
        let task = tokio::spawn(relay(&env, cfg.clone()).run(token.clone()));
        let target = 100 * (round + 1);
        testkit::eventually(Duration::from_secs(20), "some progress before the kill", || async {
            (env.stream_count(&stream).await >= target).then_some(())
        })
        .await;
        task.abort(); // no graceful stop: the task dies wherever it is
        let _ = task.await;
    }
    let after: Vec<_> = (500..600).map(|i| job("agg", i, Mode::Succeed)).collect();
    write(&env, &after).await;

    let token = CancellationToken::new();
    let task = tokio::spawn(relay(&env, cfg).run(token.clone()));
    let messages = env.read_all(&subject, 600).await;
    assert_in_order_exactly_once(&messages, 1, 600);
    testkit::eventually(Duration::from_secs(10), "outbox empty", || async {
        (outbox_depth(&env).await == 0).then_some(())
    })
    .await;
    token.cancel();
    task.await.unwrap();
    assert_eq!(env.stream_count(&stream).await, 600);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_wakes_the_relay_through_listen_notify() {
    let env = Env::new().await;
    // Polling once an hour: only the NOTIFY can make this event arrive within the deadline.
    let cfg = OutboxConfig { poll_interval: Duration::from_secs(3600), ..Default::default() };
    let token = CancellationToken::new();
    let task = tokio::spawn(relay(&env, cfg).run(token.clone()));
    // Let the relay go idle (drained an empty outbox and waiting) before writing.
    let stream = env.topology().stream_of(Subject::OrderStatus);
    for i in 0..3 {
        write(&env, &[job("agg", i, Mode::Succeed)]).await;
        testkit::eventually(Duration::from_secs(5), "notified relay publishes", || async {
            (env.stream_count(&stream).await == i + 1).then_some(())
        })
        .await;
    }
    token.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolled_back_transaction_publishes_nothing() {
    let env = Env::new().await;
    let mut conn = env.pool.get().await.unwrap();
    let _ = conn
        .transaction::<(), StorageError, _>(async |c| {
            enqueue(c, &job("agg", 0, Mode::Succeed)).await?;
            Err(StorageError::Unavailable("the state change failed".into()))
        })
        .await;
    write(&env, &[job("agg", 1, Mode::Succeed)]).await;
    relay(&env, OutboxConfig::default()).drain().await.unwrap();
    let messages = env.read_all(&env.topology().subject(Subject::OrderStatus), 1).await;
    assert_eq!(Envelope::<Job>::decode(&messages[0].payload).unwrap().payload.seq, 1);
    assert_eq!(env.stream_count(&env.topology().stream_of(Subject::OrderStatus)).await, 1);
}

/// Writes `events` through the fast path: one transaction, published by the writer after its commit.
async fn write_fast(outbox: &bus::Outbox, env: &Env, events: &[Envelope<Job>]) {
    let mut conn = env.pool.get().await.unwrap();
    outbox
        .transaction::<_, StorageError, _>(&mut conn, async |_c, staged| {
            for e in events {
                staged.add(e);
            }
            Ok(())
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writer_publishes_its_own_events_after_commit_and_the_rows_go_without_any_relay() {
    let env = Env::new().await;
    let outbox = bus::Outbox::new(env.pool.clone(), env.publisher.clone());
    let stream = env.topology().stream_of(Subject::OrderStatus);
    // Each transaction follows the one before once its rows are published and gone, as a processor's next event
    // of an aggregate follows a consumer hop.
    for i in 0..3u64 {
        write_fast(&outbox, &env, &[job("agg", 2 * i, Mode::Succeed), job("agg", 2 * i + 1, Mode::Succeed)]).await;
        testkit::eventually(Duration::from_secs(5), "published by the writer and deleted", || async {
            (env.stream_count(&stream).await == 2 * i + 2 && outbox_depth(&env).await == 0).then_some(())
        })
        .await;
    }
    let messages = env.read_all(&env.topology().subject(Subject::OrderStatus), 6).await;
    assert_in_order_exactly_once(&messages, 1, 6);
    testkit::eventually(Duration::from_secs(5), "published rows deleted", || async {
        (outbox_depth(&env).await == 0).then_some(())
    })
    .await;
    assert_eq!(env.stream_count(&stream).await, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_behind_an_unpublished_one_of_its_aggregate_waits_for_the_relay_and_keeps_the_order() {
    let env = Env::new().await;
    let outbox = bus::Outbox::new(env.pool.clone(), env.publisher.clone());
    let subject = env.topology().subject(Subject::OrderStatus);
    let stream = env.topology().stream_of(Subject::OrderStatus);
    // seq 0 left to the relays (none runs yet); seq 1 of the same aggregate must not overtake it, while another
    // aggregate's event goes out at once.
    write(&env, &[job("agg", 0, Mode::Succeed)]).await;
    write_fast(&outbox, &env, &[job("agg", 1, Mode::Succeed)]).await;
    write_fast(&outbox, &env, &[job("other", 0, Mode::Succeed)]).await;
    let first = env.read_all(&subject, 1).await;
    assert_eq!(Envelope::<Job>::decode(&first[0].payload).unwrap().payload.aggregate, "other");
    testkit::eventually(Duration::from_secs(5), "the other aggregate's row deleted", || async {
        (outbox_depth(&env).await == 2).then_some(())
    })
    .await;
    assert_eq!(env.stream_count(&stream).await, 1, "agg's events wait for the relay");

    relay(&env, OutboxConfig::default()).drain().await.unwrap();
    let messages = env.read_all(&subject, 3).await;
    let agg: Vec<_> = messages
        .iter()
        .filter(|m| Envelope::<Job>::decode(&m.payload).unwrap().payload.aggregate == "agg")
        .cloned()
        .collect();
    assert_in_order_exactly_once(&agg, 1, 2);
    assert_eq!(outbox_depth(&env).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolled_back_fast_transaction_publishes_nothing() {
    let env = Env::new().await;
    let outbox = bus::Outbox::new(env.pool.clone(), env.publisher.clone());
    let mut conn = env.pool.get().await.unwrap();
    let failed = outbox
        .transaction::<(), StorageError, _>(&mut conn, async |_c, staged| {
            staged.add(&job("agg", 0, Mode::Succeed));
            Err(StorageError::Unavailable("the state change failed".into()))
        })
        .await;
    assert!(failed.is_err());
    write_fast(&outbox, &env, &[job("agg", 1, Mode::Succeed)]).await;
    let messages = env.read_all(&env.topology().subject(Subject::OrderStatus), 1).await;
    assert_eq!(Envelope::<Job>::decode(&messages[0].payload).unwrap().payload.seq, 1);
    assert_eq!(env.stream_count(&env.topology().stream_of(Subject::OrderStatus)).await, 1);
    // Published rows are deleted by a background task shortly after their PubAck.
    testkit::eventually(Duration::from_secs(5), "the published row deleted", || async {
        (outbox_depth(&env).await == 0).then_some(())
    })
    .await;
}

fn row_of(e: &Envelope<Job>) -> storage::outbox::NewOutboxRow {
    storage::outbox::NewOutboxRow {
        event_id: e.id,
        aggregate: bus::Event::aggregate(&e.payload),
        subject: Subject::OrderStatus.name().to_owned(),
        headers: serde_json::json!({}),
        payload: e.to_bytes(),
    }
}

/// A writer that committed rows it meant to publish itself (the fast path) and died before it could.
async fn write_and_die(env: &Env, events: &[Envelope<Job>]) {
    let rows: Vec<storage::outbox::NewOutboxRow> = events.iter().map(row_of).collect();
    let mut conn = env.pool.get().await.unwrap();
    let written = storage::outbox::insert_all(&mut conn, &rows, &[], true).await.unwrap();
    assert!(written.iter().all(|w| w.fast), "{written:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn relays_leave_a_writers_rows_to_it_and_sweep_them_once_they_are_older_than_sweep_after() {
    let env = Env::new().await;
    let subject = env.topology().subject(Subject::OrderStatus);
    let stream = env.topology().stream_of(Subject::OrderStatus);
    write_and_die(&env, &[job("agg", 0, Mode::Succeed), job("agg", 1, Mode::Succeed)]).await;
    // Rows for the relays: one of another aggregate, and one behind the writer's rows.
    write(&env, &[job("other", 0, Mode::Succeed)]).await;
    write(&env, &[job("agg", 2, Mode::Succeed)]).await;

    // A relay that still leaves the writer its rows takes only the other aggregate's.
    let patient = relay(&env, OutboxConfig { sweep_after: Duration::from_secs(3600), ..Default::default() });
    assert_eq!(patient.drain().await.unwrap(), 1);
    assert_eq!(env.stream_count(&stream).await, 1);
    assert_eq!(outbox_depth(&env).await, 3, "the writer's rows and the one behind them wait");

    // Once they are older than sweep_after, the relays publish them, in the aggregate's order, once each.
    let sweeping = relay(&env, OutboxConfig { sweep_after: Duration::from_millis(200), ..Default::default() });
    testkit::eventually(Duration::from_secs(5), "the dead writer's rows swept", || async {
        sweeping.drain().await.unwrap();
        (outbox_depth(&env).await == 0).then_some(())
    })
    .await;
    let messages = env.read_all(&subject, 4).await;
    let agg: Vec<_> = messages
        .iter()
        .filter(|m| Envelope::<Job>::decode(&m.payload).unwrap().payload.aggregate == "agg")
        .cloned()
        .collect();
    assert_in_order_exactly_once(&agg, 1, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_nats_refuses_is_parked_its_aggregate_waits_behind_it_and_the_others_flow() {
    let env = Env::new().await;
    let subject = env.topology().subject(Subject::OrderStatus);
    let stream = env.topology().stream_of(Subject::OrderStatus);
    // An event larger than the server's max_payload (1 MiB), then the next event of its aggregate and another
    // aggregate's, all for the relays.
    let mut poison = row_of(&job("agg", 0, Mode::Succeed));
    poison.payload = vec![b' '; 2 << 20];
    let mut conn = env.pool.get().await.unwrap();
    storage::outbox::insert_all(&mut conn, &[poison.clone()], &[], false).await.unwrap();
    drop(conn);
    write(&env, &[job("agg", 1, Mode::Succeed)]).await;
    write(&env, &[job("other", 0, Mode::Succeed)]).await;

    let relay = relay(&env, OutboxConfig::default());
    assert_eq!(relay.drain().await.unwrap(), 1, "the other aggregate's event goes; nothing fails the batch");
    let messages = env.read_all(&subject, 1).await;
    assert_eq!(Envelope::<Job>::decode(&messages[0].payload).unwrap().payload.aggregate, "other");
    assert_eq!(env.stream_count(&stream).await, 1);

    let mut conn = env.pool.get().await.unwrap();
    let parked = storage::outbox::parked(&mut conn).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!((parked[0].event_id, parked[0].aggregate.as_str()), (poison.event_id, "agg"));
    assert!(parked[0].reason.contains("max payload"), "{}", parked[0].reason);
    assert_eq!((parked[0].payload_bytes, parked[0].waiting_behind), (2 << 20, 1), "agg's next event waits behind it");
    let stats = storage::outbox::stats(&mut conn).await.unwrap();
    assert_eq!((stats.depth, stats.parked), (2, 1));
    // Relays keep skipping the aggregate: its order holds.
    assert_eq!(relay.drain().await.unwrap(), 0);
    assert_eq!(env.stream_count(&stream).await, 1);

    // Retried (after a fix elsewhere), the relays try it again; still too large, it is parked again.
    assert_eq!(storage::outbox::unpark(&mut conn, None).await.unwrap(), 1);
    assert!(storage::outbox::parked(&mut conn).await.unwrap().is_empty());
    assert_eq!(relay.drain().await.unwrap(), 0);
    let again = storage::outbox::parked(&mut conn).await.unwrap();
    assert_eq!(again.len(), 1);
    assert!(again[0].parked_at >= parked[0].parked_at);
    assert_eq!(env.stream_count(&stream).await, 1);
}
