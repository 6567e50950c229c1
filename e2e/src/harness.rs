//! The e2e world and the helpers tests use.
//!
//! A scenario runs either on a cluster a KUBECONFIG points at (`SLUICE_E2E_KUBECONFIG`:
//! the chart is installed with the images named by `SLUICE_E2E_IMAGE_REGISTRY` and
//! `SLUICE_E2E_IMAGE_TAG`), or, by default, in a world of its own on this machine: the test re-executes itself under
//! `unshare --net --mount --pid --fork`, so that the control plane (etcd, API server,
//! controller-manager, scheduler), the operator, the agent's pods and the cluster DNS
//! all live in a network namespace the test created (nothing listens outside it), the
//! per-pod network namespaces and bind mounts stay private, and everything started in
//! it dies with the test (its PID namespace ends when the test process does).

use crate::agent::{Agent, AgentConfig};
use crate::dns::DnsServer;
use crate::error::{Error, Result, io_at};
use crate::net;
use crate::node::RealNode;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};
use sluice_testkit::k8s::{wait_ca_bundle, webhook_configuration};
use sluice_testkit::{ChildGuard, eventually, eventually_within, free_port};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

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
    let remote = std::env::var_os(REMOTE_ENV).map(PathBuf::from);
    let _lock = match &remote {
        // A scenario of its own on that cluster; one at a time (they share the chart).
        Some(_) => {
            let lock = world_lock();
            install_tools();
            Some(lock)
        }
        None if std::env::var(WORLD_ENV).as_deref() != Ok("1") => {
            outer(name, &opts);
            return;
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let world = match remote {
            Some(kubeconfig) => World::on_cluster(&kubeconfig, name).await,
            None => World::start(opts).await,
        };
        let world = std::sync::Arc::new(world.expect("start the e2e world"));
        body(world.clone()).await;
        world.finish().await;
        drop(world);
    });
    rt.shutdown_timeout(Duration::from_secs(2));
}

/// One world (or one scenario on a shared cluster) at a time on this machine: each
/// local world runs a whole control plane; scenarios on a cluster share the chart.
fn world_lock() -> std::fs::File {
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
    lock
}

/// helm and kubectl (scripts/k8s/install-tools.sh is idempotent).
fn install_tools() {
    let st = Command::new(repo_root().join("scripts/k8s/install-tools.sh"))
        .stdout(Stdio::null())
        .status()
        .expect("run scripts/k8s/install-tools.sh");
    assert!(st.success(), "scripts/k8s/install-tools.sh failed");
}

/// Where the images a real node runs are built (shared by the worlds of a machine;
/// rebuilt when the binaries change).
fn images_dir() -> PathBuf {
    std::env::temp_dir().join("sluice-e2e-images")
}

