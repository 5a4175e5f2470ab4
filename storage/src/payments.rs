//! `third_payment`: one open payment per order, conditional state changes.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use crate::db::{Conn, Result};
use crate::domain::{DomainError, Fen, OrderSn, PayStatus, PaymentSn, Transition, UserId};
use crate::prepared::prepared;
use crate::schema::third_payment as p;

/// A stored payment.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = p, check_for_backend(diesel::pg::Pg))]
pub struct PaymentRow {
    pub id: i64,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
    pub sn: String,
    pub user_id: i64,
    pub pay_mode: String,
    pub trade_type: String,
    pub trade_state: String,
    pub pay_total: i64,
    pub transaction_id: Option<String>,
    pub trade_state_desc: String,
    pub order_sn: String,
    pub service_type: String,
    pub pay_status: i16,
    pub pay_time: Option<DateTime<Utc>>,
    pub prepay_id: Option<String>,
    pub prepay_time: Option<DateTime<Utc>>,
    /// WeChat queries the reconciler has claimed for this payment.
    pub reconcile_attempts: i16,
    /// When the reconciler asks WeChat next (None: never asked yet, or the schedule is used up).
    pub next_reconcile_time: Option<DateTime<Utc>>,
}

impl PaymentRow {
    pub fn sn(&self) -> PaymentSn {
        PaymentSn::parse(&self.sn).expect("the database checks the serial format")
    }
    pub fn order_sn(&self) -> OrderSn {
        OrderSn::parse(&self.order_sn).expect("orders are referenced by a valid serial")
    }
    pub fn status(&self) -> PayStatus {
        PayStatus::from_code(self.pay_status).expect("the database checks the status range")
    }
    pub fn total(&self) -> Fen {
        Fen::new(self.pay_total).expect("the database checks the amount")
    }
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = p)]
pub struct NewPayment {
    pub sn: String,
    pub user_id: i64,
    pub pay_total: i64,
    pub order_sn: String,
    pub service_type: String,
}

impl NewPayment {
    pub fn homestay_order(sn: &PaymentSn, user: UserId, total: Fen, order: &OrderSn) -> Self {
        Self {
            sn: sn.to_string(),
            user_id: user.0,
            pay_total: total.get(),
            order_sn: order.to_string(),
            service_type: "homestayOrder".into(),
        }
    }
}

/// Inserts a waiting payment. A second open payment for the same order fails with the
/// `third_payment_one_open_per_order` conflict; callers reuse the open one instead.
pub async fn insert(conn: &mut Conn, new: &NewPayment) -> Result<PaymentRow> {
    Ok(prepared(diesel::insert_into(p::table).values(new).returning(PaymentRow::as_returning()))
        .get_result(conn)
        .await?)
}

pub async fn find_by_sn(conn: &mut Conn, sn: &PaymentSn) -> Result<Option<PaymentRow>> {
    Ok(p::table.filter(p::sn.eq(sn.as_str())).select(PaymentRow::as_select()).first(conn).await.optional()?)
}

pub async fn lock_by_sn(conn: &mut Conn, sn: &PaymentSn) -> Result<Option<PaymentRow>> {
    Ok(p::table
        .filter(p::sn.eq(sn.as_str()))
        .select(PaymentRow::as_select())
        .for_update()
        .first(conn)
        .await
        .optional()?)
}

