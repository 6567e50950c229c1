//! A test application for the e2e suite: it talks to the Sluice sidecar at
//! `SLUICE_ADDR` (injected by the webhook) the way an app would, and prints one JSON
//! line of results for the test to check.
//!
//!   sluice-e2e-app idle                              # an app container that waits
//!   sluice-e2e-app produce --queue Q --count N --prefix P [--acked-file F]
//!   sluice-e2e-app consume --queue Q --prefix P --count N | --expect-file F
//!   sluice-e2e-app stats --queue Q

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use sluice_proto::v1::{self, queues_client::QueuesClient};
use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

#[derive(Parser)]
struct Cli {
    /// The sidecar's address.
    #[arg(long, env = "SLUICE_ADDR", default_value = "127.0.0.1:7070")]
    addr: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Wait for SIGTERM.
    Idle,
    /// Enqueue `count` messages with bodies `<prefix>-<i>`, `concurrency` at a time;
    /// each acknowledged body is appended to `acked_file`. A failed enqueue is retried
    /// (up to `retries` times) and, if it never succeeds, counted as failed.
    Produce {
        #[arg(long)]
        queue: String,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        prefix: String,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 50)]
        retries: u32,
        #[arg(long)]
        acked_file: Option<std::path::PathBuf>,
    },
    /// Dequeue and ack until every expected body was received (or `timeout_s` passes).
    Consume {
        #[arg(long)]
        queue: String,
        #[arg(long)]
        prefix: Option<String>,
        #[arg(long)]
        count: Option<u64>,
        #[arg(long)]
        expect_file: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 300)]
        timeout_s: u64,
    },
    /// Print the queue's settings and layout as the brokers describe them.
    Describe {
        #[arg(long)]
        queue: String,
    },
    /// Print the queue's stats as JSON.
    Stats {
        #[arg(long)]
        queue: String,
    },
}

