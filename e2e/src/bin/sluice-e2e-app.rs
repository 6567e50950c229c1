//! A test application for the e2e suite: it talks to the Sluice sidecar at
//! `SLUICE_ADDR` (injected by the webhook) the way an app would.
//!
//! In the app pods of the scenarios it runs `serve`: a small HTTP job server that the
//! tests reach through the API server's pod proxy
//! (`/api/v1/namespaces/<ns>/pods/<pod>:8088/proxy/...`), so the same tests drive it
//! on the local control plane and on any cluster a KUBECONFIG points at, without
//! `kubectl exec`:
//!
//!   POST /jobs {"args": ["produce", "--queue", "Q", ...]}  -> {"id": N}
//!   GET  /jobs/N    -> {"done": bool, "acked": n, "result": {...} | null, "error": "..." | null}
//!   GET  /healthz   -> ok (the pod's readiness probe)
//!
//! The same commands run once from a shell, printing one JSON line:
//!
//!   sluice-e2e-app produce --queue Q --count N --prefix P
//!   sluice-e2e-app consume --queue Q --prefix P --count N | --expect-job J (jobs only)
//!   sluice-e2e-app stats --queue Q
//!   sluice-e2e-app describe --queue Q

use anyhow::{Context, bail};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use sluice_proto::v1::{self, queues_client::QueuesClient};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

/// A job's command line, as POSTed to `/jobs`.
#[derive(Parser)]
#[command(name = "job")]
struct JobLine {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve jobs over HTTP until SIGTERM.
    Serve {
        #[arg(long, default_value = "0.0.0.0:8088")]
        listen: String,
    },
    /// Enqueue `count` messages with bodies `<prefix>-<i>`, `concurrency` at a time;
    /// each acknowledged body is remembered by the job.
    /// A failed enqueue is retried (up to `retries` times) and, if it never
    /// succeeds, counted as failed.
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
        /// Each of the `concurrency` lanes (message i goes in lane i % concurrency,
        /// after the lane's previous one is acknowledged) is a key of its own,
        /// `<prefix>-k<lane>`: the queue must deliver each lane in order.
        #[arg(long)]
        keyed: bool,
    },
    /// Dequeue and ack until every expected body was received (or `timeout_s` passes).
    Consume {
        #[arg(long)]
        queue: String,
        #[arg(long)]
        prefix: Option<String>,
        #[arg(long)]
        count: Option<u64>,
        /// Expect what the produce job with this id (of this server) had
        /// acknowledged; repeated for several jobs.
        #[arg(long)]
        expect_job: Vec<u64>,
        #[arg(long, default_value_t = 300)]
        timeout_s: u64,
        /// Count first deliveries that come before an earlier message of their lane
        /// (`<prefix>-<i>`, lane i % lanes), as `produce --keyed` makes them.
        #[arg(long)]
        lanes: Option<u64>,
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

/// One run of a command: what it has acknowledged so far, and how it ended.
#[derive(Default)]
struct Job {
    acked: AtomicU64,
    bodies: Mutex<Vec<String>>,
    outcome: Mutex<Option<Result<Value, String>>>,
}

#[derive(Default)]
struct Jobs {
    next: AtomicU64,
    all: Mutex<HashMap<u64, Arc<Job>>>,
}

impl Jobs {
    fn get(&self, id: u64) -> Option<Arc<Job>> {
        self.all.lock().unwrap().get(&id).cloned()
    }
}

struct Server {
    addr: String,
    jobs: Jobs,
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
        Cmd::Serve { listen } => serve(cli.addr, &listen).await,
        cmd => {
            let result = run(&cli.addr, cmd, &Job::default(), &Jobs::default()).await?;
            println!("{result}");
            Ok(())
        }
    }
}

async fn serve(addr: String, listen: &str) -> anyhow::Result<()> {
    let state = Arc::new(Server {
        addr,
        jobs: Jobs::default(),
    });
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/jobs", post(start_job))
        .route("/jobs/{id}", get(job_status))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    println!("serving jobs on {listen}; sidecar at {}", state.addr);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            term.recv().await;
        })
        .await?;
    println!("serve: SIGTERM");
    Ok(())
}

