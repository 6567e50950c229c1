//! Harness for the integration tests: starts `sluice-broker` and `sluice-sidecar`
//! as real processes on loopback ports, with their own data directories, and hands
//! out gRPC clients. The binaries are the workspace's own (`cargo build --bins`).

use sluice_proto::v1::{self, queues_client::QueuesClient};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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

/// An address nobody listens on: a loopback IP of its own (127.x.y.z) per call, so
/// that tests running in parallel, and the ephemeral ports of their client
/// connections on 127.0.0.1, can never take each other's ports.
pub fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let n = (std::process::id().wrapping_mul(2_654_435_761) ^ nanos)
        .wrapping_add(NEXT.fetch_add(7919, Ordering::Relaxed));
    let ip = std::net::Ipv4Addr::new(
        127,
        10 + (n % 200) as u8,
        (n >> 8) as u8,
        1 + ((n >> 16) % 250) as u8,
    );
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
}

/// Polls `f` until it returns Some, or panics after `limit` with `what`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process, killed when dropped; its output goes to a log file.
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .env(
                "RUST_LOG",
                std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("RUST_BACKTRACE")
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Proc {
            child: Some(child),
            log,
        }
    }

    /// How the process ended, once it has (None while it runs).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit (without blocking the test's runtime, whose
    /// client connections must see the server's GOAWAY).
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("process running");
        let status = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                panic!("process did not exit within 30s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("process running").id()
    }

    /// Resident memory (kB, from /proc) and open file descriptors of the process.
    pub fn resources(&self) -> (u64, usize) {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss_kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count();
        (rss_kb, fds)
    }

    /// Sends a signal by name (`STOP` freezes the process, `CONT` thaws it).
    pub fn signal(&self, name: &str) {
        let c = self.child.as_ref().expect("process running");
        let status = Command::new("kill")
            .args([&format!("-{name}"), &c.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- {} ----\n{}", self.log.display(), self.log_text());
        }
    }
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
            proc: Proc {
                child: None,
                log: PathBuf::new(),
            },
            addr,
            metrics: free_addr(),
            data_dir,
            config,
            logs: dir.join(format!("broker-{ordinal}")),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            ordinal,
            starts: 0,
        }
    }

    /// Starts the process again on the same data directory and ports, and waits
    /// until every queue is recovered (or the process has ended).
    pub async fn restart(&mut self) {
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
        let mut cmd = Command::new(bin("sluice-broker"));
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
        self.proc = Proc::spawn(&mut cmd, log);
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

    /// Like [`start`](Self::start), with more command-line arguments.
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
        let proc = Proc::spawn(&mut cmd, dir.join(format!("sidecar-{}.log", addr.port())));
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
        let proc = Proc::spawn(&mut cmd, dir.join(format!("dev-{}.log", addr.port())));
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
    eventually(
        Duration::from_secs(30),
        &format!("a server on {addr}"),
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

/// A plain HTTP GET on loopback: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (code, body)
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
