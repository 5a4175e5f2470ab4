//! Dead-letter tooling (DESIGN.md §3 rule 4): list what the consumers gave up on, and redrive it.
//!
//! The consumer runner publishes a message it cannot handle to `<prefix>.dlq.<consumer>` (stream `<PREFIX>_DLQ`)
//! with the original payload, the original headers and `Paystream-Dlq-*` headers saying why. Here:
//!
//! - [`list`] reads the DLQ stream (an ephemeral ordered consumer, nothing is acknowledged or removed) and returns
//!   one [`DeadLetter`] per stored letter, optionally only those of one consumer. A letter's ID is its sequence in
//!   the DLQ stream ([`DeadLetter::seq`]); that is what [`redrive`] takes.
//! - [`redrive`] republishes one letter's payload with its original headers (without the DLQ ones) to its original
//!   subject, under a new `Nats-Msg-Id` = `redrive:<dlq seq>` (the original id may still sit in JetStream's duplicate
//!   window and would be dropped; the new one makes a repeated redrive of the same letter inside the window a no-op),
//!   waits for the PubAck, and only then deletes the letter from the DLQ stream. Consumers are idempotent, so
//!   republishing is safe; note that *every* consumer of that subject sees the message again (the ones that already
//!   handled it ack it as a duplicate).
//! - [`redrive_all`] does that for every letter (of one consumer).
//! - [`redrive_with`] / [`redrive_all_with`] run a caller's `prepare` step before each republish, for consumers whose
//!   ledger must be reopened first (the notifier's `failed` rows: `notifier::ledger::reopen_failed`). `paystream dlq`
//!   does that for `notifier-*` letters.
//!
//! A letter whose original subject is not a subject of this deployment (another prefix, a DLQ subject, something
//! unknown) is refused with [`DlqError::ForeignSubject`]; an unknown ID with [`DlqError::NotFound`].
//!
//! From the command line (`paystream dlq`):
//!
//! ```text
//! paystream dlq list [--consumer C] [--json]     # ID, consumer, age, deliveries, reason, original subject
//! paystream dlq redrive ID                       # one letter
//! paystream dlq redrive --all [--consumer C]     # every letter (of consumer C)
//! ```

use std::collections::{BTreeMap, HashSet};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use async_nats::{HeaderMap, jetstream};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};

use crate::{BusError, Envelope, Event, Publisher, Subject, Topology, headers};

/// Prefix of every dead-letter metadata header (`Paystream-Dlq-Reason`, …); stripped on redrive.
const DLQ_HEADER_PREFIX: &str = "Paystream-Dlq-";

/// Set on a redriven message: the DLQ sequence it came from (kept if it is dead-lettered again).
pub const REDRIVEN_FROM: &str = "Paystream-Redriven-From";

/// Errors of the DLQ tooling.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// No letter with this ID in the DLQ stream (never there, already redriven, or expired).
    #[error("no dead letter {0} in the DLQ stream (already redriven or expired?)")]
    NotFound(u64),
    /// The letter's original subject is not an event subject of this deployment: redriving it would publish
    /// somewhere else (or back into the DLQ).
    #[error(
        "dead letter {seq} came from subject {subject:?}, which is not an event subject under this prefix; refused"
    )]
    ForeignSubject { seq: u64, subject: String },
    /// The consumer filter is not a consumer name.
    #[error("{0:?} is not a consumer name (one subject token: no '.', '*', '>' or spaces)")]
    BadConsumer(String),
    /// The caller's `prepare` step refused the letter; nothing was republished.
    #[error("dead letter {seq} not redriven: {reason}")]
    Prepare { seq: u64, reason: String },
    /// Republished, but the letter could not be removed from the DLQ stream. Redriving it again inside the
    /// duplicate window is deduplicated by JetStream; after it, consumers drop the replay as a duplicate.
    #[error(
        "dead letter {seq} republished to {subject} (stream seq {stream_seq}) but not removed from the DLQ: {error}"
    )]
    NotRemoved { seq: u64, subject: String, stream_seq: u64, error: String },
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// One stored dead letter.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Sequence in the DLQ stream: the letter's ID for [`redrive`].
    pub seq: u64,
    /// The consumer that gave up (`Paystream-Dlq-Consumer`, else the last token of the DLQ subject).
    pub consumer: String,
    /// The original wire subject (`Paystream-Dlq-Subject`; empty if the letter does not say).
    pub subject: String,
    pub reason: String,
    /// Deliveries the consumer had seen when it gave up (0 if unknown).
    pub deliveries: i64,
    /// When the consumer gave up (`Paystream-Dlq-Failed-At`, else when the DLQ stored the letter).
    pub failed_at: DateTime<Utc>,
    /// Time since `failed_at`, when the letter was read.
    pub age: Duration,
    /// The original `Nats-Msg-Id` (the event id for events of the pipeline).
    pub original_msg_id: Option<String>,
    /// Where the original message was stored: stream and sequence.
    pub original_stream: Option<String>,
    pub original_stream_seq: Option<u64>,
    /// The original payload, unchanged.
    pub payload: Bytes,
    /// Every header of the letter, the DLQ ones included (see [`DeadLetter::original_headers`]).
    pub headers: HeaderMap,
}

