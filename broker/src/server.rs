//! Runs a broker: recovery, the gRPC server (queues, health, reflection) and the HTTP
//! metrics endpoint, until shutdown; then syncs every log.

use sluice_proto::v1::queues_server::QueuesServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::broker::{Broker, BrokerOptions};
use crate::error::BrokerError;
use crate::metrics::{Metrics, serve_http};
use crate::service::QueueService;

/// Largest gRPC request accepted (a batch of large messages); each queue's own
/// limits are checked after decoding.
pub const MAX_REQUEST_BYTES: usize = 80 * 1024 * 1024;

/// HTTP/2 flow-control windows of client connections.
pub const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;

/// Concurrent calls per client connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 4096;

/// How long in-flight calls may run on after SIGTERM before the logs are closed.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// The gRPC routes of a broker, for embedding next to other services.
pub fn routes(broker: Arc<Broker>) -> tonic::service::Routes {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sluice_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the API's descriptor set is valid");
    let queues = QueuesServer::new(QueueService::new(broker))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_REQUEST_BYTES);
    let mut b = tonic::service::Routes::builder();
    b.add_service(queues).add_service(reflection);
    b.routes()
}

/// The connections `listener` accepts, with TCP_NODELAY set. tonic's
/// `Server::tcp_nodelay` applies only to listeners tonic binds itself, not to
/// `serve_with_incoming`: without this, Nagle's algorithm holds a small response
/// (a delivery, an ack) back until the peer's delayed ACK, up to 40 ms on Linux.
pub fn incoming_nodelay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |conn| {
        conn.and_then(|s| {
            s.set_nodelay(true)?;
            Ok(s)
        })
    })
}

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
    let http_task = http.map(|listener| {
        let mut rx = stop_rx.clone();
        tokio::spawn(serve_http(
            listener,
            metrics.registry(),
            ready.clone(),
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
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let mut server = tokio::spawn(
        builder
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

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Logs to stderr, filtered by RUST_LOG (default `info`), as JSON lines when asked.
pub fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
