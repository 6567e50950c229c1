//! Sluice's gRPC APIs. The code under `gen/` is generated from `sluice/**/*.proto` by
//! `cargo run -p sluice-proto-codegen`; never edit it by hand (a test fails on drift).

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!("gen/sluice.v1.rs");
}

/// Broker to broker: the Raft messages of replicated partitions.
#[allow(clippy::all, missing_docs)]
pub mod replication {
    include!("gen/sluice.replication.v1.rs");
}

/// KEDA's external scaler API (`externalscaler.ExternalScaler`), served by the
/// operator so KEDA scales consumers on a Queue's backlog.
#[allow(clippy::all, missing_docs)]
pub mod externalscaler {
    include!("gen/externalscaler.rs");
}

/// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/sluice.v1.bin");

pub mod receipt;
pub use receipt::Receipt;

/// The partition of a keyed (or deduplicated) message: FNV-1a of the key, so that the
/// sidecar and every broker agree on it across versions and processes.
pub fn partition_for_key(key: &str, partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u32
}
