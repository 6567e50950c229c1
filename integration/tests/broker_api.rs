//! Every call of the API against a real broker process, and the rules behind them.

use sluice_integration::*;
use sluice_proto::v1;
use std::time::Duration;
use tonic::Code;

const QUEUES: &str = r#"
[[queue]]
name = "work"
partitions = 2
visibility_timeout = "1s"
max_deliveries = 2

[[queue]]
name = "keyed"
partitions = 1

[[queue]]
name = "limited"
partitions = 1
retention_max_messages = 2
max_message_bytes = 1024
max_batch = 10

[[queue]]
name = "dropper"
partitions = 1
retention_max_messages = 2
overflow = "drop_oldest"

[[queue]]
name = "slow"
partitions = 1
default_delay = "400ms"
"#;

async fn broker() -> (tempfile::TempDir, Broker) {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), QUEUES, 0).await;
    (dir, b)
}

#[tokio::test]
async fn enqueue_peek_dequeue_ack_and_stats() {
    let (_d, b) = broker().await;
    let mut c = b.client().await;
    let mut m = msg("one");
    m.attributes.insert("kind".into(), "test".into());
    let first = enqueue(&mut c, "work", m).await.unwrap();
    assert!(!first.id.is_empty() && !first.duplicate);
    let batch = c
        .enqueue_batch(v1::EnqueueBatchRequest {
            queue: "work".into(),
            messages: vec![msg("two"), msg("three")],
            partition: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.results.len(), 2);

    let peeked = c
        .peek(v1::PeekRequest {
            queue: "work".into(),
            max_messages: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(peeked.len(), 3);
    assert!(
        peeked.iter().all(|m| m.receipt.is_empty()),
        "peek leases nothing"
    );

    let got = dequeue(&mut c, "work", 10, 0).await;
    let mut bodies: Vec<String> = got.iter().map(body_str).collect();
    bodies.sort();
    assert_eq!(bodies, ["one", "three", "two"]);
    let one = got.iter().find(|m| body_str(m) == "one").unwrap();
    assert_eq!(one.attributes.get("kind").map(String::as_str), Some("test"));
    assert_eq!(one.delivery_count, 1);
    assert!(
        dequeue(&mut c, "work", 10, 0).await.is_empty(),
        "leased messages are invisible"
    );
    let s = stats(&mut c, "work").await;
    assert_eq!((s.ready, s.in_flight, s.enqueued_total), (0, 3, 3));
    assert_eq!(s.bytes, 11);

    let receipts: Vec<String> = got.iter().map(|m| m.receipt.clone()).collect();
    let results = ack(&mut c, "work", receipts.clone()).await;
    assert!(results.iter().all(|r| r.code == 0), "{results:?}");
    let again = ack(&mut c, "work", receipts).await;
    assert!(
        again.iter().all(|r| r.code == Code::NotFound as i32),
        "{again:?}"
    );
    let s = stats(&mut c, "work").await;
    assert_eq!((s.ready, s.in_flight, s.acked_total, s.bytes), (0, 0, 3, 0));
}

#[tokio::test]
async fn expired_lease_redelivers_then_dead_letters_and_redrive_brings_it_back() {
    let (_d, b) = broker().await;
    let mut c = b.client().await;
    enqueue(&mut c, "work", msg("flaky")).await.unwrap();
    let first = dequeue(&mut c, "work", 1, 0).await;
    assert_eq!(first[0].delivery_count, 1);
    // Not acked: after the 1s visibility timeout it is delivered again.
    let second = dequeue(&mut c, "work", 1, 5000).await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].id, first[0].id);
    assert_eq!(second[0].delivery_count, 2);
    let stale = ack(&mut c, "work", vec![first[0].receipt.clone()]).await;
    assert_eq!(stale[0].code, Code::FailedPrecondition as i32, "{stale:?}");
    // Second delivery not acked either: max_deliveries = 2, so it is dead-lettered.
    eventually_within("the dead letter", Duration::from_secs(10), || {
        let mut c = c.clone();
        async move { (stats(&mut c, "work").await.dead_lettered == 1).then_some(()) }
    })
    .await;
    let s = stats(&mut c, "work").await;
    assert_eq!((s.ready, s.in_flight, s.dead_lettered_total), (0, 0, 1));
    let dead = c
        .peek(v1::PeekRequest {
            queue: "work.dlq".into(),
            max_messages: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(dead.len(), 1);
    assert_eq!(body_str(&dead[0]), "flaky");
    assert_eq!(
        dead[0].attributes.get("sluice-dlq-source-id"),
        Some(&first[0].id)
    );
    assert_eq!(
        dead[0]
            .attributes
            .get("sluice-dlq-deliveries")
            .map(String::as_str),
        Some("2")
    );

    let moved = c
        .redrive(v1::RedriveRequest {
            queue: "work".into(),
            max_messages: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .moved;
    assert_eq!(moved, 1);
    assert_eq!(stats(&mut c, "work").await.dead_lettered, 0);
    let back = dequeue(&mut c, "work", 1, 2000).await;
    assert_eq!(body_str(&back[0]), "flaky");
    assert_eq!(back[0].delivery_count, 1, "a redriven message starts over");
    assert!(!back[0].attributes.contains_key("sluice-dlq-source-id"));
}

#[tokio::test]
async fn nack_with_delay_nack_to_dead_letter_and_extend_visibility() {
    let (_d, b) = broker().await;
    let mut c = b.client().await;
    for body in ["later", "poison", "long"] {
        enqueue(&mut c, "work", msg(body)).await.unwrap();
    }
    let got = dequeue(&mut c, "work", 3, 0).await;
    let by = |name: &str| {
        got.iter()
            .find(|m| body_str(m) == name)
            .unwrap()
            .receipt
            .clone()
    };
    let nacked = c
        .nack(v1::NackRequest {
            queue: "work".into(),
            receipts: vec![by("later")],
            delay_ms: 300,
            dead_letter: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nacked.results[0].code, 0);
    let dl = c
        .nack(v1::NackRequest {
            queue: "work".into(),
            receipts: vec![by("poison")],
            delay_ms: 0,
            dead_letter: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dl.results[0].code, 0);
    // Keep "long" past its 1s timeout.
    let ext = c
        .extend_visibility(v1::ExtendVisibilityRequest {
            queue: "work".into(),
            receipts: vec![by("long")],
            visibility_timeout_ms: 60_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ext.results[0].code, 0);
    assert_eq!(stats(&mut c, "work").await.delayed, 1);
    let again = dequeue(&mut c, "work", 10, 3000).await;
    assert_eq!(again.iter().map(body_str).collect::<Vec<_>>(), ["later"]);
    eventually_within("the dead letter", Duration::from_secs(5), || {
        let mut c = c.clone();
        async move { (stats(&mut c, "work").await.dead_lettered == 1).then_some(()) }
    })
    .await;
    // After the original timeout has long passed, "long" is still leased and ackable.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = ack(&mut c, "work", vec![by("long")]).await;
    assert_eq!(r[0].code, 0, "{r:?}");
}

#[tokio::test]
async fn delayed_messages_wait_for_their_time() {
    let (_d, b) = broker().await;
    let mut c = b.client().await;
    let mut m = msg("per-message");
    m.delay_ms = 300;
    enqueue(&mut c, "work", m).await.unwrap();
    enqueue(&mut c, "slow", msg("queue-default")).await.unwrap();
    assert!(dequeue(&mut c, "work", 1, 0).await.is_empty());
    assert!(dequeue(&mut c, "slow", 1, 0).await.is_empty());
    assert_eq!(stats(&mut c, "work").await.delayed, 1);
    assert_eq!(
        body_str(&dequeue(&mut c, "work", 1, 5000).await[0]),
        "per-message"
    );
    assert_eq!(
        body_str(&dequeue(&mut c, "slow", 1, 5000).await[0]),
        "queue-default"
    );
}

#[tokio::test]
async fn per_key_ordering() {
    let (_d, b) = broker().await;
    let mut c = b.client().await;
    for (body, key) in [("k1", "k"), ("k2", "k"), ("j1", "j"), ("free", "")] {
        let mut m = msg(body);
        m.key = key.into();
        enqueue(&mut c, "keyed", m).await.unwrap();
    }
    let got = dequeue(&mut c, "keyed", 10, 0).await;
    assert_eq!(
        got.iter().map(body_str).collect::<Vec<_>>(),
        ["k1", "j1", "free"]
    );
    assert_eq!(got[0].key, "k");
    assert!(
        dequeue(&mut c, "keyed", 10, 0).await.is_empty(),
        "k2 waits for k1"
    );
    ack(&mut c, "keyed", vec![got[0].receipt.clone()]).await;
    assert_eq!(
        dequeue(&mut c, "keyed", 10, 0)
            .await
            .iter()
            .map(body_str)
            .collect::<Vec<_>>(),
        ["k2"]
    );
}

#[tokio::test]
async fn deduplication_within_the_window() {
    let (_d, b) = broker().await;
    let mut c = b.client().await;
    let mut m = msg("once");
    m.dedup_id = "order-42".into();
    let a = enqueue(&mut c, "work", m.clone()).await.unwrap();
    let b2 = enqueue(&mut c, "work", m).await.unwrap();
    assert_eq!(a.id, b2.id);
    assert!(b2.duplicate && !a.duplicate);
    assert_eq!(stats(&mut c, "work").await.enqueued_total, 1);
}

#[tokio::test]
async fn retention_rejects_new_or_drops_oldest() {
    let (_d, b) = broker().await;
    let mut c = b.client().await;
    enqueue(&mut c, "limited", msg("a")).await.unwrap();
    enqueue(&mut c, "limited", msg("b")).await.unwrap();
    let err = enqueue(&mut c, "limited", msg("c")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("full"), "{}", err.message());

    for body in ["a", "b", "c"] {
        enqueue(&mut c, "dropper", msg(body)).await.unwrap();
    }
    let got = dequeue(&mut c, "dropper", 10, 0).await;
    assert_eq!(got.iter().map(body_str).collect::<Vec<_>>(), ["b", "c"]);
}

#[tokio::test]
async fn bad_input_gets_the_right_status_and_writes_nothing() {
    let (_d, b) = broker().await;
    let mut c = b.client().await;
    let code = |r: Result<v1::EnqueueResponse, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(enqueue(&mut c, "Bad Name", msg("x")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(enqueue(&mut c, "", msg("x")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(enqueue(&mut c, "nosuchqueue", msg("x")).await),
        Code::NotFound
    );
    let big = msg(&"x".repeat(2000));
    let e = enqueue(&mut c, "limited", big).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("max_message_bytes"), "{}", e.message());
    let mut delayed = msg("x");
    delayed.delay_ms = 16 * 24 * 3600 * 1000;
    assert_eq!(
        code(enqueue(&mut c, "work", delayed).await),
        Code::InvalidArgument
    );
    let missing = c
        .enqueue(v1::EnqueueRequest {
            queue: "work".into(),
            message: None,
            partition: None,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    let bad_partition = c
        .enqueue(v1::EnqueueRequest {
            queue: "work".into(),
            message: Some(msg("x")),
            partition: Some(99),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_partition.code(), Code::InvalidArgument);
    // A batch over max_batch, and a batch with one bad message: nothing written.
    let too_many = c
        .enqueue_batch(v1::EnqueueBatchRequest {
            queue: "limited".into(),
            messages: (0..11).map(|i| msg(&i.to_string())).collect(),
            partition: None,
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    let one_bad = c
        .enqueue_batch(v1::EnqueueBatchRequest {
            queue: "limited".into(),
            messages: vec![msg("fine"), msg(&"x".repeat(2000))],
            partition: None,
        })
        .await
        .unwrap_err();
    assert_eq!(one_bad.code(), Code::InvalidArgument);
    assert!(
        one_bad.message().contains("message 1"),
        "{}",
        one_bad.message()
    );
    assert_eq!(
        stats(&mut c, "limited").await.enqueued_total,
        0,
        "nothing written"
    );

    let dq = |max, wait_ms, vis| v1::DequeueRequest {
        queue: "work".into(),
        max_messages: max,
        wait_ms,
        visibility_timeout_ms: vis,
    };
    assert_eq!(
        c.dequeue(dq(1, 61_000, 0)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.dequeue(dq(1, 0, 13 * 3600 * 1000))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.dequeue(dq(5000, 0, 0)).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let no_receipts = c
        .ack(v1::AckRequest {
            queue: "work".into(),
            receipts: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(no_receipts.code(), Code::InvalidArgument);
    let results = ack(&mut c, "work", vec!["garbage".into(), "0.99.1".into()]).await;
    assert_eq!(results[0].code, Code::InvalidArgument as i32);
    assert_eq!(results[1].code, Code::NotFound as i32);

    // The broker is still serving.
    enqueue(&mut c, "work", msg("still alive")).await.unwrap();
}

/// Opens a Subscribe stream on `queue` with `credit`: the sender for the client's
/// side, and the server's stream.
async fn subscribe(
    c: &mut sluice_proto::v1::queues_client::QueuesClient<tonic::transport::Channel>,
    queue: &str,
    credit: u32,
) -> (
    tokio::sync::mpsc::Sender<v1::SubscribeRequest>,
    tonic::Streaming<v1::SubscribeResponse>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(v1::SubscribeRequest {
        request: Some(v1::subscribe_request::Request::Start(v1::SubscribeStart {
            queue: queue.into(),
            visibility_timeout_ms: 0,
            initial_credit: credit,
        })),
    })
    .await
    .unwrap();
    let stream = c
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

#[tokio::test]
async fn subscribe_never_sends_beyond_the_credit() {
    use v1::subscribe_request::Request as In;
    use v1::subscribe_response::Response as Out;
    let (_d, b) = broker().await;
    let mut c = b.client().await;
    for i in 0..10 {
        enqueue(&mut c, "keyed", msg(&format!("m{i}")))
            .await
            .unwrap();
    }
    let (tx, mut stream) = subscribe(&mut c, "keyed", 3).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        match stream.message().await.unwrap().unwrap().response {
            Some(Out::Message(m)) => got.push(m),
            other => panic!("{other:?}"),
        }
    }
    // No fourth message while there is no credit.
    let extra = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
    assert!(extra.is_err(), "server sent beyond the credit: {extra:?}");
    assert_eq!(stats(&mut c, "keyed").await.in_flight, 3);

    tx.send(v1::SubscribeRequest {
        request: Some(In::Credit(2)),
    })
    .await
    .unwrap();
    for _ in 0..2 {
        match stream.message().await.unwrap().unwrap().response {
            Some(Out::Message(m)) => got.push(m),
            other => panic!("{other:?}"),
        }
    }
    let receipts: Vec<String> = got.iter().take(4).map(|m| m.receipt.clone()).collect();
    tx.send(v1::SubscribeRequest {
        request: Some(In::Ack(v1::AckRequest {
            queue: "keyed".into(),
            receipts,
        })),
    })
    .await
    .unwrap();
    match stream.message().await.unwrap().unwrap().response {
        Some(Out::Ack(a)) => assert!(a.results.iter().all(|r| r.code == 0), "{a:?}"),
        other => panic!("{other:?}"),
    }
    let s = stats(&mut c, "keyed").await;
    assert_eq!((s.acked_total, s.in_flight), (4, 1));
    // Closing the stream gives the unacked delivery back at once.
    drop(tx);
    drop(stream);
    eventually_within(
        "the release of unacked deliveries",
        Duration::from_secs(5),
        || {
            let mut c = c.clone();
            async move {
                let s = stats(&mut c, "keyed").await;
                (s.in_flight == 0 && s.ready == 6).then_some(())
            }
        },
    )
    .await;
}

/// A key's next message waits while one of that key is in flight; the ack that
/// settles it lets the next one out to a subscription waiting with credit at once
/// (it once waited for whatever woke the queue next: another enqueue, or nothing).
#[tokio::test]
async fn an_ack_lets_the_keys_next_message_out_to_a_waiting_subscription() {
    use v1::subscribe_request::Request as In;
    use v1::subscribe_response::Response as Out;
    let (_d, b) = broker().await;
    let mut c = b.client().await;
    for i in 0..3 {
        let m = v1::NewMessage {
            key: "customer-7".into(),
            ..msg(&format!("m{i}"))
        };
        enqueue(&mut c, "keyed", m).await.unwrap();
    }
    let (tx, mut stream) = subscribe(&mut c, "keyed", 10).await;
    for i in 0..3 {
        let m = loop {
            // Generous: a stall (nothing wakes the subscription) fails, not a slow box.
            let next = tokio::time::timeout(Duration::from_secs(20), stream.message())
                .await
                .unwrap_or_else(|_| panic!("m{i} was never delivered after the ack"));
            match next.unwrap().unwrap().response {
                Some(Out::Message(m)) => break m,
                Some(_) => continue, // the previous ack's result
                None => panic!("empty response"),
            }
        };
        assert_eq!(body_str(&m), format!("m{i}"));
        tx.send(v1::SubscribeRequest {
            request: Some(In::Ack(v1::AckRequest {
                queue: "keyed".into(),
                receipts: vec![m.receipt],
            })),
        })
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn health_reflection_and_metrics() {
    let (_d, b) = broker().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", b.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "sluice.v1.Queues".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let services = match resp.message().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
        }
        other => panic!("{other:?}"),
    };
    assert!(
        services.contains(&"sluice.v1.Queues".to_string()),
        "{services:?}"
    );

    let mut c = b.client().await;
    enqueue(&mut c, "work", msg("x")).await.unwrap();
    let (code, body) = http_get(b.metrics, "/metrics");
    assert_eq!(code, 200);
    // Every per-partition metric the README names, under that name.
    for name in [
        "sluice_queue_ready",
        "sluice_queue_in_flight",
        "sluice_queue_delayed",
        "sluice_queue_bytes",
        "sluice_enqueued_total",
        "sluice_acked_total",
        "sluice_redelivered_total",
        "sluice_dead_lettered_total",
        "sluice_dropped_total",
    ] {
        assert!(
            body.contains(&format!("{name}{{queue=\"work\"")),
            "{name} missing: {body}"
        );
    }
    assert!(!body.contains("sluice_sluice_"), "{body}");
    assert!(body.contains("sluice_fsync_seconds_bucket"), "{body}");
    assert_eq!(http_get(b.metrics, "/readyz").0, 200);
    assert_eq!(http_get(b.metrics, "/healthz").0, 200);
    // The partition report: a single copy leads its partitions, all in sync.
    let (code, body) = http_get(b.metrics, "/partitions");
    assert_eq!(code, 200, "{body}");
    let reports: serde_json::Value = serde_json::from_str(&body).unwrap();
    let work: Vec<_> = reports
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["queue"] == "work")
        .collect();
    assert!(!work.is_empty(), "{body}");
    for r in work {
        assert_eq!(
            (&r["copies"], &r["leader"], &r["inSync"]),
            (&1.into(), &true.into(), &1.into()),
            "{body}"
        );
    }
}

#[tokio::test]
async fn auto_create_makes_queues_on_first_use_and_keeps_them_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Broker::start(dir.path(), "", 0).await;
    let mut c = b.client().await;
    enqueue(&mut c, "fresh", msg("hello")).await.unwrap();
    let status = b.proc.terminate().await;
    assert!(
        status.success(),
        "SIGTERM must end in exit 0, got {status:?}"
    );
    b.restart().await;
    let mut c = b.client().await;
    assert_eq!(stats(&mut c, "fresh").await.ready, 1);
    assert_eq!(body_str(&dequeue(&mut c, "fresh", 1, 0).await[0]), "hello");
}

#[tokio::test]
async fn long_polls_beyond_the_waiter_limit_are_refused_until_one_returns() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let b = Broker::start_with(dir.path(), QUEUES, 0, data, &["--max-waiters", "2"]).await;
    let c = b.client().await;
    let poll = |wait_ms: u64| {
        let mut c = c.clone();
        async move {
            c.dequeue(v1::DequeueRequest {
                queue: "keyed".into(),
                max_messages: 1,
                wait_ms,
                visibility_timeout_ms: 0,
            })
            .await
            .map(|r| r.into_inner().messages.len())
        }
    };
    // Three long polls at once with room for two: whichever comes last is refused
    // at once, the other two wait.
    let mut polls: Vec<_> = (0..3).map(|_| tokio::spawn(poll(60_000))).collect();
    let refused = eventually_within("one long poll refused", Duration::from_secs(10), || {
        let done = polls.iter().position(|p| p.is_finished());
        async move { done }
    })
    .await;
    let refused = polls.remove(refused).await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("--max-waiters"), "{refused:?}");
    let (first, second) = (polls.remove(0), polls.remove(0));
    assert!(
        !first.is_finished() && !second.is_finished(),
        "the others wait"
    );
    // A poll that does not wait takes no place, and a message wakes a waiter.
    assert_eq!(poll(0).await.unwrap(), 0);
    let mut producer = c.clone();
    enqueue(&mut producer, "keyed", msg("wake")).await.unwrap();
    enqueue(&mut producer, "keyed", msg("wake2")).await.unwrap();
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(second.await.unwrap().unwrap(), 1);
    // With the places given back, long polls are accepted again.
    enqueue(&mut producer, "keyed", msg("again")).await.unwrap();
    assert_eq!(poll(5_000).await.unwrap(), 1);
}

#[tokio::test]
async fn default_logs_carry_no_message_content_or_token() {
    let (_d, b) = broker().await;
    let mut c = b.client().await;
    let secret = |what: &str| format!("SECRET-{what}-7f3a");
    let mut m = msg(&secret("BODY"));
    m.key = secret("KEY");
    m.dedup_id = secret("DEDUP");
    m.attributes.insert(secret("ATTR"), secret("VALUE"));
    let mut req = tonic::Request::new(v1::EnqueueRequest {
        queue: "work".into(),
        message: Some(m.clone()),
        partition: None,
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", secret("TOKEN")).parse().unwrap(),
    );
    c.enqueue(req).await.unwrap();
    // Refused requests too: too big, to a queue that does not exist.
    let mut big = m.clone();
    big.body = vec![b'x'; 2048].into();
    assert!(enqueue(&mut c, "limited", big).await.is_err());
    assert!(enqueue(&mut c, "nosuch", m).await.is_err());
    let got = dequeue(&mut c, "work", 1, 1000).await;
    assert_eq!(got.len(), 1);
    ack(&mut c, "work", vec![got[0].receipt.clone()]).await;
    let log = b.proc.log_text();
    assert!(!log.is_empty(), "the broker logged at its default level");
    assert!(
        !log.contains("SECRET-"),
        "content or token in the log:\n{log}"
    );
}
