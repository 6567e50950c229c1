//! Moving replicated partitions between brokers, live: the queue grows from three
//! brokers to five and back to three while an app keeps enqueueing through the
//! sidecar. The settings carry the operator's placement (`placement`, where copies
//! should be) and the members it last saw committed (`members`); each partition's
//! leader adds the new copies as learners, lets them catch up and swaps the members,
//! and a broker deletes a copy once the settings no longer list it. Shown with real
//! broker processes restarted as a StatefulSet rollout would: every acknowledged
//! message is delivered, per key in order, and moved-off copies leave the volumes;
//! the same when brokers are killed in the middle of a move, and for partitions of
//! one copy, which move the same way (a Raft group of one adds a learner, swaps it
//! in, and steps down).

use sluice_config::placement::rebalance;
use sluice_config::report::{PARTITIONS_PATH, PartitionReport};
use sluice_integration::replicated::{self, Client, QUEUE, drain_through_failovers, enqueue_p0};
use sluice_integration::*;
use sluice_proto::v1;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PARTITIONS: u32 = 6;
const KEYS: usize = 11;

/// Settings over the first `brokers` of `addrs`, with a placement and members
/// (three copies of each partition; [`single`] for one).
fn settings(
    addrs: &[SocketAddr],
    brokers: usize,
    placement: &[Vec<u32>],
    members: &[Vec<u32>],
) -> String {
    with_copies(3, addrs, brokers, placement, members)
}

/// The same for one copy of each partition: a Raft group of one, so it can move.
fn single(
    addrs: &[SocketAddr],
    brokers: usize,
    placement: &[Vec<u32>],
    members: &[Vec<u32>],
) -> String {
    with_copies(1, addrs, brokers, placement, members)
}

fn with_copies(
    copies: u32,
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
replication = {copies}
raft = {raft}
peers = [{peers}]
placement = {placement:?}
members = {members:?}
fsync = "always"
max_deliveries = 1000
visibility_timeout = "5s"
"#,
        raft = copies == 1,
        peers = peers.join(", ")
    )
}

fn formula(brokers: u32) -> Vec<Vec<u32>> {
    with_copies_formula(brokers, 3)
}

