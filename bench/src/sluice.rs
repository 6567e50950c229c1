//! Sluice as a benchmarked system: a real `sluice-broker` child process, reached
//! either directly or through a real `sluice-sidecar` child process in front of it.

use crate::proc::{ChildGuard, TempDir, check_alive};
use crate::system::{Batch, Consumer, ConsumerMode, Producer, QueueSpec, System};
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use sluice_proto::v1;
use sluice_proto::v1::queues_client::QueuesClient;
use sluice_testkit::ports::free_addrs;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const MAX_GRPC_MESSAGE: usize = 64 * 1024 * 1024;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

pub const BROKER_BIN: &str = "sluice-broker";
pub const SIDECAR_BIN: &str = "sluice-sidecar";

/// Where the server binaries are: next to this executable (the same target dir,
/// debug or release) unless overridden.
pub fn find_binary(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if path.is_file() {
        return Ok(path);
    }
    bail!(
        "{name} not found at {}: the bench starts the real servers and looks for them next to \
         its own executable. Build them first with `cargo build --release --bins` (or \
         `cargo build --bins` for a debug run), or point --bin-dir at a directory holding \
         {BROKER_BIN} and {SIDECAR_BIN}",
        path.display()
    )
}

pub async fn connect(addr: SocketAddr) -> Result<QueuesClient<Channel>> {
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    Ok(QueuesClient::new(channel)
        .max_decoding_message_size(MAX_GRPC_MESSAGE)
        .max_encoding_message_size(MAX_GRPC_MESSAGE))
}

/// Waits until `addr` answers `Describe` for every queue (the broker has opened
/// them; the sidecar has found their broker).
async fn wait_ready(addr: SocketAddr, queues: &[QueueSpec], child: &mut ChildGuard) -> Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut last_err = String::new();
    loop {
        check_alive(child)?;
        let mut ok = true;
        match connect(addr).await {
            Ok(mut c) => {
                for q in queues {
                    let req = v1::DescribeRequest {
                        queue: q.name.clone(),
                    };
                    if let Err(e) = c.describe(req).await {
                        last_err = format!("describe {}: {e}", q.name);
                        ok = false;
                        break;
                    }
                }
            }
            Err(e) => {
                last_err = format!("{e:#}");
                ok = false;
            }
        }
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} at {addr} not ready after {STARTUP_TIMEOUT:?} ({last_err}); last lines of {}:\n{}",
                child.name,
                child.log.display(),
                child.tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the broker's `/readyz` at `http` answers 200 (every queue recovered).
async fn wait_http_ready(http: SocketAddr, child: &mut ChildGuard) -> Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        check_alive(child)?;
        let ready = tokio::task::spawn_blocking(move || {
            std::net::TcpStream::connect(http).is_ok()
                && sluice_testkit::http::get(http, "/readyz").0 == 200
        })
        .await?;
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} not ready on {http}/readyz after {STARTUP_TIMEOUT:?}; last lines of {}:\n{}",
                child.name,
                child.log.display(),
                child.tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every partition of every queue has a leader among the brokers at
