//! The sidecar in front of two real brokers: routing, batching, failover, readiness.

use sluice_integration::*;
use sluice_proto::v1;
use sluice_proto::v1::queues_client::QueuesClient;
use std::collections::HashSet;
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

const TWO_BROKERS: &str = r#"
[[queue]]
name = "orders"
partitions = 4
replicas = 2
visibility_timeout = "5s"
"#;

struct Cluster {
    _dir: tempfile::TempDir,
    brokers: Vec<Broker>,
    sidecar: Sidecar,
}

async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let b0 = Broker::start(dir.path(), TWO_BROKERS, 0).await;
    let b1 = Broker::start(dir.path(), TWO_BROKERS, 1).await;
    let routes = format!("orders={},{}", b0.addr, b1.addr);
    let sidecar = Sidecar::start(dir.path(), &routes).await;
    eventually_within("sidecar readiness", Duration::from_secs(10), || async {
        (http_get(sidecar.metrics, "/readyz").0 == 200).then_some(())
    })
    .await;
    Cluster {
        _dir: dir,
        brokers: vec![b0, b1],
        sidecar,
    }
}

#[tokio::test]
async fn routes_over_both_brokers_and_settles_through_the_sidecar() {
    let cl = cluster().await;
    let mut app = cl.sidecar.client().await;
    // Concurrent single enqueues: coalesced into batches per partition.
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = app.clone();
        tasks.push(tokio::spawn(async move {
            enqueue(&mut c, "orders", msg(&format!("m{i}")))
                .await
                .unwrap()
        }));
    }
    let mut partitions = HashSet::new();
    for t in tasks {
        partitions.insert(t.await.unwrap().partition);
    }
    assert_eq!(
        partitions.len(),
        4,
        "keyless messages spread over all partitions"
    );
    // Each broker holds some of them.
    for b in &cl.brokers {
        let mut direct = b.client().await;
        let s = stats(&mut direct, "orders").await;
        assert!(s.ready > 0, "broker {} got nothing", b.addr);
    }
    // A key always lands on the same partition.
    let mut keyed = HashSet::new();
    for i in 0..5 {
        let mut m = msg(&format!("k{i}"));
        m.key = "customer-7".into();
        keyed.insert(enqueue(&mut app, "orders", m).await.unwrap().partition);
    }
    assert_eq!(keyed.len(), 1);

    let (_, metrics) = http_get(cl.sidecar.metrics, "/metrics");
    assert!(
        metrics.contains("sluice_sidecar_brokers_up{queue=\"orders\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_sidecar_enqueue_batch_size_count"),
        "{metrics}"
    );
    let s = stats(&mut app, "orders").await;
    assert_eq!(s.ready, 205, "stats add up over brokers");
    assert_eq!(s.partitions.len(), 4);
    let d = app
        .describe(v1::DescribeRequest {
            queue: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.owned_partitions, vec![0, 1, 2, 3]);

    let all = drain(&mut app, "orders", 300).await;
    let bodies: HashSet<String> = all.iter().map(body_str).collect();
    assert_eq!(
        bodies.len(),
        205,
        "every message delivered once through the sidecar"
    );
    let s = stats(&mut app, "orders").await;
    assert_eq!((s.ready, s.in_flight, s.acked_total), (0, 0, 205));
}

