//! Prometheus metrics and the /metrics, /healthz, /readyz HTTP server.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// Which kind of error failed a reconciliation (`reconcile::Error::metric_label`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub error: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub reconciliations: Family<ResultLabel, Counter>,
    pub reconcile_errors: Family<ErrorLabel, Counter>,
    pub reconcile_duration: Histogram,
    pub queues_reconciled: Counter,
    pub invalid_specs: Counter,
    pub leader: Gauge,
    pub webhook_requests: Family<ResultLabel, Counter>,
    pub cert_rotations: Counter,
    /// Readiness: set once the webhook serves a certificate (or when the webhook is off).
    pub ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice_operator");
        let reconciliations = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reconciliations",
            "Queue reconciliations by result",
            reconciliations.clone(),
        );
        let reconcile_errors = Family::<ErrorLabel, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed and were retried, by kind of error",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Histogram::new([0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0]);
        registry.register(
            "reconcile_duration_seconds",
            "Time spent reconciling one Queue",
            reconcile_duration.clone(),
        );
        let queues_reconciled = Counter::default();
        registry.register(
            "queues_applied",
            "Queues whose owned objects were applied",
            queues_reconciled.clone(),
        );
        let invalid_specs = Counter::default();
        registry.register(
            "invalid_specs",
            "Reconciliations that found an invalid Queue spec",
            invalid_specs.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 when this replica holds the leader Lease",
            leader.clone(),
        );
        let webhook_requests = Family::<ResultLabel, Counter>::default();
        registry.register(
            "webhook_requests",
            "Admission requests by outcome (pods: injected, a skip reason, error; Queue updates: queue_allowed, queue_refused)",
            webhook_requests.clone(),
        );
        let cert_rotations = Counter::default();
        registry.register(
            "webhook_certificate_rotations",
            "Webhook serving certificates generated",
            cert_rotations.clone(),
        );
        Self {
            registry,
            reconciliations,
            reconcile_errors,
            reconcile_duration,
            queues_reconciled,
            invalid_specs,
            leader,
            webhook_requests,
            cert_rotations,
            ready: AtomicBool::new(false),
        }
    }

    pub fn reconcile_timer(&self) -> Timer<'_> {
        Timer {
            h: &self.reconcile_duration,
            start: Instant::now(),
        }
    }

    pub fn webhook(&self, result: &str) {
        self.webhook_requests
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }
}

pub struct Timer<'a> {
    h: &'a Histogram,
    start: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.h.observe(self.start.elapsed().as_secs_f64());
    }
}

pub fn router(m: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(m)
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &m.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}
