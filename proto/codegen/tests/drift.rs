//! Fails when proto/src/gen no longer matches the .proto files.

#[test]
fn generated_code_matches_proto_files() {
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-proto-codegen"))
        .arg("--check")
        .status()
        .expect("run codegen");
    assert!(
        status.success(),
        "proto/src/gen drifted; run `cargo run -p sluice-proto-codegen`"
    );
}
