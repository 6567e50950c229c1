//! The `sluice.v1.Queues` gRPC service of the broker: request validation, then the
//! queue operations.

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use sluice_config::{MAX_DELAY, MAX_VISIBILITY_TIMEOUT};
use sluice_proto::Receipt;
use sluice_proto::v1::{self, queues_server::Queues};
use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::auth::bearer_token;
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::partition::{EnqueueOutcome, NewMessage};
use crate::queue::Queue;

/// Longest long poll a Dequeue may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
pub const MAX_ATTRIBUTES: usize = 64;
pub const MAX_KEY_BYTES: usize = 256;
pub const MAX_DEDUP_ID_BYTES: usize = 128;
/// Most credit one Subscribe stream may hold (a client cannot make the broker lease
/// unbounded numbers of messages to it).
pub const MAX_CREDIT: u64 = 10_000;

fn invalid(msg: impl Into<String>) -> BrokerError {
    BrokerError::InvalidArgument(msg.into())
}

/// What a message counts against `max_message_bytes`: body, key, dedup id, attributes.
pub fn message_size(m: &v1::NewMessage) -> usize {
    m.body.len()
        + m.key.len()
        + m.dedup_id.len()
        + m.attributes
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// Checks a new message against the queue's limits.
pub fn validate_message(
    m: v1::NewMessage,
    max_message_bytes: u64,
) -> Result<NewMessage, BrokerError> {
    if m.attributes.len() > MAX_ATTRIBUTES {
        return Err(invalid(format!(
            "a message may carry at most {MAX_ATTRIBUTES} attributes, got {}",
            m.attributes.len()
        )));
    }
    if m.attributes.keys().any(|k| k.is_empty()) {
        return Err(invalid("attribute names must not be empty"));
    }
    if m.key.len() > MAX_KEY_BYTES {
        return Err(invalid(format!(
            "key is {} bytes; the limit is {MAX_KEY_BYTES}",
            m.key.len()
        )));
    }
    if m.dedup_id.len() > MAX_DEDUP_ID_BYTES {
        return Err(invalid(format!(
            "dedup_id is {} bytes; the limit is {MAX_DEDUP_ID_BYTES}",
            m.dedup_id.len()
        )));
    }
    if m.delay_ms > MAX_DELAY.as_millis() as u64 {
        return Err(invalid(format!(
            "delay_ms {} is more than the 15-day maximum ({})",
            m.delay_ms,
            MAX_DELAY.as_millis()
        )));
    }
    let size = message_size(&m);
    if size as u64 > max_message_bytes {
        return Err(invalid(format!(
            "message is {size} bytes with its key and attributes; the queue's limit (max_message_bytes) is {max_message_bytes}"
        )));
    }
    let mut attributes: Vec<(String, String)> = m.attributes.into_iter().collect();
    attributes.sort();
    Ok(NewMessage {
        body: m.body,
        attributes,
        key: m.key,
        dedup_id: m.dedup_id,
        delay_ms: m.delay_ms,
    })
}

pub fn validate_visibility(ms: u64, queue: &Queue) -> Result<u64, BrokerError> {
    if ms == 0 {
        return Ok(queue.settings.visibility_timeout.as_millis() as u64);
    }
    if ms > MAX_VISIBILITY_TIMEOUT.as_millis() as u64 {
        return Err(invalid(format!(
            "visibility timeout {ms} ms is more than the 12-hour maximum"
        )));
    }
    Ok(ms)
}

pub fn parse_receipts(
    receipts: &[String],
) -> Result<Vec<Result<Receipt, &'static str>>, BrokerError> {
    if receipts.is_empty() {
        return Err(invalid("no receipts given"));
    }
    Ok(receipts.iter().map(|r| r.parse::<Receipt>()).collect())
}

fn result_of(receipt: &str, r: Result<(), BrokerError>) -> v1::ReceiptResult {
    match r {
        Ok(()) => v1::ReceiptResult {
            receipt: receipt.to_string(),
            code: Code::Ok as i32,
            error: String::new(),
        },
        Err(e) => v1::ReceiptResult {
            receipt: receipt.to_string(),
            code: e.code() as i32,
            error: e.to_string(),
        },
    }
}

enum SettleOp {
    Ack,
    Nack { delay_ms: u64, dead_letter: bool },
    Extend { visibility_ms: u64 },
}

