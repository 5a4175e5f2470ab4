//! Connection pool, migrations and the storage error type.

use std::time::Duration;

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::{
    AsyncConnection, AsyncMigrationHarness, AsyncPgConnection,
    pooled_connection::{AsyncDieselConnectionManager, deadpool},
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::domain::DomainError;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// A pooled Postgres connection pool.
pub type PgPool = deadpool::Pool<AsyncPgConnection>;
/// A connection borrowed from the pool (derefs to [`Conn`]).
pub type PooledConn = deadpool::Object<AsyncPgConnection>;
/// One connection, as handlers and repositories take it.
pub type Conn = AsyncPgConnection;

/// The `[database]` section of `paystream.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbConfig {
    /// `postgres://user:password@host:port/db`. Secret because it may carry a password.
    pub url: SecretString,
    /// Connections per process. Postgres, not JetStream, bounds throughput: keep it near 2-4x the cores of the DB.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// How long to wait for a free connection before failing the request.
    #[serde(default = "default_acquire_timeout", with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

fn default_pool_size() -> usize {
    16
}
fn default_acquire_timeout() -> Duration {
    Duration::from_secs(5)
}

impl DbConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: SecretString::from(url.into()),
            pool_size: default_pool_size(),
            acquire_timeout: default_acquire_timeout(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let url = self.url.expose_secret();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("database.url must start with postgres:// or postgresql://".into());
        }
        if self.pool_size == 0 {
            return Err("database.pool_size must be at least 1".into());
        }
        Ok(())
    }
}

/// Everything that can go wrong below a repository call.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("unique constraint {constraint} violated")]
    Conflict { constraint: String },
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("database error: {0}")]
    Query(DieselError),
    #[error("migration failed: {0}")]
    Migration(String),
}

impl StorageError {
    /// Worth retrying: everything the database may answer differently next time — lost connections, failover
    /// ("terminating connection due to administrator command"), deadlocks, lock and statement timeouts,
    /// serialization failures. Not worth it: constraint violations, domain refusals, rows that do not exist, and
    /// queries diesel cannot build or decode (retrying a bug only delays the dead letter that shows it).
    pub fn is_transient(&self) -> bool {
        match self {
            StorageError::Unavailable(_) => true,
            StorageError::Query(DieselError::DatabaseError(kind, _)) => !matches!(
                kind,
                DatabaseErrorKind::UniqueViolation
                    | DatabaseErrorKind::ForeignKeyViolation
                    | DatabaseErrorKind::NotNullViolation
                    | DatabaseErrorKind::CheckViolation
                    | DatabaseErrorKind::RestrictViolation
                    | DatabaseErrorKind::ExclusionViolation
            ),
            StorageError::Query(DieselError::BrokenTransactionManager) => true,
            _ => false,
        }
    }

    /// The name of the violated unique constraint, if that is what this is.
    pub fn conflict(&self) -> Option<&str> {
        match self {
            StorageError::Conflict { constraint } => Some(constraint),
            _ => None,
        }
    }
}

impl From<DieselError> for StorageError {
    fn from(e: DieselError) -> Self {
        match &e {
            DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
                StorageError::Conflict { constraint: info.constraint_name().unwrap_or("unknown").to_owned() }
            }
            DieselError::DatabaseError(
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                _,
            ) => StorageError::Unavailable(e.to_string()),
            _ => StorageError::Query(e),
        }
    }
}

impl From<deadpool::PoolError> for StorageError {
    fn from(e: deadpool::PoolError) -> Self {
        StorageError::Unavailable(e.to_string())
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Builds the pool. Connections are made lazily, so this succeeds even while Postgres is still starting.
pub fn pool(cfg: &DbConfig) -> Result<PgPool> {
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(cfg.url.expose_secret());
    deadpool::Pool::builder(manager)
        .max_size(cfg.pool_size)
        .wait_timeout(Some(cfg.acquire_timeout))
        .create_timeout(Some(cfg.acquire_timeout))
        .runtime(::deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| StorageError::Unavailable(e.to_string()))
}

/// One dedicated connection (LISTEN needs a connection of its own, outside the pool).
pub async fn connect(url: &str) -> Result<AsyncPgConnection> {
    AsyncPgConnection::establish(url).await.map_err(|e| StorageError::Unavailable(e.to_string()))
}

/// Applies the embedded migrations that are not applied yet; returns how many ran. Safe to run from several
/// processes at once: diesel takes a lock on its bookkeeping table. Needs the multi-threaded tokio runtime.
pub async fn migrate(url: &str) -> Result<usize> {
    let conn = connect(url).await?;
    let mut harness = AsyncMigrationHarness::new(conn);
    let applied = tokio::task::block_in_place(|| harness.run_pending_migrations(MIGRATIONS).map(|v| v.len()))
        .map_err(|e| StorageError::Migration(e.to_string()))?;
    Ok(applied)
}