async fn start_job(
    State(server): State<Arc<Server>>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let args: Vec<String> = body["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let cmd = match JobLine::try_parse_from(std::iter::once("job".to_string()).chain(args)) {
        Ok(JobLine {
            cmd: Cmd::Serve { .. },
        }) => return bad_request("a job cannot serve".into()),
        Ok(line) => line.cmd,
        Err(e) => return bad_request(e.to_string()),
    };
    let id = server.jobs.next.fetch_add(1, Ordering::Relaxed);
    let job = Arc::new(Job::default());
    server.jobs.all.lock().unwrap().insert(id, job.clone());
    tokio::spawn(async move {
        let outcome = run(&server.addr, cmd, &job, &server.jobs).await;
        *job.outcome.lock().unwrap() = Some(outcome.map_err(|e| format!("{e:#}")));
    });
    (StatusCode::ACCEPTED, Json(json!({ "id": id })))
}

fn bad_request(why: String) -> (StatusCode, Json<Value>) {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": why })))
}

async fn job_status(
    State(server): State<Arc<Server>>,
    Path(id): Path<u64>,
) -> (StatusCode, Json<Value>) {
    let Some(job) = server.jobs.get(id) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("no job {id}") })),
        );
    };
    let acked = job.acked.load(Ordering::Relaxed);
    let body = match &*job.outcome.lock().unwrap() {
        None => json!({"done": false, "acked": acked, "result": null, "error": null}),
        Some(Ok(v)) => json!({"done": true, "acked": acked, "result": v, "error": null}),
        Some(Err(e)) => json!({"done": true, "acked": acked, "result": null, "error": e}),
    };
    (StatusCode::OK, Json(body))
}

async fn run(addr: &str, cmd: Cmd, job: &Job, jobs: &Jobs) -> anyhow::Result<Value> {
    match cmd {
        Cmd::Serve { .. } => bail!("serve is not a job"),
        Cmd::Produce {
            queue,
            count,
            prefix,
            concurrency,
            retries,
            keyed,
        } => {
            let lanes = Lanes { concurrency, keyed };
            produce(addr, job, &queue, count, &prefix, lanes, retries).await
        }
        Cmd::Consume {
            queue,
            prefix,
            count,
            expect_job,
            timeout_s,
            lanes,
        } => {
            let mut expected: HashSet<String> = HashSet::new();
            if let (Some(p), Some(n)) = (&prefix, count) {
                expected.extend((0..n).map(|i| format!("{p}-{i}")));
            }
            for id in expect_job {
                let other = jobs.get(id).with_context(|| format!("no job {id}"))?;
                expected.extend(other.bodies.lock().unwrap().iter().cloned());
            }
            if expected.is_empty() {
                bail!("nothing expected: give --prefix and --count, or --expect-job");
            }
            let timeout = Duration::from_secs(timeout_s);
            consume(addr, job, &queue, expected, lanes, timeout).await
        }
        Cmd::Describe { queue } => {
            let mut client = connect(addr).await?;
            let d = client
                .describe(v1::DescribeRequest { queue })
                .await
                .context("describe")?
                .into_inner();
            Ok(json!({
                "partitions": d.partitions, "visibility_timeout_ms": d.visibility_timeout_ms,
                "max_deliveries": d.max_deliveries, "fsync": d.fsync,
            }))
        }
        Cmd::Stats { queue } => {
            let mut client = connect(addr).await?;
            let s = client
                .stats(v1::StatsRequest { queue })
                .await
                .context("stats")?
                .into_inner();
            Ok(json!({
                "ready": s.ready, "in_flight": s.in_flight, "delayed": s.delayed,
                "enqueued_total": s.enqueued_total, "acked_total": s.acked_total,
                "redelivered_total": s.redelivered_total,
            }))
        }
    }
}

/// How a producer spreads its messages: `concurrency` lanes, each sending its next
/// message once the previous one is acknowledged; with `keyed`, a lane is a key.
struct Lanes {
    concurrency: usize,
    keyed: bool,
}

