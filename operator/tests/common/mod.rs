//! Test harness: a real control plane (started once per test binary by
//! scripts/k8s/cluster.sh, building Kubernetes on first use, or the one named by
//! SLUICE_TEST_KUBECONFIG), the operator as a real process, and polling helpers.
//! The helpers shared with the e2e suite live in `sluice_testkit` (polling, ports,
//! the webhook configuration, StatefulSet reading) and `sluice_e2e::harness` (CRD and
//! namespace set-up, the operator process, tools).
#![allow(dead_code)]

use kube::Client;
use serde_json::Value;
pub use sluice_e2e::harness::{self, Operator, install_crd, namespace, repo_root, tool};
pub use sluice_testkit::k8s::{
    config_hash, probe_path, queue_webhook_configuration, wait_ca_bundle, wait_statefulset,
    webhook_configuration,
};
pub use sluice_testkit::{eventually, free_port};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub struct Cluster {
    pub kubeconfig: PathBuf,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        if let Ok(kc) = std::env::var("SLUICE_TEST_KUBECONFIG") {
            return Cluster {
                kubeconfig: kc.into(),
            };
        }
        // One control plane per test run, shared by the test processes (cargo
        // test runs one per test binary, nextest one per test): keyed by the
        // parent (cargo / nextest) and stopped by a watchdog when it exits.
        let owner = std::os::unix::process::parent_id();
        let dir = std::env::temp_dir().join(format!("sluice-k8s-{owner}"));
        let status = Command::new(repo_root().join("scripts/k8s/cluster.sh"))
            .arg("ensure")
            .arg(&dir)
            .arg("--owner-pid")
            .arg(owner.to_string())
            .status()
            .expect("run scripts/k8s/cluster.sh");
        assert!(status.success(), "starting the control plane failed");
        Cluster {
            kubeconfig: dir.join("kubeconfig"),
        }
    })
}

pub async fn client_from(kubeconfig: &Path) -> Client {
    harness::client_from(kubeconfig).await.expect("client")
}

pub async fn admin() -> Client {
    client_from(&cluster().kubeconfig).await
}

pub fn log_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("operator-logs");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Starts the operator (`sluice-operator run args...`) against `kubeconfig`, logging
/// to `$CARGO_TARGET_TMPDIR/operator-logs/<name>.log`.
pub fn start_operator(name: &str, kubeconfig: &Path, args: &[&str]) -> Operator {
    Operator::start(
        name,
        kubeconfig,
        &log_dir().join(format!("{name}.log")),
        args,
    )
}

/// Reads the Queues (and other docs) of an example file.
pub fn example(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo_root().join("examples").join(name)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

pub fn helm() -> PathBuf {
    tool("helm")
}
pub fn kubectl() -> PathBuf {
    tool("kubectl")
}

/// Runs a command, returning (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("spawn");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A name unique to this test process, so that tests can rerun against a
/// long-lived control plane (SLUICE_TEST_KUBECONFIG).
pub fn unique(base: &str) -> String {
    static SUFFIX: OnceLock<String> = OnceLock::new();
    let s = SUFFIX.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        format!(
            "{:x}",
            (std::process::id() as u64 * 1_000_003 + nanos as u64) % 0xfffff
        )
    });
    format!("{base}-{s}")
}
