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
    credit: u32,
    dequeue_batch: u32,
    version: String,
    server: Option<ChildGuard>,
    dir: Option<TempDir>,
    addr: Option<SocketAddr>,
}

impl Nats {
    pub fn new(credit: u32, dequeue_batch: u32) -> Result<Self> {
        let bin = find()?;
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Ok(Nats {
            credit,
            dequeue_batch,
            version,
            server: None,
            dir: None,
            addr: None,
        })
    }

    fn spawn(&self) -> Result<ChildGuard> {
        let dir = &self.dir.as_ref().context("no data directory")?.0;
        let addr = self.addr.context("no address")?;
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(SCRIPT)
            .arg("nats.sh")
            .arg(dir.join("store"))
            .arg(addr.port().to_string());
        Ok(ChildGuard::spawn_group(
            BIN,
            &mut cmd,
            dir.join("nats-server.log"),
        )?)
    }

    async fn connect(&self) -> Result<jetstream::Context> {
        let addr = self.addr.context("setup() has not run")?;
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(format!("nats://{addr}"))
            .await
            .with_context(|| format!("connecting to nats-server at {addr}"))?;
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
        "nats-jetstream"
    }

    fn describe(&self) -> String {
        format!(
            "Debian's nats-server {} (`-js`), one work-queue stream per queue (file storage, 1 replica), one durable pull consumer (explicit acks, max {} pending), publish waits for the stream's PubAck; this version syncs its files on an interval, not per write (see the notes above)",
            self.version.trim_start_matches("nats-server: "),
            MAX_ACK_PENDING
        )
    }

    async fn setup(&mut self, queues: &[QueueSpec]) -> Result<()> {
        self.dir = Some(TempDir::new("nats")?);
        self.addr = Some(free_addrs(Ipv4Addr::LOCALHOST.into(), 1)?[0]);
        let mut server = self.spawn()?;
        let js = self.wait_up(&mut server).await?;
        self.server = Some(server);
        for q in queues {
            let stream = js
                .create_stream(stream::Config {
                    name: q.name.clone(),
                    subjects: vec![subject(&q.name)],
                    retention: stream::RetentionPolicy::WorkQueue,
                    storage: stream::StorageType::File,
                    num_replicas: 1,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("creating stream {}", q.name))?;
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
        self.server
            .iter()
            .map(|s| (BIN.to_string(), s.pid()))
            .collect()
    }

    async fn restart(&mut self, queue: &str) -> Result<Duration> {
        if let Some(mut old) = self.server.take() {
            old.kill();
        }
        let started = Instant::now();
        let mut server = self.spawn()?;
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
                self.server = Some(server);
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
        self.server = None;
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