impl DeadLetter {
    fn parse(seq: u64, dlq_subject: &str, headers: HeaderMap, payload: Bytes, stored: DateTime<Utc>) -> DeadLetter {
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        let failed_at = get(headers::DLQ_FAILED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map_or(stored, |t| t.with_timezone(&Utc));
        DeadLetter {
            seq,
            consumer: get(headers::DLQ_CONSUMER)
                .unwrap_or_else(|| dlq_subject.rsplit('.').next().unwrap_or_default().to_owned()),
            subject: get(headers::DLQ_SUBJECT).unwrap_or_default(),
            reason: get(headers::DLQ_REASON).unwrap_or_default(),
            deliveries: get(headers::DLQ_DELIVERIES).and_then(|d| d.parse().ok()).unwrap_or(0),
            failed_at,
            age: (Utc::now() - failed_at).to_std().unwrap_or_default(),
            original_msg_id: get(headers::DLQ_ORIGINAL_MSG_ID),
            original_stream: get(headers::DLQ_STREAM).filter(|s| !s.is_empty()),
            original_stream_seq: get(headers::DLQ_STREAM_SEQ).and_then(|s| s.parse().ok()),
            payload,
            headers,
        }
    }

    /// The headers the original message had: the letter's headers without the `Paystream-Dlq-*` ones and without
    /// `Nats-Msg-Id` (which is the letter's own id).
    pub fn original_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, values) in self.headers.iter() {
            let n: &str = name.as_ref();
            if n.eq_ignore_ascii_case(headers::MSG_ID)
                || n.len() >= DLQ_HEADER_PREFIX.len()
                    && n[..DLQ_HEADER_PREFIX.len()].eq_ignore_ascii_case(DLQ_HEADER_PREFIX)
            {
                continue;
            }
            for v in values {
                h.append(n, v.as_str());
            }
        }
        h
    }

    /// Decodes the payload as an event envelope (for a `prepare` step that needs to know what the letter is).
    pub fn decode<E: Event>(&self) -> Result<Envelope<E>, String> {
        Envelope::<E>::decode(&self.payload)
    }
}

/// What [`redrive`] did with one letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedriveOutcome {
    /// The letter's ID (DLQ stream sequence); it is gone from the DLQ now.
    pub seq: u64,
    pub consumer: String,
    /// Where it was republished: the original wire subject.
    pub subject: String,
    /// The `Nats-Msg-Id` it was republished with: `redrive:<seq>`.
    pub msg_id: String,
    /// Its new sequence in the event stream.
    pub stream_seq: u64,
    /// JetStream already had `msg_id` (this letter was redriven moments ago): nothing new was stored.
    pub duplicate: bool,
}

/// What [`redrive_all`] did.
#[derive(Debug, Default)]
pub struct RedriveAll {
    pub redriven: Vec<RedriveOutcome>,
    /// Letters left in the DLQ and why (a foreign subject, a refused `prepare`, gone meanwhile).
    pub refused: Vec<DlqError>,
}

fn check_consumer(consumer: &str) -> Result<(), DlqError> {
    if consumer.is_empty() || consumer.chars().any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace()) {
        return Err(DlqError::BadConsumer(consumer.to_owned()));
    }
    Ok(())
}

fn nats(what: &str, e: impl std::fmt::Display) -> DlqError {
    DlqError::Bus(BusError::Nats(format!("{what}: {e}")))
}

