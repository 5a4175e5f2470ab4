//! The `[http]` section of `paystream.toml`: where the ingress listens and the rules of its API.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

/// `[http]`. Only `jwt_secret` is required; everything else has a default fit for production.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressConfig {
    /// Address of the public API.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// HS256 key of access tokens: at least 32 bytes (a shorter key can be brute-forced from one token).
    pub jwt_secret: SecretString,
    /// Keys of a rotation: tokens they signed are still accepted (new ones are signed with `jwt_secret`). Put the
    /// old secret here when setting a new `jwt_secret`; remove it once `jwt_ttl` has passed.
    #[serde(default)]
    pub jwt_previous_secrets: Vec<SecretString>,
    /// Lifetime of an access token.
    #[serde(default = "default_jwt_ttl", with = "humantime_serde")]
    pub jwt_ttl: Duration,
    /// Largest request body accepted (callbacks included; WeChat's are about 1 KiB).
    #[serde(default = "default_body_limit")]
    pub body_limit_bytes: usize,
    /// A request still running after this is answered 503.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Origins allowed to call the API from a browser (the mini-program's web view). Empty: same origin only.
    #[serde(default)]
    pub cors_allowed_origins: Vec<String>,
    /// How long an order waits for payment; also WeChat's `time_expire` of its prepay.
    #[serde(default = "default_payment_deadline", with = "humantime_serde")]
    pub payment_deadline: Duration,
    /// How long after the prepay the status endpoint starts asking WeChat (before that the callback is the likely
    /// source of truth and a query would be wasted).
    #[serde(default = "default_status_grace", with = "humantime_serde")]
    pub status_grace: Duration,
    /// At most one WeChat query per payment per this interval, however often the front end polls.
    #[serde(default = "default_status_query_interval", with = "humantime_serde")]
    pub status_query_interval: Duration,
    /// Insert the demo homestays into an empty database at start (the demo and development ask for it). Off by
    /// default: in production homestays come from the business's own data.
    #[serde(default)]
    pub seed_demo_homestays: bool,
    /// Also serve `/readyz` and `/metrics` on this public port. Off by default: they are on `admin.listen`, which
    /// is not exposed (they tell a stranger about the dependencies and the traffic).
    #[serde(default)]
    pub public_ops_routes: bool,
    /// Per-address and per-user rate limits (`[http.rate_limits]`, see `crate::limits`).
    #[serde(default)]
    pub rate_limits: crate::limits::RateLimits,
    /// The header in which a proxy of yours puts the client's address (e.g. `X-Forwarded-For`; its last entry is
    /// used). Unset: the peer's address; a header is never trusted unless named here.
    #[serde(default)]
    pub client_ip_header: Option<String>,
    /// Unpaid orders one user may have open at once (0: no cap). Each holds a prepay at WeChat and a room.
    #[serde(default = "default_max_unpaid_orders")]
    pub max_unpaid_orders: u32,
    /// Continue the trace of a caller's `traceparent` header (a gateway of your own in front). Off by default:
    /// any caller could otherwise choose trace ids and force every one of its requests to be sampled.
    #[serde(default)]
    pub trust_traceparent: bool,
    /// Threads that hash passwords (argon2id, 19 MiB each, held for the life of the process); 0 = one per core.
    /// They bound both the CPU and the memory logins can take.
    #[serde(default)]
    pub password_hashers: usize,
    /// Logins and registrations that may wait for a hashing thread; past that they are answered 503 with
    /// `Retry-After` at once.
    #[serde(default = "default_password_queue")]
    pub password_queue: usize,
}

fn default_listen() -> SocketAddr {
    "0.0.0.0:8080".parse().expect("valid address")
}
fn default_jwt_ttl() -> Duration {
    Duration::from_secs(2 * 3600)
}
fn default_body_limit() -> usize {
    64 * 1024
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_payment_deadline() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_status_grace() -> Duration {
    Duration::from_secs(10)
}

fn default_max_unpaid_orders() -> u32 {
    10
}

fn default_password_queue() -> usize {
    32
}

fn default_status_query_interval() -> Duration {
    Duration::from_secs(5)
}

/// Whether a token key could be guessed: a placeholder left from an example file, or too little entropy. The
/// estimate is the Shannon entropy of the key's characters times its length, taken over its shortest repeating
/// unit ("1234567890" four times counts once). A random hex key of 32 characters scores about 120 bits,
/// `openssl rand -hex 32` about 250; "aaaa…" or a short word repeated scores far less. The refusal needs under 96
/// bits, so real random keys always pass. The message never contains the key.
fn guessable(secret: &str) -> Result<(), &'static str> {
    let lower = secret.to_ascii_lowercase();
    if ["set-me", "change-me", "changeme", "placeholder", "example"].iter().any(|p| lower.contains(p)) {
        return Err("is a placeholder from an example");
    }
    let chars: Vec<char> = secret.chars().collect();
    let period = (1..chars.len()).find(|&p| (p..chars.len()).all(|i| chars[i] == chars[i - p])).unwrap_or(chars.len());
    let unit = &chars[..period];
    let mut counts = std::collections::HashMap::new();
    for c in unit {
        *counts.entry(*c).or_insert(0usize) += 1;
    }
    let n = unit.len() as f64;
    let bits_per_char: f64 = counts.values().map(|&k| k as f64 / n).map(|p| -p * p.log2()).sum();
    if bits_per_char * n < 96.0 {
        return Err("has too little entropy (under 96 bits estimated)");
    }
    Ok(())
}

