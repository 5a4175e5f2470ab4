use std::io::IsTerminal;

use serde::Deserialize;
use tracing_subscriber::{EnvFilter, Layer as _, fmt, layer::SubscriberExt, util::SubscriberInitExt};

use crate::trace::{Export, TraceSettings, tracer};

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
    /// An `EnvFilter` directive such as `info` or `info,bus=debug`; `RUST_LOG` wins when set. Applies to log lines
    /// only: spans are traced whatever the log level.
    pub log_filter: String,
    /// OTLP/HTTP collector base URL, such as `http://otel-collector:4318`; `OTEL_EXPORTER_OTLP_ENDPOINT` wins when
    /// set. Unset: spans are not exported (trace ids still connect log lines and messages).
    pub otlp_endpoint: Option<String>,
    /// Share of new traces recorded, 0 to 1 (a trace continued from a message or a request follows its parent).
    pub sampling_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { log_format: LogFormat::Auto, log_filter: "info".into(), otlp_endpoint: None, sampling_ratio: 1.0 }
    }
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(format!("telemetry.sampling_ratio ({}) must be between 0 and 1", self.sampling_ratio));
        }
        if let Some(e) = &self.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(format!("telemetry.otlp_endpoint ({e:?}) must be an http:// or https:// URL"));
        }
        Ok(())
    }

    fn trace_settings(&self) -> TraceSettings {
        // The environment wins over the file, as the OpenTelemetry specification has it.
        let set = |var: &str| std::env::var(var).is_ok_and(|v| !v.trim().is_empty());
        let export = if set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT") {
            Export::FromEnvironment
        } else {
            self.otlp_endpoint.clone().map_or(Export::Off, Export::To)
        };
        TraceSettings { export, sampling_ratio: self.sampling_ratio }
    }
}

/// Which spans become OpenTelemetry spans: paystream's own, at info and above (the HTTP client's and the
/// database driver's internals would only add noise).
fn trace_filter() -> EnvFilter {
    EnvFilter::new(
        "warn,paystream=info,ingress=info,processors=info,notifier=info,bus=info,storage=info,wechat=info,observability=info",
    )
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
    let otel =
        tracing_opentelemetry::layer().with_tracer(tracer(service, &cfg.trace_settings())).with_filter(trace_filter());
    let registry = tracing_subscriber::registry().with(otel);
    // Log lines carry the fields of every span they are in (`span_list`), among them the `trace_id` the entry spans
    // (HTTP request, consumed event) record.
    let installed = if json {
        registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(true)
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init()
    } else {
        registry.with(fmt::layer().with_writer(std::io::stderr).with_filter(filter)).try_init()
    };
    if installed.is_ok() {
        tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "telemetry initialised");
    }
}

/// For tests: spans get trace ids (nothing is exported), and logs are silent unless `TEST_LOG` is set (then
/// everything at `TEST_LOG`'s level, default `debug`, goes to the test's captured output).
pub fn init_for_tests() {
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer("paystream-test", &TraceSettings { export: Export::Off, sampling_ratio: 1.0 }))
        .with_filter(trace_filter());
    let logs = std::env::var("TEST_LOG").ok().map(|level| {
        let level = if level.is_empty() || level == "1" { "debug".to_string() } else { level };
        fmt::layer().with_test_writer().with_filter(EnvFilter::new(level))
    });
    let _ = tracing_subscriber::registry().with(otel).with(logs).try_init();
}
