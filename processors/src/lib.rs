//! JetStream workers that move payment and order state: [`PaymentProcessor`] (consumer `payment`, on
//! `wechat.transaction`) and [`OrderProcessor`] (consumer `order`, on `payment.status`). Each commits its state
//! change and the events announcing it in one transaction (the outbox), is idempotent, and classifies failures
//! (transient → retried, permanent → dead-lettered with the reason).

mod metrics;
mod order;
mod payment;
mod periodic;
pub mod reconcile;
pub mod refund;
pub mod timeout;

pub use metrics::register as register_metrics;
pub use order::{CONSUMER as ORDER_CONSUMER, OrderProcessor};
pub use payment::PaymentProcessor;
pub use reconcile::{ReconcileConfig, Reconciler, transaction_report};
pub use refund::{RefundConfig, RefundProcessor, RefundReconciler, RefundRequester};
pub use timeout::{TimeoutCloser, TimeoutConfig};

/// The durable consumer name of the payment processor.
pub const PAYMENT_CONSUMER: &str = "payment";

use bus::{Consumer, ConsumerConfig, ConsumerSpec, Publisher};
use tokio_util::sync::CancellationToken;

/// Runs the payment processor until `shutdown`.
pub async fn run_payment(
    publisher: Publisher,
    pool: storage::PgPool,
    appid: &str,
    mchid: &str,
    config: ConsumerConfig,
    shutdown: CancellationToken,
) -> Result<(), bus::BusError> {
    register_metrics();
    let spec = ConsumerSpec { name: PAYMENT_CONSUMER.into(), config };
    let outbox = bus::Outbox::new(pool.clone(), publisher.clone());
    Consumer::new(publisher, spec, PaymentProcessor::new(pool, outbox, appid, mchid)).run(shutdown).await
}

/// Runs the order processor until `shutdown`.
pub async fn run_order(
    publisher: Publisher,
    pool: storage::PgPool,
    config: ConsumerConfig,
    shutdown: CancellationToken,
) -> Result<(), bus::BusError> {
    register_metrics();
    let spec = ConsumerSpec { name: ORDER_CONSUMER.into(), config };
    let outbox = bus::Outbox::new(pool.clone(), publisher.clone());
    Consumer::new(publisher, spec, OrderProcessor::new(pool, outbox)).run(shutdown).await
}

/// Keeps `processed_event` bounded until `shutdown`: every ten minutes, deletes the keys claimed more than
/// `retention` ago (in batches, so a large backlog never holds a long transaction). The pipeline's consumers no
/// longer claim keys there — each is idempotent through the state it changes (payment: waiting → paid only for
/// the right amount; order: waitPay → waitUse, and a replay finds the order paid by this payment; refunds: the
/// refund row; notifier: its ledger) — so this removes the keys older versions left and keeps the table bounded
/// for any handler that uses it. A key is needed while its event can come back: `retention` must exceed the
/// streams' `nats.max_age`.
pub async fn prune_processed(pool: storage::PgPool, retention: std::time::Duration, shutdown: CancellationToken) {
    const BATCH: i64 = 10_000;
    periodic::every(std::time::Duration::from_secs(600), shutdown, "pruning processed_event", || async {
        let mut conn = pool.get().await.map_err(storage::StorageError::from)?;
        let mut total = 0;
        loop {
            let n = storage::processed::prune(&mut conn, retention, BATCH).await?;
            total += n;
            if (n as i64) < BATCH {
                break;
            }
        }
        if total > 0 {
            tracing::info!(deleted = total, "processed_event pruned");
        }
        Ok::<_, storage::StorageError>(())
    })
    .await
}

/// Runs the refund requester (`refund.requested` → WeChat's refund API) until `shutdown`.
pub async fn run_refund_requests(
    publisher: Publisher,
    pool: storage::PgPool,
    pay: wechat::PayClient,
    config: ConsumerConfig,
    shutdown: CancellationToken,
) -> Result<(), bus::BusError> {
    register_metrics();
    let spec = ConsumerSpec { name: refund::REQUEST_CONSUMER.into(), config };
    let handler = RefundRequester::new(pool, publisher.clone(), pay);
    Consumer::new(publisher, spec, handler).run(shutdown).await
}

/// Runs the refund processor (`wechat.refund` → refund, payment and order state) until `shutdown`.
pub async fn run_refund_status(
    publisher: Publisher,
    pool: storage::PgPool,
    mchid: &str,
    config: ConsumerConfig,
    shutdown: CancellationToken,
) -> Result<(), bus::BusError> {
    register_metrics();
    let spec = ConsumerSpec { name: refund::STATUS_CONSUMER.into(), config };
    Consumer::new(publisher, spec, RefundProcessor::new(pool, mchid)).run(shutdown).await
}
