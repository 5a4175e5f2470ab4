//! Callbacks: encrypted, signed notifications POSTed to `notify_url`, retried on WeChat's
//! schedule divided by the time scale. One tokio task per notification; the server never
//! waits for a receiver.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Value, json};
use wechat::{nonce_str, response_message};

use crate::server::{Shared, lock};
use crate::util::{self, now_wechat_time, unix_now};

/// One notification, built once: every retry and every duplicate carries the same id and body
/// (as WeChat's do); only the signature headers are fresh per attempt.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub id: String,
    pub url: String,
    pub event_type: &'static str,
    pub out_trade_no: String,
    pub out_refund_no: Option<String>,
    pub body: Vec<u8>,
}

impl Delivery {
    /// Encrypts `plaintext` under the APIv3 key and wraps it in WeChat's notification body.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        shared: &Shared,
        url: String,
        event_type: &'static str,
        summary: &str,
        original_type: &str,
        plaintext: &Value,
        out_trade_no: &str,
        out_refund_no: Option<&str>,
    ) -> Arc<Self> {
        let (id, body) = notification_body(&shared.apiv3_key, event_type, summary, original_type, plaintext);
        Arc::new(Self {
            id,
            url,
            event_type,
            out_trade_no: out_trade_no.to_owned(),
            out_refund_no: out_refund_no.map(str::to_owned),
            body,
        })
    }
}

/// WeChat's notification around `plaintext`, encrypted under `apiv3_key`: (notification id, body).
fn notification_body(
    apiv3_key: &[u8; 32],
    event_type: &str,
    summary: &str,
    original_type: &str,
    plaintext: &Value,
) -> (String, Vec<u8>) {
    let nonce = util::resource_nonce();
    let plain = serde_json::to_vec(plaintext).expect("JSON values serialize");
    let ciphertext = wechat::encrypt_resource(apiv3_key, &nonce, original_type, &plain)
        .expect("a 12-byte nonce and a 32-byte key always encrypt");
    let id = uuid::Uuid::new_v4().to_string();
    let body = json!({
        "id": id,
        "create_time": now_wechat_time(),
        "resource_type": "encrypt-resource",
        "event_type": event_type,
        "summary": summary,
        "resource": {
            "original_type": original_type,
            "algorithm": "AEAD_AES_256_GCM",
            "ciphertext": ciphertext,
            "associated_data": original_type,
            "nonce": nonce,
        },
    });
    (id, serde_json::to_vec(&body).expect("JSON values serialize"))
}

/// The headers of one delivery attempt, as WeChat sends them.
fn attempt_headers(ts: i64, nonce: String, signature: String, serial: String) -> Vec<(&'static str, String)> {
    vec![
        ("Content-Type", "application/json".to_owned()),
        ("Wechatpay-Timestamp", ts.to_string()),
        ("Wechatpay-Nonce", nonce),
        ("Wechatpay-Signature", signature),
        ("Wechatpay-Serial", serial),
        ("Wechatpay-Signature-Type", wechat::AUTH_SCHEME.to_owned()),
        ("Request-ID", util::request_id()),
    ]
}

/// WeChat's side of payment callbacks without a running sandbox: for a load generator that prepares
/// notifications before a timed window and sends them itself (`paystream bench e2e`). Bodies and headers come from
/// the code the sandbox sends its own callbacks with, signed under the identity's public-key id (the default
/// [`crate::SigningMode`]).
pub struct CallbackSigner {
    platform: wechat::RsaSigner,
    apiv3_key: [u8; 32],
    serial: String,
    appid: String,
    mchid: String,
}

impl CallbackSigner {
    pub fn new(identity: &crate::Identity) -> Result<Self, crate::IdentityError> {
        Ok(Self {
            platform: identity.platform_signer()?,
            apiv3_key: identity.apiv3_key_bytes(),
            serial: identity.platform_public_key_id.clone(),
            appid: identity.appid.clone(),
            mchid: identity.mchid.clone(),
        })
    }

    /// The body of the `TRANSACTION.SUCCESS` notification the sandbox sends when the user pays `out_trade_no`
    /// (a JSAPI payment of `total` fen, CNY, by `openid`): paid now, with a fresh 28-digit transaction id.
    pub fn transaction_success(&self, out_trade_no: &str, total: i64, openid: &str) -> Vec<u8> {
        let plain = crate::pay::paid_transaction_json(&self.appid, &self.mchid, out_trade_no, total, openid);
        notification_body(&self.apiv3_key, "TRANSACTION.SUCCESS", "支付成功", "transaction", &plain).1
    }

    /// The headers of one delivery of `body`, signed now with the platform key (receivers accept the timestamp
    /// for 5 minutes). One RSA-2048 signature each.
    pub fn headers(&self, body: &[u8]) -> Vec<(&'static str, String)> {
        let ts = unix_now();
        let nonce = nonce_str();
        let signature = self.platform.sign(&response_message(ts, &nonce, body));
        attempt_headers(ts, nonce, signature, self.serial.clone())
    }
}

/// Why a notification is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    /// The real thing, retried until acknowledged or the schedule runs out.
    Delivery,
    /// A fault: the same notification once more.
    Duplicate,
    /// A fault: a `WECHATPAY/SIGNTEST/` probe that the receiver must refuse; sent once.
    Signtest,
}

/// One delivery attempt, as `GET /sandbox/v1/callbacks` lists it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CallbackRecord {
    /// The notification id (the same for every attempt of one notification).
    pub id: String,
    pub url: String,
    pub event_type: String,
    pub out_trade_no: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_refund_no: Option<String>,
    /// `delivery`, `duplicate` or `signtest`.
    pub kind: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// HTTP status answered, if any.
    pub status: Option<u16>,
    /// Transport error or timeout, or `dropped by fault`.
    pub error: Option<String>,
    /// 200 or 204 answered.
    pub acknowledged: bool,
    /// RFC 3339 time of the attempt.
    pub at: String,
}

