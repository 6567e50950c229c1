//! How a Sluice gRPC server (and the sidecar's client of the brokers) talks HTTP/2 and
//! TCP: the largest request, the flow-control windows, concurrent streams, and
//! TCP_NODELAY on every accepted connection.

use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// Largest gRPC request accepted (a batch of large messages); each queue's own
/// limits are checked after decoding.
pub const MAX_REQUEST_BYTES: usize = 80 * 1024 * 1024;

/// HTTP/2 flow-control windows of client connections.
pub const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;

/// Concurrent calls per client connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 4096;

#[derive(Debug, thiserror::Error)]
#[error("binding {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// A gRPC server with Sluice's transport settings; add TLS and services, then serve
/// with [`incoming_nodelay`].
pub fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
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
