//! Rate limits of the public API (governor's GCRA, keyed in memory): per client address and per user on what costs
//! money, WeChat quota or CPU. WeChat's callback is never limited: it is verified instead, and refusing one would
//! only make WeChat retry a payment we must record.
//!
//! The client address is the peer's, or — behind a proxy of your own, and only when `http.client_ip_header` names
//! it — the last address in that header (the one the proxy appended; earlier ones are the caller's word). Limits
//! are per process: with N ingress replicas a client gets up to N times the quota, which keeps the numbers simple and
//! still bounds what one client can do.

use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use storage::UserId;

use crate::error::ApiError;

/// What a request does, for its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Login,
    Register,
    WxMiniAuth,
    CreateOrder,
    Prepay,
    Refund,
    Status,
}

/// A limit in requests per minute (with a burst of the same size); 0 turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    #[serde(default)]
    pub per_ip_per_minute: u32,
    #[serde(default)]
    pub per_user_per_minute: u32,
}

const fn limit(per_ip_per_minute: u32, per_user_per_minute: u32) -> Limit {
    Limit { per_ip_per_minute, per_user_per_minute }
}

/// `[http.rate_limits]`. For login, "user" is the mobile number tried, counted per client address (so a stranger
/// cannot lock someone out from everywhere) and, with `login_per_mobile_per_hour`, across all addresses (so a
/// botnet cannot guess one account's password either).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// Everything below off at once (tests and benchmarks that drive the API from one address).
    pub enabled: bool,
    pub login: Limit,
    pub login_per_mobile_per_hour: u32,
    pub register: Limit,
    pub wx_mini_auth: Limit,
    pub create_order: Limit,
    pub prepay: Limit,
    pub refund: Limit,
    pub status: Limit,
}

impl Default for RateLimits {
    fn default() -> Self {
        // A person taps a few times a minute; the front end polls the status every couple of seconds. An address
        // can be a whole office behind NAT, hence the higher per-address figures.
        RateLimits {
            enabled: true,
            login: limit(30, 5),
            login_per_mobile_per_hour: 50,
            register: limit(10, 0),
            wx_mini_auth: limit(60, 0),
            create_order: limit(60, 10),
            prepay: limit(60, 10),
            refund: limit(30, 5),
            status: limit(600, 60),
        }
    }
}

impl RateLimits {
    fn of(&self, action: Action) -> Limit {
        match action {
            Action::Login => self.login,
            Action::Register => self.register,
            Action::WxMiniAuth => self.wx_mini_auth,
            Action::CreateOrder => self.create_order,
            Action::Prepay => self.prepay,
            Action::Refund => self.refund,
            Action::Status => self.status,
        }
    }
}

/// Who is asking, for the per-user half of a limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Who {
    User(UserId),
    /// A mobile number trying to log in (validated before it gets here: at most 21 bytes).
    Mobile(String),
}

type Keyed<K> = DefaultKeyedRateLimiter<K>;

/// The limiters of one ingress. Cheap to share.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

struct Inner {
    enabled: bool,
    per_ip: Vec<(Action, Keyed<IpAddr>)>,
    /// Per user (or mobile) and address: one client's quota, which others' mistakes or malice cannot use up.
    per_user: Vec<(Action, Keyed<(Who, IpAddr)>)>,
    per_mobile: Option<Keyed<String>>,
    clock: DefaultClock,
}

fn per_minute(n: u32) -> Option<Quota> {
    NonZeroU32::new(n).map(Quota::per_minute)
}

