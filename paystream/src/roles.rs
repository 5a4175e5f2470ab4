//! The roles a `paystream` process can play. Each has the same shape: connect, provision, run until the shutdown
//! token fires, then drain. `paystream all` runs several under one token.

use std::sync::Arc;

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
        wechat::metrics::register();
        bus::dlq::track_depth_of(&consumers(true));
        Ok(Infra { pool, client, publisher: bus::Publisher::new(js, topology) })
    }

    /// Readiness of a role that runs `consumers`.
    pub fn readiness(&self, consumers: &[&str]) -> admin::Readiness {
        admin::Readiness {
            pool: self.pool.clone(),
            client: self.client.clone(),
            js: self.publisher.jetstream().clone(),
            topology: Arc::new(self.publisher.topology().clone()),
            consumers: consumers.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    pub fn relay(&self, cfg: &Config) -> bus::Relay {
        bus::Relay::new(self.pool.clone(), self.publisher.clone(), cfg.outbox.clone())
    }
}

/// The ingress's dependencies from the configuration: needs `[http]` and `[wechat]`.
fn ingress_deps(cfg: &Config, infra: &Infra) -> anyhow::Result<ingress::Deps> {
    let http =
        cfg.http.clone().ok_or_else(|| anyhow::anyhow!("the ingress needs the [http] section (listen, jwt_secret)"))?;
    let wechat = cfg.wechat.clone().ok_or_else(|| anyhow::anyhow!("the ingress needs the [wechat] section"))?;
    Ok(ingress::Deps {
        pool: infra.pool.clone(),
        publisher: infra.publisher.clone(),
        pay: wechat::PayClient::from_config(&wechat)?,
        mini: wechat::MiniProgramClient::from_config(&wechat)?,
        wechat,
        config: http,
    })
}

fn spawn_ingress(
    cfg: &Config,
    infra: &Infra,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let deps = ingress_deps(cfg, infra)?;
    Ok(tokio::spawn(async move { Ok(ingress::serve(deps, listener, shutdown).await?) }))
}

async fn bind_http(cfg: &Config) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = cfg.http.as_ref().ok_or_else(|| anyhow::anyhow!("the ingress needs the [http] section"))?.listen;
    tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on http.listen {addr}: {e}"))
}

/// `paystream ingress`: the HTTP API (seeds demo homestays into an empty database unless configured not to).
pub async fn ingress(cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let infra = Infra::connect(cfg).await?;
    if cfg.http.as_ref().is_some_and(|h| h.seed_demo_homestays) {
        ingress::seed(&mut *infra.pool.get().await?).await?;
    }
    let listener = bind_http(cfg).await?;
    let (addr, admin) = admin::serve(cfg.admin.listen, infra.readiness(&[]), shutdown.clone()).await?;
    tracing::info!(api = %listener.local_addr()?, admin = %addr, "ingress started");
    let result = spawn_ingress(cfg, &infra, listener, shutdown.clone())?.await?;
    shutdown.cancel();
    let _ = admin.await;
    result
}

fn spawn_notifier(
    cfg: &Config,
    infra: &Infra,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let config = cfg.notifier.clone().ok_or_else(|| anyhow::anyhow!("the notifier needs the [notifier] section"))?;
    let wechat = cfg.wechat.as_ref().ok_or_else(|| anyhow::anyhow!("the notifier needs the [wechat] section"))?;
    let deps = notifier::NotifierDeps {
        config,
        consumer: cfg.consumer.clone(),
        pool: infra.pool.clone(),
        publisher: infra.publisher.clone(),
        miniprogram: wechat::MiniProgramClient::from_config(wechat)?,
        sms: cfg.sms.as_ref().map(wechat::SmsClient::from_config).transpose()?,
    };
    // Validates and logs the environment before anything runs.
    let notifier = notifier::Notifier::new(deps)?;
    Ok(tokio::spawn(async move { Ok(notifier.run(shutdown).await?) }))
}

/// `paystream notifier`: subscribe messages and SMS.
pub async fn notifier(cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let infra = Infra::connect(cfg).await?;
    let task = spawn_notifier(cfg, &infra, shutdown.clone())?;
    let (addr, admin) = admin::serve(cfg.admin.listen, infra.readiness(&notifier::CONSUMERS), shutdown.clone()).await?;
    tracing::info!(admin = %addr, "notifier started");
    let result = task.await?;
    shutdown.cancel();
    let _ = admin.await;
    result
}

