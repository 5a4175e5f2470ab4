//! `/usercenter/v1/user/*`: register, log in with a password or with WeChat, read one's own details.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use storage::{AsyncConnection as _, AuthType, StorageError, users};

use crate::auth::{AuthUser, TokenAnswer};
use crate::error::{ApiError, ApiJson, ApiResult, AuthProblem, Data, conflict};
use crate::limits::{Action, Who};
use crate::{AppState, ClientIp, routes::unix_now};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    mobile: String,
    password: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WxMiniAuthReq {
    code: String,
    /// looklook's front end sends the user's info as WeChat's client gives it (`wx.getUserInfo`): both or neither.
    #[serde(default)]
    iv: Option<String>,
    #[serde(default, rename = "encryptedData")]
    encrypted_data: Option<String>,
}

/// The database's rule for mobile numbers, checked first so the client gets a message rather than a 500.
fn check_mobile(mobile: &str) -> Result<(), ApiError> {
    let digits = mobile.strip_prefix('+').unwrap_or(mobile);
    if (5..=20).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(ApiError::invalid("mobile must be 5 to 20 digits, optionally starting with +"))
    }
}

/// Registration says when a mobile number is taken (409), as looklook's does: a user who registered before needs
/// to be told to log in. That tells a stranger who is registered, one guess at a time; the per-address limit makes
/// it slow, and hiding it would need the number proven first (an SMS code), which this API does not have.
pub async fn register(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<Credentials>,
) -> ApiResult<TokenAnswer> {
    state.limits.check(Action::Register, ip, None)?;
    check_mobile(&req.mobile)?;
    let len = req.password.chars().count();
    if !(8..=128).contains(&len) {
        return Err(ApiError::invalid("password must be 8 to 128 characters"));
    }
    let hash = state.passwords.hash(req.password).await?;
    let mut conn = state.conn().await?;
    let new = users::NewUser { mobile: Some(req.mobile.clone()), password_hash: Some(hash), ..Default::default() };
    let mobile = req.mobile.clone();
    let created = conn.transaction(async |c| users::insert_with_auth(c, &new, AuthType::System, &mobile).await).await;
    let user = match created {
        Ok(u) => u,
        Err(e) if e.conflict().is_some() => {
            return Err(ApiError::conflict(conflict::MOBILE_TAKEN, "this mobile number is already registered: log in"));
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(user_id = user.id, "user registered");
    Ok(Data(state.tokens.issue(user.id(), unix_now())?))
}

/// Attempts are limited per client address, per mobile number from one address (so a stranger elsewhere cannot
/// lock its owner out), and per mobile number across all addresses (`login_per_mobile_per_hour`, so many addresses
/// together cannot guess one password either; they can slow its owner down for the rest of that hour).
pub async fn login(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<Credentials>,
) -> ApiResult<TokenAnswer> {
    // A malformed mobile cannot be anyone's: refused before it costs a hash or becomes a limiter key.
    check_mobile(&req.mobile)?;
    if req.password.chars().count() > 128 {
        return Err(ApiError::invalid("password must be at most 128 characters"));
    }
    state.limits.check(Action::Login, ip, Some(Who::Mobile(req.mobile.clone())))?;
    let user = {
        let mut conn = state.conn().await?;
        users::find_by_auth(&mut conn, AuthType::System, &req.mobile).await?
    };
    let hash = user.as_ref().and_then(|u| u.password_hash.clone());
    // Unknown mobiles are checked against a dummy hash: the answer takes as long either way.
    let ok = state.passwords.verify(req.password, hash).await?;
    match user {
        Some(u) if ok => Ok(Data(state.tokens.issue(u.id(), unix_now())?)),
        _ => Err(ApiError::Unauthorized(AuthProblem::WrongCredentials)),
    }
}

/// `wx.login` code → jscode2session → openid; the first login creates the user.
pub async fn wx_mini_auth(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<WxMiniAuthReq>,
) -> ApiResult<TokenAnswer> {
    // Each login costs a jscode2session call on the mini-program's WeChat quota.
    state.limits.check(Action::WxMiniAuth, ip, None)?;
    if req.code.trim().is_empty() || req.code.len() > 128 {
        return Err(ApiError::invalid("code must be the 1 to 128 character code from wx.login"));
    }
    let sealed = match (req.encrypted_data.as_deref(), req.iv.as_deref()) {
        (None | Some(""), None | Some("")) => None,
        (Some(data), Some(iv)) if data.len() <= 8192 && iv.len() <= 64 => Some((data, iv)),
        (Some(_), Some(_)) => return Err(ApiError::invalid("encryptedData must be at most 8192 and iv 64 characters")),
        _ => return Err(ApiError::invalid("encryptedData and iv come together (from wx.getUserInfo), or not at all")),
    };
    let session = state.deps.mini.jscode2session(&req.code).await.map_err(mini_error)?;
    // The user's info, when sent, must open with this login's session key and be issued for our mini-program.
    let info = sealed
        .map(|(data, iv)| wechat::decrypt_user_info(&session.session_key, data, iv, state.deps.mini.appid()))
        .transpose()
        .map_err(|e| ApiError::invalid(format!("encryptedData refused: {e}")))?;
    let openid = session.openid.expose().to_owned();
    let mut conn = state.conn().await?;
    let user = match users::find_by_auth(&mut conn, AuthType::WxMini, &openid).await? {
        Some(u) => u,
        None => {
            // Nickname and avatar from WeChat on the first login, as looklook does; later logins leave them.
            let new = match &info {
                Some(i) => users::NewUser {
                    nickname: i.nick_name.chars().take(64).collect(),
                    avatar: i.avatar_url.chars().take(512).collect(),
                    ..Default::default()
                },
                None => users::NewUser::default(),
            };
            let created =
                conn.transaction(async |c| users::insert_with_auth(c, &new, AuthType::WxMini, &openid).await).await;
            match created {
                Ok(u) => {
                    tracing::info!(user_id = u.id, openid = %observability::Masked(&openid), "user created on first WeChat login");
                    u
                }
                // Two first logins raced: the other one created the user, which is the one we want.
                Err(StorageError::Conflict { constraint }) if constraint == "user_auth_type_key_unique" => {
                    users::find_by_auth(&mut conn, AuthType::WxMini, &openid)
                        .await?
                        .ok_or_else(|| ApiError::Internal("user vanished after a login race".into()))?
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    Ok(Data(state.tokens.issue(user.id(), unix_now())?))
}

fn mini_error(e: wechat::MiniError) -> ApiError {
    use wechat::{Errcode, MiniError};
    match &e {
        // 40163: the code was already used.
        MiniError::Api { code: Errcode::InvalidCode | Errcode::Other(40163), .. } => {
            ApiError::Unauthorized(AuthProblem::BadLoginCode)
        }
        MiniError::Api { code: Errcode::Blocked, .. } => {
            ApiError::Forbidden("WeChat blocked this account from logging in (40226)".into())
        }
        MiniError::Invalid(_) => ApiError::invalid("code must be the code from wx.login"),
        _ if e.is_retryable() => {
            ApiError::Upstream { msg: "WeChat login is unavailable, try again", detail: e.to_string(), retryable: true }
        }
        _ => ApiError::Upstream { msg: "WeChat refused the login", detail: e.to_string(), retryable: false },
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserInfo {
    id: i64,
    mobile: String,
    nickname: String,
    sex: i16,
    avatar: String,
    info: String,
    /// Whether the user can pay with WeChat (has logged in through the mini-program).
    wx_mini_bound: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DetailResp {
    user_info: UserInfo,
}

/// The caller's own details (shown unmasked to their owner; never logged).
pub async fn detail(State(state): State<AppState>, AuthUser(user): AuthUser) -> ApiResult<DetailResp> {
    let mut conn = state.conn().await?;
    let row = users::find(&mut conn, user).await?.ok_or(ApiError::NotFound("user"))?;
    let bound = users::auth_key(&mut conn, user, AuthType::WxMini).await?.is_some();
    Ok(Data(DetailResp {
        user_info: UserInfo {
            id: row.id,
            mobile: row.mobile.unwrap_or_default(),
            nickname: row.nickname,
            sex: row.sex,
            avatar: row.avatar,
            info: row.info,
            wx_mini_bound: bound,
        },
    }))
}
