//! What both channels do with a request: claim its key, attempt the channel's send once, record the outcome,
//! and tell the consumer runner whether to ack, nak or dead-letter.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bus::events::NotificationRequest;
use bus::{Delivery, Envelope, Event, Handled, Handler, HandlerError, Item};
use storage::{PgPool, StorageError};
use tracing::Instrument as _;

use crate::config::NotifierConfig;
use crate::ledger::{self, Claim, NewNotification, Record, Status};
use crate::metrics;

/// What the handlers of both channels share.
pub(crate) struct Shared {
    pub config: NotifierConfig,
    pub pool: PgPool,
    /// How long a claim protects a key from other workers: the runner's handler timeout, after which the claiming
    /// handler has certainly been abandoned.
    pub lease: Duration,
    /// `consumer.max_deliver`: the delivery on which a transient failure is final.
    pub max_deliver: i64,
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The provider accepted it (with its message id).
    Sent { provider_msg_id: Option<String> },
    /// The user refused (or used up) the subscription: WeChat 43101. Normal; not retried.
    RefusedByUser(String),
    /// The message cannot be sent as it is (a value breaks a rule, unknown openid or template, bad phone
    /// number). Recorded and dead-lettered with the reason.
    Invalid(String),
    /// Deliberately not sent (outside formal and not allow-listed, no openid or mobile, channel not configured).
    Suppressed(String),
    /// Worth retrying (network, 5xx, -1, quota, a database hiccup).
    Transient(String),
    /// An error that is neither the message's fault nor temporary (an unexpected provider or database error):
    /// recorded as `failed` and dead-lettered, so it can be redriven after the fix (see `reopen_failed`).
    Broken(String),
}

/// One channel: which event it reads and how it sends.
pub(crate) trait Channel: Send + Sync + 'static {
    /// `miniprogram` or `sms`: the row's channel, the key's suffix and the metric label.
    const NAME: &'static str;
    type Event: Event;

    fn request(event: &Self::Event) -> &NotificationRequest;

    /// Renders, checks and sends one request, once. Must not hold a database connection across the provider
    /// call, and must never put an openid, phone number or token into a reason.
    fn attempt(&self, shared: &Shared, req: &NotificationRequest) -> impl Future<Output = Outcome> + Send;

    /// Before a batch's sends: look up what they need for all of `users` at once (one statement instead of one per
    /// message). The default does nothing.
    fn prefetch(&self, _shared: &Shared, _users: &[storage::UserId]) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// The `bus::Handler` of a channel.
pub(crate) struct NotifyHandler<C> {
    pub shared: Arc<Shared>,
    pub channel: C,
}

pub(crate) fn storage_outcome(e: StorageError) -> Outcome {
    if e.is_transient() { Outcome::Transient(e.to_string()) } else { Outcome::Broken(e.to_string()) }
}

impl<C: Channel> Handler for NotifyHandler<C> {
    type Event = C::Event;
    const BATCH: usize = 64;

    async fn handle(&self, event: Envelope<C::Event>, delivery: &Delivery) -> Result<Handled, HandlerError> {
        let started = tokio::time::Instant::now();
        let channel = C::NAME;
        let req = C::request(&event.payload);
        let key = req.key(channel);
        let new = new_notification(&key, channel, req);

        // The claim commits before anything is sent: from here on a replay finds the row.
        let claim = {
            let mut conn = self.shared.pool.get().await.map_err(StorageError::from)?;
            ledger::claim(&mut conn, &new, self.shared.lease).await?
        };
        let attempt = match claim {
            Claim::Done(status) => {
                metrics::outcome(channel, "duplicate");
                tracing::debug!(channel, %key, status = status.as_str(), "already handled; not sending again");
                return Ok(Handled::Duplicate);
            }
            Claim::InFlight => {
                return Err(HandlerError::Transient(format!(
                    "{key} is claimed by another attempt that may still be sending; retrying after its lease"
                )));
            }
            Claim::Owned { attempt, resumed } => {
                if resumed {
                    tracing::info!(channel, %key, attempt, "taking over a notification an earlier attempt claimed");
                }
                attempt
            }
        };
        let sent = self.send(req, delivery, started).await;
        let recorded = self.record(&key, attempt, &sent.record()).await;
        sent.finish(channel, &key, attempt, recorded)
    }

