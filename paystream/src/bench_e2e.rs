//! `paystream bench e2e`: payments end to end at fixed offered rates, WeChat's callback → order paid → both
//! notifications delivered, on a whole system this command starts for itself (DESIGN.md §10, issue 13).
//!
//! Per offered rate it measures:
//! - **callback → paid**: from the instant the benchmark sends WeChat's `TRANSACTION.SUCCESS` callback to the
//!   instant `<prefix>.order.status` announces the order's waitPay → waitUse commit (a core NATS subscription: the
//!   event leaves the outbox only after the commit);
//! - **callback → notified**: to the later of the order's two subscribe messages (pay success, check-in) as the
//!   WeChat sandbox recorded them (`at`, millisecond precision);
//! - the achieved rates (callbacks answered 204 per second, orders paid per second), lost and duplicated payments
//!   (also checked in the database and at the sandbox), CPU-seconds per payment of every process involved
//!   (`/proc/<pid>/stat` over the window) and resident memory per role;
//! - beside them, references from the same run and servers: a raw JetStream publish (PubAck) → pull → ack round
//!   trip, and raw PostgreSQL transactions of the pipeline's shape (conditional UPDATE + INSERT, 8 clients).
//!
//! **Open loop**: callback *i* is sent at t0 + i/rate whatever happened to the ones before it, so a slow system
//! cannot slow its own load. A closed loop of users waits for answers and offers less exactly when the system
//! struggles, which hides the queueing a real WeChat (which does not wait) would cause. Everything that is not the
//! pipeline's work happens before the timed window: users, orders and prepays through the real HTTP API, and
//! WeChat's side of each callback, built and encrypted ahead and RSA-signed on every core right before its window
//! (WeChat's timestamp is good for five minutes). The first `--warmup` seconds of each window are sent but not
//! counted. The reconciler's schedule is moved past the run: it would otherwise ask WeChat about every payment
//! prepared a minute before its callback, which only a benchmark does; it still runs its passes.
//!
//! The system: the WeChat sandbox and paystream (one process per role with `--roles split`, or `paystream all`)
//! run as child processes of this binary, on a database and a NATS prefix of their own on the configured servers;
//! they are stopped and removed at the end, on failure too. `--roles-bin PATH` runs the roles and the migrations
//! with another paystream binary (an older build, for a baseline measured by this same benchmark); the sandbox and
//! the load stay this one. `--fsync on|both` switches PostgreSQL's durability (fsync, synchronous_commit,
//! full_page_writes) with `ALTER SYSTEM` and a reload, and restores it afterwards, which works only when the server
//! does not take those settings from its command line (scripts/infra.sh keeps them in postgresql.conf).

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use bus::events::OrderStatusChanged;
use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Nullable, SmallInt, Text};
use futures::StreamExt as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use secrecy::ExposeSecret as _;
use serde_json::{Value, json};
use storage::{AsyncConnection as _, DbConfig};

use crate::config::Config;

/// The notifier as the system tests configure it: formal (the sandbox is WeChat here), no SMS templates.
const NOTIFIER: &str = r#"
[notifier]
miniprogram_state = "formal"

[notifier.templates.pay_success]
template_id = "TPL_PAY_SUCCESS"
page = "pages/order/detail?sn={order_sn}"
fields = { character_string6 = "order_sn", thing1 = "title", amount2 = "amount", time4 = "live_start", time5 = "live_end" }

[notifier.templates.checkin_notice]
template_id = "TPL_CHECKIN"
page = "pages/order/detail?sn={order_sn}"
fields = { thing1 = "title", date2 = "live_period", character_string3 = "trade_code", number4 = "live_people_num" }

[notifier.templates.refund_success]
template_id = "TPL_REFUND"
page = "pages/order/detail?sn={order_sn}"
fields = { character_string1 = "order_sn", thing2 = "title", amount3 = "amount" }

# The benchmark prepares every payment minutes before its callback; with the default schedule the reconciler
# would ask WeChat about each of them (only a benchmark leaves payments waiting like that).
[reconcile]
schedule = ["6h"]
"#;

/// The two messages each paid order yields (the templates of [`NOTIFIER`]).
const TEMPLATES: [&str; 2] = ["TPL_PAY_SUCCESS", "TPL_CHECKIN"];
/// Orders per mini-program user.
const ORDERS_PER_USER: usize = 20;
/// A rate qualifies as sustained with callback → paid p99 at most this…
const TARGET_P99_MS: f64 = 50.0;
/// …and at least this share of the offered rate achieved.
const TARGET_ACHIEVED: f64 = 0.99;
/// WeChat waits this long for an answer to a callback.
pub(crate) const CALLBACK_TIMEOUT: Duration = Duration::from_secs(5);
/// A signature older than this when sent would be refused (WeChat's limit is 300 s): a margin for clock reads.
pub(crate) const MAX_SIGNATURE_AGE_SECS: i64 = 290;

pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Debug, clap::Args)]
pub struct E2eArgs {
    /// Offered rates in payments per second, run one after the other.
    #[arg(long, value_delimiter = ',', default_value = "250,500,1000,1500")]
    rates: Vec<u32>,
    /// The counted part of each rate's window.
    #[arg(long, default_value = "30s", value_parser = duration)]
    duration: Duration,
    /// Sent at the rate before the counted part, and not counted.
    #[arg(long, default_value = "5s", value_parser = duration)]
    warmup: Duration,
    /// PostgreSQL durability: off (the private test cluster's), on (production), or both, one after the other.
    #[arg(long, value_enum, default_value_t = Fsync::Off)]
    fsync: Fsync,
    /// One process per role (ingress, processor payment / order / lifecycle, notifier), or one `paystream all`.
    #[arg(long, value_enum, default_value_t = Roles::Split)]
    roles: Roles,
    /// How long to wait after a window for every payment to be paid and notified.
    #[arg(long, default_value = "60s", value_parser = duration)]
    drain: Duration,
    /// Payments prepared through the API at once (users in flight).
    #[arg(long, default_value_t = 32)]
    prepare_concurrency: usize,
    /// nats-server's pid, for its CPU (default: `.run/nats.pid` here or in a parent directory).
    #[arg(long)]
    nats_pid: Option<u32>,
    /// PostgreSQL's postmaster pid, for its CPU (default: the first line of `.run/pg/data/postmaster.pid`).
    #[arg(long)]
    pg_pid: Option<u32>,
    /// The paystream binary that runs the roles and the migrations (`PATH migrate`), e.g. an older build for a
    /// baseline; the sandbox and the benchmark itself stay this binary. Its configuration uses only keys that
    /// every version since 33f7810 knows.
    #[arg(long, value_name = "PATH")]
    roles_bin: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Fsync {
    Off,
    On,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Roles {
    Split,
    All,
}

pub async fn run(cfg: &Config, args: E2eArgs) -> anyhow::Result<()> {
    ensure!(!args.rates.is_empty() && args.rates.iter().all(|r| *r > 0), "--rates needs rates above 0");
    ensure!(!args.duration.is_zero(), "--duration must be above 0");
    guarded("bench e2e", async |cleanup| bench(cfg, &args, cleanup).await).await
}

/// Runs a benchmark that starts processes and makes databases and streams: interrupted (Ctrl-C, SIGTERM) or
/// failed, it still stops its processes and removes what it made; the processes' logs are kept when it failed.
pub(crate) async fn guarded(
    what: &str,
    body: impl AsyncFnOnce(&mut Cleanup) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut cleanup = Cleanup::default();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        r = body(&mut cleanup) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        _ = terminate.recv() => Err(anyhow!("terminated")),
    };
    let released = cleanup.finish().await;
    if let Err(e) = &released {
        eprintln!("{what}: cleaning up: {e:#}");
    }
    if result.is_err()
        && let Some(dir) = &cleanup.dir
    {
        eprintln!("{what}: the processes' logs are kept in {}", dir.display());
    } else if let Some(dir) = cleanup.dir.take() {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

/// Everything the run needs after start-up.
struct Ctx<'a> {
    args: &'a E2eArgs,
    tag: String,
    db: DbConfig,
    system: System,
    api: Arc<Api>,
    homestay: i64,
    signer: Arc<sandbox::CallbackSigner>,
    observer: Observer,
    messages: Mutex<Messages>,
    procs: Vec<Measured>,
    clock: Clock,
    clk_tck: f64,
    cores: usize,
    /// Preparations so far: each makes users of its own (a WeChat login code is good once, and a rate may run
    /// again in another durability mode).
    rounds: std::sync::atomic::AtomicUsize,
}

async fn bench(cfg: &Config, args: &E2eArgs, cleanup: &mut Cleanup) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let clk_tck = clock_ticks();
    let modes: Vec<bool> = match args.fsync {
        Fsync::Off => vec![false],
        Fsync::On => vec![true],
        Fsync::Both => vec![false, true],
    };

    // Fails before anything starts if the server cannot be put in the modes asked for.
    let admin = admin_database(&cfg.database).await?;
    for on in &modes {
        durability_settable(&admin, *on).await?;
    }
    let most = args.rates.iter().map(|r| payments_at(*r, args)).max().unwrap_or(0);
    let roles: Vec<(&str, &[&str])> = match args.roles {
        Roles::Split => vec![
            ("ingress", &["ingress"]),
            ("payment", &["processor", "payment"]),
            ("order", &["processor", "order"]),
            ("lifecycle", &["processor", "lifecycle"]),
            ("notifier", &["notifier"]),
        ],
        Roles::All => vec![("all", &["all"])],
    };
    let bed = Bed::start(
        cfg,
        &BedSpec { name: "e2e", roles_bin: args.roles_bin.as_deref(), roles: &roles, config: NOTIFIER, records: most },
        cleanup,
    )
    .await?;
    let Bed { admin, db, db_name, nats, tag, system } = bed;

    let (client, js) = bus::connect(&nats).await?;
    let observer = Observer::start(&client, &nats.prefix).await?;
    let homestay = first_homestay(&db).await?;
    let identity = sandbox::Identity::load(&system.sandbox_dir).context("loading the sandbox's identity")?;
    let procs = measured_processes(&system, &db_name, args.nats_pid, args.pg_pid);
    let ctx = Ctx {
        args,
        api: Arc::new(Api::new(&system.api)?),
        tag,
        db,
        homestay,
        signer: Arc::new(sandbox::CallbackSigner::new(&identity)?),
        observer,
        messages: Mutex::new(Messages::default()),
        procs,
        clock: Clock::now(),
        clk_tck,
        cores,
        rounds: Default::default(),
        system,
    };

    let pg_host = reqwest::Url::parse(admin.url.expose_secret())
        .ok()
        .map(|u| format!("{}:{}", u.host_str().unwrap_or("?"), u.port().unwrap_or(5432)))
        .unwrap_or_default();
    println!(
        "bench e2e: open loop at {} payments/s, {} counted after a {} warm-up each; roles {}; {cores} cores",
        args.rates.iter().map(u32::to_string).collect::<Vec<_>>().join(", "),
        humantime_serde::re::humantime::format_duration(args.duration),
        humantime_serde::re::humantime::format_duration(args.warmup),
        match args.roles {
            Roles::Split => "split (one process each)",
            Roles::All => "all (one process)",
        },
    );
    println!("  PostgreSQL {pg_host}, database {db_name}; NATS {}, prefix {}", nats.url, nats.prefix);
    println!("  roles run by {}", ctx.system.roles_bin);
    println!(
        "  processes: {}",
        ctx.procs.iter().map(|p| format!("{} {}", p.name, p.describe())).collect::<Vec<_>>().join(", ")
    );
    println!("  RSS idle: {}", rss_line(&ctx, "VmRSS"));

    let jetstream = jetstream_reference(&nats, &js).await?;
    println!(
        "  reference, raw JetStream publish (PubAck) → pull → ack, 8 publishers: {:.0} events/s, p50 {:.2} ms, p99 {:.2} ms",
        jetstream.per_second, jetstream.p50_ms, jetstream.p99_ms
    );

    let mut reports = Vec::new();
    for on in modes {
        let how = if set_durability(&admin, on, cleanup).await? { "set with ALTER SYSTEM" } else { "as the server is" };
        let mode = if on { "fsync=on" } else { "fsync=off" };
        // Each mode starts from a clean checkpoint: otherwise the first minutes of fsync=on pay for what the fsync=off
        // runs left dirty (a checkpoint forced by their WAL, writing and syncing all of it during the first window).
        let checkpoint = checkpoint(&admin).await;
        let pg = pg_reference(&ctx.db, 8, Duration::from_secs(3)).await?;
        println!();
        println!("PostgreSQL {mode}, synchronous_commit={0}, full_page_writes={0} ({how})", wanted(on));
        match checkpoint {
            Ok(took) => println!("  CHECKPOINT before this mode's runs: {:.1} s", took.as_secs_f64()),
            Err(e) => {
                println!("  no CHECKPOINT before this mode's runs ({e:#}): its first window may pay for the last")
            }
        }
        println!("  reference, raw PostgreSQL conditional UPDATE + INSERT per transaction, 8 clients: {pg:.0} tx/s");
        let mut results = Vec::new();
        for rate in &args.rates {
            let r = run_rate(&ctx, *rate).await?;
            r.print(&ctx, pg, &jetstream);
            results.push(r);
        }
        // Back to the server's own settings as soon as this mode is measured.
        restore_durability(&admin, cleanup).await?;
        reports.push((mode, pg, results));
    }

    println!();
    for (mode, pg, results) in &reports {
        print_summary(mode, *pg, results);
    }
    // One line per mode, fsync=on's above, fsync=off's (the default) last, in the exact form scripts read.
    for (mode, _, results) in reports.iter().rev() {
        let prefix = if *mode == "fsync=off" { "bench e2e".to_owned() } else { format!("bench e2e ({mode})") };
        println!("{}", headline(&prefix, results));
    }
    drop(client);
    let failed = reports.iter().flat_map(|r| &r.2).any(|r| r.lost + r.duplicated > 0);
    ensure!(!failed, "payments were lost or duplicated (see above)");
    Ok(())
}

fn payments_at(rate: u32, args: &E2eArgs) -> usize {
    ((f64::from(rate) * (args.warmup + args.duration).as_secs_f64()).round() as usize).max(1)
}

// ---------------------------------------------------------------------------------------------------------------
// One offered rate.

/// A prepared payment: its order and WeChat's callback for its payment.
pub(crate) struct Prepared {
    pub(crate) order_sn: String,
    pub(crate) body: Vec<u8>,
}

/// One callback as sent.
struct Sent {
    sent: Instant,
    answered: Instant,
    /// The HTTP status, or the transport error.
    status: Result<u16, String>,
}

impl Sent {
    /// Answered 204: the ingress stored it.
    fn accepted(&self) -> bool {
        matches!(self.status, Ok(204))
    }

