//! RabbitMQ as a benchmark peer: Debian's `rabbitmq-server` started on loopback as a
//! private node (own node name, AMQP/distribution/epmd ports, mnesia and log
//! directories, no plugins), one quorum queue per queue, publisher confirms and
//! manual consumer acks, driven by lapin.

use crate::proc::{ChildGuard, TempDir, check_alive, which};
use crate::system::{Batch, Consumer, ConsumerMode, Producer, QueueSpec, System};
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sluice_testkit::ports::free_addrs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// How the node is started: bench/peers/rabbitmq.sh (usable by hand too).
const SCRIPT: &str = include_str!("../peers/rabbitmq.sh");
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

pub fn find() -> Result<()> {
    let server = PathBuf::from(SERVER);
    match (server.is_file(), which("epmd", &[])) {
        (true, Some(_)) => Ok(()),
        _ => bail!(
            "{SERVER} or epmd not found: install the peers with bench/peers/install.sh (Debian's rabbitmq-server)"
        ),
    }
}

fn queue_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

pub struct RabbitMq {
    prefetch: u16,
    dequeue_batch: u32,
    version: String,
    // Field order matters for drop: the node (with its epmd), then the data.
    server: Option<ChildGuard>,
    dir: Option<TempDir>,
    ports: Option<[SocketAddr; 3]>,
}

