//! DLQ tooling against real JetStream and Postgres: a message forced into the DLQ is listed and, after redrive,
//! processed; unknown IDs and foreign subjects are refused; a consumer filter only touches that consumer's letters.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use bus::dlq::{self, DeadLetter, DlqError};
use bus::{
    Consumer, ConsumerConfig, ConsumerSpec, Delivery, Envelope, Handled, Handler, HandlerError, Subject, headers,
};
use common::{Env, Job, Mode, job};
use storage::{AsyncConnection, PgPool, StorageError, processed};
use tokio_util::sync::CancellationToken;

/// Fails permanently while `failing` is set; otherwise commits its effect with the event id claimed, like a real
/// idempotent handler.
#[derive(Clone)]
struct Switch {
    name: &'static str,
    pool: PgPool,
    failing: Arc<AtomicBool>,
    effects: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Vec<(String, HeaderMap)>>>,
}

impl Switch {
    fn new(env: &Env, name: &'static str) -> Switch {
        Switch {
            name,
            pool: env.pool.clone(),
            failing: Arc::new(AtomicBool::new(true)),
            effects: Default::default(),
            seen: Default::default(),
        }
    }
    fn succeed(&self) {
        self.failing.store(false, Ordering::SeqCst);
    }
    fn effects(&self) -> Vec<String> {
        let mut e = self.effects.lock().unwrap().clone();
        e.sort();
        e
    }
}

fn key(j: &Job) -> String {
    format!("{}-{}", j.aggregate, j.seq)
}

impl Handler for Switch {
    type Event = Job;

    async fn handle(&self, event: Envelope<Job>, delivery: &Delivery) -> Result<Handled, HandlerError> {
        let k = key(&event.payload);
        self.seen.lock().unwrap().push((k.clone(), delivery.headers.clone()));
        if self.failing.load(Ordering::SeqCst) {
            return Err(HandlerError::Permanent(format!("refused by {}", self.name)));
        }
        let mut conn = self.pool.get().await.map_err(|e| HandlerError::Transient(e.to_string()))?;
        let (name, id) = (self.name, event.id.to_string());
        let fresh = conn
            .transaction::<_, StorageError, _>(async |c| processed::claim(c, name, &id).await)
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
        backoff: vec![Duration::from_millis(100)],
        max_deliver: 3,
        concurrency: 4,
    }
}

struct Running(CancellationToken, Vec<tokio::task::JoinHandle<()>>);

impl Running {
    async fn stop(self) {
        self.0.cancel();
        for t in self.1 {
            t.await.unwrap();
        }
    }
}

/// Starts the handlers as durable consumers and waits until each is provisioned.
async fn start(env: &Env, handlers: &[Switch]) -> Running {
    let token = CancellationToken::new();
    let mut tasks = Vec::new();
    for h in handlers {
        let consumer =
            Consumer::new(env.publisher.clone(), ConsumerSpec { name: h.name.to_owned(), config: fast() }, h.clone());
        consumer.provision().await.unwrap();
        let t = token.clone();
        tasks.push(tokio::spawn(async move { consumer.run(t).await.unwrap() }));
    }
    Running(token, tasks)
}

async fn list(env: &Env, consumer: Option<&str>) -> Vec<DeadLetter> {
    dlq::list(&env.js, env.topology(), consumer).await.unwrap()
}

/// Waits until `consumer` has `n` letters listed, and returns them.
async fn letters(env: &Env, consumer: &str, n: usize) -> Vec<DeadLetter> {
    testkit::eventually(Duration::from_secs(20), &format!("{n} dead letters of {consumer}"), || async {
        let l = list(env, Some(consumer)).await;
        (l.len() == n).then_some(l)
    })
    .await
}

