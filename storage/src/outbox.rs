//! The transactional outbox table. Rows are written in the caller's transaction (so an event exists if and only if
//! the state change it announces committed) and removed by a relay after JetStream acknowledged them.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bytea, Double, Jsonb, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use crate::db::{Conn, Result};
use crate::prepared::prepared;
use crate::schema::outbox as ob;

/// The channel the insert trigger notifies; relays LISTEN on it.
pub const NOTIFY_CHANNEL: &str = "paystream_outbox";

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = ob)]
pub struct NewOutboxRow {
    pub event_id: Uuid,
    /// Events with the same aggregate (e.g. `payment:PMT…`) are published in the order they were written.
    pub aggregate: String,
    /// Logical subject, without the deployment prefix (`payment.status`).
    pub subject: String,
    /// NATS headers to publish with (trace context of the writing transaction, event type, …).
    pub headers: serde_json::Value,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, QueryableByName)]
pub struct OutboxRow {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = SqlUuid)]
    pub event_id: Uuid,
    #[diesel(sql_type = Text)]
    pub aggregate: String,
    #[diesel(sql_type = Text)]
    pub subject: String,
    #[diesel(sql_type = Jsonb)]
    pub headers: serde_json::Value,
    #[diesel(sql_type = Bytea)]
    pub payload: Vec<u8>,
    #[diesel(sql_type = Timestamptz)]
    pub create_time: DateTime<Utc>,
}

/// Writes an event row in the caller's transaction, for the relays to publish, unless the same event is already
/// waiting there (asked twice before the relays took it: a double tap); wakes the relays when it commits.
pub async fn insert(conn: &mut Conn, row: &NewOutboxRow) -> Result<()> {
    prepared(
        diesel::sql_query(
            "INSERT INTO outbox (event_id, aggregate, subject, headers, payload) SELECT $1, $2, $3, $4, $5 \
             WHERE NOT EXISTS (SELECT 1 FROM outbox WHERE aggregate = $2 AND event_id = $1)",
        )
        .bind::<SqlUuid, _>(row.event_id)
        .bind::<Text, _>(&row.aggregate)
        .bind::<Text, _>(&row.subject)
        .bind::<Jsonb, _>(&row.headers)
        .bind::<Bytea, _>(&row.payload),
    )
    .execute(conn)
    .await?;
    wake_relays(conn).await
}

/// NOTIFYs the relays (delivered when the caller's transaction commits). Only for rows the writer will not publish
/// itself: a NOTIFY takes a lock at commit that serialises every notifying transaction of the database.
pub async fn wake_relays(conn: &mut Conn) -> Result<()> {
    prepared(diesel::sql_query("SELECT pg_notify($1, '')").bind::<Text, _>(NOTIFY_CHANNEL)).execute(conn).await?;
    Ok(())
}

/// A row [`insert_all`] wrote.
#[derive(Debug, Clone, QueryableByName)]
pub struct Written {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = SqlUuid)]
    pub event_id: Uuid,
    /// The writer publishes this row itself once its transaction commits, and the relays leave it alone for
    /// `sweep_after` (see [`claim_batch`]). True when the writer asked for it, no older row of its aggregate was in
    /// the outbox (not counting the `published` ones), and the same holds for every row before it in the call: a
    /// row published at once cannot overtake an earlier event of its aggregate. Writers of one aggregate hold its
    /// row lock (see the processors), so an earlier transaction's rows are committed and visible here until they
    /// are published and deleted.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub fast: bool,
}

