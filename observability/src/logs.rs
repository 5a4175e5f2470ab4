use std::io::IsTerminal;

use serde::Deserialize;
use tracing_subscriber::{EnvFilter, fmt, layer::SubscriberExt, util::SubscriberInitExt};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal (a container), pretty otherwise.
    #[default]
    Auto,
    Json,
    Pretty,
}

/// The `[telemetry]` section of `paystream.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `auto`, `json` or `pretty`.
    pub log_format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `info,bus=debug`; `RUST_LOG` wins when set.
    pub log_filter: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { log_format: LogFormat::Auto, log_filter: "info".into() }
    }
}

/// Installs the global subscriber for a role. Calling it twice is harmless (the second call does nothing), which
/// lets `paystream all` start several roles in one process.
pub fn init(service: &'static str, cfg: &TelemetryConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.log_filter));
    let json = match cfg.log_format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if json {
        registry
            .with(fmt::layer().json().flatten_event(true).with_current_span(true).with_writer(std::io::stderr))
            .try_init()
    } else {
        registry.with(fmt::layer().with_writer(std::io::stderr)).try_init()
    };
    if installed.is_ok() {
        tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "telemetry initialised");
    }
}

/// For tests: silent unless `TEST_LOG` is set (then everything at `TEST_LOG`'s level, default `debug`, goes to the
/// test's captured output).
pub fn init_for_tests() {
    let Ok(level) = std::env::var("TEST_LOG") else { return };
    let level = if level.is_empty() || level == "1" { "debug".to_string() } else { level };
    let _ = tracing_subscriber::registry().with(EnvFilter::new(level)).with(fmt::layer().with_test_writer()).try_init();
}
