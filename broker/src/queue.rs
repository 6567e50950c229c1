//! A queue as the broker runs it: its partitions (each a [`PartitionState`] behind a
//! lock, a log writer and a timer task), the waiters of long polls, and its
//! dead-letter queue.

use bytes::{Bytes, BytesMut};
use sluice_config::QueueSettings;
use sluice_config::report::{Depth, PartitionReport};
use sluice_dataplane::partitioning::{Placement, place};
use sluice_proto::{Receipt, receipt::message_id, v1};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::BrokerError;
use crate::journal::Journal;
use crate::log::record::{Record, SettleReason};
use crate::log::{LogObserver, LogOptions, LogWriter, recover};
use crate::partition::{
    CacheBudget, Content, Delivery, Effects, EnqueueOutcome, Fate, NewMessage, PartitionState,
    ReceiptError, Snapshot,
};
use crate::replica::network::Peers;
use crate::replica::node::{CopyState, Replica, Role};
use crate::replica::service::Groups;

/// Runs a future on the runtime from synchronous code (a queue opens on a blocking
/// thread, or on a worker of the multi-threaded runtime) and waits for it.
fn run_async<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    tokio::runtime::Handle::current().spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv()
        .expect("the runtime stopped while a replica was opening")
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A partition after replay.
struct Recovered {
    id: u32,
    state: PartitionState,
    segments: Vec<u64>,
    /// Where the records of the last segment end.
    end: u64,
}

/// Replays the logs of the partitions `owned`, on as many threads as there are cores
/// (partitions are independent; replay is CPU-bound on a warm page cache). Returns
/// each partition's state and segment list, in `owned` order.
/// Deletes the copies in `queue_dir` of partitions this broker no longer hosts: the
/// operator wrote settings without this broker among a partition's members once it
/// saw the group committed to members elsewhere, so no majority needs this copy. Only
/// with an operator-owned placement; the formula never moves a copy.
fn drop_moved_copies(
    queue_dir: &Path,
    settings: &QueueSettings,
    hosted: &[u32],
) -> Result<(), BrokerError> {
    if settings.placement.is_empty() && settings.members.is_empty() {
        return Ok(());
    }
    let Ok(entries) = std::fs::read_dir(queue_dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if p < settings.partitions && !hosted.contains(&p) {
            tracing::info!(queue = %settings.name, partition = p, copies = ?settings.copies_of(p), "deleting this broker's copy: the partition moved to other brokers");
            std::fs::remove_dir_all(entry.path()).map_err(|e| {
                BrokerError::Internal(format!(
                    "deleting the moved copy {}: {e}",
                    entry.path().display()
                ))
            })?;
        }
    }
    Ok(())
}

fn recover_partitions(
    dir: &Path,
    settings: &Arc<QueueSettings>,
    owned: &[u32],
    budget: &Arc<CacheBudget>,
    observer: &Arc<dyn LogObserver>,
    now: u64,
) -> Result<Vec<Recovered>, BrokerError> {
    let one = |id: u32| -> Result<Recovered, BrokerError> {
        let pdir = dir.join(&settings.name).join(id.to_string());
        let mut st = PartitionState::new(settings.clone(), budget.clone());
        let started = std::time::Instant::now();
        let (segments, report) = recover(&pdir, observer.as_ref(), |rec, loc| {
            st.replay(now, rec, loc)
        })?;
        st.finish_replay();
        if report.records > 0 {
            let snap = st.snapshot();
            tracing::info!(
                queue = %settings.name, partition = id, segments = report.segments,
                records = report.records, messages = snap.messages, damaged = report.damage.len(),
                torn_tail_bytes = report.torn_tail, took_ms = started.elapsed().as_millis() as u64,
                "recovered partition"
            );
        }
        for (segment, offset, why) in &report.damage {
            tracing::warn!(queue = %settings.name, partition = id, segment, offset, why, "damaged log record skipped");
        }
        Ok(Recovered {
            id,
            state: st,
            segments,
            end: report.end,
        })
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(owned.len());
    let next = AtomicUsize::new(0);
    let mut results: Vec<(usize, Result<Recovered, BrokerError>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&id) = owned.get(i) else { break };
                        done.push((i, one(id)));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a recovery thread panicked"))
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Attributes a dead-lettered message carries.
pub const ATTR_DLQ_SOURCE_ID: &str = "sluice-dlq-source-id";
pub const ATTR_DLQ_DELIVERIES: &str = "sluice-dlq-deliveries";

/// Storage knobs that are the broker's, not the queue's.
#[derive(Debug, Clone)]
pub struct StorageOptions {
    pub segment_bytes: u64,
    /// Free bytes of the volume kept for acks and other settling records: below
    /// it, Enqueue answers RESOURCE_EXHAUSTED.
    pub disk_reserve_bytes: u64,
    /// Calls that may wait on one queue at once (long-poll Dequeues and the fetches
    /// of Subscribe streams); one more is RESOURCE_EXHAUSTED. Each waiter holds a
    /// task and a timer, so an unbounded number is memory a client can take.
    pub max_waiters: usize,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            segment_bytes: 64 * 1024 * 1024,
            disk_reserve_bytes: 16 * 1024 * 1024,
            max_waiters: 10_000,
        }
    }
}