    /// Ok, or what went wrong (`HTTP 503`, `timeout`, …).
    fn outcome(&self) -> Result<(), String> {
        match &self.status {
            Ok(204) => Ok(()),
            Ok(code) => Err(format!("HTTP {code}")),
            Err(e) => Err(e.clone()),
        }
    }
}

struct RateResult {
    rate: u32,
    prepared_per_second: f64,
    counted: usize,
    answered_per_second: f64,
    paid_per_second: f64,
    errors: Vec<(String, usize)>,
    send_lag_p99_ms: f64,
    paid: Quantiles,
    notified: Quantiles,
    lost: usize,
    duplicated: usize,
    problems: Vec<String>,
    /// (process, CPU ms per payment paid during the counted window).
    cpu: Vec<(String, Option<f64>)>,
    cpu_total_ms: f64,
    cpu_percent: f64,
    peak_rss: String,
}

async fn run_rate(ctx: &Ctx<'_>, rate: u32) -> anyhow::Result<RateResult> {
    let n = payments_at(rate, ctx.args);
    let warm = ((f64::from(rate) * ctx.args.warmup.as_secs_f64()).round() as usize).min(n - 1);
    println!();
    println!("rate {rate}/s: {n} payments ({warm} in the warm-up)");

    // (a) Users, orders and prepays through the API.
    let started = Instant::now();
    let walks = prepare(ctx, rate, n).await?;
    let prepared_per_second = n as f64 / started.elapsed().as_secs_f64();
    eprintln!("  prepared {n} payments in {:.1} s ({prepared_per_second:.0}/s)", started.elapsed().as_secs_f64());

    // (b) WeChat's callbacks: built from the payments as stored, then signed on every core.
    let details = payment_details(&ctx.db, &walks.iter().map(|w| w.1.clone()).collect::<Vec<_>>()).await?;
    let mut payments = Vec::with_capacity(n);
    for (order_sn, pay_sn) in walks {
        let d = details.get(&pay_sn).with_context(|| format!("payment {pay_sn} is not in the database"))?;
        payments.push(Prepared { body: ctx.signer.transaction_success(&pay_sn, d.pay_total, &d.openid), order_sn });
    }
    let signing = Instant::now();
    let (payments, headers) = sign_all(ctx.signer.clone(), payments, ctx.cores).await?;
    eprintln!("  signed {n} callbacks on {} threads in {:.1} s", ctx.cores, signing.elapsed().as_secs_f64());

    // (c) The window, with the CPU sampled at the end of the warm-up and at the end of the window.
    let window = Window::starting_now(rate, n, warm);
    window.check_signature_age(&headers)?;
    let sampler = {
        let (procs, window) = (ctx.procs.clone(), window.clone());
        tokio::spawn(async move {
            let sample = || (Instant::now(), procs.iter().map(Measured::cpu_ticks).collect::<Vec<_>>());
            tokio::time::sleep_until(window.counted_from.into()).await;
            let first = sample();
            tokio::time::sleep_until(window.end.into()).await;
            (first, sample())
        })
    };
    let sent = send_open_loop(&ctx.system.callback_url, headers, &payments, &window).await?;
    let cpu = sampler.await?;

    // (d) Until every acknowledged payment is paid and notified, or the drain deadline.
    let accepted: Vec<&str> =
        payments.iter().zip(&sent).filter(|(_, s)| s.accepted()).map(|(p, _)| p.order_sn.as_str()).collect();
    let deadline = Instant::now() + ctx.args.drain;
    loop {
        ctx.fetch_messages().await?;
        let paid = ctx.observer.paid_count(accepted.iter().copied());
        let notified = ctx.notified_count(accepted.iter().copied());
        if paid == accepted.len() && notified == accepted.len() {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("  drain deadline: {paid} paid and {notified} notified of {} accepted", accepted.len());
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let orders: Vec<String> = payments.iter().map(|p| p.order_sn.clone()).collect();
    let evidence = Evidence {
        stored: stored_state(&ctx.db, &orders).await?,
        paid: ctx.observer.snapshot(&orders),
        delivered: ctx.delivered(&orders),
    };
    let mut result = analyse(ctx, &window, &payments, &sent, &evidence, cpu);
    result.prepared_per_second = prepared_per_second;
    Ok(result)
}

/// When each callback of one rate is due.
#[derive(Debug, Clone)]
struct Window {
    rate: u32,
    n: usize,
    /// Callbacks before this index are the warm-up.
    warm: usize,
    t0: Instant,
    /// 1 / rate, in seconds.
    spacing: f64,
    counted_from: Instant,
    end: Instant,
}

impl Window {
    fn starting_now(rate: u32, n: usize, warm: usize) -> Window {
        let t0 = Instant::now() + Duration::from_millis(100);
        let spacing = 1.0 / f64::from(rate);
        let at = |i: usize| t0 + Duration::from_secs_f64(i as f64 * spacing);
        Window { rate, n, warm, t0, spacing, counted_from: at(warm), end: at(n) }
    }

    /// When callback `i` is due.
    fn due(&self, i: usize) -> Instant {
        self.t0 + Duration::from_secs_f64(i as f64 * self.spacing)
    }

    /// Refuses to start a window whose callbacks would be too old for the receiver when they are due.
    fn check_signature_age(&self, headers: &[(HeaderMap, i64)]) -> anyhow::Result<()> {
        let lead = self.t0.saturating_duration_since(Instant::now()).as_secs_f64();
        let now = Utc::now().timestamp_millis() as f64 / 1e3 + lead;
        let oldest = headers.iter().enumerate().map(|(i, h)| now + i as f64 * self.spacing - h.1 as f64);
        let age = oldest.fold(0.0, f64::max);
        ensure!(
            age < MAX_SIGNATURE_AGE_SECS as f64,
            "signing {} callbacks ahead takes too long for their 5-minute timestamps (the oldest would be {age:.0} s \
             old when sent): shorten --duration or lower the rate",
            self.n
        );
        Ok(())
    }
}

/// What the system left behind for one rate's orders.
struct Evidence {
    /// As stored (the judge of paid).
    stored: HashMap<String, OrderRow>,
    /// The order.status waitUse events seen.
    paid: PaidEvents,
    /// The messages at WeChat.
    delivered: HashMap<String, Vec<(String, DateTime<Utc>)>>,
}

type CpuSamples = ((Instant, Vec<Option<u64>>), (Instant, Vec<Option<u64>>));

/// The figures of one rate: latencies and rates over the counted payments, lost and duplicated over all of them,
/// CPU over the counted window per payment paid in it.
fn analyse(
    ctx: &Ctx<'_>,
    window: &Window,
    payments: &[Prepared],
    sent: &[Sent],
    evidence: &Evidence,
    ((from, cpu_first), (to, cpu_last)): CpuSamples,
) -> RateResult {
    let mut result = RateResult {
        rate: window.rate,
        prepared_per_second: 0.0,
        counted: window.n - window.warm,
        answered_per_second: 0.0,
        paid_per_second: 0.0,
        errors: Vec::new(),
        send_lag_p99_ms: 0.0,
        paid: Quantiles::default(),
        notified: Quantiles::default(),
        lost: 0,
        duplicated: 0,
        problems: Vec::new(),
        cpu: Vec::new(),
        cpu_total_ms: 0.0,
        cpu_percent: 0.0,
        peak_rss: rss_line(ctx, "VmHWM"),
    };
    let mut errors: HashMap<String, usize> = HashMap::new();
    let (mut paid_ms, mut notified_ms, mut lags) = (Vec::new(), Vec::new(), Vec::new());
    let (mut answered, mut paid, mut paid_in_window) = (0, 0, 0);
    let (mut first_sent, mut last_answer, mut last_paid) = (None, None, None);
    for (i, (p, s)) in payments.iter().zip(sent).enumerate() {
        if let Err(kind) = s.outcome() {
            *errors.entry(kind).or_default() += 1;
        }
        let events = evidence.paid.get(&p.order_sn).map_or(&[][..], Vec::as_slice);
        let first_paid = events.iter().map(|(_, at)| *at).min();
        if first_paid.is_some_and(|at| at >= from && at <= to) {
            paid_in_window += 1;
        }
        let messages = evidence.delivered.get(&p.order_sn).map_or(&[][..], Vec::as_slice);
        let per_template = |t: &str| messages.iter().filter(|(tpl, _)| tpl == t).count();
        let notified_at =
            messages.iter().map(|(_, at)| *at).max().filter(|_| TEMPLATES.iter().all(|t| per_template(t) > 0));
        // Money first: the database is the judge of paid.
        let row = evidence.stored.get(&p.order_sn);
        let stored_paid = row.map_or(0, |r| r.paid);
        let paid_in_db = row.is_some_and(|r| r.trade_state == storage::TradeState::WaitUse.code()) && stored_paid > 0;
        if s.accepted() && !(paid_in_db && notified_at.is_some()) {
            result.lost += 1;
            result.problem(format!(
                "lost: order {} (paid in the database: {paid_in_db}, order.status seen: {}, messages: {})",
                p.order_sn,
                first_paid.is_some(),
                messages.len()
            ));
        }
        let mut ids: Vec<uuid::Uuid> = events.iter().map(|(id, _)| *id).collect();
        ids.sort();
        ids.dedup();
        if stored_paid > 1 || ids.len() > 1 || TEMPLATES.iter().any(|t| per_template(t) > 1) {
            result.duplicated += 1;
            result.problem(format!(
                "duplicated: order {} (paid payments {stored_paid}, distinct waitUse events {}, messages {})",
                p.order_sn,
                ids.len(),
                messages.len()
            ));
        }
        if i < window.warm {
            continue;
        }
        first_sent = Some(first_sent.map_or(s.sent, |f: Instant| f.min(s.sent)));
        lags.push(s.sent.saturating_duration_since(window.due(i)).as_secs_f64() * 1e3);
        if s.accepted() {
            answered += 1;
            last_answer = last_answer.max(Some(s.answered));
        }
        if let Some(at) = first_paid {
            paid += 1;
            last_paid = last_paid.max(Some(at));
            paid_ms.push(at.saturating_duration_since(s.sent).as_secs_f64() * 1e3);
        }
        if let Some(at) = notified_at {
            // The sandbox records milliseconds (truncated): up to 1 ms short.
            notified_ms.push(((at - ctx.clock.wall(s.sent)).num_microseconds().unwrap_or(0) as f64 / 1e3).max(0.0));
        }
    }
    // `count` events from the first counted send to the last event, plus one spacing: n sends at the rate span
    // n - 1 spacings.
    let per_second = |count: usize, until: Option<Instant>| match (first_sent, until) {
        (Some(a), Some(b)) if b > a => count as f64 / ((b - a).as_secs_f64() + window.spacing),
        _ => 0.0,
    };
    result.answered_per_second = per_second(answered, last_answer);
    result.paid_per_second = per_second(paid, last_paid);
    result.paid = Quantiles::of(paid_ms);
    result.notified = Quantiles::of(notified_ms);
    result.send_lag_p99_ms = Quantiles::of(lags).p99;
    result.errors = errors.into_iter().collect();
    result.errors.sort_by_key(|e| std::cmp::Reverse(e.1));

    let mut total_seconds = 0.0;
    for (p, (a, b)) in ctx.procs.iter().zip(cpu_first.iter().zip(&cpu_last)) {
        let used = a.zip(*b).map(|(a, b)| b.saturating_sub(a) as f64 / ctx.clk_tck);
        total_seconds += used.unwrap_or(0.0);
        let per_payment = used.filter(|_| paid_in_window > 0).map(|u| u * 1e3 / paid_in_window as f64);
        result.cpu.push((p.name.clone(), per_payment));
    }
    result.cpu_percent = total_seconds / ((to - from).as_secs_f64() * ctx.cores as f64) * 100.0;
    result.cpu_total_ms = total_seconds * 1e3 / paid_in_window.max(1) as f64;
    result
}

impl RateResult {
    /// Keeps the first few problems for the report (the counts say how many).
    fn problem(&mut self, p: String) {
        if self.problems.len() < 5 {
            self.problems.push(p);
        }
    }

    fn achieved(&self) -> f64 {
        self.answered_per_second.min(self.paid_per_second)
    }

    fn sustained(&self) -> bool {
        self.paid.p99 <= TARGET_P99_MS && self.achieved() >= TARGET_ACHIEVED * f64::from(self.rate)
    }

    fn print(&self, ctx: &Ctx<'_>, pg_tx_per_second: f64, jetstream: &crate::bench::Figures) {
        let errors = if self.errors.is_empty() {
            "0".to_owned()
        } else {
            let total: usize = self.errors.iter().map(|e| e.1).sum();
            let kinds: Vec<String> = self.errors.iter().take(4).map(|(k, c)| format!("{k}: {c}")).collect();
            format!("{total} ({})", kinds.join("; "))
        };
        println!("  prepared through the API at {:.0} payments/s (before the window)", self.prepared_per_second);
        println!(
            "  callbacks: offered {}/s, answered 204 {:.1}/s, errors {errors}; send lag behind schedule p99 {:.2} ms",
            self.rate, self.answered_per_second, self.send_lag_p99_ms
        );
        println!(
            "  paid {:.1}/s; callback → paid      {} ({} of {} counted)",
            self.paid_per_second,
            self.paid.describe(),
            self.paid.count,
            self.counted
        );
        println!("  callback → notified (both messages) {} ({})", self.notified.describe(), self.notified.count);
        println!("  lost {}, duplicated {}", self.lost, self.duplicated);
        for p in &self.problems {
            println!("    {p}");
        }
        let cpu: Vec<String> = self
            .cpu
            .iter()
            .map(|(name, ms)| format!("{name} {}", ms.map_or("-".to_owned(), |m| format!("{m:.3}"))))
            .collect();
        println!("  CPU ms per payment over the counted window: {}", cpu.join(", "));
        println!(
            "  CPU total {:.3} ms per payment = {:.0} % of {} cores",
            self.cpu_total_ms, self.cpu_percent, ctx.cores
        );
        println!("  peak RSS so far (VmHWM): {}", self.peak_rss);
        println!(
            "  vs references: paid/s ÷ raw PostgreSQL tx/s {:.3}; callback → paid p50 ÷ raw JetStream p50 {:.0}x",
            self.paid_per_second / pg_tx_per_second,
            self.paid.p50 / jetstream.p50_ms
        );
    }
}

fn print_summary(mode: &str, pg: f64, results: &[RateResult]) {
    println!("summary, PostgreSQL {mode} (raw PostgreSQL reference {pg:.0} tx/s):");
    println!(
        "  {:>7} {:>9} {:>9} {:>26} {:>26} {:>7} {:>5} {:>5} {:>9} {:>6}",
        "offered",
        "204/s",
        "paid/s",
        "paid p50/p99/p99.9 ms",
        "notified p50/p99/p99.9 ms",
        "errors",
        "lost",
        "dup",
        "CPU ms/p",
        "CPU %"
    );
    for r in results {
        println!(
            "  {:>7} {:>9.1} {:>9.1} {:>26} {:>26} {:>7} {:>5} {:>5} {:>9.3} {:>6.0}",
            r.rate,
            r.answered_per_second,
            r.paid_per_second,
            r.paid.triple(),
            r.notified.triple(),
            r.errors.iter().map(|e| e.1).sum::<usize>(),
            r.lost,
            r.duplicated,
            r.cpu_total_ms,
            r.cpu_percent
        );
    }
    match sustained(results) {
        Some(r) => println!(
            "  sustained {}/s (p99 callback→paid ≤ {TARGET_P99_MS} ms at ≥ 99 % of offered): {:.3} of the raw \
             PostgreSQL transaction rate",
            r.rate,
            f64::from(r.rate) / pg
        ),
        None => println!(
            "  no rate met p99 callback→paid ≤ {TARGET_P99_MS} ms at ≥ 99 % of offered; the line below shows the \
             lowest rate's figures"
        ),
    }
}

/// The highest rate that met the target, if any.
fn sustained(results: &[RateResult]) -> Option<&RateResult> {
    results.iter().filter(|r| r.sustained()).max_by_key(|r| r.rate)
}

/// `bench e2e: sustained N payments/s with p99 callback→paid X ms, p99 callback→notified Y ms; lost L, duplicated D`
/// (X and Y at the sustained rate; with none, N is 0 and they are the lowest rate's).
fn headline(prefix: &str, results: &[RateResult]) -> String {
    let best = sustained(results);
    let shown = best.or_else(|| results.iter().min_by_key(|r| r.rate));
    let (x, y) = shown.map_or((f64::NAN, f64::NAN), |r| (r.paid.p99, r.notified.p99));
    let (lost, duplicated): (usize, usize) =
        (results.iter().map(|r| r.lost).sum(), results.iter().map(|r| r.duplicated).sum());
    format!(
        "{prefix}: sustained {} payments/s with p99 callback→paid {x:.1} ms, p99 callback→notified {y:.1} ms; \
         lost {lost}, duplicated {duplicated}",
        best.map_or(0, |r| r.rate)
    )
}

#[derive(Debug, Clone, Copy)]
struct Quantiles {
    count: usize,
    p50: f64,
    p99: f64,
    p999: f64,
}

impl Default for Quantiles {
    fn default() -> Self {
        Quantiles { count: 0, p50: f64::NAN, p99: f64::NAN, p999: f64::NAN }
    }
}

impl Quantiles {
    /// Nearest-rank percentiles.
    fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Quantiles { count: v.len(), p50: at(0.5), p99: at(0.99), p999: at(0.999) }
    }

    fn describe(&self) -> String {
        format!("p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms", self.p50, self.p99, self.p999)
    }

    fn triple(&self) -> String {
        format!("{:.1} / {:.1} / {:.1}", self.p50, self.p99, self.p999)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// (a) Preparing payments through the API.

pub(crate) struct Api {
    pub(crate) http: reqwest::Client,
    base: String,
}

impl Api {
    pub(crate) fn new(base: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).no_proxy().build()?;
        Ok(Api { http, base: base.to_owned() })
    }

    /// The API's base URL.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// One API call (`{"code":200,"data":…}`), tried up to three times on transport errors and 5xx answers.
    pub(crate) async fn call(&self, path: &str, token: Option<&str>, body: Value) -> anyhow::Result<Value> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self.http.post(format!("{}{path}", self.base)).json(&body);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let failure = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let answer: Value = resp.json().await.unwrap_or(Value::Null);
                    if status.is_success() && answer["code"] == 200 {
                        return Ok(answer["data"].clone());
                    }
                    if !status.is_server_error() {
                        bail!("{path}: {status} {answer}");
                    }
                    format!("{status} {answer}")
                }
                Err(e) => e.to_string(),
            };
            if attempt == 3 {
                bail!("{path}: {failure}");
            }
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        }
    }
}

