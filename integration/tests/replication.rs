//! Replicated partitions: three broker processes hold three copies of each partition
//! (a Raft group per partition). What is shown, with real processes over loopback:
//! - a write is answered by the partition's leader only; the others point to it;
//! - SIGKILL of the leader: another copy takes over within seconds, with every
//!   acknowledged enqueue and none of the acknowledged acks lost;
//! - a copy that was down catches up, and a copy whose volume was wiped (a follower,
//!   then the former leader) is rebuilt from its peers (from the snapshot at the
//!   floor and the entries after it), so that it alone can later carry the
//!   acknowledged messages into a new majority.

use sluice_config::report::{PARTITIONS_PATH, PartitionReport};
use sluice_integration::replicated::*;
use sluice_integration::*;
use sluice_proto::v1;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// The queue over `addrs`, with `extra` settings lines.
fn settings(addrs: &[SocketAddr], partitions: u32, extra: &str) -> String {
    let peers: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"
[[queue]]
name = "{QUEUE}"
partitions = {partitions}
replicas = {n}
replication = 3
peers = [{peers}]
fsync = "always"
visibility_timeout = "30s"
max_deliveries = 1000
{extra}
"#,
        n = addrs.len(),
        peers = peers.join(", ")
    )
}

async fn start_three(dir: &Path, partitions: u32, extra: &str) -> Vec<Broker> {
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let toml = settings(&addrs, partitions, extra);
    let mut brokers = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let data = dir.join(format!("data-{i}"));
        brokers.push(Broker::start_at(dir, &toml, i as u32, data, *addr, &[]).await);
    }
    brokers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_message_and_another_copy_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let mut brokers = start_three(dir.path(), 1, "").await;
    let all = [0, 1, 2];

    // 300 acknowledged enqueues; about 100 are then taken and acked.
    for i in 0..300 {
        send(&brokers, &all, &format!("m{i}")).await;
    }
    let acked = take_and_ack(&brokers, &all, 100).await.acked;
    assert!(acked.len() >= 100, "{}", acked.len());

    // A follower refuses writes and names the leader.
    let (l, refused) = eventually_within("a settled leader", Duration::from_secs(30), || async {
        let l = leader(&brokers, &all).await;
        let f = all.iter().copied().find(|&i| i != l).unwrap();
        let refused = enqueue_p0(&mut brokers[f].client().await, "to-a-follower")
            .await
            .unwrap_err();
        let hint = refused.metadata().get("sluice-leader")?.to_str().ok()?;
        (hint == l.to_string()).then_some((l, refused))
    })
    .await;
    assert_eq!(refused.code(), tonic::Code::Unavailable);

    brokers[l].proc.kill();
    let killed = Instant::now();
    let rest: Vec<usize> = all.iter().copied().filter(|&i| i != l).collect();
    let l2 = leader(&brokers, &rest).await;
    eprintln!(
        "failover: a new leader took writes {:?} after the kill",
        killed.elapsed()
    );
    assert_ne!(l2, l);

    let left = take_and_ack(&brokers, &rest, 0).await.delivered;
    let expected: HashSet<String> = (0..300)
        .map(|i| format!("m{i}"))
        .filter(|b| !acked.contains(b))
        .collect();
    let lost: Vec<_> = expected.difference(&left).collect();
    let again: Vec<_> = left.intersection(&acked).collect();
    let invented: Vec<_> = left.difference(&expected).collect();
    assert!(lost.is_empty(), "acknowledged enqueues lost: {lost:?}");
    assert!(
        again.is_empty(),
        "acked messages delivered again: {again:?}"
    );
    assert!(
        invented.is_empty(),
        "messages nobody enqueued: {invented:?}"
    );

    // The killed broker comes back as a follower and catches up; then the second
    // leader dies too, and the two left must still hold everything acknowledged.
    brokers[l].restart().await;
    for i in 300..400 {
        send(&brokers, &all, &format!("m{i}")).await;
    }
    let l2 = leader(&brokers, &all).await;
    brokers[l2].proc.kill();
    let rest: Vec<usize> = all.iter().copied().filter(|&i| i != l2).collect();
    let left = take_and_ack(&brokers, &rest, 0).await.delivered;
    let expected: HashSet<String> = (300..400).map(|i| format!("m{i}")).collect();
    assert_eq!(left, expected, "after the second failover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_with_a_wiped_volume_is_rebuilt_from_its_peers() {
    let dir = tempfile::tempdir().unwrap();
    // Deduplication keeps a message's segment until its window passes: a short one,
    // so that settled segments go while the test runs.
    let mut brokers = start_three(dir.path(), 1, "dedup_window = \"1s\"").await;
    let all = [0, 1, 2];

    // Enough settled traffic to move the floor past many segments (64 KiB each in
    // the tests): the early entries are purged everywhere, so a copy starting from
    // nothing needs the snapshot.
    let body = "x".repeat(2000);
    for round in 0..10 {
        for i in 0..40 {
            send(&brokers, &all, &format!("settled-{round}-{i}-{body}")).await;
        }
        let taken = take_and_ack(&brokers, &all, 40).await;
        assert_eq!(taken.acked.len(), 40);
    }
    // A send retried across an election can outlive the 1 s dedup window and leave
    // a second copy (at least once): settle whatever is left before going on.
    take_and_ack(&brokers, &all, 0).await;
    for i in 0..50 {
        send(&brokers, &all, &format!("kept-{i}")).await;
    }
    let l = leader(&brokers, &all).await;

    // Wipe a follower's volume and start it again: it knows nothing.
    let f = all.iter().copied().find(|&i| i != l).unwrap();
    let g = all.iter().copied().find(|&i| i != l && i != f).unwrap();
    brokers[f].proc.kill();
    std::fs::remove_dir_all(&brokers[f].data_dir).unwrap();
    brokers[f].restart().await;

    // With the other follower down, every write needs the wiped copy: it must have
    // been brought up to date to take part.
    brokers[g].proc.kill();
    for i in 50..80 {
        send(&brokers, &[l, f], &format!("kept-{i}")).await;
    }
    // The leader had purged the start of its log, so the wiped copy can only have
    // come back through the snapshot.
    let partition = |b: usize| brokers[b].data_dir.join(QUEUE).join("0");
    assert!(
        !partition(l).join(format!("{:020}.log", 0)).exists(),
        "the leader still holds its first segment: nothing was purged ({:?})",
        std::fs::read_dir(partition(l))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>()
    );
    assert!(partition(f).join("raft.snapshot").exists());
    // Now the leader dies; the rebuilt copy and the other follower (back, but
    // without the last 30) elect a leader, which must be the rebuilt copy's data.
    brokers[l].proc.kill();
    brokers[g].restart().await;
    let left = take_and_ack(&brokers, &[f, g], 0).await.delivered;
    let expected: HashSet<String> = (0..80).map(|i| format!("kept-{i}")).collect();
    assert_eq!(left, expected);

    // The old leader's volume is lost too: it comes back empty and is rebuilt the
    // same way. With the other follower down, the next writes need it.
    std::fs::remove_dir_all(&brokers[l].data_dir).unwrap();
    brokers[l].restart().await;
    let now = leader(&brokers, &[f, g]).await;
    let other = if now == f { g } else { f };
    brokers[other].proc.kill();
    for i in 0..20 {
        send(&brokers, &[l, now], &format!("late-{i}")).await;
    }
    // The leader dies; the rebuilt former leader and the copy that was down carry
    // on: exactly the late messages are left (everything before was acked).
    brokers[now].proc.kill();
    brokers[other].restart().await;
    let left = take_and_ack(&brokers, &[l, other], 0).await.delivered;
    let expected: HashSet<String> = (0..20).map(|i| format!("late-{i}")).collect();
    assert_eq!(left, expected);
}

