//! `sluice-bench`: starts a real broker (and a real sidecar in front of it) on
//! loopback, then measures durable end-to-end throughput and open-loop latency,
//! straight to the broker and through the sidecar.
//!
//! Build the servers first: `cargo build --release --bins`, then
//! `target/release/sluice-bench` (see docs/benchmarks.md).

mod nats;
mod plot;
mod proc;
mod rabbitmq;
mod report;
mod scenario;
mod sluice;
mod system;

use anyhow::{Context, Result, bail};
use clap::Parser;
use report::{Machine, Report};
use scenario::{BacklogResult, LatencyResult, ProcessMemory, ThroughputResult};
use std::path::PathBuf;
use std::time::Duration;
use system::{ConsumerMode, QueueSpec, System};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SystemKind {
    /// Sluice: clients talk to the broker.
    Direct,
    /// Sluice: clients talk to a sidecar, which talks to the broker.
    Sidecar,
    /// `direct` with `fsync = "interval"`: NATS 2.9's promise (a process crash loses
    /// nothing answered; a power loss may lose the last interval).
    DirectInterval,
    /// `sidecar` with `fsync = "interval"`.
    SidecarInterval,
    /// `sidecar` with mutual TLS between sidecar and broker, as deployed.
    SidecarTls,
    /// Sluice replicated: clients talk to a sidecar, which talks to the leaders of
    /// the partitions among 3 brokers holding 3 copies of each.
    SidecarR3,
    /// Sluice as the operator runs a one-copy Queue: through the sidecar, one broker,
    /// each partition a Raft group of one (so that it can move between brokers).
    SidecarRaft,
    /// NATS JetStream (Debian's nats-server; see bench/peers/install.sh).
    Nats,
    /// NATS JetStream, a cluster of 3 servers, streams of 3 replicas.
    NatsR3,
    /// RabbitMQ quorum queues (Debian's rabbitmq-server; see bench/peers/install.sh).
    Rabbitmq,
    /// RabbitMQ, a cluster of 3 nodes, quorum queues of 3 members.
    RabbitmqR3,
}

impl SystemKind {
    /// Sluice itself (needs the broker and sidecar binaries), not a peer.
    fn is_sluice(self) -> bool {
        !matches!(
            self,
            SystemKind::Nats | SystemKind::NatsR3 | SystemKind::Rabbitmq | SystemKind::RabbitmqR3
        )
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "sluice-bench",
    version,
    about = "Benchmarks Sluice: durable throughput, open-loop latency, CPU, memory and recovery, straight to the broker and through the sidecar"
)]
struct Args {
    /// Measured seconds per throughput scenario.
    #[arg(long, default_value = "5", value_parser = seconds)]
    duration: Duration,
    /// Unmeasured seconds before each scenario's measurement.
    #[arg(long, default_value = "1", value_parser = seconds)]
    warmup: Duration,
    /// Measured seconds of each latency run.
    #[arg(long, default_value = "10", value_parser = seconds)]
    latency_duration: Duration,
    /// Offered rate of the latency runs, messages per second.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Producer and consumer counts of the throughput runs (N producers and N consumers).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Message body sizes of the throughput runs, bytes.
    #[arg(long, value_delimiter = ',', default_value = "1024")]
    sizes: Vec<usize>,
    /// Producer styles of the throughput runs: `one` (one message in flight per
    /// producer), `window<N>` (N in flight on its connection), `batch<N>` (N per call).
    #[arg(long, value_delimiter = ',', default_value = "one")]
    producers: Vec<system::ProducerStyle>,
    /// Consumer styles of the throughput runs.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "subscribe")]
    consumers: Vec<ConsumerMode>,
    /// Consumer style of the latency runs.
    #[arg(long, value_enum, default_value = "subscribe")]
    latency_consumer: ConsumerMode,
    /// Producer connections and consumers of the latency runs (one run per value).
    #[arg(long, value_delimiter = ',', default_value = "4")]
    latency_clients: Vec<usize>,
    /// Seconds to wait after the last send of a latency run for late deliveries, and
    /// for consumers to drain a queue after a throughput run.
    #[arg(long, default_value = "5", value_parser = seconds)]
    drain: Duration,
    /// Systems to measure. All are started first; every scenario then runs on each
    /// in turn (A B A B), `--rounds` times.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,sidecar"
    )]
    systems: Vec<SystemKind>,
    /// How many times every scenario runs on every system, interleaved.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Message body size of the latency runs, bytes.
    #[arg(long, default_value_t = 1024)]
    message_size: usize,
    /// Messages of the backlog (memory with a backlog, recovery) scenario; 0 skips it.
    #[arg(long, default_value_t = 0)]
    backlog: u64,
    /// Partitions of each benchmark queue.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Credit a Subscribe consumer keeps outstanding.
    #[arg(long, default_value_t = 256)]
    credit: u32,
    /// Messages per Dequeue (and per Ack) of a Dequeue consumer.
    #[arg(long, default_value_t = 100)]
    dequeue_batch: u32,
    /// Run everything with tiny durations (seconds in all): a check that the
    /// harness works, not a measurement. Writes no report unless --write-report is given.
    #[arg(long)]
    smoke: bool,
    /// Write the results (with machine details) into this markdown file, between
    /// the generated-section markers if it has them.
    #[arg(long)]
    write_report: Option<PathBuf>,
    /// Draw throughput and latency by concurrency (SVG) into this file; the report
    /// links it.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Directory of sluice-broker and sluice-sidecar; by default the one holding
    /// this executable.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

