//! Replicated partitions: each partition with `replication` above 1 is a Raft group
//! (openraft) over the brokers of its [`replica_set`](sluice_config::replica_set).
//!
//! - The partition's segmented log *is* its Raft log ([`store`]): each entry is an
//!   [`EntryHeader`](crate::log::record::EntryHeader) record followed by the partition
//!   records it carries, written with the same group commit and `fsync` policy, so a
//!   copy is durable on a follower's disk before the follower acknowledges it.
//! - Only the leader keeps the queue semantics ([`PartitionState`](crate::partition::PartitionState)).
//!   It decides as an unreplicated partition does, with its own clock, and writes the
//!   decisions as records: times are in the records (enqueue time, visibility), never
//!   read again from a follower's clock. An answer waits until a majority holds them.
//! - Followers only store entries. The state machine ([`machine`]) keeps the Raft
//!   bookkeeping and the *floor* the leader publishes. A broker that becomes leader
//!   replays its log, as at start-up, and serves once every committed entry is in.
//! - Space: when the leader's oldest live message moves on, it appends a
//!   [`Record::Floor`](crate::log::record::Record::Floor): entries up to that index
//!   hold nothing anyone needs. Each copy then snapshots there ([`FloorSnapshot`]: the
//!   next sequence number) and purges the log below it, segment by segment. A copy too
//!   far behind, or on a new empty volume, gets that snapshot and the entries after it.
//! - [`network`] and [`service`]: the Raft messages over gRPC (`sluice.replication.v1`).

pub mod convert;
pub mod machine;
pub mod network;
pub mod node;
pub mod service;
pub mod store;

use bytes::Bytes;

use crate::log::Location;

/// What a replicated partition's log stores per entry, and the answer to a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Where the entry's records begin in this broker's log (the leader places its
    /// messages with it). None for an entry without records.
    pub records_at: Option<Location>,
}

/// A replicated partition's snapshot at a floor: every message enqueued up to it is
/// settled and out of every dedup window, so what the state needs from before it is
/// only where sequence numbers go on (a receipt of a settled message must never
/// match a new one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FloorSnapshot {
    pub next_seq: u64,
}

/// The broker a copy's node id names: its low 32 bits.
pub fn ordinal(node: NodeId) -> u32 {
    node as u32
}

/// The node id of a copy on broker `ordinal`. Copies that formed the group have
/// incarnation 0 (the id is the ordinal, as every member can tell without asking);
/// a copy placed by a move has a new one, so that no membership entry in the log
/// from before it joined names it (see `store::copy_id`).
pub fn node_id(ordinal: u32, incarnation: u32) -> NodeId {
    (u64::from(incarnation) << 32) | u64::from(ordinal)
}

openraft::declare_raft_types!(
    /// Raft types of a replicated partition. Node ids name a broker ([`ordinal`])
    /// and the copy on it ([`node_id`]); addresses come from the queue's `peers`, so
    /// nodes carry nothing.
    pub TypeConfig:
        D = Bytes,
        R = Applied,
        NodeId = u64,
        Node = openraft::EmptyNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = FloorSnapshot,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type NodeId = u64;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type Membership = openraft::Membership<NodeId, openraft::EmptyNode>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::EmptyNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::EmptyNode>;
pub type StorageError = openraft::StorageError<NodeId>;

/// A storage failure as openraft wants it reported.
pub(crate) fn storage_error(
    subject: openraft::ErrorSubject<NodeId>,
    verb: openraft::ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}
