//! The `sluice.v1.Queues` service as the app sees it on localhost: every call routed
//! to the brokers of its queue.

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use sluice_broker::service::{
    SubscribeStream, spawn_subscription, subscription_start, validate_message,
};
use sluice_proto::v1::{self, queues_server::Queues};
use sluice_proto::{Receipt, partition_for_key};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::router::{BrokerConn, CALL_TIMEOUT, QueueRoute, Router, is_transport_failure};
use crate::subscription::RelayedSubscription;

fn timed<T>(msg: T, extra: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(CALL_TIMEOUT + extra);
    r
}

/// Checks a message against the queue's limits before it joins a shared batch, so
/// one bad message cannot fail the batch of others.
fn check(route: &QueueRoute, m: &v1::NewMessage) -> Result<(), Status> {
    let settings = route.settings()?;
    validate_message(m.clone(), settings.max_message_bytes)
        .map(|_| ())
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

fn partition_of(
    route: &QueueRoute,
    m: &v1::NewMessage,
    explicit: Option<u32>,
) -> Result<u32, Status> {
    let n = route.partitions();
    if let Some(p) = explicit {
        return Ok(p);
    }
    if n == 0 {
        return route.any_partition(None);
    }
    if !m.key.is_empty() {
        Ok(partition_for_key(&m.key, n))
    } else if !m.dedup_id.is_empty() {
        Ok(partition_for_key(&m.dedup_id, n))
    } else {
        route.any_partition(None)
    }
}

#[derive(Clone, Copy)]
pub(crate) enum SettleOp {
    Ack,
    Nack { delay_ms: u64, dead_letter: bool },
    Extend { visibility_ms: u64 },
}

fn failed_result(receipt: &str, status: &Status) -> v1::ReceiptResult {
    v1::ReceiptResult {
        receipt: receipt.to_string(),
        code: status.code() as i32,
        error: status.message().to_string(),
    }
}

/// Sends receipts to the brokers owning their partitions; answers in order. Acks and
/// nacks of a relayed subscription go inline on its stream to the owner when it has
/// one, everything else as calls.
pub(crate) async fn settle(
    route: &QueueRoute,
    queue: &str,
    receipts: Vec<String>,
    op: SettleOp,
    relay: Option<&RelayedSubscription>,
) -> Result<Vec<v1::ReceiptResult>, Status> {
    if receipts.is_empty() {
        return Err(Status::invalid_argument("no receipts given"));
    }
    let mut results: Vec<Option<v1::ReceiptResult>> = vec![None; receipts.len()];
    let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, r) in receipts.iter().enumerate() {
        match r.parse::<Receipt>() {
            Ok(rc) => groups.entry(rc.partition).or_default().push(i),
            Err(why) => results[i] = Some(failed_result(r, &Status::invalid_argument(why))),
        }
    }
    let calls = groups.into_iter().map(|(p, idx)| {
        let batch: Vec<String> = idx.iter().map(|&i| receipts[i].clone()).collect();
        async move {
            let broker = route.owner(p)?;
            if let Some(inline) = relay.and_then(|r| r.settle_inline(broker.addr, &batch, op)) {
                // The stream's reader has judged the broker's health already.
                return inline.await;
            }
            let mut c = broker.client();
            let q = queue.to_string();
            let out = match op {
                SettleOp::Ack => c
                    .ack(timed(
                        v1::AckRequest {
                            queue: q,
                            receipts: batch,
                        },
                        Duration::ZERO,
                    ))
                    .await
                    .map(|r| r.into_inner().results),
                SettleOp::Nack {
                    delay_ms,
                    dead_letter,
                } => c
                    .nack(timed(
                        v1::NackRequest {
                            queue: q,
                            receipts: batch,
                            delay_ms,
                            dead_letter,
                        },
                        Duration::ZERO,
                    ))
                    .await
                    .map(|r| r.into_inner().results),
                SettleOp::Extend { visibility_ms } => c
                    .extend_visibility(timed(
                        v1::ExtendVisibilityRequest {
                            queue: q,
                            receipts: batch,
                            visibility_timeout_ms: visibility_ms,
                        },
                        Duration::ZERO,
                    ))
                    .await
                    .map(|r| r.into_inner().results),
            };
            out.map_err(|e| broker.failed(e))
        }
        .then_map(idx)
    });
    for (idx, outcome) in futures::future::join_all(calls).await {
        match outcome {
            Ok(rs) => {
                for (i, r) in idx.into_iter().zip(rs) {
                    results[i] = Some(r);
                }
            }
            Err(status) if status.code() == Code::InvalidArgument => return Err(status),
            Err(status) => {
                for i in idx {
                    results[i] = Some(failed_result(&receipts[i], &status));
                }
            }
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every receipt answered"))
        .collect())
}

/// Pairs a future's output with a value known up front.
trait ThenMap: std::future::Future + Sized {
    fn then_map<T>(self, t: T) -> impl std::future::Future<Output = (T, Self::Output)> {
        async move { (t, self.await) }
    }
}
impl<F: std::future::Future> ThenMap for F {}

async fn dequeue_from(
    broker: &BrokerConn,
    req: v1::DequeueRequest,
) -> Result<Vec<v1::Message>, Status> {
    let wait = Duration::from_millis(req.wait_ms);
    let out = broker
        .client()
        .dequeue(timed(req, wait))
        .await
        .map(|r| r.into_inner().messages);
    out.map_err(|e| broker.failed(e))
}

/// Leases up to `max` messages from whichever brokers have them. With several
/// brokers: a quick pass without waiting, then a long poll on all at once; the
/// first to answer with messages wins, and messages the others still lease are
/// given back at once (a dropped remote call could strand them until their lease
/// ran out).
async fn dequeue_any(
    route: &Arc<QueueRoute>,
    req: v1::DequeueRequest,
) -> Result<Vec<v1::Message>, Status> {
    let brokers = route.healthy_brokers();
    let max = req.max_messages.max(1) as usize;
    match brokers.len() {
        0 => {
            return Err(route
                .settings()
                .err()
                .unwrap_or_else(|| Status::unavailable("no broker reachable")));
        }
        1 => return dequeue_from(&brokers[0], req).await,
        _ => {}
    }
    let mut out = Vec::new();
    let mut last_err = None;
    for b in &brokers {
        let quick = v1::DequeueRequest {
            max_messages: (max - out.len()) as u32,
            wait_ms: 0,
            ..req.clone()
        };
        match dequeue_from(b, quick).await {
            Ok(m) => out.extend(m),
            Err(e) if is_transport_failure(&e) => last_err = Some(e),
            Err(e) => return Err(e),
        }
        if out.len() >= max {
            break;
        }
    }
    if !out.is_empty() || req.wait_ms == 0 {
        return match (out.is_empty(), last_err) {
            (true, Some(e)) => Err(e),
            _ => Ok(out),
        };
    }
    let mut polls: FuturesUnordered<_> = brokers
        .iter()
        .cloned()
        .map(|b| {
            let req = req.clone();
            async move { dequeue_from(&b, req).await }
        })
        .collect();
    while let Some(result) = polls.next().await {
        match result {
            Ok(m) if !m.is_empty() => {
                let (route, queue) = (route.clone(), req.queue.clone());
                tokio::spawn(async move {
                    while let Some(late) = polls.next().await {
                        let receipts: Vec<String> =
                            late.into_iter().flatten().map(|m| m.receipt).collect();
                        if !receipts.is_empty() {
                            let op = SettleOp::Nack {
                                delay_ms: 0,
                                dead_letter: false,
                            };
                            let _ = settle(&route, &queue, receipts, op, None).await;
                        }
                    }
                });
                return Ok(m);
            }
            Ok(_) => {}
            Err(e) if is_transport_failure(&e) => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    match last_err {
        Some(e) if route.healthy_brokers().is_empty() => Err(e),
        _ => Ok(Vec::new()),
    }
}

#[derive(Clone)]
pub struct SidecarService {
    router: Arc<Router>,
}

impl SidecarService {
    pub fn new(router: Arc<Router>) -> Self {
        SidecarService { router }
    }

    /// Calls every reachable broker of a queue.
    async fn all_brokers<T, F, Fut>(&self, queue: &str, call: F) -> Result<Vec<T>, Status>
    where
        F: Fn(Arc<BrokerConn>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let route = self.router.route(queue)?;
        let brokers = route.healthy_brokers();
        if brokers.is_empty() {
            route.settings()?;
            return Err(Status::unavailable("no broker reachable"));
        }
        let results = futures::future::join_all(brokers.into_iter().map(|b| {
            let fut = call(b.clone());
            async move { fut.await.map_err(|e| b.failed(e)) }
        }))
        .await;
        results.into_iter().collect()
    }
}

#[tonic::async_trait]
impl Queues for SidecarService {
    async fn enqueue(
        &self,
        req: Request<v1::EnqueueRequest>,
    ) -> Result<Response<v1::EnqueueResponse>, Status> {
        let r = req.into_inner();
        let route = self.router.route(&r.queue)?;
        let m = r
            .message
            .ok_or_else(|| Status::invalid_argument("message is required"))?;
        check(&route, &m)?;
        let p = partition_of(&route, &m, r.partition)?;
        let movable = r.partition.is_none() && m.key.is_empty() && m.dedup_id.is_empty();
        if r.queue != route.queue {
            let mut out = route.enqueue_batch(&r.queue, p, vec![m]).await?;
            return Ok(Response::new(out.remove(0)));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let retry = movable.then(|| m.clone());
        route
            .batcher(p)
            .send(crate::router::PendingEnqueue {
                message: m,
                reply: tx,
            })
            .await
            .map_err(|_| Status::unavailable("sidecar is shutting down"))?;
        let result = rx
            .await
            .map_err(|_| Status::unavailable("sidecar is shutting down"))?;
        match (result, retry) {
            // A keyless message without a dedup id may go to any partition: try once
            // more on another broker. (If the first broker stored it before failing,
            // this makes a second copy: at-least-once. Give a dedup id to avoid that.)
            (Err(e), Some(m)) if is_transport_failure(&e) => {
                let p2 = route.any_partition(None).map_err(|_| e.clone())?;
                let mut out = route.enqueue_batch(&r.queue, p2, vec![m]).await?;
                Ok(Response::new(out.remove(0)))
            }
            (result, _) => result.map(Response::new),
        }
    }

    async fn enqueue_batch(
        &self,
        req: Request<v1::EnqueueBatchRequest>,
    ) -> Result<Response<v1::EnqueueBatchResponse>, Status> {
        let r = req.into_inner();
        let route = self.router.route(&r.queue)?;
        if r.messages.is_empty() {
            return Err(Status::invalid_argument("no messages given"));
        }
        let max_batch = route.settings()?.max_batch as usize;
        if r.messages.len() > max_batch {
            return Err(Status::invalid_argument(format!(
                "batch of {} messages is over the queue's max_batch of {max_batch}",
                r.messages.len()
            )));
        }
        let mut groups: BTreeMap<u32, (Vec<usize>, Vec<v1::NewMessage>)> = BTreeMap::new();
        for (i, m) in r.messages.into_iter().enumerate() {
            check(&route, &m)
                .map_err(|e| Status::invalid_argument(format!("message {i}: {}", e.message())))?;
            let g = groups
                .entry(partition_of(&route, &m, r.partition)?)
                .or_default();
            g.0.push(i);
            g.1.push(m);
        }
        let n: usize = groups.values().map(|g| g.0.len()).sum();
        let calls = groups
            .into_iter()
            .map(|(p, (idx, msgs))| route.enqueue_batch(&r.queue, p, msgs).then_map(idx));
        let mut results = vec![v1::EnqueueResponse::default(); n];
        for (idx, out) in futures::future::join_all(calls).await {
            for (i, res) in idx.into_iter().zip(out?) {
                results[i] = res;
            }
        }
        Ok(Response::new(v1::EnqueueBatchResponse { results }))
    }

    async fn dequeue(
        &self,
        req: Request<v1::DequeueRequest>,
    ) -> Result<Response<v1::DequeueResponse>, Status> {
        let r = req.into_inner();
        let route = self.router.route(&r.queue)?;
        let messages = dequeue_any(&route, r).await?;
        Ok(Response::new(v1::DequeueResponse { messages }))
    }

    async fn ack(&self, req: Request<v1::AckRequest>) -> Result<Response<v1::AckResponse>, Status> {
        let r = req.into_inner();
        let route = self.router.route(&r.queue)?;
        let results = settle(&route, &r.queue, r.receipts, SettleOp::Ack, None).await?;
        Ok(Response::new(v1::AckResponse { results }))
    }

    async fn nack(
        &self,
        req: Request<v1::NackRequest>,
    ) -> Result<Response<v1::NackResponse>, Status> {
        let r = req.into_inner();
        let route = self.router.route(&r.queue)?;
        let op = SettleOp::Nack {
            delay_ms: r.delay_ms,
            dead_letter: r.dead_letter,
        };
        let results = settle(&route, &r.queue, r.receipts, op, None).await?;
        Ok(Response::new(v1::NackResponse { results }))
    }

    async fn extend_visibility(
        &self,
        req: Request<v1::ExtendVisibilityRequest>,
    ) -> Result<Response<v1::ExtendVisibilityResponse>, Status> {
        let r = req.into_inner();
        let route = self.router.route(&r.queue)?;
        if r.visibility_timeout_ms == 0 {
            return Err(Status::invalid_argument(
                "visibility_timeout_ms must be above 0",
            ));
        }
        let op = SettleOp::Extend {
            visibility_ms: r.visibility_timeout_ms,
        };
        let results = settle(&route, &r.queue, r.receipts, op, None).await?;
        Ok(Response::new(v1::ExtendVisibilityResponse { results }))
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        req: Request<Streaming<v1::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut inbound = req.into_inner();
        let start = subscription_start(&mut inbound).await?;
        let route = self.router.route(&start.queue)?;
        let settings = route.settings()?;
        let vis = match start.visibility_timeout_ms {
            0 => settings.visibility_timeout_ms,
            v => v,
        };
        let backend = RelayedSubscription::new(route, start.queue.clone());
        Ok(Response::new(spawn_subscription(
            backend, &start, vis, inbound,
        )))
    }

    async fn stats(
        &self,
        req: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        let r = req.into_inner();
        let parts = self
            .all_brokers(&r.queue, |b| {
                let q = r.queue.clone();
                async move {
                    b.client()
                        .stats(timed(v1::StatsRequest { queue: q }, Duration::ZERO))
                        .await
                        .map(|x| x.into_inner())
                }
            })
            .await?;
        let mut out = v1::StatsResponse {
            queue: r.queue,
            ..Default::default()
        };
        for s in parts {
            out.ready += s.ready;
            out.in_flight += s.in_flight;
            out.delayed += s.delayed;
            out.dead_lettered += s.dead_lettered;
            out.bytes += s.bytes;
            out.enqueued_total += s.enqueued_total;
            out.acked_total += s.acked_total;
            out.redelivered_total += s.redelivered_total;
            out.dead_lettered_total += s.dead_lettered_total;
            out.partitions.extend(s.partitions);
        }
        out.partitions.sort_by_key(|p| p.partition);
        Ok(Response::new(out))
    }

    async fn peek(
        &self,
        req: Request<v1::PeekRequest>,
    ) -> Result<Response<v1::PeekResponse>, Status> {
        let r = req.into_inner();
        let max = r.max_messages.max(1) as usize;
        let parts = self
            .all_brokers(&r.queue, |b| {
                let req = r.clone();
                async move {
                    b.client()
                        .peek(timed(req, Duration::ZERO))
                        .await
                        .map(|x| x.into_inner().messages)
                }
            })
            .await?;
        let mut all: Vec<v1::Message> = parts.into_iter().flatten().collect();
        all.sort_by(|a, b| {
            a.enqueued_at_ms
                .cmp(&b.enqueued_at_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        all.truncate(max);
        Ok(Response::new(v1::PeekResponse { messages: all }))
    }

    async fn redrive(
        &self,
        req: Request<v1::RedriveRequest>,
    ) -> Result<Response<v1::RedriveResponse>, Status> {
        let r = req.into_inner();
        let parts = self
            .all_brokers(&r.queue, |b| {
                let req = r.clone();
                async move {
                    b.client()
                        .redrive(timed(req, Duration::from_secs(60)))
                        .await
                        .map(|x| x.into_inner().moved)
                }
            })
            .await?;
        Ok(Response::new(v1::RedriveResponse {
            moved: parts.into_iter().sum(),
        }))
    }

    async fn describe(
        &self,
        req: Request<v1::DescribeRequest>,
    ) -> Result<Response<v1::DescribeResponse>, Status> {
        let r = req.into_inner();
        let route = self.router.route(&r.queue)?;
        let mut d = route.settings()?;
        d.queue = r.queue;
        d.owned_partitions = (0..d.partitions)
            .filter(|p| route.owner(*p).is_ok())
            .collect();
        Ok(Response::new(d))
    }
}
