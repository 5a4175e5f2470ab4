//! Connection pool, migrations and the storage error type.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use diesel::ConnectionError;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::{
    AsyncConnection, AsyncMigrationHarness, AsyncPgConnection,
    pooled_connection::{AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod, deadpool},
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio_postgres_rustls::MakeRustlsConnect;

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
    /// TLS to PostgreSQL.
    #[serde(default)]
    pub tls: DbTls,
    /// PEM of the CA that signed the server's certificate (with `tls = "verify-full"`; CloudNativePG's
    /// `<cluster>-ca` Secret, key `ca.crt`). Unset: the system's trusted roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PostgreSQL cancels a statement of the pool's connections running longer than this (`statement_timeout`;
    /// 0s: never): a runaway query ends with a transient error instead of holding a connection and its locks.
    /// Migrations and tools are not bound by it.
    #[serde(default = "default_statement_timeout", with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// ...and a statement waiting longer than this for a lock (`lock_timeout`; 0s: never).
    #[serde(default = "default_lock_timeout", with = "humantime_serde")]
    pub lock_timeout: Duration,
}

/// `database.tls`, named after libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DbTls {
    /// Plain TCP (one machine, or a cluster network guarded by network policies).
    #[default]
    Disable,
    /// Encrypted, and the server's certificate must chain to `ca_file` (or the system's roots) and name the host of
    /// `url`: a server without TLS, or one that cannot prove it is that host, is refused.
    VerifyFull,
}

fn default_pool_size() -> usize {
    16
}
fn default_acquire_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_statement_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_lock_timeout() -> Duration {
    Duration::from_secs(10)
}

impl DbConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: SecretString::from(url.into()),
            pool_size: default_pool_size(),
            acquire_timeout: default_acquire_timeout(),
            tls: DbTls::Disable,
            ca_file: None,
            statement_timeout: default_statement_timeout(),
            lock_timeout: default_lock_timeout(),
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
        if self.ca_file.is_some() && self.tls == DbTls::Disable {
            return Err("database.ca_file is set but database.tls is \"disable\": set tls = \"verify-full\"".into());
        }
        if url.contains("options=") {
            return Err(
                "database.url: set timeouts with database.statement_timeout and lock_timeout, not options".into()
            );
        }
        if url.contains("sslmode=") {
            return Err("database.url: set TLS with database.tls, not sslmode in the URL".into());
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

/// How connections are made: plain, or TLS with the configured roots, and with the session settings of pooled
/// connections. Built once per pool.
#[derive(Clone)]
struct Connector {
    tls: Option<MakeRustlsConnect>,
    /// `-c name=value` server options for every connection (the pool's plan cache mode and timeouts); empty for tools.
    options: String,
}

impl Connector {
    fn new(cfg: &DbConfig) -> Result<Connector> {
        let tls = match cfg.tls {
            DbTls::Disable => None,
            DbTls::VerifyFull => Some(MakeRustlsConnect::new(tls_config(cfg)?)),
        };
        Ok(Connector { tls, options: String::new() })
    }

    /// [`Connector::new`] for the pool: its connections carry the configured timeouts.
    fn for_pool(cfg: &DbConfig) -> Result<Connector> {
        let mut c = Connector::new(cfg)?;
        // Custom plans: the hot tables are a queue (`outbox`, thousands of rows in and out per second, its statistics
        // never describe it) or grow from empty on a new database (`notification`, `processed_event` …). A generic
        // plan made while a table looked empty (a sequential scan) stays cached on the connection until the next
        // ANALYZE; in `bench e2e` on a fresh database that cost PostgreSQL 1.7–2.1 ms of CPU per payment instead of
        // 0.9, and which run got it was luck. A custom plan sees the table's current size; planning these short
        // statements costs less than the noise of that benchmark.
        c.options = format!(
            "-c plan_cache_mode=force_custom_plan -c statement_timeout={} -c lock_timeout={}",
            cfg.statement_timeout.as_millis(),
            cfg.lock_timeout.as_millis()
        );
        Ok(c)
    }

    async fn establish(&self, url: &str) -> diesel::ConnectionResult<AsyncPgConnection> {
        if self.tls.is_none() && self.options.is_empty() {
            return AsyncPgConnection::establish(url).await;
        }
        let Some(tls) = &self.tls else {
            let mut config: tokio_postgres::Config =
                url.parse().map_err(|e: tokio_postgres::Error| ConnectionError::BadConnection(e.to_string()))?;
            config.options(&self.options);
            let (client, connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| ConnectionError::BadConnection(e.to_string()))?;
            return AsyncPgConnection::try_from_client_and_connection(client, connection).await;
        };
        // tokio-postgres keeps the cause (which certificate check failed) in the source chain, not in Display.
        let bad = |e: tokio_postgres::Error| {
            let mut msg = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                msg = format!("{msg}: {c}");
                cause = c.source();
            }
            ConnectionError::BadConnection(msg)
        };
        let mut config: tokio_postgres::Config = url.parse().map_err(bad)?;
        // TLS or nothing: libpq's default ("prefer") would fall back to plain text.
        config.ssl_mode(tokio_postgres::config::SslMode::Require);
        if !self.options.is_empty() {
            config.options(&self.options);
        }
        let (client, connection) = config.connect(tls.clone()).await.map_err(bad)?;
        AsyncPgConnection::try_from_client_and_connection(client, connection).await
    }
}

