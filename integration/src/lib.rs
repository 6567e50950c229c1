//! Harness for the integration tests: starts `sluice-broker` and `sluice-sidecar`
//! as real processes on loopback ports, with their own data directories, and hands
//! out gRPC clients. The binaries are the workspace's own (`cargo build --bins`).

pub mod replicated;

use sluice_proto::v1::{self, queues_client::QueuesClient};
use sluice_testkit::ChildGuard;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// A binary of this workspace, next to the test executable's target directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

pub use sluice_testkit::http::get as http_get;
pub use sluice_testkit::http::post as http_post;
pub use sluice_testkit::{eventually_within, free_addr};

/// A broker or sidecar process, killed when dropped; its output goes to a log file.
pub type Proc = ChildGuard;

/// Starts a broker or sidecar with its output in `log`, logging at `SLUICE_TEST_LOG`
/// (default info).
fn spawn(cmd: &mut Command, log: PathBuf) -> Proc {
    cmd.env(
        "RUST_LOG",
        std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "info".into()),
    )
    .env_remove("RUST_BACKTRACE");
    let name = cmd.get_program().to_string_lossy().into_owned();
    ChildGuard::spawn(&name, cmd, log).unwrap_or_else(|e| panic!("{e}"))
}

/// The sidecar route (`--routes`) of `queue` to every one of `addrs`.
/// A test's directory (process logs, data directories), kept after the test when
/// `SLUICE_KEEP_TEST_DIRS` is set: what a failure that does not reproduce at will
/// needs looked at.
pub fn test_dir() -> tempfile::TempDir {
    let mut dir = tempfile::tempdir().unwrap();
    if std::env::var_os("SLUICE_KEEP_TEST_DIRS").is_some() {
        dir.disable_cleanup(true);
        eprintln!("test directory kept: {}", dir.path().display());
    }
    dir
}

pub fn route(queue: &str, addrs: impl IntoIterator<Item = SocketAddr>) -> String {
    let addrs: Vec<String> = addrs.into_iter().map(|a| a.to_string()).collect();
    format!("{queue}={}", addrs.join(","))
}

/// A broker process with its settings and data directory.
pub struct Broker {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub data_dir: PathBuf,
    config: PathBuf,
    /// Prefix of the process log files (one per start).
    logs: PathBuf,
    extra_args: Vec<String>,
    ordinal: u32,
    starts: u32,
    /// The network namespace the process runs in (see `sluice_testkit::netns`).
    netns: Option<String>,
}

impl Broker {
    /// Starts a broker on `dir` with the given `[[queue]]` TOML (empty: auto-create).
    pub async fn start(dir: &Path, config_toml: &str, ordinal: u32) -> Broker {
        let data_dir = dir.join(format!("data-{ordinal}"));
        Broker::start_with(dir, config_toml, ordinal, data_dir, &[]).await
    }

    /// Like [`start`](Self::start), with the data in `data_dir` (settings and process
    /// logs stay in `dir`) and more command-line arguments.
    pub async fn start_with(
        dir: &Path,
        config_toml: &str,
        ordinal: u32,
        data_dir: PathBuf,
        extra_args: &[&str],
    ) -> Broker {
        Broker::start_at(dir, config_toml, ordinal, data_dir, free_addr(), extra_args).await
    }

    /// Like [`start_with`](Self::start_with), serving on `addr` (a test that issues
    /// the broker's certificate needs its address first).
    pub async fn start_at(
        dir: &Path,
        config_toml: &str,
        ordinal: u32,
        data_dir: PathBuf,
        addr: SocketAddr,
        extra_args: &[&str],
    ) -> Broker {
        let mut b = Broker::unstarted(dir, config_toml, ordinal, data_dir, addr, extra_args);
        b.restart().await;
        b
    }

    /// Like [`start_at`](Self::start_at), inside network namespace `netns` (where
    /// `addr` must be one of its addresses).
    pub async fn start_in_netns(
        dir: &Path,
        config_toml: &str,
        ordinal: u32,
        addr: SocketAddr,
        netns: &str,
    ) -> Broker {
        let data_dir = dir.join(format!("data-{ordinal}"));
        let mut b = Broker::unstarted(dir, config_toml, ordinal, data_dir, addr, &[]);
        b.metrics = SocketAddr::new(addr.ip(), addr.port() + 1);
        b.netns = Some(netns.to_string());
        b.restart().await;
        b
    }