/// A place among a queue's waiters, given back on drop.
struct WaitSlot<'a>(&'a AtomicUsize);

impl Drop for WaitSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a partition's records land, once durable (or why they did not).
type Written = futures::future::BoxFuture<'static, Result<crate::log::Location, BrokerError>>;

/// The write of reserved messages, whose outcome must reach the partition's state even
/// when the call awaiting it is cancelled (a client gone at its deadline): left
/// undone, the message would be in the log but not in the state, and a retry of it
/// would wait on it forever. The caller applies it as it awaits; a cancelled caller
/// leaves it to a task ([`Drop`]). Cheaper than a task per write, which costs every
/// enqueue a hand-off between threads.
struct PendingWrite {
    partition: Arc<Partition>,
    epoch: u64,
    now: u64,
    pending: Option<(Vec<crate::partition::Reserved>, Written)>,
}

impl PendingWrite {
    async fn apply(mut self) -> Result<(), BrokerError> {
        let (_, written) = self.pending.as_mut().expect("a write is applied once");
        let result = written.await;
        let (reserved, _) = self.pending.take().expect("a write is applied once");
        self.partition
            .apply_write(self.epoch, self.now, reserved, result)
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        let Some((reserved, written)) = self.pending.take() else {
            return;
        };
        let (partition, epoch, now) = (self.partition.clone(), self.epoch, self.now);
        let finish = async move {
            let _ = partition.apply_write(epoch, now, reserved, written.await);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(finish);
            }
            // No runtime (the broker is going away): nobody will retry on this state.
            Err(_) => tracing::debug!("a write's outcome was dropped with the runtime"),
        }
    }
}

pub struct Partition {
    pub id: u32,
    state: Mutex<PartitionState>,
    journal: Journal,
    /// The term in which this replicated copy rebuilt its state and serves (0: none).
    led_term: AtomicU64,
    /// Bumped whenever `state` is replaced (a replicated copy starts or stops leading):
    /// a call that waited across it must not touch the new state.
    epoch: AtomicU64,
    settings: Arc<QueueSettings>,
    budget: Arc<CacheBudget>,
    /// Re-arms the timer when an earlier deadline appears.
    kick: Notify,
    /// Wakes duplicates waiting on the write of the message they repeat.
    written: Notify,
    /// Wakes the queue's long polls.
    ready: Arc<Notify>,
    /// For moves to and from the dead-letter queue.
    queue: Weak<Queue>,
}

impl Partition {
    /// Encodes records and queues them to the log without waiting.
    fn log_records(&self, records: &[Record]) {
        if records.is_empty() {
            return;
        }
        let mut buf = BytesMut::new();
        for r in records {
            r.encode(&mut buf);
        }
        self.journal.append(buf.freeze());
    }

    async fn log_durably(&self, buf: Bytes) -> Result<crate::log::Location, BrokerError> {
        self.journal.append_waiting(buf, false).await
    }

    /// Whether this broker serves the partition now: always, unless it is a copy of a
    /// replicated partition that another broker leads.
    pub fn serving(&self) -> bool {
        self.check_serving().is_ok()
    }