async fn dlq_stream(js: &jetstream::Context, topology: &Topology) -> Result<jetstream::stream::Stream, DlqError> {
    let name = topology.dlq_stream();
    js.get_stream(&name).await.map_err(|e| nats(&format!("stream {name} is missing (streams are created at start)"), e))
}

/// Every dead letter of this deployment (or of `consumer`), oldest first. Reads without acknowledging or removing
/// anything, so it is safe against a running system. Also sets `paystream_dlq_depth{consumer}`.
pub async fn list(
    js: &jetstream::Context,
    topology: &Topology,
    consumer: Option<&str>,
) -> Result<Vec<DeadLetter>, DlqError> {
    if let Some(c) = consumer {
        check_consumer(c)?;
    }
    let stream = dlq_stream(js, topology).await?;
    let filter = consumer.map_or_else(|| topology.dlq_wildcard(), |c| topology.dlq_subject(c));
    let ordered = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: filter.clone(),
            ..Default::default()
        })
        .await
        .map_err(|e| nats(&format!("cannot read {filter}"), e))?;
    let mut letters = Vec::new();
    if ordered.cached_info().num_pending > 0 {
        let mut messages = ordered.messages().await.map_err(|e| nats(&format!("cannot read {filter}"), e))?;
        loop {
            let msg = match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(nats(&format!("reading {filter}"), e)),
                Ok(None) => break,
                Err(_) => return Err(DlqError::Bus(BusError::Unavailable(format!("reading {filter} timed out")))),
            };
            let info = msg.info().map_err(|e| nats("a dead letter without delivery info", e))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            let stored = DateTime::from_timestamp(info.published.unix_timestamp(), info.published.nanosecond())
                .unwrap_or_else(Utc::now);
            letters.push(DeadLetter::parse(
                seq,
                &msg.subject,
                msg.headers.clone().unwrap_or_default(),
                msg.payload.clone(),
                stored,
            ));
            if pending == 0 {
                break;
            }
        }
    }
    set_depth(&letters, consumer);
    Ok(letters)
}

/// Letters per consumer, from the stream's subject counts (cheap: no message is read). Also sets
/// `paystream_dlq_depth{consumer}`, so a long-running role can call it periodically.
pub async fn depth(js: &jetstream::Context, topology: &Topology) -> Result<BTreeMap<String, u64>, DlqError> {
    let stream = dlq_stream(js, topology).await?;
    let subjects: Vec<(String, usize)> = stream
        .info_with_subjects(topology.dlq_wildcard())
        .await
        .map_err(|e| nats("cannot read the DLQ's subjects", e))?
        .try_collect()
        .await
        .map_err(|e| nats("cannot read the DLQ's subjects", e))?;
    let prefix = topology.dlq_subject("");
    let mut out = BTreeMap::new();
    for (subject, n) in subjects {
        let consumer = subject.strip_prefix(&prefix).unwrap_or(&subject).to_owned();
        *out.entry(consumer).or_insert(0) += n as u64;
    }
    record_depth(&out, true);
    Ok(out)
}

/// Republishes the letter `seq` to its original subject and removes it from the DLQ (see the module docs).
pub async fn redrive(publisher: &Publisher, seq: u64) -> Result<RedriveOutcome, DlqError> {
    redrive_with(publisher, seq, async |_: &DeadLetter| Ok(())).await
}

/// [`redrive`], running `prepare` first; if it returns `Err(reason)` nothing is republished
/// ([`DlqError::Prepare`]).
pub async fn redrive_with<F>(publisher: &Publisher, seq: u64, prepare: F) -> Result<RedriveOutcome, DlqError>
where
    F: AsyncFn(&DeadLetter) -> Result<(), String>,
{
    let topology = publisher.topology();
    let stream = dlq_stream(publisher.jetstream(), topology).await?;
    let raw = match stream.get_raw_message(seq).await {
        Ok(m) => m,
        Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
            return Err(DlqError::NotFound(seq));
        }
        Err(e) => return Err(nats(&format!("cannot read dead letter {seq}"), e)),
    };
    // Only the DLQ's own subjects hold dead letters.
    if !raw.subject.starts_with(&topology.dlq_subject("")) {
        return Err(DlqError::NotFound(seq));
    }
    let stored = DateTime::from_timestamp(raw.time.unix_timestamp(), raw.time.nanosecond()).unwrap_or_else(Utc::now);
    let letter = DeadLetter::parse(raw.sequence, &raw.subject, raw.headers, raw.payload, stored);
    redrive_letter(publisher, &stream, &letter, &prepare).await
}

