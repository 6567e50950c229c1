//! The Sluice sidecar: the `sluice.v1.Queues` API on localhost, routed to the
//! broker pods of each queue.
//!
//! - [`routes`]: which addresses serve which queue.
//! - [`router`]: broker discovery, partition ownership, per-partition batching.
//! - [`credentials`]: the ServiceAccount token each route presents to its brokers.
//! - [`service`]: the API, call by call.
//! - [`subscription`]: Subscribe relayed over broker Subscribe streams.

pub mod credentials;
pub mod metrics;
pub mod router;
pub mod routes;
pub mod service;
pub mod subscription;

use sluice_broker::server::{CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS, STREAM_WINDOW};
use sluice_proto::v1::queues_server::QueuesServer;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;

pub use router::Router;
pub use service::SidecarService;

/// Serves the API on `grpc` (and readiness/metrics on `http`) until `shutdown`.
/// Readiness (HTTP /readyz and gRPC health) follows whether every queue has a broker.
pub async fn run(
    router: Arc<Router>,
    grpc: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    router.start().await;
    let ready = Arc::new(AtomicBool::new(router.is_ready()));
    let (health, health_service) = tonic_health::server::health_reporter();
    {
        let (router, ready, health) = (router.clone(), ready.clone(), health.clone());
        tokio::spawn(async move {
            loop {
                let now = router.is_ready();
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
        let registry = metrics::registry(&router);
        tokio::spawn(sluice_broker::metrics::serve_http(
            listener,
            registry,
            ready.clone(),
            async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            },
        ));
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sluice_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the API's descriptor set is valid");
    let max = sluice_broker::server::MAX_REQUEST_BYTES;
    tracing::info!(addr = ?grpc.local_addr().ok(), ready = router.is_ready(), "sidecar serving");
    let result = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Large windows: h2 budgets the overhead of small DATA frames against
        // half the connection window, and gRPC messages of a queue are often tiny;
        // with the 64 KiB default, a burst of ~150 concurrent small calls on one
        // connection ends in GOAWAY(ENHANCE_YOUR_CALM).
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .initial_stream_window_size(Some(STREAM_WINDOW))
        // hyper's default of 200 makes a burst of new streams on a fresh
        // connection fail before the client has seen the server's settings.
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .add_service(
            QueuesServer::new(SidecarService::new(router))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(sluice_broker::server::incoming_nodelay(grpc), shutdown)
        .await;
    let _ = stop_tx.send(true);
    result
}
