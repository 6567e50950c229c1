//! The node agent: a small, honest stand-in for the kubelet. It registers a Node
//! (capacity, Ready condition, heartbeat Lease), and for every pod the scheduler
//! binds to it: gives the pod a network namespace with its own IP, renders its
//! volumes (emptyDir, configMap, secret, projected ServiceAccount tokens, PVC-backed
//! directories), starts each
//! container as a local process (the image maps to a binary of this workspace)
//! inside the pod's network namespace and a mount namespace of its own with the
//! volumes bind-mounted at their mountPaths, runs readiness and liveness probes,
//! restarts containers per restartPolicy, reports status (phase, IPs, container
//! states, restarts, conditions), and on deletion sends SIGTERM, waits out the grace
//! period, sends SIGKILL and removes the pod. Beside it runs the worlds' volume
//! provisioner ([`crate::volumes`]).

use crate::error::{Error, Result, io_at};
use crate::{net, volumes};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Node, PersistentVolume, PersistentVolumeClaim, Pod, Probe, Secret,
    ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name.
    pub node: String,
    /// Where the binaries that images map to live (the workspace's target dir).
    pub bin_dir: PathBuf,
    /// Pod directories, provisioned volumes and logs.
    pub work_dir: PathBuf,
    /// API server address as pods see it (KUBERNETES_SERVICE_HOST/PORT).
    pub api_host: String,
    pub api_port: u16,
}

fn now() -> Value {
    serde_json::to_value(Time(Timestamp::now())).expect("time serializes")
}

/// What the probes of one container run found.
#[derive(Default)]
struct ProbeState {
    ready: AtomicBool,
    /// Liveness failed past its threshold: the container must be restarted.
    kill: AtomicBool,
}

struct Ctr {
    spec: Container,
    env: Vec<(String, String)>,
    mounts: Vec<(PathBuf, String, bool)>,
    log: PathBuf,
    child: Option<Child>,
    restarts: i32,
    started_at: Option<Value>,
    last_terminated: Option<Value>,
    terminated: Option<Value>,
    next_start: Option<Instant>,
    probes: Arc<ProbeState>,
    probe_task: Option<JoinHandle<()>>,
}

impl Ctr {
    fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| c.id()).map(|p| p as i32)
    }
}

struct PodRt {
    ns: String,
    name: String,
    uid: String,
    netns: String,
    veth: String,
    ip: Ipv4Addr,
    restart_policy: String,
    grace: i64,
    containers: Vec<Ctr>,
    start_time: Value,
    ready_since: (bool, Value),
    last_status: Option<Value>,
}

impl PodRt {
    fn key(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }
}

#[derive(Default)]
struct State {
    pods: HashMap<String, PodRt>,
    terminating: HashSet<String>,
}

