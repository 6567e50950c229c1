//! The `sluice.v1.Queues` service as the app sees it on localhost: every call routed
//! to the brokers of its queue.

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use sluice_dataplane::SettleOp;
use sluice_dataplane::partitioning::{Placement, is_pinned, place};
use sluice_dataplane::subscription::{SubscribeStream, spawn_subscription, subscription_start};
use sluice_dataplane::trace;
use sluice_dataplane::validate::{check_batch_len, check_message, validate_extension};
use sluice_proto::v1::{self, queues_server::Queues};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::drain::Drain;
use crate::router::{BrokerConn, Limits, QueueRoute, Router, is_transport_failure, timed};
use crate::settle::{ThenMap, settle};
use crate::subscription::RelayedSubscription;

/// Checks a message against the queue's limits before it joins a shared batch, so
/// one bad message cannot fail the batch of others.
fn check(m: &v1::NewMessage, limits: Limits) -> Result<(), Status> {
    Ok(check_message(m, limits.max_message_bytes)?)
}

/// The partition of a message: by explicit choice, key or dedup id, else any
/// partition with a healthy owner.
async fn partition_of(
    route: &QueueRoute,
    m: &v1::NewMessage,
    explicit: Option<u32>,
) -> Result<u32, Status> {
    match place(explicit, &m.key, &m.dedup_id, route.partitions()) {
        Placement::Explicit(p) | Placement::Hashed(p) => Ok(p),
        Placement::Any => route.any_partition().await,
    }
}

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
    drain: Drain,
}

impl SidecarService {
    pub fn new(router: Arc<Router>, drain: Drain) -> Self {
        SidecarService { router, drain }
    }

    /// The reachable brokers of a queue; none is UNAVAILABLE (or why the queue
    /// cannot be described).
    fn reachable_brokers(&self, queue: &str) -> Result<Vec<Arc<BrokerConn>>, Status> {
        let route = self.router.route(queue)?;
        let brokers = route.healthy_brokers();
        if brokers.is_empty() {
            route.settings()?;
            return Err(Status::unavailable("no broker reachable"));
        }
        Ok(brokers)
    }

    /// Calls every reachable broker of a queue.
    async fn all_brokers<T, F, Fut>(&self, queue: &str, call: F) -> Result<Vec<T>, Status>
    where
        F: Fn(Arc<BrokerConn>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let brokers = self.reachable_brokers(queue)?;
        let results = futures::future::join_all(brokers.into_iter().map(|b| {
            let fut = call(b.clone());
            async move { fut.await.map_err(|e| b.failed(e)) }
        }))
        .await;
        results.into_iter().collect()
    }
}

/// One enqueue, gathered with concurrent ones to its partition (or straight to a
/// broker for a dead-letter queue, whose enqueues are not gathered).
async fn enqueue_one(
    route: Arc<QueueRoute>,
    queue: String,
    partition: Option<u32>,
    m: v1::NewMessage,
) -> Result<v1::EnqueueResponse, Status> {
    let p = partition_of(&route, &m, partition).await?;
    let movable = !is_pinned(partition, &m.key, &m.dedup_id);
    if queue != route.queue {
        let mut out = route.enqueue_batch(&queue, p, vec![m]).await?;
        return Ok(out.remove(0));
    }
    let retry = movable.then(|| m.clone());
    let result = route.enqueue_gathered(p, m).await;
    match (result, retry) {
        // A keyless message without a dedup id may go to any partition: try once
        // more on another broker. (If the first broker stored it before failing,
        // this makes a second copy: at-least-once. Give a dedup id to avoid that.)
        (Err(e), Some(m)) if is_transport_failure(&e) => {
            let p2 = route.any_partition().await.map_err(|_| e.clone())?;
            let mut out = route.enqueue_batch(&queue, p2, vec![m]).await?;
            Ok(out.remove(0))
        }
        (result, _) => result,
    }
}

#[tonic::async_trait]
impl Queues for SidecarService {
    async fn enqueue(
        &self,
        req: Request<v1::EnqueueRequest>,
    ) -> Result<Response<v1::EnqueueResponse>, Status> {
        let (meta, _, r) = req.into_parts();
        let route = self.router.route(&r.queue)?;
        let mut m = r
            .message
            .ok_or_else(|| Status::invalid_argument("message is required"))?;
        let limits = route.limits()?;
        check(&m, limits)?;
        let span = trace::send_span(&r.queue, &meta, std::slice::from_ref(&m));
        if let Some(ctx) = trace::carried(&span, &meta) {
            trace::carry(&ctx, &mut m, limits.max_message_bytes);
        }
        let queue = r.queue;
        let partition = r.partition;
        enqueue_one(route, queue, partition, m)
            .instrument(span)
            .await
            .map(Response::new)
    }

