//! Sluice's gRPC API. The code under `gen/` is generated from `sluice/v1/*.proto` by
//! `cargo run -p sluice-proto-codegen`; never edit it by hand (a test fails on drift).

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!("gen/sluice.v1.rs");
}

/// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/sluice.v1.bin");

pub mod receipt;
pub use receipt::Receipt;