#[tokio::test]
async fn subscribe_through_the_sidecar_draws_from_every_broker() {
    use v1::subscribe_request::Request as In;
    use v1::subscribe_response::Response as Out;
    let cl = cluster().await;
    let mut app = cl.sidecar.client().await;
    for i in 0..40 {
        enqueue(&mut app, "orders", msg(&format!("s{i}")))
            .await
            .unwrap();
    }
    let mut sub = AppSubscription::start(&mut app, 0, 10).await;
    let mut seen = HashSet::new();
    let mut since_credit = 0;
    while seen.len() < 40 {
        match sub.next().await {
            Out::Message(m) => {
                since_credit += 1;
                assert!(since_credit <= 10, "more deliveries than credit");
                seen.insert(body_str(&m));
                sub.send(In::Ack(v1::AckRequest {
                    queue: "orders".into(),
                    receipts: vec![m.receipt],
                }))
                .await;
            }
            Out::Ack(a) => assert!(a.results.iter().all(|r| r.code == 0), "{a:?}"),
            other => panic!("{other:?}"),
        }
        if since_credit == 10 {
            since_credit = 0;
            sub.send(In::Credit(10)).await;
        }
    }
    eventually_within("all acks", Duration::from_secs(5), || {
        let mut c = app.clone();
        async move { (stats(&mut c, "orders").await.acked_total == 40).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn fails_over_when_a_broker_dies_and_reports_readiness() {
    let mut cl = cluster().await;
    let mut app = cl.sidecar.client().await;
    cl.brokers[1].proc.kill();
    // Keyless enqueues keep working on the surviving broker.
    for i in 0..20 {
        let r = enqueue(&mut app, "orders", msg(&format!("f{i}"))).await;
        assert!(r.is_ok(), "enqueue {i} failed: {r:?}");
    }
    // A key whose partition lives on the dead broker cannot be served: UNAVAILABLE,
    // quickly, rather than a hang or a silent move (that would break its ordering).
    let mut unavailable = 0;
    for k in 0..20 {
        let mut m = msg("keyed");
        m.key = format!("key-{k}");
        match enqueue(&mut app, "orders", m).await {
            Ok(r) => assert!(
                r.partition % 2 == 0,
                "partition {} belongs to the dead broker",
                r.partition
            ),
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                unavailable += 1;
            }
        }
    }
    assert!(unavailable > 0);
    let got = drain(&mut app, "orders", 300).await;
    assert!(got.len() >= 20);

    cl.brokers[0].proc.kill();
    eventually_within(
        "not ready with no broker",
        Duration::from_secs(15),
        || async { (http_get(cl.sidecar.metrics, "/readyz").0 == 503).then_some(()) },
    )
    .await;
    let err = enqueue(&mut app, "orders", msg("nobody home"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);

    cl.brokers[0].restart().await;
    cl.brokers[1].restart().await;
    eventually_within("ready again", Duration::from_secs(15), || async {
        (http_get(cl.sidecar.metrics, "/readyz").0 == 200).then_some(())
    })
    .await;
    let mut app = cl.sidecar.client().await;
    enqueue(&mut app, "orders", msg("back")).await.unwrap();
}

/// By default the sidecar's readiness is its own: an app pod whose queue has no
/// broker yet (not created, or down) is Ready and not held back, its calls answer
/// UNAVAILABLE naming the queue, and once a broker serves the route the same sidecar
/// delivers through it (`--readiness brokers`, what the pod annotation
/// `sluice.dev/ready-requires-brokers` asks for, is checked above).
#[tokio::test]
async fn a_sidecar_without_its_brokers_is_ready_and_picks_them_up_when_they_come() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let routes = format!("orders={addr}");
    let sidecar = Sidecar::start_with(dir.path(), &routes, &["--readiness", "serving"]).await;
    assert_eq!(
        http_get(sidecar.metrics, "/readyz").0,
        200,
        "ready with no broker answering"
    );
    let mut app = sidecar.client().await;
    let err = enqueue(&mut app, "orders", msg("early")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("orders"), "{}", err.message());

    let broker = Broker::start_at(dir.path(), "", 0, dir.path().join("data"), addr, &[]).await;
    eventually_within(
        "the sidecar found the broker",
        Duration::from_secs(30),
        || {
            let mut app = app.clone();
            async move { enqueue(&mut app, "orders", msg("later")).await.ok() }
        },
    )
    .await;
    let got = drain(&mut app, "orders", 300).await;
    assert_eq!(got.iter().map(body_str).collect::<Vec<_>>(), ["later"]);
    assert_eq!(http_get(sidecar.metrics, "/readyz").0, 200);
    drop(broker);
}

#[tokio::test]
async fn unknown_queue_and_foreign_partition_are_refused() {
    let cl = cluster().await;
    let mut app = cl.sidecar.client().await;
    let err = enqueue(&mut app, "emails", msg("x")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("sluice.dev/queues"),
        "{}",
        err.message()
    );
    // Straight to broker 0, a partition of broker 1: refused, naming the way.
    let mut direct = cl.brokers[0].client().await;
    let err = direct
        .enqueue(v1::EnqueueRequest {
            queue: "orders".into(),
            message: Some(msg("x")),
            partition: Some(1),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("sidecar"), "{}", err.message());
}

/// A broker that accepts connections but never answers (SIGSTOP): no call through the
/// sidecar hangs, and retrying with a dedup id once it thaws makes one copy only, even
/// though the frozen broker still holds the first attempt in its socket.
#[tokio::test]
async fn a_frozen_broker_hangs_no_call_and_dedup_retries_make_one_copy() {
    let cl = cluster().await;
    let mut app = cl.sidecar.client().await;
    // A bound far above the sidecar's own call timeout: reaching it means a hang.
    let limit = Duration::from_secs(60);
    cl.brokers[1].proc.signal("STOP");

    let mut ok = 0;
    for i in 0..8 {
        let r = tokio::time::timeout(limit, enqueue(&mut app, "orders", msg(&format!("k{i}"))))
            .await
            .expect("a keyless enqueue hung");
        match r {
            Ok(_) => ok += 1,
            Err(e) => assert!(
                matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
                "{e:?}"
            ),
        }
    }
    assert!(ok > 0, "no keyless enqueue reached the live broker");

    // Dedup ids whose partitions (odd) live on the frozen broker.
    let ids: Vec<String> = (0..)
        .map(|i| format!("order-{i}"))
        .filter(|d| sluice_proto::partition_for_key(d, 4) % 2 == 1)
        .take(3)
        .collect();
    for d in &ids {
        let mut m = msg(d);
        m.dedup_id = d.clone();
        let r = tokio::time::timeout(limit, enqueue(&mut app, "orders", m))
            .await
            .expect("an enqueue to the frozen broker hung");
        let e = r.expect_err("the frozen broker cannot have answered");
        assert!(
            matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
            "{e:?}"
        );
    }

    cl.brokers[1].proc.signal("CONT");
    for d in &ids {
        eventually_within("the retry to be answered", limit, || {
            let mut c = app.clone();
            let mut m = msg(d);
            m.dedup_id = d.clone();
            async move { enqueue(&mut c, "orders", m).await.ok() }
        })
        .await;
    }
    let got = drain(&mut app, "orders", 500).await;
    for d in &ids {
        let copies = got.iter().filter(|m| body_str(m) == *d).count();
        assert_eq!(
            copies, 1,
            "{d}: {copies} copies after retries with a dedup id"
        );
    }
}

/// An app's Subscribe stream on the sidecar, as a channel of requests and the stream
/// of answers.
struct AppSubscription {
    requests: tokio::sync::mpsc::Sender<v1::SubscribeRequest>,
    answers: tonic::Streaming<v1::SubscribeResponse>,
}

impl AppSubscription {
    async fn start(
        app: &mut QueuesClient<Channel>,
        visibility_timeout_ms: u64,
        credit: u32,
    ) -> Self {
        use v1::subscribe_request::Request as In;
        let (requests, rx) = tokio::sync::mpsc::channel(64);
        requests
            .send(v1::SubscribeRequest {
                request: Some(In::Start(v1::SubscribeStart {
                    queue: "orders".into(),
                    visibility_timeout_ms,
                    initial_credit: credit,
                })),
            })
            .await
            .unwrap();
        let answers = app
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        AppSubscription { requests, answers }
    }

    async fn send(&self, request: v1::subscribe_request::Request) {
        self.requests
            .send(v1::SubscribeRequest {
                request: Some(request),
            })
            .await
            .unwrap();
    }

    async fn next(&mut self) -> v1::subscribe_response::Response {
        let limit = Duration::from_secs(30);
        tokio::time::timeout(limit, self.answers.message())
            .await
            .expect("nothing from the subscription in 30 s")
            .unwrap()
            .unwrap()
            .response
            .unwrap()
    }

    /// Acks inline and returns the answer's results.
    async fn ack(&mut self, receipts: Vec<String>) -> Vec<v1::ReceiptResult> {
        use v1::subscribe_response::Response as Out;
        self.send(v1::subscribe_request::Request::Ack(v1::AckRequest {
            queue: "orders".into(),
            receipts,
        }))
        .await;
        match self.next().await {
            Out::Ack(a) => a.results,
            other => panic!("expected an ack answer, got {other:?}"),
        }
    }
}

/// The sidecar relays a Subscribe over broker Subscribe streams: what the brokers
/// leased to it and it did not deliver, and what the app left unsettled, is given back
/// when the app's stream ends (long before the 60 s lease would run out); and the
/// subscription outlives a broker's restart, taking messages from it again.
#[tokio::test]
async fn a_relayed_subscription_gives_back_what_it_holds_and_outlives_a_broker_restart() {
    use v1::subscribe_request::Request as In;
    use v1::subscribe_response::Response as Out;
    let mut cl = cluster().await;
    let mut app = cl.sidecar.client().await;
    for i in 0..20 {
        enqueue(&mut app, "orders", msg(&format!("a{i}")))
            .await
            .unwrap();
    }
    // Credit 3 over two brokers: each is granted 2, so one leased message stays in
    // the sidecar undelivered.
    let mut sub = AppSubscription::start(&mut app, 60_000, 3).await;
    let mut delivered = Vec::new();
    while delivered.len() < 3 {
        match sub.next().await {
            Out::Message(m) => delivered.push(m),
            other => panic!("{other:?}"),
        }
    }
    let results = sub.ack(vec![delivered[0].receipt.clone()]).await;
    assert_eq!(results.len(), 1);
    assert_eq!(
        results[0].code, 0,
        "inline ack through the relay: {results:?}"
    );
    sub.send(In::Nack(v1::NackRequest {
        queue: "orders".into(),
        receipts: vec![delivered[1].receipt.clone()],
        delay_ms: 0,
        dead_letter: false,
    }))
    .await;
    match sub.next().await {
        Out::Nack(n) => assert_eq!(n.results[0].code, 0, "inline nack through the relay: {n:?}"),
        other => panic!("expected a nack answer, got {other:?}"),
    }
    drop(sub);
    eventually_within(
        "everything unsettled given back: 19 ready, none in flight, 1 acked",
        Duration::from_secs(10),
        || {
            let mut c = app.clone();
            async move {
                let s = stats(&mut c, "orders").await;
                ((s.ready, s.in_flight, s.acked_total) == (19, 0, 1)).then_some(())
            }
        },
    )
    .await;
    drain(&mut app, "orders", 300).await;

    // A broker restarts under a live subscription; keyed messages of its partitions
    // (odd ones) sent afterwards still arrive on the same stream and ack inline.
    let mut sub = AppSubscription::start(&mut app, 0, 100).await;
    cl.brokers[1].proc.kill();
    cl.brokers[1].restart().await;
    let keys: Vec<String> = (0..)
        .map(|i| format!("k{i}"))
        .filter(|k| sluice_proto::partition_for_key(k, 4) % 2 == 1)
        .take(10)
        .collect();
    for k in &keys {
        let mut m = msg(k);
        m.key = k.clone();
        eventually_within("enqueue after the restart", Duration::from_secs(15), || {
            let (mut c, m) = (app.clone(), m.clone());
            async move { enqueue(&mut c, "orders", m).await.ok() }
        })
        .await;
    }
    let (mut seen, mut acked) = (HashSet::new(), 0);
    while acked < keys.len() {
        match sub.next().await {
            Out::Message(m) => {
                assert_eq!(m.partition % 2, 1, "{m:?}");
                seen.insert(body_str(&m));
                sub.send(In::Ack(v1::AckRequest {
                    queue: "orders".into(),
                    receipts: vec![m.receipt],
                }))
                .await;
            }
            Out::Ack(a) => {
                assert_eq!(a.results[0].code, 0, "{a:?}");
                acked += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen.len(), keys.len());
    let s = stats(&mut app, "orders").await;
    assert_eq!((s.ready, s.in_flight), (0, 0));
}

/// SIGTERM to the sidecar: open subscriptions end at once with the reason, and what
/// they delivered unsettled is back in the queue for other consumers (not after its
/// 60 s lease); new Dequeue calls are refused; enqueues still work during the grace
/// period; then the sidecar exits cleanly.
#[tokio::test]
async fn a_terminated_sidecar_gives_back_deliveries_keeps_taking_enqueues_then_exits() {
    use v1::subscribe_response::Response as Out;
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "", 0).await;
    let routes = format!("orders={}", broker.addr);
    let mut sidecar = Sidecar::start_with(dir.path(), &routes, &["--drain-seconds", "3"]).await;
    eventually_within("sidecar readiness", Duration::from_secs(10), || async {
        (http_get(sidecar.metrics, "/readyz").0 == 200).then_some(())
    })
    .await;
    let mut app = sidecar.client().await;
    for i in 0..3 {
        enqueue(&mut app, "orders", msg(&format!("m{i}")))
            .await
            .unwrap();
    }
    let mut sub = AppSubscription::start(&mut app, 60_000, 3).await;
    for _ in 0..3 {
        assert!(matches!(sub.next().await, Out::Message(_)));
    }

    sidecar.proc.signal("TERM");
    let ended = tokio::time::timeout(Duration::from_secs(10), sub.answers.message())
        .await
        .expect("the subscription ends when the sidecar drains");
    let status = ended.expect_err("it ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    let refused = app
        .dequeue(v1::DequeueRequest {
            queue: "orders".into(),
            max_messages: 1,
            wait_ms: 0,
            visibility_timeout_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    enqueue(&mut app, "orders", msg("during the grace"))
        .await
        .expect("enqueues still work while draining");
    // Straight from the broker: the three deliveries are back, with the new one.
    let mut direct = broker.client().await;
    let got: HashSet<String> = drain(&mut direct, "orders", 300)
        .await
        .iter()
        .map(body_str)
        .collect();
    let want: HashSet<String> = ["m0", "m1", "m2", "during the grace"]
        .map(String::from)
        .into();
    assert_eq!(got, want);
    let exit = eventually_within("the sidecar exits", Duration::from_secs(30), || {
        let status = sidecar.proc.exit_status();
        async move { status }
    })
    .await;
    assert!(exit.success(), "{exit:?}");
}

/// `POST /shutdown` from inside the pod (loopback) drains and stops the sidecar, as
/// a Job's app does when its work is done.
#[tokio::test]
async fn the_app_can_stop_the_sidecar_from_inside_the_pod() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "", 0).await;
    let routes = format!("orders={}", broker.addr);
    let mut sidecar = Sidecar::start_with(dir.path(), &routes, &["--drain-seconds", "1"]).await;
    let (code, _) = http_post(sidecar.metrics, "/shutdown");
    assert_eq!(code, 202);
    let exit = eventually_within("the sidecar exits", Duration::from_secs(30), || {
        let status = sidecar.proc.exit_status();
        async move { status }
    })
    .await;
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn a_redrive_limit_is_the_queues_not_each_brokers() {
    let cl = cluster().await;
    let mut app = cl.sidecar.client().await;
    // 40 messages over the 4 partitions of both brokers, all dead-lettered.
    for i in 0..40 {
        let mut m = msg(&format!("d{i}"));
        m.key = format!("k{i}");
        enqueue(&mut app, "orders", m).await.unwrap();
    }
    let mut leased = Vec::new();
    while leased.len() < 40 {
        let got = dequeue(&mut app, "orders", 40, 2000).await;
        assert!(!got.is_empty(), "only {} of 40 delivered", leased.len());
        leased.extend(got.into_iter().map(|m| m.receipt));
    }
    let nacked = app
        .nack(v1::NackRequest {
            queue: "orders".into(),
            receipts: leased,
            delay_ms: 0,
            dead_letter: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(nacked.results.iter().all(|r| r.code == 0), "{nacked:?}");
    eventually_within("40 dead letters", Duration::from_secs(30), || async {
        let mut c = app.clone();
        (stats(&mut c, "orders.dlq").await.ready == 40).then_some(())
    })
    .await;
    let redriver = app.clone();
    let redrive = |max: u64| {
        let mut c = redriver.clone();
        async move {
            c.redrive(v1::RedriveRequest {
                queue: "orders".into(),
                max_messages: max,
            })
            .await
            .unwrap()
            .into_inner()
            .moved
        }
    };
    // Both brokers hold dead letters; a limit of 15 moves 15 in all, not 15 each.
    assert_eq!(redrive(15).await, 15);
    assert_eq!(stats(&mut app, "orders").await.ready, 15);
    assert_eq!(redrive(0).await, 25, "no limit: the rest");
    assert_eq!(stats(&mut app, "orders.dlq").await.ready, 0);
}