fn outer(name: &str, opts: &WorldOptions) {
    let _lock = world_lock();
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
    if opts.real_node {
        crate::node::build_images(&bin_dir(), &images_dir())
            .unwrap_or_else(|e| panic!("building the images for the real node: {e}"));
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
/// Set to a kubeconfig: the scenarios run on that cluster instead of a local world.
pub const REMOTE_ENV: &str = "SLUICE_E2E_KUBECONFIG";
/// The name of a local world's one node.
pub const NODE: &str = "e2e-node-1";
/// The chart's release and namespace when the chart is installed by the harness.
pub const RELEASE: &str = "sluice";
pub const SYSTEM_NAMESPACE: &str = "sluice-system";

#[derive(Debug, Clone)]
pub struct WorldOptions {
    /// Start the operator as a process (with its webhook reached by URL) and install
    /// the CRD. Scenario 1 installs them with Helm instead.
    pub operator: bool,
    /// Treat the local world as a cluster reached only through its KUBECONFIG, as
    /// `SLUICE_E2E_KUBECONFIG` does: the chart installs the operator, namespaces get
    /// a per-run suffix, a crash is a pod deleted without grace, and nothing on the
    /// node is looked at. This is how the real-cluster path is tested here.
    pub as_remote: bool,
    /// Run the pods on a real node (kubelet, kube-proxy, containerd and runc running
    /// the images built from this run's binaries: [`crate::node`]) instead of the node
    /// agent. The chart installs the operator, as pods of that node (`operator` is
    /// not looked at).
    pub real_node: bool,
}

impl Default for WorldOptions {
    fn default() -> Self {
        WorldOptions {
            operator: true,
            as_remote: false,
            real_node: false,
        }
    }
}

/// What runs the pods of a local world.
enum Kubelet {
    Agent(Agent),
    Real(RealNode),
}

/// What runs on this machine for a local world: the node and the cluster DNS (the
/// control plane's processes are listed in `<dir>/k8s/pids`).
struct LocalNode {
    kubelet: Kubelet,
    dns: Option<DnsServer>,
}

/// How the world reaches a cluster it only has a KUBECONFIG for.
struct RemoteView {
    /// Appended to namespace names: a shared cluster hosts many runs.
    suffix: String,
    registry: String,
    tag: String,
    namespaces: std::sync::Mutex<Vec<String>>,
}

/// How a container was made to crash (see [`World::crash`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// Its process got SIGKILL; the kubelet (or the agent) restarts it in place.
    InPlace,
    /// Its pod was deleted without grace (the closest the Kubernetes API comes to a
    /// crash); its controller makes a new one.
    Recreated,
}

/// A cluster for one scenario: by default a control plane, the node agent, the
/// cluster DNS and (optionally) the operator inside the test's namespaces; or a
/// cluster a KUBECONFIG points at.
pub struct World {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub client: Client,
    pub operator: Option<Operator>,
    local: Option<LocalNode>,
    remote: Option<RemoteView>,
}

impl World {
    pub async fn start(opts: WorldOptions) -> Result<World> {
        init_tracing();
        let run = std::env::var("SLUICE_E2E_RUN").unwrap_or_else(|_| "local".into());
        let dir = std::env::temp_dir().join(format!("sluice-e2e-{run}"));
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        net::setup_world()?;
        let state = dir.join("k8s");
        // cluster.sh picks free ports, and a parallel test can take one before the
        // control plane binds it (seen in CI): then it stops and a fresh start picks anew.
        let mut attempts = 0;
        let out = loop {
            attempts += 1;
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
            if out.success() || attempts == 3 {
                break out;
            }
        };
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
        let kubelet = if opts.real_node {
            // The same directory inside the world as outside, where they were built.
            let images = images_dir();
            Kubelet::Real(RealNode::start(client.clone(), NODE, &dir, &kubeconfig, &images).await?)
        } else {
            Kubelet::Agent(
                Agent::start(
                    client.clone(),
                    AgentConfig {
                        node: NODE.into(),
                        bin_dir: bin_dir(),
                        work_dir: dir.join("agent"),
                        api_host: net::BRIDGE_IP.to_string(),
                        api_port,
                    },
                )
                .await?,
            )
        };
        let remote = opts.as_remote.then(|| RemoteView {
            suffix: run_suffix(),
            registry: String::new(),
            tag: "e2e".into(),
            namespaces: Default::default(),
        });
        let mut world = World {
            dir,
            kubeconfig,
            client,
            operator: None,
            local: Some(LocalNode {
                kubelet,
                dns: Some(dns),
            }),
            remote,
        };
        if opts.as_remote || opts.real_node {
            world.install_chart().await;
        } else if opts.operator {
            install_crd(&world.client).await;
            world.operator = Some(world.start_operator().await);
        }
        Ok(world)
    }

    /// A world on the cluster `kubeconfig` points at, with the chart installed from
    /// this checkout and the images `SLUICE_E2E_IMAGE_REGISTRY` (a prefix such as
    /// `ghcr.io/acme/`, default none) and `SLUICE_E2E_IMAGE_TAG` (default 0.1.0) name.
    pub async fn on_cluster(kubeconfig: &Path, scenario: &str) -> Result<World> {
        init_tracing();
        let dir = std::env::temp_dir().join(format!("sluice-e2e-{scenario}"));
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let client = client_from(kubeconfig).await?;
        let world = World {
            dir,
            kubeconfig: kubeconfig.to_path_buf(),
            client,
            operator: None,
            local: None,
            remote: Some(RemoteView {
                suffix: run_suffix(),
                registry: std::env::var("SLUICE_E2E_IMAGE_REGISTRY").unwrap_or_default(),
                tag: std::env::var("SLUICE_E2E_IMAGE_TAG").unwrap_or_else(|_| "0.1.0".into()),
                namespaces: Default::default(),
            }),
        };
        world.install_chart().await;
        Ok(world)
    }

    /// The node agent, when this world runs its pods on this machine and may look
    /// at them there (local processes, volume directories).
    pub fn node(&self) -> Option<&Agent> {
        match (&self.local, &self.remote) {
            (
                Some(LocalNode {
                    kubelet: Kubelet::Agent(agent),
                    ..
                }),
                None,
            ) => Some(agent),
            _ => None,
        }
    }

    /// The real node, when this world runs one (and is not seen as remote).
    fn real_node(&self) -> Option<&RealNode> {
        match (&self.local, &self.remote) {
            (
                Some(LocalNode {
                    kubelet: Kubelet::Real(node),
                    ..
                }),
                None,
            ) => Some(node),
            _ => None,
        }
    }

    /// The name a scenario's namespace `base` has in this world: unique per run on a
    /// shared cluster.
    pub fn ns(&self, base: &str) -> String {
        match &self.remote {
            Some(r) => format!("{base}-{}", r.suffix),
            None => base.to_string(),
        }
    }

    /// The image of one of Sluice's binaries (`sluice-broker`, `sluice-e2e-app`...).
    pub fn image(&self, name: &str) -> String {
        match &self.remote {
            Some(r) => format!("{}{name}:{}", r.registry, r.tag),
            // What scripts/images/build.sh names them (a real node imports them), and
            // what the agent maps to the binary of that name.
            None => format!("{name}:e2e"),
        }
    }

    /// `helm upgrade --install` of charts/sluice as release `sluice` in
    /// `sluice-system`, with this world's images; waits until the operator pod is
    /// Ready. Returns helm's output.
    pub async fn install_chart(&self) -> String {
        let image = |component: &str| {
            let full = self.image(&format!("sluice-{component}"));
            let (repo, tag) = full.rsplit_once(':').expect("image with a tag");
            [
                "--set".to_string(),
                format!("{component}.image.repository={repo}"),
                "--set".to_string(),
                format!("{component}.image.tag={tag}"),
            ]
        };
        let out = Command::new(tool("helm"))
            .args(["upgrade", "--install", RELEASE])
            .arg(repo_root().join("charts/sluice"))
            .args(["--namespace", SYSTEM_NAMESPACE, "--create-namespace"])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(image("operator"))
            .args(image("broker"))
            .args(image("sidecar"))
            .args(["--set", "operator.logFormat=text"])
            .output()
            .expect("run helm");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "helm upgrade --install: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.operator_pod().await;
        stdout
    }

    /// A Ready operator pod of the chart.
    pub async fn operator_pod(&self) -> Pod {
        let sys: Api<Pod> = Api::namespaced(self.client.clone(), SYSTEM_NAMESPACE);
        eventually("operator pod Ready", || async {
            self.operator_pods(&sys).await.into_iter().find(pod_ready)
        })
        .await
    }

    /// The chart's operator pod that holds the leader lease, once one does. The chart
    /// runs two replicas; only the leader reconciles, so a test that follows
    /// reconciliation (or reads the leader's metrics) must pick it, not the first pod.
    pub async fn operator_leader(&self) -> Pod {
        let sys: Api<Pod> = Api::namespaced(self.client.clone(), SYSTEM_NAMESPACE);
        eventually("an operator pod is the leader", || async {
            for pod in self.operator_pods(&sys).await {
                if !pod_ready(&pod) {
                    continue;
                }
                let name = kube::ResourceExt::name_any(&pod);
                let body = self
                    .pod_get(SYSTEM_NAMESPACE, &name, 8080, "/metrics")
                    .await;
                let leads = body.is_some_and(|b| {
                    b.lines()
                        .any(|l| l.starts_with("sluice_operator_leader") && l.ends_with(" 1"))
                });
                if leads {
                    return Some(pod);
                }
            }
            None
        })
        .await
    }

    async fn operator_pods(&self, sys: &Api<Pod>) -> Vec<Pod> {
        sys.list(&ListParams::default().labels("app.kubernetes.io/name=sluice-operator"))
            .await
            .map(|l| l.items)
            .unwrap_or_default()
    }

    /// The operator as a process in the world; its webhook is registered by URL.
    async fn start_operator(&self) -> Operator {
        let client = &self.client;
        namespace(client, "sluice-system", json!({})).await;
        let port = free_port();
        let cfg_name = "sluice-e2e-injector";
        let mwc = webhook_configuration(
            cfg_name,
            port,
            json!({"matchLabels": {"sluice-e2e/inject": "true"}}),
        );
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

    /// A namespace whose pods get the sidecar injected: labelled for the operator
    /// process's webhook in a local world; any namespace not opted out for the
    /// chart's. Namespaces of a remote world are deleted when the scenario passes.
    pub async fn app_namespace(&self, name: &str) {
        match &self.remote {
            Some(r) => {
                namespace(&self.client, name, json!({})).await;
                r.namespaces.lock().unwrap().push(name.to_string());
            }
            None => namespace(&self.client, name, json!({"sluice-e2e/inject": "true"})).await,
        }
    }

    /// Crashes a running container: SIGKILL to its process where the node is ours
    /// (the agent's, or the real node's through containerd), else its pod deleted
    /// without grace.
    pub async fn crash(&self, ns: &str, pod: &str, container: &str) -> Crash {
        if let Some(node) = self.real_node() {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
            let p = pods.get(pod).await.expect("the pod to crash");
            node.kill(&p, container).expect("SIGKILL the container");
            return Crash::InPlace;
        }
        match self.node() {
            Some(agent) => {
                agent
                    .signal(ns, pod, container, libc::SIGKILL)
                    .expect("SIGKILL the container");
                Crash::InPlace
            }
            None => {
                let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
                let now = DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                };
                pods.delete(pod, &now).await.expect("delete the pod now");
                Crash::Recreated
            }
        }
    }

    /// After a passing scenario: a remote world deletes the namespaces it made.
    pub async fn finish(&self) {
        let Some(r) = &self.remote else { return };
        let api: Api<Namespace> = Api::all(self.client.clone());
        let names = r.namespaces.lock().unwrap().clone();
        for ns in names {
            let _ = api.delete(&ns, &DeleteParams::default()).await;
        }
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn,hyper=warn".into()),
        )
        .with_test_writer()
        .try_init();
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A short suffix unique to this run (namespace names on a shared cluster).
fn run_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{:x}", (std::process::id() as u64) << 32 | nanos as u64)
        .chars()
        .rev()
        .take(6)
        .collect()
}

/// Whether a pod's Ready condition is True.
pub fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl Drop for World {
    fn drop(&mut self) {
        let Some(mut local) = self.local.take() else {
            if std::thread::panicking() {
                eprintln!("==== e2e scenario failed on the cluster; its namespaces are kept ====");
            }
            return;
        };
        if std::thread::panicking() {
            eprintln!(
                "==== e2e world {} failed; logs follow ====",
                self.dir.display()
            );
            match &local.kubelet {
                Kubelet::Agent(agent) => agent.dump_logs(40),
                Kubelet::Real(node) => node.dump_logs(40),
            }
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
        local.dns.take();
        if let Some(op) = &mut self.operator {
            op.stop();
        }
        match &mut local.kubelet {
            Kubelet::Agent(agent) => agent.shutdown(),
            Kubelet::Real(node) => node.shutdown(),
        }
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

/// The operator as a real process; killed on drop (its log tail printed when the
/// test is failing).
pub struct Operator {
    pub process: ChildGuard,
    pub metrics_port: u16,
    /// KEDA's external scaler API (gRPC) on 127.0.0.1.
    pub scaler_port: u16,
}

impl Operator {
    /// Starts `sluice-operator run` with `args` (plus metrics and scaler ports on 127.0.0.1)
    /// against `kubeconfig`, logging to `log` (a fresh one: test log directories
    /// outlive a run).
    pub fn start(name: &str, kubeconfig: &Path, log: &Path, args: &[&str]) -> Operator {
        let metrics_port = free_port();
        let scaler_port = free_port();
        std::fs::write(log, "").expect("operator log");
        let process = ChildGuard::spawn(
            name,
            Command::new(bin_dir().join("sluice-operator"))
                .arg("run")
                .arg(format!("--metrics-listen=127.0.0.1:{metrics_port}"))
                .arg(format!("--scaler-listen=127.0.0.1:{scaler_port}"))
                .args(args)
                .env("KUBECONFIG", kubeconfig)
                .env("RUST_LOG", "info,sluice_operator=debug")
                .env_remove("POD_NAMESPACE")
                .env_remove("POD_NAME"),
            log,
        )
        .expect("start sluice-operator")
        .panic_tail(60);
        Operator {
            process,
            metrics_port,
            scaler_port,
        }
    }

    /// Waits until the operator has patched its CA into the webhook configuration
    /// `cfg_name` and answers `/readyz`.
    pub async fn wait_webhook_ready(
        &self,
        mwcs: &Api<MutatingWebhookConfiguration>,
        cfg_name: &str,
    ) {
        wait_ca_bundle(mwcs, cfg_name).await;
        eventually("operator /readyz", || async {
            (self.http_get("/readyz").await?.0 == 200).then_some(())
        })
        .await;
    }

    pub async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        sluice_testkit::http::get_async("127.0.0.1", self.metrics_port, path).await
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// SIGTERM (graceful: releases the Lease), then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        self.process.stop(Duration::from_secs(5));
    }
}

/// The port `sluice-e2e-app serve` listens on in the scenarios' app pods.
pub const APP_PORT: u16 = 8088;

impl World {
    /// GETs `path` on `port` of a pod through the API server's pod proxy (how a test
    /// reaches pods on any cluster): the body of a 2xx answer, else None.
    pub async fn pod_get(&self, ns: &str, pod: &str, port: u16, path: &str) -> Option<String> {
        let req = ::http::Request::get(proxy_path(ns, pod, port, path))
            .body(Vec::new())
            .ok()?;
        self.client.request_text(req).await.ok()
    }

    /// An app pod annotated for injection into `queues`, running `sluice-e2e-app
    /// serve` as ServiceAccount `service_account`; waits until it is Ready (the
    /// sidecar is ready only when its brokers are reachable). A pod created before the
    /// webhook answers (the chart's `failurePolicy: Ignore`) comes back without the
    /// sidecar: it is deleted and created again.
    pub async fn app_pod(&self, ns: &str, name: &str, queues: &str, service_account: &str) -> Pod {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let pod: Pod = serde_json::from_value(json!({
            // Ready only once its brokers answer: what the scenarios wait for.
            "metadata": {"name": name, "annotations": {
                "sluice.dev/inject": "true",
                "sluice.dev/queues": queues,
                "sluice.dev/ready-requires-brokers": "true"
            }},
            "spec": {
                "containers": [{
                    "name": "app",
                    "image": self.image("sluice-e2e-app"),
                    "args": ["serve", "--listen", format!("0.0.0.0:{APP_PORT}")],
                    "ports": [{"name": "jobs", "containerPort": APP_PORT}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": APP_PORT}, "periodSeconds": 1}
                }],
                "serviceAccountName": service_account,
                "terminationGracePeriodSeconds": 5
            }
        }))
        .expect("app pod");
        let created = eventually(&format!("app pod {name} created with the sidecar"), || {
            let (pods, pod) = (pods.clone(), pod.clone());
            async move {
                let created = pods.create(&PostParams::default(), &pod).await.ok()?;
                let injected = created
                    .spec
                    .as_ref()
                    .is_some_and(|s| s.containers.iter().any(|c| c.name == "sluice-sidecar"));
                if injected {
                    return Some(created);
                }
                let now = DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                };
                let _ = pods.delete(name, &now).await;
                eventually("the plain pod gone", || async {
                    pods.get_opt(name).await.ok()?.is_none().then_some(())
                })
                .await;
                None
            }
        })
        .await;
        eventually(
            &format!("app pod {name} Ready (sidecar ready: brokers reachable)"),
            || async { pods.get(name).await.ok().filter(pod_ready).map(|_| ()) },
        )
        .await;
        created
    }

    /// Starts `sluice-e2e-app <args>` as a job of the app pod's job server.
    pub async fn app_job(&self, ns: &str, pod: &str, args: &[&str]) -> AppJob {
        let body = serde_json::to_vec(&json!({ "args": args })).expect("job args");
        let req = ::http::Request::post(proxy_path(ns, pod, APP_PORT, "/jobs"))
            .header("content-type", "application/json")
            .body(body)
            .expect("job request");
        let answer = self
            .client
            .request_text(req)
            .await
            .unwrap_or_else(|e| panic!("start sluice-e2e-app {args:?} in {ns}/{pod}: {e}"));
        let id = serde_json::from_str::<Value>(&answer)
            .ok()
            .and_then(|v| v["id"].as_u64())
            .unwrap_or_else(|| panic!("job server answered {answer:?}"));
        AppJob {
            client: self.client.clone(),
            path: proxy_path(ns, pod, APP_PORT, &format!("/jobs/{id}")),
            id,
            what: format!("sluice-e2e-app {args:?} in {ns}/{pod}"),
        }
    }

    /// Runs `sluice-e2e-app <args>` in the app pod and returns its JSON result.
    pub async fn app(&self, ns: &str, pod: &str, args: &[&str]) -> Value {
        self.app_job(ns, pod, args).await.result().await
    }
}

fn proxy_path(ns: &str, pod: &str, port: u16, path: &str) -> String {
    format!("/api/v1/namespaces/{ns}/pods/{pod}:{port}/proxy{path}")
}

/// A command running in an app pod's job server.
pub struct AppJob {
    client: Client,
    path: String,
    pub id: u64,
    what: String,
}

impl AppJob {
    /// `{"done", "acked", "result", "error"}`, or None if the pod did not answer.
    pub async fn status(&self) -> Option<Value> {
        let req = ::http::Request::get(&self.path).body(Vec::new()).ok()?;
        let text = self.client.request_text(req).await.ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Messages the job has had acknowledged so far (0 while the pod does not answer).
    pub async fn acked(&self) -> u64 {
        self.status()
            .await
            .and_then(|s| s["acked"].as_u64())
            .unwrap_or(0)
    }

    /// Waits for the job to end; its JSON result (panics if it failed).
    pub async fn result(&self) -> Value {
        let status = eventually_within(
            &format!("{} to finish", self.what),
            Duration::from_secs(600),
            || async { self.status().await.filter(|s| s["done"] == true) },
        )
        .await;
        assert!(
            status["error"].is_null(),
            "{} failed: {}",
            self.what,
            status["error"]
        );
        status["result"].clone()
    }
}