async fn connect(addr: &str) -> anyhow::Result<QueuesClient<Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .with_context(|| format!("connect to the sidecar at {addr}"))?;
    Ok(QueuesClient::new(ch))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Idle => {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            println!("idle: SLUICE_ADDR={}", cli.addr);
            term.recv().await;
            println!("idle: SIGTERM");
            Ok(())
        }
        Cmd::Produce {
            queue,
            count,
            prefix,
            concurrency,
            retries,
            acked_file,
        } => {
            let client = connect(&cli.addr).await?;
            let file = match &acked_file {
                Some(p) => Some(std::sync::Arc::new(std::sync::Mutex::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .with_context(|| format!("open {}", p.display()))?,
                ))),
                None => None,
            };
            let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let mut tasks = Vec::new();
            for _ in 0..concurrency.max(1) {
                let (mut client, next, file, queue, prefix) = (
                    client.clone(),
                    next.clone(),
                    file.clone(),
                    queue.clone(),
                    prefix.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let (mut acked, mut failed, mut errors) = (0u64, 0u64, 0u64);
                    let mut last_error: Option<String> = None;
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= count {
                            break;
                        }
                        let body = format!("{prefix}-{i}");
                        let mut ok = false;
                        for attempt in 0..=retries {
                            let req = v1::EnqueueRequest {
                                queue: queue.clone(),
                                message: Some(v1::NewMessage {
                                    body: body.clone().into_bytes().into(),
                                    ..Default::default()
                                }),
                                partition: None,
                            };
                            match client.enqueue(req).await {
                                Ok(_) => {
                                    ok = true;
                                    break;
                                }
                                Err(e) => {
                                    errors += 1;
                                    last_error = Some(format!("{:?}", e.code()));
                                    if errors <= 3 {
                                        eprintln!("enqueue {body} (attempt {attempt}): {e}");
                                    }
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                }
                            }
                        }
                        if ok {
                            acked += 1;
                            if let Some(f) = &file {
                                let _ = writeln!(f.lock().unwrap(), "{body}");
                            }
                        } else {
                            failed += 1;
                        }
                    }
                    (acked, failed, errors, last_error)
                }));
            }
            let (mut acked, mut failed, mut errors, mut last_error) = (0, 0, 0, None);
            for t in tasks {
                let (a, f, e, l) = t.await?;
                acked += a;
                failed += f;
                errors += e;
                last_error = last_error.or(l);
            }
            println!(
                "{}",
                serde_json::json!({"acked": acked, "failed": failed, "errors": errors, "last_error": last_error})
            );
            Ok(())
        }
        Cmd::Consume {
            queue,
            prefix,
            count,
            expect_file,
            timeout_s,
        } => {
            let mut expected: HashSet<String> = HashSet::new();
            if let (Some(p), Some(n)) = (&prefix, count) {
                expected.extend((0..n).map(|i| format!("{p}-{i}")));
            }
            if let Some(f) = &expect_file {
                let text =
                    std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?;
                expected.extend(text.lines().filter(|l| !l.is_empty()).map(String::from));
            }
            if expected.is_empty() {
                bail!("nothing expected: give --prefix and --count, or --expect-file");
            }
            let mut client = connect(&cli.addr).await?;
            let mut seen: HashSet<String> = HashSet::new();
            let (mut received, mut acked, mut errors) = (0u64, 0u64, 0u64);
            let start = Instant::now();
            while !expected.iter().all(|e| seen.contains(e))
                && start.elapsed() < Duration::from_secs(timeout_s)
            {
                let req = v1::DequeueRequest {
                    queue: queue.clone(),
                    max_messages: 256,
                    wait_ms: 1000,
                    visibility_timeout_ms: 30_000,
                };
                let msgs = match client.dequeue(req).await {
                    Ok(r) => r.into_inner().messages,
                    Err(e) => {
                        errors += 1;
                        if errors <= 3 {
                            eprintln!("dequeue: {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                received += msgs.len() as u64;
                let receipts: Vec<String> = msgs.iter().map(|m| m.receipt.clone()).collect();
                for m in msgs {
                    seen.insert(String::from_utf8_lossy(&m.body).to_string());
                }
                if receipts.is_empty() {
                    continue;
                }
                match client
                    .ack(v1::AckRequest {
                        queue: queue.clone(),
                        receipts,
                    })
                    .await
                {
                    Ok(r) => {
                        acked += r
                            .into_inner()
                            .results
                            .iter()
                            .filter(|r| r.code == 0)
                            .count() as u64
                    }
                    Err(e) => {
                        errors += 1;
                        eprintln!("ack: {e}");
                    }
                }
            }
            let mut missing: Vec<&String> =
                expected.iter().filter(|e| !seen.contains(*e)).collect();
            missing.sort();
            println!(
                "{}",
                serde_json::json!({
                    "expected": expected.len(), "received": received, "unique": seen.len(),
                    "acked": acked, "errors": errors, "missing": missing.len(),
                    "missing_sample": missing.iter().take(10).collect::<Vec<_>>(),
                })
            );
            Ok(())
        }
        Cmd::Describe { queue } => {
            let mut client = connect(&cli.addr).await?;
            let d = client
                .describe(v1::DescribeRequest { queue })
                .await
                .context("describe")?
                .into_inner();
            println!(
                "{}",
                serde_json::json!({
                    "partitions": d.partitions, "visibility_timeout_ms": d.visibility_timeout_ms,
                    "max_deliveries": d.max_deliveries, "fsync": d.fsync,
                })
            );
            Ok(())
        }
        Cmd::Stats { queue } => {
            let mut client = connect(&cli.addr).await?;
            let s = client
                .stats(v1::StatsRequest { queue })
                .await
                .context("stats")?
                .into_inner();
            println!(
                "{}",
                serde_json::json!({
                    "ready": s.ready, "in_flight": s.in_flight, "delayed": s.delayed,
                    "enqueued_total": s.enqueued_total, "acked_total": s.acked_total,
                    "redelivered_total": s.redelivered_total,
                })
            );
            Ok(())
        }
    }
}
