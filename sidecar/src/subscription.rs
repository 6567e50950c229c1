//! Subscribe through the sidecar: the app's stream is relayed over one broker
//! Subscribe stream per broker of the queue. Brokers push deliveries as the credit
//! allows, and acks and nacks go inline on the stream of the broker that owns their
//! partition. (A `Dequeue` long poll per fetch and an `Ack` call per settle cost a new
//! HTTP/2 stream each way per call; stream messages are a few frames.)
//!
//! Credit: the app's credit is shared out over the brokers, `ceil(credit / brokers)`
//! each, so together they lease at most `brokers - 1` messages beyond it; the app is
//! never sent more than its credit (the subscription loop keeps to it), and whatever
//! the brokers leased to this relay and it did not deliver is given back by the brokers
//! when their streams close with the app's.

use sluice_dataplane::SettleOp;
use sluice_dataplane::subscription::SubscriptionBackend;
use sluice_proto::v1;
use sluice_proto::v1::subscribe_request::Request as In;
use sluice_proto::v1::subscribe_response::Response as Out;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;

use crate::router::{BrokerConn, QueueRoute, is_transport_failure};
use crate::settle::{InlineAnswers, InlineSettle, settle};

/// How long a fetch waits for a delivery before it looks at the brokers again (one may
/// have come up, or its stream may have ended).
const FETCH_WAIT: Duration = Duration::from_secs(1);

type InlineAnswer = Result<Out, Status>;

/// Inline settles sent on a broker stream and not answered yet. The broker answers them
/// in the order they were sent; `open` turns false (under the same lock) when the
/// stream ends, after which nothing more is sent on it.
struct Inflight {
    open: bool,
    waiting: VecDeque<oneshot::Sender<InlineAnswer>>,
}

/// What a broker stream's reader task shares with the relay.
struct StreamState {
    broker: Arc<BrokerConn>,
    /// Credit granted to the broker and not used by a delivery yet.
    granted: AtomicU64,
    inflight: Mutex<Inflight>,
}

impl StreamState {
    fn is_open(&self) -> bool {
        self.inflight.lock().unwrap().open
    }
}

/// The relay's end of one broker stream. Dropping it ends the request stream: the
/// broker then gives back what it leased on it and unsettled.
struct BrokerStream {
    requests: mpsc::UnboundedSender<v1::SubscribeRequest>,
    state: Arc<StreamState>,
}

struct Relay {
    route: Arc<QueueRoute>,
    queue: String,
    streams: Mutex<HashMap<SocketAddr, BrokerStream>>,
    deliveries_tx: mpsc::UnboundedSender<Result<v1::Message, Status>>,
    deliveries: tokio::sync::Mutex<mpsc::UnboundedReceiver<Result<v1::Message, Status>>>,
}

/// A subscription backend relaying to broker Subscribe streams.
#[derive(Clone)]
pub struct RelayedSubscription(Arc<Relay>);

impl RelayedSubscription {
    pub fn new(route: Arc<QueueRoute>, queue: String) -> Self {
        let (deliveries_tx, rx) = mpsc::unbounded_channel();
        RelayedSubscription(Arc::new(Relay {
            route,
            queue,
            streams: Mutex::new(HashMap::new()),
            deliveries_tx,
            deliveries: tokio::sync::Mutex::new(rx),
        }))
    }
}

impl InlineSettle for RelayedSubscription {
    /// Sends an ack or nack inline on the open stream to `broker`, if there is one;
    /// the answer comes when the broker has settled them.
    fn settle_inline(
        &self,
        broker: SocketAddr,
        receipts: &[String],
        op: SettleOp,
    ) -> Option<InlineAnswers> {
        let request = match op {
            SettleOp::Ack => In::Ack(v1::AckRequest {
                queue: self.0.queue.clone(),
                receipts: receipts.to_vec(),
            }),
            SettleOp::Nack {
                delay_ms,
                dead_letter,
            } => In::Nack(v1::NackRequest {
                queue: self.0.queue.clone(),
                receipts: receipts.to_vec(),
                delay_ms,
                dead_letter,
            }),
            SettleOp::Extend { .. } => return None,
        };
        let streams = self.0.streams.lock().unwrap();
        let stream = streams.get(&broker)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut inflight = stream.state.inflight.lock().unwrap();
            if !inflight.open {
                return None;
            }
            stream
                .requests
                .send(v1::SubscribeRequest {
                    request: Some(request),
                })
                .ok()?;
            inflight.waiting.push_back(tx);
        }
        Some(Box::pin(async move {
            match rx.await {
                Ok(Ok(Out::Ack(a))) => Ok(a.results),
                Ok(Ok(Out::Nack(n))) => Ok(n.results),
                Ok(Ok(Out::Message(_))) => unreachable!("deliveries are not answers"),
                Ok(Err(status)) => Err(status),
                Err(_) => Err(Status::unavailable("the broker stream ended")),
            }
        }))
    }
}

