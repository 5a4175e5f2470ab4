//! The order processor: consumes `payment.status`. A paid payment moves its order from waitPay to waitUse and asks
//! the notifier for the pay-success and check-in messages, all in one transaction with the order change. A
//! payment for an order that is no longer waiting for it (closed by the timeout, cancelled, or already paid by
//! another payment) asks for a refund: money is never kept for an order the user does not have.

use bus::events::{
    MiniprogramNotify, NotificationRequest, NotifyParams, NotifyTemplate, OrderStatusChanged, PaymentStatusChanged,
    RefundReason, RefundRequested, SmsNotify,
};
use bus::{Delivery, Envelope, Handled, Handler, HandlerError, Item};
use storage::{Conn, Fen, OrderSn, PayStatus, PgPool, StorageError, TradeState, UserId, orders, payments, users};

use crate::metrics;

/// The durable consumer name.
pub const CONSUMER: &str = "order";

/// Handler for the `order` consumer.
pub struct OrderProcessor {
    pool: PgPool,
    outbox: bus::Outbox,
}

impl OrderProcessor {
    pub fn new(pool: PgPool, outbox: bus::Outbox) -> Self {
        OrderProcessor { pool, outbox }
    }
}

impl Handler for OrderProcessor {
    type Event = PaymentStatusChanged;
    const BATCH: usize = 64;

    /// Paid payments of orders still waiting for them — nearly all under load — in one transaction (one UPDATE for
    /// the orders, one look-up of who has a mobile number, one INSERT for the announcements and notification
    /// requests); everything else, and everything if that transaction fails, one by one through
    /// [`Handler::handle`].
    async fn handle_batch(&self, items: Vec<Item<PaymentStatusChanged>>) -> Vec<Result<Handled, HandlerError>> {
        let mut candidates: Vec<usize> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, item) in items.iter().enumerate() {
            let p = &item.event.payload;
            // Two payments of one order in one batch: the second is looked into one by one.
            if p.to == PayStatus::Paid && seen.insert(p.order_sn.clone()) {
                candidates.push(i);
            }
        }
        let mut results: Vec<Option<Result<Handled, HandlerError>>> = vec![None; items.len()];
        if candidates.len() > 1 {
            match self.pay_many(&items, &candidates).await {
                Ok(done) => {
                    tracing::debug!(paid = done.len(), of = candidates.len(), "orders paid in one transaction");
                    for i in done {
                        results[i] = Some(Ok(Handled::Done));
                        metrics::order_transition(TradeState::WaitPay, TradeState::WaitUse);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, payments = candidates.len(), "batch failed; handling its payments one by one")
                }
            }
        }
        bus::finish_one_by_one(self, items, results).await
    }

    async fn handle(&self, event: Envelope<PaymentStatusChanged>, _: &Delivery) -> Result<Handled, HandlerError> {
        let p = event.payload;
        if p.to != PayStatus::Paid {
            // Closed and refunded payments change no order here (the lifecycle processor owns those paths).
            return Ok(Handled::Done);
        }
        let mut conn = self.pool.get().await.map_err(StorageError::from)?;
        self.outbox.transaction::<_, HandlerError, _>(&mut conn, async |c, events| {
            // The common case in one statement (which also takes the row lock): the order was waiting for this money.
            if let Some(order) = orders::pay_if_waiting(c, &p.order_sn).await? {
                announce_paid(c, events, &order, &p).await?;
                return Ok(Handled::Done);
            }
            let order = orders::lock_by_sn(c, &p.order_sn)
                .await?
                .ok_or_else(|| HandlerError::Permanent(format!("payment {} is for unknown order {}", p.payment_sn, p.order_sn)))?;
            match order.state() {
                TradeState::WaitPay => {
                    orders::transition(c, &p.order_sn, TradeState::WaitPay, TradeState::WaitUse).await?;
                    announce_paid(c, events, &order, &p).await?;
                    Ok(Handled::Done)
                }
                // Paid, and then perhaps used, refunded or expired: if this payment is the one that paid it, this is a
                // replay of what already happened (idempotent without an inbox: the order's state says it all).
                TradeState::WaitUse | TradeState::Used | TradeState::Refunded | TradeState::Expired
                    if !paid_by_another(c, &p).await? =>
                {
                    Ok(Handled::Duplicate)
                }
                state => {
                    // Closed, cancelled, expired, used, refunded — or paid by another payment: give it back.
                    tracing::warn!(payment = %p.payment_sn, order = %p.order_sn, ?state, "payment for an order that no longer waits for it; refunding");
                    let refund = RefundRequested {
                        payment_sn: p.payment_sn.clone(),
                        order_sn: p.order_sn.clone(),
                        user_id: p.user_id,
                        reason: RefundReason::OrderClosed,
                        amount: p.pay_total,
                    };
                    events.add(&refund.envelope());
                    metrics::refund_requested("order_closed");
                    Ok(Handled::Done)
                }
            }
        })
        .await
    }
}

