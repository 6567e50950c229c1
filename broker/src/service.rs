//! The `sluice.v1.Queues` gRPC service of the broker: request validation (shared with
//! the sidecar, `sluice_dataplane::validate`), then the queue operations.

use sluice_dataplane::SettleOp;
use sluice_dataplane::receipts::Settlement;
use sluice_dataplane::subscription::{
    SubscribeStream, SubscriptionBackend, spawn_subscription, subscription_start,
};
use sluice_dataplane::trace;
use sluice_dataplane::validate::{
    MAX_WAIT, check_batch_len, validate_extension, validate_message, validate_nack_delay,
    validate_visibility, validate_wait,
};
use sluice_proto::Receipt;
use sluice_proto::v1::{self, queues_server::Queues};
use std::sync::Arc;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::auth::bearer_token;
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::partition::{EnqueueOutcome, NewMessage};
use crate::queue::Queue;

fn invalid(msg: impl Into<String>) -> BrokerError {
    BrokerError::InvalidArgument(msg.into())
}

/// Applies an operation to receipts, partition by partition, answering in order.
async fn settle(
    queue: &Queue,
    receipts: &[String],
    op: SettleOp,
) -> Result<Vec<v1::ReceiptResult>, BrokerError> {
    let mut settlement = Settlement::new(receipts)?;
    for (pid, items) in settlement.take_groups() {
        let Some(partition) = queue.partition(pid) else {
            let e = BrokerError::FailedPrecondition(format!(
                "partition {pid} of queue {} is not on this broker; send through the sidecar",
                queue.name()
            ));
            for (i, _) in items {
                settlement.answer_code(i, e.code(), &e.to_string());
            }
            continue;
        };
        let rs: Vec<Receipt> = items.iter().map(|x| x.1).collect();
        let outcome = match op {
            SettleOp::Ack => partition.ack(&rs).await,
            SettleOp::Nack {
                delay_ms,
                dead_letter,
            } => partition.nack(&rs, delay_ms, dead_letter).await,
            SettleOp::Extend { visibility_ms } => partition.extend(&rs, visibility_ms),
        };
        for ((i, _), r) in items.into_iter().zip(outcome) {
            match r {
                Ok(()) => settlement.answer_code(i, Code::Ok, ""),
                Err(e) => settlement.answer_code(i, e.code(), &e.to_string()),
            }
        }
    }
    Ok(settlement.finish())
}

#[derive(Clone)]
pub struct QueueService {
    broker: Arc<Broker>,
}

impl QueueService {
    pub fn new(broker: Arc<Broker>) -> Self {
        QueueService { broker }
    }

    /// The queue a call names, if the call may use it.
    async fn open(&self, name: &str, metadata: &MetadataMap) -> Result<Arc<Queue>, BrokerError> {
        let q = self.broker.queue(name).await?;
        self.broker.authorize(&q, bearer_token(metadata)?).await?;
        Ok(q)
    }

    async fn enqueue_many(
        &self,
        q: Arc<Queue>,
        messages: Vec<v1::NewMessage>,
        partition: Option<u32>,
        meta: &MetadataMap,
    ) -> Result<Vec<v1::EnqueueResponse>, BrokerError> {
        let span = trace::send_span(&q.settings.name, meta, &messages);
        let trace = trace::carried(&span, meta);
        self.enqueue_traced(q, messages, partition, trace)
            .instrument(span)
            .await
    }

