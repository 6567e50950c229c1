//! `sluice`: the command line. `sluice dev` runs an embedded broker on
//! 127.0.0.1:7070; the other commands speak the gRPC API to a sidecar or `sluice dev`,
//! or with `--kube` to a cluster's queue through its API server ([`kube`]).

mod kube;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use sluice_config::{FsyncMode, QueueSettings, parse_duration};
use sluice_proto::v1::{self, queues_client::QueuesClient};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Sluice: a Kubernetes-native message queue"
)]
struct Cli {
    /// The sidecar (or `sluice dev`) to talk to.
    #[arg(
        long,
        global = true,
        env = "SLUICE_ADDR",
        default_value = "http://127.0.0.1:7070"
    )]
    addr: String,
    /// Reach the queue in a Kubernetes cluster through its API server, with your
    /// kubeconfig and RBAC (instead of --addr).
    #[arg(long, global = true)]
    kube: bool,
    /// With --kube: the Queue's namespace (default: the context's).
    #[arg(long, short = 'n', global = true, requires = "kube")]
    namespace: Option<String>,
    /// With --kube: the kubeconfig context (default: the current one).
    #[arg(long, global = true, requires = "kube")]
    context: Option<String>,
    /// With --kube, for a Queue with an access list: the listed ServiceAccount whose
    /// token to present (default: the first listed).
    #[arg(long, global = true, requires = "kube")]
    service_account: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run broker and API in one process on a local data directory (no Kubernetes).
    Dev {
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9190")]
        metrics_listen: SocketAddr,
        #[arg(long, default_value = "./sluice-data")]
        data_dir: PathBuf,
        /// always | interval | never
        #[arg(long, default_value = "always", value_parser = parse_fsync)]
        fsync: FsyncMode,
        #[arg(long, default_value_t = 4)]
        partitions: u32,
        #[arg(long, default_value = "30s", value_parser = parse_dur)]
        visibility_timeout: std::time::Duration,
        #[arg(long, default_value_t = 5)]
        max_deliveries: u32,
    },
    /// Enqueue a message (the body from the argument, or stdin).
    Send {
        queue: String,
        body: Option<String>,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        dedup_id: Option<String>,
        /// e.g. 10s
        #[arg(long, value_parser = parse_dur)]
        delay: Option<std::time::Duration>,
        /// name=value, repeatable
        #[arg(long = "attr")]
        attributes: Vec<String>,
    },
    /// Lease messages and print them; with --ack, settle them too. Up to --max, in
    /// batches, until the queue has nothing within --wait.
    Receive {
        queue: String,
        #[arg(long, default_value_t = 1)]
        max: u64,
        #[arg(long, default_value = "5s", value_parser = parse_dur)]
        wait: std::time::Duration,
        #[arg(long, value_parser = parse_dur)]
        visibility: Option<std::time::Duration>,
        #[arg(long)]
        ack: bool,
    },
    /// Settle leased messages by receipt.
    Ack {
        queue: String,
        receipts: Vec<String>,
    },
    /// Give leased messages back.
    Nack {
        queue: String,
        receipts: Vec<String>,
        #[arg(long, value_parser = parse_dur)]
        delay: Option<std::time::Duration>,
        #[arg(long)]
        dead_letter: bool,
    },
    /// Show waiting messages without leasing them.
    Peek {
        queue: String,
        #[arg(long, default_value_t = 10)]
        max: u32,
    },
    /// Depth and counters of a queue.
    Stats { queue: String },
    /// Move dead letters from <queue>.dlq back to <queue>.
    Redrive {
        queue: String,
        /// 0 = all
        #[arg(long, default_value_t = 0)]
        max: u64,
    },
}

fn parse_dur(s: &str) -> Result<std::time::Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

fn parse_fsync(s: &str) -> Result<FsyncMode, String> {
    match s {
        "always" => Ok(FsyncMode::Always),
        "interval" => Ok(FsyncMode::Interval),
        "never" => Ok(FsyncMode::Never),
        _ => Err("expected always, interval or never".into()),
    }
}

