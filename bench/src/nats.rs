//! NATS JetStream as a benchmark peer: Debian's `nats-server` started on loopback with
//! its own store directory and port, one work-queue stream with file storage per
//! queue, one durable pull consumer shared by the consumers, driven by async-nats.

use crate::proc::{ChildGuard, TempDir, check_alive, which};
use crate::system::{Batch, Consumer, ConsumerMode, Producer, QueueSpec, System};
use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, consumer::PullConsumer, consumer::pull, stream};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use sluice_testkit::ports::free_addrs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const BIN: &str = "nats-server";
/// How the server is started: bench/peers/nats.sh (usable by hand too).
const SCRIPT: &str = include_str!("../peers/nats.sh");
const CONSUMER: &str = "workers";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

pub fn find() -> Result<PathBuf> {
    which(BIN, &["/usr/sbin", "/usr/local/sbin"]).with_context(|| {
        format!(
            "{BIN} not found: install the peers with bench/peers/install.sh (Debian's nats-server)"
        )
    })
}

fn subject(queue: &str) -> String {
    format!("bench.{queue}")
}

pub struct Nats {
    /// Servers, and replicas of each stream (1, or 3: a cluster).
    replicas: usize,
    credit: u32,
    dequeue_batch: u32,
    version: String,
    servers: Vec<Option<ChildGuard>>,
    dir: Option<TempDir>,
    /// Each server's client and cluster address.
    addrs: Vec<(SocketAddr, SocketAddr)>,
}

impl Nats {
    pub fn new(replicas: usize, credit: u32, dequeue_batch: u32) -> Result<Self> {
        let bin = find()?;
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Ok(Nats {
            replicas,
            credit,
            dequeue_batch,
            version,
            servers: Vec::new(),
            dir: None,
            addrs: Vec::new(),
        })
    }

    fn spawn(&self, i: usize) -> Result<ChildGuard> {
        let dir = &self.dir.as_ref().context("no data directory")?.0;
        let (client, cluster) = *self.addrs.get(i).context("no address")?;
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(SCRIPT)
            .arg("nats.sh")
            .arg(dir.join(format!("store-{i}")))
            .arg(client.port().to_string());
        if self.replicas > 1 {
            let routes = self
                .addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, c))| format!("nats://{c}"))
                .collect::<Vec<_>>()
                .join(",");
            cmd.arg(format!("bench-{i}"))
                .arg(cluster.port().to_string())
                .arg(routes);
        }
        Ok(ChildGuard::spawn_group(
            &format!("{BIN}-{i}"),
            &mut cmd,
            dir.join(format!("nats-server-{i}.log")),
        )?)
    }

    /// A client of the cluster: it knows every server and moves to another when
    /// its server goes.
    async fn connect(&self) -> Result<jetstream::Context> {
        let servers: Vec<async_nats::ServerAddr> = self
            .addrs
            .iter()
            .map(|(client, _)| format!("nats://{client}").parse())
            .collect::<Result<_, _>>()?;
        anyhow::ensure!(!servers.is_empty(), "setup() has not run");
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(servers)
            .await
            .context("connecting to nats-server")?;
        Ok(jetstream::new(client))
    }

    async fn wait_up(&self, server: &mut ChildGuard) -> Result<jetstream::Context> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            check_alive(server)?;
            match self.connect().await {
                Ok(js) => return Ok(js),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("nats-server not up after {STARTUP_TIMEOUT:?}")));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

#[tonic::async_trait]
impl System for Nats {
    fn name(&self) -> &str {
        if self.replicas > 1 {
            "nats-jetstream-r3"
        } else {
            "nats-jetstream"
        }
    }

    fn describe(&self) -> String {
        format!(
            "Debian's nats-server {} (`-js`{}), one work-queue stream per queue (file storage, {} replica(s)), one durable pull consumer (explicit acks, max {} pending), publish waits for the stream's PubAck; this version syncs its files on an interval, not per write (see the notes above)",
            self.version.trim_start_matches("nats-server: "),
            if self.replicas > 1 {
                ", a cluster of 3 servers"
            } else {
                ""
            },
            self.replicas,
            MAX_ACK_PENDING
        )
    }

