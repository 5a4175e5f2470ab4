//! The notifier: tells users what happened to their order by mini-program subscribe message and by SMS, exactly
//! once per notification key (DESIGN.md §7).
//!
//! [`run`] (or [`Notifier::new`] + [`Notifier::run`]) runs two durable consumers with the bus's runner:
//! [`MINIPROGRAM_CONSUMER`] (`notify.miniprogram`) and [`SMS_CONSUMER`] (`notify.sms`). A request names a logical
//! template and typed parameters; [`NotifierConfig`] maps the template to a WeChat template id, page and field
//! keys, and to a Tencent SMS template. Values are rendered from the parameters (dates from the order, in the
//! configured zone) and checked against WeChat's rules before sending (`thing` cut to 20 characters with "…",
//! amounts as `¥123.45`, codes never cut). The mini-program environment (`miniprogram_state`) comes from the
//! configuration only; outside `formal` only allow-listed openids receive messages.
//!
//! # Exactly once per key
//!
//! Each message has a key, `<order sn>:<template>:<channel>`, unique in the `notification` table. A handler
//!
//! 1. **claims** the key in its own committed statement *before* sending: a new key is inserted as `claimed`;
//!    a key that is `retrying`, or `claimed` longer than a lease ago (`consumer.handler_timeout`: the claiming
//!    handler crashed or was abandoned), is taken over; a final key (`sent`, `refused_by_user`, `invalid`,
//!    `suppressed`, `failed`) is acknowledged as a duplicate without sending; a key claimed within the lease is
//!    nak'ed (another worker may be sending it right now);
//! 2. makes **one** provider call, without holding a database connection, and stops waiting for it at three
//!    quarters of the handler timeout (then `retrying`), so a slow provider never leaves a claim to run out;
//! 3. **records** the outcome, fenced by the claim's attempt number.
//!
//! **The one window for a second message** is the single provider call: WeChat or Tencent accepted the message,
//! but its answer never made it into step 3 — the process died, the call timed out (in the client or at the
//! deadline above) after the provider had acted, or the database stayed unreachable through the few retries of
//! the outcome write. The row is then `claimed` or `retrying`, and the next delivery sends again. The window is
//! one HTTP exchange plus one UPDATE; neither API takes an idempotency key, so it cannot be closed on our side.
//! Claiming after sending, or in the same transaction as the send, would instead risk a message on every replay.
//!
//! # Outcomes
//!
//! | WeChat / Tencent answer | row | delivery |
//! |---|---|---|
//! | accepted | `sent` (+ msgid / serial) | ack |
//! | 43101 | `refused_by_user` | ack (a normal answer, never retried) |
//! | not allow-listed outside formal, no openid or mobile, template or channel not configured, SMS off | `suppressed` (+ reason) | ack |
//! | 40003, 47003, 40037, 41030, 40226; a value breaking its rule before sending | `invalid` (+ reason) | dead-lettered |
//! | network, 5xx, timeout, -1, 45009, 45011, token still bad after one refresh | `retrying` | nak with backoff |
//! | the same on the last delivery (`consumer.max_deliver`) | `failed` | dead-lettered |
//! | any other provider error (credentials, an unknown errcode) | `failed` | dead-lettered |
//!
//! Token errors (40001/42001) never reach this table: [`wechat::MiniProgramClient`] refreshes its shared token
//! and retries once by itself. A redriven `failed` message needs [`ledger::reopen_failed`] first (`failed` is final).
//!
//! Metrics: `paystream_notifications_total{channel,outcome}` (outcome also `duplicate`) and
//! `paystream_notification_send_seconds{channel}`.

mod config;
mod flow;
pub mod ledger;
mod metrics;
mod miniprogram;
pub mod render;
mod sms;

use std::sync::Arc;

use bus::{BusError, Consumer, ConsumerConfig, ConsumerSpec, Publisher};
use storage::PgPool;
use tokio_util::sync::CancellationToken;
use wechat::{MiniProgramClient, MiniprogramState, SmsClient};

pub use config::{ConfigError, NotifierConfig, TemplateConfig, Templates, TimeZone, state_name};
pub use metrics::register as register_metrics;
pub use render::Param;

use flow::{NotifyHandler, Shared};
use miniprogram::Miniprogram;
use sms::Sms;