async fn connect(addr: &str) -> Result<QueuesClient<Channel>> {
    let client = QueuesClient::connect(addr.to_string())
        .await
        .with_context(|| {
            format!("cannot reach Sluice at {addr} (is `sluice dev` or the sidecar running?)")
        })?;
    Ok(client
        .max_decoding_message_size(sluice_dataplane::server::MAX_REQUEST_BYTES)
        .max_encoding_message_size(sluice_dataplane::server::MAX_REQUEST_BYTES))
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

fn print_message(m: &v1::Message) {
    println!(
        "id={} partition={} deliveries={} receipt={}{}{}",
        m.id,
        m.partition,
        m.delivery_count,
        if m.receipt.is_empty() {
            "-"
        } else {
            &m.receipt
        },
        if m.key.is_empty() {
            String::new()
        } else {
            format!(" key={}", m.key)
        },
        if m.attributes.is_empty() {
            String::new()
        } else {
            let mut a: Vec<_> = m
                .attributes
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            a.sort();
            format!(" attrs={}", a.join(","))
        }
    );
    println!("{}", String::from_utf8_lossy(&m.body));
}

fn report(results: &[v1::ReceiptResult]) -> Result<()> {
    let mut failed = 0;
    for r in results {
        if r.code != 0 {
            failed += 1;
            eprintln!("{}: {}", r.receipt, r.error);
        }
    }
    if failed > 0 {
        bail!("{failed} of {} receipts failed", results.len());
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // A command-line user wants the reason, not a backtrace: print the error chain.
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The queue a command works on (`None` for `dev`).
fn queue_of(c: &Command) -> Option<&str> {
    match c {
        Command::Dev { .. } => None,
        Command::Send { queue, .. }
        | Command::Receive { queue, .. }
        | Command::Ack { queue, .. }
        | Command::Nack { queue, .. }
        | Command::Peek { queue, .. }
        | Command::Stats { queue }
        | Command::Redrive { queue, .. } => Some(queue),
    }
}

/// Prints progress on stderr at most once a second, for work on many messages.
struct Progress {
    last: std::time::Instant,
}

impl Progress {
    fn new() -> Self {
        Progress {
            last: std::time::Instant::now(),
        }
    }

    fn tick(&mut self, what: impl FnOnce() -> String) {
        if self.last.elapsed() >= std::time::Duration::from_secs(1) {
            eprintln!("{}", what());
            self.last = std::time::Instant::now();
        }
    }
}

/// Messages a Dequeue asks for at most, within the queue's `max_batch`.
const RECEIVE_BATCH: u64 = 100;
/// Dead letters one Redrive call moves at most per broker, so a long redrive shows
/// its progress.
const REDRIVE_CHUNK: u64 = 1000;

async fn run() -> Result<()> {
    let cli = Cli::parse();
    // With --kube, a sidecar in this process, kept until the command is done.
    let mut _session = None;
    let addr = match queue_of(&cli.command) {
        Some(queue) if cli.kube => {
            let target = kube::KubeTarget {
                context: cli.context.clone(),
                namespace: cli.namespace.clone(),
                service_account: cli.service_account.clone(),
            };
            let session = kube::open(queue, &target).await?;
            let addr = session.addr.clone();
            _session = Some(session);
            addr
        }
        None if cli.kube => bail!("`sluice dev` runs here: --kube is for a cluster's queue"),
        _ => cli.addr.clone(),
    };
    match cli.command {
        Command::Dev {
            listen,
            metrics_listen,
            data_dir,
            fsync,
            partitions,
            visibility_timeout,
            max_deliveries,
        } => {
            let _telemetry = sluice_dataplane::server::init_tracing(false, "sluice-dev");
            let template = QueueSettings {
                fsync,
                partitions,
                visibility_timeout,
                max_deliveries,
                ..QueueSettings::default()
            };
            let mut options = sluice_broker::BrokerOptions::new(&data_dir);
            options.auto_create = Some(template);
            let grpc = sluice_dataplane::server::bind(listen).await?;
            let http = sluice_dataplane::server::bind(metrics_listen).await?;
            eprintln!(
                "sluice dev: API on {listen} (queues are created on first use), metrics on http://{metrics_listen}/metrics, data in {}",
                data_dir.display()
            );
            sluice_broker::server::run(
                options,
                grpc,
                Some(http),
                sluice_dataplane::server::shutdown_signal(),
            )
            .await?;
        }
        Command::Send {
            queue,
            body,
            key,
            dedup_id,
            delay,
            attributes,
        } => {
            let body = match body {
                Some(b) => b.into_bytes(),
                None => {
                    let mut buf = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
                    buf
                }
            };
            let mut attrs = HashMap::new();
            for a in attributes {
                let (k, v) = a.split_once('=').context("--attr takes name=value")?;
                attrs.insert(k.to_string(), v.to_string());
            }
            let mut c = connect(&addr).await?;
            let r = c
                .enqueue(v1::EnqueueRequest {
                    queue,
                    message: Some(v1::NewMessage {
                        body: body.into(),
                        attributes: attrs,
                        key: key.unwrap_or_default(),
                        dedup_id: dedup_id.unwrap_or_default(),
                        delay_ms: delay.map_or(0, |d| d.as_millis() as u64),
                    }),
                    partition: None,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "{}{}",
                r.id,
                if r.duplicate {
                    " (duplicate, not stored again)"
                } else {
                    ""
                }
            );
        }
        Command::Receive {
            queue,
            max,
            wait,
            visibility,
            ack,
        } => {
            let mut c = connect(&addr).await?;
            let batch = if max > 1 {
                let d = c
                    .describe(v1::DescribeRequest {
                        queue: queue.clone(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                RECEIVE_BATCH.min(u64::from(d.max_batch.max(1)))
            } else {
                1
            };
            let (mut received, mut acked) = (0u64, 0u64);
            let mut progress = Progress::new();
            while received < max {
                let r = c
                    .dequeue(v1::DequeueRequest {
                        queue: queue.clone(),
                        max_messages: batch.min(max - received) as u32,
                        wait_ms: wait.as_millis() as u64,
                        visibility_timeout_ms: visibility.map_or(0, |d| d.as_millis() as u64),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if r.messages.is_empty() {
                    break;
                }
                for m in &r.messages {
                    print_message(m);
                }
                received += r.messages.len() as u64;
                if ack {
                    let receipts = r.messages.iter().map(|m| m.receipt.clone()).collect();
                    let a = c
                        .ack(v1::AckRequest {
                            queue: queue.clone(),
                            receipts,
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    report(&a.results)?;
                    acked += a.results.len() as u64;
                }
                progress.tick(|| format!("received {received} of at most {max}…"));
            }
            match (received, ack) {
                (0, _) => eprintln!("no message"),
                (n, true) => eprintln!("received {n}, acked {acked}"),
                (n, false) => eprintln!("received {n} (leased: ack or nack them by receipt)"),
            }
        }
        Command::Ack { queue, receipts } => {
            let mut c = connect(&addr).await?;
            let a = c
                .ack(v1::AckRequest { queue, receipts })
                .await
                .map_err(status)?
                .into_inner();
            report(&a.results)?;
        }
        Command::Nack {
            queue,
            receipts,
            delay,
            dead_letter,
        } => {
            let mut c = connect(&addr).await?;
            let a = c
                .nack(v1::NackRequest {
                    queue,
                    receipts,
                    delay_ms: delay.map_or(0, |d| d.as_millis() as u64),
                    dead_letter,
                })
                .await
                .map_err(status)?
                .into_inner();
            report(&a.results)?;
        }
        Command::Peek { queue, max } => {
            let mut c = connect(&addr).await?;
            let r = c
                .peek(v1::PeekRequest {
                    queue,
                    max_messages: max,
                })
                .await
                .map_err(status)?
                .into_inner();
            if r.messages.is_empty() {
                eprintln!("no message waiting");
            }
            for m in &r.messages {
                print_message(m);
            }
        }
        Command::Stats { queue } => {
            let mut c = connect(&addr).await?;
            let s = c
                .stats(v1::StatsRequest { queue })
                .await
                .map_err(status)?
                .into_inner();
            println!("queue:          {}", s.queue);
            println!("ready:          {}", s.ready);
            println!("in flight:      {}", s.in_flight);
            println!("delayed:        {}", s.delayed);
            println!("dead-lettered:  {}", s.dead_lettered);
            println!("bytes:          {}", s.bytes);
            println!("enqueued total: {}", s.enqueued_total);
            println!("acked total:    {}", s.acked_total);
            println!("redelivered:    {}", s.redelivered_total);
            println!("dead-lettered total: {}", s.dead_lettered_total);
        }
        Command::Redrive { queue, max } => {
            let mut c = connect(&addr).await?;
            let mut moved = 0u64;
            let mut progress = Progress::new();
            loop {
                let chunk = match max {
                    0 => REDRIVE_CHUNK,
                    m if moved >= m => break,
                    m => REDRIVE_CHUNK.min(m - moved),
                };
                let r = c
                    .redrive(v1::RedriveRequest {
                        queue: queue.clone(),
                        max_messages: chunk,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if r.moved == 0 {
                    break;
                }
                moved += r.moved;
                progress.tick(|| format!("moved {moved}…"));
            }
            println!(
                "moved {moved} messages from {queue}{} back to {queue}",
                sluice_config::DLQ_SUFFIX
            );
        }
    }
    Ok(())
}
