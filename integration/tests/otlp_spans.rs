//! Spans across the queue, exported over OTLP (`sluice_dataplane::trace`): with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set, sidecar and broker send their enqueue, delivery
//! and settle spans to that collector, and they join the app's traces: the producer's
//! span is the parent of the sidecar's `send`, whose context the message carries to
//! every `receive`; the consumer's span is the parent of the sidecar's `ack`, whose
//! context the broker's `ack` continues.
//!
//! The collector is a receiver in this test serving OTLP's gRPC TraceService, from
//! the protocol's own generated code (`opentelemetry-proto`): neither the
//! OpenTelemetry Collector nor Jaeger can be installed on these machines.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use sluice_integration::*;
use sluice_proto::v1;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const QUEUE: &str = r#"
[[queue]]
name = "orders"
partitions = 2
"#;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER: &str = "00f067aa0ba902b7";
const CONSUMER: &str = "b7ad6b7169203331";
const STREAMED_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

/// A span as the collector got it, with the service that sent it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    kind: i32,
    trace: String,
    id: String,
    parent: String,
    links: Vec<(String, String)>,
}

#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                spans.push(Got {
                    service: service.clone(),
                    name: s.name,
                    kind: s.kind,
                    trace: hex(&s.trace_id),
                    id: hex(&s.span_id),
                    parent: hex(&s.parent_span_id),
                    links: s
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn traced<T>(body: T, trace: &str, span: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(body);
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{span}-01").parse().unwrap(),
    );
    req
}

/// The span id in a message's `traceparent` attribute (and checks its trace).
fn carried_span(m: &v1::Message, trace: &str) -> String {
    let tp = &m.attributes["traceparent"];
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts[1], trace, "the message stays in its producer's trace");
    parts[2].to_string()
}

impl Collector {
    /// Waits (up to 30 s: the batch exporter sends every 100 ms here) for a span of
    /// `service` named `name` that `matches`.
    async fn find(&self, service: &str, name: &str, matches: impl Fn(&Got) -> bool) -> Got {
        eventually_within(
            &format!("{service}'s {name:?} span"),
            Duration::from_secs(30),
            || async {
                self.spans
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|s| s.service == service && s.name == name && matches(s))
                    .cloned()
            },
        )
        .await
    }

    /// The span of `service` named `name` in `trace`.
    async fn span(&self, service: &str, name: &str, trace: &str) -> Got {
        self.find(service, name, |s| s.trace == trace).await
    }

    /// A span of `service` named `name` linking to `(trace, span)`.
    async fn linking(&self, service: &str, name: &str, trace: &str, span: &str) -> Got {
        let link = (trace.to_string(), span.to_string());
        self.find(service, name, |s| s.links.contains(&link)).await
    }
}

#[tokio::test]
async fn enqueue_delivery_and_ack_spans_reach_an_otlp_collector_in_the_apps_trace() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // SAFETY: the test's runtime is single-threaded and nothing else runs yet (nextest
    // gives each test its own process); broker and sidecar inherit these.
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
        std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    }
    let dir = test_dir();
    let broker = Broker::start(dir.path(), QUEUE, 0).await;
    let sidecar = Sidecar::start(dir.path(), &route("orders", [broker.addr])).await;
    let mut app = sidecar.client().await;

    // The producer's span is the parent of the sidecar's send, whose context the
    // message carries; the broker's send (a batch the sidecar gathered) links to it.
    let one = v1::EnqueueRequest {
        queue: "orders".into(),
        message: Some(msg("traced")),
        partition: None,
    };
    app.enqueue(traced(one, TRACE, PRODUCER)).await.unwrap();
    let send = collector.span("sluice-sidecar", "send orders", TRACE).await;
    assert_eq!(send.parent, PRODUCER, "{send:?}");
    assert_eq!(send.kind, SpanKind::Producer as i32);
    let stored = collector
        .linking("sluice-broker", "send orders", TRACE, &send.id)
        .await;
    assert_eq!(stored.kind, SpanKind::Producer as i32);

    // Each delivery's span is a child of the context the message carries, and the
    // consumer gets that context to continue from.
    let got = dequeue(&mut app, "orders", 10, 5000).await;
    assert_eq!(got.len(), 1);
    assert_eq!(carried_span(&got[0], TRACE), send.id);
    for service in ["sluice-sidecar", "sluice-broker"] {
        let receive = collector.span(service, "receive orders", TRACE).await;
        assert_eq!(receive.parent, send.id, "{receive:?}");
        assert_eq!(receive.kind, SpanKind::Consumer as i32);
    }

    // The consumer's span is the parent of the sidecar's ack, and the broker's ack
    // is the child of the sidecar's (its context crosses in the call's metadata).
    let ack = v1::AckRequest {
        queue: "orders".into(),
        receipts: vec![got[0].receipt.clone()],
    };
    let results = app
        .ack(traced(ack, TRACE, CONSUMER))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results[0].code, 0, "{}", results[0].error);
    let client = collector.span("sluice-sidecar", "ack orders", TRACE).await;
    assert_eq!(client.parent, CONSUMER, "{client:?}");
    assert_eq!(client.kind, SpanKind::Client as i32);
    let server = collector.span("sluice-broker", "ack orders", TRACE).await;
    assert_eq!(server.parent, client.id, "{server:?}");
    assert_eq!(server.kind, SpanKind::Server as i32);

    // A Subscribe delivery has its span too, in the message's own trace.
    let streamed = v1::EnqueueRequest {
        queue: "orders".into(),
        message: Some(msg("streamed")),
        partition: None,
    };
    app.enqueue(traced(streamed, STREAMED_TRACE, PRODUCER))
        .await
        .unwrap();
    let (m, _stream) = first_subscribed(&mut app, "orders").await;
    let streamed_send = collector
        .span("sluice-sidecar", "send orders", STREAMED_TRACE)
        .await;
    assert_eq!(carried_span(&m, STREAMED_TRACE), streamed_send.id);
    let receive = collector
        .span("sluice-sidecar", "receive orders", STREAMED_TRACE)
        .await;
    assert_eq!(receive.parent, streamed_send.id, "{receive:?}");
}
