//! Crashes: SIGKILL while acknowledged enqueues stream in, acks that must stay
//! settled, and a torn log tail.

use sluice_integration::*;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const QUEUE: &str = r#"
[[queue]]
name = "durable"
partitions = 2
fsync = "always"
"#;

#[tokio::test]
async fn sigkill_never_loses_an_acknowledged_enqueue() {
    sigkill_mid_stream_loses_nothing_acknowledged(QUEUE).await;
}

/// Under `fsync = "interval"` an enqueue is answered once written to the OS (by the
/// calling thread, not the log's writer thread): a process crash loses none of them.
#[tokio::test]
async fn sigkill_under_interval_fsync_never_loses_an_acknowledged_enqueue() {
    sigkill_mid_stream_loses_nothing_acknowledged(&QUEUE.replace("\"always\"", "\"interval\""))
        .await;
}

/// 8 producers stream enqueues; the broker is SIGKILLed mid-stream three times;
/// every acknowledged body is delivered afterwards.
async fn sigkill_mid_stream_loses_nothing_acknowledged(queue: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Broker::start(dir.path(), queue, 0).await;
    let acked: Arc<Mutex<HashSet<String>>> = Default::default();
    for round in 0..3 {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut producers = Vec::new();
        for p in 0..8 {
            let (acked, stop) = (acked.clone(), stop.clone());
            let mut c = b.client().await;
            producers.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let body = format!("r{round}-p{p}-{i}");
                    match enqueue(&mut c, "durable", msg(&body)).await {
                        Ok(_) => {
                            acked.lock().unwrap().insert(body);
                        }
                        Err(_) => return,
                    }
                    i += 1;
                }
            }));
        }
        // Let traffic build up, then pull the plug mid-stream.
        eventually_within(
            "some acknowledged enqueues",
            Duration::from_secs(30),
            || {
                let n = acked.lock().unwrap().len();
                async move { (n >= 200 * (round + 1)).then_some(()) }
            },
        )
        .await;
        b.proc.kill();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for p in producers {
            p.await.unwrap();
        }
        b.restart().await;
    }
    let mut c = b.client().await;
    let delivered: HashSet<String> = drain(&mut c, "durable", 500)
        .await
        .iter()
        .map(body_str)
        .collect();
    let acked = acked.lock().unwrap();
    let lost: Vec<_> = acked.difference(&delivered).take(5).collect();
    println!(
        "acknowledged {}, delivered {}",
        acked.len(),
        delivered.len()
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {lost:?}",
        acked.difference(&delivered).count()
    );
    assert!(
        delivered.iter().all(|d| d.starts_with('r')),
        "no invented messages"
    );
}

#[tokio::test]
async fn acked_messages_stay_settled_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Broker::start(dir.path(), QUEUE, 0).await;
    let mut c = b.client().await;
    for i in 0..100 {
        enqueue(&mut c, "durable", msg(&format!("m{i}")))
            .await
            .unwrap();
    }
    let got = dequeue(&mut c, "durable", 60, 0).await;
    let receipts: Vec<String> = got.iter().map(|m| m.receipt.clone()).collect();
    for r in ack(&mut c, "durable", receipts).await {
        assert_eq!(r.code, 0);
    }
    let settled: HashSet<String> = got.iter().map(body_str).collect();
    b.proc.kill();
    b.restart().await;
    let mut c = b.client().await;
    let rest: Vec<String> = drain(&mut c, "durable", 300)
        .await
        .iter()
        .map(body_str)
        .collect();
    assert_eq!(rest.len(), 40);
    assert!(
        rest.iter().all(|r| !settled.contains(r)),
        "an acked message came back"
    );
}

#[tokio::test]
async fn torn_tail_is_cut_and_everything_before_it_survives() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Broker::start(dir.path(), QUEUE, 0).await;
    let mut c = b.client().await;
    for i in 0..50 {
        enqueue(&mut c, "durable", msg(&format!("m{i}")))
            .await
            .unwrap();
    }
    b.proc.kill();
    // A write torn in half: half a frame of garbage at the end of each partition's
    // newest segment.
    for p in 0..2 {
        let pdir = b.data_dir.join("durable").join(p.to_string());
        let mut segs: Vec<_> = std::fs::read_dir(&pdir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        segs.sort();
        let last = segs.last().unwrap();
        let mut data = std::fs::read(last).unwrap();
        data.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9]);
        std::fs::write(last, data).unwrap();
    }
    b.restart().await;
    let (code, metrics) = http_get(b.metrics, "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("sluice_log_damage_total 2"), "{metrics}");
    assert!(b.proc.log_text().contains("torn tail"));
    let mut c = b.client().await;
    enqueue(&mut c, "durable", msg("after")).await.unwrap();
    let bodies: HashSet<String> = drain(&mut c, "durable", 300)
        .await
        .iter()
        .map(body_str)
        .collect();
    assert_eq!(bodies.len(), 51);
    assert!(bodies.contains("m0") && bodies.contains("m49") && bodies.contains("after"));
}

