//! The looklook endpoints, one module per service.

pub mod order;
pub mod payment;
pub mod user;

/// Now, in unix seconds (what looklook's API speaks).
pub(crate) fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}