impl OrderProcessor {
    /// Moves the candidates' orders that still wait for payment to waitUse in one transaction and stages what
    /// [`announce_paid`] stages for each, in the span of its payment's event; returns the indexes of those items.
    async fn pay_many(
        &self,
        items: &[Item<PaymentStatusChanged>],
        candidates: &[usize],
    ) -> Result<Vec<usize>, HandlerError> {
        let mut conn = self.pool.get().await.map_err(StorageError::from)?;
        self.outbox
            .transaction::<_, HandlerError, _>(&mut conn, async |c, events| {
                let sns: Vec<&OrderSn> = candidates.iter().map(|i| &items[*i].event.payload.order_sn).collect();
                let paid = orders::pay_many_if_waiting(c, &sns).await?;
                let users: Vec<UserId> = paid.iter().map(|o| UserId(o.user_id)).collect();
                let with_mobile = users::with_mobile(c, &users).await?;
                let at: std::collections::HashMap<&str, usize> =
                    candidates.iter().map(|i| (items[*i].event.payload.order_sn.as_str(), *i)).collect();
                let mut done = Vec::with_capacity(paid.len());
                for order in &paid {
                    let Some(&i) = at.get(order.sn.as_str()) else { continue };
                    let p = &items[i].event.payload;
                    items[i].in_span(|| stage_paid(events, order, p, with_mobile.contains(&p.user_id)));
                    done.push(i);
                }
                Ok(done)
            })
            .await
    }
}

/// The order is paid: tell the world and ask for the pay-success and check-in messages.
async fn announce_paid(
    c: &mut Conn,
    events: &mut bus::Events,
    order: &orders::OrderRow,
    p: &PaymentStatusChanged,
) -> Result<(), StorageError> {
    let has_mobile = users::find(c, p.user_id).await?.is_some_and(|u| u.mobile.is_some());
    stage_paid(events, order, p, has_mobile);
    metrics::order_transition(TradeState::WaitPay, TradeState::WaitUse);
    Ok(())
}

/// What a paid order announces, on either path: its new state, and the pay-success and check-in messages (and the
/// pay-success SMS when the user has a mobile number).
fn stage_paid(events: &mut bus::Events, order: &orders::OrderRow, p: &PaymentStatusChanged, has_mobile: bool) {
    let changed = OrderStatusChanged {
        order_sn: p.order_sn.clone(),
        user_id: p.user_id,
        from: TradeState::WaitPay,
        to: TradeState::WaitUse,
    };
    events.add(&changed.envelope());
    let sms: &[NotifyTemplate] = if has_mobile { &[NotifyTemplate::PaySuccess] } else { &[] };
    stage_notifications(
        events,
        order,
        p.user_id,
        p.pay_total,
        &[NotifyTemplate::PaySuccess, NotifyTemplate::CheckinNotice],
        sms,
    );
}

/// Whether the order's paid state belongs to a payment other than this one (a second payment for one order).
async fn paid_by_another(c: &mut Conn, p: &PaymentStatusChanged) -> Result<bool, StorageError> {
    let all = payments::list_for_order(c, &p.order_sn).await?;
    Ok(all.iter().any(|other| {
        other.sn != p.payment_sn.as_str() && matches!(other.status(), PayStatus::Paid | PayStatus::Refunded)
    }))
}

/// Asks the notifier for `mini` subscribe messages and `sms` text messages about `order` (SMS only to users who
/// gave a mobile number; the notifier checks again when it sends), in the caller's transaction.
pub(crate) async fn request_notifications(
    c: &mut Conn,
    events: &mut bus::Events,
    order: &orders::OrderRow,
    user_id: UserId,
    amount: Fen,
    mini: &[NotifyTemplate],
    sms: &[NotifyTemplate],
) -> Result<(), StorageError> {
    let has_mobile = !sms.is_empty() && users::find(c, user_id).await?.is_some_and(|u| u.mobile.is_some());
    stage_notifications(events, order, user_id, amount, mini, if has_mobile { sms } else { &[] });
    Ok(())
}

/// The notification requests of [`request_notifications`] once it is known whether SMS can reach the user.
fn stage_notifications(
    events: &mut bus::Events,
    order: &orders::OrderRow,
    user_id: UserId,
    amount: Fen,
    mini: &[NotifyTemplate],
    sms: &[NotifyTemplate],
) {
    let params = NotifyParams {
        order_sn: order.sn(),
        title: order.title.clone(),
        amount,
        live_start: order.live_start_date,
        live_end: order.live_end_date,
        trade_code: order.trade_code.clone(),
        live_people_num: order.live_people_num,
    };
    for &template in mini {
        let req = NotificationRequest { template, user_id, params: params.clone() };
        events.add(&MiniprogramNotify(req).envelope());
    }
    for &template in sms {
        let req = NotificationRequest { template, user_id, params: params.clone() };
        events.add(&SmsNotify(req).envelope());
    }
}
