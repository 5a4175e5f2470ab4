//! `homestay_order`: creation, reads scoped to their owner, and conditional state changes.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use crate::db::{Conn, Result};
use crate::domain::{DomainError, Fen, HomestayId, OrderId, OrderSn, TradeState, Transition, UserId};
use crate::prepared::prepared;
use crate::schema::homestay_order as o;

/// A stored order.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = o, check_for_backend(diesel::pg::Pg))]
pub struct OrderRow {
    pub id: i64,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
    pub sn: String,
    pub user_id: i64,
    pub homestay_id: i64,
    pub title: String,
    pub sub_title: String,
    pub cover: String,
    pub info: String,
    pub people_num: i32,
    pub row_type: i16,
    pub need_food: bool,
    pub food_info: String,
    pub food_price: i64,
    pub homestay_price: i64,
    pub market_homestay_price: i64,
    pub homestay_business_id: i64,
    pub homestay_user_id: i64,
    pub live_start_date: DateTime<Utc>,
    pub live_end_date: DateTime<Utc>,
    pub live_people_num: i32,
    pub trade_state: i16,
    pub trade_code: String,
    pub remark: String,
    pub order_total_price: i64,
    pub food_total_price: i64,
    pub homestay_total_price: i64,
    pub pay_deadline: DateTime<Utc>,
}

impl OrderRow {
    pub fn id(&self) -> OrderId {
        OrderId(self.id)
    }
    pub fn sn(&self) -> OrderSn {
        OrderSn::parse(&self.sn).expect("the database checks the serial format")
    }
    pub fn state(&self) -> TradeState {
        TradeState::from_code(self.trade_state).expect("the database checks the state range")
    }
    pub fn total(&self) -> Fen {
        Fen::new(self.order_total_price).expect("the database checks the amount")
    }
}

/// What it takes to create an order; prices are copied from the homestay at booking time.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = o)]
pub struct NewOrder {
    pub sn: String,
    pub user_id: i64,
    pub homestay_id: i64,
    pub title: String,
    pub sub_title: String,
    pub cover: String,
    pub info: String,
    pub people_num: i32,
    pub row_type: i16,
    pub need_food: bool,
    pub food_info: String,
    pub food_price: i64,
    pub homestay_price: i64,
    pub market_homestay_price: i64,
    pub homestay_business_id: i64,
    pub homestay_user_id: i64,
    pub live_start_date: DateTime<Utc>,
    pub live_end_date: DateTime<Utc>,
    pub live_people_num: i32,
    pub trade_code: String,
    pub remark: String,
    pub order_total_price: i64,
    pub food_total_price: i64,
    pub homestay_total_price: i64,
    pub pay_deadline: DateTime<Utc>,
}

pub async fn insert(conn: &mut Conn, new: &NewOrder) -> Result<OrderRow> {
    Ok(prepared(diesel::insert_into(o::table).values(new).returning(OrderRow::as_returning())).get_result(conn).await?)
}

pub async fn find_by_sn(conn: &mut Conn, sn: &OrderSn) -> Result<Option<OrderRow>> {
    Ok(o::table.filter(o::sn.eq(sn.as_str())).select(OrderRow::as_select()).first(conn).await.optional()?)
}

