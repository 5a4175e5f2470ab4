//! Access tokens (JWT HS256). Passwords are hashed in `crate::passwords`.

use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use secrecy::ExposeSecret as _;
use serde::{Deserialize, Serialize};
use storage::UserId;

use crate::AppState;
use crate::error::{ApiError, AuthProblem};

/// What an access token says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id as a string (RFC 7519).
    pub sub: String,
    /// The user id as a number, as looklook's front end reads it.
    #[serde(rename = "userId")]
    pub user_id: i64,
    pub iat: i64,
    pub exp: i64,
}

/// Signs and checks access tokens.
pub struct Tokens {
    encoding: EncodingKey,
    /// The current key first, then the previous ones still accepted during a rotation.
    decoding: Vec<DecodingKey>,
    validation: Validation,
    ttl: Duration,
}

/// `{accessToken, accessExpire, refreshAfter}` as looklook answers a login (unix seconds).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenAnswer {
    pub access_token: String,
    pub access_expire: i64,
    pub refresh_after: i64,
}

impl Tokens {
    /// Signs with `secret`; accepts tokens signed with `secret` or any of `previous` (a rotation: new tokens use
    /// the new key while the ones already handed out stay valid until they expire).
    pub fn new(secret: &secrecy::SecretString, previous: &[secrecy::SecretString], ttl: Duration) -> Self {
        let key = secret.expose_secret().as_bytes();
        let decoding = std::iter::once(key)
            .chain(previous.iter().map(|p| p.expose_secret().as_bytes()))
            .map(DecodingKey::from_secret)
            .collect();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // Clocks of one deployment agree closely; a long leeway would only stretch stolen tokens.
        validation.leeway = 5;
        Tokens { encoding: EncodingKey::from_secret(key), decoding, validation, ttl }
    }

    pub fn issue(&self, user: UserId, now: i64) -> Result<TokenAnswer, ApiError> {
        let exp = now + self.ttl.as_secs() as i64;
        let claims = Claims { sub: user.0.to_string(), user_id: user.0, iat: now, exp };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| ApiError::Internal(format!("cannot sign a token: {e}")))?;
        Ok(TokenAnswer { access_token: token, access_expire: exp, refresh_after: now + self.ttl.as_secs() as i64 / 2 })
    }

    pub fn check(&self, token: &str) -> Result<UserId, AuthProblem> {
        let mut result = Err(AuthProblem::Invalid);
        for key in &self.decoding {
            result = jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthProblem::Expired,
                _ => AuthProblem::Invalid,
            });
            // Only a wrong signature is worth trying the next key for.
            if !matches!(&result, Err(AuthProblem::Invalid)) {
                break;
            }
        }
        let data = result?;
        // Both claims must name the same user: a token is either ours, whole, or nothing.
        if data.claims.sub != data.claims.user_id.to_string() {
            return Err(AuthProblem::Invalid);
        }
        Ok(UserId(data.claims.user_id))
    }
}

/// The caller, from `Authorization: Bearer <token>`; 401 when missing, expired or forged.
#[derive(Debug, Clone, Copy)]
pub struct AuthUser(pub UserId);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let value = parts.headers.get(header::AUTHORIZATION).ok_or(ApiError::Unauthorized(AuthProblem::Missing))?;
        let value = value.to_str().map_err(|_| ApiError::Unauthorized(AuthProblem::Invalid))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::Unauthorized(AuthProblem::Missing))?;
        let user = state.tokens.check(token).map_err(ApiError::Unauthorized)?;
        Ok(AuthUser(user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_tampering() {
        let secret = secrecy::SecretString::from("0123456789abcdef0123456789abcdef".to_owned());
        let tokens = Tokens::new(&secret, &[], Duration::from_secs(3600));
        let now = chrono::Utc::now().timestamp();
        let t = tokens.issue(UserId(42), now).unwrap();
        assert_eq!(tokens.check(&t.access_token).unwrap(), UserId(42));
        assert_eq!(t.access_expire, now + 3600);
        let old = tokens.issue(UserId(42), now - 7200).unwrap();
        assert_eq!(tokens.check(&old.access_token).unwrap_err(), AuthProblem::Expired);
        let other = Tokens::new(&secrecy::SecretString::from("x".repeat(32)), &[], Duration::from_secs(3600));
        let forged = other.issue(UserId(42), now).unwrap();
        assert_eq!(tokens.check(&forged.access_token).unwrap_err(), AuthProblem::Invalid);
        assert_eq!(tokens.check("not.a.token").unwrap_err(), AuthProblem::Invalid);
    }

    #[test]
    fn a_rotated_key_keeps_the_tokens_it_signed_valid_until_it_is_dropped() {
        let (old, new) = (secrecy::SecretString::from("o".repeat(32)), secrecy::SecretString::from("n".repeat(32)));
        let now = chrono::Utc::now().timestamp();
        let before = Tokens::new(&old, &[], Duration::from_secs(3600)).issue(UserId(7), now).unwrap().access_token;
        let rotating = Tokens::new(&new, std::slice::from_ref(&old), Duration::from_secs(3600));
        assert_eq!(rotating.check(&before), Ok(UserId(7)), "issued before the rotation");
        let after = rotating.issue(UserId(8), now).unwrap().access_token;
        assert_eq!(rotating.check(&after), Ok(UserId(8)));
        let done = Tokens::new(&new, &[], Duration::from_secs(3600));
        assert_eq!(done.check(&before), Err(AuthProblem::Invalid), "the old key dropped");
        assert_eq!(done.check(&after), Ok(UserId(8)), "new tokens are signed with the new key");
        let expired =
            Tokens::new(&old, &[], Duration::from_secs(60)).issue(UserId(7), now - 7200).unwrap().access_token;
        assert_eq!(rotating.check(&expired), Err(AuthProblem::Expired));
    }
}