    fn check_serving(&self) -> Result<(), BrokerError> {
        match &self.journal {
            Journal::Local(_) => Ok(()),
            Journal::Replicated(r) => {
                let term = r.check_leader()?;
                if self.led_term.load(Ordering::Acquire) == term {
                    Ok(())
                } else {
                    Err(BrokerError::Unavailable(format!(
                        "partition {} of queue {}: this broker has just become its leader and is reading its log; try again shortly",
                        self.id, self.settings.name
                    )))
                }
            }
        }
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The answer for a call that waited while this copy stopped leading.
    fn moved_on(&self) -> BrokerError {
        self.check_serving().err().unwrap_or_else(|| {
            BrokerError::Unavailable(format!(
                "partition {} changed leader during the call; try again",
                self.id
            ))
        })
    }

    pub async fn enqueue(
        self: &Arc<Self>,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<EnqueueOutcome>, BrokerError> {
        self.check_serving()?;
        let now = now_ms();
        let dedup_ids: Vec<String> = messages.iter().map(|m| m.dedup_id.clone()).collect();
        let mut buf = BytesMut::new();
        let (epoch, outcomes, in_doubt, write) = {
            let mut st = self.state.lock().unwrap();
            // Read under the lock that replacing the state takes too.
            let epoch = self.epoch();
            let (outcomes, reserved, drops) = st.reserve(now, messages, &mut buf)?;
            // Duplicates of messages still being written: answered with that write.
            let in_doubt: Vec<(String, u64)> = outcomes
                .iter()
                .zip(dedup_ids)
                .filter_map(|(o, id)| match o {
                    EnqueueOutcome::Duplicate(seq) if st.fate(&id, *seq) == Fate::Pending => {
                        Some((id, *seq))
                    }
                    _ => None,
                })
                .collect();
            for d in &drops {
                d.encode(&mut buf);
            }
            let write = (!buf.is_empty()).then(|| PendingWrite {
                partition: self.clone(),
                epoch,
                now,
                pending: Some((
                    reserved,
                    Box::pin(self.journal.append_waiting(buf.split().freeze(), true)),
                )),
            });
            (epoch, outcomes, in_doubt, write)
        };
        if let Some(write) = write {
            write.apply().await?;
        }
        self.await_writes(epoch, in_doubt).await?;
        Ok(outcomes)
    }

    /// Applies the outcome of writing the messages `reserved` (at `epoch`): into the
    /// state once durable, forgotten if the write failed. Wakes the duplicates waiting
    /// on them either way.
    fn apply_write(
        &self,
        epoch: u64,
        now: u64,
        reserved: Vec<crate::partition::Reserved>,
        written: Result<crate::log::Location, BrokerError>,
    ) -> Result<(), BrokerError> {
        let mut st = self.state.lock().unwrap();
        if self.epoch() != epoch {
            // The state that reserved these messages is gone; whether they were
            // committed, the new leader's log says (a retry with a dedup id is safe).
            return Err(self.moved_on());
        }
        let result = match written {
            Ok(base) => {
                let delayed = reserved.iter().any(|r| r.visible_at_ms > now);
                if st.commit(now_ms(), base, reserved) {
                    self.ready.notify_waiters();
                }
                drop(st);
                if delayed {
                    self.kick.notify_one();
                }
                Ok(())
            }
            Err(e) => {
                st.abort(reserved);
                drop(st);
                Err(e)
            }
        };
        self.written.notify_waiters();
        result
    }

    /// Waits until the writes of the messages `in_doubt` (dedup id, sequence number)
    /// have an outcome: a duplicate is acknowledged only once the message it repeats is
    /// durable. A write that failed fails the duplicate too, and the client's retry
    /// stores the message anew.
    async fn await_writes(
        &self,
        epoch: u64,
        in_doubt: Vec<(String, u64)>,
    ) -> Result<(), BrokerError> {
        for (id, seq) in in_doubt {
            loop {
                let written = self.written.notified();
                tokio::pin!(written);
                written.as_mut().enable();
                let fate = {
                    let st = self.state.lock().unwrap();
                    (self.epoch() == epoch).then(|| st.fate(&id, seq))
                };
                match fate {
                    None => return Err(self.moved_on()),
                    Some(Fate::Stored) => break,
                    Some(Fate::Failed) => {
                        return Err(BrokerError::Unavailable(format!(
                            "partition {} of queue {}: the earlier attempt at the message with dedup id {id:?} failed to store; try again",
                            self.id, self.settings.name
                        )));
                    }
                    // A replaced state (a new epoch) wakes nobody: look again soon.
                    Some(Fate::Pending) => {
                        let _ = tokio::time::timeout(Duration::from_millis(100), written).await;
                    }
                }
            }
        }
        Ok(())
    }

    fn deliver(&self, max: usize, visibility_ms: u64) -> Vec<Delivery> {
        if !self.serving() {
            return Vec::new();
        }
        let mut records = Vec::new();
        let out = {
            let mut st = self.state.lock().unwrap();
            let out = st.deliver(now_ms(), max, visibility_ms, &mut records);
            self.log_records(&records);
            out
        };
        if !out.is_empty() {
            self.kick.notify_one();
        }
        out
    }

    /// Reads a delivery's content from memory or the log.
    fn load(&self, d: &Delivery) -> Result<Arc<Content>, BrokerError> {
        if let Some(c) = &d.content {
            return Ok(c.clone());
        }
        match self.journal.reader().read(d.loc)? {
            Record::Enqueue(e) => Ok(Arc::new(Content {
                body: e.body,
                attributes: e.attributes,
                dedup_id: e.dedup_id,
            })),
            _ => Err(BrokerError::Internal(format!(
                "log record at {:?} is not the message {}",
                d.loc, d.seq
            ))),
        }
    }

    fn to_message(&self, d: &Delivery) -> Result<v1::Message, BrokerError> {
        let c = self.load(d)?;
        Ok(v1::Message {
            id: message_id(self.id, d.seq),
            body: c.body.clone(),
            attributes: c.attributes.iter().cloned().collect(),
            key: d.key.as_deref().unwrap_or_default().to_string(),
            dedup_id: c.dedup_id.clone(),
            delivery_count: d.deliveries,
            enqueued_at_ms: d.enqueued_at_ms,
            receipt: if d.deliveries > 0 {
                Receipt {
                    partition: self.id,
                    seq: d.seq,
                    delivery: d.deliveries,
                }
                .to_string()
            } else {
                String::new()
            },
            partition: self.id,
        })
    }

    fn maybe_delete_segments(&self, st: &mut PartitionState) {
        if let Some(floor) = st.take_delete_floor(now_ms(), self.journal.active_segment()) {
            self.journal.drop_below(floor, st.next_seq());
        }
    }

    /// Answers every receipt with the reason this broker cannot settle them now.
    fn refuse_all(&self, receipts: &[Receipt]) -> Option<Vec<Result<(), BrokerError>>> {
        let e = self.check_serving().err()?;
        Some(receipts.iter().map(|_| Err(e.clone_status())).collect())
    }

    pub async fn ack(&self, receipts: &[Receipt]) -> Vec<Result<(), BrokerError>> {
        if let Some(refused) = self.refuse_all(receipts) {
            return refused;
        }
        let now = now_ms();
        let mut buf = BytesMut::new();
        let mut results: Vec<Result<(), BrokerError>> = Vec::with_capacity(receipts.len());
        {
            let mut st = self.state.lock().unwrap();
            for r in receipts {
                results.push(match st.ack(now, r) {
                    Ok(rec) => {
                        rec.encode(&mut buf);
                        Ok(())
                    }
                    Err(e) => Err(e.into()),
                });
            }
        }
        if !buf.is_empty() {
            // Answer only once the settlement is durable: an acked message must not
            // come back after a crash.
            if let Err(e) = self.log_durably(buf.freeze()).await {
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(e.clone_status());
                }
            }
            let mut st = self.state.lock().unwrap();
            self.maybe_delete_segments(&mut st);
            drop(st);
            // A settled message of a key lets that key's next message out: waiting
            // consumers (long polls, subscriptions) must look again, or they sleep
            // until something else wakes them (found by the Python client example).
            self.ready.notify_waiters();
        }
        results
    }

    pub async fn nack(
        self: &Arc<Self>,
        receipts: &[Receipt],
        delay_ms: u64,
        dead_letter: bool,
    ) -> Vec<Result<(), BrokerError>> {
        if let Some(refused) = self.refuse_all(receipts) {
            return refused;
        }
        let now = now_ms();
        let mut fx = Effects::default();
        let results: Vec<Result<(), BrokerError>> = {
            let mut st = self.state.lock().unwrap();
            receipts
                .iter()
                .map(|r| {
                    st.nack(now, r, delay_ms, dead_letter, &mut fx)
                        .map_err(Into::into)
                })
                .collect()
        };
        self.apply(fx).await;
        results
    }

    pub fn extend(&self, receipts: &[Receipt], visibility_ms: u64) -> Vec<Result<(), BrokerError>> {
        if let Some(refused) = self.refuse_all(receipts) {
            return refused;
        }
        let now = now_ms();
        let mut st = self.state.lock().unwrap();
        let out = receipts
            .iter()
            .map(|r| st.extend(now, r, visibility_ms).map_err(Into::into))
            .collect();
        drop(st);
        self.kick.notify_one();
        out
    }

    /// Carries out what the semantics decided: log records, wake consumers, move
    /// messages to the dead-letter queue.
    async fn apply(self: &Arc<Self>, fx: Effects) {
        if !fx.records.is_empty() {
            let mut buf = BytesMut::new();
            for r in &fx.records {
                r.encode(&mut buf);
            }
            if let Err(e) = self.log_durably(buf.freeze()).await {
                tracing::warn!(partition = self.id, error = %e, "could not log requeues");
            }
            let mut st = self.state.lock().unwrap();
            self.maybe_delete_segments(&mut st);
        }
        if fx.woke {
            self.ready.notify_waiters();
        }
        self.kick.notify_one();
        if !fx.dead_letter.is_empty() {
            let this = self.clone();
            tokio::spawn(async move {
                this.move_out(fx.dead_letter, SettleReason::DeadLettered)
                    .await;
            });
        }
    }

    /// Copies messages (state Moving) into the dead-letter queue, or back to the
    /// source queue for a redrive, and settles them here once the copy is durable.
    async fn move_out(&self, seqs: Vec<u64>, reason: SettleReason) -> u64 {
        let Some(queue) = self.queue.upgrade() else {
            return 0;
        };
        let target = match reason {
            SettleReason::DeadLettered => queue.dlq.as_ref().and_then(|q| q.partition(self.id)),
            _ => queue.source().and_then(|q| q.partition(self.id)),
        };
        let mut moved = 0;
        for seq in seqs {
            let Some(d) = self.state.lock().unwrap().moving(seq) else {
                continue;
            };
            let copy = match (&target, self.load(&d)) {
                (Some(t), Ok(c)) => {
                    let mut attributes = c.attributes.clone();
                    if reason == SettleReason::DeadLettered {
                        attributes.push((ATTR_DLQ_SOURCE_ID.into(), message_id(self.id, seq)));
                        attributes.push((ATTR_DLQ_DELIVERIES.into(), d.deliveries.to_string()));
                    } else {
                        attributes
                            .retain(|(k, _)| k != ATTR_DLQ_SOURCE_ID && k != ATTR_DLQ_DELIVERIES);
                    }
                    let m = NewMessage {
                        body: c.body.clone(),
                        attributes,
                        key: d.key.as_deref().unwrap_or_default().to_string(),
                        // A dedup id would make the move look like a duplicate.
                        dedup_id: String::new(),
                        delay_ms: 0,
                    };
                    t.enqueue(vec![m]).await.map(|_| ())
                }
                (None, _) => Err(BrokerError::Internal(
                    "no queue to move the message to".into(),
                )),
                (_, Err(e)) => Err(e),
            };
            match copy {
                Ok(()) => {
                    let rec = self.state.lock().unwrap().moved(seq, reason);
                    let mut buf = BytesMut::new();
                    rec.encode(&mut buf);
                    if let Err(e) = self.log_durably(buf.freeze()).await {
                        tracing::warn!(partition = self.id, seq, error = %e, "could not log a move");
                    }
                    moved += 1;
                }
                Err(e) => {
                    if let (BrokerError::NotLeader { .. }, Some(t)) = (&e, &target) {
                        t.campaign().await;
                    }
                    tracing::warn!(partition = self.id, seq, error = %e, "could not move message; it stays");
                    self.state.lock().unwrap().move_failed(seq);
                    self.ready.notify_waiters();
                }
            }
        }
        let mut st = self.state.lock().unwrap();
        self.maybe_delete_segments(&mut st);
        moved
    }

    async fn run_timer(self: Arc<Self>) {
        loop {
            let next = self.state.lock().unwrap().next_deadline();
            let wait = next.map_or(60_000, |t| t.saturating_sub(now_ms()).min(60_000));
            if wait > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                    _ = self.kick.notified() => continue,
                }
            }
            if Arc::strong_count(&self) == 1 {
                return;
            }
            let mut fx = Effects::default();
            self.state.lock().unwrap().tick(now_ms(), &mut fx);
            if !fx.records.is_empty() || fx.woke || !fx.dead_letter.is_empty() {
                self.apply(fx).await;
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        self.state.lock().unwrap().snapshot()
    }

    /// Asks this broker's copy to lead the partition, unless it does (a replicated
    /// dead-letter partition follows its queue's partition, so moves stay local).
    async fn campaign(&self) {
        if let Journal::Replicated(r) = &self.journal
            && r.check_leader().is_err()
            && let Err(e) = r.raft.trigger().elect().await
        {
            tracing::debug!(queue = %self.settings.name, partition = self.id, error = %e, "cannot start an election");
        }
    }

    /// Serves while this copy leads: a copy that becomes leader rebuilds the queue
    /// state from its log (every committed entry is in it by then) before it answers
    /// a call; one that stops leading drops its state, which may hold decisions the
    /// group never committed.
    async fn lead_or_follow(self: Arc<Self>, replica: Arc<Replica>) {
        let mut roles = replica.roles();
        let mut role = *roles.borrow_and_update();
        loop {
            match role {
                Role::Leader { term } if self.led_term.load(Ordering::Acquire) == term => {}
                Role::Leader { term } => {
                    let last = replica
                        .raft
                        .metrics()
                        .borrow()
                        .last_applied
                        .map(|l| l.index);
                    let fresh = PartitionState::new(self.settings.clone(), self.budget.clone());
                    let rebuilt = match last {
                        Some(last) => {
                            let r = replica.clone();
                            tokio::task::spawn_blocking(move || r.rebuild(fresh, last, now_ms()))
                                .await
                                .map_err(|e| crate::log::LogError::Io {
                                    op: "rebuilding",
                                    path: Default::default(),
                                    source: std::io::Error::other(e.to_string()),
                                })
                                .and_then(|r| r)
                        }
                        None => Ok(fresh),
                    };
                    match rebuilt {
                        Ok(state) => {
                            let messages = state.snapshot().messages;
                            {
                                let mut st = self.state.lock().unwrap();
                                *st = state;
                                self.epoch.fetch_add(1, Ordering::AcqRel);
                                self.led_term.store(term, Ordering::Release);
                            }
                            tracing::info!(queue = %self.settings.name, partition = self.id, term, messages, "leading partition");
                            self.ready.notify_waiters();
                            self.kick.notify_one();
                            // The leader moves the copies where the settings place them.
                            let (target, mut known) = (
                                self.settings.copies_of(self.id),
                                self.settings.members_of(self.id),
                            );
                            known.extend(&target);
                            tokio::spawn(replica.clone().converge(target, known));
                            // Dead letters move within this broker: its copy of the
                            // dead-letter partition should lead too.
                            if let Some(dlq) = self
                                .queue
                                .upgrade()
                                .and_then(|q| q.dlq.as_ref().and_then(|d| d.partition(self.id)))
                            {
                                dlq.campaign().await;
                            }
                        }
                        Err(e) => {
                            tracing::error!(queue = %self.settings.name, partition = self.id, error = %e, "cannot rebuild the partition from its log; not serving it");
                        }
                    }
                }
                Role::Follower { leader } => {
                    self.led_term.store(0, Ordering::Release);
                    let fresh = PartitionState::new(self.settings.clone(), self.budget.clone());
                    {
                        let mut st = self.state.lock().unwrap();
                        *st = fresh;
                        self.epoch.fetch_add(1, Ordering::AcqRel);
                    }
                    tracing::debug!(queue = %self.settings.name, partition = self.id, ?leader, "following");
                }
            }
            if roles.changed().await.is_err() {
                return;
            }
            role = *roles.borrow_and_update();
        }
    }
}

/// A queue: the partitions of it this broker owns.
pub struct Queue {
    pub settings: Arc<QueueSettings>,
    pub ordinal: u32,
    partitions: HashMap<u32, Arc<Partition>>,
    owned: Vec<u32>,
    ready: Arc<Notify>,
    next: AtomicUsize,
    waiters: AtomicUsize,
    max_waiters: usize,
    pub dlq: Option<Arc<Queue>>,
    /// For a dead-letter queue: the queue it serves (redrive target).
    source: OnceLock<Weak<Queue>>,
}

impl Queue {
    /// Opens (recovering from disk) the partitions of `settings` owned by `ordinal`,
    /// and the dead-letter queue when the settings ask for one.
    pub fn open(
        dir: &Path,
        settings: QueueSettings,
        ordinal: u32,
        storage: &StorageOptions,
        budget: Arc<CacheBudget>,
        observer: Arc<dyn LogObserver>,
        groups: &Arc<Groups>,
    ) -> Result<Arc<Queue>, BrokerError> {
        let dlq = match settings.dead_letter {
            true => Some(Self::open_one(
                dir,
                settings.dead_letter_queue(),
                ordinal,
                storage,
                budget.clone(),
                observer.clone(),
                None,
                groups,
            )?),
            false => None,
        };
        let queue = Self::open_one(
            dir,
            settings,
            ordinal,
            storage,
            budget,
            observer,
            dlq.clone(),
            groups,
        )?;
        if let Some(d) = &dlq {
            let _ = d.source.set(Arc::downgrade(&queue));
        }
        Ok(queue)
    }