/// Writes `rows` in one statement (in the caller's transaction), in their order, and says which the writer
/// publishes itself (`writer_publishes`; see [`Written::fast`]); `published` are rows already stored by JetStream,
/// not yet deleted. The same event may be written again while the first is still waiting (a replayed report): it
/// is behind the first, so the relays publish it after it, with the same `Nats-Msg-Id`, and JetStream drops it.
/// One fixed SQL text whatever the number of rows, so the statement is prepared once per connection.
pub async fn insert_all(
    conn: &mut Conn,
    rows: &[NewOutboxRow],
    published: &[i64],
    writer_publishes: bool,
) -> Result<Vec<Written>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let event_ids: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
    let aggregates: Vec<&str> = rows.iter().map(|r| r.aggregate.as_str()).collect();
    let subjects: Vec<&str> = rows.iter().map(|r| r.subject.as_str()).collect();
    let headers: Vec<&serde_json::Value> = rows.iter().map(|r| &r.headers).collect();
    let payloads: Vec<&[u8]> = rows.iter().map(|r| r.payload.as_slice()).collect();
    // The tests run on the statement's snapshot: committed rows and this transaction's earlier statements, not the
    // rows this statement inserts (those the writer publishes in id order anyway). `bool_and … OVER` carries a row
    // left to the relays to every row after it.
    Ok(prepared(
        diesel::sql_query(
            "INSERT INTO outbox (event_id, aggregate, subject, headers, payload, fast) \
             SELECT e, a, s, h, p, $7 AND bool_and(free) OVER (ORDER BY n) FROM ( \
                 SELECT e, a, s, h, p, n, \
                        NOT EXISTS (SELECT 1 FROM outbox o WHERE o.aggregate = u.a AND o.id <> ALL($6)) AS free \
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::bytea[]) \
                      WITH ORDINALITY AS u(e, a, s, h, p, n)) x \
             ORDER BY n \
             RETURNING id, event_id, fast",
        )
        .bind::<Array<SqlUuid>, _>(event_ids)
        .bind::<Array<Text>, _>(aggregates)
        .bind::<Array<Text>, _>(subjects)
        .bind::<Array<Jsonb>, _>(headers)
        .bind::<Array<Bytea>, _>(payloads)
        .bind::<Array<BigInt>, _>(published)
        .bind::<diesel::sql_types::Bool, _>(writer_publishes),
    )
    .load(conn)
    .await?)
}

/// Claims a batch for publishing; must run inside a transaction that then deletes what it published.
///
/// Several relays may claim at once without breaking per-aggregate order: a relay locks the *head* (oldest row) of
/// up to `aggregates` aggregates with `FOR UPDATE SKIP LOCKED` and takes rows only of aggregates whose head it holds.
/// Another relay skips a locked head, and the rows behind it are not heads, so no two relays ever publish rows of
/// the same aggregate at the same time. Rows come back in id order: for one aggregate, that is commit order,
/// because writers of one aggregate hold its row lock while they write (see the processors).
///
/// An aggregate whose head is parked ([`park`]) is skipped: its later rows wait behind the parked one.
///
/// A head its writer publishes itself ([`Written::fast`]) is left alone until it is older than `sweep_after`, and
/// with it the rest of its aggregate: relays sweep what writers missed, they do not race them. (Without this,
/// relays polling a busy outbox published about half of all rows a second time, for JetStream to drop.)
///
/// Cost grows with the batch, not the backlog: heads are looked for only among the oldest `rows` rows (walking the
/// primary key and probing `outbox_aggregate_id` for an older row of the same aggregate, stopping after `aggregates`
/// heads), and the batch's rows are read through the same index. Without that bound, a backlog of few aggregates
/// made the walk cover every row to find more heads: `EXPLAIN ANALYZE` at 20,000 rows of 64 aggregates, 42.7 ms,
/// now 2.2 ms; 2,000 rows of 64 aggregates 2.9 → 2.1 ms; 10,000 rows of 10,000 aggregates 1.2 ms either way. A head
/// beyond the oldest `rows` rows waits for a later claim, which only happens while older rows are being published.
pub async fn claim_batch(
    conn: &mut Conn,
    aggregates: i64,
    rows: i64,
    sweep_after: std::time::Duration,
) -> Result<Vec<OutboxRow>> {
    let sweep_after_ms = i64::try_from(sweep_after.as_millis()).unwrap_or(i64::MAX);
    Ok(prepared(
        diesel::sql_query(
            "WITH oldest AS (SELECT id FROM outbox ORDER BY id LIMIT $2), \
             mine AS ( \
             SELECT o.aggregate FROM outbox o JOIN oldest USING (id) \
             WHERE NOT EXISTS (SELECT 1 FROM outbox p WHERE p.aggregate = o.aggregate AND p.id < o.id) \
               AND o.parked_at IS NULL \
               AND (NOT o.fast OR o.create_time < clock_timestamp() - $3 * interval '1 millisecond') \
             ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED \
         ) \
         SELECT id, event_id, aggregate, subject, headers, payload, create_time FROM outbox \
         WHERE aggregate = ANY(ARRAY(SELECT aggregate FROM mine)) ORDER BY id LIMIT $2",
        )
        .bind::<BigInt, _>(aggregates)
        .bind::<BigInt, _>(rows)
        .bind::<BigInt, _>(sweep_after_ms),
    )
    .load(conn)
    .await?)
}

/// Deletes published rows (in the claiming transaction).
pub async fn delete(conn: &mut Conn, ids: &[i64]) -> Result<usize> {
    Ok(prepared(diesel::delete(ob::table.filter(ob::id.eq_any(ids)))).execute(conn).await?)
}