/// The order's open (waiting) payment, if any.
pub async fn find_open_for_order(conn: &mut Conn, order: &OrderSn) -> Result<Option<PaymentRow>> {
    Ok(p::table
        .filter(p::order_sn.eq(order.as_str()))
        .filter(p::pay_status.eq(PayStatus::Waiting.code()))
        .select(PaymentRow::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// Every payment of an order, newest first.
pub async fn list_for_order(conn: &mut Conn, order: &OrderSn) -> Result<Vec<PaymentRow>> {
    Ok(p::table
        .filter(p::order_sn.eq(order.as_str()))
        .order(p::id.desc())
        .select(PaymentRow::as_select())
        .load(conn)
        .await?)
}

/// Remembers the prepay id WeChat gave for this payment (valid two hours), so a retried prepay can reuse it.
pub async fn record_prepay(conn: &mut Conn, sn: &PaymentSn, prepay_id: &str, at: DateTime<Utc>) -> Result<bool> {
    let n = prepared(
        diesel::update(p::table)
            .filter(p::sn.eq(sn.as_str()))
            .filter(p::pay_status.eq(PayStatus::Waiting.code()))
            .set((p::prepay_id.eq(prepay_id), p::prepay_time.eq(at))),
    )
    .execute(conn)
    .await?;
    Ok(n == 1)
}

/// What WeChat told us about a successful payment.
#[derive(Debug, Clone)]
pub struct PaidDetails {
    pub transaction_id: String,
    pub trade_type: String,
    /// WeChat's raw trade_state (`SUCCESS`).
    pub trade_state: String,
    pub trade_state_desc: String,
    /// WeChat's `success_time`.
    pub pay_time: DateTime<Utc>,
}

/// waiting → paid, with WeChat's details, only if the payment is still waiting. A replay of the same success is
/// [`Transition::Unchanged`]; a payment in any other state is refused.
pub async fn mark_paid(conn: &mut Conn, sn: &PaymentSn, paid: &PaidDetails) -> Result<Transition> {
    let n = prepared(
        diesel::update(p::table).filter(p::sn.eq(sn.as_str())).filter(p::pay_status.eq(PayStatus::Waiting.code())).set(
            (
                p::pay_status.eq(PayStatus::Paid.code()),
                p::transaction_id.eq(&paid.transaction_id),
                p::trade_type.eq(&paid.trade_type),
                p::trade_state.eq(&paid.trade_state),
                p::trade_state_desc.eq(&paid.trade_state_desc),
                p::pay_time.eq(paid.pay_time),
            ),
        ),
    )
    .execute(conn)
    .await?;
    if n == 1 {
        return Ok(Transition::Changed);
    }
    settle_miss(conn, sn, PayStatus::Paid).await
}

/// The common case in one statement: waiting → paid when the payment exists, is still waiting and is for exactly
/// `total` fen, returning what the announcement needs. `None` when any of that does not hold: the caller then
/// locks the row and finds out which (unknown, another amount, already paid, closed), with [`mark_paid`].
pub async fn pay_if_waiting(
    conn: &mut Conn,
    sn: &PaymentSn,
    total: i64,
    paid: &PaidDetails,
) -> Result<Option<PaidNow>> {
    Ok(pay_many_if_waiting(conn, &[(sn, total, paid)]).await?.pop())
}

/// A payment [`pay_many_if_waiting`] marked paid.
#[derive(Debug, Clone, QueryableByName)]
pub struct PaidNow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub sn: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub order_sn: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub user_id: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub pay_total: i64,
}

impl PaidNow {
    pub fn order_sn(&self) -> OrderSn {
        OrderSn::parse(&self.order_sn).expect("orders are referenced by a valid serial")
    }
    pub fn total(&self) -> Fen {
        Fen::new(self.pay_total).expect("the database checks the amount")
    }
}

/// [`pay_if_waiting`] for many payments in one statement: each `(sn, total, details)` whose payment is still
/// waiting and is for exactly `total` fen becomes paid. Returns the ones that did; the others are for the caller to
/// look into one by one. One fixed SQL text whatever the number of payments.
pub async fn pay_many_if_waiting(conn: &mut Conn, paid: &[(&PaymentSn, i64, &PaidDetails)]) -> Result<Vec<PaidNow>> {
    use diesel::sql_types::{Array, BigInt, SmallInt, Text, Timestamptz};
    if paid.is_empty() {
        return Ok(Vec::new());
    }
    let sns: Vec<&str> = paid.iter().map(|p| p.0.as_str()).collect();
    let totals: Vec<i64> = paid.iter().map(|p| p.1).collect();
    let ids: Vec<&str> = paid.iter().map(|p| p.2.transaction_id.as_str()).collect();
    let types: Vec<&str> = paid.iter().map(|p| p.2.trade_type.as_str()).collect();
    let states: Vec<&str> = paid.iter().map(|p| p.2.trade_state.as_str()).collect();
    let descs: Vec<&str> = paid.iter().map(|p| p.2.trade_state_desc.as_str()).collect();
    let times: Vec<DateTime<Utc>> = paid.iter().map(|p| p.2.pay_time).collect();
    Ok(prepared(
        diesel::sql_query(
            "UPDATE third_payment p SET pay_status = $8, transaction_id = v.tid, trade_type = v.ttype, \
                 trade_state = v.tstate, trade_state_desc = v.tdesc, pay_time = v.ptime \
             FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[]) \
                  AS v(sn, total, tid, ttype, tstate, tdesc, ptime) \
             WHERE p.sn = v.sn AND p.pay_status = $9 AND p.pay_total = v.total \
             RETURNING p.sn, p.order_sn, p.user_id, p.pay_total",
        )
        .bind::<Array<Text>, _>(sns)
        .bind::<Array<BigInt>, _>(totals)
        .bind::<Array<Text>, _>(ids)
        .bind::<Array<Text>, _>(types)
        .bind::<Array<Text>, _>(states)
        .bind::<Array<Text>, _>(descs)
        .bind::<Array<Timestamptz>, _>(times)
        .bind::<SmallInt, _>(PayStatus::Paid.code())
        .bind::<SmallInt, _>(PayStatus::Waiting.code()),
    )
    .load(conn)
    .await?)
}

/// Moves a payment between statuses without extra fields (close, refund), only from `from`.
pub async fn transition(
    conn: &mut Conn,
    sn: &PaymentSn,
    from: PayStatus,
    to: PayStatus,
    raw_state: &str,
) -> Result<Transition> {
    if from.transition(to)? == Transition::Unchanged {
        return Ok(Transition::Unchanged);
    }
    let n = prepared(
        diesel::update(p::table)
            .filter(p::sn.eq(sn.as_str()))
            .filter(p::pay_status.eq(from.code()))
            .set((p::pay_status.eq(to.code()), p::trade_state.eq(raw_state))),
    )
    .execute(conn)
    .await?;
    if n == 1 {
        return Ok(Transition::Changed);
    }
    settle_miss(conn, sn, to).await
}

async fn settle_miss(conn: &mut Conn, sn: &PaymentSn, to: PayStatus) -> Result<Transition> {
    let current: Option<i16> =
        p::table.filter(p::sn.eq(sn.as_str())).select(p::pay_status).first(conn).await.optional()?;
    match current {
        None => Err(diesel::result::Error::NotFound.into()),
        Some(code) => {
            let current = PayStatus::from_code(code)?;
            // Each target state has exactly one state it may be reached from, so a miss means the row is elsewhere.
            if current == to {
                Ok(Transition::Unchanged)
            } else {
                Err(DomainError::Refused { kind: "payment", from: format!("{current:?}"), to: format!("{to:?}") }
                    .into())
            }
        }
    }
}

/// A waiting payment the reconciler claimed: ask WeChat about it now.
#[derive(Debug, Clone, QueryableByName)]
pub struct ReconcileClaim {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub sn: String,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub prepay_time: DateTime<Utc>,
    /// Queries claimed so far, this one included.
    #[diesel(sql_type = diesel::sql_types::SmallInt)]
    pub reconcile_attempts: i16,
}

/// Claims up to `batch` waiting payments due for a WeChat query at `now` and schedules their next query, in one
/// statement (run it in its own short transaction). `schedule_ms` holds the delays after prepay, in
/// milliseconds, at which a payment is asked about (increasing, not empty).
///
/// A payment is due when it was prepaid at WeChat, fewer than `schedule_ms.len()` queries were claimed for it, and
/// its next query time (never asked: prepay_time + the first delay) has come. Claiming bumps
/// `reconcile_attempts` and sets `next_reconcile_time` to prepay_time + the following delay (NULL after the last:
/// the payment then leaves both reconciliation indexes) before anyone asks WeChat, so concurrent reconcilers (`SKIP LOCKED`) never claim the same payment and a
/// crash between claim and query does not lead to an immediate second query.
pub async fn claim_for_reconcile(
    conn: &mut Conn,
    now: DateTime<Utc>,
    schedule_ms: &[i64],
    batch: i64,
) -> Result<Vec<ReconcileClaim>> {
    use diesel::sql_types::{Array, BigInt, Integer, Timestamptz};
    let Some(&first) = schedule_ms.first() else {
        return Ok(Vec::new());
    };
    let claims = diesel::sql_query(
        "WITH due AS ( \
           SELECT id FROM third_payment \
           WHERE pay_status = 0 AND prepay_time IS NOT NULL AND reconcile_attempts < $3 \
             AND (next_reconcile_time <= $1 \
                  OR (next_reconcile_time IS NULL AND reconcile_attempts = 0 AND prepay_time <= $1 - make_interval(secs => $4::float8 / 1000))) \
           ORDER BY coalesce(next_reconcile_time, prepay_time + make_interval(secs => $4::float8 / 1000)), id \
           LIMIT $5 \
           FOR UPDATE SKIP LOCKED) \
         UPDATE third_payment t \
         SET reconcile_attempts = t.reconcile_attempts + 1, \
             next_reconcile_time = \
               t.prepay_time + make_interval(secs => (($2::bigint[])[t.reconcile_attempts + 2])::float8 / 1000) \
         FROM due WHERE t.id = due.id \
         RETURNING t.sn, t.prepay_time, t.reconcile_attempts",
    )
    .bind::<Timestamptz, _>(now)
    .bind::<Array<BigInt>, _>(schedule_ms)
    .bind::<Integer, _>(i32::try_from(schedule_ms.len()).unwrap_or(i32::MAX))
    .bind::<BigInt, _>(first)
    .bind::<BigInt, _>(batch)
    .load(conn)
    .await?;
    Ok(claims)
}

/// Waiting payments prepaid at WeChat at or before `prepaid_before` (the reconciler's "still waiting past the first
/// delay" gauge).
pub async fn count_waiting_prepaid_before(conn: &mut Conn, prepaid_before: DateTime<Utc>) -> Result<i64> {
    Ok(p::table
        .filter(p::pay_status.eq(PayStatus::Waiting.code()))
        .filter(p::prepay_time.le(prepaid_before))
        .count()
        .get_result(conn)
        .await?)
}