    async fn enqueue_traced(
        &self,
        q: Arc<Queue>,
        messages: Vec<v1::NewMessage>,
        partition: Option<u32>,
        trace: Option<Vec<(&'static str, String)>>,
    ) -> Result<Vec<v1::EnqueueResponse>, BrokerError> {
        check_batch_len(messages.len(), q.settings.max_batch)?;
        // Validate all first: a batch with one bad message writes nothing.
        let mut groups: std::collections::BTreeMap<u32, Vec<(usize, NewMessage)>> =
            Default::default();
        let n = messages.len();
        for (i, mut m) in messages.into_iter().enumerate() {
            if let Some(ctx) = &trace {
                trace::carry(ctx, &mut m, q.settings.max_message_bytes);
            }
            let m = validate_message(m, q.settings.max_message_bytes)
                .map_err(|e| if n > 1 { e.in_message(i) } else { e })?;
            let p = q.pick_partition(partition, &m.key, &m.dedup_id)?;
            groups.entry(p).or_default().push((i, m));
        }
        let mut out = vec![v1::EnqueueResponse::default(); n];
        for (pid, items) in groups {
            let partition = q.partition(pid).expect("picked partitions are owned");
            let (idx, msgs): (Vec<usize>, Vec<NewMessage>) = items.into_iter().unzip();
            let outcomes = partition.enqueue(msgs).await?;
            for (i, o) in idx.into_iter().zip(outcomes) {
                let (seq, duplicate) = match o {
                    EnqueueOutcome::Stored(s) => (s, false),
                    EnqueueOutcome::Duplicate(s) => (s, true),
                };
                out[i] = v1::EnqueueResponse {
                    id: sluice_proto::receipt::message_id(pid, seq),
                    duplicate,
                    partition: pid,
                };
            }
        }
        Ok(out)
    }
}

/// A queue's visibility timeout, for calls that leave theirs at 0.
fn default_visibility(q: &Queue) -> u64 {
    q.settings.visibility_timeout.as_millis() as u64
}

#[tonic::async_trait]
impl Queues for QueueService {
    async fn enqueue(
        &self,
        req: Request<v1::EnqueueRequest>,
    ) -> Result<Response<v1::EnqueueResponse>, Status> {
        let q = self.open(&req.get_ref().queue, req.metadata()).await?;
        let (meta, _, r) = req.into_parts();
        let m = r.message.ok_or_else(|| invalid("message is required"))?;
        let mut out = self.enqueue_many(q, vec![m], r.partition, &meta).await?;
        Ok(Response::new(out.remove(0)))
    }

    async fn enqueue_batch(
        &self,
        req: Request<v1::EnqueueBatchRequest>,
    ) -> Result<Response<v1::EnqueueBatchResponse>, Status> {
        let q = self.open(&req.get_ref().queue, req.metadata()).await?;
        let (meta, _, r) = req.into_parts();
        let results = self.enqueue_many(q, r.messages, r.partition, &meta).await?;
        Ok(Response::new(v1::EnqueueBatchResponse { results }))
    }

    async fn dequeue(
        &self,
        req: Request<v1::DequeueRequest>,
    ) -> Result<Response<v1::DequeueResponse>, Status> {
        let q = self.open(&req.get_ref().queue, req.metadata()).await?;
        let r = req.into_inner();
        let max = r.max_messages.max(1);
        if max > q.settings.max_batch {
            return Err(invalid(format!(
                "max_messages {max} is over the queue's max_batch of {}",
                q.settings.max_batch
            ))
            .into());
        }
        let wait = validate_wait(r.wait_ms)?;
        let vis = validate_visibility(r.visibility_timeout_ms, default_visibility(&q))?;
        let messages = q.dequeue(max as usize, wait, vis).await?;
        trace::delivered(&r.queue, &messages);
        Ok(Response::new(v1::DequeueResponse { messages }))
    }

    async fn ack(&self, req: Request<v1::AckRequest>) -> Result<Response<v1::AckResponse>, Status> {
        let q = self.open(&req.get_ref().queue, req.metadata()).await?;
        let (meta, _, r) = req.into_parts();
        let span = trace::settle_span("ack", "server", &r.queue, &meta, r.receipts.len());
        let results = settle(&q, &r.receipts, SettleOp::Ack)
            .instrument(span)
            .await?;
        Ok(Response::new(v1::AckResponse { results }))
    }

    async fn nack(
        &self,
        req: Request<v1::NackRequest>,
    ) -> Result<Response<v1::NackResponse>, Status> {
        let q = self.open(&req.get_ref().queue, req.metadata()).await?;
        let (meta, _, r) = req.into_parts();
        let op = SettleOp::Nack {
            delay_ms: validate_nack_delay(r.delay_ms)?,
            dead_letter: r.dead_letter,
        };
        let span = trace::settle_span("nack", "server", &r.queue, &meta, r.receipts.len());
        let results = settle(&q, &r.receipts, op).instrument(span).await?;
        Ok(Response::new(v1::NackResponse { results }))
    }

    async fn extend_visibility(
        &self,
        req: Request<v1::ExtendVisibilityRequest>,
    ) -> Result<Response<v1::ExtendVisibilityResponse>, Status> {
        let q = self.open(&req.get_ref().queue, req.metadata()).await?;
        let (meta, _, r) = req.into_parts();
        let visibility_ms = validate_extension(r.visibility_timeout_ms, default_visibility(&q))?;
        let span = trace::settle_span("extend", "server", &r.queue, &meta, r.receipts.len());
        let results = settle(&q, &r.receipts, SettleOp::Extend { visibility_ms })
            .instrument(span)
            .await?;
        Ok(Response::new(v1::ExtendVisibilityResponse { results }))
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        req: Request<Streaming<v1::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let metadata = req.metadata().clone();
        let mut inbound = req.into_inner();
        let start = subscription_start(&mut inbound).await?;
        let q = self.open(&start.queue, &metadata).await?;
        let vis = validate_visibility(start.visibility_timeout_ms, default_visibility(&q))?;
        let never = std::future::pending();
        Ok(Response::new(spawn_subscription(
            q, &start, vis, inbound, never,
        )))
    }