/// N payments: a user per [`ORDERS_PER_USER`] orders, each order booked and prepaid; returns (order sn, pay sn).
async fn prepare(ctx: &Ctx<'_>, rate: u32, n: usize) -> anyhow::Result<Vec<(String, String)>> {
    let users = n.div_ceil(ORDERS_PER_USER);
    let round = ctx.rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut done = futures::stream::iter(0..users)
        .map(|u| {
            let count = ORDERS_PER_USER.min(n - u * ORDERS_PER_USER);
            let code = format!("bench-{}-{round}-{rate}-{u}:1", ctx.tag);
            let (api, homestay) = (ctx.api.clone(), ctx.homestay);
            async move { prepare_user(&api, homestay, &code, count).await }
        })
        .buffer_unordered(ctx.args.prepare_concurrency.max(1));
    let mut walks = Vec::with_capacity(n);
    let (started, mut reported) = (Instant::now(), Instant::now());
    while let Some(user) = done.next().await {
        walks.extend(user?);
        if reported.elapsed() >= Duration::from_secs(5) {
            let per_second = walks.len() as f64 / started.elapsed().as_secs_f64();
            eprintln!("  … {} of {n} payments prepared ({per_second:.0}/s)", walks.len());
            reported = Instant::now();
        }
    }
    Ok(walks)
}

/// Logs a mini-program user in with a WeChat code (the sandbox's `USER:1` codes); returns the access token.
pub(crate) async fn login(api: &Api, code: &str) -> anyhow::Result<String> {
    let login = api.call("/usercenter/v1/user/wxMiniAuth", None, json!({ "code": code })).await?;
    Ok(login["accessToken"].as_str().context("wxMiniAuth: no accessToken")?.to_owned())
}

/// Books one night a week from now; returns the order's sn.
pub(crate) async fn book(api: &Api, token: &str, homestay: i64) -> anyhow::Result<String> {
    let start = Utc::now().timestamp() / 86_400 * 86_400 + 7 * 86_400;
    let order = api
        .call(
            "/order/v1/homestayOrder/createHomestayOrder",
            Some(token),
            json!({ "homestayId": homestay, "isFood": false, "liveStartTime": start,
                    "liveEndTime": start + 86_400, "livePeopleNum": 1, "remark": "" }),
        )
        .await?;
    Ok(order["orderSn"].as_str().context("createHomestayOrder: no orderSn")?.to_owned())
}

async fn prepare_user(api: &Api, homestay: i64, code: &str, count: usize) -> anyhow::Result<Vec<(String, String)>> {
    let token = login(api, code).await?;
    let mut walks = Vec::with_capacity(count);
    for _ in 0..count {
        let sn = book(api, &token, homestay).await?;
        api.call(
            "/payment/v1/thirdPayment/thirdPaymentWxPay",
            Some(&token),
            json!({ "orderSn": sn, "serviceType": "homestayOrder" }),
        )
        .await?;
        let status = api
            .call("/payment/v1/thirdPayment/thirdPaymentWxPayStatus", Some(&token), json!({ "orderSn": sn }))
            .await?;
        let pay_sn = status["paySn"].as_str().context("thirdPaymentWxPayStatus: no paySn")?.to_owned();
        walks.push((sn, pay_sn));
    }
    Ok(walks)
}

