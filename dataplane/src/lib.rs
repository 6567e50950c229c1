//! What the broker and the sidecar both speak, written once. Both serve
//! `sluice.v1.Queues`; what a request may carry, which partition a message goes to,
//! how receipts split by partition, how a Subscribe stream is driven and how a gRPC
//! server is set up must not drift apart between them. This crate sits below both
//! (above `sluice-config` and `sluice-proto`) and holds no storage and no Kubernetes
//! client, so the sidecar builds without either.
//!
//! - [`validate`]: request limits and the checks of messages and settings in calls.
//! - [`receipts`]: receipts of one call grouped by partition; the settle operations.
//! - [`partitioning`]: which partition a new message goes to.
//! - [`subscription`]: the one loop that drives a Subscribe stream, over a backend.
//! - [`trace`]: W3C trace context from an enqueue's metadata into the message.
//! - [`server`]: gRPC and HTTP server plumbing (windows, TLS, signals, tracing,
//!   reflection, `/metrics` and `/readyz`).

pub mod partitioning;
pub mod receipts;
pub mod server;
pub mod subscription;
pub mod trace;
pub mod validate;

pub use receipts::SettleOp;
pub use validate::Invalid;
