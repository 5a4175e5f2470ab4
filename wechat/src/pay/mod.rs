//! WeChat Pay API v3, merchant side.

pub mod aead;
pub mod cert;
pub mod keys;
pub mod sign;
pub mod types;
pub mod verify;