    /// New keys of a batch are claimed in one statement and their outcomes recorded in one, the sends in between
    /// running side by side; keys seen before (replays, retries, take-overs) go through [`Handler::handle`].
    async fn handle_batch(&self, items: Vec<Item<C::Event>>) -> Vec<Result<Handled, HandlerError>> {
        if items.len() < 2 {
            return bus::one_by_one(self, items).await;
        }
        let started = tokio::time::Instant::now();
        let channel = C::NAME;
        let keys: Vec<String> = items.iter().map(|i| C::request(&i.event.payload).key(channel)).collect();
        let news: Vec<NewNotification<'_>> = items
            .iter()
            .zip(&keys)
            .map(|(i, key)| new_notification(key, channel, C::request(&i.event.payload)))
            .collect();
        let claimed = async {
            let mut conn = self.shared.pool.get().await.map_err(StorageError::from)?;
            ledger::claim_new(&mut conn, &news).await
        }
        .await;
        let claimed = match claimed {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(channel, error = %e, "batch claim failed; claiming one by one");
                return bus::one_by_one(self, items).await;
            }
        };
        // Owned now: the keys this statement inserted (a key twice in one batch is inserted once).
        let mut owned_at = Vec::new();
        let mut taken = std::collections::HashSet::new();
        for (i, key) in keys.iter().enumerate() {
            if claimed.contains(key.as_str()) && taken.insert(key.as_str()) {
                owned_at.push(i);
            }
        }
        tracing::debug!(channel, claimed = owned_at.len(), of = items.len(), "new keys claimed in one statement");
        let users: Vec<storage::UserId> =
            owned_at.iter().map(|&i| C::request(&items[i].event.payload).user_id).collect();
        self.channel.prefetch(&self.shared, &users).await;
        let sends = futures::future::join_all(owned_at.iter().map(|&i| {
            let item = &items[i];
            self.send(C::request(&item.event.payload), &item.delivery, started).instrument(item.span.clone())
        }))
        .await;
        let records: Vec<(&str, i32, Record<'_>)> =
            owned_at.iter().zip(&sends).map(|(&i, sent)| (keys[i].as_str(), 1, sent.record())).collect();
        let recorded = async {
            let mut conn = self.shared.pool.get().await.map_err(StorageError::from)?;
            ledger::record_many(&mut conn, &records).await
        }
        .await;
        let mut results: Vec<Option<Result<Handled, HandlerError>>> = vec![None; items.len()];
        for ((&i, sent), (key, attempt, record)) in owned_at.iter().zip(&sends).zip(&records) {
            let outcome = match &recorded {
                Ok(done) => Ok(done.contains(*key)),
                // The shared write failed: each outcome is written on its own, with its retries.
                Err(_) => self.record(key, *attempt, record).await,
            };
            results[i] = Some(items[i].span.in_scope(|| sent.finish(channel, key, *attempt, outcome)));
        }
        bus::finish_one_by_one(self, items, results).await
    }
}

fn new_notification<'a>(key: &'a str, channel: &'a str, req: &'a NotificationRequest) -> NewNotification<'a> {
    NewNotification {
        key,
        channel,
        template: req.template.as_str(),
        user_id: req.user_id,
        order_sn: req.params.order_sn.as_str(),
    }
}

/// One attempt's outcome, with what to record and what to answer the runner.
struct Sent {
    outcome: Outcome,
    status: Status,
    result: Result<Handled, HandlerError>,
}

