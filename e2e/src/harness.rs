//! The e2e world and the helpers tests use.
//!
//! Every scenario runs in a world of its own: the test re-executes itself under
//! `unshare --net --mount --pid --fork`, so that the control plane (etcd, API server,
//! controller-manager, scheduler), the operator, the agent's pods and the cluster DNS
//! all live in a network namespace the test created (nothing listens outside it), the
//! per-pod network namespaces and bind mounts stay private, and everything started in
//! it dies with the test (its PID namespace ends when the test process does).

use crate::agent::{Agent, AgentConfig};
use crate::dns::DnsServer;
use crate::error::{Error, Result, io_at};
use crate::net;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Generous: a slow CI machine must not fail a correct system.
pub const TIMEOUT: Duration = Duration::from_secs(180);
const WORLD_ENV: &str = "SLUICE_E2E_WORLD";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

/// Where the workspace's binaries are: SLUICE_E2E_BIN_DIR, else the directory of
/// the running test binary's parent (target/<profile>).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("SLUICE_E2E_BIN_DIR") {
        return d.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Runs the test `name` (the name of the #[test] fn calling this) in a world of its
/// own. Outside the world this prepares (Kubernetes build, tools), re-executes the
/// test binary for just this test inside fresh namespaces, and fails if it failed.
/// Inside, it sets the world up and runs `body`.
pub fn isolated<F, Fut>(name: &str, opts: WorldOptions, body: F)
where
    F: FnOnce(std::sync::Arc<World>) -> Fut,
    Fut: Future<Output = ()>,
{
    if std::env::var(WORLD_ENV).as_deref() != Ok("1") {
        outer(name);
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let world = std::sync::Arc::new(World::start(opts).await.expect("start the e2e world"));
        body(world.clone()).await;
        drop(world);
    });
    rt.shutdown_timeout(Duration::from_secs(2));
}

