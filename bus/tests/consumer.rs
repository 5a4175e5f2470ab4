//! The consumer runner against real JetStream and Postgres: retries, dead letters, duplicates and shutdown.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use bus::{
    Consumer, ConsumerConfig, ConsumerSpec, Delivery, Envelope, Handled, Handler, HandlerError, Subject, headers,
};
use common::{Env, Job, Mode, job};
use storage::{AsyncConnection, PgPool, StorageError, processed};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

const NAME: &str = "tester";

/// Records every call; commits its side effect with the event id claimed in `processed_event`, like a real handler.
#[derive(Clone)]
struct Recorder {
    pool: PgPool,
    calls: Arc<Mutex<Vec<(String, i64, Instant)>>>,
    effects: Arc<Mutex<Vec<String>>>,
    gate: Option<Arc<Semaphore>>,
}

impl Recorder {
    fn new(env: &Env) -> Recorder {
        Recorder { pool: env.pool.clone(), calls: Default::default(), effects: Default::default(), gate: None }
    }
    fn calls_for(&self, key: &str) -> Vec<(i64, Instant)> {
        self.calls.lock().unwrap().iter().filter(|c| c.0 == key).map(|c| (c.1, c.2)).collect()
    }
    fn effects(&self) -> Vec<String> {
        self.effects.lock().unwrap().clone()
    }
}

fn key(j: &Job) -> String {
    format!("{}-{}", j.aggregate, j.seq)
}

impl Handler for Recorder {
    type Event = Job;

    async fn handle(&self, event: Envelope<Job>, delivery: &Delivery) -> Result<Handled, HandlerError> {
        let k = key(&event.payload);
        self.calls.lock().unwrap().push((k.clone(), delivery.delivered, Instant::now()));
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        match event.payload.mode {
            Mode::FailFirst(n) if delivery.delivered <= n => return Err(HandlerError::Transient("flaky".into())),
            Mode::AlwaysTransient => return Err(HandlerError::Transient("database is down".into())),
            Mode::Permanent => return Err(HandlerError::Permanent("amount mismatch: 100 != 29900".into())),
            _ => {}
        }
        let mut conn = self.pool.get().await.map_err(|e| HandlerError::Transient(e.to_string()))?;
        let id = event.id.to_string();
        let fresh = conn
            .transaction::<_, StorageError, _>(async |c| processed::claim(c, NAME, &id).await)
            .await
            .map_err(HandlerError::from)?;
        if !fresh {
            return Ok(Handled::Duplicate);
        }
        self.effects.lock().unwrap().push(k);
        Ok(Handled::Done)
    }
}

fn fast() -> ConsumerConfig {
    ConsumerConfig {
        ack_wait: Duration::from_secs(2),
        handler_timeout: Duration::from_secs(1),
        backoff: vec![Duration::from_millis(100), Duration::from_millis(200)],
        max_deliver: 4,
        concurrency: 8,
    }
}

fn start(env: &Env, handler: Recorder, cfg: ConsumerConfig) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let token = CancellationToken::new();
    let consumer = Consumer::new(env.publisher.clone(), ConsumerSpec { name: NAME.into(), config: cfg }, handler);
    let t = token.clone();
    (token, tokio::spawn(async move { consumer.run(t).await.unwrap() }))
}

async fn durable(env: &Env) -> PullConsumer {
    try_durable(env).await.expect("the durable consumer exists")
}

/// The durable consumer, once the runner has provisioned it.
async fn try_durable(env: &Env) -> Option<PullConsumer> {
    let stream = env.js.get_stream(env.topology().stream_of(Subject::OrderStatus)).await.ok()?;
    stream.get_consumer(NAME).await.ok()
}

/// Waits until the durable consumer exists and has nothing pending and nothing awaiting an ack.
async fn settled(env: &Env) {
    let stream = env.js.get_stream(env.topology().stream_of(Subject::OrderStatus)).await.unwrap();
    testkit::eventually(Duration::from_secs(20), "consumer to settle", || {
        let stream = stream.clone();
        async move {
            let mut c: PullConsumer = stream.get_consumer(NAME).await.ok()?;
            let info = c.info().await.ok()?;
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
        }
    })
    .await;
}