/// A running agent; stops everything it started when dropped.
pub struct Agent {
    pub cfg: Arc<AgentConfig>,
    client: Client,
    state: Arc<Mutex<State>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Agent {
    pub async fn start(client: Client, cfg: AgentConfig) -> Result<Agent> {
        std::fs::create_dir_all(&cfg.work_dir).map_err(io_at(&cfg.work_dir))?;
        let cfg = Arc::new(cfg);
        register_node(&client, &cfg).await?;
        let state = Arc::new(Mutex::new(State::default()));
        let next_ip = Arc::new(AtomicU64::new(10));
        let mut tasks = Vec::new();
        {
            let (client, cfg) = (client.clone(), cfg.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    if let Err(e) = heartbeat(&client, &cfg).await {
                        tracing::warn!(error = %e, "node heartbeat");
                    }
                }
            }));
        }
        tasks.push(volumes::spawn(
            client.clone(),
            cfg.node.clone(),
            cfg.work_dir.join("volumes"),
        ));
        {
            let (client, cfg, state, next_ip) =
                (client.clone(), cfg.clone(), state.clone(), next_ip.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    if let Err(e) = sync_pods(&client, &cfg, &state, &next_ip).await {
                        tracing::warn!(error = %e, "pod sync");
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }));
        }
        Ok(Agent {
            cfg,
            client,
            state,
            tasks,
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The log file of a container (all its runs, appended).
    pub fn log_path(&self, ns: &str, pod: &str, container: &str) -> PathBuf {
        self.cfg
            .work_dir
            .join("logs")
            .join(format!("{ns}_{pod}"))
            .join(format!("{container}.log"))
    }

    /// Sends a signal to a container's process (e.g. SIGKILL to crash it).
    pub fn signal(&self, ns: &str, pod: &str, container: &str, sig: i32) -> Result<()> {
        let st = self.state.lock().unwrap();
        let pid = st
            .pods
            .values()
            .find(|p| p.ns == ns && p.name == pod)
            .and_then(|p| p.containers.iter().find(|c| c.spec.name == container))
            .and_then(|c| c.pid())
            .ok_or_else(|| Error::Pod {
                pod: format!("{ns}/{pod}"),
                detail: format!("no running container {container}"),
            })?;
        // SAFETY: kill(2) on a pid we spawned and have not reaped.
        unsafe { libc::kill(pid, sig) };
        Ok(())
    }

    /// Cuts a pod off the network (`up = false`: its link goes down) or reconnects it.
    pub fn set_network(&self, ns: &str, pod: &str, up: bool) -> Result<()> {
        let veth = {
            let st = self.state.lock().unwrap();
            st.pods
                .values()
                .find(|p| p.ns == ns && p.name == pod)
                .map(|p| p.veth.clone())
        };
        let veth = veth.ok_or_else(|| Error::Pod {
            pod: format!("{ns}/{pod}"),
            detail: "not running on this node".into(),
        })?;
        net::set_link(&veth, up)
    }

    /// The pod's IP, as the agent gave it.
    pub fn pod_ip(&self, ns: &str, pod: &str) -> Option<Ipv4Addr> {
        let st = self.state.lock().unwrap();
        st.pods
            .values()
            .find(|p| p.ns == ns && p.name == pod)
            .map(|p| p.ip)
    }

    /// Every container log, for a failing test.
    pub fn dump_logs(&self, tail: usize) {
        let dir = self.cfg.work_dir.join("logs");
        let Ok(pods) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut pods: Vec<_> = pods.flatten().map(|e| e.path()).collect();
        pods.sort();
        for p in pods {
            let Ok(files) = std::fs::read_dir(&p) else {
                continue;
            };
            for f in files.flatten() {
                let text = std::fs::read_to_string(f.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let start = lines.len().saturating_sub(tail);
                eprintln!("---- {} (last {tail} lines) ----", f.path().display());
                for l in &lines[start..] {
                    eprintln!("{l}");
                }
            }
        }
    }

    /// Stops every pod process now (SIGKILL) and removes their namespaces.
    pub fn shutdown(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let mut st = self.state.lock().unwrap();
        for (_, mut p) in st.pods.drain() {
            for c in &mut p.containers {
                if let Some(pid) = c.pid() {
                    // SAFETY: kill(2) on our own child.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                if let Some(t) = c.probe_task.take() {
                    t.abort();
                }
            }
            net::del_pod(&p.netns);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn register_node(client: &Client, cfg: &AgentConfig) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": cfg.node, "labels": {
            "kubernetes.io/hostname": cfg.node, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64", "e2e.sluice.dev/agent": "true"}},
        "spec": {},
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    heartbeat(client, cfg).await
}

/// Node status (capacity, Ready) and the node Lease, renewed.
async fn heartbeat(client: &Client, cfg: &AgentConfig) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let t = now();
    let cap = json!({"cpu": "32", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"});
    let status = json!({"status": {
        "capacity": cap, "allocatable": cap,
        "addresses": [{"type": "InternalIP", "address": net::BRIDGE_IP.to_string()},
                      {"type": "Hostname", "address": cfg.node}],
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "KubeletReady",
             "message": "sluice e2e agent is posting ready status",
             "lastHeartbeatTime": t, "lastTransitionTime": t},
            {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory", "lastHeartbeatTime": t, "lastTransitionTime": t},
            {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure", "lastHeartbeatTime": t, "lastTransitionTime": t},
            {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID", "lastHeartbeatTime": t, "lastTransitionTime": t},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {"machineID": "sluice-e2e", "systemUUID": "sluice-e2e", "bootID": "sluice-e2e",
            "kernelVersion": "linux", "osImage": "sluice e2e agent", "containerRuntimeVersion": "sluice-e2e://0.1",
            "kubeletVersion": "v1.20.2", "kubeProxyVersion": "v1.20.2", "operatingSystem": "linux", "architecture": "amd64"},
    }});
    nodes
        .patch_status(
            &cfg.node,
            &PatchParams::default(),
            &Patch::Strategic(&status),
        )
        .await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": cfg.node},
        "spec": {"holderIdentity": cfg.node, "leaseDurationSeconds": 40,
                 "renewTime": serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(Timestamp::now()))?},
    });
    leases
        .patch(
            &cfg.node,
            &PatchParams::apply("sluice-e2e-agent").force(),
            &Patch::Apply(&lease),
        )
        .await?;
    Ok(())
}

async fn sync_pods(
    client: &Client,
    cfg: &Arc<AgentConfig>,
    state: &Arc<Mutex<State>>,
    next_ip: &Arc<AtomicU64>,
) -> Result<()> {
    let api: Api<Pod> = Api::all(client.clone());
    let list = api
        .list(&ListParams::default().fields(&format!("spec.nodeName={}", cfg.node)))
        .await?;
    let seen: HashSet<String> = list.items.iter().filter_map(|p| p.uid()).collect();
    // Pods deleted outright (grace 0): kill at once.
    {
        let mut st = state.lock().unwrap();
        let gone: Vec<String> = st
            .pods
            .keys()
            .filter(|u| !seen.contains(*u))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(mut p) = st.pods.remove(&uid) {
                tracing::info!(pod = %p.key(), "pod gone from the API: killing");
                for c in &mut p.containers {
                    stop_probes(c);
                    if let Some(pid) = c.pid() {
                        // SAFETY: kill(2) on our own child.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
                net::del_pod(&p.netns);
            }
        }
        st.terminating.retain(|u| seen.contains(u));
    }
    for pod in list.items {
        let uid = pod.uid().unwrap_or_default();
        let (known, terminating) = {
            let st = state.lock().unwrap();
            (st.pods.contains_key(&uid), st.terminating.contains(&uid))
        };
        if pod.metadata.deletion_timestamp.is_some() {
            if terminating {
                continue;
            }
            let rt = {
                let mut st = state.lock().unwrap();
                st.terminating.insert(uid.clone());
                st.pods.remove(&uid)
            };
            let grace = pod.metadata.deletion_grace_period_seconds;
            let client = client.clone();
            tokio::spawn(async move {
                if let Some(rt) = rt {
                    terminate(rt, grace).await;
                }
                let api: Api<Pod> = Api::namespaced(client, &pod.namespace().unwrap_or_default());
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                if let Err(e) = api.delete(&pod.name_any(), &dp).await {
                    tracing::debug!(error = %e, "final pod delete");
                }
            });
            continue;
        }
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if !known && (phase == "Succeeded" || phase == "Failed") {
            continue;
        }
        if !known {
            let ip_n = next_ip.fetch_add(1, Ordering::Relaxed);
            let ip = Ipv4Addr::from(u32::from(net::BRIDGE_IP) - 1 + ip_n as u32);
            match prepare(client, cfg, &pod, ip).await {
                Ok(rt) => {
                    tracing::info!(pod = %rt.key(), ip = %rt.ip, "pod starting");
                    state.lock().unwrap().pods.insert(uid.clone(), rt);
                }
                Err(e) => {
                    tracing::warn!(pod = %pod.name_any(), error = %e, "pod not started yet");
                    continue;
                }
            }
        }
    }
    // Containers: exits, restarts, liveness kills; then statuses.
    let mut patches = Vec::new();
    {
        let mut st = state.lock().unwrap();
        for p in st.pods.values_mut() {
            step_pod(cfg, p);
            let status = pod_status(p);
            if p.last_status.as_ref() != Some(&status) {
                patches.push((p.ns.clone(), p.name.clone(), p.uid.clone(), status));
            }
        }
    }
    for (ns, name, uid, status) in patches {
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&status))
            .await
        {
            Ok(_) => {
                if let Some(p) = state.lock().unwrap().pods.get_mut(&uid) {
                    p.last_status = Some(status);
                }
            }
            Err(e) => tracing::debug!(pod = %name, error = %e, "status patch"),
        }
    }
    Ok(())
}

fn stop_probes(c: &mut Ctr) {
    if let Some(t) = c.probe_task.take() {
        t.abort();
    }
    c.probes.ready.store(false, Ordering::Relaxed);
    c.probes.kill.store(false, Ordering::Relaxed);
}

/// SIGTERM, the grace period, SIGKILL; then the network goes.
async fn terminate(mut rt: PodRt, grace: Option<i64>) {
    let grace = grace.unwrap_or(rt.grace).max(0) as u64;
    tracing::info!(pod = %rt.key(), grace, "pod terminating: SIGTERM");
    for c in &mut rt.containers {
        stop_probes(c);
        if let Some(pid) = c.pid() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(grace);
    let key = rt.key();
    for c in &mut rt.containers {
        if let Some(child) = c.child.as_mut()
            && tokio::time::timeout_at(deadline, child.wait())
                .await
                .is_err()
        {
            tracing::info!(pod = %key, container = %c.spec.name, "grace period over: SIGKILL");
            let _ = child.kill().await;
        }
    }
    net::del_pod(&rt.netns);
}

/// Everything a pod needs before its containers start: IP and netns, volumes, env.
async fn prepare(client: &Client, cfg: &AgentConfig, pod: &Pod, ip: Ipv4Addr) -> Result<PodRt> {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let uid = pod.uid().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let short: String = uid.chars().filter(|c| *c != '-').take(12).collect();
    let pod_dir = cfg.work_dir.join("pods").join(&uid);
    let log_dir = cfg.work_dir.join("logs").join(format!("{ns}_{name}"));
    std::fs::create_dir_all(&log_dir).map_err(io_at(&log_dir))?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let err = |detail: String| Error::Pod {
        pod: format!("{ns}/{name}"),
        detail,
    };

    // Volumes: name -> host directory (or file).
    let mut volumes: HashMap<String, PathBuf> = HashMap::new();
    for v in spec.volumes.iter().flatten() {
        let dir = pod_dir.join("volumes").join(&v.name);
        if v.empty_dir.is_some() {
            std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        } else if let Some(src) = &v.config_map {
            let cm = cms.get_opt(&src.name).await?;
            let data: BTreeMap<String, Vec<u8>> = match cm {
                Some(cm) => cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .chain(
                        cm.binary_data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.0)),
                    )
                    .collect(),
                None if src.optional == Some(true) => BTreeMap::new(),
                None => return Err(err(format!("configmap {} not found", src.name))),
            };
            render(&dir, data, src.items.as_deref())?;
        } else if let Some(src) = &v.secret {
            let sname = src.secret_name.clone().unwrap_or_default();
            let data: BTreeMap<String, Vec<u8>> = match secrets.get_opt(&sname).await? {
                Some(s) => s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .chain(
                        s.string_data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.into_bytes())),
                    )
                    .collect(),
                None if src.optional == Some(true) => BTreeMap::new(),
                None => return Err(err(format!("secret {sname} not found"))),
            };
            render(&dir, data, src.items.as_deref())?;
        } else if let Some(src) = &v.persistent_volume_claim {
            let pvc = pvcs
                .get_opt(&src.claim_name)
                .await?
                .ok_or_else(|| err(format!("claim {} not found", src.claim_name)))?;
            let pv_name = pvc
                .spec
                .and_then(|s| s.volume_name)
                .ok_or_else(|| err(format!("claim {} not bound", src.claim_name)))?;
            let pv = pvs.get(&pv_name).await?;
            let path = pv
                .spec
                .and_then(|s| s.host_path)
                .map(|h| PathBuf::from(h.path))
                .ok_or_else(|| err(format!("volume {pv_name} is not a directory volume")))?;
            volumes.insert(v.name.clone(), path);
            continue;
        } else if let Some(src) = &v.projected {
            // ServiceAccount tokens, requested as the kubelet does (TokenRequest bound
            // to the pod). Written once: the agent does not renew them, so scenarios
            // stay within the requested lifetime.
            std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
            let sa = spec.service_account_name.as_deref().unwrap_or("default");
            let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
            for source in src.sources.iter().flatten() {
                let Some(t) = &source.service_account_token else {
                    return Err(err(format!(
                        "volume {}: only serviceAccountToken projections are supported",
                        v.name
                    )));
                };
                let request = TokenRequest {
                    spec: TokenRequestSpec {
                        audiences: t.audience.iter().cloned().collect(),
                        expiration_seconds: t.expiration_seconds,
                        bound_object_ref: Some(BoundObjectReference {
                            api_version: Some("v1".into()),
                            kind: Some("Pod".into()),
                            name: Some(name.clone()),
                            uid: Some(uid.clone()),
                        }),
                    },
                    ..Default::default()
                };
                let token = sas
                    .create_token_request(sa, &PostParams::default(), &request)
                    .await?
                    .status
                    .map(|s| s.token)
                    .ok_or_else(|| err(format!("no token for ServiceAccount {sa}")))?;
                let file = dir.join(&t.path);
                std::fs::write(&file, token).map_err(io_at(&file))?;
                let mode = src.default_mode.unwrap_or(0o644) as u32;
                std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(mode))
                    .map_err(io_at(&file))?;
            }
        } else {
            return Err(err(format!("volume {}: unsupported volume type", v.name)));
        }
        volumes.insert(v.name.clone(), dir);
    }

    let field = |path: &str| -> Option<String> {
        let meta = &pod.metadata;
        Some(match path {
            "metadata.name" => name.clone(),
            "metadata.namespace" => ns.clone(),
            "metadata.uid" => uid.clone(),
            "spec.nodeName" => cfg.node.clone(),
            "spec.serviceAccountName" => spec.service_account_name.clone().unwrap_or_default(),
            "status.podIP" => ip.to_string(),
            "status.hostIP" => net::BRIDGE_IP.to_string(),
            p if p.starts_with("metadata.labels['") => {
                let k = p
                    .trim_start_matches("metadata.labels['")
                    .trim_end_matches("']");
                meta.labels.as_ref()?.get(k)?.clone()
            }
            p if p.starts_with("metadata.annotations['") => {
                let k = p
                    .trim_start_matches("metadata.annotations['")
                    .trim_end_matches("']");
                meta.annotations.as_ref()?.get(k)?.clone()
            }
            _ => return None,
        })
    };

    let mut containers = Vec::new();
    for c in &spec.containers {
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                format!(
                    "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    cfg.bin_dir.display()
                ),
            ),
            (
                "HOSTNAME".into(),
                spec.hostname.clone().unwrap_or_else(|| name.clone()),
            ),
            ("KUBERNETES_SERVICE_HOST".into(), cfg.api_host.clone()),
            ("KUBERNETES_SERVICE_PORT".into(), cfg.api_port.to_string()),
            (
                "KUBERNETES_SERVICE_PORT_HTTPS".into(),
                cfg.api_port.to_string(),
            ),
        ];
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
            env.retain(|(n, _)| *n != k);
            env.push((k, v));
        };
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            if let Some(r) = &from.config_map_ref
                && let Some(cm) = cms.get_opt(&r.name).await?
            {
                for (k, v) in cm.data.unwrap_or_default() {
                    set(&mut env, format!("{prefix}{k}"), v);
                }
            }
            if let Some(r) = &from.secret_ref
                && let Some(s) = secrets.get_opt(&r.name).await?
            {
                for (k, v) in s.data.unwrap_or_default() {
                    set(
                        &mut env,
                        format!("{prefix}{k}"),
                        String::from_utf8_lossy(&v.0).into(),
                    );
                }
            }
        }
        for e in c.env.iter().flatten() {
            let value = if let Some(vf) = &e.value_from {
                if let Some(f) = &vf.field_ref {
                    field(&f.field_path).ok_or_else(|| {
                        err(format!(
                            "env {}: unsupported fieldRef {}",
                            e.name, f.field_path
                        ))
                    })?
                } else if let Some(r) = &vf.config_map_key_ref {
                    let v = cms
                        .get_opt(&r.name)
                        .await?
                        .and_then(|cm| cm.data.unwrap_or_default().get(&r.key).cloned());
                    match v {
                        Some(v) => v,
                        None if r.optional == Some(true) => continue,
                        None => {
                            return Err(err(format!(
                                "env {}: configmap key {}/{} missing",
                                e.name, r.name, r.key
                            )));
                        }
                    }
                } else if let Some(r) = &vf.secret_key_ref {
                    let v = secrets
                        .get_opt(&r.name)
                        .await?
                        .and_then(|s| s.data.unwrap_or_default().get(&r.key).cloned());
                    match v {
                        Some(v) => String::from_utf8_lossy(&v.0).into(),
                        None if r.optional == Some(true) => continue,
                        None => {
                            return Err(err(format!(
                                "env {}: secret key {}/{} missing",
                                e.name, r.name, r.key
                            )));
                        }
                    }
                } else {
                    return Err(err(format!("env {}: unsupported valueFrom", e.name)));
                }
            } else {
                expand(e.value.as_deref().unwrap_or(""), &env)
            };
            set(&mut env, e.name.clone(), value);
        }
        let mut mounts = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let mut src = volumes
                .get(&m.name)
                .cloned()
                .ok_or_else(|| err(format!("mount of unknown volume {}", m.name)))?;
            if let Some(sp) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                src = src.join(sp);
            }
            mounts.push((src, m.mount_path.clone(), m.read_only == Some(true)));
        }
        containers.push(Ctr {
            spec: c.clone(),
            env,
            mounts,
            log: log_dir.join(format!("{}.log", c.name)),
            child: None,
            restarts: 0,
            started_at: None,
            last_terminated: None,
            terminated: None,
            next_start: Some(Instant::now()),
            probes: Arc::new(ProbeState::default()),
            probe_task: None,
        });
    }

    let netns = format!("pod-{short}");
    let veth = format!("v{short}");
    net::add_pod(&netns, &veth, ip, &ns)?;
    Ok(PodRt {
        ns: ns.clone(),
        name: name.clone(),
        uid: uid.clone(),
        netns,
        veth,
        ip,
        restart_policy: spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into()),
        grace: spec.termination_grace_period_seconds.unwrap_or(30),
        containers,
        start_time: now(),
        ready_since: (false, now()),
        last_status: None,
    })
}