fn seconds(s: &str) -> Result<Duration, String> {
    let s = s.trim_end_matches('s');
    let v: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?}: must be a non-negative number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

impl Args {
    fn apply_smoke(&mut self) {
        if self.smoke {
            self.duration = Duration::from_millis(300);
            self.warmup = Duration::from_millis(100);
            self.latency_duration = Duration::from_millis(700);
            self.rate = self.rate.min(200.0);
            self.drain = Duration::from_secs(2);
            self.backlog = 2_000;
            self.rounds = self.rounds.min(1);
        }
    }
}

fn throughput_queue(mode: ConsumerMode, n: usize, size: usize) -> String {
    format!("tp-{}-c{n}-s{size}", mode.as_str())
}
const LATENCY_QUEUE: &str = "latency";
const BACKLOG_QUEUE: &str = "backlog";

#[tokio::main]
async fn main() {
    let mut args = Args::parse();
    args.apply_smoke();
    let outcome = tokio::select! {
        r = run(&args) => r,
        s = stop_signal() => Err(anyhow::anyhow!("interrupted by {s}")),
    };
    // Dropping `run` above killed the servers it started.
    if let Err(e) = outcome {
        eprintln!("sluice-bench: error: {e:#}");
        std::process::exit(1);
    }
}

/// SIGINT or SIGTERM: stop, killing the servers on the way out.
async fn stop_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            return tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "SIGINT"
}

fn make_system(
    kind: SystemKind,
    args: &Args,
    bin_dir: &std::path::Path,
) -> Result<Box<dyn System>> {
    Ok(match kind {
        SystemKind::Direct
        | SystemKind::Sidecar
        | SystemKind::DirectInterval
        | SystemKind::SidecarInterval
        | SystemKind::SidecarTls
        | SystemKind::SidecarR3
        | SystemKind::SidecarRaft => {
            let direct = matches!(kind, SystemKind::Direct | SystemKind::DirectInterval);
            let s = sluice::Sluice::new(
                !direct,
                if kind == SystemKind::SidecarR3 { 3 } else { 1 },
                kind == SystemKind::SidecarRaft,
                bin_dir.to_path_buf(),
                args.partitions,
                args.credit,
                args.dequeue_batch,
            );
            match kind {
                SystemKind::DirectInterval | SystemKind::SidecarInterval => {
                    Box::new(s.fsync_interval())
                }
                SystemKind::SidecarTls => Box::new(s.mutual_tls()),
                _ => Box::new(s),
            }
        }
        SystemKind::Nats => Box::new(nats::Nats::new(1, args.credit, args.dequeue_batch)?),
        SystemKind::NatsR3 => Box::new(nats::Nats::new(3, args.credit, args.dequeue_batch)?),
        SystemKind::Rabbitmq => {
            Box::new(rabbitmq::RabbitMq::new(1, args.credit, args.dequeue_batch)?)
        }
        SystemKind::RabbitmqR3 => {
            Box::new(rabbitmq::RabbitMq::new(3, args.credit, args.dequeue_batch)?)
        }
    })
}

fn print_memory(label: &str, m: &[ProcessMemory]) {
    for p in m {
        println!(
            "   {label}: {} RSS {:.1} MiB (peak {:.1} MiB)",
            p.role,
            p.usage.rss_kib as f64 / 1024.0,
            p.usage.peak_kib as f64 / 1024.0
        );
    }
}