/// rustls with aws-lc-rs (the provider reqwest and async-nats use here), trusting `ca_file` or the system's roots.
fn tls_config(cfg: &DbConfig) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let bad = |what: String| StorageError::Unavailable(format!("database TLS: {what}"));
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect())
                    .map_err(|e| bad(format!("database.ca_file {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(bad(format!("database.ca_file {} holds no certificate", path.display())));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| bad(format!("database.ca_file {}: {e}", path.display())))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err(bad("no trusted roots on this system: set database.ca_file".into()));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Builds the pool. Connections are made lazily, so this succeeds even while Postgres is still starting.
pub fn pool(cfg: &DbConfig) -> Result<PgPool> {
    let connector = Connector::for_pool(cfg)?;
    let mut setup = ManagerConfig::default();
    // No `SELECT 1` per checkout (diesel-async's default `Verified` costs a round trip on every borrow, about a
    // dozen per payment). A connection whose socket closed is still dropped on return (`is_broken` checks it); one
    // that died unnoticed fails its first statement with a transient error, which callers retry.
    setup.recycling_method = RecyclingMethod::Fast;
    setup.custom_setup = Box::new(move |url| {
        let connector = connector.clone();
        let url = url.to_owned();
        Box::pin(async move { connector.establish(&url).await })
    });
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(cfg.url.expose_secret(), setup);
    deadpool::Pool::builder(manager)
        .max_size(cfg.pool_size)
        .wait_timeout(Some(cfg.acquire_timeout))
        .create_timeout(Some(cfg.acquire_timeout))
        .runtime(::deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| StorageError::Unavailable(e.to_string()))
}

/// A connection made by the pool (same TLS) and detached from it for good: for a session that must outlive a pooled
/// borrow, such as LISTEN. The pool makes a new one in its place.
pub async fn detach(pool: &PgPool) -> Result<AsyncPgConnection> {
    Ok(deadpool::Object::take(pool.get().await?))
}

/// One connection outside any pool (migrations, tools), with the configured TLS.
pub async fn connect(cfg: &DbConfig) -> Result<AsyncPgConnection> {
    Connector::new(cfg)?.establish(cfg.url.expose_secret()).await.map_err(|e| StorageError::Unavailable(e.to_string()))
}

/// Applies the embedded migrations that are not applied yet; returns how many ran. Safe to run from several
/// processes at once: diesel takes a lock on its bookkeeping table. Needs the multi-threaded tokio runtime.
pub async fn migrate(cfg: &DbConfig) -> Result<usize> {
    let conn = connect(cfg).await?;
    let mut harness = AsyncMigrationHarness::new(conn);
    let applied = tokio::task::block_in_place(|| harness.run_pending_migrations(MIGRATIONS).map(|v| v.len()))
        .map_err(|e| StorageError::Migration(e.to_string()))?;
    Ok(applied)
}