/// `paystream migrate`.
pub async fn migrate(cfg: &Config) -> anyhow::Result<()> {
    let applied = storage::migrate(&cfg.database).await?;
    tracing::info!(applied, "migrations up to date");
    println!("migrations up to date ({applied} applied now)");
    Ok(())
}

/// `paystream relay`: the outbox relay alone (run several for availability; they share the work).
pub async fn relay(cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let infra = Infra::connect(cfg).await?;
    let (addr, admin) = admin::serve(cfg.admin.listen, infra.readiness(&[]), shutdown.clone()).await?;
    tracing::info!(%addr, "relay started; admin endpoints up");
    infra.relay(cfg).run(shutdown).await;
    let _ = admin.await;
    Ok(())
}

/// The processors `paystream processor NAME` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Processor {
    /// `wechat.transaction` → payment status.
    Payment,
    /// `payment.status` → order state and notification requests.
    Order,
    /// Closes unpaid orders past their deadline (WeChat first), asks WeChat about payments still waiting, and
    /// refunds: `refund.requested` → WeChat's refund API, `wechat.refund` → refund, payment and order state, and
    /// queries about refunds WeChat has not settled.
    Lifecycle,
}

impl Processor {
    /// Its word on the command line (`processor payment`).
    pub fn word(self) -> &'static str {
        match self {
            Processor::Payment => "payment",
            Processor::Order => "order",
            Processor::Lifecycle => "lifecycle",
        }
    }

    /// The durable consumers this processor runs.
    fn consumers(self) -> &'static [&'static str] {
        match self {
            Processor::Payment => &[processors::PAYMENT_CONSUMER],
            Processor::Order => &[processors::ORDER_CONSUMER],
            Processor::Lifecycle => &[processors::refund::REQUEST_CONSUMER, processors::refund::STATUS_CONSUMER],
        }
    }
}

/// The durable consumers of the processors, and of the notifier when `with_notifier`.
fn consumers(with_notifier: bool) -> Vec<&'static str> {
    let mut c: Vec<&'static str> = [Processor::Payment, Processor::Order, Processor::Lifecycle]
        .iter()
        .flat_map(|p| p.consumers())
        .copied()
        .collect();
    if with_notifier {
        c.extend(notifier::CONSUMERS);
    }
    c
}

fn spawn_processor(
    which: Processor,
    cfg: &Config,
    infra: &Infra,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let (publisher, pool, consumer) = (infra.publisher.clone(), infra.pool.clone(), cfg.consumer.clone());
    Ok(match which {
        Processor::Payment => {
            let wechat = cfg.wechat.as_ref().ok_or_else(|| {
                anyhow::anyhow!("the payment processor needs the [wechat] section (appid and mchid to check reports)")
            })?;
            let (appid, mchid) = (wechat.appid.clone(), wechat.mchid.clone());
            tokio::spawn(async move {
                Ok(processors::run_payment(publisher, pool, &appid, &mchid, consumer, shutdown).await?)
            })
        }
        Processor::Order => {
            tokio::spawn(async move { Ok(processors::run_order(publisher, pool, consumer, shutdown).await?) })
        }
        Processor::Lifecycle => {
            let wechat = cfg.wechat.as_ref().ok_or_else(|| {
                anyhow::anyhow!("the lifecycle processor needs the [wechat] section (it closes and queries at WeChat)")
            })?;
            let pay = wechat::PayClient::from_config(wechat)?;
            let closer =
                processors::TimeoutCloser::new(pool.clone(), publisher.clone(), pay.clone(), cfg.timeout.clone());
            let reconciler =
                processors::Reconciler::new(pool.clone(), publisher.clone(), pay.clone(), cfg.reconcile.clone());
            let refunds =
                processors::RefundReconciler::new(pool.clone(), publisher.clone(), pay.clone(), cfg.refund.clone());
            let mchid = wechat.mchid.clone();
            // A consumed key can come back while its event is in a stream (redelivery, replay): keep it a day longer.
            let retention = cfg.nats.max_age + std::time::Duration::from_secs(86_400);
            let prune_pool = pool.clone();
            tokio::spawn(async move {
                // A consumer that cannot run stops the whole role (the caller then stops the process), rather than
                // leaving the closer running without its refunds.
                let stop = shutdown.child_token();
                let failed = |r: Result<(), bus::BusError>| {
                    if r.is_err() {
                        stop.cancel();
                    }
                    r
                };
                let (p2, pool2, c2) = (publisher.clone(), pool.clone(), consumer.clone());
                let (requests, status, ..) = tokio::join!(
                    async { failed(processors::run_refund_requests(p2, pool2, pay, c2, stop.clone()).await) },
                    async {
                        failed(processors::run_refund_status(publisher, pool, &mchid, consumer, stop.clone()).await)
                    },
                    closer.run(stop.clone()),
                    reconciler.run(stop.clone()),
                    refunds.run(stop.clone()),
                    processors::prune_processed(prune_pool, retention, stop.clone()),
                );
                requests?;
                status?;
                Ok(())
            })
        }
    })
}