#[derive(diesel::QueryableByName)]
struct PaymentRow {
    #[diesel(sql_type = Text)]
    sn: String,
    #[diesel(sql_type = BigInt)]
    pay_total: i64,
    #[diesel(sql_type = Text)]
    openid: String,
}

/// Amount and payer of each payment, as WeChat would report them.
async fn payment_details(db: &DbConfig, pay_sns: &[String]) -> anyhow::Result<HashMap<String, PaymentRow>> {
    use storage::RunQueryDsl as _;
    let mut conn = storage::connect(db).await?;
    let rows: Vec<PaymentRow> = diesel::sql_query(
        "SELECT p.sn, p.pay_total, a.auth_key AS openid FROM third_payment p \
         JOIN user_auth a ON a.user_id = p.user_id AND a.auth_type = $2 WHERE p.sn = ANY($1)",
    )
    .bind::<Array<Text>, _>(pay_sns)
    .bind::<Text, _>(storage::AuthType::WxMini.as_str())
    .load(&mut conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.sn.clone(), r)).collect())
}

// ---------------------------------------------------------------------------------------------------------------
// (b) Signing and (c) sending.

/// Signs every callback on `threads` threads (interleaved, so signatures age in sending order); returns the
/// payments with, per payment, its headers and their timestamp.
pub(crate) async fn sign_all(
    signer: Arc<sandbox::CallbackSigner>,
    payments: Vec<Prepared>,
    threads: usize,
) -> anyhow::Result<(Vec<Prepared>, Vec<(HeaderMap, i64)>)> {
    tokio::task::spawn_blocking(move || {
        let n = payments.len();
        let mut signed: Vec<Option<(HeaderMap, i64)>> = (0..n).map(|_| None).collect();
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads.max(1))
                .map(|t| {
                    let (signer, payments) = (&signer, &payments);
                    s.spawn(move || {
                        (t..n)
                            .step_by(threads.max(1))
                            .map(|i| (i, header_map(signer.headers(&payments[i].body))))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for w in workers {
                for (i, h) in w.join().map_err(|_| anyhow!("a signing thread panicked"))? {
                    signed[i] = Some(h?);
                }
            }
            anyhow::Ok(())
        })?;
        let headers = signed.into_iter().map(|h| h.expect("every index signed")).collect();
        Ok((payments, headers))
    })
    .await?
}

fn header_map(headers: Vec<(&'static str, String)>) -> anyhow::Result<(HeaderMap, i64)> {
    let mut map = HeaderMap::new();
    let mut ts = 0;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("Wechatpay-Timestamp") {
            ts = value.parse()?;
        }
        map.insert(HeaderName::from_bytes(name.as_bytes())?, HeaderValue::from_str(&value)?);
    }
    Ok((map, ts))
}

/// Sends callback i at `t0 + i/rate`, each on a task of its own, whatever the answers to the others.
/// POSTs `body` and answers the HTTP status, or what kept it from coming (timeout, connect, transport).
pub(crate) async fn post_status(
    http: &reqwest::Client,
    url: &str,
    headers: HeaderMap,
    body: impl Into<reqwest::Body>,
) -> Result<u16, String> {
    match http.post(url).headers(headers).body(body).send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            // Read the (empty or short) body so the connection goes back to the pool.
            let _ = resp.bytes().await;
            Ok(status)
        }
        Err(e) if e.is_timeout() => Err("timeout".to_owned()),
        Err(e) if e.is_connect() => Err("connect".to_owned()),
        Err(e) => Err(format!("transport: {e}")),
    }
}

async fn send_open_loop(
    url: &str,
    headers: Vec<(HeaderMap, i64)>,
    payments: &[Prepared],
    window: &Window,
) -> anyhow::Result<Vec<Sent>> {
    let http = reqwest::Client::builder()
        .timeout(CALLBACK_TIMEOUT)
        .no_proxy()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .user_agent("Mozilla/4.0")
        .build()?;
    let url: Arc<str> = Arc::from(url);
    let mut tasks = Vec::with_capacity(payments.len());
    for (i, ((h, _), p)) in headers.into_iter().zip(payments).enumerate() {
        tokio::time::sleep_until(window.due(i).into()).await;
        let (http, url, body) = (http.clone(), url.clone(), p.body.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let status = post_status(&http, &url, h, body).await;
            Sent { sent, answered: Instant::now(), status }
        }));
    }
    let mut sent = Vec::with_capacity(tasks.len());
    for t in tasks {
        sent.push(t.await?);
    }
    Ok(sent)
}

// ---------------------------------------------------------------------------------------------------------------
// (d) Observing completion.

/// By order: each copy of its waitUse event that arrived (event id, when).
type PaidEvents = HashMap<String, Vec<(uuid::Uuid, Instant)>>;

/// `<prefix>.order.status` on core NATS: when each order's waitUse event arrived (every copy, with its event id).
struct Observer {
    seen: Arc<Mutex<PaidEvents>>,
    task: tokio::task::JoinHandle<()>,
}

impl Observer {
    async fn start(client: &async_nats::Client, prefix: &str) -> anyhow::Result<Observer> {
        let mut sub = client.subscribe(format!("{prefix}.order.status")).await?;
        client.flush().await?;
        let seen: Arc<Mutex<PaidEvents>> = Arc::default();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let at = Instant::now();
                let Ok(env) = serde_json::from_slice::<bus::Envelope<OrderStatusChanged>>(&msg.payload) else {
                    continue;
                };
                if env.payload.to == storage::TradeState::WaitUse {
                    let mut seen = s.lock().expect("not poisoned");
                    seen.entry(env.payload.order_sn.to_string()).or_default().push((env.id, at));
                }
            }
        });
        Ok(Observer { seen, task })
    }

    fn paid_count<'a>(&self, orders: impl Iterator<Item = &'a str>) -> usize {
        let seen = self.seen.lock().expect("not poisoned");
        orders.filter(|o| seen.contains_key(*o)).count()
    }

    fn snapshot(&self, orders: &[String]) -> PaidEvents {
        let seen = self.seen.lock().expect("not poisoned");
        orders.iter().filter_map(|o| seen.get(o).map(|v| (o.clone(), v.clone()))).collect()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Subscribe messages the sandbox accepted, by order: (template id, when).
#[derive(Default)]
struct Messages {
    after: u64,
    by_order: HashMap<String, Vec<(String, DateTime<Utc>)>>,
}

impl Ctx<'_> {
    /// Reads the messages the sandbox accepted since the last look.
    async fn fetch_messages(&self) -> anyhow::Result<()> {
        const PAGE: usize = 10_000;
        loop {
            let after = self.messages.lock().expect("not poisoned").after;
            let url = format!("{}/sandbox/v1/subscribe-messages?after={after}&limit={PAGE}", self.system.sandbox);
            let answer: Value = self.api.http.get(url).send().await?.error_for_status()?.json().await?;
            let records: Vec<sandbox::SubscribeRecord> = serde_json::from_value(answer["data"].clone())?;
            let mut messages = self.messages.lock().expect("not poisoned");
            for r in &records {
                messages.after = messages.after.max(r.msgid);
                let Some(order) = order_of(r) else { continue };
                let at = DateTime::parse_from_rfc3339(&r.at)
                    .with_context(|| format!("sandbox message time {:?}", r.at))?
                    .with_timezone(&Utc);
                messages.by_order.entry(order).or_default().push((r.template_id.clone(), at));
            }
            if records.len() < PAGE {
                return Ok(());
            }
        }
    }

    /// How many of `orders` have both their messages.
    fn notified_count<'a>(&self, orders: impl Iterator<Item = &'a str>) -> usize {
        let messages = self.messages.lock().expect("not poisoned");
        orders
            .filter(|o| {
                messages.by_order.get(*o).is_some_and(|m| TEMPLATES.iter().all(|t| m.iter().any(|(tpl, _)| tpl == t)))
            })
            .count()
    }

    fn delivered(&self, orders: &[String]) -> HashMap<String, Vec<(String, DateTime<Utc>)>> {
        let messages = self.messages.lock().expect("not poisoned");
        orders.iter().filter_map(|o| messages.by_order.get(o).map(|m| (o.clone(), m.clone()))).collect()
    }
}

/// The order a message is about: the `sn=` of its page (both templates link the order's page).
fn order_of(r: &sandbox::SubscribeRecord) -> Option<String> {
    let page = r.page.as_deref()?;
    let sn = page.split_once("sn=")?.1;
    Some(sn.split('&').next().unwrap_or(sn).to_owned())
}

#[derive(diesel::QueryableByName)]
struct OrderRow {
    #[diesel(sql_type = Text)]
    sn: String,
    #[diesel(sql_type = SmallInt)]
    trade_state: i16,
    #[diesel(sql_type = BigInt)]
    paid: i64,
}

/// Each order's state and its number of paid payments, as stored.
async fn stored_state(db: &DbConfig, orders: &[String]) -> anyhow::Result<HashMap<String, OrderRow>> {
    use storage::RunQueryDsl as _;
    let mut conn = storage::connect(db).await?;
    let rows: Vec<OrderRow> = diesel::sql_query(
        "SELECT o.sn, o.trade_state, \
           (SELECT count(*) FROM third_payment p WHERE p.order_sn = o.sn AND p.pay_status = $2) AS paid \
         FROM homestay_order o WHERE o.sn = ANY($1)",
    )
    .bind::<Array<Text>, _>(orders)
    .bind::<SmallInt, _>(storage::PayStatus::Paid.code())
    .load(&mut conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.sn.clone(), r)).collect())
}