async fn run(args: &Args) -> Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .parent()
            .context("this executable has no directory")?
            .to_path_buf(),
    };
    if args.systems.iter().any(|k| k.is_sluice()) {
        for name in [sluice::BROKER_BIN, sluice::SIDECAR_BIN] {
            sluice::find_binary(&bin_dir, name)?;
        }
    }
    if args.concurrency.contains(&0) || args.latency_clients.contains(&0) {
        bail!("--concurrency and --latency-clients values must be above 0");
    }
    if args.rounds == 0 {
        bail!("--rounds must be above 0");
    }
    let machine = Machine::detect();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let date = report::command_output("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .unwrap_or_else(|| "unknown".into());
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "sluice-bench ({profile} build{}): {} CPUs, {}, {}, load {}",
        if args.smoke { ", smoke run" } else { "" },
        machine.nproc,
        machine.memory,
        machine.cpu,
        machine.load
    );

    let mut queues: Vec<QueueSpec> = Vec::new();
    for &mode in &args.consumers {
        for &size in &args.sizes {
            for &n in &args.concurrency {
                queues.push(QueueSpec {
                    name: throughput_queue(mode, n, size),
                });
            }
        }
    }
    queues.push(QueueSpec {
        name: LATENCY_QUEUE.into(),
    });
    if args.backlog > 0 {
        queues.push(QueueSpec {
            name: BACKLOG_QUEUE.into(),
        });
    }

    let mut systems: Vec<Box<dyn System>> = args
        .systems
        .iter()
        .map(|k| make_system(*k, args, &bin_dir))
        .collect::<Result<_>>()?;

    // Start every system first, so that the scenarios can alternate between them.
    let mut described = Vec::new();
    let mut idle: Vec<(String, Vec<ProcessMemory>)> = Vec::new();
    for system in systems.iter_mut() {
        let name = system.name().to_string();
        println!("== {name}: starting servers");
        system
            .setup(&queues)
            .await
            .with_context(|| format!("setting up {name}"))?;
        described.push((name.clone(), system.describe()));
    }
    // Idle memory: every server up, queues open, nothing sent yet.
    tokio::time::sleep(Duration::from_millis(if args.smoke { 100 } else { 1000 })).await;
    for system in &systems {
        let m = scenario::memory_of(system.as_ref());
        print_memory(&format!("{} idle", system.name()), &m);
        idle.push((system.name().to_string(), m));
    }

    let mut tput: Vec<ThroughputResult> = Vec::new();
    let mut lat: Vec<LatencyResult> = Vec::new();
    for round in 1..=args.rounds {
        println!("== round {round} of {}", args.rounds);
        for &mode in &args.consumers {
            for &style in &args.producers {
                for &size in &args.sizes {
                    for &n in &args.concurrency {
                        for system in &systems {
                            let name = system.name();
                            let r = scenario::throughput(
                                system.as_ref(),
                                &throughput_queue(mode, n, size),
                                mode,
                                style,
                                n,
                                args.warmup,
                                args.duration,
                                args.drain,
                                size,
                                round,
                            )
                            .await
                            .with_context(|| {
                                format!(
                                    "{name}: throughput, {} × {n}, producers {}, {size} B",
                                    mode.as_str(),
                                    style.label()
                                )
                            })?;
                            println!(
                                "   {name:<24} throughput {:<9} {:<9} {size:>5} B {n:>2}×{n:<2}  enqueued {:>8.0} msg/s  end-to-end {:>8.0} msg/s  {:>7.2} MB/s  server CPU {:>6.1} µs/msg  client CPU {:>6.1} µs/msg",
                                mode.as_str(),
                                style.label(),
                                r.enqueued_per_sec,
                                r.acked_per_sec,
                                r.mb_per_sec,
                                r.server_cpu_us,
                                r.client_cpu_us,
                            );
                            tput.push(r);
                        }
                    }
                }
            }
        }
        for &clients in &args.latency_clients {
            for system in &systems {
                let name = system.name();
                let r = scenario::latency(
                    system.as_ref(),
                    LATENCY_QUEUE,
                    args.latency_consumer,
                    args.rate,
                    clients,
                    clients,
                    args.warmup,
                    args.latency_duration,
                    args.drain,
                    args.message_size,
                    round,
                )
                .await
                .with_context(|| format!("{name}: latency"))?;
                println!(
                    "   {name:<16} latency at {:.0} msg/s, {clients} clients: p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  ({} of {} delivered; enqueue ack p50 {:.2} ms p99 {:.2} ms)",
                    r.rate,
                    r.p50 as f64 / 1e3,
                    r.p99 as f64 / 1e3,
                    r.p999 as f64 / 1e3,
                    r.delivered,
                    r.scheduled,
                    r.enqueue_p50 as f64 / 1e3,
                    r.enqueue_p99 as f64 / 1e3
                );
                lat.push(r);
            }
        }
    }

    // Last, as it leaves a large backlog behind: memory with a backlog, recovery.
    let mut backlog: Vec<BacklogResult> = Vec::new();
    if args.backlog > 0 {
        for system in systems.iter_mut() {
            let name = system.name().to_string();
            println!("== {name}: backlog of {} messages", args.backlog);
            let r = scenario::backlog(
                system.as_mut(),
                BACKLOG_QUEUE,
                args.backlog,
                args.message_size,
                4,
                1000,
            )
            .await
            .with_context(|| format!("{name}: backlog"))?;
            println!(
                "   filled in {:.1} s ({:.0} msg/s); recovery after SIGKILL: {:.3} s",
                r.fill_secs,
                r.messages as f64 / r.fill_secs,
                r.recovery.as_secs_f64()
            );
            print_memory("with backlog", &r.filled);
            print_memory("after recovery", &r.recovered);
            backlog.push(r);
        }
    }
    for system in systems.iter_mut() {
        system.teardown().await?;
    }
    drop(systems);

    let load_after = Machine::load();
    let settings = format!(
        "throughput: {:.1} s warmup + {:.1} s measured per row, then the queue is drained; each producer (its own connection) sends as its style says and counts a message once its durable acknowledgement came: {}; \
         Subscribe-style consumers keep {} messages outstanding, Dequeue-style consumers take and ack up to {} per call; \
         latency: {} B messages, {:.0} msg/s offered for {:.1} s (+{:.1} s warmup) by N producer connections to N {} consumers; \
         {} round(s), systems interleaved within each scenario",
        args.warmup.as_secs_f64(),
        args.duration.as_secs_f64(),
        args.producers
            .iter()
            .map(|p| match p {
                system::ProducerStyle::One => "`one`: one message in flight".to_string(),
                system::ProducerStyle::Window(n) => format!("`window{n}`: {n} in flight"),
                system::ProducerStyle::Batch(n) => {
                    format!("`batch{n}`: {n} per call (Sluice EnqueueBatch; the peers pipeline {n} and wait for all)")
                }
            })
            .collect::<Vec<_>>()
            .join(", "),
        args.credit,
        args.dequeue_batch,
        args.message_size,
        args.rate,
        args.latency_duration.as_secs_f64(),
        args.warmup.as_secs_f64(),
        args.latency_consumer.as_str(),
        args.rounds,
    );
    let revision = report::command_output("git", &["rev-parse", "--short", "HEAD"]);
    let plot_size = if args.sizes.contains(&1024) {
        1024
    } else {
        args.sizes.first().copied().unwrap_or(args.message_size)
    };
    if let Some(path) = &args.plot {
        plot::write_svg(path, &tput, &lat, plot_size)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("plot written to {}", path.display());
    }
    let plot_link = args.plot.as_ref().map(|p| {
        // Relative to the report when they share a directory.
        match (
            p.parent(),
            args.write_report.as_ref().and_then(|r| r.parent()),
        ) {
            (Some(a), Some(b)) if a == b => p
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            _ => p.display().to_string(),
        }
    });
    let report = Report {
        machine: &machine,
        command: &command,
        date: &date,
        revision: revision.as_deref(),
        profile,
        settings: &settings,
        systems: &described,
        throughput: &tput,
        latency: &lat,
        idle: &idle,
        backlog: &backlog,
        load_after: &load_after,
        plot: plot_link.as_deref(),
    };
    println!();
    println!("{}", report::throughput_summary(&tput));
    println!("{}", report::latency_summary(&lat));
    println!("{}", report::cpu_summary(&tput));
    println!("{}", report::throughput_table(&tput));
    println!("{}", report::latency_table(&lat));
    println!("{}", report::memory_table(&idle, &backlog));
    if let Some(path) = &args.write_report {
        report
            .write(path)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    Ok(())
}
