//! The kill loop: producers and consumers work through a sidecar while the broker
//! behind it is SIGKILLed and restarted again and again. A checker then proves:
//! - every acknowledged enqueue was delivered at least once;
//! - no message was delivered again after an ack of it had been answered;
//! - no message was invented, and retries with a dedup id never made a second copy;
//! - no call hung.
//!
//! Run twice: over one broker, and over three brokers holding three copies of each
//! partition (a Raft group per partition), where each kill takes a random broker of
//! the three, leader or not.
//!
//! `SLUICE_KILL_LOOPS` sets the number of kills (default 200; the documented longer
//! run in docs/reliability.md uses thousands).

use sluice_integration::*;
use sluice_proto::v1;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const QUEUE: &str = r#"
[[queue]]
name = "kills"
partitions = 4
fsync = "always"
visibility_timeout = "2s"
max_deliveries = 1000000
dedup_window = "1h"
"#;

/// No call may take longer than this; the sidecar must answer, not hang.
const CALL_LIMIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Checker {
    /// A logical clock: orders the events the clients observe.
    clock: AtomicU64,
    attempted: Mutex<HashSet<String>>,
    acknowledged: Mutex<HashSet<String>>,
    /// (body, message id, clock when the Dequeue that brought it was sent)
    deliveries: Mutex<Vec<(String, String, u64)>>,
    /// body -> clock when the first successful ack of it was answered
    settled: Mutex<HashMap<String, u64>>,
    hung: AtomicU64,
    enqueue_errors: AtomicU64,
    ack_failures: AtomicU64,
}

impl Checker {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// Every acknowledged enqueue has been delivered.
    fn all_delivered(&self) -> bool {
        let acknowledged = self.acknowledged.lock().unwrap();
        let deliveries = self.deliveries.lock().unwrap();
        let delivered: HashSet<&str> = deliveries.iter().map(|d| d.0.as_str()).collect();
        acknowledged.iter().all(|b| delivered.contains(b.as_str()))
    }
}

/// How long the drain may look for acknowledged messages not yet delivered, after
/// the queue first looks empty: a partition may be between leaders for a few seconds
/// after the last kill, and a message whose lease was lost comes back after the
/// visibility timeout. Only what is still missing after this counts as lost.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

async fn limited<T>(
    checker: &Checker,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(CALL_LIMIT, call).await {
        Ok(r) => r,
        Err(_) => {
            checker.hung.fetch_add(1, Ordering::Relaxed);
            Err(tonic::Status::deadline_exceeded("call hung"))
        }
    }
}