fn seqs(letters: &[DeadLetter]) -> HashSet<u64> {
    letters.iter().map(|l| l.seq).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_is_listed_and_after_redrive_processed_and_gone() {
    let env = Env::new().await;
    let a = Switch::new(&env, "dlq-a");
    let running = start(&env, std::slice::from_ref(&a)).await;
    assert!(list(&env, None).await.is_empty(), "an empty DLQ lists nothing");

    let first = job("x", 1, Mode::Succeed);
    let second = job("x", 2, Mode::Succeed);
    env.publisher.publish(&first).await.unwrap();
    env.publisher.publish(&second).await.unwrap();

    let dead = letters(&env, "dlq-a", 2).await;
    let letter = dead.iter().find(|l| l.original_msg_id.as_deref() == Some(&first.id.to_string())).unwrap().clone();
    assert_eq!(letter.consumer, "dlq-a");
    assert_eq!(letter.reason, "refused by dlq-a");
    assert_eq!(letter.deliveries, 1);
    assert_eq!(letter.subject, env.topology().subject(Subject::OrderStatus));
    assert_eq!(letter.original_stream.as_deref(), Some(env.topology().stream_of(Subject::OrderStatus).as_str()));
    assert!(letter.age < Duration::from_secs(60), "age {:?}", letter.age);
    assert_eq!(letter.decode::<Job>().unwrap(), first, "payload kept as it was");
    assert_eq!(seqs(&list(&env, None).await), seqs(&dead), "unfiltered listing shows them too");
    assert!(list(&env, Some("nobody")).await.is_empty());
    assert!(a.effects().is_empty());

    // The cause is fixed; the operator redrives one letter.
    a.succeed();
    let out = dlq::redrive(&env.publisher, letter.seq).await.unwrap();
    assert_eq!(out.seq, letter.seq);
    assert_eq!(out.consumer, "dlq-a");
    assert_eq!(out.subject, letter.subject);
    assert_eq!(out.msg_id, format!("redrive:{}", letter.seq));
    assert!(!out.duplicate);
    testkit::eventually(Duration::from_secs(20), "the redriven message to be handled", || async {
        (a.effects() == vec!["x-1".to_string()]).then_some(())
    })
    .await;

    // It is gone from the DLQ; the other letter is still there.
    let left = list(&env, Some("dlq-a")).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].original_msg_id.as_deref(), Some(second.id.to_string().as_str()));

    // What the handler saw on the redelivery: the original headers, a new message id, no DLQ metadata.
    let seen = a.seen.lock().unwrap().clone();
    let (_, h) = seen.iter().rfind(|(k, _)| k == "x-1").unwrap();
    assert_eq!(h.get(headers::MSG_ID).unwrap().as_str(), out.msg_id);
    assert_eq!(h.get(dlq::REDRIVEN_FROM).unwrap().as_str(), letter.seq.to_string());
    assert_eq!(h.get(headers::EVENT_TYPE).unwrap().as_str(), "test.job.v1");
    assert!(h.get(headers::DLQ_REASON).is_none() && h.get(headers::DLQ_CONSUMER).is_none(), "{h:?}");

    // Redriving it again, or an ID that never existed: a typed refusal, nothing published.
    assert!(matches!(dlq::redrive(&env.publisher, letter.seq).await, Err(DlqError::NotFound(s)) if s == letter.seq));
    assert!(matches!(dlq::redrive(&env.publisher, 987_654).await, Err(DlqError::NotFound(987_654))));
    assert!(matches!(dlq::list(&env.js, env.topology(), Some("a.b")).await, Err(DlqError::BadConsumer(_))));

    running.stop().await;
    assert_eq!(a.effects(), vec!["x-1".to_string()], "handled once");
}

