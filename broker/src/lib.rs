//! The Sluice broker.
//!
//! - [`log`]: the append-only segmented log with group commit and recovery.
//! - [`partition`]: queue semantics of one partition, free of I/O.
//! - [`queue`]: partitions put together with their logs, timers and waiters.
//! - [`broker`]: the queues a broker serves.
//! - [`auth`]: who may use a queue (ServiceAccount tokens, TokenReview).
//! - [`service`]: the `sluice.v1.Queues` gRPC service.
//! - [`server`]: runs it all, with health, reflection and metrics.
//! - [`tls`]: the mutual TLS settings of brokers and sidecars.

pub mod auth;
pub mod broker;
pub mod error;
pub mod log;
pub mod metrics;
pub mod partition;
pub mod queue;
pub mod server;
pub mod service;
pub mod tls;

pub use broker::{Broker, BrokerOptions};
pub use error::BrokerError;