/// $(VAR) references to earlier variables, as Kubernetes expands them.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = s.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

fn render(
    dir: &Path,
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_at(dir))?;
    let files: Vec<(String, Vec<u8>)> = match items {
        Some(items) => items
            .iter()
            .filter_map(|i| data.get(&i.key).map(|d| (i.path.clone(), d.clone())))
            .collect(),
        None => data.into_iter().collect(),
    };
    for (path, bytes) in files {
        let p = dir.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io_at(parent))?;
        }
        std::fs::write(&p, bytes).map_err(io_at(&p))?;
    }
    Ok(())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The binary an image (or the container's command) stands for.
fn resolve_binary(cfg: &AgentConfig, c: &Container) -> Result<(PathBuf, Vec<String>)> {
    let image = c.image.clone().unwrap_or_default();
    let (prog, mut args) = match c.command.as_deref() {
        Some([first, rest @ ..]) => (first.clone(), rest.to_vec()),
        _ => {
            let base = image.rsplit('/').next().unwrap_or("");
            let base = base.split(['@', ':']).next().unwrap_or("").to_string();
            (base, Vec::new())
        }
    };
    args.extend(c.args.iter().flatten().cloned());
    let candidates = if prog.contains('/') {
        vec![PathBuf::from(&prog)]
    } else {
        vec![
            cfg.bin_dir.join(&prog),
            PathBuf::from("/usr/bin").join(&prog),
            PathBuf::from("/bin").join(&prog),
        ]
    };
    let found = candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| Error::NoBinary {
            image: image.clone(),
            command: prog.clone(),
            dir: cfg.bin_dir.clone(),
        })?;
    Ok((found, args))
}

