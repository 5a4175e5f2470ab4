//! `user` and `user_auth`: accounts and how they log in.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use crate::db::{Conn, Result};
use crate::domain::{AuthType, UserId};
use crate::prepared::prepared;
use crate::schema::{user_auth as a, users as u};

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = u, check_for_backend(diesel::pg::Pg))]
pub struct UserRow {
    pub id: i64,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
    pub mobile: Option<String>,
    pub password_hash: Option<String>,
    pub nickname: String,
    pub sex: i16,
    pub avatar: String,
    pub info: String,
}

impl UserRow {
    pub fn id(&self) -> UserId {
        UserId(self.id)
    }
}

#[derive(Debug, Clone, Default, Insertable)]
#[diesel(table_name = u)]
pub struct NewUser {
    pub mobile: Option<String>,
    pub password_hash: Option<String>,
    pub nickname: String,
    /// URL of the user's avatar (from WeChat's user info on the first mini-program login), or empty.
    pub avatar: String,
}

/// Creates a user together with its first way of logging in, in the caller's transaction. A second user for the
/// same (auth_type, auth_key) fails with the `user_auth_type_key_unique` conflict.
pub async fn insert_with_auth(conn: &mut Conn, new: &NewUser, auth: AuthType, auth_key: &str) -> Result<UserRow> {
    let user: UserRow =
        diesel::insert_into(u::table).values(new).returning(UserRow::as_returning()).get_result(conn).await?;
    add_auth(conn, user.id(), auth, auth_key).await?;
    Ok(user)
}

/// Adds a login method to an existing user; a user has at most one of each type.
pub async fn add_auth(conn: &mut Conn, user: UserId, auth: AuthType, auth_key: &str) -> Result<()> {
    diesel::insert_into(a::table)
        .values((a::user_id.eq(user.0), a::auth_type.eq(auth.as_str()), a::auth_key.eq(auth_key)))
        .execute(conn)
        .await?;
    Ok(())
}

/// The user who logs in with this (type, key).
pub async fn find_by_auth(conn: &mut Conn, auth: AuthType, auth_key: &str) -> Result<Option<UserRow>> {
    Ok(u::table
        .inner_join(a::table)
        .filter(a::auth_type.eq(auth.as_str()))
        .filter(a::auth_key.eq(auth_key))
        .select(UserRow::as_select())
        .first(conn)
        .await
        .optional()?)
}

pub async fn find(conn: &mut Conn, id: UserId) -> Result<Option<UserRow>> {
    Ok(u::table.find(id.0).select(UserRow::as_select()).first(conn).await.optional()?)
}

/// Which of `ids` have a mobile number (an SMS can reach them).
pub async fn with_mobile(conn: &mut Conn, ids: &[UserId]) -> Result<std::collections::HashSet<UserId>> {
    if ids.is_empty() {
        return Ok(Default::default());
    }
    let ids: Vec<i64> = ids.iter().map(|i| i.0).collect();
    let found: Vec<i64> =
        prepared(u::table.filter(u::id.eq_any(ids)).filter(u::mobile.is_not_null()).select(u::id)).load(conn).await?;
    Ok(found.into_iter().map(UserId).collect())
}

/// [`auth_key`] for many users in one statement: `(user, key)` for those who have that login method.
pub async fn auth_keys(conn: &mut Conn, ids: &[UserId], auth: AuthType) -> Result<Vec<(UserId, String)>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = ids.iter().map(|i| i.0).collect();
    let found: Vec<(i64, String)> = prepared(
        a::table
            .filter(a::user_id.eq_any(ids))
            .filter(a::auth_type.eq(auth.as_str()))
            .select((a::user_id, a::auth_key)),
    )
    .load(conn)
    .await?;
    Ok(found.into_iter().map(|(id, key)| (UserId(id), key)).collect())
}

/// The key of one of the user's login methods (the openid for `wxMini`).
pub async fn auth_key(conn: &mut Conn, id: UserId, auth: AuthType) -> Result<Option<String>> {
    Ok(a::table
        .filter(a::user_id.eq(id.0))
        .filter(a::auth_type.eq(auth.as_str()))
        .select(a::auth_key)
        .first(conn)
        .await
        .optional()?)
}