    /// Starts a broker like [`start`](Self::start), returning as soon as it accepts
    /// connections: its queues may still be replaying their logs.
    pub async fn start_recovering(dir: &Path, config_toml: &str, ordinal: u32) -> Broker {
        let data_dir = dir.join(format!("data-{ordinal}"));
        let mut b = Broker::unstarted(dir, config_toml, ordinal, data_dir, free_addr(), &[]);
        b.spawn().await;
        b
    }

    fn unstarted(
        dir: &Path,
        config_toml: &str,
        ordinal: u32,
        data_dir: PathBuf,
        addr: SocketAddr,
        extra_args: &[&str],
    ) -> Broker {
        let config = dir.join(format!("broker-{ordinal}.toml"));
        std::fs::write(&config, config_toml).unwrap();
        Broker {
            proc: Proc::default(),
            addr,
            metrics: free_addr(),
            data_dir,
            config,
            logs: dir.join(format!("broker-{ordinal}")),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            ordinal,
            starts: 0,
            netns: None,
        }
    }

    /// Writes new settings, read at the next (re)start: what a ConfigMap change and
    /// the rollout it starts are to a broker pod.
    pub fn reconfigure(&self, config_toml: &str) {
        std::fs::write(&self.config, config_toml).unwrap();
    }

    /// Starts the process again on the same data directory and ports, and waits
    /// until every queue is recovered (or the process has ended). A broker still
    /// running is stopped first (SIGTERM, as a rollout does): started beside it, the
    /// new process would find its address taken.
    pub async fn restart(&mut self) {
        self.proc.stop(Duration::from_secs(10));
        self.spawn().await;
        let start = Instant::now();
        while self.proc.exit_status().is_none() && !self.ready() {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "broker on {} not ready within 120 s",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the broker's `/readyz` says every queue is recovered.
    pub fn ready(&self) -> bool {
        TcpStream::connect(self.metrics).is_ok() && http_get(self.metrics, "/readyz").0 == 200
    }

    async fn spawn(&mut self) {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("sluice-broker"));
                c
            }
            None => Command::new(bin("sluice-broker")),
        };
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--metrics-listen")
            .arg(self.metrics.to_string())
            .arg("--ordinal")
            .arg(self.ordinal.to_string())
            .arg("--segment-bytes")
            .arg("65536")
            .args(&self.extra_args);
        if std::fs::read_to_string(&self.config)
            .unwrap()
            .trim()
            .is_empty()
        {
            cmd.arg("--auto-create");
        } else {
            cmd.arg("--config").arg(&self.config);
        }
        self.starts += 1;
        let log = self.logs.with_extension(format!("{}.log", self.starts));
        self.proc = spawn(&mut cmd, log);
        // A broker that fails at start-up is for the test to judge, not a timeout.
        let start = Instant::now();
        while self.proc.exit_status().is_none() && TcpStream::connect(self.addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no broker on {} within 30 s",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn client(&self) -> QueuesClient<Channel> {
        client(self.addr).await
    }
}

/// A sidecar process routing to brokers.
pub struct Sidecar {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
}

impl Sidecar {
    pub async fn start(dir: &Path, routes: &str) -> Sidecar {
        Sidecar::start_with(dir, routes, &[]).await
    }

    /// Like [`start`](Self::start), with more command-line arguments. Its readiness
    /// follows its brokers (`--readiness brokers`), which the tests wait on, unless
    /// `extra_args` name a `--readiness` of their own.
    pub async fn start_with(dir: &Path, routes: &str, extra_args: &[&str]) -> Sidecar {
        let addr = free_addr();
        let metrics = free_addr();
        let mut cmd = Command::new(bin("sluice-sidecar"));
        cmd.arg("--listen")
            .arg(addr.to_string())
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .args(extra_args)
            .env("SLUICE_ROUTES", routes);
        if !extra_args.contains(&"--readiness") {
            cmd.args(["--readiness", "brokers"]);
        }
        let proc = spawn(&mut cmd, dir.join(format!("sidecar-{}.log", addr.port())));
        wait_serving(addr).await;
        Sidecar {
            proc,
            addr,
            metrics,
        }
    }

