//! `refund`: one full refund per payment. Its sn is WeChat's `out_refund_no` and is derived from the payment's sn,
//! so every retry of a refund, by any worker, asks WeChat for the same refund and WeChat never pays twice.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use crate::db::{Conn, Result};
use crate::domain::{Fen, OrderSn, PaymentSn, RefundSn, RefundStatus, Transition};
use crate::payments::PaymentRow;
use crate::schema::refund as r;

/// A stored refund.
#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = r, check_for_backend(diesel::pg::Pg))]
pub struct RefundRow {
    pub id: i64,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
    pub sn: String,
    pub payment_sn: String,
    pub order_sn: String,
    pub user_id: i64,
    /// `order_closed` or `user_requested`.
    pub reason: String,
    pub refund_total: i64,
    pub pay_total: i64,
    pub status: i16,
    pub wechat_refund_id: Option<String>,
    /// WeChat's raw status (SUCCESS, PROCESSING, CLOSED, ABNORMAL); empty until WeChat answered.
    pub wechat_status: String,
    pub success_time: Option<DateTime<Utc>>,
}

impl RefundRow {
    pub fn sn(&self) -> RefundSn {
        RefundSn::parse(&self.sn).expect("the database checks the serial format")
    }
    pub fn payment_sn(&self) -> PaymentSn {
        PaymentSn::parse(&self.payment_sn).expect("refunds reference a valid payment serial")
    }
    pub fn order_sn(&self) -> OrderSn {
        OrderSn::parse(&self.order_sn).expect("refunds reference a valid order serial")
    }
    pub fn status(&self) -> RefundStatus {
        RefundStatus::from_code(self.status).expect("the database checks the status range")
    }
    pub fn total(&self) -> Fen {
        Fen::new(self.refund_total).expect("the database checks the amount")
    }
    pub fn pay_total(&self) -> Fen {
        Fen::new(self.pay_total).expect("the database checks the amount")
    }
    /// Whether the user asked for it (and their order becomes refunded), rather than a payment for an order the
    /// user no longer has.
    pub fn user_requested(&self) -> bool {
        self.reason == "user_requested"
    }
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = r)]
pub struct NewRefund {
    pub sn: String,
    pub payment_sn: String,
    pub order_sn: String,
    pub user_id: i64,
    pub reason: String,
    pub refund_total: i64,
    pub pay_total: i64,
}

impl NewRefund {
    /// The full refund of `payment`; `user_requested` is false for money sent back because the order is gone.
    pub fn full(payment: &PaymentRow, user_requested: bool) -> Self {
        let sn = payment.sn();
        NewRefund {
            sn: RefundSn::for_payment(&sn).to_string(),
            payment_sn: sn.to_string(),
            order_sn: payment.order_sn.clone(),
            user_id: payment.user_id,
            reason: if user_requested { "user_requested" } else { "order_closed" }.into(),
            refund_total: payment.pay_total,
            pay_total: payment.pay_total,
        }
    }
}

/// Inserts the refund unless the payment already has one; returns the stored row and whether this call created it.
/// The first request wins: a later one (a user asking for a refund the closer already asked for) reuses it.
pub async fn insert_or_get(conn: &mut Conn, new: &NewRefund) -> Result<(RefundRow, bool)> {
    let created: Option<RefundRow> = diesel::insert_into(r::table)
        .values(new)
        .on_conflict_do_nothing()
        .returning(RefundRow::as_returning())
        .get_result(conn)
        .await
        .optional()?;
    match created {
        Some(row) => Ok((row, true)),
        None => Ok((
            r::table.filter(r::payment_sn.eq(&new.payment_sn)).select(RefundRow::as_select()).first(conn).await?,
            false,
        )),
    }
}

pub async fn find_by_sn(conn: &mut Conn, sn: &RefundSn) -> Result<Option<RefundRow>> {
    Ok(r::table.filter(r::sn.eq(sn.as_str())).select(RefundRow::as_select()).first(conn).await.optional()?)
}

/// The refund of a payment, if one was asked for.
pub async fn find_for_payment(conn: &mut Conn, payment: &PaymentSn) -> Result<Option<RefundRow>> {
    Ok(r::table
        .filter(r::payment_sn.eq(payment.as_str()))
        .select(RefundRow::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// What WeChat said about a refund.
#[derive(Debug, Clone, Default)]
pub struct WechatRefund {
    pub refund_id: Option<String>,
    /// WeChat's raw status.
    pub status: String,
    pub success_time: Option<DateTime<Utc>>,
}

/// Moves the refund to `to` with WeChat's details, if the domain allows it from where the row is (the row is
/// locked for the check). The same status again is [`Transition::Unchanged`] and writes nothing; a move out of a
/// final status is refused with [`crate::DomainError::Refused`].
pub async fn settle(conn: &mut Conn, sn: &RefundSn, to: RefundStatus, wechat: &WechatRefund) -> Result<Transition> {
    let current: i16 = r::table.filter(r::sn.eq(sn.as_str())).select(r::status).for_update().first(conn).await?;
    let change = RefundStatus::from_code(current)?.transition(to)?;
    if change == Transition::Changed {
        let row = r::table.filter(r::sn.eq(sn.as_str()));
        diesel::update(row)
            .set((
                r::status.eq(to.code()),
                r::wechat_status.eq(&wechat.status),
                r::success_time.eq(wechat.success_time),
            ))
            .execute(conn)
            .await?;
        if let Some(id) = &wechat.refund_id {
            diesel::update(row).set(r::wechat_refund_id.eq(id)).execute(conn).await?;
        }
    }
    Ok(change)
}

/// Claims up to `batch` refunds WeChat has not settled and nobody touched since `untouched_since`, oldest first,
/// for a refund query. Claiming touches the row (`update_time` = now), so concurrent reconcilers (`SKIP LOCKED`)
/// never claim the same refund and the next claim of it waits another interval. Run it in its own short
/// transaction.
pub async fn claim_unsettled(conn: &mut Conn, untouched_since: DateTime<Utc>, batch: i64) -> Result<Vec<RefundRow>> {
    use diesel::sql_types::{BigInt, Timestamptz};
    Ok(diesel::sql_query(
        "UPDATE refund SET update_time = now() WHERE id IN ( \
           SELECT id FROM refund WHERE status IN (0, 1) AND update_time <= $1 \
           ORDER BY update_time, id LIMIT $2 FOR UPDATE SKIP LOCKED) \
         RETURNING *",
    )
    .bind::<Timestamptz, _>(untouched_since)
    .bind::<BigInt, _>(batch)
    .load(conn)
    .await?)
}

/// Refunds WeChat has not settled (requested or processing), for the gauge.
pub async fn count_unsettled(conn: &mut Conn) -> Result<i64> {
    Ok(r::table
        .filter(r::status.eq_any([RefundStatus::Requested.code(), RefundStatus::Processing.code()]))
        .count()
        .get_result(conn)
        .await?)
}