/// Instants (precise, monotonic) to wall-clock time (what the sandbox records), from one reading of both.
struct Clock {
    instant: Instant,
    wall: DateTime<Utc>,
}

impl Clock {
    fn now() -> Self {
        Clock { instant: Instant::now(), wall: Utc::now() }
    }

    fn wall(&self, at: Instant) -> DateTime<Utc> {
        let since = at.saturating_duration_since(self.instant);
        self.wall + chrono::Duration::from_std(since).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The system under test, as child processes.

pub(crate) struct System {
    /// paystream's HTTP API.
    pub(crate) api: String,
    pub(crate) callback_url: String,
    /// The WeChat sandbox.
    pub(crate) sandbox: String,
    pub(crate) sandbox_dir: PathBuf,
    pub(crate) sandbox_pid: u32,
    /// (role, pid)
    pub(crate) roles: Vec<(String, u32)>,
    /// The binary that runs the roles, with its `--version`.
    pub(crate) roles_bin: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `bin`, without the PAYSTREAM* environment of the benchmark itself (each child gets its own).
fn command(bin: &Path) -> Command {
    let mut c = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PAYSTREAM") {
            c.env_remove(k);
        }
    }
    c.stdin(Stdio::null());
    c
}

/// This binary (the sandbox, and the roles unless `--roles-bin` names another).
fn this_binary() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("finding this binary")
}

/// What a benchmark runs: its name (in the database, prefix and directory names), the paystream roles as (name,
/// command words), the binary that runs them and the migrations (None: this one), configuration added to the
/// sandbox's, and how many records the sandbox keeps.
pub(crate) struct BedSpec<'a> {
    pub(crate) name: &'a str,
    pub(crate) roles_bin: Option<&'a Path>,
    pub(crate) roles: &'a [(&'a str, &'a [&'a str])],
    pub(crate) config: &'a str,
    pub(crate) records: usize,
}

/// A database and a NATS prefix of a benchmark's own on the configured servers, migrated, with the WeChat sandbox
/// and the roles running as children; the [`Cleanup`] stops and removes all of it.
pub(crate) struct Bed {
    /// A database on the same server to create and drop databases from.
    pub(crate) admin: DbConfig,
    pub(crate) db: DbConfig,
    pub(crate) db_name: String,
    pub(crate) nats: bus::NatsConfig,
    pub(crate) tag: String,
    pub(crate) system: System,
}

impl Bed {
    pub(crate) async fn start(cfg: &Config, spec: &BedSpec<'_>, cleanup: &mut Cleanup) -> anyhow::Result<Bed> {
        use storage::RunQueryDsl as _;
        let roles_bin = match spec.roles_bin {
            Some(bin) => {
                ensure!(bin.is_file(), "--roles-bin {}: no such file", bin.display());
                bin.to_path_buf()
            }
            None => this_binary()?,
        };
        let admin = admin_database(&cfg.database).await?;
        let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let db_name = format!("bench_{}_{tag}", spec.name);
        {
            let mut conn = storage::connect(&admin).await?;
            diesel::sql_query(format!("CREATE DATABASE {db_name}")).execute(&mut conn).await?;
        }
        cleanup.admin = Some(admin.clone());
        cleanup.database = Some(db_name.clone());
        let db = with_database(&cfg.database, &db_name)?;
        let mut nats = cfg.nats.clone();
        nats.prefix = format!("bench-{}-{tag}", spec.name);
        cleanup.nats = Some(nats.clone());
        let dir = std::env::temp_dir().join(format!("paystream-bench-{}-{tag}", spec.name));
        std::fs::create_dir_all(&dir)?;
        cleanup.dir = Some(dir.clone());

        if spec.roles_bin.is_some() {
            let status = command(&roles_bin)
                .arg("migrate")
                .current_dir(&dir)
                .env("PAYSTREAM__DATABASE__URL", db.url.expose_secret())
                .env("PAYSTREAM__TELEMETRY__LOG_FILTER", "warn")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("migrate.log"))?)
                .status()
                .with_context(|| format!("running {} migrate", roles_bin.display()))?;
            ensure!(
                status.success(),
                "{} migrate failed ({status}); see {}/migrate.log",
                roles_bin.display(),
                dir.display()
            );
        } else {
            storage::migrate(&db).await.context("migrating the benchmark's database")?;
        }
        let system = System::start(spec, &roles_bin, &dir, &db, &nats, cleanup).await?;
        Ok(Bed { admin, db, db_name, nats, tag, system })
    }
}

impl System {
    async fn start(
        spec: &BedSpec<'_>,
        roles_bin: &Path,
        dir: &Path,
        db: &DbConfig,
        nats: &bus::NatsConfig,
        cleanup: &mut Cleanup,
    ) -> anyhow::Result<System> {
        let http_port = free_port()?;
        let api = format!("http://127.0.0.1:{http_port}");
        let callback_url = format!("{api}/payment/v1/thirdPayment/thirdPaymentWxPayCallback");
        let log = |name: &str| std::fs::File::create(dir.join(format!("{name}.log")));
        let this = this_binary()?;

        // WeChat: keeps every message of the largest run (two per payment) between two looks.
        let sandbox_dir = dir.join("sandbox");
        let status = command(&this)
            .args(["sandbox", "init", "--dir"])
            .arg(&sandbox_dir)
            .args(["--notify-url", &callback_url])
            .stdout(Stdio::null())
            .stderr(log("sandbox-init")?)
            .status()?;
        ensure!(status.success(), "paystream sandbox init failed: {status}");
        let max_records = (spec.records * 5 / 2 + 10_000).max(100_000);
        let mut child = command(&this)
            .args(["sandbox", "--listen", "127.0.0.1:0", "--max-records", &max_records.to_string(), "--dir"])
            .arg(&sandbox_dir)
            .stdout(Stdio::piped())
            .stderr(log("sandbox")?)
            .spawn()?;
        let stdout = child.stdout.take().context("sandbox stdout")?;
        let sandbox_pid = child.id();
        cleanup.children.push(("sandbox".into(), child));
        let mut stdout = BufReader::new(stdout);
        let mut first = String::new();
        stdout.read_line(&mut first)?;
        // Keep draining stdout so that the sandbox never writes into a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let sandbox = first.trim().rsplit(' ').next().filter(|u| u.starts_with("http")).map(str::to_owned);
        let sandbox = sandbox.with_context(|| format!("the sandbox did not start (see {})", dir.display()))?;

        // paystream: the sandbox's configuration (its [wechat] and [sms] sections, which every version reads), the
        // benchmark's own, and our database, NATS prefix and ports from the environment.
        let config = dir.join("bench.toml");
        let sandbox_toml = std::fs::read_to_string(sandbox_dir.join(sandbox::CONFIG_FILE))?;
        std::fs::write(&config, format!("{sandbox_toml}\n{}", spec.config))?;
        let jwt = format!("bench-{}", uuid::Uuid::new_v4().simple());
        // The benchmark books the demo homestays and drives thousands of users from one address: demo data on, rate
        // limits and the unpaid-order cap off. A build from before those keys refuses them (and seeded by default,
        // without limits), so they are given only to a binary whose `config --role ingress` accepts them.
        const EDGE: [(&str, &str); 3] = [
            ("PAYSTREAM__HTTP__SEED_DEMO_HOMESTAYS", "true"),
            ("PAYSTREAM__HTTP__RATE_LIMITS__ENABLED", "false"),
            ("PAYSTREAM__HTTP__MAX_UNPAID_ORDERS", "0"),
        ];
        let edge_keys = command(roles_bin)
            .arg("--config")
            .arg(&config)
            .args(["config", "--role", "ingress"])
            .env("PAYSTREAM__DATABASE__URL", db.url.expose_secret())
            .env("PAYSTREAM__HTTP__JWT_SECRET", &jwt)
            .envs(EDGE)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let mut started = Vec::new();
        for (name, words) in spec.roles {
            let admin_port = free_port()?;
            let mut c = command(roles_bin);
            c.arg("--config")
                .arg(&config)
                .args(*words)
                .env("PAYSTREAM__DATABASE__URL", db.url.expose_secret())
                .env("PAYSTREAM__NATS__URL", &nats.url)
                .env("PAYSTREAM__NATS__PREFIX", &nats.prefix)
                .env("PAYSTREAM__ADMIN__LISTEN", format!("127.0.0.1:{admin_port}"))
                .env("PAYSTREAM__TELEMETRY__LOG_FILTER", "warn")
                .stdout(Stdio::null())
                .stderr(log(name)?);
            if matches!(*name, "ingress" | "all") {
                c.env("PAYSTREAM__HTTP__LISTEN", format!("127.0.0.1:{http_port}"))
                    .env("PAYSTREAM__HTTP__JWT_SECRET", &jwt);
                if edge_keys {
                    c.envs(EDGE);
                }
            }
            let child = c.spawn().with_context(|| format!("starting paystream {}", words.join(" ")))?;
            started.push((name.to_string(), child.id(), admin_port));
            cleanup.children.push((name.to_string(), child));
        }
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build()?;
        for (name, _, admin_port) in &started {
            let ready = format!("http://127.0.0.1:{admin_port}/readyz");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if http.get(&ready).send().await.is_ok_and(|r| r.status().is_success()) {
                    break;
                }
                if let Some(exited) = cleanup.exited(name) {
                    let log = dir.join(format!("{name}.log"));
                    bail!("paystream {name} exited ({exited}) before it was ready; see {}", log.display());
                }
                ensure!(Instant::now() < deadline, "paystream {name} not ready after 60 s (logs in {})", dir.display());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let version = command(roles_bin)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        let roles_bin = format!("{} ({})", roles_bin.display(), version.unwrap_or_default());
        Ok(System {
            api,
            callback_url,
            sandbox,
            sandbox_dir,
            sandbox_pid,
            roles: started.into_iter().map(|(name, pid, _)| (name, pid)).collect(),
            roles_bin,
        })
    }
}

pub(crate) async fn first_homestay(db: &DbConfig) -> anyhow::Result<i64> {
    use diesel::prelude::*;
    use storage::RunQueryDsl;
    use storage::schema::homestay as h;
    let mut conn = storage::connect(db).await?;
    h::table
        .filter(h::row_state.eq(1))
        .order(h::id)
        .select(h::id)
        .first(&mut conn)
        .await
        .context("no listed homestay (the ingress seeds them into an empty database)")
}

/// What a run leaves behind, released at the end (and, if the run unwinds, on drop): the children are stopped
/// (SIGTERM, then SIGKILL after 10 s), the NATS streams and the database dropped, PostgreSQL's settings restored.
#[derive(Default)]
pub(crate) struct Cleanup {
    children: Vec<(String, Child)>,
    admin: Option<DbConfig>,
    database: Option<String>,
    /// (setting, the statement that puts it back); then the configuration is reloaded.
    restore: Vec<(String, String)>,
    nats: Option<bus::NatsConfig>,
    dir: Option<PathBuf>,
}

impl Cleanup {
    fn exited(&mut self, name: &str) -> Option<std::process::ExitStatus> {
        self.children.iter_mut().find(|(n, _)| n == name).and_then(|(_, c)| c.try_wait().ok().flatten())
    }

