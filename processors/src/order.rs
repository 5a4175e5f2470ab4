//! The order processor: consumes `payment.status`. A paid payment moves its order from waitPay to waitUse and asks
//! the notifier for the pay-success and check-in messages, all in one transaction with the order change. A
//! payment for an order that is no longer waiting for it (closed by the timeout, cancelled, or already paid by
//! another payment) asks for a refund: money is never kept for an order the user does not have.

use bus::events::{
    MiniprogramNotify, NotificationRequest, NotifyParams, NotifyTemplate, OrderStatusChanged, PaymentStatusChanged,
    RefundReason, RefundRequested, SmsNotify,
};
use bus::{Delivery, Envelope, Handled, Handler, HandlerError};
use storage::{Conn, Fen, PayStatus, PgPool, StorageError, TradeState, UserId, orders, payments, processed, users};

use crate::metrics;

/// The durable consumer name; also the `processed_event` namespace.
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

    async fn handle(&self, event: Envelope<PaymentStatusChanged>, _: &Delivery) -> Result<Handled, HandlerError> {
        let p = event.payload;
        if p.to != PayStatus::Paid {
            // Closed and refunded payments change no order here (the lifecycle processor owns those paths).
            return Ok(Handled::Done);
        }
        let id = event.id.to_string();
        let mut conn = self.pool.get().await.map_err(StorageError::from)?;
        self.outbox.transaction::<_, HandlerError, _>(&mut conn, async |c, events| {
            if !processed::claim(c, CONSUMER, &id).await? {
                return Ok(Handled::Duplicate);
            }
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
                TradeState::WaitUse if !paid_by_another(c, &p).await? => Ok(Handled::Duplicate),
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

/// The order is paid: tell the world and ask for the pay-success and check-in messages.
async fn announce_paid(
    c: &mut Conn,
    events: &mut bus::Events,
    order: &orders::OrderRow,
    p: &PaymentStatusChanged,
) -> Result<(), StorageError> {
    let changed = OrderStatusChanged {
        order_sn: p.order_sn.clone(),
        user_id: p.user_id,
        from: TradeState::WaitPay,
        to: TradeState::WaitUse,
    };
    events.add(&changed.envelope());
    request_notifications(
        c,
        events,
        order,
        p.user_id,
        p.pay_total,
        &[NotifyTemplate::PaySuccess, NotifyTemplate::CheckinNotice],
        &[NotifyTemplate::PaySuccess],
    )
    .await?;
    metrics::order_transition(TradeState::WaitPay, TradeState::WaitUse);
    Ok(())
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
    if !sms.is_empty() && users::find(c, user_id).await?.is_some_and(|u| u.mobile.is_some()) {
        for &template in sms {
            let req = NotificationRequest { template, user_id, params: params.clone() };
            events.add(&SmsNotify(req).envelope());
        }
    }
    Ok(())
}
