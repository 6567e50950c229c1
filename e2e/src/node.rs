//! A real node for a world: containerd (its CRI plugin, runc, CNI bridge networking),
//! the kubelet and kube-proxy of the Kubernetes 1.20 build, started by
//! `scripts/k8s/node.sh` inside the world's namespaces, running the images
//! `scripts/images/build.sh` made from this test run's binaries. Beside it run the
//! world's volume provisioner ([`crate::volumes`]: hostPath volumes, which the kubelet
//! mounts) and, in the harness, the cluster DNS the kubelet points pods at.

use crate::error::{Error, Result, io_at};
use crate::{net, volumes};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Api, Client};
use sluice_testkit::eventually_within;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::task::JoinHandle;

/// The images a real node runs, as `scripts/images/build.sh` names them.
pub const IMAGES: [&str; 5] = ["broker", "sidecar", "operator", "e2e-app", "pause"];

pub struct RealNode {
    /// node.sh's state: containerd's root and socket, the kubelet's root, logs, pids.
    state: PathBuf,
    volumes: JoinHandle<()>,
}

impl RealNode {
    /// Starts the node `name` with the images (OCI archives) in `images`, and waits
    /// until the kubelet has registered it Ready.
    pub async fn start(
        client: Client,
        name: &str,
        dir: &Path,
        kubeconfig: &Path,
        images: &Path,
    ) -> Result<RealNode> {
        let state = dir.join("node");
        let script = crate::harness::repo_root().join("scripts/k8s/node.sh");
        succeeds(
            "node.sh start",
            Command::new(&script)
                .arg("start")
                .arg(&state)
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .args(["--node", name])
                .args(["--ip", &net::BRIDGE_IP.to_string()])
                .args(["--bridge", net::BRIDGE])
                .args(["--pod-cidr", net::POD_CIDR])
                .args(["--dns", &net::BRIDGE_IP.to_string()])
                .arg("--images")
                .arg(images)
                .env("SLUICE_NODE_PRIVATE", "1"),
        )?;
        let volumes = volumes::spawn(client.clone(), name.to_string(), dir.join("volumes"));
        let node = RealNode { state, volumes };
        let nodes: Api<Node> = Api::all(client);
        eventually_within(
            &format!("node {name} registered by the kubelet and Ready"),
            Duration::from_secs(120),
            || async {
                let n = nodes.get_opt(name).await.ok()??;
                let ready = n
                    .status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                ready.then_some(())
            },
        )
        .await;
        Ok(node)
    }

    /// containerd's socket.
    fn socket(&self) -> PathBuf {
        self.state.join("containerd/containerd.sock")
    }

    /// SIGKILLs the process of a pod's container through containerd, as a crash
    /// would: the kubelet sees it die and restarts it in place.
    pub fn kill(&self, pod: &Pod, container: &str) -> Result<()> {
        let id = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.name == container))
            .and_then(|c| c.container_id.as_deref())
            .and_then(|id| id.strip_prefix("containerd://"))
            .ok_or_else(|| Error::Command {
                cmd: "kill a container".into(),
                detail: format!("container {container} has no containerd id in its pod's status"),
            })?
            .to_string();
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args([
                "--namespace",
                "k8s.io",
                "tasks",
                "kill",
                "--signal",
                "SIGKILL",
            ])
            .arg(&id)
            .output()
            .map_err(|e| Error::Command {
                cmd: "ctr tasks kill".into(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(Error::Command {
                cmd: format!("ctr tasks kill {id}"),
                detail: String::from_utf8_lossy(&out.stderr).into(),
            });
        }
        Ok(())
    }

    /// After a failure: the tail of the node's own logs and of every container's.
    pub fn dump_logs(&self, lines: usize) {
        let mut files: Vec<PathBuf> = ["kubelet", "containerd", "kube-proxy"]
            .iter()
            .map(|f| self.state.join("logs").join(format!("{f}.log")))
            .collect();
        // /var/log/pods/<ns>_<pod>_<uid>/<container>/<restart>.log: the world's own tmpfs.
        let mut pods = Vec::new();
        collect_logs(Path::new("/var/log/pods"), &mut pods);
        pods.sort();
        files.extend(pods);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            eprintln!("---- {} (last {lines} lines) ----", f.display());
            for l in &all[all.len().saturating_sub(lines)..] {
                eprintln!("{l}");
            }
        }
    }

    pub fn shutdown(&self) {
        self.volumes.abort();
        let _ = Command::new(crate::harness::repo_root().join("scripts/k8s/node.sh"))
            .arg("stop")
            .arg(&self.state)
            .status();
    }
}

fn collect_logs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_logs(&p, out);
        } else if p.extension().is_some_and(|x| x == "log") {
            out.push(p);
        }
    }
}

/// Builds the images a real node runs from the binaries in `bin_dir` into `out`
/// (OCI archives), unless the archives there were built from these very binaries.
pub fn build_images(bin_dir: &Path, out: &Path) -> Result<()> {
    let stamp = images_stamp(bin_dir)?;
    let stamp_file = out.join("stamp");
    if std::fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(());
    }
    std::fs::create_dir_all(out).map_err(io_at(out))?;
    succeeds(
        "scripts/images/build.sh",
        Command::new(crate::harness::repo_root().join("scripts/images/build.sh"))
            .arg(bin_dir)
            .arg(out)
            .arg("e2e")
            .args(IMAGES)
            .stdout(std::process::Stdio::null()),
    )?;
    std::fs::write(&stamp_file, stamp).map_err(io_at(&stamp_file))
}

/// Runs a command to its end; an error unless it exits 0.
fn succeeds(what: &str, cmd: &mut Command) -> Result<()> {
    let failed = |detail: String| Error::Command {
        cmd: what.into(),
        detail,
    };
    let st = cmd.status().map_err(|e| failed(e.to_string()))?;
    if !st.success() {
        return Err(failed(format!("exit {st}")));
    }
    Ok(())
}

/// What the images are made of: each binary's size and modification time.
fn images_stamp(bin_dir: &Path) -> Result<String> {
    let mut stamp = String::new();
    for image in IMAGES {
        if image == "pause" {
            continue;
        }
        let bin = bin_dir.join(format!("sluice-{image}"));
        let m = std::fs::metadata(&bin).map_err(io_at(&bin))?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        stamp.push_str(&format!("{} {} {mtime}\n", bin.display(), m.len()));
    }
    Ok(stamp)
}
