//! WeChat on loopback: a faithful stand-in for WeChat Pay API v3, the mini-program server API
//! and Tencent Cloud SMS, for tests, the demo and load runs.
//!
//! - [`init`] writes a development identity (merchant and platform RSA keys, ids, APIv3 key,
//!   secrets) and a `paystream.toml` into a directory; [`Identity::load`] reads it back.
//! - [`Sandbox::bind`] + [`Sandbox::run`] serve it; [`spawn_for_tests`] does both on port 0.
//! - Pay v3 checks the merchant's signature over the raw request, keeps order and refund
//!   state with WeChat's rules and error codes, signs every answer with the platform key and
//!   sends encrypted, signed callbacks retried on WeChat's schedule divided by
//!   [`SandboxOptions::time_scale`].
//! - `/sandbox/v1/…` is the control API (pay an order, read callbacks, messages and SMS,
//!   inject faults); see the crate README. [`Control`] is its typed client.
//!
//! Crypto comes from the `wechat` crate (RSA, AES-GCM, Authorization header); the TC3 check
//! for SMS and the subscribe-message value rules are written here independently on purpose,
//! so that the merchant side and the sandbox do not share a bug.

mod cert;
mod control;
mod control_client;
mod faults;
mod identity;
mod mini;
mod notify;
mod pay;
mod rules;
mod server;
mod sms;
mod util;

pub use control_client::{Control, ControlError};
pub use faults::{Api, Fault};
pub use identity::{
    CONFIG_FILE, DEFAULT_LISTEN, DEFAULT_NOTIFY_URL, Identity, IdentityError, InitOptions, init, load_or_init,
};
pub use mini::SubscribeRecord;
pub use notify::{CallbackRecord, CallbackSigner};
pub use server::{
    RunningSandbox, Sandbox, SandboxError, SandboxOptions, SigningMode, WECHAT_RETRY_SCHEDULE_SECS, spawn_for_tests,
    spawn_for_tests_with,
};
pub use sms::SmsRecord;
