//! Traces: an OpenTelemetry tracer provider bridged to `tracing`, and W3C trace-context propagation through NATS.
//!
//! Every `tracing` span is an OpenTelemetry span. A role exports them over OTLP/HTTP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `telemetry.otlp_endpoint`) names a collector; without one, spans still get
//! trace ids, so log lines and the `traceparent` of messages and responses still connect one payment's hops.
//!
//! Across the queue: an event created inside a span carries that span's `traceparent` ([`current_traceparent`],
//! stored in the envelope and the outbox row, sent as a NATS header); the consumer's span for it continues the trace
//! ([`continue_trace`]). So callback → payment → order → notification is one trace.

use std::collections::HashMap;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Where spans go and how many.
#[derive(Debug, Clone)]
pub(crate) struct TraceSettings {
    pub export: Export,
    /// Share of new traces recorded (a continued trace follows its parent's decision).
    pub sampling_ratio: f64,
}

/// Whether and where spans are exported over OTLP/HTTP.
#[derive(Debug, Clone)]
pub(crate) enum Export {
    Off,
    /// Where the standard variables say: the exporter reads `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` with `/v1/traces` appended.
    FromEnvironment,
    /// `telemetry.otlp_endpoint`, a base URL (`/v1/traces` is appended).
    To(String),
}

/// Builds the process-wide provider (once) and returns a tracer for the `tracing` bridge.
pub(crate) fn tracer(service: &'static str, settings: &TraceSettings) -> opentelemetry_sdk::trace::SdkTracer {
    let provider = PROVIDER.get_or_init(|| {
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service)
            .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.sampling_ratio)));
        let mut builder = SdkTracerProvider::builder().with_sampler(sampler).with_resource(resource);
        let exporter = match &settings.export {
            Export::Off => None,
            Export::FromEnvironment => Some(opentelemetry_otlp::SpanExporter::builder().with_http().build()),
            Export::To(endpoint) => {
                use opentelemetry_otlp::WithExportConfig as _;
                let traces = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
                Some(opentelemetry_otlp::SpanExporter::builder().with_http().with_endpoint(traces).build())
            }
        };
        match exporter {
            Some(Ok(exporter)) => builder = builder.with_batch_exporter(exporter),
            // Telemetry must never stop a payment service: say so and run without export.
            Some(Err(e)) => eprintln!("paystream: OTLP exporter not started ({e}); traces are not exported"),
            None => {}
        }
        builder.build()
    });
    provider.tracer("paystream")
}

/// Exports what is still buffered; call before the process exits.
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        // Shutting down flushes the batch processor first.
        let _ = p.shutdown();
    }
}

/// The W3C `traceparent` of the current span, if it belongs to a trace.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The W3C `traceparent` of `span`.
fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the producer whose `traceparent` it got (a message header, an HTTP header), and records
/// the trace id in its `trace_id` field (when it declares one) so log lines carry it. A missing or malformed value
/// leaves `span` the root of a new trace.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(tp) = traceparent {
        let carrier = HashMap::from([("traceparent".to_owned(), tp.to_owned())]);
        let cx = TraceContextPropagator::new().extract(&carrier);
        if cx.span().span_context().is_valid() {
            let _ = span.set_parent(cx);
        }
    }
    if let Some(id) = trace_id_of(span) {
        span.record("trace_id", id.as_str());
    }
}

/// The trace id of `span` as 32 hex digits, if it belongs to a trace.
fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}