    #[allow(clippy::too_many_arguments)]
    fn open_one(
        dir: &Path,
        settings: QueueSettings,
        ordinal: u32,
        storage: &StorageOptions,
        budget: Arc<CacheBudget>,
        observer: Arc<dyn LogObserver>,
        dlq: Option<Arc<Queue>>,
        groups: &Arc<Groups>,
    ) -> Result<Arc<Queue>, BrokerError> {
        let settings = Arc::new(settings);
        let replicated = settings.raft_groups();
        let me = ordinal % settings.replicas;
        // The partitions this broker holds: its own, or, as Raft groups, those with a
        // copy here (placed here, or still a member of the group moving off this broker).
        let owned: Vec<u32> = match replicated {
            false => (0..settings.partitions)
                .filter(|&p| p % settings.replicas == me)
                .collect(),
            true => settings.hosted_by(me),
        };
        if replicated {
            drop_moved_copies(&dir.join(&settings.name), &settings, &owned)?;
        }
        let ready = Arc::new(Notify::new());
        let log_options = LogOptions {
            fsync: settings.fsync,
            fsync_interval: settings.fsync_interval,
            segment_bytes: storage.segment_bytes,
            reserve_bytes: storage.disk_reserve_bytes,
            // A replica's log calls back into the replica as entries land.
            caller_writes: !replicated,
        };
        let mut opened = Vec::new();
        if replicated {
            let peers = Arc::new(Peers::new(&settings.peers, groups.peer_tls()));
            for &id in &owned {
                let pdir = dir.join(&settings.name).join(id.to_string());
                // Only the group's members form it; a copy placed here joins it.
                let members = settings.members_of(id);
                let form = members.contains(&me).then_some(members);
                let (name, peers, options, observer) = (
                    settings.name.clone(),
                    peers.clone(),
                    log_options.clone(),
                    observer.clone(),
                );
                let replica = run_async(async move {
                    Replica::open(
                        &pdir,
                        &name,
                        id,
                        me,
                        form.as_deref(),
                        peers,
                        options,
                        observer,
                    )
                    .await
                })?;
                groups.insert(&settings.name, id, replica.raft.clone());
                let st = PartitionState::new(settings.clone(), budget.clone());
                opened.push((id, st, Journal::Replicated(replica)));
            }
        } else {
            let now = now_ms();
            let recovered = recover_partitions(dir, &settings, &owned, &budget, &observer, now)?;
            for Recovered {
                id,
                state: st,
                segments,
                end,
            } in recovered
            {
                let pdir = dir.join(&settings.name).join(id.to_string());
                let log = LogWriter::open(
                    &pdir,
                    &segments,
                    end,
                    log_options.clone(),
                    observer.clone(),
                    format!("{}-{id}", settings.name),
                )?;
                opened.push((id, st, Journal::Local(log)));
            }
        }
        let queue = Arc::new_cyclic(|weak: &Weak<Queue>| {
            let partitions = opened
                .into_iter()
                .map(|(id, st, journal)| {
                    (
                        id,
                        Arc::new(Partition {
                            id,
                            state: Mutex::new(st),
                            journal,
                            led_term: AtomicU64::new(0),
                            epoch: AtomicU64::new(0),
                            settings: settings.clone(),
                            budget: budget.clone(),
                            kick: Notify::new(),
                            written: Notify::new(),
                            ready: ready.clone(),
                            queue: weak.clone(),
                        }),
                    )
                })
                .collect();
            Queue {
                settings,
                ordinal,
                partitions,
                owned,
                ready,
                next: AtomicUsize::new(0),
                waiters: AtomicUsize::new(0),
                max_waiters: storage.max_waiters,
                dlq,
                source: OnceLock::new(),
            }
        });
        for p in queue.partitions.values() {
            // The timer holds the partition; it ends when the queue is dropped.
            tokio::spawn(p.clone().run_timer());
            if let Journal::Replicated(r) = &p.journal {
                tokio::spawn(p.clone().lead_or_follow(r.clone()));
            }
        }
        Ok(queue)
    }