    pub async fn client(&self) -> QueuesClient<Channel> {
        client(self.addr).await
    }
}

/// `sluice dev`: the broker and the API in one process, queues created on first use.
pub struct Dev {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
}

impl Dev {
    pub async fn start(dir: &Path) -> Dev {
        let addr = free_addr();
        let metrics = free_addr();
        let mut cmd = Command::new(bin("sluice"));
        cmd.arg("dev")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .arg("--data-dir")
            .arg(dir.join("dev-data"));
        let proc = spawn(&mut cmd, dir.join(format!("dev-{}.log", addr.port())));
        wait_serving(addr).await;
        Dev {
            proc,
            addr,
            metrics,
        }
    }

    pub async fn client(&self) -> QueuesClient<Channel> {
        client(self.addr).await
    }
}

async fn wait_serving(addr: SocketAddr) {
    eventually_within(
        &format!("a server on {addr}"),
        Duration::from_secs(30),
        || async move { TcpStream::connect(addr).ok().map(|_| ()) },
    )
    .await;
}

pub async fn client(addr: SocketAddr) -> QueuesClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    QueuesClient::new(channel)
        .max_decoding_message_size(80 << 20)
        .max_encoding_message_size(80 << 20)
}

pub fn msg(body: &str) -> v1::NewMessage {
    v1::NewMessage {
        body: bytes::Bytes::copy_from_slice(body.as_bytes()),
        ..Default::default()
    }
}

pub async fn enqueue(
    c: &mut QueuesClient<Channel>,
    queue: &str,
    m: v1::NewMessage,
) -> Result<v1::EnqueueResponse, tonic::Status> {
    c.enqueue(v1::EnqueueRequest {
        queue: queue.into(),
        message: Some(m),
        partition: None,
    })
    .await
    .map(|r| r.into_inner())
}

pub async fn dequeue(
    c: &mut QueuesClient<Channel>,
    queue: &str,
    max: u32,
    wait_ms: u64,
) -> Vec<v1::Message> {
    c.dequeue(v1::DequeueRequest {
        queue: queue.into(),
        max_messages: max,
        wait_ms,
        visibility_timeout_ms: 0,
    })
    .await
    .unwrap()
    .into_inner()
    .messages
}

pub async fn ack(
    c: &mut QueuesClient<Channel>,
    queue: &str,
    receipts: Vec<String>,
) -> Vec<v1::ReceiptResult> {
    c.ack(v1::AckRequest {
        queue: queue.into(),
        receipts,
    })
    .await
    .unwrap()
    .into_inner()
    .results
}

pub async fn stats(c: &mut QueuesClient<Channel>, queue: &str) -> v1::StatsResponse {
    c.stats(v1::StatsRequest {
        queue: queue.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Drains a queue: dequeues and acks until it stays empty for `quiet_ms`.
pub async fn drain(c: &mut QueuesClient<Channel>, queue: &str, quiet_ms: u64) -> Vec<v1::Message> {
    let mut all = Vec::new();
    loop {
        let got = dequeue(c, queue, 500, quiet_ms).await;
        if got.is_empty() {
            return all;
        }
        let receipts = got.iter().map(|m| m.receipt.clone()).collect();
        for r in ack(c, queue, receipts).await {
            assert_eq!(r.code, 0, "ack failed: {}", r.error);
        }
        all.extend(got);
    }
}

pub fn body_str(m: &v1::Message) -> String {
    String::from_utf8_lossy(&m.body).into_owned()
}

/// Opens a Subscribe on `queue` with credit 1 and waits (up to 30 s) for its first
/// message. The stream stays open while the returned sender lives.
pub async fn first_subscribed(
    c: &mut QueuesClient<Channel>,
    queue: &str,
) -> (v1::Message, tokio::sync::mpsc::Sender<v1::SubscribeRequest>) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(v1::SubscribeRequest {
        request: Some(v1::subscribe_request::Request::Start(v1::SubscribeStart {
            queue: queue.into(),
            initial_credit: 1,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = c
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    loop {
        let resp = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("a delivery")
            .unwrap()
            .expect("the stream stays open");
        if let Some(v1::subscribe_response::Response::Message(m)) = resp.response {
            return (m, tx);
        }
    }
}