fn start_container(cfg: &AgentConfig, p: &PodRt, c: &mut Ctr) -> Result<()> {
    let (bin, args) = resolve_binary(cfg, &c.spec)?;
    let env: Vec<(String, String)> = c
        .env
        .iter()
        .map(|(k, v)| (k.clone(), expand(v, &c.env)))
        .collect();
    let args: Vec<String> = args.iter().map(|a| expand(a, &env)).collect();
    let mut script = String::from("set -e\n");
    for (src, dst, ro) in &c.mounts {
        let (s, d) = (shell_quote(&src.to_string_lossy()), shell_quote(dst));
        if src.is_file() {
            script += &format!("mkdir -p \"$(dirname {d})\"; [ -e {d} ] || touch {d}\n");
        } else {
            script += &format!("mkdir -p {d}\n");
        }
        script += &format!("mount --bind {s} {d}\n");
        if *ro {
            script += &format!("mount -o remount,bind,ro {d}\n");
        }
    }
    if let Some(wd) = &c.spec.working_dir {
        script += &format!("mkdir -p {0}; cd {0}\n", shell_quote(wd));
    }
    script += "exec \"$@\"\n";
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&c.log)
        .map_err(io_at(&c.log))?;
    use std::io::Write;
    let mut l2 = log.try_clone()?;
    let _ = writeln!(
        l2,
        "==== sluice-e2e agent: start #{} of {} ({}) ====",
        c.restarts,
        c.spec.name,
        bin.display()
    );
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &p.netns,
            "sh",
            "-c",
            &script,
            "sluice-container",
        ])
        .arg(&bin)
        .args(&args)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| Error::Command {
            cmd: format!("start {}", bin.display()),
            detail: e.to_string(),
        })?;
    c.child = Some(child);
    c.started_at = Some(now());
    c.terminated = None;
    c.probes = Arc::new(ProbeState::default());
    if c.spec.readiness_probe.is_none() {
        c.probes.ready.store(true, Ordering::Relaxed);
    }
    c.probe_task = Some(spawn_probes(p.ip, &c.spec, c.probes.clone()));
    Ok(())
}