/// Applies an operation to receipts, grouped by partition, answering in order.
async fn settle(
    queue: &Queue,
    receipts: &[String],
    op: SettleOp,
) -> Result<Vec<v1::ReceiptResult>, BrokerError> {
    let parsed = parse_receipts(receipts)?;
    let mut results: Vec<Option<v1::ReceiptResult>> = vec![None; receipts.len()];
    let mut by_partition: std::collections::BTreeMap<u32, Vec<(usize, Receipt)>> =
        Default::default();
    for (i, p) in parsed.into_iter().enumerate() {
        match p {
            Ok(r) => by_partition.entry(r.partition).or_default().push((i, r)),
            Err(why) => results[i] = Some(result_of(&receipts[i], Err(invalid(why)))),
        }
    }
    for (pid, items) in by_partition {
        let Some(partition) = queue.partition(pid) else {
            for (i, _) in items {
                let e = BrokerError::FailedPrecondition(format!(
                    "partition {pid} of queue {} is not on this broker; send through the sidecar",
                    queue.name()
                ));
                results[i] = Some(result_of(&receipts[i], Err(e)));
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
            results[i] = Some(result_of(&receipts[i], r));
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every receipt answered"))
        .collect())
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
    ) -> Result<Vec<v1::EnqueueResponse>, BrokerError> {
        if messages.is_empty() {
            return Err(invalid("no messages given"));
        }
        if messages.len() > q.settings.max_batch as usize {
            return Err(invalid(format!(
                "batch of {} messages is over the queue's max_batch of {}",
                messages.len(),
                q.settings.max_batch
            )));
        }
        // Validate all first: a batch with one bad message writes nothing.
        let mut groups: std::collections::BTreeMap<u32, Vec<(usize, NewMessage)>> =
            Default::default();
        let n = messages.len();
        for (i, m) in messages.into_iter().enumerate() {
            let m = validate_message(m, q.settings.max_message_bytes).map_err(|e| {
                if n > 1 {
                    invalid(format!("message {i}: {e}"))
                } else {
                    e
                }
            })?;
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

pub type SubscribeStream =
    Pin<Box<dyn Stream<Item = Result<v1::SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Queues for QueueService {
    async fn enqueue(
        &self,
        req: Request<v1::EnqueueRequest>,
    ) -> Result<Response<v1::EnqueueResponse>, Status> {
        let q = self.open(&req.get_ref().queue, req.metadata()).await?;
        let r = req.into_inner();
        let m = r.message.ok_or_else(|| invalid("message is required"))?;
        let mut out = self.enqueue_many(q, vec![m], r.partition).await?;
        Ok(Response::new(out.remove(0)))
    }

    async fn enqueue_batch(
        &self,
        req: Request<v1::EnqueueBatchRequest>,
    ) -> Result<Response<v1::EnqueueBatchResponse>, Status> {
        let q = self.open(&req.get_ref().queue, req.metadata()).await?;
        let r = req.into_inner();
        let results = self.enqueue_many(q, r.messages, r.partition).await?;
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
        let wait = Duration::from_millis(r.wait_ms);
        if wait > MAX_WAIT {
            return Err(invalid(format!(
                "wait_ms {} is over the 60000 ms maximum",
                r.wait_ms
            ))
            .into());
        }
        let vis = validate_visibility(r.visibility_timeout_ms, &q)?;
        let messages = q.dequeue(max as usize, wait, vis).await?;
        Ok(Response::new(v1::DequeueResponse { messages }))
    }

    async fn ack(&self, req: Request<v1::AckRequest>) -> Result<Response<v1::AckResponse>, Status> {
        let q = self.open(&req.get_ref().queue, req.metadata()).await?;
        let r = req.into_inner();
        let results = settle(&q, &r.receipts, SettleOp::Ack).await?;
        Ok(Response::new(v1::AckResponse { results }))
    }

    async fn nack(
        &self,
        req: Request<v1::NackRequest>,
    ) -> Result<Response<v1::NackResponse>, Status> {
        let q = self.open(&req.get_ref().queue, req.metadata()).await?;
        let r = req.into_inner();
        if r.delay_ms > MAX_DELAY.as_millis() as u64 {
            return Err(invalid(format!(
                "delay_ms {} is over the 15-day maximum",
                r.delay_ms
            ))
            .into());
        }
        let op = SettleOp::Nack {
            delay_ms: r.delay_ms,
            dead_letter: r.dead_letter,
        };
        let results = settle(&q, &r.receipts, op).await?;
        Ok(Response::new(v1::NackResponse { results }))
    }

    async fn extend_visibility(
        &self,
        req: Request<v1::ExtendVisibilityRequest>,
    ) -> Result<Response<v1::ExtendVisibilityResponse>, Status> {
        let q = self.open(&req.get_ref().queue, req.metadata()).await?;
        let r = req.into_inner();
        if r.visibility_timeout_ms == 0 {
            return Err(invalid("visibility_timeout_ms must be above 0").into());
        }
        let visibility_ms = validate_visibility(r.visibility_timeout_ms, &q)?;
        let results = settle(&q, &r.receipts, SettleOp::Extend { visibility_ms }).await?;
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
        let vis = validate_visibility(start.visibility_timeout_ms, &q)?;
        Ok(Response::new(spawn_subscription(q, &start, vis, inbound)))
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
            owned_partitions: q.owned_partitions().to_vec(),
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

#[tonic::async_trait]
impl SubscriptionBackend for Arc<Queue> {
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
        _ => Err(invalid("the first message of a subscription must be `start`").into()),
    }
}

/// Drives one Subscribe stream: deliveries as credit allows, acks and nacks inline
/// (up to [`MAX_SETTLING`] in flight, answered in the order they came).
/// A fetch in progress is never cancelled (a cancelled remote fetch could strand
/// leased messages), and messages delivered but unsettled when the stream ends are
/// given back at once, as AMQP does with a closed channel's unacknowledged messages.
pub fn spawn_subscription<B: SubscriptionBackend + Clone>(
    backend: B,
    start: &v1::SubscribeStart,
    visibility_ms: u64,
    mut inbound: Streaming<v1::SubscribeRequest>,
) -> SubscribeStream {
    use v1::subscribe_request::Request as In;
    use v1::subscribe_response::Response as Out;
    let (tx, rx) = mpsc::channel::<Result<v1::SubscribeResponse, Status>>(256);
    let mut credit = u64::from(start.initial_credit).min(MAX_CREDIT);
    tokio::spawn(async move {
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
                            let e = invalid("expected credit, ack or nack after start");
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
