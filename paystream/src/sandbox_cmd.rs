//! `paystream sandbox`: WeChat (Pay v3, mini-program, Tencent SMS) on loopback, for tests, the
//! demo and load runs. Thin on purpose: everything real lives in the `sandbox` crate.
//!
//! - `paystream sandbox init --dir DIR [--listen ADDR] [--notify-url URL] [--force]` writes a
//!   development identity and `DIR/paystream.toml` (base URLs pointing at ADDR).
//! - `paystream sandbox --dir DIR [--listen ADDR] [--time-scale F] [--max-records N]` serves it (creating the
//!   identity first if DIR has none). Port 0 is allowed: the first line of stdout is
//!   `listening on http://HOST:PORT`, and `DIR/paystream.toml` is rewritten with that address.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

/// Arguments of `paystream sandbox`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SandboxArgs {
    #[command(subcommand)]
    pub command: Option<SandboxCommand>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum SandboxCommand {
    /// Write a development identity (keys, ids, secrets) and a paystream.toml into DIR.
    Init(InitArgs),
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Directory to write the identity into (created with mode 0700).
    #[arg(long)]
    pub dir: PathBuf,
    /// Address the sandbox will be served on; paystream.toml's base URLs point there.
    #[arg(long, default_value = sandbox::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Where the sandbox sends payment and refund callbacks (paystream's ingress).
    #[arg(long, default_value = sandbox::DEFAULT_NOTIFY_URL)]
    pub notify_url: String,
    /// Overwrite an identity already in DIR.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Identity directory (from `sandbox init`; created if it holds none).
    #[arg(long, env = "PAYSTREAM_SANDBOX_DIR")]
    pub dir: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = sandbox::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Divides WeChat's delays (callback retries, refund processing): 1000 makes 15 s 15 ms.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Also call back (and accept as notify_url) hosts other than loopback, over http too: a sandbox in a
    /// development cluster calling the ingress's Service. Off by default.
    #[arg(long)]
    pub allow_remote_callbacks: bool,
    /// Records each journal keeps (callback attempts, subscribe messages, SMS); the oldest go first. Default: the
    /// sandbox's (100,000).
    #[arg(long)]
    pub max_records: Option<usize>,
}

/// Runs `paystream sandbox …` until `shutdown` fires (serve) or the identity is written (init).
pub async fn run(args: SandboxArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    match args.command {
        Some(SandboxCommand::Init(init)) => {
            let options = sandbox::InitOptions {
                listen: Some(init.listen),
                notify_url: Some(init.notify_url),
                force: init.force,
            };
            let identity = sandbox::init(&init.dir, &options)
                .with_context(|| format!("writing a sandbox identity into {}", init.dir.display()))?;
            println!("wrote sandbox identity (mchid {}) and {}", identity.mchid, identity.config_path().display());
            Ok(())
        }
        None => serve(args.serve, shutdown).await,
    }
}

async fn serve(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let dir = args.dir.context("--dir DIR is required (the identity directory)")?;
    let identity = sandbox::load_or_init(&dir).with_context(|| format!("loading the identity in {}", dir.display()))?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let defaults = sandbox::SandboxOptions::default();
    let options = sandbox::SandboxOptions {
        time_scale: args.time_scale,
        allow_remote_callbacks: args.allow_remote_callbacks,
        max_records: args.max_records.unwrap_or(defaults.max_records),
        ..defaults
    };
    let server = sandbox::Sandbox::bind(identity, options, listener).context("starting the sandbox")?;
    // The first line of stdout is the contract with scripts and tests that start us on port 0.
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {}", server.base_url())?;
    out.flush()?;
    drop(out);
    eprintln!("paystream config for this sandbox: {}", dir.join(sandbox::CONFIG_FILE).display());
    server.run(shutdown).await.context("sandbox server")?;
    Ok(())
}