impl Relay {
    /// Opens a stream to every healthy broker that has none, and tops each stream's
    /// credit up to its share of `credit`.
    fn grant(&self, credit: usize, visibility_ms: u64) -> Result<(), Status> {
        let healthy = self.route.healthy_brokers();
        let mut streams = self.streams.lock().unwrap();
        streams.retain(|_, s| s.state.is_open());
        for b in healthy {
            if !streams.contains_key(&b.addr) {
                let addr = b.addr;
                streams.insert(addr, self.open(b, visibility_ms));
            }
        }
        if streams.is_empty() {
            return Err(self
                .route
                .settings()
                .err()
                .unwrap_or_else(|| Status::unavailable("no broker reachable")));
        }
        let share = credit.div_ceil(streams.len()) as u64;
        for s in streams.values() {
            let granted = s.state.granted.load(Ordering::Relaxed);
            if share > granted {
                let more = share - granted;
                s.state.granted.fetch_add(more, Ordering::Relaxed);
                let _ = s.requests.send(v1::SubscribeRequest {
                    request: Some(In::Credit(more as u32)),
                });
            }
        }
        Ok(())
    }

    /// Starts a broker stream and the task reading it: deliveries go to the relay's
    /// queue, answers to the settles waiting for them.
    fn open(&self, broker: Arc<BrokerConn>, visibility_ms: u64) -> BrokerStream {
        let (requests, rx) = mpsc::unbounded_channel();
        let _ = requests.send(v1::SubscribeRequest {
            request: Some(In::Start(v1::SubscribeStart {
                queue: self.queue.clone(),
                visibility_timeout_ms: visibility_ms,
                initial_credit: 0,
            })),
        });
        let state = Arc::new(StreamState {
            broker,
            granted: AtomicU64::new(0),
            inflight: Mutex::new(Inflight {
                open: true,
                waiting: VecDeque::new(),
            }),
        });
        let (st, deliveries) = (state.clone(), self.deliveries_tx.clone());
        tokio::spawn(async move {
            let mut client = st.broker.client();
            let read = async {
                let mut answers = client
                    .subscribe(UnboundedReceiverStream::new(rx))
                    .await?
                    .into_inner();
                while let Some(answer) = answers.message().await? {
                    match answer.response {
                        Some(Out::Message(m)) => {
                            let _ = st.granted.fetch_update(
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                                |g| Some(g.saturating_sub(1)),
                            );
                            let _ = deliveries.send(Ok(m));
                        }
                        Some(settled) => {
                            let waiter = st.inflight.lock().unwrap().waiting.pop_front();
                            if let Some(w) = waiter {
                                let _ = w.send(Ok(settled));
                            }
                        }
                        None => {}
                    }
                }
                Ok(())
            };
            // A stream the broker ended cleanly (it is shutting down, or the relay
            // closed its side) says nothing about the broker's health; an error does.
            let status = match read.await {
                Ok(()) => {
                    Status::unavailable(format!("broker {} ended the subscription", st.broker.addr))
                }
                Err(_) if deliveries.is_closed() => return,
                Err(e) => st.broker.failed(e),
            };
            let waiting = {
                let mut inflight = st.inflight.lock().unwrap();
                inflight.open = false;
                std::mem::take(&mut inflight.waiting)
            };
            for w in waiting {
                let _ = w.send(Err(status.clone()));
            }
            // A broker that refuses the subscription (not one that went away) is the
            // app's answer; the next fetch carries it there.
            if !is_transport_failure(&status) && !deliveries.is_closed() {
                let _ = deliveries.send(Err(status));
            }
        });
        BrokerStream { requests, state }
    }
}

/// Moves queued deliveries into `out`, up to `max`.
fn take_queued(
    rx: &mut mpsc::UnboundedReceiver<Result<v1::Message, Status>>,
    out: &mut Vec<v1::Message>,
    max: usize,
) -> Result<(), Status> {
    while out.len() < max {
        match rx.try_recv() {
            Ok(m) => out.push(m?),
            Err(_) => break,
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl SubscriptionBackend for RelayedSubscription {
    async fn fetch(&self, credit: usize, visibility_ms: u64) -> Result<Vec<v1::Message>, Status> {
        let relay = &self.0;
        let mut rx = relay.deliveries.lock().await;
        let mut out = Vec::new();
        take_queued(&mut rx, &mut out, credit)?;
        // Top up with every fetch, not only when the queue ran dry: the brokers keep
        // pushing while these deliveries go out.
        match relay.grant(credit - out.len(), visibility_ms) {
            _ if !out.is_empty() => return Ok(out),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        match tokio::time::timeout(FETCH_WAIT, rx.recv()).await {
            Ok(Some(first)) => out.push(first?),
            _ => return Ok(out),
        }
        take_queued(&mut rx, &mut out, credit)?;
        Ok(out)
    }

    async fn ack(&self, receipts: Vec<String>) -> Result<Vec<v1::ReceiptResult>, Status> {
        let relay = &self.0;
        settle(
            &relay.route,
            &relay.queue,
            receipts,
            SettleOp::Ack,
            Some(self as &dyn InlineSettle),
        )
        .await
    }

    async fn nack(
        &self,
        receipts: Vec<String>,
        delay_ms: u64,
        dead_letter: bool,
    ) -> Result<Vec<v1::ReceiptResult>, Status> {
        let relay = &self.0;
        let op = SettleOp::Nack {
            delay_ms,
            dead_letter,
        };
        let inline = Some(self as &dyn InlineSettle);
        settle(&relay.route, &relay.queue, receipts, op, inline).await
    }
}