/// `paystream processor NAME`: one processor, with the outbox relay (a processor's events must leave the outbox
/// even when no other role runs; relays share the work, so running one per processor is safe).
pub async fn processor(which: Processor, cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let infra = Infra::connect(cfg).await?;
    let (addr, admin) = admin::serve(cfg.admin.listen, infra.readiness(which.consumers()), shutdown.clone()).await?;
    tracing::info!(%addr, processor = ?which, "processor started");
    let relay = tokio::spawn(infra.relay(cfg).run(shutdown.clone()));
    let task = spawn_processor(which, cfg, &infra, shutdown.clone())?;
    let result = task.await?;
    shutdown.cancel();
    let _ = relay.await;
    let _ = admin.await;
    result
}

/// `paystream all`: every role in one process, for development and the demo: migrations, streams, the outbox
/// relay, the processors (payment, order, lifecycle), the ingress (when `[http]` is configured), the notifier (when `[notifier]` is) and the
/// admin endpoints.
pub async fn all(cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    storage::migrate(&cfg.database).await?;
    let infra = Infra::connect(cfg).await?;
    processors::register_metrics();
    // Bind the API before the admin port, so that `/readyz` answering means the API accepts connections too.
    let http = match &cfg.http {
        Some(_) => {
            if cfg.http.as_ref().is_some_and(|h| h.seed_demo_homestays) {
                ingress::seed(&mut *infra.pool.get().await?).await?;
            }
            Some(bind_http(cfg).await?)
        }
        None => None,
    };
    let (addr, admin) =
        admin::serve(cfg.admin.listen, infra.readiness(&consumers(cfg.notifier.is_some())), shutdown.clone()).await?;
    let mut tasks = vec![tokio::spawn({
        let relay = infra.relay(cfg);
        let s = shutdown.clone();
        async move {
            relay.run(s).await;
            anyhow::Ok(())
        }
    })];
    for p in [Processor::Payment, Processor::Order, Processor::Lifecycle] {
        tasks.push(spawn_processor(p, cfg, &infra, shutdown.clone())?);
    }
    if cfg.notifier.is_some() {
        tasks.push(spawn_notifier(cfg, &infra, shutdown.clone())?);
    } else {
        tracing::warn!(
            "no [notifier] section: running without the notifier (notification requests wait in the stream)"
        );
    }
    let mut api = String::new();
    if let Some(listener) = http {
        api = format!(", API on http://{}", listener.local_addr()?);
        tasks.push(spawn_ingress(cfg, &infra, listener, shutdown.clone())?);
    } else {
        tracing::warn!("no [http] section: running without the ingress");
    }
    println!("paystream all: admin on http://{addr} (healthz, readyz, metrics){api}");
    tracing::info!(%addr, "all roles started");
    // If any role fails, stop the others: a half-running process would look healthy and do nothing.
    let mut first_error = None;
    let (result, _, rest) = futures::future::select_all(tasks).await;
    if let Err(e) = result.map_err(anyhow::Error::from).and_then(|r| r) {
        tracing::error!(error = %e, "a role failed; stopping the others");
        first_error = Some(e);
    }
    shutdown.cancel();
    for t in rest {
        let _ = t.await;
    }
    let _ = admin.await;
    first_error.map_or(Ok(()), Err)
}
