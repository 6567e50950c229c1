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
    let dir = tempfile::tempdir().unwrap();
    let mut b = Broker::start(dir.path(), QUEUE, 0).await;
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
        eventually(
            Duration::from_secs(30),
            "some acknowledged enqueues",
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
