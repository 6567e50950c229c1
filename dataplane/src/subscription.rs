//! The one loop that drives a Subscribe stream, for the broker (over its own queue)
//! and the sidecar (over a relay to the brokers' streams) alike: deliveries as the
//! client's credit allows, acks and nacks inline, and what was delivered but not
//! settled given back when the stream ends. What differs between the two is behind
//! [`SubscriptionBackend`].

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use sluice_config::MAX_DELAY;
use sluice_proto::v1;
use std::collections::HashSet;
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::validate::Invalid;

/// Most credit one Subscribe stream may hold (a client cannot make the broker lease
/// unbounded numbers of messages to it).
pub const MAX_CREDIT: u64 = 10_000;

/// The server's half of a Subscribe call.
pub type SubscribeStream =
    Pin<Box<dyn Stream<Item = Result<v1::SubscribeResponse, Status>> + Send>>;

/// What a Subscribe stream needs from whatever serves it: the broker's own queue,
/// or the sidecar's route to the brokers. One subscription loop serves both.
#[tonic::async_trait]
pub trait SubscriptionBackend: Send + Sync + 'static {
    /// Leases messages, waiting a while for the first: at most `credit`, the
    /// deliveries the client can still take (a backend may lease fewer per call).
    async fn fetch(&self, credit: usize, visibility_ms: u64) -> Result<Vec<v1::Message>, Status>;
    async fn ack(&self, receipts: Vec<String>) -> Result<Vec<v1::ReceiptResult>, Status>;
    async fn nack(
        &self,
        receipts: Vec<String>,
        delay_ms: u64,
        dead_letter: bool,
    ) -> Result<Vec<v1::ReceiptResult>, Status>;
}

/// A shared backend serves like the backend itself (the broker's `Arc<Queue>`).
#[tonic::async_trait]
impl<T: SubscriptionBackend> SubscriptionBackend for std::sync::Arc<T> {
    async fn fetch(&self, credit: usize, visibility_ms: u64) -> Result<Vec<v1::Message>, Status> {
        T::fetch(self, credit, visibility_ms).await
    }
    async fn ack(&self, receipts: Vec<String>) -> Result<Vec<v1::ReceiptResult>, Status> {
        T::ack(self, receipts).await
    }
    async fn nack(
        &self,
        receipts: Vec<String>,
        delay_ms: u64,
        dead_letter: bool,
    ) -> Result<Vec<v1::ReceiptResult>, Status> {
        T::nack(self, receipts, delay_ms, dead_letter).await
    }
}

type Fetch = Pin<Box<dyn std::future::Future<Output = Result<Vec<v1::Message>, Status>> + Send>>;
type Settling = Pin<
    Box<dyn std::future::Future<Output = Result<v1::subscribe_response::Response, Status>> + Send>,
>;

/// Acks and nacks of one subscription settling at once. Each waits for its fsync (and,
/// through the sidecar, a broker round trip): settled one after another, they would
/// cap a subscription at one settle per fsync; in flight together, the broker covers
/// them with one group commit.
const MAX_SETTLING: usize = 64;

/// Reads the `start` message of a Subscribe stream.
pub async fn subscription_start(
    inbound: &mut Streaming<v1::SubscribeRequest>,
) -> Result<v1::SubscribeStart, Status> {
    match inbound.message().await? {
        Some(v1::SubscribeRequest {
            request: Some(v1::subscribe_request::Request::Start(s)),
        }) => Ok(s),
        _ => Err(Invalid::new("the first message of a subscription must be `start`").into()),
    }
}

