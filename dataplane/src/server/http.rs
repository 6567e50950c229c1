//! The HTTP side of a Sluice process: Prometheus text on `/metrics`, liveness on
//! `/healthz`, readiness on `/readyz` (what Kubernetes probes). The process owns its
//! registry and says when it is ready; this only serves them, beside the routes of
//! its own it adds (the broker's `/partitions`).

use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Serves `/metrics`, `/healthz`, `/readyz` and `routes` until `shutdown` resolves.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    registry: Registry,
    ready: Arc<std::sync::atomic::AtomicBool>,
    routes: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::{http::StatusCode, routing::get};
    let registry = Arc::new(registry);
    let app = routes
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut out = String::new();
                    match prometheus_client::encoding::text::encode(&mut out, &registry) {
                        Ok(()) => (
                            StatusCode::OK,
                            [(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            out,
                        ),
                        Err(_) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            [("content-type", "text/plain")],
                            "encoding failed".to_string(),
                        ),
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready.load(std::sync::atomic::Ordering::Relaxed) {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }
            }),
        );
    // With the peer's address, for routes that answer only from inside the pod.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
