//! The client examples users copy (`examples/clients`) run against `sluice dev`:
//! Python with grpcio and Node.js with @grpc/grpc-js each enqueue keyed orders,
//! consume them on a Subscribe stream with credit and inline acks, nack some with a
//! delay, and end cleanly. An API change that breaks them fails here. Their
//! dependencies come from PyPI and the npm registry through
//! `examples/clients/setup.sh` (run by `scripts/test`'s install step into
//! `$SLUICE_CLIENTS_DIR`; run again here, where it only regenerates the stubs).

use sluice_integration::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const ORDERS: u64 = 60;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The environment `setup.sh` prints: `export K='V' ...`.
fn client_env() -> Vec<(String, String)> {
    let dir = std::env::var("SLUICE_CLIENTS_DIR")
        .unwrap_or_else(|_| format!("{}/.cache/sluice/clients", std::env::var("HOME").unwrap()));
    let out = Command::new("bash")
        .arg(root().join("examples/clients/setup.sh"))
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "examples/clients/setup.sh: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.trim()
        .strip_prefix("export ")
        .expect("an export line")
        .split(' ')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.trim_matches('\'').to_string())
        })
        .collect()
}

/// Runs an example to its end and returns the JSON it printed.
fn run(program: &str, script: &str, addr: std::net::SocketAddr, queue: &str) -> serde_json::Value {
    let env = client_env();
    let program = match program {
        "python" => env
            .iter()
            .find(|(k, _)| k == "SLUICE_PYTHON")
            .unwrap()
            .1
            .clone(),
        other => other.to_string(),
    };
    let out = Command::new(program)
        .arg(root().join(script))
        .args(["--addr", &addr.to_string(), "--queue", queue])
        .args(["--count", &ORDERS.to_string()])
        .envs(env)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{script} printed {stdout}: {e}"))
}

/// Every order acked once, every tenth nacked once with a delay and delivered again,
/// nothing left behind.
fn check(summary: &serde_json::Value) {
    assert_eq!(summary["sent"], ORDERS, "{summary}");
    assert_eq!(summary["acked"], ORDERS, "{summary}");
    assert_eq!(summary["nacked"], ORDERS / 10, "{summary}");
    assert!(
        summary["redelivered"].as_u64().unwrap() >= ORDERS / 10,
        "{summary}"
    );
    assert_eq!(summary["ready_after"], 0, "{summary}");
    assert_eq!(summary["in_flight_after"], 0, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_and_node_examples_produce_and_consume_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(dir.path()).await;
    let python = run(
        "python",
        "examples/clients/python/orders.py",
        dev.addr,
        "py-orders",
    );
    assert_eq!(python["client"], "python");
    check(&python);
    let node = run(
        "node",
        "examples/clients/node/orders.js",
        dev.addr,
        "node-orders",
    );
    assert_eq!(node["client"], "node");
    check(&node);
}
