//! The payment processor: consumes `wechat.transaction` (verified reports from WeChat) and moves payments.
//! SUCCESS moves a waiting payment to paid — only when appid, mchid and `amount.total` match — and writes
//! `payment.status` to the outbox in the same transaction. Unknown payments and mismatches are refused
//! permanently (counted, dead-lettered), never dropped; replays change nothing and are acked.

use bus::events::{PaymentStatusChanged, RefundReason, RefundRequested, WechatTransactionReported};
use bus::{Delivery, Envelope, Handled, Handler, HandlerError, Item};
use storage::{DomainError, PayStatus, PaymentSn, PgPool, StorageError, Transition, UserId, payments};

use crate::metrics;
use crate::metrics::Rejection;

/// Handler for the `payment` consumer.
pub struct PaymentProcessor {
    pool: PgPool,
    outbox: bus::Outbox,
    appid: String,
    mchid: String,
}

impl PaymentProcessor {
    /// `appid` and `mchid` are ours: a report for another merchant or app is refused.
    pub fn new(pool: PgPool, outbox: bus::Outbox, appid: impl Into<String>, mchid: impl Into<String>) -> Self {
        PaymentProcessor { pool, outbox, appid: appid.into(), mchid: mchid.into() }
    }
}

fn refuse(reason: Rejection, detail: String) -> HandlerError {
    metrics::rejected(reason);
    HandlerError::Permanent(detail)
}

/// A complete SUCCESS report: what marking its payment paid needs.
struct Success {
    sn: PaymentSn,
    total: i64,
    details: payments::PaidDetails,
}

/// The announcement of a payment that just became paid, whichever path paid it.
fn paid_event(
    sn: &PaymentSn,
    order_sn: storage::OrderSn,
    user_id: UserId,
    pay_total: storage::Fen,
    details: &payments::PaidDetails,
) -> PaymentStatusChanged {
    PaymentStatusChanged {
        payment_sn: sn.clone(),
        order_sn,
        user_id,
        from: PayStatus::Waiting,
        to: PayStatus::Paid,
        pay_total,
        transaction_id: Some(details.transaction_id.clone()),
        pay_time: Some(details.pay_time),
    }
}

fn success(r: &WechatTransactionReported) -> Option<Success> {
    let (Some(total), Some(transaction_id), Some(pay_time)) = (r.amount_total, &r.transaction_id, r.success_time)
    else {
        return None;
    };
    Some(Success {
        sn: PaymentSn::parse(&r.out_trade_no).ok()?,
        total,
        details: payments::PaidDetails {
            transaction_id: transaction_id.clone(),
            trade_type: r.trade_type.clone().unwrap_or_default(),
            trade_state: r.trade_state.clone(),
            trade_state_desc: r.trade_state_desc.clone(),
            pay_time,
        },
    })
}

impl Handler for PaymentProcessor {
    type Event = WechatTransactionReported;
    const BATCH: usize = 64;