async fn produce(
    addr: &str,
    job: &Job,
    queue: &str,
    count: u64,
    prefix: &str,
    lanes: Lanes,
    retries: u32,
) -> anyhow::Result<Value> {
    let concurrency = lanes.concurrency.max(1) as u64;
    let client = connect(addr).await?;
    let (mut failed, mut errors) = (0u64, 0u64);
    let mut last_error: Option<String> = None;
    // Up to `concurrency` enqueues in flight, driven by this one task.
    let one = |i: u64| {
        let mut client = client.clone();
        async move {
            let body = format!("{prefix}-{i}");
            let key = match lanes.keyed {
                true => format!("{prefix}-k{}", i % concurrency),
                false => String::new(),
            };
            let mut errors = Vec::new();
            let mut last_code = None;
            for attempt in 0..=retries {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let req = v1::EnqueueRequest {
                    queue: queue.to_string(),
                    message: Some(v1::NewMessage {
                        body: body.clone().into_bytes().into(),
                        key: key.clone(),
                        ..Default::default()
                    }),
                    partition: None,
                };
                match client.enqueue(req).await {
                    Ok(_) => return (i, (body, true, errors, last_code)),
                    Err(e) => {
                        errors.push(format!("enqueue {body} (attempt {attempt}): {e}"));
                        last_code = Some(format!("{:?}", e.code()));
                    }
                }
            }
            (i, (body, false, errors, last_code))
        }
    };
    let mut running = futures::stream::FuturesUnordered::new();
    for i in 0..count.min(concurrency) {
        running.push(one(i));
    }
    while let Some((i, (body, ok, errs, code))) = futures::StreamExt::next(&mut running).await {
        for e in errs {
            errors += 1;
            if errors <= 3 {
                eprintln!("{e}");
            }
        }
        last_error = code.or(last_error);
        if ok {
            job.bodies.lock().unwrap().push(body);
            job.acked.fetch_add(1, Ordering::Relaxed);
        } else {
            failed += 1;
        }
        // The lane's next message.
        if i + concurrency < count {
            running.push(one(i + concurrency));
        }
    }
    let acked = job.acked.load(Ordering::Relaxed);
    Ok(json!({"acked": acked, "failed": failed, "errors": errors, "last_error": last_error}))
}

async fn consume(
    addr: &str,
    job: &Job,
    queue: &str,
    expected: HashSet<String>,
    lanes: Option<u64>,
    timeout: Duration,
) -> anyhow::Result<Value> {
    // Per lane, the highest message number delivered so far.
    let mut lane_last: HashMap<(String, u64), u64> = HashMap::new();
    let mut out_of_order = Vec::new();
    let mut client = connect(addr).await?;
    let mut seen: HashSet<String> = HashSet::new();
    let (mut received, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    while !expected.iter().all(|e| seen.contains(e)) && start.elapsed() < timeout {
        let req = v1::DequeueRequest {
            queue: queue.to_string(),
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
            let body = String::from_utf8_lossy(&m.body).to_string();
            if let (Some(n), Some((prefix, i))) = (lanes, body.rsplit_once('-'))
                && let Ok(i) = i.parse::<u64>()
                && !seen.contains(&body)
            {
                let last = lane_last.entry((prefix.to_string(), i % n)).or_insert(i);
                if i < *last {
                    out_of_order.push(format!("{body} after {prefix}-{last}"));
                }
                *last = (*last).max(i);
            }
            seen.insert(body);
        }
        if receipts.is_empty() {
            continue;
        }
        match client
            .ack(v1::AckRequest {
                queue: queue.to_string(),
                receipts,
            })
            .await
        {
            Ok(r) => {
                let n = r
                    .into_inner()
                    .results
                    .iter()
                    .filter(|r| r.code == 0)
                    .count();
                job.acked.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => {
                errors += 1;
                eprintln!("ack: {e}");
            }
        }
    }
    let mut missing: Vec<&String> = expected.iter().filter(|e| !seen.contains(*e)).collect();
    missing.sort();
    Ok(json!({
        "expected": expected.len(), "received": received, "unique": seen.len(),
        "acked": job.acked.load(Ordering::Relaxed), "errors": errors, "missing": missing.len(),
        "missing_sample": missing.iter().take(10).collect::<Vec<_>>(),
        "out_of_order": out_of_order.len(),
        "out_of_order_sample": out_of_order.iter().take(10).collect::<Vec<_>>(),
    }))
}