impl Sent {
    fn record(&self) -> Record<'_> {
        Record {
            status: self.status,
            provider_msg_id: match &self.outcome {
                Outcome::Sent { provider_msg_id } => provider_msg_id.as_deref(),
                _ => None,
            },
            reason: match &self.outcome {
                Outcome::Sent { .. } => None,
                Outcome::RefusedByUser(r)
                | Outcome::Invalid(r)
                | Outcome::Suppressed(r)
                | Outcome::Transient(r)
                | Outcome::Broken(r) => Some(r.as_str()),
            },
        }
    }

    /// The runner's answer once the outcome was (or could not be) recorded.
    fn finish(
        &self,
        channel: &str,
        key: &str,
        attempt: i32,
        recorded: Result<bool, StorageError>,
    ) -> Result<Handled, HandlerError> {
        let status = self.status;
        let reason = self.record().reason;
        match recorded {
            Ok(true) => {
                metrics::outcome(channel, status.as_str());
                match status {
                    Status::Sent => tracing::info!(channel, %key, attempt, "notification sent"),
                    Status::Retrying | Status::Failed | Status::Invalid => {
                        tracing::warn!(channel, %key, attempt, status = status.as_str(), reason, "notification not sent")
                    }
                    _ => tracing::info!(channel, %key, status = status.as_str(), reason, "notification not sent"),
                }
                self.result.clone()
            }
            Ok(false) => {
                // Another attempt took the key over after our lease ran out; its outcome stands.
                tracing::warn!(channel, %key, attempt, status = status.as_str(), "claim lost before the outcome was recorded");
                Ok(Handled::Duplicate)
            }
            Err(e) => {
                // The claim stays `claimed`: the next delivery takes it over once the lease has run out. If the
                // provider accepted the message, that is the one case of a second send (see the crate docs).
                tracing::error!(channel, %key, attempt, status = status.as_str(), error = %e, "outcome not recorded");
                Err(HandlerError::Transient(format!("outcome {} not recorded: {e}", status.as_str())))
            }
        }
    }
}

impl<C: Channel> NotifyHandler<C> {
    /// Sends one claimed request once and classifies the answer.
    async fn send(&self, req: &NotificationRequest, delivery: &Delivery, started: tokio::time::Instant) -> Sent {
        // Stop waiting for the provider at three quarters of the handler timeout, leaving the rest to record the
        // outcome: a slow provider then ends as `retrying` and comes back after the backoff, instead of the runner
        // abandoning the handler with the claim still held (which would delay the retry by a whole lease).
        let deadline = started + self.shared.lease.mul_f64(0.75);
        let outcome = match tokio::time::timeout_at(deadline, self.channel.attempt(&self.shared, req)).await {
            Ok(o) => o,
            Err(_) => Outcome::Transient(format!(
                "no answer within {:?} (three quarters of consumer.handler_timeout)",
                self.shared.lease.mul_f64(0.75)
            )),
        };
        let last_delivery = delivery.delivered >= self.shared.max_deliver;
        let (status, result) = match &outcome {
            Outcome::Sent { .. } => (Status::Sent, Ok(Handled::Done)),
            Outcome::RefusedByUser(_) => (Status::RefusedByUser, Ok(Handled::Done)),
            Outcome::Suppressed(_) => (Status::Suppressed, Ok(Handled::Done)),
            Outcome::Invalid(r) => {
                (Status::Invalid, Err(HandlerError::Permanent(format!("invalid notification: {r}"))))
            }
            Outcome::Broken(r) => (Status::Failed, Err(HandlerError::Permanent(r.clone()))),
            // The runner dead-letters a transient failure on the last allowed delivery; the row says so first.
            Outcome::Transient(r) if last_delivery => (Status::Failed, Err(HandlerError::Transient(r.clone()))),
            Outcome::Transient(r) => (Status::Retrying, Err(HandlerError::Transient(r.clone()))),
        };
        Sent { outcome, status, result }
    }

    /// Records the outcome, retrying the write briefly: after a successful send, every failed write here widens
    /// the window in which a redelivery sends the message again.
    async fn record(&self, key: &str, attempt: i32, record: &Record<'_>) -> Result<bool, StorageError> {
        let mut delay = Duration::from_millis(50);
        let mut tries = 0;
        loop {
            tries += 1;
            let result = async {
                let mut conn = self.shared.pool.get().await.map_err(StorageError::from)?;
                ledger::record(&mut conn, key, attempt, record).await
            }
            .await;
            match result {
                Err(e) if e.is_transient() && tries < 4 => {
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
                other => return other,
            }
        }
    }
}