    async fn enqueue_batch(
        &self,
        req: Request<v1::EnqueueBatchRequest>,
    ) -> Result<Response<v1::EnqueueBatchResponse>, Status> {
        let (meta, _, r) = req.into_parts();
        let route = self.router.route(&r.queue)?;
        // An empty batch is refused even while no broker has described the queue.
        check_batch_len(r.messages.len(), u32::MAX)?;
        let limits = route.limits()?;
        check_batch_len(r.messages.len(), limits.max_batch)?;
        let span = trace::send_span(&r.queue, &meta, &r.messages);
        let ctx = trace::carried(&span, &meta);
        let mut groups: BTreeMap<u32, (Vec<usize>, Vec<v1::NewMessage>)> = BTreeMap::new();
        for (i, mut m) in r.messages.into_iter().enumerate() {
            check(&m, limits)
                .map_err(|e| Status::invalid_argument(format!("message {i}: {}", e.message())))?;
            if let Some(ctx) = &ctx {
                trace::carry(ctx, &mut m, limits.max_message_bytes);
            }
            let g = groups
                .entry(partition_of(&route, &m, r.partition).await?)
                .or_default();
            g.0.push(i);
            g.1.push(m);
        }
        let n: usize = groups.values().map(|g| g.0.len()).sum();
        let calls = groups
            .into_iter()
            .map(|(p, (idx, msgs))| route.enqueue_batch(&r.queue, p, msgs).then_map(idx));
        let mut results = vec![v1::EnqueueResponse::default(); n];
        for (idx, out) in futures::future::join_all(calls).instrument(span).await {
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
        self.drain.check()?;
        let r = req.into_inner();
        let route = self.router.route(&r.queue)?;
        let queue = r.queue.clone();
        let messages = dequeue_any(&route, r).await?;
        trace::delivered(&queue, &messages);
        Ok(Response::new(v1::DequeueResponse { messages }))
    }

    async fn ack(&self, req: Request<v1::AckRequest>) -> Result<Response<v1::AckResponse>, Status> {
        let (meta, _, r) = req.into_parts();
        let route = self.router.route(&r.queue)?;
        let span = trace::settle_span("ack", "client", &r.queue, &meta, r.receipts.len());
        let results = settle(&route, &r.queue, r.receipts, SettleOp::Ack, None)
            .instrument(span)
            .await?;
        Ok(Response::new(v1::AckResponse { results }))
    }

    async fn nack(
        &self,
        req: Request<v1::NackRequest>,
    ) -> Result<Response<v1::NackResponse>, Status> {
        let (meta, _, r) = req.into_parts();
        let route = self.router.route(&r.queue)?;
        let op = SettleOp::Nack {
            delay_ms: r.delay_ms,
            dead_letter: r.dead_letter,
        };
        let span = trace::settle_span("nack", "client", &r.queue, &meta, r.receipts.len());
        let results = settle(&route, &r.queue, r.receipts, op, None)
            .instrument(span)
            .await?;
        Ok(Response::new(v1::NackResponse { results }))
    }

    async fn extend_visibility(
        &self,
        req: Request<v1::ExtendVisibilityRequest>,
    ) -> Result<Response<v1::ExtendVisibilityResponse>, Status> {
        let (meta, _, r) = req.into_parts();
        let route = self.router.route(&r.queue)?;
        let visibility_ms = validate_extension(r.visibility_timeout_ms, 0)?;
        let op = SettleOp::Extend { visibility_ms };
        let span = trace::settle_span("extend", "client", &r.queue, &meta, r.receipts.len());
        let results = settle(&route, &r.queue, r.receipts, op, None)
            .instrument(span)
            .await?;
        Ok(Response::new(v1::ExtendVisibilityResponse { results }))
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        req: Request<Streaming<v1::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.drain.check()?;
        let mut inbound = req.into_inner();
        let start = subscription_start(&mut inbound).await?;
        let route = self.router.route(&start.queue)?;
        let settings = route.settings()?;
        let vis = match start.visibility_timeout_ms {
            0 => settings.visibility_timeout_ms,
            v => v,
        };
        let backend = RelayedSubscription::new(route, start.queue.clone());
        let ends = self.drain.started();
        let ends = async move {
            ends.await;
            Drain::refusal()
        };
        Ok(Response::new(spawn_subscription(
            backend, &start, vis, inbound, ends,
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
        let redrive = |b: Arc<BrokerConn>, max_messages: u64| {
            let req = v1::RedriveRequest {
                queue: r.queue.clone(),
                max_messages,
            };
            async move {
                b.client()
                    .redrive(timed(req, Duration::from_secs(60)))
                    .await
                    .map(|x| x.into_inner().moved)
                    .map_err(|e| b.failed(e))
            }
        };
        if r.max_messages == 0 {
            let parts = self.all_brokers(&r.queue, |b| redrive(b, 0)).await?;
            return Ok(Response::new(v1::RedriveResponse {
                moved: parts.into_iter().sum(),
            }));
        }
        // A limit is the queue's, not each broker's: the brokers in turn, each asked
        // for what is left.
        let mut moved = 0;
        for b in self.reachable_brokers(&r.queue)? {
            if moved >= r.max_messages {
                break;
            }
            moved += redrive(b, r.max_messages - moved).await?;
        }
        Ok(Response::new(v1::RedriveResponse { moved }))
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