async fn dead_letters(env: &Env, n: usize) -> Vec<async_nats::jetstream::Message> {
    env.read_all(&env.topology().dlq_subject(NAME), n).await
}

fn header(m: &async_nats::jetstream::Message, name: &str) -> String {
    m.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transient_failure_is_redelivered_after_a_delay_then_succeeds() {
    let env = Env::new().await;
    let rec = Recorder::new(&env);
    let (token, task) = start(&env, rec.clone(), fast());
    env.publisher.publish(&job("a", 1, Mode::FailFirst(2))).await.unwrap();

    testkit::eventually(Duration::from_secs(20), "success on the third delivery", || async {
        (rec.effects() == vec!["a-1".to_string()]).then_some(())
    })
    .await;
    let calls = rec.calls_for("a-1");
    assert_eq!(calls.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(calls[1].1 - calls[0].1 >= Duration::from_millis(100), "first retry waits backoff[0]");
    assert!(calls[2].1 - calls[1].1 >= Duration::from_millis(200), "second retry waits backoff[1]");
    settled(&env).await;
    token.cancel();
    task.await.unwrap();
    assert_eq!(env.stream_count(&env.topology().dlq_stream()).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_failure_is_dead_lettered_with_its_reason_and_not_redelivered() {
    let env = Env::new().await;
    let rec = Recorder::new(&env);
    let (token, task) = start(&env, rec.clone(), fast());
    let event = job("a", 1, Mode::Permanent);
    env.publisher.publish(&event).await.unwrap();

    let dead = dead_letters(&env, 1).await;
    assert_eq!(header(&dead[0], headers::DLQ_REASON), "amount mismatch: 100 != 29900");
    assert_eq!(header(&dead[0], headers::DLQ_CONSUMER), NAME);
    assert_eq!(header(&dead[0], headers::DLQ_DELIVERIES), "1");
    assert_eq!(header(&dead[0], headers::DLQ_SUBJECT), env.topology().subject(Subject::OrderStatus));
    assert_eq!(header(&dead[0], headers::DLQ_ORIGINAL_MSG_ID), event.id.to_string(), "original headers kept");
    assert_eq!(Envelope::<Job>::decode(&dead[0].payload).unwrap(), event, "payload kept as it was");
    settled(&env).await;
    token.cancel();
    task.await.unwrap();
    assert_eq!(rec.calls_for("a-1").len(), 1, "terminated, not redelivered");
    assert!(rec.effects().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn undecodable_messages_are_dead_lettered_as_poison() {
    let env = Env::new().await;
    let rec = Recorder::new(&env);
    let (token, task) = start(&env, rec.clone(), fast());
    let subject = env.topology().subject(Subject::OrderStatus);
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, "garbage-1");
    env.publisher.publish_raw(&subject, h, bytes::Bytes::from_static(b"\x00\xffnot an envelope")).await.unwrap();
    let mut wrong = serde_json::to_value(job("a", 2, Mode::Succeed)).unwrap();
    wrong["type"] = "someone.else".into();
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, "wrong-type-1");
    env.publisher.publish_raw(&subject, h, serde_json::to_vec(&wrong).unwrap().into()).await.unwrap();

    let dead = dead_letters(&env, 2).await;
    let reasons: Vec<String> = dead.iter().map(|m| header(m, headers::DLQ_REASON)).collect();
    assert!(reasons.iter().any(|r| r.starts_with("poison: undecodable envelope")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("unexpected event type")), "{reasons:?}");
    assert_eq!(
        &dead.iter().find(|m| header(m, headers::DLQ_ORIGINAL_MSG_ID) == "garbage-1").unwrap().payload[..],
        b"\x00\xffnot an envelope"
    );
    settled(&env).await;
    token.cancel();
    task.await.unwrap();
    assert!(rec.calls.lock().unwrap().is_empty(), "the handler never sees poison");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_always_fails_reaches_the_dlq_after_max_deliver() {
    let env = Env::new().await;
    let rec = Recorder::new(&env);
    let (token, task) = start(&env, rec.clone(), fast());
    env.publisher.publish(&job("a", 1, Mode::AlwaysTransient)).await.unwrap();

    let dead = dead_letters(&env, 1).await;
    assert_eq!(header(&dead[0], headers::DLQ_DELIVERIES), "4");
    assert!(header(&dead[0], headers::DLQ_REASON).starts_with("still failing after 4 deliveries"));
    settled(&env).await;
    token.cancel();
    task.await.unwrap();
    assert_eq!(rec.calls_for("a-1").iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_that_hangs_every_time_is_dead_lettered_not_stuck() {
    let env = Env::new().await;
    let mut rec = Recorder::new(&env);
    rec.gate = Some(Arc::new(Semaphore::new(0))); // never opens: every attempt times out
    let cfg = ConsumerConfig { max_deliver: 3, ..fast() };
    let (token, task) = start(&env, rec.clone(), cfg);
    env.publisher.publish(&job("a", 1, Mode::Succeed)).await.unwrap();
    let dead = dead_letters(&env, 1).await;
    assert!(
        header(&dead[0], headers::DLQ_REASON).contains("handler timed out"),
        "{}",
        header(&dead[0], headers::DLQ_REASON)
    );
    token.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_message_id_inside_the_window_is_dropped_by_jetstream() {
    let env = Env::new().await;
    let rec = Recorder::new(&env);
    let event = job("a", 1, Mode::Succeed);
    assert!(!env.publisher.publish(&event).await.unwrap().duplicate);
    assert!(env.publisher.publish(&event).await.unwrap().duplicate, "JetStream reports the repeat");
    let (token, task) = start(&env, rec.clone(), fast());
    settled(&env).await;
    token.cancel();
    task.await.unwrap();
    assert_eq!(env.stream_count(&env.topology().stream_of(Subject::OrderStatus)).await, 1);
    assert_eq!(rec.calls_for("a-1").len(), 1);
    assert_eq!(rec.effects(), vec!["a-1".to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_after_the_window_is_a_no_op_thanks_to_processed_event() {
    let env = Env::with_topology(|t| t.with_duplicate_window(Duration::from_millis(500))).await;
    let rec = Recorder::new(&env);
    let (token, task) = start(&env, rec.clone(), fast());
    let event = job("a", 1, Mode::Succeed);
    env.publisher.publish(&event).await.unwrap();
    testkit::eventually(Duration::from_secs(10), "first delivery handled", || async {
        (rec.effects().len() == 1).then_some(())
    })
    .await;

    // Re-publish until JetStream no longer recognises the id (the window has passed): a real replay.
    testkit::eventually(Duration::from_secs(20), "duplicate window to pass", || async {
        (!env.publisher.publish(&event).await.unwrap().duplicate).then_some(())
    })
    .await;
    testkit::eventually(Duration::from_secs(10), "replay delivered", || async {
        (rec.calls_for("a-1").len() == 2).then_some(())
    })
    .await;
    settled(&env).await;
    token.cancel();
    task.await.unwrap();
    assert_eq!(rec.effects(), vec!["a-1".to_string()], "the side effect happened once");
    let rendered = observability::render_metrics();
    assert!(
        rendered.contains(r#"paystream_events_consumed_total{consumer="tester",outcome="duplicate"}"#),
        "{rendered}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_finishes_in_flight_work_and_loses_nothing() {
    let env = Env::new().await;
    let gate = Arc::new(Semaphore::new(0));
    let mut rec = Recorder::new(&env);
    rec.gate = Some(gate.clone());
    let cfg = ConsumerConfig { concurrency: 4, ..fast() };
    let (token, task) = start(&env, rec.clone(), cfg.clone());
    for i in 0..20 {
        env.publisher.publish(&job("a", i, Mode::Succeed)).await.unwrap();
    }
    testkit::eventually(Duration::from_secs(10), "four handlers in flight", || async {
        (rec.calls.lock().unwrap().len() == 4).then_some(())
    })
    .await;

    token.cancel();
    // The runner must wait for in-flight handlers: it cannot finish while they are blocked.
    let mut task = task;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut task).await.is_err(),
        "the runner must not return while handlers are still working"
    );
    gate.add_permits(1000);
    task.await.unwrap();
    let in_flight: Vec<String> = rec.calls.lock().unwrap().iter().map(|c| c.0.clone()).collect();
    let mut done = rec.effects();
    done.sort();
    let mut expected = in_flight.clone();
    expected.sort();
    assert_eq!(done, expected, "everything started before the stop was finished and committed");

    // A new runner picks up the rest; nothing is lost and nothing is done twice.
    let (token, task) = start(&env, rec.clone(), cfg);
    testkit::eventually(Duration::from_secs(20), "all twenty handled", || async {
        (rec.effects().len() == 20).then_some(())
    })
    .await;
    settled(&env).await;
    token.cancel();
    task.await.unwrap();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for e in rec.effects() {
        *counts.entry(e).or_default() += 1;
    }
    assert_eq!(counts.len(), 20);
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn provisioning_reapplies_the_configuration() {
    let env = Env::new().await;
    let rec = Recorder::new(&env);
    let consumer =
        Consumer::new(env.publisher.clone(), ConsumerSpec { name: NAME.into(), config: fast() }, rec.clone());
    consumer.provision().await.unwrap();
    let changed = ConsumerConfig { ack_wait: Duration::from_secs(7), max_deliver: 6, ..fast() };
    let consumer = Consumer::new(env.publisher.clone(), ConsumerSpec { name: NAME.into(), config: changed }, rec);
    consumer.provision().await.unwrap();
    let mut c = durable(&env).await;
    let info = c.info().await.unwrap();
    assert_eq!(info.config.max_deliver, -1, "the runner counts deliveries itself; JetStream never gives up");
    assert_eq!(info.config.backoff, vec![Duration::from_secs(7), Duration::from_secs(7)], "never sooner than ack_wait");
    assert_eq!(info.config.ack_policy, async_nats::jetstream::consumer::AckPolicy::Explicit);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_that_cannot_be_stored_is_retried_until_it_is() {
    let env = Env::new().await;
    let rec = Recorder::new(&env);
    // The dead-letter stream is gone (an outage, a mistake): nothing can be dead-lettered for now.
    env.js.delete_stream(env.topology().dlq_stream()).await.unwrap();
    let (token, task) = start(&env, rec.clone(), ConsumerConfig { max_deliver: 2, ..fast() });
    env.publisher.publish(&job("a", 1, Mode::AlwaysTransient)).await.unwrap();
    // Its deliveries are used up and the dead letter failed, more than once: the message keeps coming back.
    testkit::eventually(Duration::from_secs(20), "deliveries past max_deliver", || async {
        let mut c = try_durable(&env).await?;
        let info = c.info().await.ok()?;
        (info.delivered.stream_sequence == 1 && info.num_ack_pending == 1 && rec.calls_for("a-1").len() == 2)
            .then_some(())
    })
    .await;
    testkit::eventually(Duration::from_secs(20), "a third delivery after the failed dead letter", || async {
        let mut c = try_durable(&env).await?;
        let info = c.info().await.ok()?;
        (info.num_redelivered >= 1 && info.ack_floor.stream_sequence == 0).then_some(())
    })
    .await;
    // Meanwhile the metric behind PaystreamDeadLetterNotStored counts it.
    let failed = format!("paystream_events_consumed_total{{consumer=\"{NAME}\",outcome=\"dlq_failed\"}} ");
    let metrics = observability::render_metrics();
    let count: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(failed.as_str()))
        .unwrap_or_else(|| panic!("{failed} missing from\n{metrics}"))
        .parse()
        .unwrap();
    assert!(count >= 1.0, "{failed}{count}");
    // The stream is back: the next delivery stores the dead letter and ends the message.
    env.topology().ensure_streams(&env.js).await.unwrap();
    let dead = dead_letters(&env, 1).await;
    assert!(
        header(&dead[0], headers::DLQ_REASON).contains("still failing after 2 deliveries")
            || header(&dead[0], headers::DLQ_REASON).contains("no answer after 2 deliveries"),
        "{}",
        header(&dead[0], headers::DLQ_REASON)
    );
    settled(&env).await;
    token.cancel();
    task.await.unwrap();
    assert_eq!(rec.calls_for("a-1").len(), 2, "the handler ran max_deliver times; the rest were dead-letter attempts");
}
