//! Server plumbing the broker and the sidecar share, one concern per module, so both
//! front ends of the same API set up their servers alike and a fix (a window size, a
//! socket option) reaches both.
//!
//! - [`transport`]: request size, HTTP/2 windows and streams, TCP_NODELAY, binding.
//! - [`http`]: `/metrics`, `/healthz` and `/readyz`.
//! - [`tls`]: PEM files to tonic's mutual TLS settings.
//! - [`reflection`]: gRPC server reflection, `v1` and `v1alpha`.
//! - [`signal`]: SIGTERM and Ctrl-C.
//! - [`logging`]: the tracing subscriber.

pub mod http;
pub mod logging;
pub mod reflection;
pub mod signal;
pub mod tls;
pub mod transport;

pub use http::serve_http;
pub use logging::init_tracing;
pub use signal::shutdown_signal;
pub use transport::{
    BindError, CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS, MAX_REQUEST_BYTES, STREAM_WINDOW, bind,
    grpc_server, incoming_nodelay,
};