fn outer(name: &str) {
    // One world at a time on this machine: each runs a whole control plane.
    let lock_path = std::env::temp_dir().join("sluice-e2e.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .expect("open e2e lock");
    // SAFETY: flock(2) on a file descriptor we own; released when `lock` drops.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {}", lock_path.display());

    let st = Command::new(repo_root().join("scripts/k8s/install-deps.sh"))
        .stdout(Stdio::null())
        .status()
        .expect("run scripts/k8s/install-deps.sh");
    assert!(st.success(), "scripts/k8s/install-deps.sh failed");
    // The pods run the workspace's binaries: `scripts/test` builds them first
    // (`cargo build --workspace --bins`); SLUICE_E2E_BUILD=1 builds them here.
    if std::env::var("SLUICE_E2E_BUILD").as_deref() == Ok("1") {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--workspace", "--bins", "--quiet"])
            .current_dir(repo_root())
            .status()
            .expect("cargo build --workspace --bins");
        assert!(st.success(), "building the binaries failed");
    }
    for b in [
        "sluice-broker",
        "sluice-sidecar",
        "sluice-operator",
        "sluice-e2e-app",
    ] {
        assert!(
            bin_dir().join(b).is_file(),
            "{b} missing in {}: run `cargo build --workspace --bins`",
            bin_dir().display()
        );
    }
    let exe = std::env::current_exe().expect("current exe");
    let run_id = format!(
        "{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let st = Command::new("unshare")
        .args([
            "--net",
            "--mount",
            "--pid",
            "--fork",
            "--mount-proc",
            "--propagation",
            "private",
        ])
        .arg(&exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(WORLD_ENV, "1")
        .env("SLUICE_E2E_RUN", &run_id)
        .env("SLUICE_E2E_BIN_DIR", bin_dir())
        .status()
        .expect("run unshare");
    assert!(
        st.success(),
        "e2e scenario {name} failed in its world (see above)"
    );
}

/// The ClusterRoleBinding the operator adds restricted Queues' brokers to.
pub const TOKEN_REVIEW_BINDING: &str = "sluice-e2e-token-review";

#[derive(Debug, Clone)]
pub struct WorldOptions {
    /// Start the operator as a process (with its webhook reached by URL) and install
    /// the CRD. Scenario 1 installs them with Helm instead.
    pub operator: bool,
}

impl Default for WorldOptions {
    fn default() -> Self {
        WorldOptions { operator: true }
    }
}

/// A control plane, the node agent, the cluster DNS and (optionally) the operator,
/// inside the test's namespaces.
pub struct World {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub client: Client,
    pub agent: Agent,
    pub api_port: u16,
    pub operator: Option<Operator>,
    dns: Option<DnsServer>,
}

impl World {
    pub async fn start(opts: WorldOptions) -> Result<World> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info,kube=warn,hyper=warn".into()),
            )
            .with_test_writer()
            .try_init();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let run = std::env::var("SLUICE_E2E_RUN").unwrap_or_else(|_| "local".into());
        let dir = std::env::temp_dir().join(format!("sluice-e2e-{run}"));
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        net::setup_world()?;
        let state = dir.join("k8s");
        let out = Command::new(repo_root().join("scripts/k8s/cluster.sh"))
            .arg("start")
            .arg(&state)
            .env("SLUICE_K8S_BIND_ADDRESS", "0.0.0.0")
            .env("SLUICE_K8S_ADVERTISE_ADDRESS", net::BRIDGE_IP.to_string())
            .env("SLUICE_K8S_EXTRA_SANS", format!("IP:{}", net::BRIDGE_IP))
            .env(
                "SLUICE_K8S_APISERVER_ARGS",
                "--enable-aggregator-routing=true",
            )
            .status()
            .map_err(|e| Error::Command {
                cmd: "cluster.sh start".into(),
                detail: e.to_string(),
            })?;
        if !out.success() {
            return Err(Error::Command {
                cmd: "cluster.sh start".into(),
                detail: format!("exit {out}"),
            });
        }
        let kubeconfig = state.join("kubeconfig");
        let env = std::fs::read_to_string(state.join("env")).map_err(io_at(state.join("env")))?;
        let api_port: u16 = env
            .lines()
            .find_map(|l| l.strip_prefix("SLUICE_K8S_API=https://127.0.0.1:"))
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| Error::Kubeconfig("no API port in the cluster env".into()))?;
        let client = client_from(&kubeconfig).await?;
        let dns =
            DnsServer::start(client.clone(), SocketAddr::new(net::BRIDGE_IP.into(), 53)).await?;
        let agent = Agent::start(
            client.clone(),
            AgentConfig {
                node: "e2e-node-1".into(),
                bin_dir: bin_dir(),
                work_dir: dir.join("agent"),
                api_host: net::BRIDGE_IP.to_string(),
                api_port,
            },
        )
        .await?;
        let mut world = World {
            dir,
            kubeconfig,
            client,
            agent,
            api_port,
            operator: None,
            dns: Some(dns),
        };
        if opts.operator {
            install_crd(&world.client).await;
            world.operator = Some(world.start_operator().await);
        }
        Ok(world)
    }

    /// The operator as a process in the world; its webhook is registered by URL.
    async fn start_operator(&self) -> Operator {
        let client = &self.client;
        namespace(client, "sluice-system", json!({})).await;
        let port = free_port();
        let cfg_name = "sluice-e2e-injector";
        let mwc: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": cfg_name},
            "webhooks": [{
                "name": "inject.sluice.dev",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "timeoutSeconds": 10,
                "clientConfig": {"url": format!("https://127.0.0.1:{port}/mutate")},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
                "namespaceSelector": {"matchLabels": {"sluice-e2e/inject": "true"}}
            }]
        }))
        .expect("webhook config");
        let mwcs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        mwcs.create(&PostParams::default(), &mwc)
            .await
            .expect("create MutatingWebhookConfiguration");
        // What the chart creates for the brokers of Queues with spec.access.
        let binding: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": {"name": TOKEN_REVIEW_BINDING},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"},
            "subjects": []
        }))
        .expect("binding");
        Api::<ClusterRoleBinding>::all(client.clone())
            .create(&PostParams::default(), &binding)
            .await
            .expect("create the token-review ClusterRoleBinding");
        let op = Operator::start(
            "operator",
            &self.kubeconfig,
            &self.dir.join("operator.log"),
            &[
                "--namespace=sluice-system",
                &format!("--webhook-listen=127.0.0.1:{port}"),
                "--webhook-extra-san=127.0.0.1",
                &format!("--webhook-config-name={cfg_name}"),
                "--broker-image=sluice-broker:e2e",
                "--sidecar-image=sluice-sidecar:e2e",
                &format!("--token-review-binding={TOKEN_REVIEW_BINDING}"),
            ],
        );
        op.wait_webhook_ready(&mwcs, cfg_name).await;
        op
    }

    /// A namespace whose pods get the sidecar injected (when the operator runs).
    pub async fn app_namespace(&self, name: &str) {
        namespace(&self.client, name, json!({"sluice-e2e/inject": "true"})).await;
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "==== e2e world {} failed; logs follow ====",
                self.dir.display()
            );
            self.agent.dump_logs(40);
            for f in [
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
            ] {
                let p = self.dir.join("k8s/logs").join(format!("{f}.log"));
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("---- {} (last 15 lines) ----", p.display());
                for l in &lines[lines.len().saturating_sub(15)..] {
                    eprintln!("{l}");
                }
            }
        }
        self.dns.take();
        if let Some(op) = &mut self.operator {
            op.stop();
        }
        self.agent.shutdown();
        // The control plane dies with the world's PID namespace anyway; kill it now
        // (cluster.sh stop would wait on zombies: nothing reaps in here but us).
        let pids = std::fs::read_to_string(self.dir.join("k8s/pids")).unwrap_or_default();
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) on the control-plane processes this world started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if !std::thread::panicking() && std::env::var("SLUICE_E2E_KEEP").is_err() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub async fn client_from(kubeconfig: &Path) -> Result<Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| Error::Kubeconfig(e.to_string()))?;
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Kubeconfig(e.to_string()))?;
    Client::try_from(cfg).map_err(Error::Kube)
}

