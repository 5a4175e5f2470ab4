//! PostgreSQL storage for paystream: the schema and its embedded migrations, domain types that cannot hold an
//! invalid value, and repositories whose updates are conditional on the current state ("from this state only").
//!
//! Every function takes a `&mut Conn`, so callers decide the transaction: a state change and the outbox row that
//! announces it are written in one. Money is [`Fen`]; states are [`TradeState`] and [`PayStatus`], each with one
//! transition function.

pub mod db;
pub mod domain;
pub mod homestays;
pub mod orders;
pub mod outbox;
pub mod payments;
mod prepared;
pub mod processed;
pub mod refunds;
pub mod schema;
pub mod users;

pub use db::{Conn, DbConfig, DbTls, PgPool, PooledConn, Result, StorageError, connect, detach, migrate, pool};
pub use diesel_async::{AsyncConnection, RunQueryDsl};
pub use domain::{
    AuthType, DomainError, Fen, HomestayId, OrderId, OrderSn, PayStatus, PaymentSn, RefundSn, RefundStatus, TradeState,
    Transition, UserId,
};
pub use prepared::{Prepared, prepared};