impl IngressConfig {
    /// Defaults with the given secret (tests and tools).
    pub fn new(jwt_secret: impl Into<String>) -> Self {
        IngressConfig {
            listen: default_listen(),
            jwt_secret: SecretString::from(jwt_secret.into()),
            jwt_previous_secrets: Vec::new(),
            jwt_ttl: default_jwt_ttl(),
            body_limit_bytes: default_body_limit(),
            request_timeout: default_request_timeout(),
            cors_allowed_origins: Vec::new(),
            payment_deadline: default_payment_deadline(),
            status_grace: default_status_grace(),
            status_query_interval: default_status_query_interval(),
            seed_demo_homestays: false,
            public_ops_routes: false,
            trust_traceparent: false,
            rate_limits: Default::default(),
            client_ip_header: None,
            max_unpaid_orders: default_max_unpaid_orders(),
            password_hashers: 0,
            password_queue: default_password_queue(),
        }
    }

    /// `password_hashers` with 0 resolved to the number of cores.
    pub fn password_hashers(&self) -> usize {
        match self.password_hashers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }

    /// Checks every value; the message names the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.jwt_secret.expose_secret().len() < 32 {
            return Err("http.jwt_secret must be at least 32 bytes".into());
        }
        if self.jwt_previous_secrets.iter().any(|s| s.expose_secret().len() < 32) {
            return Err("http.jwt_previous_secrets must each be at least 32 bytes".into());
        }
        if let Err(why) = guessable(self.jwt_secret.expose_secret()) {
            return Err(format!("http.jwt_secret {why}: anyone could forge tokens; use e.g. `openssl rand -hex 32`"));
        }
        if let Some(why) = self.jwt_previous_secrets.iter().find_map(|s| guessable(s.expose_secret()).err()) {
            return Err(format!("http.jwt_previous_secrets: one {why}"));
        }
        if self.jwt_ttl < Duration::from_secs(60) || self.jwt_ttl > Duration::from_secs(30 * 24 * 3600) {
            return Err("http.jwt_ttl must be between 1 minute and 30 days".into());
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.body_limit_bytes) {
            return Err("http.body_limit_bytes must be between 1024 and 16777216".into());
        }
        if self.request_timeout.is_zero() || self.request_timeout > Duration::from_secs(300) {
            return Err("http.request_timeout must be between 1ms and 5 minutes".into());
        }
        // WeChat refuses a time_expire less than a minute away, and a prepay_id lives two hours.
        if self.payment_deadline < Duration::from_secs(60) || self.payment_deadline > Duration::from_secs(2 * 3600) {
            return Err("http.payment_deadline must be between 1 minute and 2 hours".into());
        }
        if let Some(h) = &self.client_ip_header
            && http::HeaderName::from_bytes(h.as_bytes()).is_err()
        {
            return Err(format!("http.client_ip_header must be a header name, got {h:?}"));
        }
        if self.password_hashers > 64 {
            return Err("http.password_hashers must be at most 64 (each holds 19 MiB)".into());
        }
        if !(1..=10_000).contains(&self.password_queue) {
            return Err("http.password_queue must be between 1 and 10000".into());
        }
        if self.status_query_interval.is_zero() {
            return Err("http.status_query_interval must be positive".into());
        }
        for (i, origin) in self.cors_allowed_origins.iter().enumerate() {
            let ok = (origin.starts_with("https://") || origin.starts_with("http://"))
                && !origin.trim_end_matches('/').contains(|c: char| c.is_whitespace())
                && http::HeaderValue::from_str(origin).is_ok()
                && origin.matches('/').count() == 2;
            if !ok {
                return Err(format!(
                    "http.cors_allowed_origins[{i}] must be an origin such as https://example.com, got {origin:?}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors_name_the_key() {
        let cfg: IngressConfig = serde_json::from_value(serde_json::json!({
            "jwt_secret": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822c"
        }))
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.listen.port(), 8080);
        assert_eq!(cfg.payment_deadline, Duration::from_secs(1800));
        assert_eq!(cfg.body_limit_bytes, 65536);
        assert!(!cfg.seed_demo_homestays && cfg.jwt_previous_secrets.is_empty(), "no demo data unless asked");
        assert!(!cfg.public_ops_routes && !cfg.trust_traceparent, "the public port shows nothing internal");
        let prod: IngressConfig = serde_json::from_value(serde_json::json!({
            "jwt_secret": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822c", "seed_demo_homestays": true,
            "jwt_previous_secrets": ["short"]
        }))
        .unwrap();
        assert!(prod.seed_demo_homestays);
        assert_eq!(prod.validate().unwrap_err(), "http.jwt_previous_secrets must each be at least 32 bytes");

        let short = IngressConfig::new("short");
        assert_eq!(short.validate().unwrap_err(), "http.jwt_secret must be at least 32 bytes");
        for weak in
            ["set-me-in-the-environment-at-least-32-bytes", &"x".repeat(64), &"ab".repeat(24), &"1234567890".repeat(4)]
        {
            let e = IngressConfig::new(weak).validate().unwrap_err();
            assert!(e.starts_with("http.jwt_secret ") && !e.contains(weak), "{weak}: {e}");
        }
        let mut rotated = IngressConfig::new("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822c");
        rotated.jwt_previous_secrets = vec![SecretString::from("z".repeat(40))];
        assert!(rotated.validate().unwrap_err().starts_with("http.jwt_previous_secrets"));
        let mut bad = IngressConfig::new("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822c");
        bad.cors_allowed_origins = vec!["https://ok.example.com".into(), "example.com/path".into()];
        assert!(bad.validate().unwrap_err().starts_with("http.cors_allowed_origins[1]"));
        let unknown = serde_json::from_value::<IngressConfig>(serde_json::json!({
            "jwt_secret": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822c", "listen_addr": "x"
        }));
        assert!(unknown.unwrap_err().to_string().contains("listen_addr"));
        assert!(!format!("{short:?}").contains("short\""), "the secret never prints");
    }
}
