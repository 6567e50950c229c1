//! The Sluice sidecar: the `sluice.v1.Queues` API on localhost, routed to the
//! broker pods of each queue.
//!
//! Layers, each importing only those above it in this list:
//!
//! - [`routes`]: which addresses serve which queue.
//! - [`credentials`]: the ServiceAccount token each route presents to its brokers.
//! - [`metrics`]: batch sizes, and brokers up (asked of the router at scrape time).
//! - [`batcher`]: concurrent single enqueues to a partition gathered into batches.
//! - [`router`]: broker discovery, partition ownership, enqueues sent to owners.
//! - [`settle`]: acks, nacks and extensions sent to the owners of their partitions.
//! - [`subscription`]: Subscribe relayed over broker Subscribe streams.
//! - [`drain`]: the shutdown (no new deliveries, settles until the grace ends).
//! - [`service`]: the API, call by call.
//!
//! What the broker speaks too (validators, receipts, partitioning, the subscription
//! loop, server plumbing) is in `sluice-dataplane`. The broker itself is linked only
//! with the `embedded` feature (`sluice-sidecar --embedded`).

pub mod batcher;
pub mod credentials;
pub mod drain;
pub mod metrics;
pub mod router;
pub mod routes;
pub mod service;
pub mod settle;
pub mod subscription;

use sluice_dataplane::server::reflection::reflection_routes;
use sluice_dataplane::server::{MAX_REQUEST_BYTES, grpc_server, incoming_nodelay, serve_http};
use sluice_proto::v1::queues_server::QueuesServer;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;

pub use drain::Drain;
pub use router::Router;
pub use service::SidecarService;

/// What the sidecar's readiness (HTTP /readyz and gRPC health) follows. Either way it
/// turns false once the sidecar drains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Readiness {
    /// The sidecar serves: a queue that is missing, denied or down neither holds the
    /// app's pod back nor takes it out of its Services (its calls answer why:
    /// NOT_FOUND, PERMISSION_DENIED, UNAVAILABLE), and the route is picked up when the
    /// queue's brokers appear. What Dapr's sidecar does.
    #[default]
    Serving,
    /// Also every queue has a broker that answers: asked for by the pod
    /// (`sluice.dev/ready-requires-brokers: "true"`) when it must not take traffic
    /// without its queues.
    BrokersReachable,
}

impl Readiness {
    fn ready(self, router: &Router) -> bool {
        self == Readiness::Serving || router.is_ready()
    }
}

/// Serves the API on `grpc` (and readiness/metrics on `http`). When `shutdown`
/// resolves, or the app posts `/shutdown` to `http` from inside the pod, the sidecar
/// drains ([`drain`]) for `grace`, then stops. Readiness: see [`Readiness`].
pub async fn run(
    router: Arc<Router>,
    grpc: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: std::time::Duration,
    readiness: Readiness,
) -> Result<(), tonic::transport::Error> {
    router.start().await;
    let drain = Drain::default();
    let ready = Arc::new(AtomicBool::new(readiness.ready(&router)));
    let (health, health_service) = tonic_health::server::health_reporter();
    {
        let (router, ready, health) = (router.clone(), ready.clone(), health.clone());
        let drain = drain.clone();
        tokio::spawn(async move {
            loop {
                let now = readiness.ready(&router) && !drain.is_draining();
                ready.store(now, Ordering::Relaxed);
                if now {
                    health.set_serving::<QueuesServer<SidecarService>>().await;
                } else {
                    health
                        .set_not_serving::<QueuesServer<SidecarService>>()
                        .await;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        });
    }
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    if let Some(listener) = http {
        let registry = metrics::registry(&router.metrics, &router);
        tokio::spawn(serve_http(
            listener,
            registry,
            ready.clone(),
            shutdown_route(drain.clone()),
            async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            },
        ));
    }
    // Asked to stop: drain for the grace period, then stop serving.
    let stopped = {
        let (drain, ready) = (drain.clone(), ready.clone());
        async move {
            tokio::select! {
                _ = shutdown => {}
                _ = drain.started() => {}
            }
            drain.start();
            ready.store(false, Ordering::Relaxed);
            tokio::time::sleep(grace).await;
            tracing::info!("grace period over: stopping");
        }
    };
    let max = MAX_REQUEST_BYTES;
    tracing::info!(addr = ?grpc.local_addr().ok(), brokers_reachable = router.is_ready(), ?readiness, "sidecar serving");
    let result = grpc_server()
        .add_routes(reflection_routes())
        .add_service(
            QueuesServer::new(SidecarService::new(router, drain))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(health_service)
        .serve_with_incoming_shutdown(incoming_nodelay(grpc), stopped)
        .await;
    let _ = stop_tx.send(true);
    result
}

/// `POST /shutdown`: the app asks the sidecar to drain and stop (a Job whose work is
/// done, so its pod can complete). Only from inside the pod: the HTTP port also
/// answers the kubelet's probes on the pod's address, and nobody else may stop it.
fn shutdown_route(drain: Drain) -> axum::Router {
    use axum::extract::ConnectInfo;
    use axum::http::StatusCode;
    axum::Router::new().route(
        "/shutdown",
        axum::routing::post(
            move |ConnectInfo(from): ConnectInfo<std::net::SocketAddr>| {
                let drain = drain.clone();
                async move {
                    if from.ip().is_loopback() {
                        drain.start();
                        (StatusCode::ACCEPTED, "draining, then stopping")
                    } else {
                        (StatusCode::FORBIDDEN, "only from inside the pod (loopback)")
                    }
                }
            },
        ),
    )
}
