//! Runs `sluice-bench --smoke` against the built servers: keeps the harness from
//! rotting. No timing assertions: only that it ran and reported every system.

use std::path::Path;
use std::process::Command;

#[test]
fn smoke_run_reports_every_system() {
    let bench = Path::new(env!("CARGO_BIN_EXE_sluice-bench"));
    let dir = bench.parent().expect("the bench binary has a directory");
    let missing: Vec<_> = ["sluice-broker", "sluice-sidecar"]
        .iter()
        .filter(|b| {
            !dir.join(format!("{b}{}", std::env::consts::EXE_SUFFIX))
                .is_file()
        })
        .collect();
    // A failure, not a skip: `scripts/test` builds every binary before the tests, so
    // a missing server means the build step is broken, and a skip would let the
    // harness rot unseen (the reason this test exists).
    assert!(
        missing.is_empty(),
        "{missing:?} not built in {}: run `cargo build --workspace --bins` before the tests",
        dir.display()
    );
    let out = Command::new(bench)
        .arg("--smoke")
        .args([
            "--systems",
            "direct,sidecar,sidecar-interval,sidecar-tls,sidecar-r3,sidecar-raft",
            "--producers",
            "one,window4,batch10",
        ])
        .output()
        .expect("running sluice-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "sluice-bench --smoke failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // sluice-sidecar-r3: three brokers, three copies of each partition;
    // sluice-sidecar-raft: one copy in a Raft group of one, as the operator runs it.
    // sluice-sidecar-interval: fsync = "interval", NATS 2.9's promise;
    // sluice-sidecar-tls: mutual TLS between sidecar and broker.
    for system in [
        "sluice-direct",
        "sluice-sidecar",
        "sluice-sidecar-interval",
        "sluice-sidecar-tls",
        "sluice-sidecar-r3",
        "sluice-sidecar-raft",
    ] {
        let rows = stdout
            .lines()
            .filter(|l| l.starts_with(&format!("| {system} |")))
            .count();
        assert!(
            rows >= 2,
            "no throughput and latency rows for {system}:\n{stdout}"
        );
        // A throughput row per producer style.
        for style in ["one", "window4", "batch10"] {
            assert!(
                stdout
                    .lines()
                    .any(|l| l.starts_with(&format!("| {system} | subscribe | {style} |"))),
                "no {style} row for {system}:\n{stdout}"
            );
        }
    }
}