#[tokio::test(flavor = "multi_thread")]
async fn redrive_all_with_a_consumer_filter_only_touches_that_consumers_letters() {
    let env = Env::new().await;
    let a = Switch::new(&env, "dlq-a");
    let b = Switch::new(&env, "dlq-b");
    let running = start(&env, &[a.clone(), b.clone()]).await;
    for n in 1..=3 {
        env.publisher.publish(&job("y", n, Mode::Succeed)).await.unwrap();
    }
    // Both consumers of the subject refuse all three.
    letters(&env, "dlq-a", 3).await;
    let b_before = seqs(&letters(&env, "dlq-b", 3).await);
    let depth = dlq::depth(&env.js, env.topology()).await.unwrap();
    assert_eq!(depth.into_iter().collect::<Vec<_>>(), [("dlq-a".to_string(), 3), ("dlq-b".to_string(), 3)]);

    a.succeed();
    let report = dlq::redrive_all(&env.publisher, Some("dlq-a")).await.unwrap();
    assert_eq!(report.redriven.len(), 3);
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    assert!(report.redriven.iter().all(|o| o.consumer == "dlq-a"));
    testkit::eventually(Duration::from_secs(20), "a to handle its three", || async {
        (a.effects().len() == 3).then_some(())
    })
    .await;
    assert!(list(&env, Some("dlq-a")).await.is_empty());
    // b's letters are untouched. (The republished messages reach every consumer of the subject, so b, still
    // refusing, dead-letters the copies too: they show up as new letters.)
    let b_now = letters(&env, "dlq-b", 6).await;
    assert!(b_before.is_subset(&seqs(&b_now)));
    assert!(b.effects().is_empty());

    // Fixed too: redriving everything lets b handle each event once, and a drops the replays as duplicates.
    b.succeed();
    let report = dlq::redrive_all(&env.publisher, None).await.unwrap();
    assert_eq!(report.redriven.len(), 6);
    testkit::eventually(Duration::from_secs(20), "b to handle its three", || async {
        (b.effects() == vec!["y-1".to_string(), "y-2".into(), "y-3".into()]).then_some(())
    })
    .await;
    assert!(list(&env, None).await.is_empty());
    running.stop().await;
    assert_eq!(a.effects().len(), 3, "a handled each event once");
    assert_eq!(b.effects().len(), 3, "b handled each event once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_letter_from_a_foreign_subject_or_refused_by_prepare_stays_in_the_dlq() {
    let env = Env::new().await;
    let topology = env.topology();
    // A letter claiming to come from another deployment's subject.
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, "dlq:forged:1");
    h.insert(headers::DLQ_CONSUMER, "dlq-a");
    h.insert(headers::DLQ_SUBJECT, "elsewhere.order.status");
    h.insert(headers::DLQ_REASON, "forged");
    env.publisher.publish_raw(&topology.dlq_subject("dlq-a"), h, bytes::Bytes::from_static(b"{}")).await.unwrap();
    // A letter pointing back into the DLQ.
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, "dlq:loop:1");
    h.insert(headers::DLQ_SUBJECT, topology.dlq_subject("dlq-a").as_str());
    env.publisher.publish_raw(&topology.dlq_subject("dlq-a"), h, bytes::Bytes::from_static(b"{}")).await.unwrap();
    // A genuine-looking one the prepare step refuses.
    let event = job("z", 1, Mode::Succeed);
    let mut h = event.headers();
    h.insert(headers::MSG_ID, "dlq:real:1");
    h.insert(headers::DLQ_SUBJECT, topology.subject(Subject::OrderStatus).as_str());
    env.publisher.publish_raw(&topology.dlq_subject("dlq-c"), h, event.to_bytes().into()).await.unwrap();

    let all = list(&env, None).await;
    assert_eq!(all.len(), 3);
    for l in &all[..2] {
        assert!(
            matches!(dlq::redrive(&env.publisher, l.seq).await, Err(DlqError::ForeignSubject { seq, .. }) if seq == l.seq)
        );
    }
    let prepared = Mutex::new(Vec::new());
    let refused = dlq::redrive_with(&env.publisher, all[2].seq, async |l: &DeadLetter| {
        prepared.lock().unwrap().push(l.decode::<Job>()?.id);
        Err("ledger says no".to_string())
    })
    .await;
    assert!(matches!(refused, Err(DlqError::Prepare { ref reason, .. }) if reason == "ledger says no"), "{refused:?}");
    assert_eq!(*prepared.lock().unwrap(), vec![event.id], "prepare saw the decoded letter");

    let report = dlq::redrive_all(&env.publisher, Some("dlq-a")).await.unwrap();
    assert!(report.redriven.is_empty());
    assert_eq!(report.refused.len(), 2);
    assert_eq!(seqs(&list(&env, None).await), seqs(&all), "nothing left the DLQ");
    assert_eq!(env.stream_count(&topology.stream_of(Subject::OrderStatus)).await, 0, "nothing was republished");
}
