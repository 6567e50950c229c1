//! Which partition a new message goes to. An explicit partition wins; otherwise a key
//! (or, without one, a dedup id) is hashed (`sluice_proto::partition_for_key`, FNV-1a,
//! stable across versions), so every sidecar and broker agree on it and per-key order
//! and deduplication hold; a message with neither may go anywhere (round-robin over
//! what the caller can reach). The broker and the sidecar differ only in what
//! "anywhere" and "reachable" mean, which they decide themselves.

use sluice_proto::partition_for_key;

/// Where a message must go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The call named this partition (not checked against the queue's layout here).
    Explicit(u32),
    /// The hash of the message's key or dedup id chose this partition.
    Hashed(u32),
    /// Any partition will do.
    Any,
}

/// The placement of a message with `key` and `dedup_id` (empty for none) on a queue of
/// `partitions`; a layout not known yet (0 partitions) hashes nothing.
pub fn place(explicit: Option<u32>, key: &str, dedup_id: &str, partitions: u32) -> Placement {
    match explicit {
        Some(p) => Placement::Explicit(p),
        None if partitions == 0 => Placement::Any,
        None if !key.is_empty() => Placement::Hashed(partition_for_key(key, partitions)),
        None if !dedup_id.is_empty() => Placement::Hashed(partition_for_key(dedup_id, partitions)),
        None => Placement::Any,
    }
}

/// Whether a message is bound to one partition (explicitly, or by its key or dedup
/// id): such a message must not fail over to another partition, or per-key order
/// and deduplication would break.
pub fn is_pinned(explicit: Option<u32>, key: &str, dedup_id: &str) -> bool {
    explicit.is_some() || !key.is_empty() || !dedup_id.is_empty()
}

/// The gRPC metadata key of a broker's not-leader answer (UNAVAILABLE) for a
/// replicated partition: the ordinal of the broker that leads it, or `none` during an
/// election. The sidecar then learns the new layout at once, and does not count the
/// broker that answered as down.
pub const LEADER_METADATA: &str = "sluice-leader";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_then_key_then_dedup_id() {
        assert_eq!(place(Some(3), "k", "d", 4), Placement::Explicit(3));
        assert_eq!(
            place(None, "k", "d", 4),
            Placement::Hashed(partition_for_key("k", 4))
        );
        assert_eq!(
            place(None, "", "d", 4),
            Placement::Hashed(partition_for_key("d", 4))
        );
        assert_eq!(place(None, "", "", 4), Placement::Any);
        assert_eq!(place(None, "k", "", 0), Placement::Any);
        assert!(is_pinned(None, "", "d"));
        assert!(!is_pinned(None, "", ""));
    }
}
