//! `paystream`: one binary, every role. See `paystream --help`.

/// mimalloc instead of glibc's malloc: allocation and free were about 14 % of the ingress's CPU under load
/// (`perf` on `bench ingest`), glibc's arenas grow per thread, and mimalloc is a well-kept allocator made for
/// many small, short-lived allocations across threads (a request's, a message's).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod attention_cmd;
mod bench;
mod bench_e2e;
mod bench_edge;
mod bench_pipeline;
mod config;
mod demo;
mod dlq_cmd;
mod outbox_cmd;
mod roles;
mod sandbox_cmd;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(name = "paystream", version, about = "WeChat Pay back end on NATS JetStream and PostgreSQL")]
struct Cli {
    /// Configuration file (default: $PAYSTREAM_CONFIG, else ./paystream.toml if present). Environment variables
    /// PAYSTREAM__SECTION__KEY override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every role in one process (development, the demo).
    All,
    /// Run the HTTP API (user, order and payment endpoints, WeChat's callback).
    Ingress,
    /// Run the notifier (mini-program subscribe messages and SMS).
    Notifier,
    /// Run the outbox relay.
    Relay,
    /// Run one processor (with an outbox relay).
    Processor {
        #[arg(value_enum)]
        name: roles::Processor,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Check the configuration and print it with secrets hidden; `--role processor payment` checks it as that role
    /// reads it (only the sections the role uses, so only their secrets are needed).
    Config {
        #[arg(long, num_args = 1..=2, value_name = "ROLE")]
        role: Vec<String>,
    },
    /// WeChat on loopback (Pay v3, mini-program, SMS) for tests and the demo.
    Sandbox(sandbox_cmd::SandboxArgs),
    /// List dead letters, or republish them to their subject (consumers are idempotent).
    Dlq(dlq_cmd::DlqArgs),
    /// Outbox rows NATS refused for good (parked by the relays): list them, or let the relays try them again.
    Outbox(outbox_cmd::OutboxArgs),
    /// Orders the automatic passes gave up on until a person looks at them: list them, or give one back.
    Attention(attention_cmd::AttentionArgs),
    /// Walk one payment through a running system over HTTP and print each step.
    Demo(demo::DemoArgs),
    /// Benchmarks (not tests): figures next to a reference measured in the same run.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("paystream: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // Export the spans still buffered (outside the runtime: the exporter blocks).
    observability::trace::shutdown();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("paystream: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The configuration sections and secrets a role does not read (given as its command words, e.g.
/// `processor order`). The payment processor checks reports against the app and merchant ids and holds no WeChat
/// secret; the notifier calls the mini-program API only (no APIv3 key); the lifecycle processor calls WeChat Pay
/// only (no AppSecret).
fn unused_sections(role: &[&str]) -> anyhow::Result<&'static [&'static str]> {
    const NONE: &[&str] = &["http", "wechat", "sms", "notifier"];
    Ok(match role {
        [] | ["all"] => &[],
        ["ingress"] => &["sms", "notifier"],
        ["notifier"] => &["http", "wechat.apiv3_key"],
        ["relay"] | ["processor", "order"] => NONE,
        // Migrations touch PostgreSQL only: no NATS password either.
        ["migrate"] => &["http", "wechat", "sms", "notifier", "nats"],
        ["processor", "payment"] => &["http", "sms", "notifier", "wechat.apiv3_key", "wechat.miniprogram_secret"],
        ["processor", "lifecycle"] => &["http", "sms", "notifier", "wechat.miniprogram_secret"],
        other => anyhow::bail!(
            "unknown role {:?}: all, ingress, notifier, relay, migrate, processor payment|order|lifecycle",
            other.join(" ")
        ),
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signal();
    if let Command::Sandbox(args) = cli.command {
        // The sandbox is WeChat, not paystream: it needs none of paystream's configuration.
        observability::init("wechat-sandbox", &Default::default());
        return sandbox_cmd::run(args, shutdown).await;
    }
    let path = config::config_path(cli.config.as_deref());
    // Each role reads only the sections it uses, so it needs (and holds) only their secrets.
    let (role, unused) = match &cli.command {
        Command::All => ("paystream-all", unused_sections(&[])?),
        Command::Ingress => ("paystream-ingress", unused_sections(&["ingress"])?),
        Command::Notifier => ("paystream-notifier", unused_sections(&["notifier"])?),
        Command::Relay => ("paystream-relay", unused_sections(&["relay"])?),
        Command::Migrate => ("paystream-migrate", unused_sections(&["migrate"])?),
        Command::Processor { name } => ("paystream-processor", unused_sections(&["processor", name.word()])?),
        Command::Config { role } => {
            ("paystream-config", unused_sections(&role.iter().map(String::as_str).collect::<Vec<_>>())?)
        }
        Command::Demo(_) => ("paystream-demo", unused_sections(&[])?),
        Command::Dlq(_) => ("paystream-dlq", unused_sections(&[])?),
        Command::Outbox(_) => ("paystream-outbox", unused_sections(&["migrate"])?),
        Command::Attention(_) => ("paystream-attention", unused_sections(&["migrate"])?),
        Command::Bench { .. } => ("paystream-bench", unused_sections(&[])?),
        Command::Sandbox(_) => unreachable!("handled above"),
    };
    let cfg = Config::load_for(path.as_deref(), unused)?;
    observability::init(role, &cfg.telemetry);
    match cli.command {
        Command::All => roles::all(&cfg, shutdown).await,
        Command::Ingress => roles::ingress(&cfg, shutdown).await,
        Command::Notifier => roles::notifier(&cfg, shutdown).await,
        Command::Relay => roles::relay(&cfg, shutdown).await,
        Command::Processor { name } => roles::processor(name, &cfg, shutdown).await,
        Command::Migrate => roles::migrate(&cfg).await,
        Command::Config { .. } => {
            println!(
                "# configuration is valid ({})",
                path.map_or("defaults and environment".into(), |p| p.display().to_string())
            );
            println!("{cfg:#?}");
            Ok(())
        }
        Command::Demo(args) => demo::run(&cfg, args).await,
        Command::Dlq(args) => dlq_cmd::run(&cfg, args).await,
        Command::Outbox(args) => outbox_cmd::run(&cfg, args).await,
        Command::Attention(args) => attention_cmd::run(&cfg, args).await,
        Command::Bench { which } => bench::run(&cfg, which).await,
        Command::Sandbox(_) => unreachable!("handled above"),
    }
}

/// A token cancelled on SIGINT or SIGTERM: every role stops pulling, finishes in-flight work and exits.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler installs");
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested; draining");
        t.cancel();
    });
    token
}
