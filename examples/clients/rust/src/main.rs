//! Producing and consuming through the Sluice sidecar with tonic.
//!
//! The app talks to the sidecar on localhost (SLUICE_ADDR, set by the injection),
//! with no broker address and no password. Like ../python/orders.py, this example:
//! - enqueues --count orders, keyed by customer (one customer's orders stay in order);
//! - consumes on one Subscribe stream until SIGTERM or SIGINT, as a consumer in a pod
//!   does: credit for 16 deliveries at a time, acks sent inline on the stream, and a
//!   nack with a delay for the first delivery of every tenth order (try again in a
//!   while, as when a downstream call fails);
//! - on the signal, drops the stream: what it held and did not settle goes back to
//!   the queue at once;
//! - prints what happened as JSON.

use clap::Parser;
use sluice_proto::v1::queues_client::QueuesClient;
use sluice_proto::v1::subscribe_request::Request as Up;
use sluice_proto::v1::subscribe_response::Response as Down;
use sluice_proto::v1::{
    AckRequest, EnqueueRequest, NackRequest, NewMessage, StatsRequest, SubscribeRequest,
    SubscribeStart,
};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CREDIT: u32 = 16;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "SLUICE_ADDR", default_value = "127.0.0.1:7070")]
    addr: String,
    #[arg(long, default_value = "orders")]
    queue: String,
    #[arg(long, default_value_t = 100)]
    count: u64,
}

async fn send(up: &mpsc::Sender<SubscribeRequest>, r: Up) -> anyhow::Result<()> {
    up.send(SubscribeRequest { request: Some(r) }).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut client = QueuesClient::connect(format!("http://{}", a.addr)).await?;
    for i in 0..a.count {
        let message = NewMessage {
            body: format!("order-{i}").into(),
            key: format!("customer-{}", i % 3),
            attributes: [("kind".to_string(), "order".to_string())].into(),
            ..Default::default()
        };
        let queue = a.queue.clone();
        client
            .enqueue(EnqueueRequest {
                queue,
                message: Some(message),
                partition: None,
            })
            .await?;
    }

    let (up, rx) = mpsc::channel(64);
    let start = SubscribeStart {
        queue: a.queue.clone(),
        initial_credit: CREDIT,
        ..Default::default()
    };
    send(&up, Up::Start(start)).await?;
    let mut down = client
        .subscribe(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let (mut term, mut int) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    );
    let (mut acked, mut nacked, mut redelivered) = (0u64, 0u64, 0u64);
    loop {
        let resp = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            resp = down.message() => resp?,
        };
        let Some(resp) = resp.and_then(|r| r.response) else {
            break; // the sidecar ended the stream
        };
        let m = match resp {
            // The answer to an inline ack: settled once it says OK (0).
            Down::Ack(ack) => {
                acked += ack.results.iter().filter(|r| r.code == 0).count() as u64;
                continue;
            }
            Down::Nack(_) => continue,
            Down::Message(m) => m,
        };
        let i: u64 = String::from_utf8_lossy(&m.body)
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        if m.delivery_count > 1 {
            redelivered += 1;
        }
        let queue = a.queue.clone();
        let receipts = vec![m.receipt];
        if i.is_multiple_of(10) && m.delivery_count == 1 {
            // Not now: back in the queue for 200 ms, then delivered again.
            let nack = NackRequest {
                queue,
                receipts,
                delay_ms: 200,
                dead_letter: false,
            };
            send(&up, Up::Nack(nack)).await?;
            nacked += 1;
        } else {
            send(&up, Up::Ack(AckRequest { queue, receipts })).await?;
        }
        send(&up, Up::Credit(1)).await?;
    }
    // Dropping both halves cancels the call: unsettled deliveries go back at once.
    drop((down, up));
    let stats = client
        .stats(StatsRequest {
            queue: a.queue.clone(),
        })
        .await?
        .into_inner();
    let summary = serde_json::json!({
        "client": "rust", "sent": a.count, "acked": acked, "nacked": nacked,
        "redelivered": redelivered, "ready_after": stats.ready,
        "in_flight_after": stats.in_flight,
    });
    println!("{summary}");
    Ok(())
}
