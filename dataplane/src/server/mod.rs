//! Server plumbing the broker and the sidecar share, one concern per module, so both
//! front ends of the same API set up their servers alike and a fix (a window size, a
//! socket option) reaches both.
//!
//! - [`transport`]: request size, HTTP/2 windows and streams, TCP_NODELAY, binding.
//! - [`http`]: `/metrics`, `/healthz` and `/readyz`.
//! - [`tls`]: PEM files to tonic's mutual TLS settings.
//! - [`reflection`]: gRPC server reflection, `v1` and `v1alpha`.
//! - [`signal`]: SIGTERM and Ctrl-C.
//! - [`logging`]: the tracing subscriber, and span export over OTLP.
//! - [`tunnel`]: gRPC through an HTTP/1.1 upgrade (the API server's pod proxy).

pub mod http;
pub mod logging;
pub mod reflection;
pub mod signal;
pub mod tls;
pub mod transport;
pub mod tunnel;

pub use http::serve_http;
pub use logging::{Telemetry, init_tracing};
pub use signal::shutdown_signal;
pub use transport::{
    BindError, CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS, MAX_REQUEST_BYTES, STREAM_WINDOW, bind,
    grpc_server, incoming_nodelay,
};
