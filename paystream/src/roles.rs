//! The roles a `paystream` process can play. Each has the same shape: connect, provision, run until the shutdown
//! token fires, then drain. `paystream all` runs several under one token.

use std::sync::Arc;

use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::{admin, config::Config};

/// Connections every role needs.
pub struct Infra {
    pub pool: storage::PgPool,
    pub client: async_nats::Client,
    pub publisher: bus::Publisher,
}

impl Infra {
    /// Connects to Postgres and NATS and creates or updates the streams (idempotent).
    pub async fn connect(cfg: &Config) -> anyhow::Result<Infra> {
        let pool = storage::pool(&cfg.database)?;
        let (client, js) = bus::connect(&cfg.nats).await?;
        let topology = Arc::new(cfg.nats.topology());
        topology.ensure_streams(&js).await?;
        bus::metrics::register();
        Ok(Infra { pool, client, publisher: bus::Publisher::new(js, topology) })
    }

    pub fn readiness(&self) -> admin::Readiness {
        admin::Readiness {
            pool: self.pool.clone(),
            client: self.client.clone(),
            js: self.publisher.jetstream().clone(),
            topology: Arc::new(self.publisher.topology().clone()),
        }
    }

    pub fn relay(&self, cfg: &Config) -> bus::Relay {
        bus::Relay::new(self.pool.clone(), cfg.database.url.clone(), self.publisher.clone(), cfg.outbox.clone())
    }
}

/// `paystream migrate`.
pub async fn migrate(cfg: &Config) -> anyhow::Result<()> {
    let applied = storage::migrate(cfg.database.url.expose_secret()).await?;
    tracing::info!(applied, "migrations up to date");
    println!("migrations up to date ({applied} applied now)");
    Ok(())
}

/// `paystream relay`: the outbox relay alone (run several for availability; they share the work).
pub async fn relay(cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let infra = Infra::connect(cfg).await?;
    let (addr, admin) = admin::serve(cfg.admin.listen, infra.readiness(), shutdown.clone()).await?;
    tracing::info!(%addr, "relay started; admin endpoints up");
    infra.relay(cfg).run(shutdown).await;
    let _ = admin.await;
    Ok(())
}

/// `paystream all`: every role in one process, for development and the demo. Today: migrations, streams, the
/// outbox relay and the admin endpoints; the ingress, processors and notifier join as they are built.
pub async fn all(cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    storage::migrate(cfg.database.url.expose_secret()).await?;
    let infra = Infra::connect(cfg).await?;
    let (addr, admin) = admin::serve(cfg.admin.listen, infra.readiness(), shutdown.clone()).await?;
    println!("paystream all: admin on http://{addr} (healthz, readyz, metrics)");
    tracing::info!(%addr, "all roles started");
    let relay = tokio::spawn(infra.relay(cfg).run(shutdown.clone()));
    shutdown.cancelled().await;
    let _ = relay.await;
    let _ = admin.await;
    Ok(())
}