    async fn setup(&mut self, queues: &[QueueSpec]) -> Result<()> {
        self.dir = Some(TempDir::new(self.name())?);
        let n = self.replicas;
        let ports = free_addrs(Ipv4Addr::LOCALHOST.into(), 2 * n)?;
        self.addrs = (0..n).map(|i| (ports[2 * i], ports[2 * i + 1])).collect();
        for i in 0..n {
            let server = self.spawn(i)?;
            self.servers.push(Some(server));
        }
        let mut first = self.servers[0].take().context("server 0")?;
        let js = self.wait_up(&mut first).await;
        self.servers[0] = Some(first);
        let js = js?;
        for q in queues {
            let config = stream::Config {
                name: q.name.clone(),
                subjects: vec![subject(&q.name)],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: n,
                ..Default::default()
            };
            // A cluster takes streams once it has elected its meta leader.
            let deadline = Instant::now() + STARTUP_TIMEOUT;
            let stream = loop {
                match js.create_stream(config.clone()).await {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => {
                        bail!("creating stream {}: {e}", q.name)
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            stream
                .create_consumer(pull::Config {
                    durable_name: Some(CONSUMER.to_string()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(60),
                    max_ack_pending: MAX_ACK_PENDING,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("creating consumer of {}", q.name))?;
        }
        Ok(())
    }

    fn processes(&self) -> Vec<(String, u32)> {
        self.servers
            .iter()
            .flatten()
            .map(|s| (s.name.clone(), s.pid()))
            .collect()
    }

    async fn restart(&mut self, queue: &str) -> Result<Duration> {
        // Server 0 killed and started again; in a cluster the others serve
        // meanwhile (the client moves to them).
        if let Some(mut old) = self.servers.first_mut().and_then(Option::take) {
            old.kill();
        }
        let started = Instant::now();
        let mut server = self.spawn(0)?;
        let deadline = started + Duration::from_secs(600);
        loop {
            check_alive(&mut server)?;
            if let Ok(js) = self.connect().await
                && let Ok(s) = js.get_stream(queue).await
                && let Ok(c) = s.get_consumer::<pull::Config>(CONSUMER).await
                && let Ok(mut batch) = c.fetch().max_messages(1).messages().await
                && let Some(Ok(m)) = batch.next().await
            {
                m.double_ack()
                    .await
                    .map_err(|e| anyhow::anyhow!("ack after restart: {e}"))?;
                let took = started.elapsed();
                self.servers[0] = Some(server);
                return Ok(took);
            }
            if Instant::now() > deadline {
                bail!("nats-server did not serve {queue} within 10 minutes of a restart");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn producer(&self, queue: &str) -> Result<Arc<dyn Producer>> {
        Ok(Arc::new(NatsProducer {
            js: self.connect().await?,
            subject: subject(queue),
        }))
    }

    async fn consumer(&self, queue: &str, mode: ConsumerMode) -> Result<Box<dyn Consumer>> {
        let js = self.connect().await?;
        let consumer: PullConsumer = js
            .get_stream(queue)
            .await
            .with_context(|| format!("stream {queue}"))?
            .get_consumer(CONSUMER)
            .await
            .map_err(|e| anyhow::anyhow!("consumer of {queue}: {e}"))?;
        Ok(match mode {
            ConsumerMode::Subscribe => {
                let messages = consumer
                    .stream()
                    .max_messages_per_batch(self.credit as usize)
                    .messages()
                    .await
                    .context("pull consumer stream")?;
                Box::new(NatsStreamConsumer {
                    messages,
                    credit: self.credit as usize,
                })
            }
            ConsumerMode::Dequeue => Box::new(NatsFetchConsumer {
                consumer,
                batch: self.dequeue_batch as usize,
            }),
        })
    }

    async fn teardown(&mut self) -> Result<()> {
        self.servers.clear();
        self.dir = None;
        Ok(())
    }
}

/// Enough for 16 consumers with a full batch each.
const MAX_ACK_PENDING: i64 = 65_536;

struct NatsProducer {
    js: jetstream::Context,
    subject: String,
}

#[tonic::async_trait]
impl Producer for NatsProducer {
    async fn send(&self, body: Bytes) -> Result<()> {
        self.js
            .publish(self.subject.clone(), body)
            .await
            .map_err(|e| anyhow::anyhow!("publish: {e}"))?
            .await
            .map_err(|e| anyhow::anyhow!("publish ack: {e}"))?;
        Ok(())
    }

    async fn send_many(&self, bodies: Vec<Bytes>) -> Result<()> {
        let mut acks = Vec::with_capacity(bodies.len());
        for body in bodies {
            acks.push(
                self.js
                    .publish(self.subject.clone(), body)
                    .await
                    .map_err(|e| anyhow::anyhow!("publish: {e}"))?,
            );
        }
        for ack in acks {
            ack.await.map_err(|e| anyhow::anyhow!("publish ack: {e}"))?;
        }
        Ok(())
    }
}

async fn ack_all(messages: Vec<jetstream::Message>, batch: &mut Batch) -> Result<()> {
    let at = Instant::now();
    for m in messages {
        m.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        batch.delivered.push((at, m.message.payload.clone()));
        batch.acked += 1;
    }
    Ok(())
}

/// A continuous pull (`Consumer::stream`), each message acked as it is taken.
struct NatsStreamConsumer {
    messages: pull::Stream,
    credit: usize,
}

#[tonic::async_trait]
impl Consumer for NatsStreamConsumer {
    async fn next(&mut self, wait: Duration) -> Result<Batch> {
        let mut batch = Batch::default();
        let mut got = Vec::new();
        match tokio::time::timeout(wait, self.messages.next()).await {
            Err(_) => return Ok(batch),
            Ok(None) => bail!("the pull stream ended"),
            Ok(Some(m)) => got.push(m.map_err(|e| anyhow::anyhow!("pull: {e}"))?),
        }
        while got.len() < self.credit {
            match self.messages.next().now_or_never() {
                Some(Some(m)) => got.push(m.map_err(|e| anyhow::anyhow!("pull: {e}"))?),
                Some(None) => bail!("the pull stream ended"),
                None => break,
            }
        }
        ack_all(got, &mut batch).await?;
        Ok(batch)
    }
}

/// A batch pull (`Consumer::batch`, waiting up to `wait`), each message acked.
struct NatsFetchConsumer {
    consumer: PullConsumer,
    batch: usize,
}

#[tonic::async_trait]
impl Consumer for NatsFetchConsumer {
    async fn next(&mut self, wait: Duration) -> Result<Batch> {
        let mut batch = Batch::default();
        if wait.is_zero() {
            // Everything delivered so far is acked already.
            return Ok(batch);
        }
        let mut messages = self
            .consumer
            .batch()
            .max_messages(self.batch)
            .expires(wait)
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("pull batch: {e}"))?;
        let mut got = Vec::new();
        while let Some(m) = messages.next().await {
            got.push(m.map_err(|e| anyhow::anyhow!("pull batch: {e}"))?);
        }
        ack_all(got, &mut batch).await?;
        Ok(batch)
    }
}
