//! The client examples users copy (`examples/clients`) run against `sluice dev`:
//! Python with grpcio, Node.js with @grpc/grpc-js and Rust with tonic each enqueue
//! keyed orders, consume them on a Subscribe stream with credit and inline acks, nack
//! some with a delay, and end cleanly on SIGTERM, handing back what they held. An
//! API change that breaks them fails here. Their
//! dependencies come from PyPI and the npm registry through
//! `examples/clients/setup.sh` (run by `scripts/test`'s install step into
//! `$SLUICE_CLIENTS_DIR`; run again here, where it only regenerates the stubs).

use sluice_integration::*;
use sluice_proto::v1;
use sluice_testkit::eventually;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const ORDERS: u64 = 60;
/// The examples' Subscribe credit.
const CREDIT: u64 = 16;

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

/// Runs an example as a consumer in a pod runs: once every order it sent is acked
/// (as `Stats` shows), it is sent SIGTERM, and must end cleanly with its summary.
/// Returns the JSON it printed.
async fn run(program: &str, script: Option<&str>, dev: &Dev, queue: &str) -> serde_json::Value {
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
    let mut cmd = Command::new(program);
    if let Some(script) = script {
        cmd.arg(root().join(script));
    }
    let child = cmd
        .args(["--addr", &dev.addr.to_string(), "--queue", queue])
        .args(["--count", &ORDERS.to_string()])
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client = dev.client().await;
    eventually("every order sent and acked", || {
        let mut client = client.clone();
        let req = v1::StatsRequest {
            queue: queue.into(),
        };
        async move {
            let s = client.stats(req).await.ok()?.into_inner();
            (s.enqueued_total == ORDERS && s.acked_total == ORDERS).then_some(())
        }
    })
    .await;
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let what = script.unwrap_or("the Rust example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} did not end cleanly on SIGTERM ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{what} printed {stdout}: {e}"))
}

/// Every order acked (the broker counted them all before the signal; the answers to
/// the last acks, at most a credit's worth, may still have been on their way), every
/// tenth nacked once with a delay and delivered again, nothing left behind: what
/// the stream held went back when it closed.
fn check(summary: &serde_json::Value) {
    assert_eq!(summary["sent"], ORDERS, "{summary}");
    let acked = summary["acked"].as_u64().unwrap();
    assert!(acked <= ORDERS && acked + CREDIT >= ORDERS, "{summary}");
    assert_eq!(summary["nacked"], ORDERS / 10, "{summary}");
    assert!(
        summary["redelivered"].as_u64().unwrap() >= ORDERS / 10,
        "{summary}"
    );
    assert_eq!(summary["ready_after"], 0, "{summary}");
    assert_eq!(summary["in_flight_after"], 0, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_node_and_rust_examples_produce_consume_and_stop_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(dir.path()).await;
    let rust = bin("sluice-example-orders");
    for (program, script, queue, client) in [
        (
            "python",
            Some("examples/clients/python/orders.py"),
            "py-orders",
            "python",
        ),
        (
            "node",
            Some("examples/clients/node/orders.js"),
            "node-orders",
            "node",
        ),
        (rust.to_str().unwrap(), None, "rust-orders", "rust"),
    ] {
        let summary = run(program, script, &dev, queue).await;
        assert_eq!(summary["client"], client);
        check(&summary);
    }
}
