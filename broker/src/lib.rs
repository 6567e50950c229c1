//! The Sluice broker.
//!
//! - [`log`]: the append-only segmented log with group commit and recovery.
//! - [`partition`]: queue semantics of one partition, free of I/O.
//! - [`queue`]: partitions put together with their logs, timers and waiters.
//! - [`broker`]: the queues a broker serves.
//! - [`service`]: the `sluice.v1.Queues` gRPC service.
//! - [`metrics`]: Prometheus metrics and the HTTP health endpoints.

pub mod log;
pub mod partition;