/// Drives one Subscribe stream: deliveries as credit allows, acks and nacks inline
/// (up to [`MAX_SETTLING`] in flight, answered in the order they came).
/// A fetch in progress is never cancelled (a cancelled remote fetch could strand
/// leased messages), and messages delivered but unsettled when the stream ends are
/// given back at once, as AMQP does with a closed channel's unacknowledged messages.
/// When `ends` resolves (the server is shutting down), the stream ends with the
/// status it gives, the same way.
pub fn spawn_subscription<B: SubscriptionBackend + Clone>(
    backend: B,
    start: &v1::SubscribeStart,
    visibility_ms: u64,
    mut inbound: Streaming<v1::SubscribeRequest>,
    ends: impl Future<Output = Status> + Send + 'static,
) -> SubscribeStream {
    use v1::subscribe_request::Request as In;
    use v1::subscribe_response::Response as Out;
    let (tx, rx) = mpsc::channel::<Result<v1::SubscribeResponse, Status>>(256);
    let mut credit = u64::from(start.initial_credit).min(MAX_CREDIT);
    let queue = start.queue.clone();
    tokio::spawn(async move {
        let mut ends = std::pin::pin!(ends);
        let send = |out: Out| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(v1::SubscribeResponse {
                    response: Some(out),
                }))
                .await
                .is_ok()
            }
        };
        let mut outstanding: HashSet<String> = HashSet::new();
        let mut fetch: Option<Fetch> = None;
        let mut settling: FuturesOrdered<Settling> = FuturesOrdered::new();
        'stream: loop {
            if fetch.is_none() && credit > 0 {
                let (b, credit) = (backend.clone(), credit as usize);
                fetch = Some(Box::pin(
                    async move { b.fetch(credit, visibility_ms).await },
                ));
            }
            tokio::select! {
                status = &mut ends => {
                    let _ = tx.send(Err(status)).await;
                    break 'stream;
                }
                incoming = inbound.message(), if settling.len() < MAX_SETTLING => {
                    match incoming {
                        Ok(Some(v1::SubscribeRequest { request: Some(In::Credit(n)) })) => {
                            credit = (credit + u64::from(n)).min(MAX_CREDIT);
                        }
                        Ok(Some(v1::SubscribeRequest { request: Some(In::Ack(a)) })) => {
                            for r in &a.receipts {
                                outstanding.remove(r);
                            }
                            let b = backend.clone();
                            settling.push_back(Box::pin(async move {
                                let results = b.ack(a.receipts).await?;
                                Ok(Out::Ack(v1::AckResponse { results }))
                            }));
                        }
                        Ok(Some(v1::SubscribeRequest { request: Some(In::Nack(n)) })) => {
                            for r in &n.receipts {
                                outstanding.remove(r);
                            }
                            let delay = n.delay_ms.min(MAX_DELAY.as_millis() as u64);
                            let b = backend.clone();
                            settling.push_back(Box::pin(async move {
                                let results = b.nack(n.receipts, delay, n.dead_letter).await?;
                                Ok(Out::Nack(v1::NackResponse { results }))
                            }));
                        }
                        Ok(Some(_)) => {
                            let e = Invalid::new("expected credit, ack or nack after start");
                            let _ = tx.send(Err(e.into())).await;
                            break 'stream;
                        }
                        Ok(None) | Err(_) => break 'stream,
                    }
                }
                Some(reply) = settling.next(), if !settling.is_empty() => {
                    match reply {
                        Ok(out) => {
                            if !send(out).await {
                                break 'stream;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            break 'stream;
                        }
                    }
                }
                got = async { fetch.as_mut().expect("guarded by the condition").await }, if fetch.is_some() => {
                    fetch = None;
                    match got {
                        Ok(messages) => {
                            crate::trace::delivered(&queue, &messages);
                            for m in messages {
                                credit = credit.saturating_sub(1);
                                outstanding.insert(m.receipt.clone());
                                if !send(Out::Message(m)).await {
                                    break 'stream;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            break 'stream;
                        }
                    }
                }
            }
        }
        // Settles already asked for still happen (their answers may have nobody to go to).
        while settling.next().await.is_some() {}
        // A fetch still running may yet lease messages: give those back too.
        if let Some(f) = fetch
            && let Ok(messages) = f.await
        {
            outstanding.extend(messages.into_iter().map(|m| m.receipt));
        }
        if !outstanding.is_empty() {
            let _ = backend
                .nack(outstanding.into_iter().collect(), 0, false)
                .await;
        }
    });
    Box::pin(ReceiverStream::new(rx))
}