/// `addrs` (each describes the partitions it leads), so a measurement never starts
/// inside the first elections.
async fn wait_led(addrs: &[SocketAddr], queues: &[QueueSpec], partitions: u32) -> Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    for q in queues {
        loop {
            let mut led = std::collections::BTreeSet::new();
            for addr in addrs {
                let req = v1::DescribeRequest {
                    queue: q.name.clone(),
                };
                if let Ok(mut c) = connect(*addr).await
                    && let Ok(d) = c.describe(req).await
                {
                    led.extend(d.into_inner().owned_partitions);
                }
            }
            if led.len() as u32 >= partitions {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: partitions {:?} of {partitions} led after {STARTUP_TIMEOUT:?}",
                    q.name,
                    led
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Sluice, reached straight at the broker or through the sidecar.
pub struct Sluice {
    name: String,
    via_sidecar: bool,
    /// Brokers, and copies of each partition (1, or 3: a Raft group per partition).
    copies: u32,
    /// One copy, but each partition a Raft group of one: a Queue as the operator
    /// makes it (so its copies can move).
    raft: bool,
    /// The queues' `fsync` setting: `always` unless [`Sluice::fsync_interval`].
    fsync: &'static str,
    /// Mutual TLS between sidecar and brokers ([`Sluice::mutual_tls`]), as deployed.
    tls: bool,
    bin_dir: PathBuf,
    partitions: u32,
    subscribe_credit: u32,
    dequeue_batch: u32,
    // Field order matters for drop: processes stop before their data dir goes.
    brokers: Vec<Option<ChildGuard>>,
    sidecar: Option<ChildGuard>,
    dir: Option<TempDir>,
    /// Each broker's gRPC and HTTP address.
    broker_addrs: Vec<(SocketAddr, SocketAddr)>,
    endpoint: Option<SocketAddr>,
}

impl Sluice {
    /// `copies` brokers holding that many copies of each partition; replicated (3),
    /// only through the sidecar, which finds each partition's leader. `raft`: one
    /// copy in a Raft group of one.
    pub fn new(
        via_sidecar: bool,
        copies: u32,
        raft: bool,
        bin_dir: PathBuf,
        partitions: u32,
        subscribe_credit: u32,
        dequeue_batch: u32,
    ) -> Self {
        let name = match (via_sidecar, copies, raft) {
            (false, _, _) => "sluice-direct".to_string(),
            (true, 1, false) => "sluice-sidecar".to_string(),
            (true, 1, true) => "sluice-sidecar-raft".to_string(),
            (true, n, _) => format!("sluice-sidecar-r{n}"),
        };
        Sluice {
            name,
            via_sidecar: via_sidecar || copies > 1,
            copies,
            raft: raft && copies == 1,
            fsync: "always",
            tls: false,
            bin_dir,
            partitions,
            subscribe_credit,
            dequeue_batch,
            brokers: Vec::new(),
            sidecar: None,
            dir: None,
            broker_addrs: Vec::new(),
            endpoint: None,
        }
    }

    /// The same with `fsync = "interval"` (named `…-interval`): answered once written,
    /// synced on an interval, the promise NATS 2.9 makes.
    pub fn fsync_interval(mut self) -> Self {
        self.fsync = "interval";
        self.name.push_str("-interval");
        self
    }

    /// The same with mutual TLS between sidecar and brokers (named `…-tls`): the
    /// deployed path, with certificates issued as the operator issues them.
    pub fn mutual_tls(mut self) -> Self {
        self.tls = true;
        self.name.push_str("-tls");
        self
    }

    /// Issues the CA, the brokers' certificate (for the loopback address they serve
    /// on, also presented to each other) and the sidecar's client certificate into
    /// `dir`.
    fn issue_certificates(dir: &std::path::Path) -> Result<()> {
        use sluice_operator::tls::{Ca, Usage};
        let year = std::time::Duration::from_secs(365 * 86_400);
        let ca = Ca::generate("sluice-bench-ca", year)?;
        std::fs::write(dir.join("ca.crt"), &ca.cert_pem)?;
        for (who, usage, sans) in [
            ("broker", Usage::Peer, vec!["127.0.0.1".to_string()]),
            ("sidecar", Usage::Client, vec![]),
        ] {
            let leaf = ca.issue(&format!("sluice-bench-{who}"), &sans, usage, year)?;
            std::fs::write(dir.join(format!("{who}.crt")), &leaf.cert_pem)?;
            std::fs::write(dir.join(format!("{who}.key")), &leaf.key_pem)?;
        }
        Ok(())
    }

    /// The TLS flags of `who` (broker or sidecar), if TLS is on.
    fn tls_args(&self, dir: &std::path::Path, who: &str) -> Vec<std::ffi::OsString> {
        if !self.tls {
            return Vec::new();
        }
        [
            ("--tls-cert", format!("{who}.crt")),
            ("--tls-key", format!("{who}.key")),
            ("--tls-ca", "ca.crt".to_string()),
        ]
        .into_iter()
        .flat_map(|(flag, file)| [flag.into(), dir.join(file).into_os_string()])
        .collect()
    }

    fn endpoint(&self) -> Result<SocketAddr> {
        self.endpoint
            .context("setup() has not run: no server to connect to")
    }

    fn spawn_broker(&self, ordinal: usize) -> Result<ChildGuard> {
        let broker_bin = find_binary(&self.bin_dir, BROKER_BIN)?;
        let dir = &self.dir.as_ref().context("no data directory")?.0;
        let (grpc, http) = *self
            .broker_addrs
            .get(ordinal)
            .context("no broker address")?;
        let mut cmd = Command::new(&broker_bin);
        cmd.arg("--config")
            .arg(dir.join("broker.toml"))
            .arg("--data-dir")
            .arg(dir.join(format!("data-{ordinal}")))
            .arg("--listen")
            .arg(grpc.to_string())
            .arg("--metrics-listen")
            .arg(http.to_string())
            .arg("--ordinal")
            .arg(ordinal.to_string())
            .args(self.tls_args(dir, "broker"))
            .env("RUST_LOG", "warn");
        Ok(ChildGuard::spawn_group(
            &format!("{BROKER_BIN}-{ordinal}"),
            &mut cmd,
            dir.join(format!("broker-{ordinal}.log")),
        )?)
    }
}

#[tonic::async_trait]
impl System for Sluice {
    fn name(&self) -> &str {
        &self.name
    }

    fn describe(&self) -> String {
        let hops = if self.via_sidecar {
            "client → sluice-sidecar → sluice-broker"
        } else {
            "client → sluice-broker"
        };
        let brokers = match self.copies {
            1 if self.raft => "one broker, each partition a Raft group of one".to_string(),
            1 => "one broker".to_string(),
            n => format!("{n} brokers, {n} copies of each partition (Raft, majority ack)"),
        };
        let tls = if self.tls {
            "; mutual TLS between sidecar and broker (rustls, ECDSA P-256)"
        } else {
            ""
        };
        format!(
            "{hops}; {brokers}, fsync = \"{}\", {} partitions per queue{tls}",
            self.fsync, self.partitions
        )
    }

    async fn setup(&mut self, queues: &[QueueSpec]) -> Result<()> {
        find_binary(&self.bin_dir, BROKER_BIN)?;
        let sidecar_bin = find_binary(&self.bin_dir, SIDECAR_BIN)?;
        let dir = TempDir::new(&self.name)?;
        let n = self.copies as usize;
        let ports = free_addrs(Ipv4Addr::LOCALHOST.into(), 2 * n + 2)?;
        self.broker_addrs = (0..n).map(|i| (ports[2 * i], ports[2 * i + 1])).collect();
        let (sidecar_grpc, sidecar_http) = (ports[2 * n], ports[2 * n + 1]);
        let peers = self
            .broker_addrs
            .iter()
            .map(|(grpc, _)| format!("\"{grpc}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut toml = String::new();
        for q in queues {
            writeln!(
                toml,
                "[[queue]]\nname = \"{}\"\npartitions = {}\nreplicas = {n}\nfsync = \"{}\"\nvisibility_timeout = \"60s\"",
                q.name, self.partitions, self.fsync
            )?;
            if n > 1 {
                writeln!(toml, "replication = {n}\npeers = [{peers}]")?;
            } else if self.raft {
                writeln!(toml, "raft = true\npeers = [{peers}]")?;
            }
            writeln!(toml)?;
        }
        std::fs::write(dir.0.join("broker.toml"), toml)?;
        if self.tls {
            Self::issue_certificates(&dir.0)?;
        }
        self.dir = Some(dir);
        for i in 0..n {
            let mut broker = self.spawn_broker(i)?;
            if self.tls {
                // Its gRPC port wants our certificate: its HTTP readiness says the same.
                wait_http_ready(self.broker_addrs[i].1, &mut broker).await?;
            } else {
                wait_ready(self.broker_addrs[i].0, queues, &mut broker).await?;
            }
            self.brokers.push(Some(broker));
        }
        if n > 1 || self.raft {
            let grpc: Vec<SocketAddr> = self.broker_addrs.iter().map(|(g, _)| *g).collect();
            wait_led(&grpc, queues, self.partitions).await?;
        }
        let mut endpoint = self.broker_addrs[0].0;
        if self.via_sidecar {
            let dir = &self.dir.as_ref().context("no data directory")?.0;
            let mut cmd = Command::new(&sidecar_bin);
            cmd.arg("--listen")
                .arg(sidecar_grpc.to_string())
                .arg("--metrics-listen")
                .arg(sidecar_http.to_string())
                .args(self.tls_args(dir, "sidecar"))
                .env("RUST_LOG", "warn");
            let addrs = self
                .broker_addrs
                .iter()
                .map(|(grpc, _)| grpc.to_string())
                .collect::<Vec<_>>()
                .join(",");
            for q in queues {
                cmd.arg("--route").arg(format!("{}={addrs}", q.name));
            }
            let mut sidecar =
                ChildGuard::spawn_group(SIDECAR_BIN, &mut cmd, dir.join("sidecar.log"))?;
            wait_ready(sidecar_grpc, queues, &mut sidecar).await?;
            self.sidecar = Some(sidecar);
            endpoint = sidecar_grpc;
        }
        self.endpoint = Some(endpoint);
        Ok(())
    }

    fn processes(&self) -> Vec<(String, u32)> {
        self.brokers
            .iter()
            .chain([&self.sidecar])
            .flatten()
            .map(|c| (c.name.clone(), c.pid()))
            .collect()
    }

    /// One broker: killed and started again on its data; replicated, broker 0 is
    /// killed and the time runs until the sidecar serves a message again (the
    /// failover, as an app sees it), while it comes back.
    async fn restart(&mut self, queue: &str) -> Result<Duration> {
        if let Some(mut old) = self.brokers.first_mut().and_then(Option::take) {
            old.kill();
        }
        let started = Instant::now();
        let mut broker = self.spawn_broker(0)?;
        // Served = a message dequeued and acked: straight at the broker, or through
        // the sidecar when the partitions have other copies or the broker wants the
        // sidecar's certificate.
        let at = if self.copies > 1 || self.tls {
            self.endpoint()?
        } else {
            self.broker_addrs[0].0
        };
        let deadline = started + Duration::from_secs(600);
        loop {
            check_alive(&mut broker)?;
            if let Ok(mut c) = connect(at).await {
                let got = c
                    .dequeue(v1::DequeueRequest {
                        queue: queue.to_string(),
                        max_messages: 1,
                        wait_ms: 0,
                        visibility_timeout_ms: 0,
                    })
                    .await;
                if let Ok(r) = got
                    && let Some(m) = r.into_inner().messages.into_iter().next()
                {
                    c.ack(v1::AckRequest {
                        queue: queue.to_string(),
                        receipts: vec![m.receipt],
                    })
                    .await
                    .context("ack after restart")?;
                    let took = started.elapsed();
                    self.brokers[0] = Some(broker);
                    return Ok(took);
                }
            }
            if Instant::now() > deadline {
                bail!("{queue} was not served within 10 minutes of a broker restart");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn producer(&self, queue: &str) -> Result<Arc<dyn Producer>> {
        Ok(Arc::new(GrpcProducer {
            client: connect(self.endpoint()?).await?,
            queue: queue.to_string(),
        }))
    }

    async fn consumer(&self, queue: &str, mode: ConsumerMode) -> Result<Box<dyn Consumer>> {
        let client = connect(self.endpoint()?).await?;
        Ok(match mode {
            ConsumerMode::Subscribe => {
                Box::new(SubscribeConsumer::start(client, queue, self.subscribe_credit).await?)
            }
            ConsumerMode::Dequeue => Box::new(DequeueConsumer {
                client,
                queue: queue.to_string(),
                batch: self.dequeue_batch,
            }),
        })
    }

    async fn teardown(&mut self) -> Result<()> {
        // Sidecar first, then the broker, then the data.
        self.sidecar = None;
        self.brokers.clear();
        self.dir = None;
        self.endpoint = None;
        Ok(())
    }
}

/// `Enqueue`, one message per call (the sidecar may batch calls of many clients).
struct GrpcProducer {
    client: QueuesClient<Channel>,
    queue: String,
}

#[tonic::async_trait]
impl Producer for GrpcProducer {
    async fn send(&self, body: Bytes) -> Result<()> {
        let req = v1::EnqueueRequest {
            queue: self.queue.clone(),
            message: Some(v1::NewMessage {
                body,
                ..Default::default()
            }),
            partition: None,
        };
        self.client.clone().enqueue(req).await.context("enqueue")?;
        Ok(())
    }

    async fn send_many(&self, bodies: Vec<Bytes>) -> Result<()> {
        let req = v1::EnqueueBatchRequest {
            queue: self.queue.clone(),
            messages: bodies
                .into_iter()
                .map(|body| v1::NewMessage {
                    body,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        self.client
            .clone()
            .enqueue_batch(req)
            .await
            .context("enqueue batch")?;
        Ok(())
    }
}

fn count_acks(results: &[v1::ReceiptResult], batch: &mut Batch) {
    let ok = results
        .iter()
        .filter(|r| r.code == tonic::Code::Ok as i32)
        .count() as u64;
    batch.acked += ok;
    batch.ack_failed += results.len() as u64 - ok;
}

/// `Subscribe`: credit-based push; what one call delivered is acked inline at the
/// start of the next call, together with a credit grant of the same size.
struct SubscribeConsumer {
    queue: String,
    credit: usize,
    tx: mpsc::Sender<v1::SubscribeRequest>,
    inbound: Streaming<v1::SubscribeResponse>,
    pending: Vec<String>,
}

impl SubscribeConsumer {
    async fn start(mut client: QueuesClient<Channel>, queue: &str, credit: u32) -> Result<Self> {
        use v1::subscribe_request::Request;
        let (tx, rx) = mpsc::channel(64);
        tx.send(v1::SubscribeRequest {
            request: Some(Request::Start(v1::SubscribeStart {
                queue: queue.to_string(),
                visibility_timeout_ms: 0,
                initial_credit: credit,
            })),
        })
        .await?;
        let inbound = client
            .subscribe(ReceiverStream::new(rx))
            .await
            .context("subscribe")?
            .into_inner();
        Ok(SubscribeConsumer {
            queue: queue.to_string(),
            credit: credit as usize,
            tx,
            inbound,
            pending: Vec::new(),
        })
    }

    fn handle(&mut self, response: Option<v1::SubscribeResponse>, batch: &mut Batch) -> Result<()> {
        use v1::subscribe_response::Response;
        match response.and_then(|r| r.response) {
            Some(Response::Message(m)) => {
                batch.delivered.push((Instant::now(), m.body));
                self.pending.push(m.receipt);
            }
            Some(Response::Ack(a)) => count_acks(&a.results, batch),
            Some(Response::Nack(_)) => {}
            None => bail!("the server ended the subscription"),
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Consumer for SubscribeConsumer {
    async fn next(&mut self, wait: Duration) -> Result<Batch> {
        use v1::subscribe_request::Request;
        if !self.pending.is_empty() {
            let receipts = std::mem::take(&mut self.pending);
            let n = receipts.len() as u32;
            let ack = Request::Ack(v1::AckRequest {
                queue: self.queue.clone(),
                receipts,
            });
            for request in [ack, Request::Credit(n)] {
                self.tx
                    .send(v1::SubscribeRequest {
                        request: Some(request),
                    })
                    .await
                    .context("subscription request stream closed")?;
            }
        }
        let mut batch = Batch::default();
        let first = match tokio::time::timeout(wait, self.inbound.message()).await {
            Err(_) => return Ok(batch),
            Ok(r) => r.context("subscription")?,
        };
        self.handle(first, &mut batch)?;
        // Take whatever else has already arrived, without waiting.
        while batch.delivered.len() < self.credit {
            match tokio::time::timeout(Duration::ZERO, self.inbound.message()).await {
                Err(_) => break,
                Ok(r) => {
                    let r = r.context("subscription")?;
                    self.handle(r, &mut batch)?;
                }
            }
        }
        Ok(batch)
    }
}

/// `Dequeue` a batch (long poll), then `Ack` it in one call.
struct DequeueConsumer {
    client: QueuesClient<Channel>,
    queue: String,
    batch: u32,
}

#[tonic::async_trait]
impl Consumer for DequeueConsumer {
    async fn next(&mut self, wait: Duration) -> Result<Batch> {
        let messages = self
            .client
            .dequeue(v1::DequeueRequest {
                queue: self.queue.clone(),
                max_messages: self.batch,
                wait_ms: wait.as_millis() as u64,
                visibility_timeout_ms: 0,
            })
            .await
            .context("dequeue")?
            .into_inner()
            .messages;
        let at = Instant::now();
        let mut batch = Batch::default();
        if messages.is_empty() {
            return Ok(batch);
        }
        let mut receipts = Vec::with_capacity(messages.len());
        for m in messages {
            batch.delivered.push((at, m.body));
            receipts.push(m.receipt);
        }
        let results = self
            .client
            .ack(v1::AckRequest {
                queue: self.queue.clone(),
                receipts,
            })
            .await
            .context("ack")?
            .into_inner()
            .results;
        count_acks(&results, &mut batch);
        Ok(batch)
    }
}