/// Redrives every letter (of `consumer`), oldest first. Letters that are refused stay in the DLQ and are reported in
/// [`RedriveAll::refused`]; a NATS failure stops the run.
pub async fn redrive_all(publisher: &Publisher, consumer: Option<&str>) -> Result<RedriveAll, DlqError> {
    redrive_all_with(publisher, consumer, async |_: &DeadLetter| Ok(())).await
}

/// [`redrive_all`] with a `prepare` step (see [`redrive_with`]).
pub async fn redrive_all_with<F>(
    publisher: &Publisher,
    consumer: Option<&str>,
    prepare: F,
) -> Result<RedriveAll, DlqError>
where
    F: AsyncFn(&DeadLetter) -> Result<(), String>,
{
    let topology = publisher.topology();
    let letters = list(publisher.jetstream(), topology, consumer).await?;
    let stream = dlq_stream(publisher.jetstream(), topology).await?;
    let mut report = RedriveAll::default();
    for letter in &letters {
        match redrive_letter(publisher, &stream, letter, &prepare).await {
            Ok(o) => report.redriven.push(o),
            Err(e @ (DlqError::Bus(_) | DlqError::NotRemoved { .. })) => return Err(e),
            Err(e) => report.refused.push(e),
        }
    }
    Ok(report)
}

async fn redrive_letter<F>(
    publisher: &Publisher,
    stream: &jetstream::stream::Stream,
    letter: &DeadLetter,
    prepare: &F,
) -> Result<RedriveOutcome, DlqError>
where
    F: AsyncFn(&DeadLetter) -> Result<(), String>,
{
    let topology = publisher.topology();
    let seq = letter.seq;
    if topology.logical(&letter.subject).and_then(Subject::from_name).is_none() {
        return Err(DlqError::ForeignSubject { seq, subject: letter.subject.clone() });
    }
    prepare(letter).await.map_err(|reason| DlqError::Prepare { seq, reason })?;

    let mut h = letter.original_headers();
    let msg_id = format!("redrive:{seq}");
    h.insert(headers::MSG_ID, msg_id.as_str());
    h.insert(REDRIVEN_FROM, seq.to_string().as_str());
    let ack = publisher.publish_raw(&letter.subject, h, letter.payload.clone()).await?;
    tracing::info!(
        dlq_seq = seq,
        consumer = %letter.consumer,
        subject = %letter.subject,
        stream_seq = ack.sequence,
        duplicate = ack.duplicate,
        "dead letter redriven"
    );

    // Only after the PubAck: the letter is gone from the DLQ once its message is back in its stream.
    match stream.delete_message(seq).await {
        Ok(_) => {}
        // Removed meanwhile (a concurrent redrive of the same letter): the outcome is the same.
        Err(e) if is_gone(&e) => {}
        Err(e) => {
            return Err(DlqError::NotRemoved {
                seq,
                subject: letter.subject.clone(),
                stream_seq: ack.sequence,
                error: e.to_string(),
            });
        }
    }
    Ok(RedriveOutcome {
        seq,
        consumer: letter.consumer.clone(),
        subject: letter.subject.clone(),
        msg_id,
        stream_seq: ack.sequence,
        duplicate: ack.duplicate,
    })
}

fn is_gone(e: &jetstream::stream::DeleteMessageError) -> bool {
    use jetstream::ErrorCode;
    match e.kind() {
        jetstream::stream::DeleteMessageErrorKind::JetStream(err) => {
            matches!(err.error_code(), ErrorCode::NO_MESSAGE_FOUND | ErrorCode::SEQUENCE_NOT_FOUND)
                || err.to_string().to_ascii_lowercase().contains("not found")
        }
        _ => false,
    }
}

// --- metrics ---------------------------------------------------------------------------------------------------

struct Depth {
    gauge: prometheus::IntGaugeVec,
    seen: Mutex<HashSet<String>>,
}