/// The order, only if it belongs to `user`: callers can never read someone else's order by guessing a serial.
pub async fn find_for_user(conn: &mut Conn, user: UserId, sn: &OrderSn) -> Result<Option<OrderRow>> {
    Ok(o::table
        .filter(o::sn.eq(sn.as_str()))
        .filter(o::user_id.eq(user.0))
        .select(OrderRow::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// Locks the order row for the rest of the transaction (serialises writers of one order).
pub async fn lock_by_sn(conn: &mut Conn, sn: &OrderSn) -> Result<Option<OrderRow>> {
    Ok(o::table
        .filter(o::sn.eq(sn.as_str()))
        .select(OrderRow::as_select())
        .for_update()
        .first(conn)
        .await
        .optional()?)
}

/// A user's orders, newest first. `before` is the last id of the previous page (cursor paging: stable while new
/// orders arrive, and an index range scan on `(user_id, id desc)`).
pub async fn list_for_user(
    conn: &mut Conn,
    user: UserId,
    state: Option<TradeState>,
    before: Option<OrderId>,
    limit: i64,
) -> Result<Vec<OrderRow>> {
    let mut q = o::table.filter(o::user_id.eq(user.0)).into_boxed();
    if let Some(s) = state {
        q = q.filter(o::trade_state.eq(s.code()));
    }
    if let Some(b) = before {
        q = q.filter(o::id.lt(b.0));
    }
    Ok(q.order(o::id.desc()).limit(limit).select(OrderRow::as_select()).load(conn).await?)
}

/// How many orders of `user` wait for payment.
pub async fn count_unpaid(conn: &mut Conn, user: UserId) -> Result<i64> {
    Ok(o::table
        .filter(o::user_id.eq(user.0))
        .filter(o::trade_state.eq(TradeState::WaitPay.code()))
        .count()
        .get_result(conn)
        .await?)
}

/// Unpaid orders whose deadline has passed, oldest deadline first (served by the partial deadline index). Orders
/// with a payment already paid (or refunded) here are left out: the order processor owns those, and a batch of
/// them must never hide the orders that really are due behind it.
pub async fn unpaid_past_deadline(conn: &mut Conn, now: DateTime<Utc>, limit: i64) -> Result<Vec<OrderRow>> {
    use crate::schema::order_close_attempt as a;
    use crate::schema::third_payment as p;
    let settled = p::table
        .filter(p::order_sn.eq(o::sn))
        .filter(p::pay_status.eq_any([crate::PayStatus::Paid.code(), crate::PayStatus::Refunded.code()]));
    // Deferred after a failed attempt, or waiting for a person: not this pass.
    let held = a::table.filter(a::order_sn.eq(o::sn)).filter(a::retry_at.gt(now).or(a::attention_since.is_not_null()));
    Ok(o::table
        .filter(o::trade_state.eq(TradeState::WaitPay.code()))
        .filter(o::pay_deadline.le(now))
        .filter(diesel::dsl::not(diesel::dsl::exists(settled)))
        .filter(diesel::dsl::not(diesel::dsl::exists(held)))
        .order(o::pay_deadline.asc())
        .limit(limit)
        .select(OrderRow::as_select())
        .load(conn)
        .await?)
}

/// waitPay → waitUse in one statement, returning the order as it now is; `None` when it was not waiting for
/// payment (or does not exist), which the caller then looks into under [`lock_by_sn`].
pub async fn pay_if_waiting(conn: &mut Conn, sn: &OrderSn) -> Result<Option<OrderRow>> {
    Ok(pay_many_if_waiting(conn, &[sn]).await?.pop())
}

/// [`pay_if_waiting`] for many orders in one statement: those still waiting for payment become waitUse and are
/// returned as they now are; the others are for the caller to look into one by one.
pub async fn pay_many_if_waiting(conn: &mut Conn, sns: &[&OrderSn]) -> Result<Vec<OrderRow>> {
    let sns: Vec<&str> = sns.iter().map(|s| s.as_str()).collect();
    Ok(prepared(
        diesel::update(o::table)
            .filter(o::sn.eq_any(sns))
            .filter(o::trade_state.eq(TradeState::WaitPay.code()))
            .set(o::trade_state.eq(TradeState::WaitUse.code()))
            .returning(OrderRow::as_returning()),
    )
    .load(conn)
    .await?)
}

/// Moves an order from `from` to `to`, only if it is in `from` now. Checks the arrow first, so a refused
/// transition never reaches the database. When the row is not in `from`: already in `to` is a replay
/// ([`Transition::Unchanged`]); anything else is refused with the state it is really in.
pub async fn transition(conn: &mut Conn, sn: &OrderSn, from: TradeState, to: TradeState) -> Result<Transition> {
    if from.transition(to)? == Transition::Unchanged {
        return Ok(Transition::Unchanged);
    }
    let changed = prepared(
        diesel::update(o::table)
            .filter(o::sn.eq(sn.as_str()))
            .filter(o::trade_state.eq(from.code()))
            .set(o::trade_state.eq(to.code())),
    )
    .execute(conn)
    .await?;
    if changed == 1 {
        return Ok(Transition::Changed);
    }
    let current: Option<i16> =
        o::table.filter(o::sn.eq(sn.as_str())).select(o::trade_state).first(conn).await.optional()?;
    match current {
        None => Err(diesel::result::Error::NotFound.into()),
        Some(code) => {
            let current = TradeState::from_code(code)?;
            // Each target state has exactly one state it may be reached from, so a miss means the row is elsewhere.
            if current == to {
                Ok(Transition::Unchanged)
            } else {
                Err(DomainError::Refused { kind: "order", from: format!("{current:?}"), to: format!("{to:?}") }.into())
            }
        }
    }
}

/// The homestay an order was for (kept for completeness of the model).
pub fn homestay_of(row: &OrderRow) -> HomestayId {
    HomestayId(row.homestay_id)
}

/// The timeout closer could not close `sn` (`reason`, a metric label): counts the attempt and defers the next one
/// from `now` by `base` doubled with each attempt before this one, at most `cap`. Returns the attempts so far.
pub async fn close_deferred(
    conn: &mut Conn,
    sn: &OrderSn,
    reason: &str,
    now: DateTime<Utc>,
    base: std::time::Duration,
    cap: std::time::Duration,
) -> Result<i32> {
    use diesel::sql_types::{Double, Integer, Text, Timestamptz};
    #[derive(QueryableByName)]
    struct Attempts {
        #[diesel(sql_type = Integer)]
        attempts: i32,
    }
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    let row: Attempts = diesel::sql_query(
        "INSERT INTO order_close_attempt (order_sn, attempts, retry_at, last_reason) \
         VALUES ($1, 1, $2 + LEAST($3, $4) * interval '1 millisecond', $5) \
         ON CONFLICT (order_sn) DO UPDATE SET attempts = order_close_attempt.attempts + 1, \
             last_reason = EXCLUDED.last_reason, \
             retry_at = $2 + LEAST($3 * power(2, order_close_attempt.attempts), $4) * interval '1 millisecond' \
         RETURNING attempts",
    )
    .bind::<Text, _>(sn.as_str())
    .bind::<Timestamptz, _>(now)
    .bind::<Double, _>(ms(base))
    .bind::<Double, _>(ms(cap))
    .bind::<Text, _>(reason)
    .get_result(conn)
    .await?;
    Ok(row.attempts)
}

/// Takes `sn` out of the closer's passes until a person looks at it ([`resolve_attention`]).
pub async fn needs_attention(conn: &mut Conn, sn: &OrderSn, reason: &str, now: DateTime<Utc>) -> Result<()> {
    use crate::schema::order_close_attempt as a;
    diesel::update(a::table.filter(a::order_sn.eq(sn.as_str())).filter(a::attention_since.is_null()))
        .set((a::attention_reason.eq(reason), a::attention_since.eq(now)))
        .execute(conn)
        .await?;
    Ok(())
}

/// An order waiting for a person.
#[derive(Debug, Clone, Queryable)]
pub struct Attention {
    pub sn: String,
    pub user_id: i64,
    /// The order's state now (a person may have settled it another way meanwhile).
    pub trade_state: i16,
    pub attempts: i32,
    pub since: DateTime<Utc>,
    pub reason: String,
}

/// Orders waiting for a person, longest first.
pub async fn attention(conn: &mut Conn) -> Result<Vec<Attention>> {
    use crate::schema::order_close_attempt as a;
    Ok(a::table
        .inner_join(o::table.on(o::sn.eq(a::order_sn)))
        .filter(a::attention_since.is_not_null())
        .order(a::attention_since.asc())
        .select((
            o::sn,
            o::user_id,
            o::trade_state,
            a::attempts,
            a::attention_since.assume_not_null(),
            a::attention_reason.assume_not_null(),
        ))
        .load(conn)
        .await?)
}

/// How many orders wait for a person.
pub async fn attention_count(conn: &mut Conn) -> Result<i64> {
    use crate::schema::order_close_attempt as a;
    Ok(a::table.filter(a::attention_since.is_not_null()).count().get_result(conn).await?)
}

/// A person looked at `sn`: it goes back to the automatic passes with a clean slate. False when it was not waiting
/// for a person.
pub async fn resolve_attention(conn: &mut Conn, sn: &OrderSn) -> Result<bool> {
    use crate::schema::order_close_attempt as a;
    let n = diesel::delete(a::table.filter(a::order_sn.eq(sn.as_str())).filter(a::attention_since.is_not_null()))
        .execute(conn)
        .await?;
    Ok(n == 1)
}
