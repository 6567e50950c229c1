//! The Sluice broker.
//!
//! - [`log`]: the append-only segmented log with group commit and recovery.
//! - [`partition`]: queue semantics of one partition, free of I/O.
//! - [`journal`]: where a partition's records go: its log, or its Raft group.
//! - [`replica`]: replicated partitions (a Raft group per partition, openraft).
//! - [`queue`]: partitions put together with their journals, timers and waiters.
//! - [`broker`]: the queues a broker serves.
//! - [`auth`]: who may use a queue (ServiceAccount tokens behind a `TokenVerifier`;
//!   the Kubernetes TokenReview one with the `tokenreview` feature).
//! - [`service`]: the `sluice.v1.Queues` gRPC service.
//! - [`server`]: runs it all, with health, reflection and metrics.
//!
//! What the sidecar speaks too (validators, receipts, partitioning, the subscription
//! loop, server plumbing, TLS files) is in `sluice-dataplane`.

pub mod auth;
pub mod broker;
pub mod error;
pub mod journal;
pub mod log;
pub mod metrics;
pub mod partition;
pub mod queue;
pub mod replica;
pub mod server;
pub mod service;

pub use broker::{Broker, BrokerOptions};
pub use error::BrokerError;
