//! Test harness: a real control plane (started once per test binary by
//! scripts/k8s/cluster.sh, building Kubernetes on first use, or the one named by
//! SLUICE_TEST_KUBECONFIG), the operator as a real process, and polling helpers.
#![allow(dead_code)]

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};
use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// Generous: a slow CI machine must not fail a correct operator.
pub const TIMEOUT: Duration = Duration::from_secs(120);

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
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(cfg).expect("client")
}

pub async fn admin() -> Client {
    client_from(&cluster().kubeconfig).await
}

/// Polls `f` until it returns Some, or panics after TIMEOUT naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > TIMEOUT {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Applies the Queue CRD (idempotent) and waits until it is established.
pub async fn install_crd(client: &Client) {
    let text = std::fs::read_to_string(repo_root().join("crds/queues.sluice.dev.yaml")).unwrap();
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(
        "queues.sluice.dev",
        &PatchParams::apply("sluice-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("apply CRD");
    eventually("CRD established", || async {
        let c = api.get("queues.sluice.dev").await.ok()?;
        c.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await;
}

/// Creates a namespace with labels and waits for its default ServiceAccount.
pub async fn namespace(client: &Client, name: &str, labels: Value) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels}
    }))
    .unwrap();
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create namespace {name}: {e}"),
    }
    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    eventually("default ServiceAccount", || async {
        sa.get_opt("default").await.ok().flatten().map(|_| ())
    })
    .await;
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The operator as a real process; killed (and its log shown on failure) on drop.
pub struct Operator {
    pub child: Child,
    pub metrics_port: u16,
    pub log: PathBuf,
    pub name: String,
}

pub fn log_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("operator-logs");
    std::fs::create_dir_all(&d).unwrap();
    d
}

impl Operator {
    /// Starts `sluice-operator run` with `args` (plus a metrics port) against `kubeconfig`.
    pub fn start(name: &str, kubeconfig: &Path, args: &[&str]) -> Operator {
        let metrics_port = free_port();
        let log = log_dir().join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sluice-operator"))
            .arg("run")
            .arg(format!("--metrics-listen=127.0.0.1:{metrics_port}"))
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,sluice_operator=debug")
            .env_remove("POD_NAMESPACE")
            .env_remove("POD_NAME")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start sluice-operator");
        Operator {
            child,
            metrics_port,
            log,
            name: name.into(),
        }
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.metrics_port, path).await
    }

    pub fn stop(&mut self) {
        // SIGTERM first (graceful: releases the Lease), then SIGKILL.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("---- operator {} log (tail, newest last) ----", self.name);
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Minimal HTTP/1.0 GET on 127.0.0.1 (no client dependency needed).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Some((code, body))
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

fn tool(name: &str) -> PathBuf {
    let dir = std::env::var("SLUICE_TOOLS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/sluice/tools/bin")
        });
    let p = dir.join(name);
    if !p.exists() {
        let st = Command::new(repo_root().join("scripts/k8s/install-tools.sh"))
            .status()
            .expect("run install-tools.sh");
        assert!(st.success(), "install-tools.sh failed");
    }
    assert!(p.exists(), "{} missing", p.display());
    p
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