/// Each queue is served as soon as its own log is replayed, while another queue's
/// replay is still under way, and readiness waits for every queue. The stuck replay
/// is real: the other queue's segment is swapped for a named pipe, and reading it
/// blocks until the test opens the pipe's other end.
#[tokio::test]
async fn a_queue_is_served_while_another_is_still_being_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"
[[queue]]
name = "stuck"
partitions = 1

[[queue]]
name = "quick"
partitions = 1
"#;
    let mut b = Broker::start(dir.path(), config, 0).await;
    let mut c = b.client().await;
    enqueue(&mut c, "quick", msg("before the restart"))
        .await
        .unwrap();
    drop(c);
    b.proc.terminate().await;

    let stuck_dir = b.data_dir.join("stuck").join("0");
    let segment = only_segment(&stuck_dir);
    std::fs::remove_file(&segment).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&segment)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo {}", segment.display());

    let b = Broker::start_recovering(dir.path(), config, 0).await;
    // A broker that replayed every log before serving would not even finish the
    // HTTP/2 handshake here: the whole wait is bounded.
    let (mut c, got) = tokio::time::timeout(Duration::from_secs(60), async {
        let c = b.client().await;
        let got = eventually_within("the quick queue", Duration::from_secs(60), || {
            let mut c = c.clone();
            async move {
                c.dequeue(sluice_proto::v1::DequeueRequest {
                    queue: "quick".into(),
                    max_messages: 10,
                    wait_ms: 0,
                    visibility_timeout_ms: 0,
                })
                .await
                .ok()
                .map(|r| r.into_inner().messages)
                .filter(|m| !m.is_empty())
            }
        })
        .await;
        (c, got)
    })
    .await
    .expect("the quick queue served while the stuck one replays");
    assert_eq!(body_str(&got[0]), "before the restart");
    let refused = enqueue(&mut c, "stuck", msg("too early"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("being recovered"),
        "{}",
        refused.message()
    );
    assert!(!b.ready(), "ready before every queue is recovered");

    // Let the replay read an empty segment, and leave a regular file in its place
    // for the log to go on with.
    let blank = stuck_dir.join("blank");
    std::fs::write(&blank, b"").unwrap();
    let pipe = segment.clone();
    let writer = tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new().write(true).open(pipe).unwrap()
    })
    .await
    .unwrap();
    std::fs::rename(&blank, &segment).unwrap();
    drop(writer);

    eventually_within("readiness", Duration::from_secs(60), || {
        let ready = b.ready();
        async move { ready.then_some(()) }
    })
    .await;
    enqueue(&mut c, "stuck", msg("after")).await.unwrap();
    let later = dequeue(&mut c, "stuck", 10, 1000).await;
    assert_eq!(later.len(), 1);
    assert_eq!(body_str(&later[0]), "after");
}

/// A queue whose log cannot be read stops the broker with that error, although
/// the broker takes calls before its logs are replayed: nothing is served from a
/// half-read log.
#[tokio::test]
async fn a_log_that_cannot_be_read_stops_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"
[[queue]]
name = "broken"
partitions = 1
"#;
    let mut b = Broker::start(dir.path(), config, 0).await;
    b.proc.terminate().await;
    let segment = only_segment(&b.data_dir.join("broken").join("0"));
    // A directory where the segment was: listed as a segment, unreadable as one.
    std::fs::remove_file(&segment).unwrap();
    std::fs::create_dir(&segment).unwrap();

    let mut b = Broker::start_recovering(dir.path(), config, 0).await;
    let status = eventually_within("the broker to stop", Duration::from_secs(60), || {
        let status = b.proc.exit_status();
        async move { status }
    })
    .await;
    assert!(!status.success(), "{status:?}");
    let log = b.proc.log_text();
    assert!(log.contains("cannot be recovered"), "{log}");
}

/// The one segment file of a partition's directory.
fn only_segment(partition: &std::path::Path) -> std::path::PathBuf {
    let segments: Vec<_> = std::fs::read_dir(partition)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    assert_eq!(segments.len(), 1, "one segment in {}", partition.display());
    segments[0].clone()
}
