//! The images users pull, run by a real container runtime: `scripts/images/build.sh`
//! builds sluice-broker, sluice-sidecar, sluice-operator and sluice-e2e-app through
//! the release Dockerfile's runtime stages (buildah) from this test run's binaries;
//! a containerd of the test's own (its own root, state and socket) imports them and
//! runs them with runc. The broker and the sidecar serve as containers: an app on
//! the host enqueues through the sidecar's container to the broker's, the broker
//! writes its volume as the non-root user 65532 of the images, and the other two
//! images start their binary. What a real node adds (the kubelet, pod networks)
//! is issue 16's next step.

use sluice_integration::*;
use sluice_testkit::ChildGuard;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const NAMESPACE: &str = "sluice-test";

/// A containerd of the test's own, in `dir`.
struct Containerd {
    socket: PathBuf,
    _daemon: ChildGuard,
}

impl Containerd {
    async fn start(dir: &Path) -> Containerd {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = dir.join("containerd.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n[grpc]\n  address = \"{sock}\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = socket.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config);
        let daemon = ChildGuard::spawn_group("containerd", &mut cmd, dir.join("containerd.log"))
            .expect("containerd (Debian's package; scripts/k8s/install-apt.sh installs it)");
        let c = Containerd {
            socket,
            _daemon: daemon,
        };
        eventually_within("containerd answers", Duration::from_secs(30), || async {
            c.ctr(&["version"]).status.success().then_some(())
        })
        .await;
        c
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args(args)
            .output()
            .expect("ctr")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "ctr {args:?}: {text}");
        text
    }

    /// Starts `image` as a container named `name` in the host's network, with
    /// `mounts` (source, destination, rw) and the image's entrypoint given `args`.
    fn run(&self, image: &str, name: &str, mounts: &[(&Path, &str, bool)], args: &[&str]) {
        let mut a: Vec<String> = vec!["run".into(), "--detach".into(), "--net-host".into()];
        a.extend(self.runc_root());
        for (src, dst, rw) in mounts {
            a.push("--mount".into());
            a.push(format!(
                "type=bind,src={},dst={dst},options=rbind:{}",
                src.display(),
                if *rw { "rw" } else { "ro" }
            ));
        }
        a.push(image.into());
        a.push(name.into());
        a.extend(args.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        self.ok(&a);
    }
}

impl Containerd {
    /// runc's state beside the daemon's, not in the machine-wide /run/containerd.
    fn runc_root(&self) -> [String; 2] {
        let root = self.socket.with_file_name("runc");
        ["--runc-root".into(), root.display().to_string()]
    }
}

impl Drop for Containerd {
    /// Containers outlive a killed containerd (their shims are daemons): remove
    /// them while it still answers.
    fn drop(&mut self) {
        for task in ["broker", "sidecar"] {
            let _ = self.ctr(&["tasks", "delete", "--force", task]);
            let _ = self.ctr(&["containers", "delete", task]);
        }
    }
}

/// `/readyz` answers 200 (a refused connection is not ready yet).
fn ready(metrics: std::net::SocketAddr) -> bool {
    std::net::TcpStream::connect(metrics).is_ok() && http_get(metrics, "/readyz").0 == 200
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_images_run_under_containerd_and_carry_messages() {
    let dir = tempfile::tempdir().unwrap();
    let bins = bin("sluice-broker").parent().unwrap().to_path_buf();
    let images = dir.path().join("images");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/images/build.sh");
    let built = Command::new("bash")
        .arg(&script)
        .arg(&bins)
        .arg(&images)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "scripts/images/build.sh: {}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    let ctrd = Containerd::start(&dir.path().join("containerd")).await;
    for image in ["broker", "sidecar", "operator", "e2e-app"] {
        let tar = images.join(format!("{image}.tar"));
        ctrd.ok(&["images", "import", tar.to_str().unwrap()]);
    }
    let listed = ctrd.ok(&["images", "ls", "--quiet"]);
    for image in ["broker", "sidecar", "operator", "e2e-app"] {
        assert!(listed.contains(&format!("sluice-{image}:test")), "{listed}");
    }

    // The broker, its settings and volume mounted as the operator's pods mount them.
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // The volume is the pod's to write (fsGroup, in a cluster): open to all here.
    std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let settings = dir.path().join("broker.toml");
    std::fs::write(&settings, "[[queue]]\nname = \"orders\"\npartitions = 2\n").unwrap();
    let (broker_addr, broker_metrics) = (free_addr(), free_addr());
    ctrd.run(
        "sluice-broker:test",
        "broker",
        &[
            (&data, "/var/lib/sluice", true),
            (&settings, "/etc/sluice/broker.toml", false),
        ],
        &[
            "sluice-broker",
            "--config",
            "/etc/sluice/broker.toml",
            "--data-dir",
            "/var/lib/sluice",
            "--listen",
            &broker_addr.to_string(),
            "--metrics-listen",
            &broker_metrics.to_string(),
            "--ordinal",
            "0",
        ],
    );
    eventually_within(
        "the broker container ready",
        Duration::from_secs(60),
        || async { ready(broker_metrics).then_some(()) },
    )
    .await;
    let (sidecar_addr, sidecar_metrics) = (free_addr(), free_addr());
    let route = format!("orders={broker_addr}");
    ctrd.run(
        "sluice-sidecar:test",
        "sidecar",
        &[],
        &[
            "sluice-sidecar",
            "--listen",
            &sidecar_addr.to_string(),
            "--metrics-listen",
            &sidecar_metrics.to_string(),
            "--route",
            &route,
        ],
    );
    eventually_within(
        "the sidecar container ready",
        Duration::from_secs(60),
        || async { ready(sidecar_metrics).then_some(()) },
    )
    .await;

    // An app on the host, through the sidecar's container to the broker's.
    let mut app = client(sidecar_addr).await;
    for i in 0..20 {
        enqueue(&mut app, "orders", msg(&format!("m{i}")))
            .await
            .unwrap();
    }
    let got = drain(&mut app, "orders", 500).await;
    let mut bodies: Vec<String> = got.iter().map(body_str).collect();
    bodies.sort();
    let mut sent: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    sent.sort();
    assert_eq!(bodies, sent);
    // Written by the image's user, not root.
    let queue_dir = std::fs::metadata(data.join("orders")).unwrap();
    assert_eq!((queue_dir.uid(), queue_dir.gid()), (65532, 65532));

    // The other two images start their binary (in the foreground: `--help`).
    for (image, bin) in [
        ("operator", "sluice-operator"),
        ("e2e-app", "sluice-e2e-app"),
    ] {
        let name = format!("{image}-help");
        let [flag, root] = ctrd.runc_root();
        let out = ctrd.ok(&[
            "run",
            "--rm",
            &flag,
            &root,
            &format!("sluice-{image}:test"),
            &name,
            bin,
            "--help",
        ]);
        assert!(out.contains("Usage"), "{image}: {out}");
    }
}
