//! `processed_event`: the consumer inbox. JetStream drops a repeated `Nats-Msg-Id` only within its duplicate
//! window; WeChat retries a callback for 24 hours. Claiming the key here, in the same transaction as the side
//! effect, makes a replay at any later time a no-op.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use crate::db::{Conn, Result};
use crate::prepared::prepared;
use crate::schema::processed_event as pe;

/// Records that `consumer` handled `key`. Returns `false` if it already had (the caller skips its side effect but
/// still acknowledges the message).
pub async fn claim(conn: &mut Conn, consumer: &str, key: &str) -> Result<bool> {
    let n = prepared(
        diesel::insert_into(pe::table).values((pe::consumer.eq(consumer), pe::key.eq(key))).on_conflict_do_nothing(),
    )
    .execute(conn)
    .await?;
    Ok(n == 1)
}

/// Whether `consumer` has handled `key`.
pub async fn seen(conn: &mut Conn, consumer: &str, key: &str) -> Result<bool> {
    Ok(diesel::select(diesel::dsl::exists(pe::table.filter(pe::consumer.eq(consumer)).filter(pe::key.eq(key))))
        .get_result(conn)
        .await?)
}

/// Deletes up to `limit` keys claimed longer than `older_than` ago; returns how many. A key is only needed while
/// its event can still be delivered again: keep `older_than` above the streams' `max_age`.
pub async fn prune(conn: &mut Conn, older_than: std::time::Duration, limit: i64) -> Result<usize> {
    use diesel::sql_types::{BigInt, Double};
    Ok(prepared(
        diesel::sql_query(
            "DELETE FROM processed_event WHERE ctid = ANY(ARRAY( \
                 SELECT ctid FROM processed_event \
                 WHERE processed_time < now() - make_interval(secs => $1) LIMIT $2))",
        )
        .bind::<Double, _>(older_than.as_secs_f64())
        .bind::<BigInt, _>(limit),
    )
    .execute(conn)
    .await?)
}
