//! `cargo run -p sluice-proto-codegen` regenerates `proto/src/gen/`.
//! `cargo run -p sluice-proto-codegen -- --check` fails when the checked-in code drifted.
//!
//! protox compiles the .proto files in Rust, so no system `protoc` is needed; the
//! generated code is checked in so that building the workspace needs neither.

use anyhow::{Context, Result, bail};
use prost::Message;
use std::path::{Path, PathBuf};

fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Generates the Rust code and the encoded descriptor set into `out`.
fn generate(out: &Path) -> Result<()> {
    let root = proto_dir();
    let fds = protox::compile([root.join("sluice/v1/queues.proto")], [&root])
        .context("compiling sluice/v1/queues.proto")?;
    // Reflection serves the app API only; the replication service is the brokers'.
    std::fs::write(out.join("sluice.v1.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .out_dir(out)
        .bytes(".sluice.v1")
        .compile_fds(fds)
        .context("generating Rust code")?;
    let fds = protox::compile(
        [root.join("sluice/replication/v1/replication.proto")],
        [&root],
    )
    .context("compiling sluice/replication/v1/replication.proto")?;
    tonic_prost_build::configure()
        .out_dir(out)
        .bytes(".sluice.replication.v1")
        .compile_fds(fds)
        .context("generating Rust code")?;
    // KEDA's external scaler API, which the operator serves to KEDA.
    let fds = protox::compile([root.join("keda/externalscaler.proto")], [&root])
        .context("compiling keda/externalscaler.proto")?;
    tonic_prost_build::configure()
        .out_dir(out)
        .compile_fds(fds)
        .context("generating Rust code")?;
    Ok(())
}

fn main() -> Result<()> {
    let check = std::env::args().any(|a| a == "--check");
    let checked_in = proto_dir().join("src/gen");
    if !check {
        generate(&checked_in)?;
        println!("wrote {}", checked_in.display());
        return Ok(());
    }
    let fresh = tempfile::tempdir()?;
    generate(fresh.path())?;
    let mut drifted = Vec::new();
    for entry in std::fs::read_dir(fresh.path())? {
        let name = entry?.file_name();
        let new = std::fs::read(fresh.path().join(&name))?;
        let old = std::fs::read(checked_in.join(&name)).unwrap_or_default();
        if new != old {
            drifted.push(name.to_string_lossy().into_owned());
        }
    }
    if !drifted.is_empty() {
        bail!(
            "generated protobuf code is out of date ({}); run `cargo run -p sluice-proto-codegen`",
            drifted.join(", ")
        );
    }
    println!("proto/src/gen is up to date");
    Ok(())
}