fn with_copies_formula(brokers: u32, copies: u32) -> Vec<Vec<u32>> {
    (0..PARTITIONS)
        .map(|p| {
            let mut s = sluice_config::replica_set(p, brokers, copies);
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
        if !done {
            // Shown when the wait times out.
            eprintln!("led so far: {led:?}");
        }
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

/// The answer to an acknowledged enqueue of `m<i>`, if it was.
async fn send(app: &mut Client, i: usize) -> Option<v1::EnqueueResponse> {
    app.enqueue(v1::EnqueueRequest {
        queue: QUEUE.into(),
        message: Some(v1::NewMessage {
            key: format!("k{}", i % KEYS),
            dedup_id: format!("m{i}"),
            ..msg(&format!("m{i}"))
        }),
        partition: None,
    })
    .await
    .ok()
    .map(|r| r.into_inner())
}

/// An app enqueueing keyed messages all along, retrying refusals as apps do (a
/// partition is unavailable for the seconds of an election).
struct Traffic {
    acknowledged: Arc<Mutex<Vec<usize>>>,
    /// What each acknowledged enqueue was answered: where a lost message went.
    answers: Arc<Mutex<BTreeMap<usize, v1::EnqueueResponse>>>,
    stop: Arc<AtomicBool>,
    producer: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(app: &Client) -> Traffic {
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let producer = tokio::spawn({
            let (mut app, acknowledged, answers, stop) = (
                app.clone(),
                acknowledged.clone(),
                answers.clone(),
                stop.clone(),
            );
            async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    if let Some(answer) = send(&mut app, i).await {
                        acknowledged.lock().unwrap().push(i);
                        answers.lock().unwrap().insert(i, answer);
                        i += 1;
                    } else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Traffic {
            acknowledged,
            answers,
            stop,
            producer,
        }
    }

    fn progress(&self, what: &str) -> usize {
        let n = self.acknowledged.lock().unwrap().len();
        eprintln!("{what}: {n} messages acknowledged so far");
        n
    }

    async fn until(&self, n: usize, what: &str) {
        eventually_within(what, Duration::from_secs(60), || async {
            (self.progress(what) >= n).then_some(())
        })
        .await;
    }

    /// Stops the app, then drains the queue: every acknowledged message comes out,
    /// and each key's first deliveries in the order they were enqueued.
    async fn check(self, mut app: Client) {
        self.stop.store(true, Ordering::Relaxed);
        self.producer.await.unwrap();
        let acknowledged: Vec<usize> = self.acknowledged.lock().unwrap().clone();
        let mut got: Vec<usize> = Vec::new();
        // A message whose lease was lost (an ack that failed in a failover) blocks its
        // key until the visibility timeout: drain well past it before calling a
        // message lost.
        let began = std::time::Instant::now();
        while began.elapsed() < Duration::from_secs(60) {
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
        if !lost.is_empty() {
            let answers = self.answers.lock().unwrap();
            let mut by_partition: BTreeMap<u32, Vec<String>> = BTreeMap::new();
            for i in &lost {
                let a = &answers[i];
                by_partition.entry(a.partition).or_default().push(format!(
                    "m{i} {}{}",
                    a.id,
                    if a.duplicate { " (dup)" } else { "" }
                ));
            }
            for (p, lost) in by_partition {
                eprintln!(
                    "lost in partition {p}: {} messages, first {:?}",
                    lost.len(),
                    &lost[..lost.len().min(5)]
                );
            }
        }
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
            if let Some(&before) = last.get(&(i % KEYS)) {
                assert!(before < i, "key k{}: m{i} after m{before}", i % KEYS);
            }
            last.insert(i % KEYS, i);
        }
        eprintln!(
            "{} messages, all delivered in key order",
            acknowledged.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_live_as_the_brokers_grow_from_three_to_five_and_back() {
    let dir = test_dir();
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
    let routes = route(QUEUE, addrs.iter().copied());
    let sidecar = Sidecar::start(dir.path(), &routes).await;
    let app = sidecar.client().await;

    let traffic = Traffic::start(&app);
    traffic.until(200, "before the move").await;

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
    traffic.progress("moved onto five brokers");
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
    traffic.progress("five brokers settled");

    // Back to three: the copies leave brokers 3 and 4 before they stop.
    let back = rebalance(&five, PARTITIONS, 3, 3);
    let toml = settings(&addrs, 5, &back, &five);
    roll(&mut brokers, &[0, 1, 2, 3, 4], &toml).await;
    moved(&brokers, &[0, 1, 2, 3, 4], &back).await;
    traffic.progress("moved back onto three brokers");
    for b in &mut brokers[3..5] {
        b.proc.stop(Duration::from_secs(10));
    }
    let toml = settings(&addrs, 3, &back, &back);
    roll(&mut brokers, &[0, 1, 2], &toml).await;
    for p in 0..PARTITIONS {
        assert_eq!(holders(&brokers, &[0, 1, 2], p), vec![0, 1, 2]);
    }
    let n = traffic.progress("three brokers settled");
    traffic.until(n + 100, "after the moves").await;
    traffic.check(app).await;
}

/// Brokers die in the middle of a move: the new broker is down when the leaders
/// start adding copies on it (they wait for it, retrying), and an old broker is
/// killed (SIGKILL, no goodbye) while groups change members. The move completes
/// once they are back, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_completes_through_brokers_killed_midway() {
    killed_midway(3, 3).await;
}

/// The same with one copy of each partition, two brokers growing to three: the
/// killed old broker held the only copy of its partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_copy_move_completes_through_brokers_killed_midway() {
    killed_midway(1, 2).await;
}

/// `from` brokers holding `copies` copies of each partition grow by one.
async fn killed_midway(copies: u32, from: usize) {
    let dir = test_dir();
    let addrs: Vec<SocketAddr> = (0..=from).map(|_| free_addr()).collect();
    let old = with_copies_formula(from as u32, copies);
    let mut brokers = Vec::new();
    for (i, addr) in addrs.iter().enumerate().take(from) {
        let toml = with_copies(copies, &addrs, from, &old, &old);
        let data = dir.path().join(format!("data-{i}"));
        brokers.push(Broker::start_at(dir.path(), &toml, i as u32, data, *addr, &[]).await);
    }
    let routes = route(QUEUE, addrs.iter().copied());
    let sidecar = Sidecar::start(dir.path(), &routes).await;
    let app = sidecar.client().await;
    let traffic = Traffic::start(&app);
    traffic.until(200, "before the move").await;

    let all: Vec<usize> = (0..=from).collect();
    let new_placement = rebalance(&old, PARTITIONS, from as u32 + 1, copies);
    let toml = with_copies(copies, &addrs, from + 1, &new_placement, &old);
    let data = dir.path().join(format!("data-{from}"));
    let mut new = Broker::start_at(dir.path(), &toml, from as u32, data, addrs[from], &[]).await;
    new.proc.kill();
    brokers.push(new);
    roll(&mut brokers, &all[..from], &toml).await;
    let n = traffic.progress("the old brokers placed copies on a dead one");
    traffic.until(n + 100, "writes go on meanwhile").await;
    brokers[from].restart().await;
    // An old broker crashes while the groups change members.
    brokers[1].proc.kill();
    brokers[1].restart().await;
    moved(&brokers, &all, &new_placement).await;
    let toml = with_copies(copies, &addrs, from + 1, &new_placement, &new_placement);
    roll(&mut brokers, &all, &toml).await;
    for p in 0..PARTITIONS {
        assert_eq!(
            holders(&brokers, &all, p),
            new_placement[p as usize],
            "copies of partition {p}"
        );
    }
    let n = traffic.progress("moved");
    traffic.until(n + 100, "after the move").await;
    traffic.check(app).await;
}

/// One copy of each partition moves as three do: from one broker onto three and
/// back, each partition a Raft group of one that takes the new broker in as a
/// learner and hands over to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_copies_move_from_one_broker_to_three_and_back() {
    let dir = test_dir();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let one = with_copies_formula(1, 1);
    let toml = single(&addrs, 1, &one, &one);
    let data = dir.path().join("data-0");
    let mut brokers = vec![Broker::start_at(dir.path(), &toml, 0, data, addrs[0], &[]).await];
    let routes = route(QUEUE, addrs.iter().copied());
    let sidecar = Sidecar::start(dir.path(), &routes).await;
    let app = sidecar.client().await;
    let traffic = Traffic::start(&app);
    traffic.until(200, "before the move").await;

    // One broker to three: each new broker takes a fair share of the partitions.
    let three = rebalance(&one, PARTITIONS, 3, 1);
    for b in 0..3 {
        assert_eq!(three.iter().filter(|c| c[0] == b).count(), 2, "{three:?}");
    }
    let toml = single(&addrs, 3, &three, &one);
    for (i, &addr) in addrs.iter().enumerate().skip(1) {
        let data = dir.path().join(format!("data-{i}"));
        brokers.push(Broker::start_at(dir.path(), &toml, i as u32, data, addr, &[]).await);
    }
    roll(&mut brokers, &[0], &toml).await;
    moved(&brokers, &[0, 1, 2], &three).await;
    traffic.progress("moved onto three brokers");
    let toml = single(&addrs, 3, &three, &three);
    roll(&mut brokers, &[0, 1, 2], &toml).await;
    for p in 0..PARTITIONS {
        assert_eq!(
            holders(&brokers, &[0, 1, 2], p),
            three[p as usize],
            "the one copy of partition {p}"
        );
    }
    // A group of one reports its leader like any group (what the "no leader" alert
    // reads): each partition led on exactly the broker holding it.
    for p in 0..PARTITIONS {
        eventually_within(
            "one leader per partition",
            Duration::from_secs(20),
            || async {
                let leading: Vec<usize> = (0..3)
                    .filter(|&b| leading_gauge(&brokers[b], p) == Some(1))
                    .collect();
                (leading == [three[p as usize][0] as usize]).then_some(())
            },
        )
        .await;
    }
    let n = traffic.progress("three brokers settled");
    traffic.until(n + 100, "on three brokers").await;

    // Back to one: every copy goes home before brokers 1 and 2 stop.
    let toml = single(&addrs, 3, &one, &three);
    roll(&mut brokers, &[0, 1, 2], &toml).await;
    moved(&brokers, &[0, 1, 2], &one).await;
    for b in &mut brokers[1..3] {
        b.proc.stop(Duration::from_secs(10));
    }
    let toml = single(&addrs, 1, &one, &one);
    roll(&mut brokers, &[0], &toml).await;
    for p in 0..PARTITIONS {
        assert_eq!(holders(&brokers, &[0], p), vec![0]);
    }
    let n = traffic.progress("one broker settled");
    traffic.until(n + 100, "after the moves").await;
    traffic.check(app).await;
}

/// `sluice_partition_leading` of `QUEUE`'s partition `p` on `b`.
fn leading_gauge(b: &Broker, p: u32) -> Option<i64> {
    let (_, body) = http_get(b.metrics, "/metrics");
    let prefix = format!("sluice_partition_leading{{queue=\"{QUEUE}\",partition=\"{p}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
}

/// A copy placed back on a broker its partition once lived on alone replays the
/// group's log from the start, through the membership in which the earlier copy on
/// that broker was the only voter. It must not take that for the present: restarted
/// while the group's leader is away, it stays a learner and takes no writes, and
/// the move completes once the leader is back, with every message kept. (Before
/// copies had ids of their own, such a copy elected itself: two leaders, then a
/// panic in openraft's follower and a move that never ended.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_back_on_its_old_broker_never_leads_on_the_old_membership() {
    let dir = test_dir();
    let addrs: Vec<SocketAddr> = (0..2).map(|_| free_addr()).collect();
    let on = |b: u32| vec![vec![b]; PARTITIONS as usize];
    let data = |b: usize| dir.path().join(format!("data-{b}"));
    let toml = single(&addrs, 2, &on(0), &on(0));
    let mut brokers = vec![Broker::start_at(dir.path(), &toml, 0, data(0), addrs[0], &[]).await];
    let mut sent = HashSet::new();
    for i in 0..50 {
        let body = format!("before-{i}");
        replicated::send(&brokers, &[0], &body).await;
        sent.insert(body);
    }

    // What the copy on broker 0 holds now is what a new copy there replays first.
    let copy0 = data(0).join(QUEUE).join("0");
    let history = dir.path().join("history");
    brokers[0].proc.stop(Duration::from_secs(10));
    copy_files(&copy0, &history);

    // The partition moves to broker 1; broker 0 deletes its copy.
    let toml = single(&addrs, 2, &on(1), &on(0));
    brokers.push(Broker::start_at(dir.path(), &toml, 1, data(1), addrs[1], &[]).await);
    brokers[0].reconfigure(&toml);
    brokers[0].restart().await;
    moved(&brokers, &[0, 1], &on(1)).await;
    roll(&mut brokers, &[0, 1], &single(&addrs, 2, &on(1), &on(1))).await;
    assert!(!copy0.exists(), "broker 0 kept its moved copy");
    for i in 0..50 {
        let body = format!("after-{i}");
        replicated::send(&brokers, &[0, 1], &body).await;
        sent.insert(body);
    }

    // It is placed back on broker 0 while broker 1, the leader, is down: a new copy,
    // which has replayed the log up to the old membership and restarts.
    brokers[1].proc.stop(Duration::from_secs(10));
    let toml = single(&addrs, 2, &on(0), &on(1));
    brokers[0].reconfigure(&toml);
    brokers[0].restart().await;
    assert!(copy0.exists(), "broker 0 opened no copy to join");
    brokers[0].proc.stop(Duration::from_secs(10));
    copy_files(&history, &copy0);
    brokers[0].restart().await;

    // Many election timeouts (0.5–1 s each) pass: a copy that thought itself the only
    // voter would have elected itself and taken this write.
    let mut c = brokers[0].client().await;
    for _ in 0..25 {
        let refused = enqueue_p0(&mut c, "split-brain").await;
        assert!(
            refused.is_err(),
            "broker 0's new copy led on the membership of its predecessor"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // With the leader back the move completes, and nothing was lost.
    brokers[1].reconfigure(&toml);
    brokers[1].restart().await;
    moved(&brokers, &[0, 1], &on(0)).await;
    roll(&mut brokers, &[0, 1], &single(&addrs, 2, &on(0), &on(0))).await;
    assert!(!data(1).join(QUEUE).join("0").exists());
    let got = drain_through_failovers(&mut brokers[0].client().await, 2000).await;
    let bodies: HashSet<String> = got.iter().map(body_str).collect();
    assert_eq!(bodies, sent);
}

/// Copies the files of `from` into `to` (made if missing), replacing those there.
fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let path = e.path();
        if path.is_dir() {
            copy_files(&path, &to.join(e.file_name()));
        } else {
            std::fs::copy(&path, to.join(e.file_name())).unwrap();
        }
    }
}