/// The brokers' metrics say which copy leads each replicated partition and, on the
/// leader, how many copies hold everything: three, then two while one is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_the_partition_report_show_the_leader_and_its_copies_in_sync() {
    let dir = tempfile::tempdir().unwrap();
    let mut brokers = start_three(dir.path(), 1, "").await;
    let all = [0, 1, 2];
    send(&brokers, &all, "m").await;
    let l = leader(&brokers, &all).await;
    let gauge = |b: &Broker, name: &str| -> Option<i64> {
        let (_, body) = http_get(b.metrics, "/metrics");
        let prefix = format!("{name}{{queue=\"{QUEUE}\",partition=\"0\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.trim().parse().unwrap())
    };
    let in_sync = |b: &Broker, want: i64| {
        let got = gauge(b, "sluice_partition_copies_in_sync");
        async move { (got == Some(want)).then_some(()) }
    };
    eventually_within("three copies in sync", Duration::from_secs(20), || {
        in_sync(&brokers[l], 3)
    })
    .await;
    for (i, b) in brokers.iter().enumerate() {
        let leading = gauge(b, "sluice_partition_leading");
        assert_eq!(leading, Some(i64::from(i == l)), "broker {i}");
        if i != l {
            assert_eq!(gauge(b, "sluice_partition_copies_in_sync"), None);
        }
        // The report the operator reads: every copy of partition 0 says its role.
        let (status, body) = http_get(b.metrics, PARTITIONS_PATH);
        assert_eq!(status, 200, "{body}");
        let reports: Vec<PartitionReport> = serde_json::from_str(&body).unwrap();
        let p0 = reports
            .iter()
            .find(|r| r.queue == QUEUE && r.partition == 0)
            .unwrap_or_else(|| panic!("broker {i} reports partition 0: {body}"));
        assert_eq!(
            (p0.copies, p0.leader, p0.in_sync),
            (3, i == l, (i == l).then_some(3)),
            "broker {i}: {body}"
        );
        assert!(p0.term > 0, "{body}");
        // The leader says what the partition holds ("m" and the leader's probe),
        // and since when its oldest ready message waits; followers say nothing.
        match p0.depth {
            Some(d) if i == l => {
                assert_eq!((d.ready, d.in_flight, d.delayed), (2, 0, 0), "{body}");
                let oldest = d.oldest_ready_ms.expect("a ready message has an age");
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64;
                assert!(oldest <= now && oldest + 120_000 > now, "{oldest} {now}");
            }
            None if i != l => {}
            other => panic!("broker {i} (leader {l}) reports depth {other:?}"),
        }
    }
    let (_, body) = http_get(brokers[l].metrics, "/metrics");
    let age_line =
        format!("sluice_queue_oldest_ready_age_seconds{{queue=\"{QUEUE}\",partition=\"0\"}} ");
    let age: f64 = body
        .lines()
        .find_map(|line| line.strip_prefix(&age_line))
        .unwrap_or_else(|| panic!("no oldest age in {body}"))
        .trim()
        .parse()
        .unwrap();
    assert!(age >= 0.0, "{age}");
    // A delivery takes one out of ready.
    let mut c = brokers[l].client().await;
    let got = c
        .dequeue(v1::DequeueRequest {
            queue: QUEUE.into(),
            max_messages: 1,
            wait_ms: 1000,
            visibility_timeout_ms: 60_000,
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(got.len(), 1);
    let (_, body) = http_get(brokers[l].metrics, PARTITIONS_PATH);
    let reports: Vec<PartitionReport> = serde_json::from_str(&body).unwrap();
    let d = reports
        .iter()
        .find(|r| r.queue == QUEUE && r.partition == 0)
        .and_then(|r| r.depth)
        .unwrap();
    assert_eq!((d.ready, d.in_flight), (1, 1), "{body}");

    let f = all.iter().copied().find(|&i| i != l).unwrap();
    brokers[f].proc.kill();
    send(&brokers, &[l], "n").await;
    eventually_within("two copies in sync", Duration::from_secs(20), || {
        in_sync(&brokers[l], 2)
    })
    .await;
    brokers[f].restart().await;
    eventually_within("three again", Duration::from_secs(20), || {
        in_sync(&brokers[l], 3)
    })
    .await;
}

/// Through the sidecar, keyed messages (one partition each) go to whichever broker
/// leads their partition; when that leader dies, the sidecar finds the new one and
/// the app's writes go on. Every acknowledged message is then delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_follows_partition_leaders_across_a_failover() {
    let dir = tempfile::tempdir().unwrap();
    let mut brokers = start_three(dir.path(), 3, "").await;
    let routes = route(QUEUE, brokers.iter().map(|b| b.addr));
    let sidecar = Sidecar::start(dir.path(), &routes).await;
    let mut app = sidecar.client().await;
    let keyed = |i: usize| v1::NewMessage {
        key: format!("k{}", i % 7),
        dedup_id: format!("s{i}"),
        ..msg(&format!("s{i}"))
    };
    // Until every partition has a leader, writes may be refused: retry like an app.
    let mut acknowledged = HashSet::new();
    async fn send(app: &mut Client, m: v1::NewMessage) -> bool {
        app.enqueue(v1::EnqueueRequest {
            queue: QUEUE.into(),
            message: Some(m),
            partition: None,
        })
        .await
        .is_ok()
    }
    // Retries like an app until the enqueue is acknowledged.
    async fn send_until_acknowledged(app: &Client, m: v1::NewMessage, what: &str) {
        eventually_within(what, Duration::from_secs(30), || {
            let (mut app, m) = (app.clone(), m.clone());
            async move { send(&mut app, m).await.then_some(()) }
        })
        .await;
    }
    for i in 0..100 {
        send_until_acknowledged(&app, keyed(i), "an enqueue through the sidecar").await;
        acknowledged.insert(format!("s{i}"));
    }
    // Kill the broker leading partition 0; writes to every key go on.
    let l = leader(&brokers, &[0, 1, 2]).await;
    brokers[l].proc.kill();
    let mut refused = 0;
    for i in 100..200 {
        let m = keyed(i);
        if send(&mut app, m.clone()).await {
            acknowledged.insert(format!("s{i}"));
        } else {
            refused += 1;
            send_until_acknowledged(&app, m, "an enqueue after the failover").await;
            acknowledged.insert(format!("s{i}"));
        }
    }
    eprintln!(
        "{refused} of 100 enqueues after the leader's death were refused and retried by the app"
    );
    // Drained and acked through the sidecar, over as many rounds as it takes for
    // every partition to have a leader again.
    let mut got = HashSet::new();
    let start = Instant::now();
    while !acknowledged.is_subset(&got) && start.elapsed() < Duration::from_secs(60) {
        got.extend(
            drain_through_failovers(&mut app, 1500)
                .await
                .iter()
                .map(body_str)
                .filter(|b| !b.starts_with("probe-")),
        );
    }
    let lost: Vec<_> = acknowledged.difference(&got).collect();
    let invented: Vec<_> = got.difference(&acknowledged).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but never delivered: {lost:?}"
    );
    assert!(invented.is_empty(), "{invented:?}");
}

