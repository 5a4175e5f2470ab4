//! WeChat Pay API v3, merchant side.

pub mod aead;
pub mod cert;
pub mod client;
pub mod keys;
pub mod notify;
pub mod rules;
pub mod sign;
pub mod types;
pub mod verify;