fn step_pod(cfg: &AgentConfig, p: &mut PodRt) {
    let policy = p.restart_policy.clone();
    let key = p.key();
    for i in 0..p.containers.len() {
        // Exited?
        let exited = {
            let c = &mut p.containers[i];
            if c.probes.kill.load(Ordering::Relaxed) {
                if let Some(pid) = c.pid() {
                    tracing::info!(pod = %key, container = %c.spec.name, "liveness probe failed: killing");
                    // SAFETY: kill(2) on our own child.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                c.probes.kill.store(false, Ordering::Relaxed);
            }
            match c.child.as_mut().map(|ch| ch.try_wait()) {
                Some(Ok(Some(status))) => Some(status),
                _ => None,
            }
        };
        if let Some(status) = exited {
            let c = &mut p.containers[i];
            use std::os::unix::process::ExitStatusExt;
            let code = status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            tracing::info!(pod = %key, container = %c.spec.name, code, "container exited");
            c.child = None;
            stop_probes(c);
            let t = json!({"exitCode": code, "reason": if code == 0 {"Completed"} else {"Error"},
                           "startedAt": c.started_at, "finishedAt": now()});
            c.terminated = Some(t.clone());
            c.last_terminated = Some(t);
            let restart = match policy.as_str() {
                "Never" => false,
                "OnFailure" => code != 0,
                _ => true,
            };
            c.next_start = restart.then(|| {
                // A short crash-loop back-off: 1 s doubling, at most 10 s.
                let secs = 1u64 << (c.restarts.clamp(0, 3) as u32);
                Instant::now() + Duration::from_secs(secs.min(10))
            });
            if restart {
                c.restarts += 1;
            }
        }
        let due = {
            let c = &p.containers[i];
            c.child.is_none() && c.next_start.is_some_and(|t| t <= Instant::now())
        };
        if due {
            let mut c = std::mem::replace(&mut p.containers[i], placeholder());
            c.next_start = None;
            if let Err(e) = start_container(cfg, p, &mut c) {
                tracing::warn!(pod = %key, container = %c.spec.name, error = %e, "cannot start container");
                c.terminated = Some(
                    json!({"exitCode": 127, "reason": "StartError", "message": e.to_string(), "finishedAt": now()}),
                );
                c.next_start = Some(Instant::now() + Duration::from_secs(5));
            }
            p.containers[i] = c;
        }
    }
}

fn placeholder() -> Ctr {
    Ctr {
        spec: Container::default(),
        env: Vec::new(),
        mounts: Vec::new(),
        log: PathBuf::new(),
        child: None,
        restarts: 0,
        started_at: None,
        last_terminated: None,
        terminated: None,
        next_start: None,
        probes: Arc::new(ProbeState::default()),
        probe_task: None,
    }
}

fn pod_status(p: &mut PodRt) -> Value {
    let mut statuses = Vec::new();
    let mut all_ready = true;
    let mut any_running = false;
    let mut all_done = true;
    let mut any_failed = false;
    for c in &p.containers {
        let running = c.child.is_some();
        let ready = running && c.probes.ready.load(Ordering::Relaxed);
        all_ready &= ready;
        any_running |= running;
        let state = if running {
            json!({"running": {"startedAt": c.started_at}})
        } else if let Some(t) = &c.terminated {
            if c.next_start.is_some() {
                json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting the container"}})
            } else {
                json!({"terminated": t})
            }
        } else {
            json!({"waiting": {"reason": "ContainerCreating"}})
        };
        if running || c.next_start.is_some() {
            all_done = false;
        }
        if let Some(t) = &c.terminated {
            any_failed |= t["exitCode"].as_i64() != Some(0);
        }
        let mut s = json!({
            "name": c.spec.name, "image": c.spec.image.clone().unwrap_or_default(),
            "imageID": format!("sluice-e2e://{}", c.spec.image.clone().unwrap_or_default()),
            "containerID": format!("sluice-e2e://{}/{}", p.uid, c.spec.name),
            "ready": ready, "started": running, "restartCount": c.restarts, "state": state,
        });
        if let Some(t) = &c.last_terminated {
            s["lastState"] = json!({"terminated": t});
        }
        statuses.push(s);
    }
    // Running once a container runs (or is being restarted); Succeeded/Failed when
    // every container is done for good; Pending before.
    let restarting = p.containers.iter().any(|c| c.restarts > 0);
    let phase = if !all_done && (any_running || restarting) {
        "Running"
    } else if all_done && !p.containers.is_empty() {
        if any_failed { "Failed" } else { "Succeeded" }
    } else {
        "Pending"
    };
    if p.ready_since.0 != all_ready {
        p.ready_since = (all_ready, now());
    }
    let tf = |b: bool| if b { "True" } else { "False" };
    let t = p.ready_since.1.clone();
    json!({"status": {
        "phase": phase,
        "hostIP": net::BRIDGE_IP.to_string(),
        "podIP": p.ip.to_string(),
        "podIPs": [{"ip": p.ip.to_string()}],
        "startTime": p.start_time,
        "conditions": [
            {"type": "Initialized", "status": "True", "lastTransitionTime": p.start_time},
            {"type": "Ready", "status": tf(all_ready), "lastTransitionTime": t},
            {"type": "ContainersReady", "status": tf(all_ready), "lastTransitionTime": t},
        ],
        "containerStatuses": statuses,
    }})
}

/// Resolves a probe's port (a number or a container port's name).
fn probe_port(
    c: &Container,
    port: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
) -> Option<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// One probe run: true = success.
async fn probe_once(ip: Ipv4Addr, c: &Container, probe: &Probe) -> bool {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let fut = async {
        if let Some(h) = &probe.http_get {
            let Some(port) = probe_port(c, &h.port) else {
                return false;
            };
            let host = h.host.clone().unwrap_or_else(|| ip.to_string());
            let path = h.path.clone().unwrap_or_else(|| "/".into());
            match sluice_testkit::http::get_async(&host, port, &path).await {
                Some((code, _)) => (200..400).contains(&code),
                None => false,
            }
        } else if let Some(t) = &probe.tcp_socket {
            let Some(port) = probe_port(c, &t.port) else {
                return false;
            };
            tokio::net::TcpStream::connect((ip, port)).await.is_ok()
        } else {
            tracing::warn!(container = %c.name, "probe type not supported by the e2e agent; counted as success");
            true
        }
    };
    tokio::time::timeout(timeout, fut).await.unwrap_or(false)
}

fn spawn_probes(ip: Ipv4Addr, c: &Container, st: Arc<ProbeState>) -> JoinHandle<()> {
    let c = c.clone();
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut next_ready = start
            + Duration::from_secs(
                c.readiness_probe
                    .as_ref()
                    .and_then(|p| p.initial_delay_seconds)
                    .unwrap_or(0) as u64,
            );
        let mut next_live = start
            + Duration::from_secs(
                c.liveness_probe
                    .as_ref()
                    .and_then(|p| p.initial_delay_seconds)
                    .unwrap_or(0) as u64,
            );
        let (mut r_ok, mut r_fail, mut l_fail) = (0i32, 0i32, 0i32);
        loop {
            let now = tokio::time::Instant::now();
            if let Some(p) = &c.readiness_probe
                && now >= next_ready
            {
                if probe_once(ip, &c, p).await {
                    r_ok += 1;
                    r_fail = 0;
                    if r_ok >= p.success_threshold.unwrap_or(1) {
                        st.ready.store(true, Ordering::Relaxed);
                    }
                } else {
                    r_fail += 1;
                    r_ok = 0;
                    if r_fail >= p.failure_threshold.unwrap_or(3)
                        || !st.ready.load(Ordering::Relaxed)
                    {
                        st.ready.store(false, Ordering::Relaxed);
                    }
                }
                // Until first ready, probe quickly (kubelet probes at the period;
                // a shorter first interval only makes start-up faster).
                let period = if st.ready.load(Ordering::Relaxed) {
                    Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64)
                        .min(Duration::from_secs(2))
                } else {
                    Duration::from_millis(500)
                };
                next_ready = tokio::time::Instant::now() + period;
            }
            if let Some(p) = &c.liveness_probe
                && now >= next_live
            {
                if probe_once(ip, &c, p).await {
                    l_fail = 0;
                } else {
                    l_fail += 1;
                    if l_fail >= p.failure_threshold.unwrap_or(3) {
                        st.kill.store(true, Ordering::Relaxed);
                        return;
                    }
                }
                next_live = tokio::time::Instant::now()
                    + Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}
