//! Runs a broker: recovery, the gRPC server (queues, health, reflection) and the HTTP
//! metrics endpoint, until shutdown; then syncs every log.

use sluice_config::report::{PARTITIONS_PATH, PartitionReport};
use sluice_dataplane::server::reflection::reflection_routes;
use sluice_dataplane::server::tunnel::tunnel_route;
use sluice_dataplane::server::{
    BindError, MAX_REQUEST_BYTES, grpc_server, incoming_nodelay, serve_http,
};
use sluice_proto::v1::queues_server::QueuesServer;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;

use crate::broker::{Broker, BrokerOptions};
use crate::error::BrokerError;
use crate::metrics::Metrics;
use crate::replica::service::ReplicationService;
use crate::service::QueueService;
use sluice_proto::replication::replication_server::ReplicationServer;

/// How long in-flight calls may run on after SIGTERM before the logs are closed.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("the gRPC listener's address: {0}")]
    Listener(#[from] std::io::Error),
}

/// The gRPC routes of a broker, for embedding next to other services.
pub fn routes(broker: Arc<Broker>) -> tonic::service::Routes {
    let replication = ReplicationServer::new(ReplicationService::new(broker.groups.clone()))
        .max_decoding_message_size(REPLICATION_MESSAGE_BYTES)
        .max_encoding_message_size(REPLICATION_MESSAGE_BYTES);
    let queues = QueuesServer::new(QueueService::new(broker))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_REQUEST_BYTES);
    reflection_routes()
        .add_service(queues)
        .add_service(replication)
}

/// `GET /partitions`: every copy of a partition this broker holds, with its role
/// ([`PartitionReport`]); the operator reads it into the Queue's status.
fn partitions_route(broker: &Arc<Broker>) -> axum::Router {
    let broker = Arc::downgrade(broker);
    axum::Router::new().route(
        PARTITIONS_PATH,
        axum::routing::get(move || {
            let reports: Vec<PartitionReport> = broker
                .upgrade()
                .map(|b| b.queues().iter().flat_map(|q| q.reports()).collect())
                .unwrap_or_default();
            std::future::ready(axum::Json(reports))
        }),
    )
}

/// Largest replication message: up to 256 entries (openraft's batch) of records.
const REPLICATION_MESSAGE_BYTES: usize = 1 << 30;

/// Opens the broker and serves it on `grpc` (and `/metrics` on `http`) until
/// `shutdown` resolves; then finishes in-flight calls and syncs the logs. Serving
/// starts before the logs are replayed: each queue answers once its own log is, and
/// readiness (HTTP `/readyz`, gRPC health) follows once every queue is. A queue that
/// cannot be recovered stops the broker with that error.
pub async fn run(
    options: BrokerOptions,
    grpc: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let metrics = Metrics::new();
    let tls = options.tls.clone();
    let broker = Broker::open(options, metrics.clone())?;
    metrics.attach(&broker);
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grpc_addr = grpc.local_addr()?;
    let http_task = http.map(|listener| {
        let mut rx = stop_rx.clone();
        tokio::spawn(serve_http(
            listener,
            metrics.registry(),
            ready.clone(),
            partitions_route(&broker).merge(tunnel_route(grpc_addr)),
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        ))
    });
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<QueuesServer<QueueService>>().await;
    let addr = grpc.local_addr().ok();
    tracing::info!(
        ?addr,
        tls = tls.is_some(),
        "broker serving; recovering queues"
    );
    let recovery_started = std::time::Instant::now();
    let mut recovery = tokio::spawn({
        let broker = broker.clone();
        async move { broker.recover().await }
    });
    let mut recovering = true;
    let (grpc_stop, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut builder = grpc_server();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let mut server = tokio::spawn(
        builder
            .add_routes(routes(broker.clone()))
            .add_service(health_service)
            .serve_with_incoming_shutdown(incoming_nodelay(grpc), async move {
                let _ = grpc_stopped.await;
            }),
    );
    tokio::pin!(shutdown);
    let mut failed: Option<BrokerError> = None;
    let result = loop {
        tokio::select! {
            done = &mut recovery, if recovering => {
                recovering = false;
                match done.map_err(|e| BrokerError::Internal(format!("recovery: {e}"))).and_then(|r| r) {
                    Ok(()) => {
                        tracing::info!(
                            queues = broker.queues().len(),
                            took_ms = recovery_started.elapsed().as_millis() as u64,
                            "every queue recovered; ready"
                        );
                        health.set_serving::<QueuesServer<QueueService>>().await;
                        ready.store(true, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "recovery failed: stopping");
                        failed = Some(e);
                        let _ = grpc_stop.send(());
                        server.abort();
                        break Ok(Ok(()));
                    }
                }
            }
            r = &mut server => break r,
            _ = &mut shutdown => {
                tracing::info!("shutting down: finishing in-flight calls");
                let _ = grpc_stop.send(());
                // Long polls and subscriptions never end by themselves: give calls a
                // grace period, then close the logs under whatever is left.
                break match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::info!("grace period over: closing remaining streams");
                        server.abort();
                        Ok(Ok(()))
                    }
                };
            }
        }
    };
    let result = result.unwrap_or(Ok(()));
    ready.store(false, Ordering::Relaxed);
    broker.close().await;
    let _ = stop_tx.send(true);
    if let Some(t) = http_task {
        let _ = t.await;
    }
    tracing::info!("broker stopped; logs synced");
    if let Some(e) = failed {
        return Err(e.into());
    }
    result.map_err(Into::into)
}
