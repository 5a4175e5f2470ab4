//! The ingress through HTTP, against real Postgres, NATS and the WeChat sandbox. One test binary (one link) for
//! all of them.

mod common;

mod callbacks;
mod http;
mod limits;
mod looklook;
mod orders;
mod payments;
mod users;