fn depth_metric() -> &'static Depth {
    static D: OnceLock<Depth> = OnceLock::new();
    D.get_or_init(|| {
        let gauge = prometheus::IntGaugeVec::new(
            prometheus::Opts::new("dlq_depth", "Dead letters waiting in the DLQ stream, by consumer (as last read)"),
            &["consumer"],
        )
        .expect("static metric");
        observability::registry().register(Box::new(gauge.clone())).expect("dlq metrics are registered once");
        Depth { gauge, seen: Mutex::new(HashSet::new()) }
    })
}

fn set_depth(letters: &[DeadLetter], consumer: Option<&str>) {
    let mut counts = BTreeMap::new();
    if let Some(c) = consumer {
        counts.insert(c.to_owned(), 0u64);
    }
    for l in letters {
        *counts.entry(l.consumer.clone()).or_insert(0) += 1;
    }
    record_depth(&counts, consumer.is_none());
}

/// Exports `paystream_dlq_depth{consumer}` for each of `consumers` from the start (at 0 until a read finds letters),
/// so dashboards and alerts see a series for every consumer, not only for those that ever had a dead letter.
pub fn track_depth_of(consumers: &[&str]) {
    let d = depth_metric();
    let mut seen = d.seen.lock().unwrap_or_else(|e| e.into_inner());
    for c in consumers {
        if seen.insert((*c).to_owned()) {
            d.gauge.with_label_values(&[c]).set(0);
        }
    }
}

/// `complete`: `counts` covers every consumer, so consumers seen before and missing now are at zero.
fn record_depth(counts: &BTreeMap<String, u64>, complete: bool) {
    let d = depth_metric();
    let mut seen = d.seen.lock().unwrap_or_else(|e| e.into_inner());
    if complete {
        for c in seen.iter().filter(|c| !counts.contains_key(*c)) {
            d.gauge.with_label_values(&[c.as_str()]).set(0);
        }
    }
    for (c, n) in counts {
        d.gauge.with_label_values(&[c.as_str()]).set(*n as i64);
        seen.insert(c.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_headers_drop_the_dlq_ones_and_the_letters_id() {
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, "dlq:c:S:1");
        h.insert(headers::EVENT_TYPE, "order.status.v1");
        h.insert(headers::TRACEPARENT, "00-abc-def-01");
        h.insert(headers::DLQ_REASON, "amount mismatch");
        h.insert(headers::DLQ_CONSUMER, "c");
        h.insert(headers::DLQ_SUBJECT, "p.order.status");
        h.insert(headers::DLQ_DELIVERIES, "3");
        h.insert(headers::DLQ_FAILED_AT, "2026-01-01T00:00:00+00:00");
        h.insert(headers::DLQ_ORIGINAL_MSG_ID, "e1");
        h.insert(headers::DLQ_STREAM_SEQ, "42");
        let l = DeadLetter::parse(7, "p.dlq.c", h, Bytes::from_static(b"{}"), Utc::now());
        assert_eq!((l.seq, l.consumer.as_str(), l.subject.as_str()), (7, "c", "p.order.status"));
        assert_eq!((l.reason.as_str(), l.deliveries, l.original_stream_seq), ("amount mismatch", 3, Some(42)));
        assert_eq!(l.original_msg_id.as_deref(), Some("e1"));
        assert_eq!(l.failed_at.to_rfc3339(), "2026-01-01T00:00:00+00:00");
        assert!(l.age > Duration::from_secs(3600));
        let o = l.original_headers();
        assert_eq!(o.iter().count(), 2, "{o:?}");
        assert_eq!(o.get(headers::EVENT_TYPE).unwrap().as_str(), "order.status.v1");
        assert_eq!(o.get(headers::TRACEPARENT).unwrap().as_str(), "00-abc-def-01");

        let bare = DeadLetter::parse(8, "p.dlq.other", HeaderMap::new(), Bytes::new(), Utc::now());
        assert_eq!((bare.consumer.as_str(), bare.subject.as_str(), bare.deliveries), ("other", "", 0));
    }

    #[test]
    fn consumer_filters_must_be_one_token() {
        for bad in ["", "a.b", "*", ">", "a b"] {
            assert!(matches!(check_consumer(bad), Err(DlqError::BadConsumer(_))), "{bad:?}");
        }
        assert!(check_consumer("notifier-sms").is_ok());
    }
}