/// Polls `f` until it returns Some, or panics after TIMEOUT naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(what, TIMEOUT, f).await
}

pub async fn eventually_within<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Applies the Queue CRD (idempotent) and waits until it is established.
pub async fn install_crd(client: &Client) {
    let text = std::fs::read_to_string(repo_root().join("crds/queues.sluice.dev.yaml"))
        .expect("crds/queues.sluice.dev.yaml");
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("CRD yaml");
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
    .expect("namespace");
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

/// A tool installed by scripts/k8s/install-tools.sh (`helm`, `kubectl`), installing
/// it first if needed.
pub fn tool(name: &str) -> PathBuf {
    let dir = std::env::var("SLUICE_TOOLS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/sluice/tools/bin")
        });
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} missing: run scripts/k8s/install-tools.sh",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Minimal HTTP/1.0 GET (no client dependency needed): (status, body).
pub async fn http_get_at(host: &str, port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect((host, port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
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

/// The operator as a real process; killed on drop (its log tail printed when the
/// test is failing).
pub struct Operator {
    pub child: Child,
    pub metrics_port: u16,
    pub log: PathBuf,
    pub name: String,
}

impl Operator {
    /// Starts `sluice-operator run` with `args` (plus a metrics port on 127.0.0.1)
    /// against `kubeconfig`, logging to `log`.
    pub fn start(name: &str, kubeconfig: &Path, log: &Path, args: &[&str]) -> Operator {
        let metrics_port = free_port();
        let out = std::fs::File::create(log).expect("operator log");
        let child = Command::new(bin_dir().join("sluice-operator"))
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
            log: log.to_path_buf(),
            name: name.into(),
        }
    }

    /// Waits until the operator has patched its CA into the webhook configuration
    /// `cfg_name` and answers `/readyz`.
    pub async fn wait_webhook_ready(
        &self,
        mwcs: &Api<MutatingWebhookConfiguration>,
        cfg_name: &str,
    ) {
        eventually("caBundle patched by the operator", || async {
            let c = mwcs.get(cfg_name).await.ok()?;
            c.webhooks?[0]
                .client_config
                .ca_bundle
                .as_ref()
                .filter(|b| !b.0.is_empty())
                .map(|_| ())
        })
        .await;
        eventually("operator /readyz", || async {
            (self.http_get("/readyz").await?.0 == 200).then_some(())
        })
        .await;
    }

    pub async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get_at("127.0.0.1", self.metrics_port, path).await
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn dump(&self, tail: usize) {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("---- operator {} log (last {tail} lines) ----", self.name);
        for l in &lines[lines.len().saturating_sub(tail)..] {
            eprintln!("{l}");
        }
    }

    /// SIGTERM (graceful: releases the Lease), then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
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
            self.dump(60);
        }
    }
}
