//! The mini-program channel: subscribe messages through the shared `MiniProgramClient`.

use std::time::Instant;

use bus::events::{MiniprogramNotify, NotificationRequest};
use std::collections::HashMap;

use storage::{AuthType, StorageError, UserId, users};
use wechat::{Errcode, ErrorClass, MiniError, MiniProgramClient, OpenId, SubscribeMessage};

use crate::config::state_name;
use crate::flow::{Channel, Outcome, Shared, storage_outcome};
use crate::{metrics, render};

pub(crate) struct Miniprogram {
    /// Clones share one access-token cache: every task of the process uses the same token, and a token error
    /// makes the client refresh it once and retry the message.
    pub client: MiniProgramClient,
    /// Openids by user, as looked up (a batch looks up all its users at once). A user's mini-program login never
    /// changes once made, so an entry never goes stale; the map is emptied when it grows past `OPENIDS_KEPT`.
    pub openids: std::sync::Mutex<HashMap<UserId, String>>,
}

const OPENIDS_KEPT: usize = 100_000;

impl Miniprogram {
    pub fn new(client: MiniProgramClient) -> Self {
        Miniprogram { client, openids: Default::default() }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, String>> {
        self.openids.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, found: impl IntoIterator<Item = (UserId, String)>) {
        let mut known = self.known();
        if known.len() > OPENIDS_KEPT {
            known.clear();
        }
        known.extend(found);
    }
}

impl Channel for Miniprogram {
    const NAME: &'static str = "miniprogram";
    type Event = MiniprogramNotify;

    fn request(event: &MiniprogramNotify) -> &NotificationRequest {
        &event.0
    }

    async fn prefetch(&self, shared: &Shared, users: &[UserId]) {
        let missing: Vec<UserId> = {
            let known = self.known();
            let mut m: Vec<UserId> = users.iter().copied().filter(|u| !known.contains_key(u)).collect();
            m.sort_by_key(|u| u.0);
            m.dedup();
            m
        };
        if missing.is_empty() {
            return;
        }
        let lookup = async {
            let mut conn = shared.pool.get().await.map_err(StorageError::from)?;
            users::auth_keys(&mut conn, &missing, AuthType::WxMini).await
        };
        // A failed look-up only means each send looks its user up itself.
        if let Ok(found) = lookup.await {
            self.remember(found);
        }
    }

    async fn attempt(&self, shared: &Shared, req: &NotificationRequest) -> Outcome {
        let name = req.template.as_str();
        let Some(template) = shared.config.templates.get(req.template) else {
            return Outcome::Suppressed(format!("notifier.templates.{name} is not configured"));
        };
        let Some(template_id) = &template.template_id else {
            return Outcome::Suppressed(format!("notifier.templates.{name} has no template_id (SMS only)"));
        };
        let cached = self.known().get(&req.user_id).cloned();
        let openid = match cached {
            Some(o) => o,
            None => {
                let lookup = async {
                    let mut conn = shared.pool.get().await.map_err(StorageError::from)?;
                    users::auth_key(&mut conn, req.user_id, AuthType::WxMini).await
                };
                match lookup.await {
                    Ok(Some(o)) => {
                        self.remember([(req.user_id, o.clone())]);
                        o
                    }
                    Ok(None) => return Outcome::Suppressed("the user has no mini-program login (no openid)".into()),
                    Err(e) => return storage_outcome(e),
                }
            }
        };
        let Ok(openid) = OpenId::new(openid) else {
            return Outcome::Invalid("the user's stored openid is malformed".into());
        };
        if !shared.config.allows(openid.expose()) {
            return Outcome::Suppressed(format!(
                "openid not on notifier.allow_openids (miniprogram_state is {})",
                state_name(shared.config.miniprogram_state)
            ));
        }
        let data = match render::subscribe_data(&template.fields, &req.params, shared.config.time_zone.0) {
            Ok(d) => d,
            Err(e) => return Outcome::Invalid(e.to_string()),
        };
        let message = SubscribeMessage {
            touser: openid,
            template_id: template_id.clone(),
            page: template.page.as_deref().map(|p| render::page(p, &req.params)),
            data,
            miniprogram_state: shared.config.miniprogram_state,
            lang: shared.config.lang,
        };
        let started = Instant::now();
        let result = self.client.send_subscribe_message(&message).await;
        metrics::send_seconds(Self::NAME, started.elapsed().as_secs_f64());
        classify(result)
    }
}

/// WeChat's answer as an outcome. The client has already refreshed the token and retried once on 40001/42001.
pub(crate) fn classify(result: Result<Option<i64>, MiniError>) -> Outcome {
    let e = match result {
        Ok(msgid) => return Outcome::Sent { provider_msg_id: msgid.map(|m| m.to_string()) },
        Err(e) => e,
    };
    let reason = e.to_string();
    match &e {
        MiniError::Api { code: Errcode::UserRefused, .. } => Outcome::RefusedByUser(reason),
        MiniError::Api {
            code:
                Errcode::InvalidOpenId
                | Errcode::InvalidData
                | Errcode::InvalidTemplate
                | Errcode::InvalidPage
                | Errcode::Blocked,
            ..
        } => Outcome::Invalid(reason),
        // -1, quota and rate limits, and a token that failed again right after its refresh.
        MiniError::Api { code, .. } if matches!(code.class(), ErrorClass::Retryable | ErrorClass::Token) => {
            Outcome::Transient(reason)
        }
        MiniError::Api { .. } => Outcome::Broken(reason),
        // Network errors include non-2xx answers (WeChat's 5xx). An undecodable answer leaves us not knowing
        // whether WeChat sent it; retrying risks a second message, dropping risks none at all, and the user
        // asked to be told.
        MiniError::Network(_) | MiniError::Timeout | MiniError::Decode(_) => Outcome::Transient(reason),
        MiniError::Invalid(_) => Outcome::Invalid(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: i64) -> Result<Option<i64>, MiniError> {
        Err(MiniError::Api { code: Errcode::from_code(code), errmsg: "x".into() })
    }

    #[test]
    fn errcodes_map_to_outcomes() {
        assert_eq!(classify(Ok(Some(7))), Outcome::Sent { provider_msg_id: Some("7".into()) });
        assert!(matches!(classify(api(43101)), Outcome::RefusedByUser(_)));
        for code in [40003, 47003, 40037, 41030] {
            assert!(matches!(classify(api(code)), Outcome::Invalid(_)), "{code}");
        }
        for code in [-1, 45009, 45011, 40001, 42001] {
            assert!(matches!(classify(api(code)), Outcome::Transient(_)), "{code}");
        }
        assert!(matches!(classify(api(40013)), Outcome::Broken(_)));
        assert!(matches!(classify(Err(MiniError::Timeout)), Outcome::Transient(_)));
        assert!(matches!(classify(Err(MiniError::Network("HTTP 502".into()))), Outcome::Transient(_)));
    }
}
