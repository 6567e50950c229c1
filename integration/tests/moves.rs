//! Moving replicated partitions between brokers, live: the queue grows from three
//! brokers to five and back to three while an app keeps enqueueing through the
//! sidecar. The settings carry the operator's placement (`placement`, where copies
//! should be) and the members it last saw committed (`members`); each partition's
//! leader adds the new copies as learners, lets them catch up and swaps the members,
//! and a broker deletes a copy once the settings no longer list it. Shown with real
//! broker processes restarted as a StatefulSet rollout would: every acknowledged
//! message is delivered, per key in order, and moved-off copies leave the volumes.

use sluice_config::placement::rebalance;
use sluice_config::report::{PARTITIONS_PATH, PartitionReport};
use sluice_integration::replicated::{Client, QUEUE, drain_through_failovers};
use sluice_integration::*;
use sluice_proto::v1;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PARTITIONS: u32 = 6;

/// Settings over the first `brokers` of `addrs`, with a placement and members.
fn settings(
    addrs: &[SocketAddr],
    brokers: usize,
    placement: &[Vec<u32>],
    members: &[Vec<u32>],
) -> String {
    let peers: Vec<String> = addrs[..brokers]
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect();
    format!(
        r#"
[[queue]]
name = "{QUEUE}"
partitions = {PARTITIONS}
replicas = {brokers}
replication = 3
peers = [{peers}]
placement = {placement:?}
members = {members:?}
fsync = "always"
max_deliveries = 1000
"#,
        peers = peers.join(", ")
    )
}

fn formula(brokers: u32) -> Vec<Vec<u32>> {
    (0..PARTITIONS)
        .map(|p| {
            let mut s = sluice_config::replica_set(p, brokers, 3);
            s.sort_unstable();
            s
        })
        .collect()
}

/// Restarts each running broker with `toml`, one at a time, as a rollout does.
async fn roll(brokers: &mut [Broker], running: &[usize], toml: &str) {
    for &i in running {
        brokers[i].reconfigure(toml);
        brokers[i].proc.stop(Duration::from_secs(10));
        brokers[i].restart().await;
    }
}

/// Waits until every partition of the queue and of its dead-letter queue has a
/// leader whose committed members are `placement`.
async fn moved(brokers: &[Broker], running: &[usize], placement: &[Vec<u32>]) {
    eventually_within("the copies moved", Duration::from_secs(120), || async {
        let mut led: BTreeMap<(String, u32), Vec<u32>> = BTreeMap::new();
        for &i in running {
            let (status, body) = http_get(brokers[i].metrics, PARTITIONS_PATH);
            if status != 200 {
                continue;
            }
            let reports: Vec<PartitionReport> = serde_json::from_str(&body).unwrap();
            for r in reports {
                if let Some(m) = r.members {
                    led.insert((r.queue, r.partition), m);
                }
            }
        }
        let done = [QUEUE.to_string(), format!("{QUEUE}.dlq")].iter().all(|q| {
            (0..PARTITIONS).all(|p| led.get(&(q.clone(), p)) == Some(&placement[p as usize]))
        });
        done.then_some(())
    })
    .await;
}