/// A keyless enqueue sent while no partition has a leader yet (here: one broker of
/// three is up, so no group has a majority) waits for an election instead of
/// failing: the app sees a queue's first seconds, or a failover, as latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_enqueue_waits_for_the_first_leader_through_the_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let toml = settings(&addrs, 2, "");
    let start = |i: usize| {
        let (dir, toml, addr) = (dir.path().to_path_buf(), toml.clone(), addrs[i]);
        async move {
            let data = dir.join(format!("data-{i}"));
            Broker::start_at(&dir, &toml, i as u32, data, addr, &[]).await
        }
    };
    let first = start(0).await;
    let routes = route(QUEUE, addrs.iter().copied());
    let sidecar = Sidecar::start(dir.path(), &routes).await;
    let mut app = sidecar.client().await;
    // The sidecar knows the queue (broker 0 describes it) but no partition is led.
    eventually_within("the sidecar to be ready", Duration::from_secs(30), || {
        let ready = http_get(sidecar.metrics, "/readyz").0 == 200;
        async move { ready.then_some(()) }
    })
    .await;
    let sent = tokio::spawn(async move {
        app.enqueue(v1::EnqueueRequest {
            queue: QUEUE.into(),
            message: Some(msg("first")),
            partition: None,
        })
        .await
    });
    let others = [start(1).await, start(2).await];
    let answer = sent.await.unwrap();
    assert!(answer.is_ok(), "the enqueue was refused: {answer:?}");
    let mut app = sidecar.client().await;
    let got: Vec<String> = drain_through_failovers(&mut app, 500)
        .await
        .iter()
        .map(body_str)
        .filter(|b| !b.starts_with("probe-"))
        .collect();
    assert_eq!(got, ["first"]);
    drop((first, others));
}
