//! Logs, metrics and (later) traces for every paystream role.
//!
//! - [`init`] installs the process-wide `tracing` subscriber: JSON lines, or human-readable output when stderr is a
//!   terminal; [`init_for_tests`] keeps tests quiet unless `TEST_LOG` is set.
//! - [`registry`] is the one Prometheus registry; crates declare their metrics once against it and
//!   [`metrics_router`] serves it as `/metrics`.
//! - [`mask`] shortens secrets and personal identifiers (openids, phone numbers) before they reach a log line.

mod logs;
mod mask;
mod metrics;

pub use logs::{LogFormat, TelemetryConfig, init, init_for_tests};
pub use mask::{Masked, mask};
pub use metrics::{metrics_router, registry, render_metrics};
