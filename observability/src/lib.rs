//! Logs, metrics and traces for every paystream role.
//!
//! - [`init`] installs the process-wide `tracing` subscriber: JSON lines, or human-readable output when stderr is a
//!   terminal; [`init_for_tests`] keeps tests quiet unless `TEST_LOG` is set.
//! - [`registry`] is the one Prometheus registry; crates declare their metrics once against it and
//!   [`metrics_router`] serves it as `/metrics`.
//! - [`trace`]: the OpenTelemetry tracer provider behind `tracing` (OTLP/HTTP export when configured) and W3C
//!   trace-context propagation through message headers ([`trace::current_traceparent`], [`trace::continue_trace`]).
//! - [`mask`] shortens secrets and personal identifiers (openids, phone numbers) before they reach a log line.

mod logs;
mod mask;
mod metrics;
pub mod trace;

pub use logs::{LogFormat, TelemetryConfig, init, init_for_tests};
pub use mask::{Masked, mask};
pub use metrics::{metrics_router, registry, render_metrics};