/// Partition copies present on a broker's volume.
fn copies_on(b: &Broker) -> HashSet<u32> {
    std::fs::read_dir(b.data_dir.join(QUEUE))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn holders(brokers: &[Broker], running: &[usize], p: u32) -> Vec<u32> {
    running
        .iter()
        .filter(|&&i| copies_on(&brokers[i]).contains(&p))
        .map(|&i| i as u32)
        .collect()
}

async fn send(app: &mut Client, i: usize) -> bool {
    app.enqueue(v1::EnqueueRequest {
        queue: QUEUE.into(),
        message: Some(v1::NewMessage {
            key: format!("k{}", i % 11),
            dedup_id: format!("m{i}"),
            ..msg(&format!("m{i}"))
        }),
        partition: None,
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_live_as_the_brokers_grow_from_three_to_five_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<SocketAddr> = (0..5).map(|_| free_addr()).collect();
    let three = formula(3);
    let mut brokers = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let toml = settings(&addrs, 3, &three, &three);
        let data = dir.path().join(format!("data-{i}"));
        let b = if i < 3 {
            Broker::start_at(dir.path(), &toml, i as u32, data, *addr, &[]).await
        } else {
            // Not started yet: scaled up later.
            let mut b = Broker::start_at(dir.path(), &toml, i as u32, data, *addr, &[]).await;
            b.proc.stop(Duration::from_secs(10));
            b
        };
        brokers.push(b);
    }
    let routes = format!(
        "{QUEUE}={}",
        addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let sidecar = Sidecar::start(dir.path(), &routes).await;
    let app = sidecar.client().await;

    // The app enqueues keyed messages all along, retrying refusals as apps do
    // (a partition is unavailable for the seconds of an election).
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = tokio::spawn({
        let (mut app, acknowledged, stop) = (app.clone(), acknowledged.clone(), stop.clone());
        async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if send(&mut app, i).await {
                    acknowledged.lock().unwrap().push(i);
                    i += 1;
                } else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            i
        }
    });
    let progress = |what: &str| {
        let n = acknowledged.lock().unwrap().len();
        eprintln!("{what}: {n} messages acknowledged so far");
        n
    };
    eventually_within(
        "enqueues before the move",
        Duration::from_secs(30),
        || async { (progress("starting") >= 200).then_some(()) },
    )
    .await;

    // Three brokers to five: the two new ones take a fair share of the copies.
    let five = rebalance(&three, PARTITIONS, 5, 3);
    assert_ne!(five, three);
    let toml = settings(&addrs, 5, &five, &three);
    for b in &mut brokers[3..5] {
        b.reconfigure(&toml);
        b.restart().await;
    }
    roll(&mut brokers, &[0, 1, 2], &toml).await;
    moved(&brokers, &[0, 1, 2, 3, 4], &five).await;
    progress("moved onto five brokers");
    // The operator saw it done: members follow, and moved-off copies are deleted.
    let toml = settings(&addrs, 5, &five, &five);
    roll(&mut brokers, &[0, 1, 2, 3, 4], &toml).await;
    for p in 0..PARTITIONS {
        assert_eq!(
            holders(&brokers, &[0, 1, 2, 3, 4], p),
            five[p as usize],
            "copies of partition {p}"
        );
    }
    progress("five brokers settled");

    // Back to three: the copies leave brokers 3 and 4 before they stop.
    let back = rebalance(&five, PARTITIONS, 3, 3);
    let toml = settings(&addrs, 5, &back, &five);
    roll(&mut brokers, &[0, 1, 2, 3, 4], &toml).await;
    moved(&brokers, &[0, 1, 2, 3, 4], &back).await;
    progress("moved back onto three brokers");
    for b in &mut brokers[3..5] {
        b.proc.stop(Duration::from_secs(10));
    }
    let toml = settings(&addrs, 3, &back, &back);
    roll(&mut brokers, &[0, 1, 2], &toml).await;
    for p in 0..PARTITIONS {
        assert_eq!(holders(&brokers, &[0, 1, 2], p), vec![0, 1, 2]);
    }
    let before_stop = progress("three brokers settled");
    eventually_within(
        "enqueues after the moves",
        Duration::from_secs(30),
        || async { (progress("after") >= before_stop + 100).then_some(()) },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    producer.await.unwrap();

    // Every acknowledged message comes out, in order per key.
    let acknowledged: Vec<usize> = acknowledged.lock().unwrap().clone();
    let mut app = app;
    let mut got: Vec<usize> = Vec::new();
    for _ in 0..10 {
        got.extend(
            drain_through_failovers(&mut app, 1500)
                .await
                .iter()
                .map(|m| body_str(m)[1..].parse::<usize>().unwrap()),
        );
        let seen: HashSet<usize> = got.iter().copied().collect();
        if acknowledged.iter().all(|i| seen.contains(i)) {
            break;
        }
    }
    let seen: HashSet<usize> = got.iter().copied().collect();
    let lost: Vec<_> = acknowledged.iter().filter(|i| !seen.contains(i)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost: {lost:?}",
        lost.len()
    );
    let mut last: BTreeMap<usize, usize> = BTreeMap::new();
    let mut first_seen = HashSet::new();
    for i in got {
        if !first_seen.insert(i) {
            continue;
        }
        if let Some(&before) = last.get(&(i % 11)) {
            assert!(before < i, "key k{}: m{i} after m{before}", i % 11);
        }
        last.insert(i % 11, i);
    }
    eprintln!(
        "{} messages, all delivered in key order",
        acknowledged.len()
    );
}