fn record(shared: &Shared, d: &Delivery, kind: Kind, attempt: u32, status: Option<u16>, error: Option<String>) {
    let acknowledged = matches!(status, Some(200 | 204));
    let kind = match kind {
        Kind::Delivery => "delivery",
        Kind::Duplicate => "duplicate",
        Kind::Signtest => "signtest",
    };
    lock(&shared.callbacks).push(CallbackRecord {
        id: d.id.clone(),
        url: d.url.clone(),
        event_type: d.event_type.to_owned(),
        out_trade_no: d.out_trade_no.clone(),
        out_refund_no: d.out_refund_no.clone(),
        kind: kind.to_owned(),
        attempt,
        status,
        error,
        acknowledged,
        at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
}

/// Sends `d` on a task of its own: the first attempt now, then retries on the scaled
/// schedule until a 200/204 or the schedule runs out (Delivery only).
pub(crate) fn deliver(shared: Arc<Shared>, d: Arc<Delivery>, kind: Kind) {
    let cancel = shared.background.clone();
    tokio::spawn(async move {
        if !shared.options.allow_remote_callbacks && !is_loopback_url(&d.url) {
            record(&shared, &d, kind, 1, None, Some(NOT_LOOPBACK.into()));
            return;
        }
        let attempts = if kind == Kind::Delivery { shared.options.retry_schedule.len() + 1 } else { 1 };
        for attempt in 1..=attempts {
            if lock(&shared.faults).dropped.contains(&d.out_trade_no) {
                record(&shared, &d, kind, attempt as u32, None, Some("dropped by fault".into()));
                return;
            }
            let (status, error) = tokio::select! {
                r = send_once(&shared, &d, kind) => r,
                () = cancel.cancelled() => return,
            };
            let acknowledged = matches!(status, Some(200 | 204));
            record(&shared, &d, kind, attempt as u32, status, error);
            if acknowledged || attempt == attempts {
                return;
            }
            let wait = shared.options.scaled(shared.options.retry_schedule[attempt - 1]);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cancel.cancelled() => return,
            }
        }
    });
}

/// Recorded instead of sending to a host off this machine.
pub(crate) const NOT_LOOPBACK: &str =
    "not sent: notify_url is not on loopback (see SandboxOptions::allow_remote_callbacks)";

fn is_loopback_url(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else { return false };
    let host = u.host_str().unwrap_or("").trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

async fn send_once(shared: &Shared, d: &Delivery, kind: Kind) -> (Option<u16>, Option<String>) {
    let ts = unix_now();
    let nonce = nonce_str();
    let signature = if kind == Kind::Signtest {
        // WeChat's probe: a signature that can never verify, to check that the merchant
        // really verifies (and does not crash on it).
        format!("{}{}", wechat::PROBE_PREFIX, util::random_string(util::ALNUM, 32))
    } else {
        shared.platform.sign(&response_message(ts, &nonce, &d.body))
    };
    let serial = match shared.options.signing {
        crate::SigningMode::PublicKey => shared.identity.platform_public_key_id.clone(),
        crate::SigningMode::Certificate => shared.certificate.serial_no.clone(),
    };
    let mut request = shared.http.post(&d.url);
    for (name, value) in attempt_headers(ts, nonce, signature, serial) {
        request = request.header(name, value);
    }
    let result = request.body(d.body.clone()).send().await;
    match result {
        Ok(resp) => (Some(resp.status().as_u16()), None),
        Err(e) if e.is_timeout() => (None, Some("timeout".into())),
        Err(e) => (None, Some(format!("transport: {e}"))),
    }
}

/// After the scaled refund delay, marks the refund SUCCESS and notifies its notify_url.
pub(crate) fn complete_refund_later(shared: Arc<Shared>, out_refund_no: String) {
    let cancel = shared.background.clone();
    tokio::spawn(async move {
        let wait = shared.options.scaled(shared.options.refund_delay);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => return,
        }
        let mut state = lock(&shared.pay);
        let Some(r) = state.refunds.get_mut(&out_refund_no) else { return };
        r.status = crate::pay::RefundStatus::Success;
        r.success_time = Some(now_wechat_time());
        let plain = crate::pay::refund_notice_json(r, &shared.identity.mchid);
        let url = r.notify_url.clone();
        let out_trade_no = r.out_trade_no.clone();
        drop(state);
        // Without a notify_url in the request, WeChat would use the one configured in the
        // merchant platform: the sandbox uses the order's.
        let url = url.or_else(|| lock(&shared.pay).orders.get(&out_trade_no).map(|o| o.notify_url.clone()));
        if let Some(url) = url {
            let d = Delivery::build(
                &shared,
                url,
                "REFUND.SUCCESS",
                "退款成功",
                "refund",
                &plain,
                &out_trade_no,
                Some(&out_refund_no),
            );
            deliver(shared, d, Kind::Delivery);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_urls_are_called() {
        assert!(is_loopback_url("http://127.0.0.1:8080/notify"));
        assert!(is_loopback_url("http://127.1.2.3/notify"));
        assert!(is_loopback_url("http://[::1]:9/notify"));
        assert!(is_loopback_url("https://localhost/notify"));
        assert!(!is_loopback_url("https://example.com/notify"));
        assert!(!is_loopback_url("http://10.0.0.1/notify"));
        assert!(!is_loopback_url("not a url"));
    }
}