/// How far behind the relays are.
#[derive(Debug, Clone, Copy, PartialEq, QueryableByName)]
pub struct OutboxStats {
    /// Rows waiting, counted up to [`STATS_COUNT_LIMIT`].
    #[diesel(sql_type = BigInt)]
    pub depth: i64,
    /// Age of the oldest unpublished row, 0 when empty.
    #[diesel(sql_type = Double)]
    pub oldest_age_seconds: f64,
    /// Rows parked because NATS refused them for good ([`park`]).
    #[diesel(sql_type = BigInt)]
    pub parked: i64,
}

/// [`stats`] counts at most this many rows: enough to tell a backlog, and bounded work for a gauge.
pub const STATS_COUNT_LIMIT: i64 = 100_000;

/// Counts by walking the primary key from the oldest row (bounded by [`STATS_COUNT_LIMIT`]), which skips the
/// deleted rows' index entries once marked dead. `count(*)` over the table read every page of a busy outbox's
/// deleted rows until vacuum came: 38 ms a call at 1,000 payments/s, each relay once a second.
pub async fn stats(conn: &mut Conn) -> Result<OutboxStats> {
    Ok(prepared(
        diesel::sql_query(
            "SELECT count(*)::int8 AS depth, \
                    coalesce(extract(epoch FROM clock_timestamp() - min(create_time)), 0)::float8 AS oldest_age_seconds, \
                    (SELECT count(*) FROM outbox WHERE parked_at IS NOT NULL)::int8 AS parked \
             FROM (SELECT create_time FROM outbox ORDER BY id LIMIT $1) t",
        )
        .bind::<BigInt, _>(STATS_COUNT_LIMIT),
    )
    .get_result(conn)
    .await?)
}

/// Parks a row NATS refused for good (in the claiming transaction): relays skip its aggregate until it is retried.
pub async fn park(conn: &mut Conn, id: i64, reason: &str) -> Result<()> {
    prepared(
        diesel::update(ob::table.filter(ob::id.eq(id)))
            .set((ob::parked_at.eq(diesel::dsl::now), ob::parked_reason.eq(reason))),
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// A parked row, for people.
#[derive(Debug, Clone, Queryable)]
pub struct ParkedRow {
    pub id: i64,
    pub event_id: Uuid,
    pub aggregate: String,
    pub subject: String,
    pub payload_bytes: i32,
    pub create_time: DateTime<Utc>,
    pub parked_at: DateTime<Utc>,
    pub reason: String,
    /// Rows of the same aggregate waiting behind it.
    pub waiting_behind: i64,
}

/// Parked rows, oldest first.
pub async fn parked(conn: &mut Conn) -> Result<Vec<ParkedRow>> {
    use diesel::dsl::sql;
    use diesel::sql_types::Integer;
    Ok(ob::table
        .filter(ob::parked_at.is_not_null())
        .order(ob::id)
        .select((
            ob::id,
            ob::event_id,
            ob::aggregate,
            ob::subject,
            sql::<Integer>("octet_length(payload)"),
            ob::create_time,
            ob::parked_at.assume_not_null(),
            ob::parked_reason.assume_not_null(),
            sql::<BigInt>(
                "(SELECT count(*) FROM outbox b WHERE b.aggregate = outbox.aggregate AND b.id > outbox.id)::int8",
            ),
        ))
        .load::<(i64, Uuid, String, String, i32, DateTime<Utc>, DateTime<Utc>, String, i64)>(conn)
        .await?
        .into_iter()
        .map(|(id, event_id, aggregate, subject, payload_bytes, create_time, parked_at, reason, waiting_behind)| {
            ParkedRow {
                id,
                event_id,
                aggregate,
                subject,
                payload_bytes,
                create_time,
                parked_at,
                reason,
                waiting_behind,
            }
        })
        .collect())
}

/// Unparks `ids` (all parked rows when `None`) so that the relays try them again; returns how many.
pub async fn unpark(conn: &mut Conn, ids: Option<&[i64]>) -> Result<usize> {
    let parked = ob::table.filter(ob::parked_at.is_not_null());
    let clear = (ob::parked_at.eq(None::<DateTime<Utc>>), ob::parked_reason.eq(None::<String>));
    Ok(match ids {
        Some(ids) => diesel::update(parked.filter(ob::id.eq_any(ids))).set(clear).execute(conn).await?,
        None => diesel::update(parked).set(clear).execute(conn).await?,
    })
}