impl Limiter {
    /// Builds the limiters and starts a task that forgets keys whose quota has fully recovered (every minute), so
    /// memory follows the clients of the last minutes, not every address ever seen.
    pub fn new(cfg: &RateLimits) -> Self {
        const ACTIONS: [Action; 7] = [
            Action::Login,
            Action::Register,
            Action::WxMiniAuth,
            Action::CreateOrder,
            Action::Prepay,
            Action::Refund,
            Action::Status,
        ];
        let per_ip = ACTIONS
            .iter()
            .filter_map(|&a| per_minute(cfg.of(a).per_ip_per_minute).map(|q| (a, RateLimiter::keyed(q))))
            .collect();
        let per_user = ACTIONS
            .iter()
            .filter_map(|&a| per_minute(cfg.of(a).per_user_per_minute).map(|q| (a, RateLimiter::keyed(q))))
            .collect();
        let per_mobile = NonZeroU32::new(cfg.login_per_mobile_per_hour).map(|n| RateLimiter::keyed(Quota::per_hour(n)));
        let limiter = Limiter {
            inner: Arc::new(Inner {
                enabled: cfg.enabled,
                per_ip,
                per_user,
                per_mobile,
                clock: DefaultClock::default(),
            }),
        };
        if cfg.enabled {
            let weak = Arc::downgrade(&limiter.inner);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    for (_, l) in &inner.per_ip {
                        l.retain_recent();
                    }
                    for (_, l) in &inner.per_user {
                        l.retain_recent();
                    }
                    if let Some(l) = &inner.per_mobile {
                        l.retain_recent();
                    }
                }
            });
        }
        limiter
    }

    /// Counts one request of `action` from `ip` (and `who`); `Err(RateLimited)` with the wait when over a limit.
    pub fn check(&self, action: Action, ip: IpAddr, who: Option<Who>) -> Result<(), ApiError> {
        let inner = &self.inner;
        if !inner.enabled {
            return Ok(());
        }
        let refused = |until: governor::NotUntil<_>| {
            let wait = until.wait_time_from(inner.clock.now());
            ApiError::RateLimited { retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0) }
        };
        // Narrowest first: a request refused for its own user's quota does not use up the shared ones (governor
        // counts a request when it checks it).
        if let Some(who) = who {
            let mobile = match &who {
                Who::Mobile(m) => Some(m.clone()),
                Who::User(_) => None,
            };
            if let Some((_, l)) = inner.per_user.iter().find(|(a, _)| *a == action) {
                l.check_key(&(who, ip)).map_err(refused)?;
            }
            if let (Some(m), Some(l)) = (mobile, &inner.per_mobile) {
                l.check_key(&m).map_err(refused)?;
            }
        }
        if let Some((_, l)) = inner.per_ip.iter().find(|(a, _)| *a == action) {
            l.check_key(&ip).map_err(refused)?;
        }
        Ok(())
    }
}

/// The client's address: the peer's, or the last one in `header` when a proxy of ours sets it.
pub fn client_ip(headers: &http::HeaderMap, peer: Option<IpAddr>, header: Option<&str>) -> IpAddr {
    let from_header = header
        .and_then(|h| headers.get_all(h).iter().next_back())
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|v| v.trim().parse::<IpAddr>().ok());
    from_header.or(peer).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_limit_counts_per_address_and_per_user_and_says_when_to_come_back() {
        let cfg = RateLimits { prepay: limit(3, 2), ..Default::default() };
        let l = Limiter::new(&cfg);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let alice = || Some(Who::User(UserId(1)));
        assert!(l.check(Action::Prepay, a, alice()).is_ok());
        assert!(l.check(Action::Prepay, a, alice()).is_ok());
        match l.check(Action::Prepay, a, alice()) {
            Err(ApiError::RateLimited { retry_after }) => assert!((1..=60).contains(&retry_after), "{retry_after}"),
            other => panic!("third prepay of a user in a minute: {other:?}"),
        }
        // Another user from the same address has a quota of their own, until the address's runs out.
        assert!(l.check(Action::Prepay, a, Some(Who::User(UserId(2)))).is_ok());
        assert!(l.check(Action::Prepay, a, Some(Who::User(UserId(3)))).is_err(), "the address used its 3");
        assert!(l.check(Action::Prepay, b, alice()).is_ok(), "alice from elsewhere is not blocked by that address");
        // Other actions are counted apart; off means off.
        assert!(l.check(Action::Status, a, alice()).is_ok());
        let off = Limiter::new(&RateLimits { enabled: false, prepay: limit(1, 1), ..Default::default() });
        for _ in 0..10 {
            assert!(off.check(Action::Prepay, a, alice()).is_ok());
        }
    }

    #[test]
    fn the_client_address_comes_from_the_proxy_header_only_when_configured() {
        let mut h = http::HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6, 203.0.113.7".parse().unwrap());
        let peer: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(client_ip(&h, Some(peer), None), peer, "the header is the caller's word unless trusted");
        assert_eq!(client_ip(&h, Some(peer), Some("x-forwarded-for")).to_string(), "203.0.113.7", "the proxy's entry");
        h.insert("x-forwarded-for", "not an address".parse().unwrap());
        assert_eq!(client_ip(&h, Some(peer), Some("x-forwarded-for")), peer);
    }
}
