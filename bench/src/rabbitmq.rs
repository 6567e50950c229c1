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

/// A quorum queue of `members` members (one per node).
fn queue_args(members: usize) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-quorum-initial-group-size".into(),
        AMQPValue::LongInt(members as i32),
    );
    args
}

/// What `rabbitmqctl` needs to reach one node (sent to a blocking thread).
struct RabbitMqCtl {
    node: String,
    home: PathBuf,
    epmd_port: u16,
}

impl RabbitMqCtl {
    fn of(r: &RabbitMq, i: usize) -> Result<Self> {
        Ok(RabbitMqCtl {
            node: r.node_name(i),
            home: r.node_dir(i)?.join("home"),
            epmd_port: r.ports.get(i).context("no ports")?[2].port(),
        })
    }

    fn run(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("/usr/lib/rabbitmq/bin/rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .env("HOME", &self.home)
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .output()
            .context("running rabbitmqctl")?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl {args:?} on {}: {}{}",
                self.node,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Joins this node to `first`'s cluster (the documented stop, join, start).
    fn join(&self, first: &str) -> Result<()> {
        self.run(&["stop_app"])?;
        self.run(&["join_cluster", first])?;
        self.run(&["start_app"])
    }
}

/// The Erlang cookie the nodes of a cluster share (private nodes on loopback).
const COOKIE: &str = "SLUICEBENCHCLUSTERCOOKIE";

pub struct RabbitMq {
    /// Nodes, and members of each quorum queue (1, or 3: a cluster).
    members: usize,
    prefetch: u16,
    dequeue_batch: u32,
    version: String,
    // Field order matters for drop: the nodes, the cluster's epmd, then the data.
    servers: Vec<Option<ChildGuard>>,
    epmd: Option<ChildGuard>,
    dir: Option<TempDir>,
    /// Each node's AMQP and distribution port, and the epmd port they share.
    ports: Vec<[SocketAddr; 3]>,
    pid: u32,
}

impl RabbitMq {
    pub fn new(members: usize, prefetch: u32, dequeue_batch: u32) -> Result<Self> {
        find()?;
        let version = Command::new("dpkg-query")
            .args(["-W", "-f=${Version}", "rabbitmq-server"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Ok(RabbitMq {
            members,
            prefetch: prefetch.min(u16::MAX as u32) as u16,
            dequeue_batch,
            version,
            servers: Vec::new(),
            epmd: None,
            dir: None,
            ports: Vec::new(),
            pid: std::process::id(),
        })
    }

    fn node_name(&self, i: usize) -> String {
        format!("sluice-bench-{}-{i}@localhost", self.pid)
    }

    fn node_dir(&self, i: usize) -> Result<PathBuf> {
        let dir = &self.dir.as_ref().context("no data directory")?.0;
        Ok(if self.members > 1 {
            dir.join(format!("node-{i}"))
        } else {
            dir.clone()
        })
    }

    fn amqp_uri(&self, i: usize) -> Result<String> {
        let [amqp, _, _] = *self.ports.get(i).context("setup() has not run")?;
        Ok(format!("amqp://guest:guest@{amqp}/%2f"))
    }

    fn spawn(&self, i: usize) -> Result<ChildGuard> {
        let dir = self.node_dir(i)?;
        let [amqp, dist, epmd] = *self.ports.get(i).context("no ports")?;
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(SCRIPT)
            .arg("rabbitmq.sh")
            .arg(&dir)
            .arg(amqp.port().to_string())
            .arg(dist.port().to_string())
            .arg(epmd.port().to_string())
            .arg(self.node_name(i));
        if self.members > 1 {
            cmd.arg(COOKIE);
        }
        std::fs::create_dir_all(&dir)?;
        Ok(ChildGuard::spawn_group(
            &format!("rabbitmq-server-{i}"),
            &mut cmd,
            dir.join("rabbitmq.log"),
        )?)
    }

    async fn connect(&self) -> Result<Connection> {
        self.connect_to(0).await
    }

    async fn connect_to(&self, i: usize) -> Result<Connection> {
        let uri = self.amqp_uri(i)?;
        Connection::connect(&uri, ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to RabbitMQ at {uri}"))
    }

    async fn wait_up(&self, i: usize, server: &mut ChildGuard) -> Result<Connection> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            check_alive(server)?;
            match self.connect_to(i).await {
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
        if self.members > 1 {
            "rabbitmq-r3"
        } else {
            "rabbitmq"
        }
    }

    fn describe(&self) -> String {
        format!(
            "Debian's rabbitmq-server {}{}, one quorum queue per queue ({} member(s); Raft log fsynced before a confirm), publisher confirms (one outstanding per producer), manual acks, prefetch {} (Subscribe) / basic.get (Dequeue)",
            self.version,
            if self.members > 1 {
                ", a cluster of 3 nodes (clients on node 0)"
            } else {
                ""
            },
            self.members,
            self.prefetch
        )
    }

    async fn setup(&mut self, queues: &[QueueSpec]) -> Result<()> {
        let dir = TempDir::new(self.name())?;
        let n = self.members;
        let p = free_addrs(Ipv4Addr::LOCALHOST.into(), 2 * n + 1)?;
        let epmd = p[2 * n];
        self.ports = (0..n).map(|i| [p[2 * i], p[2 * i + 1], epmd]).collect();
        self.dir = Some(dir);
        if n > 1 {
            // One epmd for the cluster, outside the nodes' process groups.
            let mut cmd = Command::new("epmd");
            cmd.args(["-address", "127.0.0.1", "-port", &epmd.port().to_string()]);
            let log = self.node_dir(0)?.with_file_name("epmd.log");
            self.epmd = Some(ChildGuard::spawn_group("epmd", &mut cmd, log)?);
        }
        for i in 0..n {
            let server = self.spawn(i)?;
            self.servers.push(Some(server));
        }
        let mut conn = None;
        for i in 0..n {
            let mut server = self.servers[i].take().context("node")?;
            let up = self.wait_up(i, &mut server).await;
            self.servers[i] = Some(server);
            let up = up?;
            if i == 0 {
                conn = Some(up);
            } else {
                let _ = up.close(200, "up".into()).await;
            }
        }
        let conn = conn.context("node 0")?;
        for i in 1..n {
            let me = RabbitMqCtl::of(self, i)?;
            let first = self.node_name(0);
            tokio::task::spawn_blocking(move || me.join(&first))
                .await
                .context("joining the cluster")??;
        }
        let ch = conn.create_channel().await?;
        for q in queues {
            ch.queue_declare(
                q.name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                queue_args(n),
            )
            .await
            .with_context(|| format!("declaring quorum queue {}", q.name))?;
        }
        let _ = conn.close(200, "setup done".into()).await;
        Ok(())
    }

    fn processes(&self) -> Vec<(String, u32)> {
        self.servers
            .iter()
            .chain([&self.epmd])
            .flatten()
            .map(|s| (s.name.clone(), s.pid()))
            .collect()
    }

    /// Node 0 killed and started again; in a cluster the time runs until node 1
    /// serves a message meanwhile.
    async fn restart(&mut self, queue: &str) -> Result<Duration> {
        if let Some(mut old) = self.servers.first_mut().and_then(Option::take) {
            old.kill();
        }
        let started = Instant::now();
        let mut server = self.spawn(0)?;
        let at = if self.members > 1 { 1 } else { 0 };
        let deadline = started + Duration::from_secs(600);
        loop {
            check_alive(&mut server)?;
            if let Ok(conn) = self.connect_to(at).await
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
                self.servers[0] = Some(server);
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
        self.servers.clear();
        self.epmd = None;
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
