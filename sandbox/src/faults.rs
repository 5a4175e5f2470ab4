//! Fault injection: what `POST /sandbox/v1/faults` can ask for.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An endpoint of the sandbox that faults can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    Jsapi,
    QueryOrder,
    CloseOrder,
    CreateRefund,
    QueryRefund,
    Certificates,
    Jscode2session,
    Token,
    StableToken,
    SubscribeSend,
    SmsSend,
}

/// One fault request. `kind` selects the variant, e.g.
/// `{"kind":"fail","api":"jsapi","times":2,"status":500,"code":"SYSTEM_ERROR"}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// The next `times` calls of `api` fail. Pay APIs answer `status` (default 500) with
    /// `{"code","message"}` (default SYSTEM_ERROR); mini-program APIs answer HTTP 200 with
    /// `errcode` (default -1) and `message` as errmsg; SMS answers `Response.Error` with
    /// `code` (default `InternalError`).
    Fail {
        api: Api,
        #[serde(default = "one")]
        times: u32,
        status: Option<u16>,
        code: Option<String>,
        message: Option<String>,
        errcode: Option<i64>,
    },
    /// Delays calls of `api` by `ms` (the next `times` calls, or all until cleared).
    Latency { api: Api, ms: u64, times: Option<u32> },
    /// Pay APIs only: does the work of the call at once, then holds the answer for `ms` (the next `times` calls,
    /// or all until cleared) — an answer lost on its way back: the caller times out although the change happened.
    LateAnswer { api: Api, ms: u64, times: Option<u32> },
    /// Sends a `WECHATPAY/SIGNTEST/` probe callback for the order (must be refused).
    SigntestCallback { out_trade_no: String },
    /// Sends the order's last notification again, same id and body.
    DuplicateCallback { out_trade_no: String },
    /// Expires every access token now: the next send gets 42001.
    ExpireAccessToken,
    /// Sends no callback for this order from now on (recorded as dropped).
    DropCallbacks { out_trade_no: String },
    /// The user refused subscribe messages: sends to this openid get 43101.
    RefuseSubscribe { openid: String },
    /// Removes every fault above (not the effects already delivered).
    Clear,
}

fn one() -> u32 {
    1
}

/// A failure to answer instead of the real one.
#[derive(Debug, Clone)]
pub(crate) struct FailSpec {
    pub status: Option<u16>,
    pub code: Option<String>,
    pub message: Option<String>,
    pub errcode: Option<i64>,
}

#[derive(Debug, Default)]
pub(crate) struct Faults {
    fails: HashMap<Api, VecDeque<(FailSpec, u32)>>,
    latency: HashMap<Api, (Duration, Option<u32>)>,
    late: HashMap<Api, (Duration, Option<u32>)>,
    pub dropped: HashSet<String>,
    pub refused: HashSet<String>,
}

impl Faults {
    pub fn add_fail(&mut self, api: Api, times: u32, spec: FailSpec) {
        if times > 0 {
            self.fails.entry(api).or_default().push_back((spec, times));
        }
    }

    pub fn add_latency(&mut self, api: Api, delay: Duration, times: Option<u32>) {
        self.latency.insert(api, (delay, times));
    }

    pub fn add_late_answer(&mut self, api: Api, delay: Duration, times: Option<u32>) {
        self.late.insert(api, (delay, times));
    }

    /// Consumes one pending failure of `api`, if any.
    pub fn take_fail(&mut self, api: Api) -> Option<FailSpec> {
        let queue = self.fails.get_mut(&api)?;
        let (spec, left) = queue.front_mut()?;
        let spec = spec.clone();
        *left -= 1;
        if *left == 0 {
            queue.pop_front();
        }
        Some(spec)
    }

    /// Consumes one use of the latency set for `api`, if any.
    pub fn take_latency(&mut self, api: Api) -> Option<Duration> {
        take_delay(&mut self.latency, api)
    }

    /// Consumes one use of the late answer set for `api`, if any.
    pub fn take_late_answer(&mut self, api: Api) -> Option<Duration> {
        take_delay(&mut self.late, api)
    }

    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

fn take_delay(delays: &mut HashMap<Api, (Duration, Option<u32>)>, api: Api) -> Option<Duration> {
    let (delay, left) = delays.get_mut(&api)?;
    let delay = *delay;
    if let Some(n) = left {
        *n = n.saturating_sub(1);
        if *n == 0 {
            delays.remove(&api);
        }
    }
    Some(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FailSpec {
        FailSpec { status: Some(500), code: None, message: None, errcode: None }
    }

    #[test]
    fn fails_are_consumed_in_order_and_count() {
        let mut f = Faults::default();
        f.add_fail(Api::Jsapi, 2, spec());
        assert!(f.take_fail(Api::QueryOrder).is_none());
        assert!(f.take_fail(Api::Jsapi).is_some());
        assert!(f.take_fail(Api::Jsapi).is_some());
        assert!(f.take_fail(Api::Jsapi).is_none());
    }

    #[test]
    fn latency_with_a_count_runs_out() {
        let mut f = Faults::default();
        f.add_latency(Api::Token, Duration::from_millis(5), Some(1));
        assert_eq!(f.take_latency(Api::Token), Some(Duration::from_millis(5)));
        assert_eq!(f.take_latency(Api::Token), None);
        f.add_latency(Api::Token, Duration::from_millis(5), None);
        assert!(f.take_latency(Api::Token).is_some() && f.take_latency(Api::Token).is_some());
        f.add_late_answer(Api::CreateRefund, Duration::from_millis(7), Some(1));
        assert_eq!(f.take_latency(Api::CreateRefund), None, "a late answer is not a latency");
        assert_eq!(f.take_late_answer(Api::CreateRefund), Some(Duration::from_millis(7)));
        assert_eq!(f.take_late_answer(Api::CreateRefund), None);
    }

    #[test]
    fn fault_json_parses() {
        let f: Fault = serde_json::from_str(r#"{"kind":"fail","api":"subscribe_send","errcode":45009}"#).unwrap();
        assert!(matches!(f, Fault::Fail { api: Api::SubscribeSend, times: 1, errcode: Some(45009), .. }));
        let f: Fault = serde_json::from_str(r#"{"kind":"expire_access_token"}"#).unwrap();
        assert!(matches!(f, Fault::ExpireAccessToken));
    }
}