async fn produce(
    mut c: sluice_proto::v1::queues_client::QueuesClient<tonic::transport::Channel>,
    checker: Arc<Checker>,
    stop: Arc<AtomicBool>,
    p: usize,
) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let body = format!("p{p}-{i}");
        checker.attempted.lock().unwrap().insert(body.clone());
        // Retry the same message (same dedup id) until it is acknowledged.
        loop {
            let mut m = msg(&body);
            m.dedup_id = body.clone();
            match limited(&checker, enqueue(&mut c, "kills", m)).await {
                Ok(_) => {
                    checker.acknowledged.lock().unwrap().insert(body.clone());
                    break;
                }
                Err(_) => {
                    checker.enqueue_errors.fetch_add(1, Ordering::Relaxed);
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        i += 1;
    }
}

/// Dequeues and acks until `stop`, then until every acknowledged message came out (or
/// [`DRAIN_LIMIT`] passed), ending at an answer empty after `quiet_ms`.
async fn consume(
    mut c: sluice_proto::v1::queues_client::QueuesClient<tonic::transport::Channel>,
    checker: Arc<Checker>,
    stop: Arc<AtomicBool>,
    quiet_ms: u64,
) {
    let mut drain_began: Option<std::time::Instant> = None;
    loop {
        let sent = checker.tick();
        let got = limited(
            &checker,
            c.dequeue(v1::DequeueRequest {
                queue: "kills".into(),
                max_messages: 64,
                wait_ms: if stop.load(Ordering::Relaxed) {
                    quiet_ms
                } else {
                    100
                },
                visibility_timeout_ms: 0,
            }),
        )
        .await;
        let messages = match got {
            Ok(r) => r.into_inner().messages,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if messages.is_empty() && stop.load(Ordering::Relaxed) {
            let began = *drain_began.get_or_insert_with(std::time::Instant::now);
            if checker.all_delivered() || began.elapsed() > DRAIN_LIMIT {
                return;
            }
            continue;
        }
        {
            let mut d = checker.deliveries.lock().unwrap();
            for m in &messages {
                d.push((body_str(m), m.id.clone(), sent));
            }
        }
        let receipts: Vec<String> = messages.iter().map(|m| m.receipt.clone()).collect();
        let acked = limited(
            &checker,
            c.ack(v1::AckRequest {
                queue: "kills".into(),
                receipts,
            }),
        )
        .await;
        let answered = checker.tick();
        match acked {
            Ok(r) => {
                let mut settled = checker.settled.lock().unwrap();
                for (m, r) in messages.iter().zip(r.into_inner().results) {
                    if r.code == 0 {
                        settled.entry(body_str(m)).or_insert(answered);
                    } else {
                        checker.ack_failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(_) => {
                checker
                    .ack_failures
                    .fetch_add(messages.len() as u64, Ordering::Relaxed);
            }
        }
    }
}

/// A small xorshift: the kill timing only needs to vary, not be unpredictable.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_loop_loses_nothing_acknowledged_and_resurrects_nothing_acked() {
    kill_loop(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicated_kill_loop_loses_nothing_when_any_of_three_brokers_dies() {
    kill_loop(3).await;
}

async fn kill_loop(n: usize) {
    let kills: u32 = std::env::var("SLUICE_KILL_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        // A replicated kill may cost an election (about a second): fewer by default.
        .unwrap_or(if n == 1 { 200 } else { 100 });
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<std::net::SocketAddr> = (0..n).map(|_| free_addr()).collect();
    let settings = match n {
        1 => QUEUE.to_string(),
        _ => format!(
            "{QUEUE}replicas = {n}\nreplication = {n}\npeers = [{}]\n",
            addrs
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut brokers = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let data = dir.path().join(format!("data-{i}"));
        brokers.push(Broker::start_at(dir.path(), &settings, i as u32, data, *addr, &[]).await);
    }
    let routes: Vec<String> = brokers.iter().map(|b| b.addr.to_string()).collect();
    let sidecar = Sidecar::start(dir.path(), &format!("kills={}", routes.join(","))).await;
    let checker = Arc::new(Checker::default());
    let stop = Arc::new(AtomicBool::new(false));

    let mut tasks = Vec::new();
    for p in 0..4 {
        tasks.push(tokio::spawn(produce(
            sidecar.client().await,
            checker.clone(),
            stop.clone(),
            p,
        )));
    }
    let drain = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for _ in 0..2 {
        consumers.push(tokio::spawn(consume(
            sidecar.client().await,
            checker.clone(),
            drain.clone(),
            // Long enough to outlast an election the last kill may have started.
            if n == 1 { 1500 } else { 5000 },
        )));
    }

    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    for k in 0..kills {
        // Let some traffic through, then pull the plug mid-stream.
        let before = checker.acknowledged.lock().unwrap().len();
        tokio::time::sleep(Duration::from_millis(10 + next_random(&mut rng) % 120)).await;
        eventually_within(
            &format!("traffic before kill {k}"),
            Duration::from_secs(60),
            || {
                let n = checker.acknowledged.lock().unwrap().len();
                async move { (n > before).then_some(()) }
            },
        )
        .await;
        let broker = &mut brokers[next_random(&mut rng) as usize % n];
        broker.proc.kill();
        // Sometimes stay down a while: calls meanwhile must fail, not hang.
        if next_random(&mut rng).is_multiple_of(8) {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        broker.restart().await;
        if k.is_multiple_of(25) {
            eprintln!(
                "kill {k}: acknowledged {}, deliveries {}",
                checker.acknowledged.lock().unwrap().len(),
                checker.deliveries.lock().unwrap().len()
            );
        }
    }
    eprintln!("kills done; draining");

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    // Only now may an empty answer end the drain: an enqueue still in flight when
    // `stop` was set (the sidecar waits out an election) lands after it.
    drain.store(true, Ordering::Relaxed);
    for t in consumers {
        t.await.unwrap();
    }

    let attempted = checker.attempted.lock().unwrap();
    let acknowledged = checker.acknowledged.lock().unwrap();
    let deliveries = checker.deliveries.lock().unwrap();
    let settled = checker.settled.lock().unwrap();
    let delivered: HashSet<&str> = deliveries.iter().map(|d| d.0.as_str()).collect();
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|b| !delivered.contains(b.as_str()))
        .collect();
    let resurrected: Vec<&(String, String, u64)> = deliveries
        .iter()
        .filter(|(body, _, sent)| settled.get(body).is_some_and(|acked| acked < sent))
        .collect();
    let invented: Vec<&str> = delivered
        .iter()
        .filter(|b| !attempted.contains(**b))
        .copied()
        .collect();
    let mut ids: HashMap<&str, HashSet<&str>> = HashMap::new();
    for (body, id, _) in deliveries.iter() {
        ids.entry(body).or_default().insert(id);
    }
    let duplicated: Vec<(&str, usize)> = ids
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(b, ids)| (*b, ids.len()))
        .collect();
    println!(
        "brokers {n}, kills {kills}; enqueues attempted {}, acknowledged {}, failed calls retried {}; \
         deliveries {} of {} distinct messages; acks answered {} (failed {}); \
         lost {}, delivered after their ack {}, invented {}, duplicate enqueues {}, hung calls {}",
        attempted.len(),
        acknowledged.len(),
        checker.enqueue_errors.load(Ordering::Relaxed),
        deliveries.len(),
        delivered.len(),
        settled.len(),
        checker.ack_failures.load(Ordering::Relaxed),
        lost.len(),
        resurrected.len(),
        invented.len(),
        duplicated.len(),
        checker.hung.load(Ordering::Relaxed),
    );
    let failed = !lost.is_empty()
        || !resurrected.is_empty()
        || !invented.is_empty()
        || !duplicated.is_empty()
        || checker.hung.load(Ordering::Relaxed) > 0;
    if failed {
        // The brokers' and sidecar's logs are what tells why: keep them.
        eprintln!("process logs kept in {}", dir.keep().display());
    }
    assert!(
        acknowledged.len() as u32 >= kills,
        "too little traffic to prove anything"
    );
    assert!(
        lost.is_empty(),
        "acknowledged enqueues never delivered: {:?}",
        &lost[..lost.len().min(10)]
    );
    assert!(
        resurrected.is_empty(),
        "delivered after an ack of it was answered: {:?}",
        &resurrected[..resurrected.len().min(10)]
    );
    assert!(invented.is_empty(), "invented messages: {invented:?}");
    assert!(
        duplicated.is_empty(),
        "a retry with a dedup id made a second copy: {:?}",
        &duplicated[..duplicated.len().min(10)]
    );
    assert_eq!(checker.hung.load(Ordering::Relaxed), 0, "calls hung");
    drop(sidecar);
}
