//! What a benchmarked system must offer. Sluice (straight to the broker, or through
//! the sidecar) implements it, and so do the peers, NATS JetStream and RabbitMQ.

use anyhow::Result;
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a consumer takes messages off a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConsumerMode {
    /// A push stream with credit-based flow control and inline acks
    /// (Sluice: `Subscribe`; JetStream: push consumer; RabbitMQ: basic.consume + prefetch).
    Subscribe,
    /// Pull batches and ack each batch with one call
    /// (Sluice: `Dequeue` + `Ack`; JetStream: pull consumer; RabbitMQ: basic.get).
    Dequeue,
}

impl ConsumerMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerMode::Subscribe => "subscribe",
            ConsumerMode::Dequeue => "dequeue",
        }
    }
}

/// How a throughput producer sends, as users drive each system: one message in
/// flight and waiting for its durable answer; a window of that many in flight on the
/// one connection (NATS's async publish, RabbitMQ's confirms with a window, gRPC's
/// concurrent calls); or batches of that many in one call (Sluice's `EnqueueBatch`;
/// the peers pipeline the batch and wait for every confirmation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProducerStyle {
    One,
    Window(u32),
    Batch(u32),
}

impl ProducerStyle {
    pub fn label(self) -> String {
        match self {
            ProducerStyle::One => "one".into(),
            ProducerStyle::Window(n) => format!("window{n}"),
            ProducerStyle::Batch(n) => format!("batch{n}"),
        }
    }
}

impl std::str::FromStr for ProducerStyle {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let count = |rest: &str| match rest.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(format!(
                "{s:?}: expected one, window<N> or batch<N> (N ≥ 1)"
            )),
        };
        if s == "one" {
            Ok(ProducerStyle::One)
        } else if let Some(rest) = s.strip_prefix("window") {
            count(rest).map(ProducerStyle::Window)
        } else if let Some(rest) = s.strip_prefix("batch") {
            count(rest).map(ProducerStyle::Batch)
        } else {
            Err(format!("{s:?}: expected one, window<N> or batch<N>"))
        }
    }
}

/// Knobs every system gets from the command line.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub name: String,
}

/// A system under test: starts its servers (as child processes, on loopback) and hands
/// out clients. Everything it starts is stopped by `teardown` or, failing that, on drop.
#[tonic::async_trait]
pub trait System: Send + Sync {
    /// Short name for tables, e.g. `sluice-direct`.
    fn name(&self) -> &str;
    /// One line on how the system is set up (durability, partitions, hops).
    fn describe(&self) -> String;
    /// Starts the servers and creates the queues the scenarios will use; each queue
    /// is durable (a message is on disk before its enqueue is answered).
    async fn setup(&mut self, queues: &[QueueSpec]) -> Result<()>;
    /// A producer with its own connection. `send` may be called concurrently.
    async fn producer(&self, queue: &str) -> Result<Arc<dyn Producer>>;
    /// A consumer with its own connection.
    async fn consumer(&self, queue: &str, mode: ConsumerMode) -> Result<Box<dyn Consumer>>;
    /// The server processes, as (role, process group id), for CPU and memory readings.
    fn processes(&self) -> Vec<(String, u32)>;
    /// Kills the broker (SIGKILL: no clean shutdown) and starts it again on the same
    /// data. Returns the time from the new process's start until it has served one
    /// message of `queue` to a consumer (the message is acked).
    async fn restart(&mut self, queue: &str) -> Result<Duration>;
    /// Stops the servers and removes their data.
    async fn teardown(&mut self) -> Result<()>;
}

#[tonic::async_trait]
pub trait Producer: Send + Sync {
    /// Enqueues one message; returns once the system has durably accepted it.
    async fn send(&self, body: Bytes) -> Result<()>;
    /// Enqueues many messages, as fast as the system's client allows (batched or
    /// pipelined); returns once all are durably accepted.
    async fn send_many(&self, bodies: Vec<Bytes>) -> Result<()> {
        for b in bodies {
            self.send(b).await?;
        }
        Ok(())
    }
}

/// What one `Consumer::next` call saw.
#[derive(Debug, Default)]
pub struct Batch {
    /// Messages delivered, with the instant each reached the client.
    pub delivered: Vec<(Instant, Bytes)>,
    /// Messages whose ack the system confirmed during this call.
    pub acked: u64,
    /// Acks the system refused (expired lease, unknown receipt).
    pub ack_failed: u64,
}

#[tonic::async_trait]
pub trait Consumer: Send {
    /// Waits up to `wait` for messages and returns what arrived. Every message
    /// delivered is acked, at the latest by the next call.
    async fn next(&mut self, wait: Duration) -> Result<Batch>;
}