    async fn stats(
        &self,
        req: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        let q = self.open(&req.get_ref().queue, req.metadata()).await?;
        Ok(Response::new(stats_of(&q)))
    }

    async fn peek(
        &self,
        req: Request<v1::PeekRequest>,
    ) -> Result<Response<v1::PeekResponse>, Status> {
        let q = self.open(&req.get_ref().queue, req.metadata()).await?;
        let r = req.into_inner();
        let max = r.max_messages.clamp(1, q.settings.max_batch) as usize;
        Ok(Response::new(v1::PeekResponse {
            messages: q.peek(max)?,
        }))
    }

    async fn redrive(
        &self,
        req: Request<v1::RedriveRequest>,
    ) -> Result<Response<v1::RedriveResponse>, Status> {
        let q = self.open(&req.get_ref().queue, req.metadata()).await?;
        let r = req.into_inner();
        let dlq = q.dlq.clone().ok_or_else(|| {
            BrokerError::FailedPrecondition(format!("queue {} has no dead-letter queue", r.queue))
        })?;
        let moved = dlq.redrive(r.max_messages).await?;
        Ok(Response::new(v1::RedriveResponse { moved }))
    }

    async fn describe(
        &self,
        req: Request<v1::DescribeRequest>,
    ) -> Result<Response<v1::DescribeResponse>, Status> {
        let q = self.open(&req.get_ref().queue, req.metadata()).await?;
        let s = &q.settings;
        Ok(Response::new(v1::DescribeResponse {
            queue: q.name().to_string(),
            partitions: s.partitions,
            owned_partitions: q.serving_partitions(),
            replication: s.replication,
            raft_groups: s.raft_groups(),
            ordinal: q.ordinal,
            fsync: s.fsync.as_str().to_string(),
            visibility_timeout_ms: s.visibility_timeout.as_millis() as u64,
            max_deliveries: s.max_deliveries,
            dead_letter: s.dead_letter,
            max_message_bytes: s.max_message_bytes,
            max_batch: s.max_batch,
            dedup_window_ms: s.dedup_window.as_millis() as u64,
        }))
    }
}

#[tonic::async_trait]
impl SubscriptionBackend for Queue {
    async fn fetch(&self, credit: usize, visibility_ms: u64) -> Result<Vec<v1::Message>, Status> {
        let max = credit.min(self.settings.max_batch as usize);
        Ok(self.dequeue(max, MAX_WAIT, visibility_ms).await?)
    }
    async fn ack(&self, receipts: Vec<String>) -> Result<Vec<v1::ReceiptResult>, Status> {
        Ok(settle(self, &receipts, SettleOp::Ack).await?)
    }
    async fn nack(
        &self,
        receipts: Vec<String>,
        delay_ms: u64,
        dead_letter: bool,
    ) -> Result<Vec<v1::ReceiptResult>, Status> {
        let op = SettleOp::Nack {
            delay_ms,
            dead_letter,
        };
        Ok(settle(self, &receipts, op).await?)
    }
}

pub fn stats_of(q: &Queue) -> v1::StatsResponse {
    let mut out = v1::StatsResponse {
        queue: q.name().to_string(),
        ..Default::default()
    };
    for (id, s) in q.snapshots() {
        out.ready += s.ready;
        out.in_flight += s.in_flight;
        out.delayed += s.delayed;
        out.bytes += s.bytes;
        out.enqueued_total += s.counters.enqueued;
        out.acked_total += s.counters.acked;
        out.redelivered_total += s.counters.redelivered;
        out.dead_lettered_total += s.counters.dead_lettered;
        out.partitions.push(v1::PartitionStats {
            partition: id,
            ready: s.ready,
            in_flight: s.in_flight,
            delayed: s.delayed,
            bytes: s.bytes,
            enqueued_total: s.counters.enqueued,
            acked_total: s.counters.acked,
            redelivered_total: s.counters.redelivered,
            dead_lettered_total: s.counters.dead_lettered,
            segments: 0,
        });
    }
    if let Some(dlq) = &q.dlq {
        out.dead_lettered = dlq.snapshots().iter().map(|(_, s)| s.messages).sum();
    }
    out
}