    fn stop_children(&mut self) {
        for (_, c) in &self.children {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (_, c) in &mut self.children {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        self.children.clear();
    }

    /// The asynchronous part: everything but the children.
    fn take_async(&mut self) -> impl Future<Output = anyhow::Result<()>> + use<> {
        let (admin, database, restore, nats) =
            (self.admin.take(), self.database.take(), std::mem::take(&mut self.restore), self.nats.take());
        async move {
            let mut problems = Vec::new();
            if let Some(nats) = nats {
                match bus::connect(&nats).await {
                    Ok((_, js)) => {
                        for stream in nats.topology().streams() {
                            let _ = js.delete_stream(&stream).await;
                        }
                    }
                    Err(e) => problems.push(format!("deleting the NATS streams of {}: {e}", nats.prefix)),
                }
            }
            if let Some(admin) = admin {
                let result: anyhow::Result<()> = async {
                    use storage::RunQueryDsl as _;
                    let mut conn = storage::connect(&admin).await?;
                    if !restore.is_empty() {
                        for (_, statement) in &restore {
                            diesel::sql_query(statement.as_str()).execute(&mut conn).await?;
                        }
                        diesel::sql_query("SELECT pg_reload_conf()").execute(&mut conn).await?;
                    }
                    if let Some(db) = database {
                        diesel::sql_query(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                            .execute(&mut conn)
                            .await?;
                    }
                    Ok(())
                }
                .await;
                if let Err(e) = result {
                    problems.push(format!("PostgreSQL: {e:#}"));
                }
            }
            if problems.is_empty() { Ok(()) } else { Err(anyhow!(problems.join("; "))) }
        }
    }

    async fn finish(&mut self) -> anyhow::Result<()> {
        self.stop_children();
        self.take_async().await
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.stop_children();
        if self.admin.is_none() && self.nats.is_none() {
            return;
        }
        let release = self.take_async();
        // Drop may run inside the runtime, which cannot be blocked on; a thread with its own runtime can.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(release).ok()
        })
        .join();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// PostgreSQL: our database, durability, and the raw reference.

/// A configuration for a database on the same server that we may create databases from: the configured one, else
/// the server's `postgres` database.
async fn admin_database(db: &DbConfig) -> anyhow::Result<DbConfig> {
    let first = match storage::connect(db).await {
        Ok(_) => return Ok(db.clone()),
        Err(e) => e,
    };
    let fallback = with_database(db, "postgres")?;
    match storage::connect(&fallback).await {
        Ok(_) => Ok(fallback),
        Err(e) => bail!("cannot reach PostgreSQL at database.url ({first}), nor its postgres database ({e})"),
    }
}

fn with_database(db: &DbConfig, name: &str) -> anyhow::Result<DbConfig> {
    let mut url = reqwest::Url::parse(db.url.expose_secret()).context("database.url is not a URL")?;
    url.set_path(&format!("/{name}"));
    Ok(DbConfig { url: DbConfig::new(url.to_string()).url, ..db.clone() })
}

#[derive(diesel::QueryableByName)]
struct SettingRow {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    setting: String,
    #[diesel(sql_type = Text)]
    source: String,
    #[diesel(sql_type = Nullable<Text>)]
    sourcefile: Option<String>,
}

async fn durability_settings(admin: &DbConfig) -> anyhow::Result<Vec<SettingRow>> {
    use storage::RunQueryDsl as _;
    let mut conn = storage::connect(admin).await?;
    Ok(diesel::sql_query(
        "SELECT name, setting, source, sourcefile FROM pg_settings \
         WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes')",
    )
    .load(&mut conn)
    .await?)
}

fn wanted(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

/// Fails at once, before anything runs, if the server is not in durability `on` and `ALTER SYSTEM` cannot put it
/// there: settings from the command line (or the environment) win over `postgresql.auto.conf`.
async fn durability_settable(admin: &DbConfig, on: bool) -> anyhow::Result<()> {
    for s in durability_settings(admin).await? {
        if s.setting != wanted(on) && !matches!(s.source.as_str(), "default" | "configuration file") {
            bail!(
                "PostgreSQL takes {} = {} from its {}, which ALTER SYSTEM cannot override, so --fsync {} cannot be \
                 measured on this server: start it with the setting in postgresql.conf instead (`scripts/infra.sh \
                 up` moves a cluster it started with -c fsync=off & co. there), or run with --fsync {}",
                s.name,
                s.setting,
                s.source,
                wanted(on),
                wanted(!on),
            );
        }
    }
    Ok(())
}

/// Puts fsync, synchronous_commit and full_page_writes to `on` (or off) with ALTER SYSTEM and a reload, unless they
/// already are; remembers how to put them back ([`restore_durability`], else the [`Cleanup`]). Whether it changed
/// anything.
async fn set_durability(admin: &DbConfig, on: bool, cleanup: &mut Cleanup) -> anyhow::Result<bool> {
    use storage::RunQueryDsl as _;
    let current = durability_settings(admin).await?;
    if current.iter().all(|s| s.setting == wanted(on)) {
        return Ok(false);
    }
    durability_settable(admin, on).await?;
    let mut conn = storage::connect(admin).await?;
    for s in &current {
        // Set before by ALTER SYSTEM: put that value back; else remove ours.
        let undo = if s.sourcefile.as_deref().is_some_and(|f| f.ends_with("postgresql.auto.conf")) {
            format!("ALTER SYSTEM SET {} = '{}'", s.name, s.setting)
        } else {
            format!("ALTER SYSTEM RESET {}", s.name)
        };
        if !cleanup.restore.iter().any(|(name, _)| *name == s.name) {
            cleanup.restore.push((s.name.clone(), undo));
        }
        diesel::sql_query(format!("ALTER SYSTEM SET {} = {}", s.name, wanted(on))).execute(&mut conn).await?;
    }
    diesel::sql_query("SELECT pg_reload_conf()").execute(&mut conn).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !durability_settings(admin).await?.iter().all(|s| s.setting == wanted(on)) {
        ensure!(Instant::now() < deadline, "PostgreSQL did not take fsync = {} after a reload", wanted(on));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(true)
}

/// A CHECKPOINT (superusers and pg_checkpointer only); how long it took.
async fn checkpoint(admin: &DbConfig) -> anyhow::Result<Duration> {
    use storage::RunQueryDsl as _;
    let mut conn = storage::connect(admin).await?;
    let started = Instant::now();
    diesel::sql_query("CHECKPOINT").execute(&mut conn).await?;
    Ok(started.elapsed())
}

/// Puts back what [`set_durability`] changed (ALTER SYSTEM RESET, or the value ALTER SYSTEM had set before) and
/// reloads.
async fn restore_durability(admin: &DbConfig, cleanup: &mut Cleanup) -> anyhow::Result<()> {
    use storage::RunQueryDsl as _;
    if cleanup.restore.is_empty() {
        return Ok(());
    }
    let mut conn = storage::connect(admin).await?;
    for (_, statement) in &cleanup.restore {
        diesel::sql_query(statement.as_str()).execute(&mut conn).await?;
    }
    diesel::sql_query("SELECT pg_reload_conf()").execute(&mut conn).await?;
    cleanup.restore.clear();
    Ok(())
}

/// Transactions of the pipeline's shape, as fast as `clients` connections can run them for `run`: a conditional
/// UPDATE of one row and an INSERT of an event-sized row, then COMMIT. Returns transactions per second.
async fn pg_reference(db: &DbConfig, clients: usize, run: Duration) -> anyhow::Result<f64> {
    use storage::RunQueryDsl as _;
    const ROWS: i64 = 100_000;
    let mut conn = storage::connect(db).await?;
    for statement in [
        "CREATE TABLE IF NOT EXISTS bench_ref_item (id bigint PRIMARY KEY, state bigint NOT NULL DEFAULT 0)",
        "CREATE TABLE IF NOT EXISTS bench_ref_event (id bigserial PRIMARY KEY, item_id bigint NOT NULL, \
         payload text NOT NULL, created timestamptz NOT NULL DEFAULT now())",
        "INSERT INTO bench_ref_item (id) SELECT generate_series(1, 100000) ON CONFLICT DO NOTHING",
    ] {
        diesel::sql_query(statement).execute(&mut conn).await?;
    }
    let payload = json!({ "type": "payment.status", "payload": { "sn": "PMT0000000000000000000000", "from": "waiting",
        "to": "paid", "transaction_id": "4200000000000000000000000000" }, "traceparent": "00-0-0-01" })
    .to_string();
    let started = Instant::now();
    let until = started + run;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (db, payload) = (db.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = storage::connect(&db).await?;
            let mut done = 0u64;
            let mut id = (c as i64 * 7919) % ROWS;
            while Instant::now() < until {
                id = id % ROWS + 1;
                conn.transaction::<_, diesel::result::Error, _>(async |c| {
                    diesel::sql_query("UPDATE bench_ref_item SET state = state + 1 WHERE id = $1 AND state >= 0")
                        .bind::<BigInt, _>(id)
                        .execute(c)
                        .await?;
                    diesel::sql_query("INSERT INTO bench_ref_event (item_id, payload) VALUES ($1, $2)")
                        .bind::<BigInt, _>(id)
                        .bind::<Text, _>(&payload)
                        .execute(c)
                        .await?;
                    Ok(())
                })
                .await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// The raw JetStream round trip on the same server, under a prefix of its own.
async fn jetstream_reference(
    nats: &bus::NatsConfig,
    js: &async_nats::jetstream::Context,
) -> anyhow::Result<crate::bench::Figures> {
    let mut cfg = nats.clone();
    cfg.prefix = format!("{}-ref", nats.prefix);
    let topology = cfg.topology();
    topology.ensure_streams(js).await?;
    let figures = crate::bench::raw_round_trip(js, &topology, 5_000, 8).await;
    for stream in topology.streams() {
        let _ = js.delete_stream(&stream).await;
    }
    figures
}

// ---------------------------------------------------------------------------------------------------------------
// Processes: CPU and memory from /proc.

#[derive(Debug, Clone)]
pub(crate) enum Source {
    Pid(u32),
    /// The postmaster and its live children, but for client backends of other databases. What exited children
    /// used (the postmaster's cutime) is left out: on a shared server it is mostly other clients' backends.
    Postgres {
        postmaster: u32,
        database: String,
    },
    Missing(String),
}

#[derive(Debug, Clone)]
pub(crate) struct Measured {
    pub(crate) name: String,
    pub(crate) source: Source,
    /// A paystream role or the sandbox: its memory is reported.
    ours: bool,
}

impl Measured {
    pub(crate) fn cpu_ticks(&self) -> Option<u64> {
        match &self.source {
            Source::Pid(pid) => stat(*pid).map(|s| s.utime + s.stime),
            Source::Postgres { postmaster, database } => {
                let pm = stat(*postmaster)?;
                let mut ticks = pm.utime + pm.stime;
                for entry in std::fs::read_dir("/proc").ok()?.flatten() {
                    let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
                    if let Some(s) = stat(pid)
                        && s.ppid == *postmaster
                        && postgres_child_counts(pid, database)
                    {
                        ticks += s.utime + s.stime;
                    }
                }
                Some(ticks)
            }
            Source::Missing(_) => None,
        }
    }

    pub(crate) fn describe(&self) -> String {
        match &self.source {
            Source::Pid(pid) => format!("pid {pid}"),
            Source::Postgres { postmaster, .. } => format!("postmaster pid {postmaster}"),
            Source::Missing(why) => format!("(not measured: {why})"),
        }
    }
}

struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
}

/// `/proc/<pid>/stat`: fields after the command name (which may hold spaces and parentheses).
fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    // rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15 (in clock ticks).
    let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(Stat { ppid: field(4)? as u32, utime: field(14)?, stime: field(15)? })
}

/// A postmaster's child counts unless it is a client backend of another database (`postgres: USER DB HOST(PORT)
/// STATE` in its title).
fn postgres_child_counts(pid: u32, database: &str) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let title = String::from_utf8_lossy(&raw).replace('\0', " ");
    let mut words: Vec<&str> = title.trim().strip_prefix("postgres:").unwrap_or("").split_whitespace().collect();
    if words.first().is_some_and(|w| w.ends_with(':')) {
        words.remove(0); // cluster_name
    }
    let backend = words.len() >= 3 && (words[2].contains('(') || words[2] == "[local]");
    !backend || words[1] == database
}

/// A `kB` line of `/proc/<pid>/status` in MiB.
pub(crate) fn status_mib(pid: u32, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?;
    let kib: f64 = line[key.len() + 1..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}

fn rss_line(ctx: &Ctx<'_>, key: &str) -> String {
    ctx.procs
        .iter()
        .filter(|p| p.ours)
        .filter_map(|p| match p.source {
            Source::Pid(pid) => Some(format!("{} {}", p.name, status_mib(pid, key).map_or("-".into(), mib))),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn mib(v: f64) -> String {
    format!("{v:.1} MiB")
}

/// The processes whose CPU is counted: each paystream role, the sandbox, nats-server, PostgreSQL (the postmaster,
/// given or from `.run/`) and this one.
pub(crate) fn measured_processes(
    system: &System,
    database: &str,
    nats_pid: Option<u32>,
    pg_pid: Option<u32>,
) -> Vec<Measured> {
    let mut procs: Vec<Measured> = system
        .roles
        .iter()
        .map(|(name, pid)| Measured { name: name.clone(), source: Source::Pid(*pid), ours: true })
        .collect();
    procs.push(Measured { name: "sandbox".into(), source: Source::Pid(system.sandbox_pid), ours: true });
    let nats = match nats_pid.map(Ok).unwrap_or_else(|| pid_file(".run/nats.pid")) {
        Ok(pid) if comm(pid).is_some_and(|c| c.contains("nats")) => Source::Pid(pid),
        Ok(pid) => Source::Missing(format!("pid {pid} is not a running nats-server")),
        Err(why) => Source::Missing(why),
    };
    procs.push(Measured { name: "nats-server".into(), source: nats, ours: false });
    let pg = match pg_pid.map(Ok).unwrap_or_else(|| pid_file(".run/pg/data/postmaster.pid")) {
        Ok(pid) if comm(pid).is_some_and(|c| c.contains("postgres")) => {
            Source::Postgres { postmaster: pid, database: database.to_owned() }
        }
        Ok(pid) => Source::Missing(format!("pid {pid} is not a running postmaster")),
        Err(why) => Source::Missing(why),
    };
    procs.push(Measured { name: "postgres".into(), source: pg, ours: false });
    procs.push(Measured { name: "bench".into(), source: Source::Pid(std::process::id()), ours: false });
    procs
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()
}

/// The first line of `relative` in the working directory or the nearest parent that has it.
fn pid_file(relative: &str) -> Result<u32, String> {
    let cwd = std::env::current_dir().map_err(|e| e.to_string())?;
    let path = cwd.ancestors().map(|d| d.join(relative)).find(|p| p.is_file());
    let path = path.ok_or_else(|| format!("no {relative} here or above; give its pid"))?;
    let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
    text.lines().next().unwrap_or("").trim().parse().map_err(|_| format!("{} holds no pid", path.display()))
}

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`; 100 on Linux when getconf is missing).
pub(crate) fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let q = Quantiles::of((1..=1000).map(f64::from).collect());
        assert_eq!((q.count, q.p50, q.p99, q.p999), (1000, 500.0, 990.0, 999.0));
        assert!(Quantiles::of(Vec::new()).p99.is_nan());
    }

    #[test]
    fn the_order_of_a_message_is_the_sn_of_its_page() {
        let r = sandbox::SubscribeRecord {
            msgid: 1,
            touser: "o".into(),
            template_id: "TPL_CHECKIN".into(),
            page: Some("pages/order/detail?sn=HSO123&x=1".into()),
            data: Value::Null,
            miniprogram_state: "formal".into(),
            lang: "zh_CN".into(),
            at: "2026-01-01T00:00:00.000Z".into(),
        };
        assert_eq!(order_of(&r).as_deref(), Some("HSO123"));
    }

    #[test]
    fn this_process_has_cpu_times() {
        let s = stat(std::process::id()).expect("own /proc/self/stat");
        assert!(s.ppid > 0);
        assert!(status_mib(std::process::id(), "VmRSS").is_some_and(|m| m > 0.0));
    }
}
