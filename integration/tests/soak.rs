//! A bounded soak: rounds of steady load through a sidecar (enqueue, dequeue, ack)
//! with broker and sidecar memory and file descriptors sampled after a warm-up and at
//! the end. Everything that went in came out, and neither process grew.
//!
//! `SLUICE_SOAK_ROUNDS` sets the rounds (default 10 of 2,000 messages of 4 KiB: 80 MiB
//! through the queue, so that a leak of bodies or of per-message state shows).

use sluice_integration::*;
use sluice_proto::v1;
use std::time::Duration;

const QUEUE: &str = r#"
[[queue]]
name = "soak"
partitions = 4
fsync = "always"
"#;

const PER_ROUND: usize = 2000;

async fn round(
    app: &sluice_proto::v1::queues_client::QueuesClient<tonic::transport::Channel>,
    r: usize,
) {
    let body = "s".repeat(4096);
    let mut producers = Vec::new();
    for p in 0..16 {
        let mut c = app.clone();
        let body = body.clone();
        producers.push(tokio::spawn(async move {
            for i in (p..PER_ROUND).step_by(16) {
                let mut m = msg(&body);
                m.key = format!("r{r}-{i}");
                enqueue(&mut c, "soak", m).await.unwrap();
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    let mut c = app.clone();
    let mut got = 0;
    while got < PER_ROUND {
        let ms = c
            .dequeue(v1::DequeueRequest {
                queue: "soak".into(),
                max_messages: 500,
                wait_ms: 1000,
                visibility_timeout_ms: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .messages;
        assert!(
            !ms.is_empty(),
            "round {r}: only {got} of {PER_ROUND} came back"
        );
        got += ms.len();
        let receipts = ms.iter().map(|m| m.receipt.clone()).collect();
        for a in ack(&mut c, "soak", receipts).await {
            assert_eq!(a.code, 0, "{}", a.error);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_keeps_memory_and_descriptors_flat() {
    let rounds: usize = std::env::var("SLUICE_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .max(3);
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), QUEUE, 0).await;
    let sidecar = Sidecar::start(dir.path(), &format!("soak={}", broker.addr)).await;
    let app = sidecar.client().await;
    let mut warm = None;
    for r in 0..rounds {
        round(&app, r).await;
        if r == 1 {
            warm = Some((broker.proc.resources(), sidecar.proc.resources()));
        }
    }
    // Settled segments are deleted in the background: let that land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ((b_rss0, b_fd0), (s_rss0, s_fd0)) = warm.unwrap();
    let (b_rss, b_fd) = broker.proc.resources();
    let (s_rss, s_fd) = sidecar.proc.resources();
    let mut c = app.clone();
    let st = stats(&mut c, "soak").await;
    println!(
        "{rounds} rounds of {PER_ROUND} x 4 KiB; broker RSS {b_rss0} -> {b_rss} kB, fds {b_fd0} -> {b_fd}; \
         sidecar RSS {s_rss0} -> {s_rss} kB, fds {s_fd0} -> {s_fd}; acked {}",
        st.acked_total
    );
    assert_eq!(st.acked_total, (rounds * PER_ROUND) as u64);
    assert_eq!(st.ready + st.in_flight + st.delayed, 0);
    // Flat: the bytes that passed after the warm-up (8 rounds: 64 MiB of bodies) would
    // show in full if bodies or per-message state leaked. Allow allocator slack.
    let slack_kb = 24 * 1024;
    assert!(
        b_rss <= b_rss0 + slack_kb,
        "broker RSS grew {b_rss0} -> {b_rss} kB"
    );
    assert!(
        s_rss <= s_rss0 + slack_kb,
        "sidecar RSS grew {s_rss0} -> {s_rss} kB"
    );
    // Descriptors: segments roll and are deleted; allow a few in passing.
    assert!(b_fd <= b_fd0 + 8, "broker fds grew {b_fd0} -> {b_fd}");
    assert!(s_fd <= s_fd0 + 4, "sidecar fds grew {s_fd0} -> {s_fd}");
}
