//! What a broker reports of its copies of partitions, on `GET /partitions` of its
//! HTTP port: the broker writes it, the operator reads it into the Queue's status.

use serde::{Deserialize, Serialize};

/// The path of the report on a broker's HTTP (metrics) port.
pub const PARTITIONS_PATH: &str = "/partitions";

/// One broker's copy of one partition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PartitionReport {
    pub queue: String,
    pub partition: u32,
    /// Copies the partition has (its replication; 1 for a partition of one broker).
    pub copies: u32,
    /// This copy leads the partition and a majority acknowledged it recently: it
    /// takes writes. A single copy always leads.
    pub leader: bool,
    /// The Raft term this copy is in (0 for a single copy): of two copies claiming
    /// to lead for a moment around an election, the later term is the leader.
    pub term: u64,
    /// On the leader: copies, its own among them, holding every entry it applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_sync: Option<u32>,
    /// On the leader of a replicated partition: the brokers (ordinals) its group's
    /// committed membership holds, when no change is under way. The operator sees a
    /// move done when they are the placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<u32>>,
    /// On the copy that serves the partition (the leader, or a single copy): the
    /// messages it holds. None on a follower.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<Depth>,
}

/// The messages of one partition, by state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Depth {
    pub ready: u64,
    pub in_flight: u64,
    pub delayed: u64,
    /// When the oldest ready message was enqueued, in ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_ready_ms: Option<u64>,
}