    /// The reports that pay a waiting payment of the right amount — nearly all of them under load — in one
    /// transaction (one UPDATE for all, one INSERT for their announcements); everything else, and everything if
    /// that transaction fails, one by one through [`Handler::handle`], which refuses, diagnoses and dead-letters.
    async fn handle_batch(&self, items: Vec<Item<WechatTransactionReported>>) -> Vec<Result<Handled, HandlerError>> {
        let mut candidates: Vec<(usize, Success)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, item) in items.iter().enumerate() {
            let r = &item.event.payload;
            if r.appid != self.appid || r.mchid != self.mchid || r.trade_state != "SUCCESS" {
                continue;
            }
            if r.currency.as_deref() != Some("CNY") {
                continue;
            }
            // A payment reported twice in one batch (callback and query): the second waits for the one-by-one pass.
            if let Some(s) = success(r)
                && seen.insert(s.sn.clone())
            {
                candidates.push((i, s));
            }
        }
        let mut results: Vec<Option<Result<Handled, HandlerError>>> = vec![None; items.len()];
        if candidates.len() > 1 {
            match self.pay_many(&items, &candidates).await {
                Ok(done) => {
                    tracing::debug!(paid = done.len(), of = candidates.len(), "payments paid in one transaction");
                    for i in done {
                        results[i] = Some(Ok(Handled::Done));
                        metrics::payment_transition(PayStatus::Waiting, PayStatus::Paid);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, reports = candidates.len(), "batch failed; handling its reports one by one")
                }
            }
        }
        bus::finish_one_by_one(self, items, results).await
    }

    async fn handle(&self, event: Envelope<WechatTransactionReported>, _: &Delivery) -> Result<Handled, HandlerError> {
        let r = event.payload;
        if r.appid != self.appid || r.mchid != self.mchid {
            return Err(refuse(
                Rejection::ForeignMerchant,
                format!("report for appid {} / mchid {} is not ours", r.appid, r.mchid),
            ));
        }
        // Money moves only in CNY, and a success must say so: a report without a currency is not trusted.
        let no_cny = if r.trade_state == "SUCCESS" {
            r.currency.as_deref() != Some("CNY")
        } else {
            r.currency.as_deref().is_some_and(|c| c != "CNY")
        };
        if no_cny {
            return Err(refuse(
                Rejection::CurrencyMismatch,
                format!("report in {:?}, payments are in CNY", r.currency),
            ));
        }
        let sn = PaymentSn::parse(&r.out_trade_no)
            .map_err(|_| refuse(Rejection::UnknownPayment, format!("unknown payment {:?}", r.out_trade_no)))?;
        match r.trade_state.as_str() {
            "SUCCESS" => self.paid(&sn, &r).await,
            "CLOSED" | "REVOKED" => self.closed(&sn, &r).await,
            // Still open at WeChat: nothing to change.
            "NOTPAY" | "USERPAYING" | "ACCEPT" | "PAYERROR" => Ok(Handled::Done),
            "REFUND" => self.refunded_at_wechat(&sn).await,
            other => Err(refuse(Rejection::UnknownState, format!("unknown trade_state {other:?} for {sn}"))),
        }
    }
}

impl PaymentProcessor {
    /// Marks the candidates' payments paid in one transaction and stages their announcements, each in the span of
    /// its report; returns the indexes of the items that were paid.
    async fn pay_many(
        &self,
        items: &[Item<WechatTransactionReported>],
        candidates: &[(usize, Success)],
    ) -> Result<Vec<usize>, HandlerError> {
        let mut conn = self.pool.get().await.map_err(StorageError::from)?;
        self.outbox
            .transaction::<_, HandlerError, _>(&mut conn, async |c, events| {
                let args: Vec<_> = candidates.iter().map(|(_, s)| (&s.sn, s.total, &s.details)).collect();
                let paid = payments::pay_many_if_waiting(c, &args).await?;
                let at: std::collections::HashMap<&str, &(usize, Success)> =
                    candidates.iter().map(|c| (c.1.sn.as_str(), c)).collect();
                let mut done = Vec::with_capacity(paid.len());
                for p in paid {
                    let Some((i, s)) = at.get(p.sn.as_str()) else { continue };
                    let changed = paid_event(&s.sn, p.order_sn(), UserId(p.user_id), p.total(), &s.details);
                    events.add(&items[*i].in_span(|| changed.envelope()));
                    done.push(*i);
                }
                Ok(done)
            })
            .await
    }

