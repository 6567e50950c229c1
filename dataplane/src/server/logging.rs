//! The tracing subscriber: the log on stderr, and spans to an OTLP collector when one
//! is named.

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::prelude::*;

use crate::trace::SPAN_TARGET;

/// The OpenTelemetry environment variables that switch span export on: the standard
/// ones, so a chart value, an operator or a platform's own injection sets them alike.
pub const OTLP_ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Span export, flushed when dropped (at the end of `main`) so the last spans of a
/// stopping process reach the collector.
#[must_use = "dropping it stops span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("span export did not flush: {e}");
        }
    }
}

/// Logs to stderr (JSON lines when `json`), filtered by RUST_LOG; and, when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (or its traces-only form) is set, the enqueue,
/// delivery and settle spans of [`crate::trace`] to that OTLP collector over gRPC,
/// as `service` (unless OTEL_SERVICE_NAME says otherwise). Spans are kept out of the
/// log, and none is made while export is off.
/// Call within the Tokio runtime (the exporter's channel lives on it).
pub fn init_tracing(json: bool, service: &'static str) -> Telemetry {
    // openraft narrates every election and snapshot at info: a replicated broker's
    // own log says when it leads or follows, so by default only openraft's warnings
    // and errors (a peer unreachable, a failed write) show. RUST_LOG overrides.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"))
        .add_directive(
            format!("{SPAN_TARGET}=off")
                .parse()
                .expect("a valid directive"),
        );
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let (provider, failed) = match exporter(service) {
        Ok(p) => (p, None),
        Err(e) => (None, Some(e)),
    };
    let spans = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("sluice"))
            .with_filter(Targets::new().with_target(SPAN_TARGET, tracing::Level::TRACE))
    });
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(spans)
        .init();
    crate::trace::set_exporting(provider.is_some());
    match failed {
        // Telemetry never stops a broker: it serves without span export.
        Some(e) => {
            tracing::error!(error = %e, "span export is off: the OTLP exporter could not be set up")
        }
        None if provider.is_some() => tracing::info!("exporting spans over OTLP"),
        None => {}
    }
    Telemetry { provider }
}

fn exporter(service: &'static str) -> Result<Option<SdkTracerProvider>, String> {
    let named = OTLP_ENDPOINT_VARS
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()));
    if !named {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| e.to_string())?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    // The pod's identity, where the pod spec passes it down (broker and sidecar do).
    for (var, key) in [
        ("POD_NAME", "k8s.pod.name"),
        ("POD_NAMESPACE", "k8s.namespace.name"),
    ] {
        if let Ok(v) = std::env::var(var) {
            resource = resource.with_attribute(KeyValue::new(key, v));
        }
    }
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}
