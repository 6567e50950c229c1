//! An enqueue whose call is cancelled once its write has begun (a client gone at its
//! deadline, which drops the server's handler): the write's outcome is still applied,
//! so the message is delivered, and a retry with the same dedup id is acknowledged as
//! its duplicate instead of waiting on it forever.

use sluice_broker::metrics::Metrics;
use sluice_broker::partition::{EnqueueOutcome, NewMessage};
use sluice_broker::{Broker, BrokerOptions};
use sluice_config::QueueSettings;
use std::future::Future;
use std::task::{Context, Waker};
use std::time::Duration;

fn message(dedup_id: &str) -> NewMessage {
    NewMessage {
        body: bytes::Bytes::from_static(b"once"),
        attributes: vec![],
        key: String::new(),
        dedup_id: dedup_id.into(),
        delay_ms: 0,
    }
}

#[tokio::test]
async fn a_cancelled_enqueue_is_still_stored_and_its_retry_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = BrokerOptions::new(dir.path());
    options.auto_create = Some(QueueSettings {
        partitions: 1,
        ..QueueSettings::default()
    });
    let broker = Broker::open(options, Metrics::new()).unwrap();
    broker.recover().await.unwrap();
    let queue = broker.queue("orders").await.unwrap();
    let partition = queue.partition(0).unwrap();

    // Polled once: the message is reserved and its write queued; then the call goes.
    let mut first = Box::pin(partition.enqueue(vec![message("m1")]));
    let polled = first.as_mut().poll(&mut Context::from_waker(Waker::noop()));
    assert!(polled.is_pending(), "the write cannot be durable yet");
    drop(first);

    let retry = tokio::time::timeout(
        Duration::from_secs(30),
        partition.enqueue(vec![message("m1")]),
    )
    .await
    .expect("the retry waits only for the first write")
    .unwrap();
    assert!(
        matches!(retry[0], EnqueueOutcome::Duplicate(_)),
        "{retry:?}"
    );

    let got = queue
        .dequeue(10, Duration::from_secs(1), 30_000)
        .await
        .unwrap();
    assert_eq!(got.len(), 1, "the cancelled call's message is there, once");
    assert_eq!(&got[0].body[..], b"once");
}