impl RabbitMq {
    pub fn new(prefetch: u32, dequeue_batch: u32) -> Result<Self> {
        find()?;
        let version = Command::new("dpkg-query")
            .args(["-W", "-f=${Version}", "rabbitmq-server"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Ok(RabbitMq {
            prefetch: prefetch.min(u16::MAX as u32) as u16,
            dequeue_batch,
            version,
            server: None,
            dir: None,
            ports: None,
        })
    }

    fn amqp_uri(&self) -> Result<String> {
        let [amqp, _, _] = self.ports.context("setup() has not run")?;
        Ok(format!("amqp://guest:guest@{amqp}/%2f"))
    }

    fn spawn(&self) -> Result<ChildGuard> {
        let dir = &self.dir.as_ref().context("no data directory")?.0;
        let [amqp, dist, epmd] = self.ports.context("no ports")?;
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(SCRIPT)
            .arg("rabbitmq.sh")
            .arg(dir)
            .arg(amqp.port().to_string())
            .arg(dist.port().to_string())
            .arg(epmd.port().to_string())
            .arg(format!("sluice-bench-{}@localhost", std::process::id()));
        Ok(ChildGuard::spawn_group(
            "rabbitmq-server",
            &mut cmd,
            dir.join("rabbitmq.log"),
        )?)
    }

    async fn connect(&self) -> Result<Connection> {
        let uri = self.amqp_uri()?;
        Connection::connect(&uri, ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to RabbitMQ at {uri}"))
    }

    async fn wait_up(&self, server: &mut ChildGuard) -> Result<Connection> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            check_alive(server)?;
            match self.connect().await {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!(
                        "RabbitMQ not up after {STARTUP_TIMEOUT:?}; see {}",
                        server.log.display()
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

#[tonic::async_trait]
impl System for RabbitMq {
    fn name(&self) -> &str {
        "rabbitmq"
    }

    fn describe(&self) -> String {
        format!(
            "Debian's rabbitmq-server {}, one quorum queue per queue (1 member; Raft log fsynced before a confirm), publisher confirms (one outstanding per producer), manual acks, prefetch {} (Subscribe) / basic.get (Dequeue)",
            self.version, self.prefetch
        )
    }

    async fn setup(&mut self, queues: &[QueueSpec]) -> Result<()> {
        let dir = TempDir::new("rabbitmq")?;
        let p = free_addrs(Ipv4Addr::LOCALHOST.into(), 3)?;
        self.ports = Some([p[0], p[1], p[2]]);
        self.dir = Some(dir);
        let mut server = self.spawn()?;
        let conn = self.wait_up(&mut server).await?;
        self.server = Some(server);
        let ch = conn.create_channel().await?;
        for q in queues {
            ch.queue_declare(
                q.name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                queue_args(),
            )
            .await
            .with_context(|| format!("declaring quorum queue {}", q.name))?;
        }
        let _ = conn.close(200, "setup done".into()).await;
        Ok(())
    }

    fn processes(&self) -> Vec<(String, u32)> {
        self.server
            .iter()
            .map(|s| ("rabbitmq-server".to_string(), s.pid()))
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
            if let Ok(conn) = self.connect().await
                && let Ok(ch) = conn.create_channel().await
                && let Ok(Some(m)) = ch
                    .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                    .await
            {
                ch.basic_ack(m.delivery_tag, BasicAckOptions::default())
                    .await
                    .context("ack after restart")?;
                let took = started.elapsed();
                let _ = conn.close(200, "done".into()).await;
                self.server = Some(server);
                return Ok(took);
            }
            if Instant::now() > deadline {
                bail!("RabbitMQ did not serve {queue} within 10 minutes of a restart");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn producer(&self, queue: &str) -> Result<Arc<dyn Producer>> {
        let conn = self.connect().await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("confirm.select")?;
        Ok(Arc::new(RabbitProducer {
            _conn: conn,
            channel,
            queue: queue.to_string(),
        }))
    }

    async fn consumer(&self, queue: &str, mode: ConsumerMode) -> Result<Box<dyn Consumer>> {
        let conn = self.connect().await?;
        let channel = conn.create_channel().await?;
        Ok(match mode {
            ConsumerMode::Subscribe => {
                channel
                    .basic_qos(self.prefetch, BasicQosOptions::default())
                    .await
                    .context("basic.qos")?;
                let consumer = channel
                    .basic_consume(
                        queue.into(),
                        "".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .context("basic.consume")?;
                Box::new(RabbitPushConsumer {
                    _conn: conn,
                    channel,
                    consumer,
                    prefetch: self.prefetch as usize,
                })
            }
            ConsumerMode::Dequeue => Box::new(RabbitGetConsumer {
                _conn: conn,
                channel,
                queue: queue.to_string(),
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

struct RabbitProducer {
    _conn: Connection,
    channel: Channel,
    queue: String,
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

#[tonic::async_trait]
impl Producer for RabbitProducer {
    async fn send(&self, body: Bytes) -> Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                persistent(),
            )
            .await
            .context("basic.publish")?
            .await
            .context("publisher confirm")?;
        if !confirm.is_ack() {
            bail!("the broker refused (nacked) a message");
        }
        Ok(())
    }

    async fn send_many(&self, bodies: Vec<Bytes>) -> Result<()> {
        let mut confirms = Vec::with_capacity(bodies.len());
        for body in bodies {
            confirms.push(
                self.channel
                    .basic_publish(
                        "".into(),
                        self.queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        persistent(),
                    )
                    .await
                    .context("basic.publish")?,
            );
        }
        for c in confirms {
            if !c.await.context("publisher confirm")?.is_ack() {
                bail!("the broker refused (nacked) a message");
            }
        }
        Ok(())
    }
}

/// `basic.consume` with a prefetch window; what one call took is acked with one
/// `multiple` ack of the last delivery tag.
struct RabbitPushConsumer {
    _conn: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
    prefetch: usize,
}

#[tonic::async_trait]
impl Consumer for RabbitPushConsumer {
    async fn next(&mut self, wait: Duration) -> Result<Batch> {
        let mut batch = Batch::default();
        let first = match tokio::time::timeout(wait, self.consumer.next()).await {
            Err(_) => return Ok(batch),
            Ok(None) => bail!("the consumer was cancelled"),
            Ok(Some(d)) => d.context("delivery")?,
        };
        let mut last = first.delivery_tag;
        batch
            .delivered
            .push((Instant::now(), Bytes::from(first.data)));
        while batch.delivered.len() < self.prefetch {
            match self.consumer.next().now_or_never() {
                Some(Some(d)) => {
                    let d = d.context("delivery")?;
                    last = d.delivery_tag;
                    batch.delivered.push((Instant::now(), Bytes::from(d.data)));
                }
                Some(None) => bail!("the consumer was cancelled"),
                None => break,
            }
        }
        self.channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await
            .context("basic.ack")?;
        batch.acked = batch.delivered.len() as u64;
        Ok(batch)
    }
}

/// `basic.get` up to a batch, then one `multiple` ack.
struct RabbitGetConsumer {
    _conn: Connection,
    channel: Channel,
    queue: String,
    batch: usize,
}

#[tonic::async_trait]
impl Consumer for RabbitGetConsumer {
    async fn next(&mut self, wait: Duration) -> Result<Batch> {
        let mut batch = Batch::default();
        let deadline = Instant::now() + wait;
        let mut last = None;
        while batch.delivered.len() < self.batch {
            match self
                .channel
                .basic_get(
                    self.queue.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .context("basic.get")?
            {
                Some(m) => {
                    last = Some(m.delivery_tag);
                    batch
                        .delivered
                        .push((Instant::now(), Bytes::from(m.delivery.data)));
                }
                None if batch.delivered.is_empty() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                None => break,
            }
        }
        if let Some(tag) = last {
            self.channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
                .context("basic.ack")?;
            batch.acked = batch.delivered.len() as u64;
        }
        Ok(batch)
    }
}
