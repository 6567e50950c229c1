//! W3C trace context across the queue (`sluice_dataplane::trace`): `traceparent` and
//! `tracestate` in an enqueue's gRPC metadata come back as attributes of the
//! delivered message, through the sidecar (Enqueue, EnqueueBatch; Dequeue, Subscribe)
//! and straight to a broker; the app's own attribute of that name wins, and a
//! malformed one is not carried.

use sluice_integration::*;
use sluice_proto::v1;
use sluice_proto::v1::queues_client::QueuesClient;
use std::collections::HashMap;
use std::time::Duration;
use tonic::transport::Channel;

const QUEUE: &str = r#"
[[queue]]
name = "orders"
partitions = 2
"#;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn traced<T>(body: T, parent: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(body);
    req.metadata_mut()
        .insert("traceparent", parent.parse().unwrap());
    req.metadata_mut()
        .insert("tracestate", "sluice=t1".parse().unwrap());
    req
}

fn new_message(body: &str, attributes: &[(&str, &str)]) -> v1::NewMessage {
    v1::NewMessage {
        body: body.as_bytes().to_vec().into(),
        attributes: attributes
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// Every message of `orders` by body, with its attributes.
async fn delivered(c: &mut QueuesClient<Channel>) -> HashMap<String, HashMap<String, String>> {
    drain(c, "orders", 300)
        .await
        .into_iter()
        .map(|m| (String::from_utf8_lossy(&m.body).to_string(), m.attributes))
        .collect()
}

async fn enqueue_traced(c: &mut QueuesClient<Channel>) {
    let one = v1::EnqueueRequest {
        queue: "orders".into(),
        message: Some(new_message("single", &[("kind", "order")])),
        partition: None,
    };
    c.enqueue(traced(one, PARENT)).await.unwrap();
    let batch = v1::EnqueueBatchRequest {
        queue: "orders".into(),
        messages: vec![
            new_message("batched", &[]),
            new_message("own", &[("traceparent", "the app's own")]),
        ],
        partition: None,
    };
    c.enqueue_batch(traced(batch, PARENT)).await.unwrap();
    let bad = v1::EnqueueRequest {
        queue: "orders".into(),
        message: Some(new_message("malformed", &[])),
        partition: None,
    };
    c.enqueue(traced(bad, "00-not-a-trace-01")).await.unwrap();
    enqueue(c, "orders", new_message("untraced", &[]))
        .await
        .unwrap();
}

fn check(got: &HashMap<String, HashMap<String, String>>) {
    for body in ["single", "batched"] {
        let a = &got[body];
        assert_eq!(
            a.get("traceparent").map(String::as_str),
            Some(PARENT),
            "{body}: {a:?}"
        );
        assert_eq!(
            a.get("tracestate").map(String::as_str),
            Some("sluice=t1"),
            "{body}"
        );
    }
    assert_eq!(got["single"]["kind"], "order", "the app's attributes stay");
    assert_eq!(got["own"]["traceparent"], "the app's own");
    assert!(!got["own"].contains_key("tracestate"), "{:?}", got["own"]);
    assert!(got["malformed"].is_empty(), "{:?}", got["malformed"]);
    assert!(got["untraced"].is_empty(), "{:?}", got["untraced"]);
}

#[tokio::test]
async fn the_trace_context_of_an_enqueue_comes_back_with_the_delivery_through_the_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), QUEUE, 0).await;
    let sidecar = Sidecar::start(dir.path(), &format!("orders={}", broker.addr)).await;
    eventually_within("sidecar readiness", Duration::from_secs(10), || async {
        (http_get(sidecar.metrics, "/readyz").0 == 200).then_some(())
    })
    .await;
    let mut app = sidecar.client().await;
    enqueue_traced(&mut app).await;
    check(&delivered(&mut app).await);

    // A Subscribe delivery carries it too.
    let one = v1::EnqueueRequest {
        queue: "orders".into(),
        message: Some(new_message("streamed", &[])),
        partition: None,
    };
    app.enqueue(traced(one, PARENT)).await.unwrap();
    let (m, _stream) = first_subscribed(&mut app, "orders").await;
    assert_eq!(&m.body[..], b"streamed");
    assert_eq!(m.attributes["traceparent"], PARENT);
}

#[tokio::test]
async fn the_trace_context_of_an_enqueue_comes_back_with_the_delivery_from_a_broker() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), QUEUE, 0).await;
    let mut c = broker.client().await;
    enqueue_traced(&mut c).await;
    check(&delivered(&mut c).await);
}
