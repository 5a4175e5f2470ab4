//! The `notification` table as the notifier uses it: one row per key, claimed before sending and marked with the
//! outcome after. This is what makes a replay a no-op (DESIGN.md §3.3, §7).
//!
//! A row's life: `claimed` (a worker owns it and may be sending) → `sent` | `refused_by_user` | `invalid` |
//! `suppressed` (final) or `retrying` (a transient failure; the message was nak'ed) → `claimed` again on the next
//! delivery → … → `failed` when the runner gives up (also final). `attempts` counts claims and fences the outcome
//! write: a worker only records the outcome of the claim it made.

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{Double, Integer, Nullable, Text};
use diesel_async::RunQueryDsl;
use storage::schema::notification as n;
use storage::{Conn, Result, UserId, prepared};

/// A notification's status, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Claimed,
    Sent,
    RefusedByUser,
    Invalid,
    Suppressed,
    Retrying,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Claimed => "claimed",
            Status::Sent => "sent",
            Status::RefusedByUser => "refused_by_user",
            Status::Invalid => "invalid",
            Status::Suppressed => "suppressed",
            Status::Retrying => "retrying",
            Status::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        [
            Status::Claimed,
            Status::Sent,
            Status::RefusedByUser,
            Status::Invalid,
            Status::Suppressed,
            Status::Retrying,
            Status::Failed,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// A final status is never sent again: a replay of its key is acknowledged as a duplicate.
    pub fn is_final(self) -> bool {
        !matches!(self, Status::Claimed | Status::Retrying)
    }
}

/// What a notification is, for its row.
#[derive(Debug, Clone)]
pub struct NewNotification<'a> {
    pub key: &'a str,
    pub channel: &'a str,
    pub template: &'a str,
    pub user_id: UserId,
    pub order_sn: &'a str,
}

/// The result of trying to claim a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This worker owns the key and may send; `attempt` fences the outcome write. `resumed` when an earlier
    /// attempt had claimed it (crashed, timed out, or failed transiently).
    Owned { attempt: i32, resumed: bool },
    /// The key already has a final status: do not send.
    Done(Status),
    /// Another worker claimed it less than a lease ago and may be sending right now.
    InFlight,
}

#[derive(QueryableByName)]
struct Attempt {
    #[diesel(sql_type = Integer)]
    attempts: i32,
}

/// Claims `new.key` for sending, in its own committed statement(s), before anything is sent.
///
/// A new key is inserted as `claimed`. An existing one is taken over when it is `retrying`, or `claimed` by a
/// worker that has not finished within `lease` (it crashed or was cancelled: the runner abandons a handler after
/// `consumer.handler_timeout`, which is what `lease` should be). Anything else is final or in flight.
pub async fn claim(conn: &mut Conn, new: &NewNotification<'_>, lease: Duration) -> Result<Claim> {
    let inserted: Option<i32> = prepared(
        diesel::insert_into(n::table)
            .values((
                n::key.eq(new.key),
                n::channel.eq(new.channel),
                n::template.eq(new.template),
                n::user_id.eq(new.user_id.0),
                n::order_sn.eq(new.order_sn),
                n::status.eq(Status::Claimed.as_str()),
                n::attempts.eq(1),
            ))
            .on_conflict(n::key)
            .do_nothing()
            .returning(n::attempts),
    )
    .get_result(conn)
    .await
    .optional()?;
    if let Some(attempt) = inserted {
        return Ok(Claim::Owned { attempt, resumed: false });
    }
    // The lease is measured on the database's clock, the same clock that stamped update_time.
    let taken: Option<Attempt> = prepared(
        diesel::sql_query(
            "UPDATE notification SET status = 'claimed', attempts = attempts + 1 \
         WHERE key = $1 AND (status = 'retrying' \
           OR (status = 'claimed' AND update_time < now() - make_interval(secs => $2))) \
         RETURNING attempts",
        )
        .bind::<Text, _>(new.key)
        .bind::<Double, _>(lease.as_secs_f64()),
    )
    .get_result(conn)
    .await
    .optional()?;
    if let Some(a) = taken {
        return Ok(Claim::Owned { attempt: a.attempts, resumed: true });
    }
    let status: Option<String> = n::table.filter(n::key.eq(new.key)).select(n::status).first(conn).await.optional()?;
    Ok(match status.as_deref().and_then(Status::parse) {
        Some(s) if s.is_final() => Claim::Done(s),
        // Claimed by a live worker, or changed between the statements above: come back later.
        _ => Claim::InFlight,
    })
}

#[derive(QueryableByName)]
struct Key {
    #[diesel(sql_type = Text)]
    key: String,
}