    async fn paid(&self, sn: &PaymentSn, r: &WechatTransactionReported) -> Result<Handled, HandlerError> {
        let (Some(total), Some(transaction_id), Some(pay_time)) = (r.amount_total, &r.transaction_id, r.success_time)
        else {
            return Err(refuse(
                Rejection::Incomplete,
                format!("SUCCESS for {sn} without amount, transaction id or success time"),
            ));
        };
        let details = payments::PaidDetails {
            transaction_id: transaction_id.clone(),
            trade_type: r.trade_type.clone().unwrap_or_default(),
            trade_state: r.trade_state.clone(),
            trade_state_desc: r.trade_state_desc.clone(),
            pay_time,
        };
        let mut conn = self.pool.get().await.map_err(StorageError::from)?;
        self.outbox.transaction::<_, HandlerError, _>(&mut conn, async |c, events| {
            // The common case in one statement. Its row lock, like `lock_by_sn`'s below, serialises everything that
            // happens to this payment, which also keeps its outbox events in order.
            if let Some(p) = payments::pay_if_waiting(c, sn, total, &details).await? {
                events.add(&paid_event(sn, p.order_sn(), UserId(p.user_id), p.total(), &details).envelope());
                return Ok(Handled::Done);
            }
            // Not a waiting payment of that amount: find out why, under the row lock.
            let payment = payments::lock_by_sn(c, sn)
                .await?
                .ok_or_else(|| refuse(Rejection::UnknownPayment, format!("unknown payment {sn}")))?;
            if payment.pay_total != total {
                return Err(refuse(
                    Rejection::AmountMismatch,
                    format!(
                        "amount mismatch for {sn}: WeChat says {total} fen, the payment is {} fen",
                        payment.pay_total
                    ),
                ));
            }
            match payments::mark_paid(c, sn, &details).await {
                Ok(Transition::Changed) => {
                    let changed =
                        paid_event(sn, payment.order_sn(), UserId(payment.user_id), payment.total(), &details);
                    events.add(&changed.envelope());
                    Ok(Handled::Done)
                }
                Ok(Transition::Unchanged) => Ok(Handled::Duplicate),
                // Already refunded here: a late or replayed SUCCESS changes nothing.
                Err(StorageError::Domain(DomainError::Refused { ref from, .. })) if from == "Refunded" => {
                    Ok(Handled::Duplicate)
                }
                // Paid at WeChat while closed here (a close that did not reach WeChat): the money must go back.
                // Ask for the refund in this transaction; the refund stream keeps the request until it is handled.
                Err(StorageError::Domain(DomainError::Refused { from, .. })) => {
                    tracing::error!(payment = %sn, %from, "WeChat reports a closed payment paid; requesting a refund");
                    let refund = RefundRequested {
                        payment_sn: sn.clone(),
                        order_sn: payment.order_sn(),
                        user_id: UserId(payment.user_id),
                        reason: RefundReason::OrderClosed,
                        amount: payment.total(),
                    };
                    events.add(&refund.envelope());
                    metrics::refund_requested("paid_after_close");
                    Ok(Handled::Done)
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
        .inspect(|h| {
            if *h == Handled::Done {
                metrics::payment_transition(PayStatus::Waiting, PayStatus::Paid);
            }
        })
    }

    /// WeChat says the transaction was refunded. Fine for a payment refunded here; for one still waiting here the
    /// money moved without us (lost callback, then a refund from the merchant console): an operator must look.
    async fn refunded_at_wechat(&self, sn: &PaymentSn) -> Result<Handled, HandlerError> {
        let mut conn = self.pool.get().await.map_err(StorageError::from)?;
        let payment = payments::find_by_sn(&mut conn, sn)
            .await?
            .ok_or_else(|| refuse(Rejection::UnknownPayment, format!("unknown payment {sn}")))?;
        match payment.status() {
            PayStatus::Waiting => Err(refuse(
                Rejection::RefundedWhileWaiting,
                format!("WeChat reports {sn} refunded but it never was paid here: reconcile by hand"),
            )),
            _ => Ok(Handled::Done),
        }
    }

    async fn closed(&self, sn: &PaymentSn, r: &WechatTransactionReported) -> Result<Handled, HandlerError> {
        let mut conn = self.pool.get().await.map_err(StorageError::from)?;
        self.outbox
            .transaction::<_, HandlerError, _>(&mut conn, async |c, events| {
                let payment = payments::lock_by_sn(c, sn)
                    .await?
                    .ok_or_else(|| refuse(Rejection::UnknownPayment, format!("unknown payment {sn}")))?;
                match payments::transition(c, sn, PayStatus::Waiting, PayStatus::Closed, &r.trade_state).await {
                    Ok(Transition::Changed) => {
                        let changed = PaymentStatusChanged {
                            payment_sn: sn.clone(),
                            order_sn: payment.order_sn(),
                            user_id: UserId(payment.user_id),
                            from: PayStatus::Waiting,
                            to: PayStatus::Closed,
                            pay_total: payment.total(),
                            transaction_id: None,
                            pay_time: None,
                        };
                        events.add(&changed.envelope());
                        metrics::payment_transition(PayStatus::Waiting, PayStatus::Closed);
                        Ok(Handled::Done)
                    }
                    Ok(Transition::Unchanged) => Ok(Handled::Duplicate),
                    // Closed at WeChat but paid here cannot happen (WeChat never closes a paid order); a stale
                    // report that arrives after the payment moved on is a no-op.
                    Err(StorageError::Domain(DomainError::Refused { .. })) => Ok(Handled::Duplicate),
                    Err(e) => Err(e.into()),
                }
            })
            .await
    }
}