/// Durable consumer of `notify.miniprogram`.
pub const MINIPROGRAM_CONSUMER: &str = "notifier-miniprogram";
/// Durable consumer of `notify.sms`.
pub const SMS_CONSUMER: &str = "notifier-sms";
/// Every durable consumer the notifier runs.
pub const CONSUMERS: [&str; 2] = [MINIPROGRAM_CONSUMER, SMS_CONSUMER];

/// Errors that stop the notifier.
#[derive(Debug, thiserror::Error)]
pub enum NotifierError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// What the notifier needs from the process.
pub struct NotifierDeps {
    /// `[notifier]`.
    pub config: NotifierConfig,
    /// `[consumer]`: delivery settings of both consumers; `handler_timeout` is also the claim lease.
    pub consumer: ConsumerConfig,
    pub pool: PgPool,
    pub publisher: Publisher,
    /// From `[wechat]`. Pass a clone of the process's client so every role shares one access-token cache.
    pub miniprogram: MiniProgramClient,
    /// From `[sms]`, when present.
    pub sms: Option<SmsClient>,
}

/// Both consumers, ready to run.
pub struct Notifier {
    publisher: Publisher,
    consumer: ConsumerConfig,
    miniprogram: NotifyHandler<Miniprogram>,
    sms: NotifyHandler<Sms>,
}

impl Notifier {
    /// Validates the configuration (naming the key at fault) and logs the environment messages are sent to.
    pub fn new(deps: NotifierDeps) -> Result<Notifier, NotifierError> {
        let sms_configured = deps.sms.is_some();
        deps.config.validate(sms_configured)?;
        let sms_on = deps.config.sms_on(sms_configured);
        let state = deps.config.miniprogram_state;
        let templates: Vec<&str> = [
            ("pay_success", &deps.config.templates.pay_success),
            ("checkin_notice", &deps.config.templates.checkin_notice),
            ("refund_success", &deps.config.templates.refund_success),
            ("order_closed", &deps.config.templates.order_closed),
        ]
        .into_iter()
        .filter_map(|(n, t)| t.as_ref().map(|_| n))
        .collect();
        if state == MiniprogramState::Formal {
            tracing::warn!(
                miniprogram_state = "formal",
                sms = sms_on,
                ?templates,
                "notifier sends to every user (formal: messages open the released mini-program)"
            );
        } else {
            tracing::info!(
                miniprogram_state = state_name(state),
                allow_listed = deps.config.allow_openids.as_ref().map_or(0, Vec::len),
                sms = sms_on,
                ?templates,
                "notifier sends only to allow-listed openids"
            );
        }
        metrics::register();
        let shared = Arc::new(Shared {
            config: deps.config,
            pool: deps.pool,
            lease: deps.consumer.handler_timeout,
            max_deliver: deps.consumer.max_deliver,
        });
        Ok(Notifier {
            publisher: deps.publisher,
            consumer: deps.consumer,
            miniprogram: NotifyHandler { shared: shared.clone(), channel: Miniprogram::new(deps.miniprogram) },
            sms: NotifyHandler { shared, channel: Sms { client: deps.sms.filter(|_| sms_on) } },
        })
    }

    /// Runs both consumers until `shutdown`, then lets in-flight messages finish (see `bus::Consumer::run`). If
    /// one consumer cannot start, the other is stopped and the error returned.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), NotifierError> {
        let stop = shutdown.child_token();
        let spec = |name: &str| ConsumerSpec { name: name.to_owned(), config: self.consumer.clone() };
        let mini = Consumer::new(self.publisher.clone(), spec(MINIPROGRAM_CONSUMER), self.miniprogram);
        let sms = Consumer::new(self.publisher.clone(), spec(SMS_CONSUMER), self.sms);
        let stop_on_error = |r: Result<(), BusError>| {
            if r.is_err() {
                stop.cancel();
            }
            r
        };
        let (a, b) = tokio::join!(async { stop_on_error(mini.run(stop.clone()).await) }, async {
            stop_on_error(sms.run(stop.clone()).await)
        },);
        a?;
        b?;
        Ok(())
    }
}

/// [`Notifier::new`] then [`Notifier::run`].
pub async fn run(deps: NotifierDeps, shutdown: CancellationToken) -> Result<(), NotifierError> {
    Notifier::new(deps)?.run(shutdown).await
}