    fn source(&self) -> Option<Arc<Queue>> {
        self.source.get().and_then(Weak::upgrade)
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    pub fn owned_partitions(&self) -> &[u32] {
        &self.owned
    }

    /// The partitions this broker serves now: all it owns, unless replicated, where
    /// only those whose copy here leads.
    pub fn serving_partitions(&self) -> Vec<u32> {
        self.owned
            .iter()
            .copied()
            .filter(|p| self.partitions[p].serving())
            .collect()
    }

    pub fn partition(&self, id: u32) -> Option<Arc<Partition>> {
        self.partitions.get(&id).cloned()
    }

    /// The partition a new message goes to: by key (or dedup id) hash when it has one,
    /// else round-robin over the partitions owned here.
    pub fn pick_partition(
        &self,
        explicit: Option<u32>,
        key: &str,
        dedup_id: &str,
    ) -> Result<u32, BrokerError> {
        let total = self.settings.partitions;
        let p = match place(explicit, key, dedup_id, total) {
            Placement::Explicit(p) if p >= total => {
                return Err(BrokerError::InvalidArgument(format!(
                    "partition {p} does not exist: queue {} has {total}",
                    self.name()
                )));
            }
            Placement::Explicit(p) | Placement::Hashed(p) => p,
            Placement::Any => {
                let i = self.next.fetch_add(1, Ordering::Relaxed);
                let n = self.owned.len();
                // Round robin over the partitions served here (all, unreplicated).
                return (0..n)
                    .map(|k| self.owned[(i + k) % n])
                    .find(|p| self.partitions[p].serving())
                    .ok_or_else(|| {
                        BrokerError::Unavailable(format!(
                            "this broker leads no partition of queue {} right now; send through the sidecar",
                            self.name()
                        ))
                    });
            }
        };
        match self.partitions.get(&p) {
            Some(partition) => partition.check_serving().map(|()| p),
            None => Err(BrokerError::FailedPrecondition(format!(
                "partition {p} of queue {} is on broker(s) {:?}, not this one ({}); send through the sidecar",
                self.name(),
                self.settings.copies_of(p),
                self.ordinal
            ))),
        }
    }

    /// Leases up to `max` messages, waiting up to `wait` for the first.
    /// Cancel-safe: messages are taken only in the step that returns them.
    pub async fn dequeue(
        &self,
        max: usize,
        wait: Duration,
        visibility_ms: u64,
    ) -> Result<Vec<v1::Message>, BrokerError> {
        let deadline = Instant::now() + wait;
        let mut slot = None;
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got = self.take(max, visibility_ms);
            if !got.is_empty() || Instant::now() >= deadline {
                return self.messages(got);
            }
            if slot.is_none() {
                slot = Some(self.wait_slot()?);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// The leased deliveries as messages. One that cannot be read back (its log
    /// record unreadable) is logged and left leased, to come back after its visibility
    /// timeout; it does not fail the others, which would be left leased with it.
    fn messages(
        &self,
        got: Vec<(Arc<Partition>, Delivery)>,
    ) -> Result<Vec<v1::Message>, BrokerError> {
        let mut out = Vec::with_capacity(got.len());
        let mut failed = None;
        for (p, d) in got {
            match p.to_message(&d) {
                Ok(m) => out.push(m),
                Err(e) => {
                    tracing::error!(queue = %self.name(), partition = p.id, seq = d.seq, at = ?d.loc, error = %e, "a leased message cannot be read back from the log; it stays leased");
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }

    fn wait_slot(&self) -> Result<WaitSlot<'_>, BrokerError> {
        if self.waiters.fetch_add(1, Ordering::Relaxed) >= self.max_waiters {
            self.waiters.fetch_sub(1, Ordering::Relaxed);
            return Err(BrokerError::ResourceExhausted(format!(
                "queue {} already has {} calls waiting for messages (the broker's --max-waiters); retry later, or wait with fewer concurrent long polls",
                self.name(),
                self.max_waiters
            )));
        }
        Ok(WaitSlot(&self.waiters))
    }

    fn take(&self, max: usize, visibility_ms: u64) -> Vec<(Arc<Partition>, Delivery)> {
        let mut out = Vec::new();
        let n = self.owned.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            if out.len() >= max {
                break;
            }
            let p = &self.partitions[&self.owned[(start + i) % n]];
            for d in p.deliver(max - out.len(), visibility_ms) {
                out.push((p.clone(), d));
            }
        }
        out
    }

    pub fn peek(&self, max: usize) -> Result<Vec<v1::Message>, BrokerError> {
        let mut all = Vec::new();
        for &id in &self.owned {
            let p = &self.partitions[&id];
            if !p.serving() {
                continue;
            }
            let ds = p.state.lock().unwrap().peek(max);
            for d in ds {
                all.push((d.enqueued_at_ms, p.to_message(&d)?));
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        Ok(all.into_iter().take(max).map(|x| x.1).collect())
    }

    /// Moves up to `max` messages of this dead-letter queue back to its source queue.
    pub async fn redrive(&self, max: u64) -> Result<u64, BrokerError> {
        if self.source().is_none() {
            return Err(BrokerError::FailedPrecondition(format!(
                "{} is not a dead-letter queue",
                self.name()
            )));
        }
        let mut moved = 0;
        for &id in &self.owned {
            let p = &self.partitions[&id];
            if !p.serving() {
                continue;
            }
            loop {
                let left = if max == 0 {
                    1000
                } else {
                    (max - moved).min(1000)
                } as usize;
                if left == 0 {
                    break;
                }
                let seqs = p.state.lock().unwrap().take_for_move(left);
                if seqs.is_empty() {
                    break;
                }
                moved += p.move_out(seqs, SettleReason::Redriven).await;
            }
        }
        Ok(moved)
    }

    /// This broker's copies of the queue's partitions as `GET /partitions` reports
    /// them: a partition of one copy always leads.
    pub fn reports(&self) -> Vec<PartitionReport> {
        let mut v: Vec<_> = self
            .partitions
            .iter()
            .map(|(id, p)| {
                let (copies, state, members) = match &p.journal {
                    Journal::Replicated(r) => (self.settings.replication, r.state(), r.members()),
                    Journal::Local(_) => (
                        1,
                        CopyState {
                            in_sync: Some(1),
                            term: 0,
                        },
                        None,
                    ),
                };
                PartitionReport {
                    queue: self.name().to_string(),
                    partition: *id,
                    copies,
                    leader: state.in_sync.is_some(),
                    term: state.term,
                    in_sync: state.in_sync,
                    members,
                    depth: p.serving().then(|| {
                        let s = p.snapshot();
                        Depth {
                            ready: s.ready,
                            in_flight: s.in_flight,
                            delayed: s.delayed,
                            oldest_ready_ms: s.oldest_ready_ms,
                        }
                    }),
                }
            })
            .collect();
        v.sort_by_key(|r| r.partition);
        v
    }

    pub fn snapshots(&self) -> Vec<(u32, Snapshot)> {
        let mut v: Vec<_> = self
            .partitions
            .iter()
            .map(|(id, p)| (*id, p.snapshot()))
            .collect();
        v.sort_by_key(|x| x.0);
        v
    }

    /// Writes and syncs everything queued and stops the log writers.
    pub async fn close(&self) {
        for p in self.partitions.values() {
            if let Err(e) = p.journal.close().await {
                tracing::warn!(queue = %self.name(), partition = p.id, error = %e, "flush at shutdown failed");
            }
        }
    }
}

impl From<ReceiptError> for BrokerError {
    fn from(e: ReceiptError) -> Self {
        match e {
            ReceiptError::NotFound => BrokerError::NotFound(
                "no message is leased with this receipt (already settled, or never delivered)"
                    .into(),
            ),
            ReceiptError::Expired => BrokerError::FailedPrecondition(
                "the lease of this receipt expired; the message is or will be delivered again"
                    .into(),
            ),
        }
    }
}
