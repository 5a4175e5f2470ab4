//! Domain values that cannot hold an invalid value: money in fen, serial numbers, ids and the two state machines.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// An amount of money in fen (1/100 yuan). Never negative; formatted as yuan only at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Fen(i64);

impl Fen {
    pub const ZERO: Fen = Fen(0);

    pub fn new(fen: i64) -> Result<Self, DomainError> {
        if fen < 0 { Err(DomainError::NegativeAmount(fen)) } else { Ok(Fen(fen)) }
    }

    pub fn get(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Fen) -> Option<Fen> {
        self.0.checked_add(other.0).map(Fen)
    }

    pub fn checked_mul(self, n: i64) -> Option<Fen> {
        if n < 0 {
            return None;
        }
        self.0.checked_mul(n).map(Fen)
    }

    /// `12345` → `"123.45"`.
    pub fn yuan(self) -> String {
        format!("{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

impl TryFrom<i64> for Fen {
    type Error = DomainError;
    fn try_from(v: i64) -> Result<Self, Self::Error> {
        Fen::new(v)
    }
}

impl From<Fen> for i64 {
    fn from(f: Fen) -> i64 {
        f.0
    }
}

impl fmt::Display for Fen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "¥{}", self.yuan())
    }
}

/// Errors of domain constructors and transitions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("amount must not be negative, got {0} fen")]
    NegativeAmount(i64),
    #[error("{kind} serial number must be {prefix} + 14 digits of time + 8 digits, got {value:?}")]
    BadSerial { kind: &'static str, prefix: &'static str, value: String },
    #[error("unknown {kind} value {value}")]
    UnknownState { kind: &'static str, value: String },
    #[error("{kind} cannot move from {from} to {to}")]
    Refused { kind: &'static str, from: String, to: String },
}

macro_rules! serial {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A new serial for `now`: prefix, `yyyyMMddHHmmss` (UTC+8, as WeChat shows times) and 8 random digits.
            pub fn generate(now: DateTime<Utc>) -> Self {
                $name(format!("{}{}{:08}", $prefix, beijing_stamp(now), random_digits()))
            }

            pub fn parse(value: &str) -> Result<Self, DomainError> {
                let digits = value.strip_prefix($prefix);
                match digits {
                    Some(d) if d.len() == 22 && d.bytes().all(|b| b.is_ascii_digit()) => Ok($name(value.to_owned())),
                    _ => Err(DomainError::BadSerial { kind: $kind, prefix: $prefix, value: value.to_owned() }),
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The 22 digits after the prefix: lets related serials share them (a refund's out_refund_no is derived
            /// from its payment's sn, so retries can never create a second refund).
            pub fn digits(&self) -> &str {
                &self.0[3..]
            }
        }

        impl TryFrom<String> for $name {
            type Error = DomainError;
            fn try_from(v: String) -> Result<Self, Self::Error> {
                $name::parse(&v)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

serial!(
    /// A homestay order's serial number, `HSO…`.
    OrderSn,
    "HSO",
    "order"
);
serial!(
    /// A payment's serial number, `PMT…`; also WeChat's `out_trade_no`.
    PaymentSn,
    "PMT",
    "payment"
);
serial!(
    /// A refund's serial number, `RFD…`; also WeChat's `out_refund_no`.
    RefundSn,
    "RFD",
    "refund"
);

impl RefundSn {
    /// The one refund a payment can have: same digits, so a retried refund request reuses the same out_refund_no.
    pub fn for_payment(payment: &PaymentSn) -> RefundSn {
        RefundSn(format!("RFD{}", payment.digits()))
    }
}

fn beijing_stamp(now: DateTime<Utc>) -> String {
    let beijing = chrono::FixedOffset::east_opt(8 * 3600).expect("UTC+8 is a valid offset");
    now.with_timezone(&beijing).format("%Y%m%d%H%M%S").to_string()
}

fn random_digits() -> u32 {
    // Uniqueness is enforced by the database's unique constraint; this only has to make collisions rare. A v4 uuid
    // draws from the OS generator, so no extra RNG crate is needed.
    (uuid::Uuid::new_v4().as_u128() % 100_000_000) as u32
}

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id!(
    /// Row id of a user.
    UserId
);
id!(
    /// Row id of a homestay.
    HomestayId
);
id!(
    /// Row id of an order.
    OrderId
);

/// What a transition did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The state changed.
    Changed,
    /// Already in the target state: a replay, nothing to do (and nothing to announce).
    Unchanged,
}

/// An order's `trade_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TradeState {
    Cancelled,
    WaitPay,
    WaitUse,
    Used,
    Refunded,
    Expired,
}

impl TradeState {
    pub const ALL: [TradeState; 6] = [
        TradeState::Cancelled,
        TradeState::WaitPay,
        TradeState::WaitUse,
        TradeState::Used,
        TradeState::Refunded,
        TradeState::Expired,
    ];

    pub fn code(self) -> i16 {
        match self {
            TradeState::Cancelled => -1,
            TradeState::WaitPay => 0,
            TradeState::WaitUse => 1,
            TradeState::Used => 2,
            TradeState::Refunded => 3,
            TradeState::Expired => 4,
        }
    }

    pub fn from_code(code: i16) -> Result<Self, DomainError> {
        TradeState::ALL
            .into_iter()
            .find(|s| s.code() == code)
            .ok_or(DomainError::UnknownState { kind: "trade_state", value: code.to_string() })
    }

    /// The one place that says which order state may follow which:
    /// waitPay → waitUse | cancelled; waitUse → used | refunded | expired; the same state again is a no-op.
    pub fn transition(self, to: TradeState) -> Result<Transition, DomainError> {
        use TradeState::*;
        match (self, to) {
            (a, b) if a == b => Ok(Transition::Unchanged),
            (WaitPay, WaitUse | Cancelled) | (WaitUse, Used | Refunded | Expired) => Ok(Transition::Changed),
            (from, to) => Err(DomainError::Refused { kind: "order", from: format!("{from:?}"), to: format!("{to:?}") }),
        }
    }
}

/// A payment's `pay_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PayStatus {
    /// Failed or closed: no money will arrive for it.
    Closed,
    Waiting,
    Paid,
    Refunded,
}

impl PayStatus {
    pub const ALL: [PayStatus; 4] = [PayStatus::Closed, PayStatus::Waiting, PayStatus::Paid, PayStatus::Refunded];

    pub fn code(self) -> i16 {
        match self {
            PayStatus::Closed => -1,
            PayStatus::Waiting => 0,
            PayStatus::Paid => 1,
            PayStatus::Refunded => 2,
        }
    }

    pub fn from_code(code: i16) -> Result<Self, DomainError> {
        PayStatus::ALL
            .into_iter()
            .find(|s| s.code() == code)
            .ok_or(DomainError::UnknownState { kind: "pay_status", value: code.to_string() })
    }

    /// waiting → paid | closed; paid → refunded; the same state again is a no-op.
    pub fn transition(self, to: PayStatus) -> Result<Transition, DomainError> {
        use PayStatus::*;
        match (self, to) {
            (a, b) if a == b => Ok(Transition::Unchanged),
            (Waiting, Paid | Closed) | (Paid, Refunded) => Ok(Transition::Changed),
            (from, to) => {
                Err(DomainError::Refused { kind: "payment", from: format!("{from:?}"), to: format!("{to:?}") })
            }
        }
    }
}

/// A refund's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RefundStatus {
    /// WeChat closed it or could not pay it back (CLOSED, ABNORMAL): an operator must act.
    Failed,
    /// Written here; WeChat may not have it yet.
    Requested,
    /// WeChat accepted it and is paying it back.
    Processing,
    /// The money is back with the user.
    Succeeded,
}

impl RefundStatus {
    pub const ALL: [RefundStatus; 4] =
        [RefundStatus::Failed, RefundStatus::Requested, RefundStatus::Processing, RefundStatus::Succeeded];

    pub fn code(self) -> i16 {
        match self {
            RefundStatus::Failed => -1,
            RefundStatus::Requested => 0,
            RefundStatus::Processing => 1,
            RefundStatus::Succeeded => 2,
        }
    }

    pub fn from_code(code: i16) -> Result<Self, DomainError> {
        RefundStatus::ALL
            .into_iter()
            .find(|s| s.code() == code)
            .ok_or(DomainError::UnknownState { kind: "refund status", value: code.to_string() })
    }

    /// Whether WeChat may still change it.
    pub fn is_open(self) -> bool {
        matches!(self, RefundStatus::Requested | RefundStatus::Processing)
    }

    /// requested → processing | succeeded | failed; processing → succeeded | failed; the same state again is a
    /// no-op. Succeeded and failed are final: a late PROCESSING never reopens a refund.
    pub fn transition(self, to: RefundStatus) -> Result<Transition, DomainError> {
        use RefundStatus::*;
        match (self, to) {
            (a, b) if a == b => Ok(Transition::Unchanged),
            (Requested, Processing | Succeeded | Failed) | (Processing, Succeeded | Failed) => Ok(Transition::Changed),
            (from, to) => {
                Err(DomainError::Refused { kind: "refund", from: format!("{from:?}"), to: format!("{to:?}") })
            }
        }
    }
}

/// How a user logs in: `user_auth.auth_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AuthType {
    /// Mobile number and password; auth_key is the mobile number.
    #[serde(rename = "system")]
    System,
    /// WeChat mini-program; auth_key is the openid.
    #[serde(rename = "wxMini")]
    WxMini,
}

impl AuthType {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthType::System => "system",
            AuthType::WxMini => "wxMini",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_order_arrow() {
        use TradeState::*;
        let allowed =
            [(WaitPay, WaitUse), (WaitPay, Cancelled), (WaitUse, Used), (WaitUse, Refunded), (WaitUse, Expired)];
        for from in TradeState::ALL {
            for to in TradeState::ALL {
                let got = from.transition(to);
                if from == to {
                    assert_eq!(got, Ok(Transition::Unchanged), "{from:?} -> {to:?}");
                } else if allowed.contains(&(from, to)) {
                    assert_eq!(got, Ok(Transition::Changed), "{from:?} -> {to:?}");
                } else {
                    assert!(matches!(got, Err(DomainError::Refused { .. })), "{from:?} -> {to:?} must be refused");
                }
            }
        }
        // 6 states: 6 no-ops, 5 arrows, 25 refusals
        let refused = TradeState::ALL
            .iter()
            .flat_map(|a| TradeState::ALL.iter().map(move |b| a.transition(*b)))
            .filter(|r| r.is_err())
            .count();
        assert_eq!(refused, 25);
    }

    #[test]
    fn every_payment_arrow() {
        use PayStatus::*;
        let allowed = [(Waiting, Paid), (Waiting, Closed), (Paid, Refunded)];
        for from in PayStatus::ALL {
            for to in PayStatus::ALL {
                let got = from.transition(to);
                if from == to {
                    assert_eq!(got, Ok(Transition::Unchanged));
                } else if allowed.contains(&(from, to)) {
                    assert_eq!(got, Ok(Transition::Changed), "{from:?} -> {to:?}");
                } else {
                    assert!(got.is_err(), "{from:?} -> {to:?} must be refused");
                }
            }
        }
        assert!(Paid.transition(Waiting).is_err(), "a paid payment never becomes payable again");
        assert!(Closed.transition(Paid).is_err(), "a closed payment is closed at WeChat too");
    }

    #[test]
    fn every_refund_arrow() {
        use RefundStatus::*;
        let allowed = [
            (Requested, Processing),
            (Requested, Succeeded),
            (Requested, Failed),
            (Processing, Succeeded),
            (Processing, Failed),
        ];
        for from in RefundStatus::ALL {
            for to in RefundStatus::ALL {
                let got = from.transition(to);
                if from == to {
                    assert_eq!(got, Ok(Transition::Unchanged));
                } else if allowed.contains(&(from, to)) {
                    assert_eq!(got, Ok(Transition::Changed), "{from:?} -> {to:?}");
                } else {
                    assert!(got.is_err(), "{from:?} -> {to:?} must be refused");
                }
            }
            assert_eq!(RefundStatus::from_code(from.code()), Ok(from));
        }
        assert!(RefundStatus::from_code(3).is_err());
        assert!(Succeeded.transition(Processing).is_err(), "a late PROCESSING never reopens a refund");
    }

    #[test]
    fn state_codes_round_trip_and_unknown_codes_are_refused() {
        for s in TradeState::ALL {
            assert_eq!(TradeState::from_code(s.code()), Ok(s));
        }
        for s in PayStatus::ALL {
            assert_eq!(PayStatus::from_code(s.code()), Ok(s));
        }
        assert!(TradeState::from_code(5).is_err());
        assert!(PayStatus::from_code(3).is_err());
    }

    #[test]
    fn fen_refuses_negative_and_formats_as_yuan() {
        assert!(Fen::new(-1).is_err());
        assert_eq!(Fen::new(12345).unwrap().yuan(), "123.45");
        assert_eq!(Fen::new(5).unwrap().yuan(), "0.05");
        assert_eq!(Fen::new(100).unwrap().to_string(), "¥1.00");
        assert!(serde_json::from_str::<Fen>("-3").is_err());
        assert_eq!(Fen::new(i64::MAX).unwrap().checked_add(Fen::new(1).unwrap()), None);
    }

    #[test]
    fn serials_are_valid_out_trade_nos_and_parse_strictly() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-26T16:30:00Z").unwrap().with_timezone(&Utc);
        let sn = PaymentSn::generate(now);
        assert!(sn.as_str().starts_with("PMT20261127003000"), "{sn}: Beijing time");
        assert_eq!(sn.as_str().len(), 25);
        assert!(sn.as_str().len() >= 6 && sn.as_str().len() <= 32, "WeChat's out_trade_no is 6-32 chars");
        assert_eq!(PaymentSn::parse(sn.as_str()), Ok(sn.clone()));
        assert!(PaymentSn::parse("HSO2026112700300012345678").is_err());
        assert!(OrderSn::parse("HSO20261127003000123456").is_err(), "too short");
        assert!(OrderSn::parse("HSO202611270030001234567x").is_err());
        assert_eq!(RefundSn::for_payment(&sn).digits(), sn.digits());
        assert!(serde_json::from_str::<OrderSn>("\"nope\"").is_err());
    }
}