/// [`claim`] for the keys seen for the first time, in one statement: inserts every key of `news` that has no row
/// yet, as `claimed` by attempt 1, and returns those keys. Keys that already had a row are left alone: the caller
/// claims them one by one (they may be final, in flight, or due for a take-over).
pub async fn claim_new(conn: &mut Conn, news: &[NewNotification<'_>]) -> Result<std::collections::HashSet<String>> {
    use diesel::sql_types::{Array, BigInt};
    if news.is_empty() {
        return Ok(Default::default());
    }
    let users: Vec<i64> = news.iter().map(|n| n.user_id.0).collect();
    let inserted: Vec<Key> = prepared(
        diesel::sql_query(
            "INSERT INTO notification (key, channel, template, user_id, order_sn, status, attempts) \
             SELECT k, c, t, u, o, $6, 1 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[]) \
                  AS v(k, c, t, u, o) \
             ON CONFLICT (key) DO NOTHING RETURNING key",
        )
        .bind::<Array<Text>, _>(news.iter().map(|n| n.key).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(news.iter().map(|n| n.channel).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(news.iter().map(|n| n.template).collect::<Vec<_>>())
        .bind::<Array<BigInt>, _>(users)
        .bind::<Array<Text>, _>(news.iter().map(|n| n.order_sn).collect::<Vec<_>>())
        .bind::<Text, _>(Status::Claimed.as_str()),
    )
    .load(conn)
    .await?;
    Ok(inserted.into_iter().map(|k| k.key).collect())
}

/// [`record`] for many claims in one statement; returns the keys whose outcome was recorded (the others lost their
/// claim to a take-over).
pub async fn record_many(
    conn: &mut Conn,
    outcomes: &[(&str, i32, Record<'_>)],
) -> Result<std::collections::HashSet<String>> {
    use diesel::sql_types::Array;
    if outcomes.is_empty() {
        return Ok(Default::default());
    }
    let keys: Vec<&str> = outcomes.iter().map(|o| o.0).collect();
    let attempts: Vec<i32> = outcomes.iter().map(|o| o.1).collect();
    let statuses: Vec<&str> = outcomes.iter().map(|o| o.2.status.as_str()).collect();
    let msg_ids: Vec<Option<&str>> = outcomes.iter().map(|o| o.2.provider_msg_id).collect();
    let reasons: Vec<Option<String>> =
        outcomes.iter().map(|o| o.2.reason.map(|r| r.chars().take(1000).collect())).collect();
    let recorded: Vec<Key> = prepared(
        diesel::sql_query(
            "UPDATE notification n SET status = v.s, provider_msg_id = COALESCE(v.m, n.provider_msg_id), \
                 last_error = v.r, sent_time = CASE WHEN v.s = $6 THEN now() ELSE n.sent_time END \
             FROM unnest($1::text[], $2::int4[], $3::text[], $4::text[], $5::text[]) AS v(k, a, s, m, r) \
             WHERE n.key = v.k AND n.status = $7 AND n.attempts = v.a RETURNING n.key",
        )
        .bind::<Array<Text>, _>(keys)
        .bind::<Array<Integer>, _>(attempts)
        .bind::<Array<Text>, _>(statuses)
        .bind::<Array<Nullable<Text>>, _>(msg_ids)
        .bind::<Array<Nullable<Text>>, _>(reasons)
        .bind::<Text, _>(Status::Sent.as_str())
        .bind::<Text, _>(Status::Claimed.as_str()),
    )
    .load(conn)
    .await?;
    Ok(recorded.into_iter().map(|k| k.key).collect())
}

/// An outcome to record for a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub status: Status,
    pub provider_msg_id: Option<&'a str>,
    /// Why it was not sent (never an openid, phone number or token).
    pub reason: Option<&'a str>,
}

/// Records the outcome of the claim `attempt` made. Returns `false` when the claim was lost (another worker took
/// the key over after the lease ran out); the caller's outcome is then not recorded.
pub async fn record(conn: &mut Conn, key: &str, attempt: i32, outcome: &Record<'_>) -> Result<bool> {
    let reason = outcome.reason.map(|r| r.chars().take(1000).collect::<String>());
    let n = prepared(
        diesel::sql_query(
            "UPDATE notification SET status = $3, provider_msg_id = COALESCE($4, provider_msg_id), last_error = $5, \
           sent_time = CASE WHEN $3 = 'sent' THEN now() ELSE sent_time END \
         WHERE key = $1 AND status = 'claimed' AND attempts = $2",
        )
        .bind::<Text, _>(key)
        .bind::<Integer, _>(attempt)
        .bind::<Text, _>(outcome.status.as_str())
        .bind::<Nullable<Text>, _>(outcome.provider_msg_id)
        .bind::<Nullable<Text>, _>(reason),
    )
    .execute(conn)
    .await?;
    Ok(n == 1)
}

/// Makes a `failed` notification sendable again (status `retrying`), for an operator who redrives its message
/// from the dead-letter queue after an outage: `failed` is final, so without this the redriven message would be
/// acknowledged as a duplicate. Returns whether a row changed.
pub async fn reopen_failed(conn: &mut Conn, key: &str) -> Result<bool> {
    let n = diesel::update(n::table.filter(n::key.eq(key)).filter(n::status.eq(Status::Failed.as_str())))
        .set(n::status.eq(Status::Retrying.as_str()))
        .execute(conn)
        .await?;
    Ok(n == 1)
}

/// One notification row, as operators and tests read it.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = n, check_for_backend(diesel::pg::Pg))]
pub struct NotificationRow {
    pub id: i64,
    pub create_time: chrono::DateTime<chrono::Utc>,
    pub update_time: chrono::DateTime<chrono::Utc>,
    pub key: String,
    pub channel: String,
    pub template: String,
    pub user_id: i64,
    pub order_sn: Option<String>,
    pub status: String,
    pub attempts: i32,
    pub provider_msg_id: Option<String>,
    pub last_error: Option<String>,
    pub sent_time: Option<chrono::DateTime<chrono::Utc>>,
}

/// The row of `key`, if any.
pub async fn find(conn: &mut Conn, key: &str) -> Result<Option<NotificationRow>> {
    Ok(n::table.filter(n::key.eq(key)).select(NotificationRow::as_select()).first(conn).await.optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_and_only_claimed_and_retrying_are_open() {
        for s in [
            Status::Claimed,
            Status::Sent,
            Status::RefusedByUser,
            Status::Invalid,
            Status::Suppressed,
            Status::Retrying,
            Status::Failed,
        ] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert_eq!(s.is_final(), !matches!(s, Status::Claimed | Status::Retrying), "{s:?}");
        }
        assert_eq!(Status::parse("delivered"), None);
    }
}
