//! The queue semantics of one partition, kept apart from I/O and clocks so they can be
//! tested directly: every method takes `now` in milliseconds, and those that change
//! what is on disk return the records to append.
//!
//! Structures, all keyed by the message's sequence number:
//! - `ready`: deliverable now, in FIFO order. Keyless ready messages, plus for each key
//!   that is not locked the oldest ready message of that key.
//! - `key_ready`: every ready message of a key, so the next one can be promoted when
//!   the key unlocks. A key is locked while one of its messages is in flight (or was
//!   given back with a delay): that is per-key ordering.
//! - `delayed` and `leases`: (time, seq) sets the timer walks.

use bytes::{Bytes, BytesMut};
use sluice_config::{Overflow, QueueSettings};
use sluice_proto::Receipt;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::log::Location;
use crate::log::record::{EnqueueRecord, Record, SettleReason};

/// Message content kept in memory while the cache budget allows.
#[derive(Debug)]
pub struct Content {
    pub body: Bytes,
    pub attributes: Vec<(String, String)>,
    pub dedup_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ready,
    Delayed {
        until: u64,
    },
    InFlight {
        deadline: u64,
    },
    /// Being copied to the dead-letter queue or back by a redrive.
    Moving,
}

#[derive(Debug)]
struct Entry {
    loc: Location,
    enqueued_at_ms: u64,
    body_len: u64,
    deliveries: u32,
    key: Option<Arc<str>>,
    state: State,
    /// Keyed message given back with a delay keeps its key locked.
    holds_key: bool,
    content: Option<Arc<Content>>,
}

/// A message handed out by `deliver`.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub seq: u64,
    pub deliveries: u32,
    pub enqueued_at_ms: u64,
    pub key: Option<Arc<str>>,
    pub loc: Location,
    pub content: Option<Arc<Content>>,
}

/// Why an operation on a receipt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiptError {
    NotFound,
    Expired,
}

/// What the timer or a nack decided about a message.
#[derive(Debug, Default)]
pub struct Effects {
    /// Records to append (no one waits for them).
    pub records: Vec<Record>,
    /// Messages to copy into the dead-letter queue, then settle here.
    pub dead_letter: Vec<u64>,
    /// Something became deliverable: wake waiting consumers.
    pub woke: bool,
}

/// A message accepted for enqueue, not yet durable.
#[derive(Debug)]
pub struct Reserved {
    pub seq: u64,
    pub visible_at_ms: u64,
    pub enqueued_at_ms: u64,
    /// Offset and length of its frame within the batch buffer.
    pub frame_offset: u64,
    pub frame_len: u32,
    pub key: Option<Arc<str>>,
    pub body_len: u64,
    pub content: Arc<Content>,
}

/// Outcome per message, the messages to store, and records of messages dropped to
/// make room.
pub type Reservation = (Vec<EnqueueOutcome>, Vec<Reserved>, Vec<Record>);

#[derive(Debug)]
pub enum EnqueueOutcome {
    Stored(u64),
    /// Of the message `seq`, which may still be being written: see [`PartitionState::fate`].
    Duplicate(u64),
}

/// What became of a message a duplicate enqueue refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Its write is under way.
    Pending,
    /// It is durable (it may have been settled since).
    Stored,
    /// Its write failed: it was never stored, and a retry stores it anew.
    Failed,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnqueueRefused {
    #[error(
        "queue is full ({what} limit {limit} reached per partition); consume, raise the limit or use overflow drop_oldest"
    )]
    Full { what: &'static str, limit: u64 },
}

/// A new message as the service validated it.
pub use sluice_dataplane::validate::NewMessage;

/// Bytes of message bodies a broker keeps in memory; beyond it bodies are read back
/// from the log.
#[derive(Debug)]
pub struct CacheBudget(AtomicI64);

impl CacheBudget {
    pub fn new(bytes: u64) -> Arc<Self> {
        Arc::new(CacheBudget(AtomicI64::new(bytes as i64)))
    }
    fn take(&self, n: u64) -> bool {
        if self.0.fetch_sub(n as i64, Ordering::Relaxed) >= n as i64 {
            true
        } else {
            self.0.fetch_add(n as i64, Ordering::Relaxed);
            false
        }
    }
    fn give(&self, n: u64) {
        self.0.fetch_add(n as i64, Ordering::Relaxed);
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub enqueued: u64,
    pub acked: u64,
    pub redelivered: u64,
    pub dead_lettered: u64,
    pub dropped: u64,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Snapshot {
    pub ready: u64,
    pub in_flight: u64,
    pub delayed: u64,
    pub bytes: u64,
    pub messages: u64,
    pub counters: Counters,
    /// When the oldest message waiting for delivery was enqueued (ms since the
    /// epoch): how long the backlog has waited (SQS's ApproximateAgeOfOldestMessage).
    /// Messages of a key held back behind one in flight count too.
    pub oldest_ready_ms: Option<u64>,
}

pub struct PartitionState {
    settings: Arc<QueueSettings>,
    /// Retention limits of this partition (the queue's, split over its partitions).
    max_messages: u64,
    max_bytes: u64,
    budget: Arc<CacheBudget>,
    entries: HashMap<u64, Entry>,
    ready: BTreeSet<u64>,
    key_ready: HashMap<Arc<str>, BTreeSet<u64>>,
    key_locks: HashMap<Arc<str>, u32>,
    delayed: BTreeSet<(u64, u64)>,
    leases: BTreeSet<(u64, u64)>,
    dedup: HashMap<String, u64>,
    dedup_order: VecDeque<(u64, String)>,
    next_seq: u64,
    /// Reserved but not yet durable.
    pending: u64,
    pending_bytes: u64,
    /// Sequence numbers of messages with a dedup id that are reserved but not yet
    /// durable: a retry of one must wait for its write (see [`PartitionState::fate`]).
    pending_dedup: HashSet<u64>,
    n_ready: u64,
    bytes: u64,
    /// Unsettled messages per segment; a segment leaves this map at zero.
    segment_live: BTreeMap<u64, u64>,
    /// Segments holding dedup ids still inside their window, with the latest expiry:
    /// kept on disk so that a restart rebuilds the window even for settled messages.
    dedup_segments: BTreeMap<u64, u64>,
    delete_floor: u64,
    pub counters: Counters,
}

impl Drop for PartitionState {
    /// A state is dropped when a replicated partition's copy stops leading: its cached
    /// bodies go back to the broker's budget.
    fn drop(&mut self) {
        let cached: u64 = self
            .entries
            .values()
            .filter(|e| e.content.is_some())
            .map(|e| e.body_len)
            .sum();
        self.budget.give(cached);
    }
}

fn split_limit(limit: u64, partitions: u32) -> u64 {
    if limit == 0 {
        u64::MAX
    } else {
        limit.div_ceil(u64::from(partitions.max(1)))
    }
}

impl PartitionState {
    pub fn new(settings: Arc<QueueSettings>, budget: Arc<CacheBudget>) -> Self {
        PartitionState {
            max_messages: split_limit(settings.retention_max_messages, settings.partitions),
            max_bytes: split_limit(settings.retention_max_bytes, settings.partitions),
            settings,
            budget,
            entries: HashMap::new(),
            ready: BTreeSet::new(),
            key_ready: HashMap::new(),
            key_locks: HashMap::new(),
            delayed: BTreeSet::new(),
            leases: BTreeSet::new(),
            dedup: HashMap::new(),
            dedup_order: VecDeque::new(),
            next_seq: 1,
            pending: 0,
            pending_bytes: 0,
            pending_dedup: HashSet::new(),
            n_ready: 0,
            bytes: 0,
            segment_live: BTreeMap::new(),
            dedup_segments: BTreeMap::new(),
            delete_floor: 0,
            counters: Counters::default(),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            ready: self.n_ready,
            in_flight: self.leases.len() as u64,
            delayed: self.delayed.len() as u64,
            bytes: self.bytes,
            messages: self.entries.len() as u64,
            counters: self.counters,
            oldest_ready_ms: self.oldest_ready_ms(),
        }
    }

    fn oldest_ready_ms(&self) -> Option<u64> {
        let keyless = self.ready.first().copied();
        let keyed = self
            .key_ready
            .values()
            .filter_map(|s| s.first().copied())
            .min();
        let seq = keyless.into_iter().chain(keyed).min()?;
        self.entries.get(&seq).map(|e| e.enqueued_at_ms)
    }

    // ---- the ready structure -------------------------------------------------

    fn key_locked(&self, key: &Arc<str>) -> bool {
        self.key_locks.contains_key(key)
    }

    fn make_ready(&mut self, seq: u64) {
        let Some(e) = self.entries.get_mut(&seq) else {
            return;
        };
        e.state = State::Ready;
        self.n_ready += 1;
        match e.key.clone() {
            None => {
                self.ready.insert(seq);
            }
            Some(key) => {
                let locked = self.key_locked(&key);
                let set = self.key_ready.entry(key).or_default();
                set.insert(seq);
                if !locked && set.first() == Some(&seq) {
                    if let Some(&old_head) = set.iter().nth(1) {
                        self.ready.remove(&old_head);
                    }
                    self.ready.insert(seq);
                }
            }
        }
    }

    /// Takes a ready message out of the ready structure (it stays in `entries`).
    fn unready(&mut self, seq: u64, lock_key: bool) {
        let Some(e) = self.entries.get(&seq) else {
            return;
        };
        debug_assert_eq!(e.state, State::Ready);
        self.n_ready -= 1;
        let was_head = self.ready.remove(&seq);
        if let Some(key) = e.key.clone() {
            if let Some(set) = self.key_ready.get_mut(&key) {
                set.remove(&seq);
                let next = set.first().copied();
                if set.is_empty() {
                    self.key_ready.remove(&key);
                }
                if lock_key {
                    *self.key_locks.entry(key).or_insert(0) += 1;
                } else if was_head && let Some(next) = next {
                    self.ready.insert(next);
                }
            } else if lock_key {
                *self.key_locks.entry(key).or_insert(0) += 1;
            }
        }
    }

    fn unlock_key(&mut self, key: &Arc<str>) {
        if let Some(n) = self.key_locks.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.key_locks.remove(key);
                if let Some(&head) = self.key_ready.get(key).and_then(|s| s.first()) {
                    self.ready.insert(head);
                }
            }
        }
    }

    /// Takes a message out of whatever state it is in, releasing its key lock.
    fn detach(&mut self, seq: u64) {
        let Some(e) = self.entries.get(&seq) else {
            return;
        };
        let (state, key, holds) = (e.state, e.key.clone(), e.holds_key);
        match state {
            State::Ready => self.unready(seq, false),
            State::Delayed { until } => {
                self.delayed.remove(&(until, seq));
                if holds && let Some(k) = &key {
                    self.unlock_key(k);
                }
            }
            State::InFlight { deadline } => {
                self.leases.remove(&(deadline, seq));
                if let Some(k) = &key {
                    self.unlock_key(k);
                }
            }
            State::Moving => {}
        }
        if let Some(e) = self.entries.get_mut(&seq) {
            e.holds_key = false;
            e.state = State::Moving;
        }
    }

    /// Removes a message for good.
    fn remove(&mut self, seq: u64) {
        self.detach(seq);
        if let Some(e) = self.entries.remove(&seq) {
            self.bytes -= e.body_len;
            if e.content.is_some() {
                self.budget.give(e.body_len);
            }
            if let Some(n) = self.segment_live.get_mut(&e.loc.segment) {
                *n -= 1;
                if *n == 0 {
                    self.segment_live.remove(&e.loc.segment);
                }
            }
        }
    }

    /// Segments older than this hold no unsettled message and no dedup id still in its
    /// window, and may be deleted; returns a new floor only when it moved.
    pub fn take_delete_floor(&mut self, now: u64, active_segment: u64) -> Option<u64> {
        if self.pending > 0 {
            return None;
        }
        self.dedup_segments.retain(|_, expires| *expires > now);
        let floor = [
            self.segment_live.keys().next(),
            self.dedup_segments.keys().next(),
        ]
        .into_iter()
        .flatten()
        .copied()
        .min()
        .unwrap_or(active_segment);
        (floor > self.delete_floor).then(|| {
            self.delete_floor = floor;
            floor
        })
    }

    // ---- enqueue ------------------------------------------------------------

    fn purge_dedup(&mut self, now: u64) {
        while let Some((expires, _)) = self.dedup_order.front() {
            if *expires > now {
                break;
            }
            let (_, id) = self.dedup_order.pop_front().unwrap();
            self.dedup.remove(&id);
        }
    }

    /// Accepts messages: assigns sequence numbers and encodes their records into
    /// `buf`. Returns one outcome per message; duplicates are not stored.
    pub fn reserve(
        &mut self,
        now: u64,
        messages: Vec<NewMessage>,
        buf: &mut BytesMut,
    ) -> Result<Reservation, EnqueueRefused> {
        self.purge_dedup(now);
        let new: Vec<bool> = messages
            .iter()
            .map(|m| m.dedup_id.is_empty() || !self.dedup.contains_key(&m.dedup_id))
            .collect();
        let add_count = new.iter().filter(|n| **n).count() as u64;
        let add_bytes: u64 = messages
            .iter()
            .zip(&new)
            .filter(|(_, n)| **n)
            .map(|(m, _)| m.body.len() as u64)
            .sum();
        let mut drops = Vec::new();
        let count = self.entries.len() as u64 + self.pending;
        let bytes = self.bytes + self.pending_bytes;
        let over = |count: u64, bytes: u64| {
            if count + add_count > self.max_messages {
                Some(("messages", self.max_messages))
            } else if bytes + add_bytes > self.max_bytes {
                Some(("bytes", self.max_bytes))
            } else {
                None
            }
        };
        if let Some((what, limit)) = over(count, bytes) {
            if self.settings.overflow == Overflow::RejectNew
                || add_count > self.max_messages
                || add_bytes > self.max_bytes
            {
                return Err(EnqueueRefused::Full { what, limit });
            }
            // Drop the oldest waiting messages until the new ones fit.
            let (mut c, mut b) = (count, bytes);
            let mut victims = Vec::new();
            for &seq in &self.ready {
                if over(c, b).is_none() {
                    break;
                }
                victims.push(seq);
                c -= 1;
                b -= self.entries[&seq].body_len;
            }
            if over(c, b).is_some() {
                return Err(EnqueueRefused::Full { what, limit });
            }
            for seq in victims {
                self.remove(seq);
                self.counters.dropped += 1;
                drops.push(Record::Settle {
                    seq,
                    reason: SettleReason::Dropped,
                });
            }
        }
        let mut outcomes = Vec::with_capacity(messages.len());
        let mut reserved = Vec::with_capacity(messages.len());
        for m in messages {
            if !m.dedup_id.is_empty()
                && let Some(&seq) = self.dedup.get(&m.dedup_id)
            {
                outcomes.push(EnqueueOutcome::Duplicate(seq));
                continue;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            let delay = if m.delay_ms > 0 {
                m.delay_ms
            } else {
                self.settings.default_delay.as_millis() as u64
            };
            if !m.dedup_id.is_empty() {
                self.pending_dedup.insert(seq);
                self.dedup.insert(m.dedup_id.clone(), seq);
                let expires = now + self.settings.dedup_window.as_millis() as u64;
                self.dedup_order.push_back((expires, m.dedup_id.clone()));
            }
            let start = buf.len() as u64;
            let rec = EnqueueRecord {
                seq,
                enqueued_at_ms: now,
                visible_at_ms: now + delay,
                key: m.key,
                dedup_id: m.dedup_id,
                attributes: m.attributes,
                body: m.body,
            };
            Record::Enqueue(rec.clone()).encode(buf);
            let body_len = rec.body.len() as u64;
            self.pending += 1;
            self.pending_bytes += body_len;
            reserved.push(Reserved {
                seq,
                visible_at_ms: rec.visible_at_ms,
                enqueued_at_ms: now,
                frame_offset: start,
                frame_len: (buf.len() as u64 - start) as u32,
                key: (!rec.key.is_empty()).then(|| Arc::from(rec.key.as_str())),
                body_len,
                content: Arc::new(Content {
                    body: rec.body,
                    attributes: rec.attributes,
                    dedup_id: rec.dedup_id,
                }),
            });
            outcomes.push(EnqueueOutcome::Stored(seq));
        }
        Ok((outcomes, reserved, drops))
    }

    /// What became of the message `seq` that an enqueue with `dedup_id` was found to
    /// duplicate. While its write is under way the duplicate cannot be answered: were
    /// it acknowledged and the write then failed (a leader deposed mid-write), the
    /// message would be lost although both attempts were answered.
    pub fn fate(&self, dedup_id: &str, seq: u64) -> Fate {
        if self.pending_dedup.contains(&seq) {
            Fate::Pending
        } else if self.dedup.get(dedup_id) == Some(&seq) {
            Fate::Stored
        } else {
            Fate::Failed
        }
    }

    /// The reserved messages are durable at `base` (the batch buffer's location).
    pub fn commit(&mut self, now: u64, base: Location, reserved: Vec<Reserved>) -> bool {
        let mut woke = false;
        for r in reserved {
            self.pending -= 1;
            self.pending_bytes -= r.body_len;
            let loc = Location {
                segment: base.segment,
                offset: base.offset + r.frame_offset,
                len: r.frame_len,
            };
            if !r.content.dedup_id.is_empty() {
                self.pending_dedup.remove(&r.seq);
                self.keep_for_dedup(loc.segment, r.enqueued_at_ms);
            }
            woke |= self.insert(
                now,
                r.seq,
                loc,
                r.enqueued_at_ms,
                r.visible_at_ms,
                r.key,
                r.body_len,
                Some(r.content),
            );
            self.counters.enqueued += 1;
        }
        woke
    }

    fn keep_for_dedup(&mut self, segment: u64, enqueued_at_ms: u64) {
        let expires = enqueued_at_ms + self.settings.dedup_window.as_millis() as u64;
        let e = self.dedup_segments.entry(segment).or_insert(expires);
        *e = (*e).max(expires);
    }

    /// The reserved messages could not be written: forget them.
    pub fn abort(&mut self, reserved: Vec<Reserved>) {
        for r in reserved {
            self.pending -= 1;
            self.pending_bytes -= r.body_len;
            self.pending_dedup.remove(&r.seq);
            if !r.content.dedup_id.is_empty() && self.dedup.get(&r.content.dedup_id) == Some(&r.seq)
            {
                self.dedup.remove(&r.content.dedup_id);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn insert(
        &mut self,
        now: u64,
        seq: u64,
        loc: Location,
        enqueued_at_ms: u64,
        visible_at_ms: u64,
        key: Option<Arc<str>>,
        body_len: u64,
        content: Option<Arc<Content>>,
    ) -> bool {
        let content = content.filter(|_| self.budget.take(body_len));
        self.entries.insert(
            seq,
            Entry {
                loc,
                enqueued_at_ms,
                body_len,
                deliveries: 0,
                key,
                state: State::Moving,
                holds_key: false,
                content,
            },
        );
        self.bytes += body_len;
        *self.segment_live.entry(loc.segment).or_insert(0) += 1;
        if visible_at_ms <= now {
            self.make_ready(seq);
            true
        } else {
            self.set_delayed(seq, visible_at_ms);
            false
        }
    }

    fn set_delayed(&mut self, seq: u64, until: u64) {
        if let Some(e) = self.entries.get_mut(&seq) {
            e.state = State::Delayed { until };
            self.delayed.insert((until, seq));
        }
    }

    // ---- recovery -----------------------------------------------------------

    /// Applies one record read back from the log. Leases do not survive a restart:
    /// a message in flight at the crash is visible again at once. Bodies are not
    /// cached: most records of a long log are settled later in it, and copying every
    /// body out of the segment buffer costs more than reading back the few delivered.
    pub fn replay(&mut self, now: u64, rec: Record, loc: Location) {
        match rec {
            Record::Enqueue(e) => {
                if self.entries.contains_key(&e.seq) {
                    self.remove(e.seq);
                }
                self.next_seq = self.next_seq.max(e.seq + 1);
                let window = self.settings.dedup_window.as_millis() as u64;
                if !e.dedup_id.is_empty() && e.enqueued_at_ms + window > now {
                    self.keep_for_dedup(loc.segment, e.enqueued_at_ms);
                    self.dedup.insert(e.dedup_id.clone(), e.seq);
                    self.dedup_order
                        .push_back((e.enqueued_at_ms + window, e.dedup_id.clone()));
                }
                let body_len = e.body.len() as u64;
                let key = (!e.key.is_empty()).then(|| Arc::from(e.key.as_str()));
                self.insert(
                    now,
                    e.seq,
                    loc,
                    e.enqueued_at_ms,
                    e.visible_at_ms,
                    key,
                    body_len,
                    None,
                );
                self.counters.enqueued += 1;
            }
            Record::Settle { seq, .. } => self.remove(seq),
            Record::Deliver { seq, delivery } => {
                if let Some(e) = self.entries.get_mut(&seq) {
                    e.deliveries = e.deliveries.max(delivery);
                }
            }
            Record::Requeue { seq, visible_at_ms } => {
                if self.entries.contains_key(&seq) {
                    self.detach(seq);
                    if visible_at_ms <= now {
                        self.make_ready(seq);
                    } else {
                        self.set_delayed(seq, visible_at_ms);
                    }
                }
            }
            Record::Floor { next_seq, .. } => self.next_seq = self.next_seq.max(next_seq),
            // Raft bookkeeping of a replicated partition: no message state.
            Record::Entry(_) => {}
        }
    }

    /// Where sequence numbers go on.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// After replay: the dedup window list must be in expiry order.
    pub fn finish_replay(&mut self) {
        self.dedup_order.make_contiguous().sort();
    }

    // ---- delivery -----------------------------------------------------------

    /// Leases up to `max` ready messages until `now + visibility_ms`.
    pub fn deliver(
        &mut self,
        now: u64,
        max: usize,
        visibility_ms: u64,
        records: &mut Vec<Record>,
    ) -> Vec<Delivery> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(&seq) = self.ready.first() else {
                break;
            };
            self.unready(seq, true);
            let deadline = now + visibility_ms;
            let e = self.entries.get_mut(&seq).expect("ready entry exists");
            e.deliveries += 1;
            e.state = State::InFlight { deadline };
            self.leases.insert((deadline, seq));
            records.push(Record::Deliver {
                seq,
                delivery: e.deliveries,
            });
            out.push(Delivery {
                seq,
                deliveries: e.deliveries,
                enqueued_at_ms: e.enqueued_at_ms,
                key: e.key.clone(),
                loc: e.loc,
                content: e.content.clone(),
            });
        }
        out
    }

    /// Peeks at up to `max` ready messages without leasing them.
    pub fn peek(&self, max: usize) -> Vec<Delivery> {
        let mut seqs: Vec<u64> = self.ready.iter().take(max).copied().collect();
        for set in self.key_ready.values() {
            seqs.extend(set.iter().take(max));
        }
        seqs.sort_unstable();
        seqs.dedup();
        seqs.truncate(max);
        seqs.into_iter()
            .map(|seq| {
                let e = &self.entries[&seq];
                Delivery {
                    seq,
                    deliveries: e.deliveries,
                    enqueued_at_ms: e.enqueued_at_ms,
                    key: e.key.clone(),
                    loc: e.loc,
                    content: e.content.clone(),
                }
            })
            .collect()
    }

    fn leased(&self, now: u64, r: &Receipt) -> Result<u64, ReceiptError> {
        let e = self.entries.get(&r.seq).ok_or(ReceiptError::NotFound)?;
        match e.state {
            State::InFlight { deadline } if e.deliveries == r.delivery && deadline > now => {
                Ok(deadline)
            }
            _ if r.delivery > e.deliveries || r.delivery == 0 => Err(ReceiptError::NotFound),
            _ => Err(ReceiptError::Expired),
        }
    }

    /// Settles a leased message. The caller appends the returned record and answers
    /// only once it is durable.
    pub fn ack(&mut self, now: u64, r: &Receipt) -> Result<Record, ReceiptError> {
        self.leased(now, r)?;
        self.remove(r.seq);
        self.counters.acked += 1;
        Ok(Record::Settle {
            seq: r.seq,
            reason: SettleReason::Acked,
        })
    }

    /// Gives a leased message back: visible again after `delay_ms` (or the backoff),
    /// or to the dead-letter queue.
    pub fn nack(
        &mut self,
        now: u64,
        r: &Receipt,
        delay_ms: u64,
        dead_letter: bool,
        effects: &mut Effects,
    ) -> Result<(), ReceiptError> {
        self.leased(now, r)?;
        let deliveries = self.entries[&r.seq].deliveries;
        if dead_letter || self.exhausted(deliveries) {
            self.dead_letter_or_drop(r.seq, effects);
            return Ok(());
        }
        let delay = if delay_ms > 0 {
            delay_ms
        } else {
            self.backoff_ms(deliveries)
        };
        let e = self.entries.get(&r.seq).unwrap();
        let (deadline, key) = match e.state {
            State::InFlight { deadline } => (deadline, e.key.clone()),
            _ => unreachable!("leased() checked the state"),
        };
        self.leases.remove(&(deadline, r.seq));
        self.counters.redelivered += 1;
        if delay == 0 {
            if let Some(k) = &key {
                self.unlock_key(k);
            }
            self.make_ready(r.seq);
            effects.woke = true;
        } else {
            // The key stays locked until the message is back: order is kept.
            let e = self.entries.get_mut(&r.seq).unwrap();
            e.holds_key = key.is_some();
            self.set_delayed(r.seq, now + delay);
        }
        effects.records.push(Record::Requeue {
            seq: r.seq,
            visible_at_ms: now + delay,
        });
        Ok(())
    }

    pub fn extend(
        &mut self,
        now: u64,
        r: &Receipt,
        visibility_ms: u64,
    ) -> Result<(), ReceiptError> {
        let deadline = self.leased(now, r)?;
        self.leases.remove(&(deadline, r.seq));
        let new = now + visibility_ms;
        self.leases.insert((new, r.seq));
        self.entries.get_mut(&r.seq).unwrap().state = State::InFlight { deadline: new };
        Ok(())
    }

    fn exhausted(&self, deliveries: u32) -> bool {
        self.settings.max_deliveries > 0 && deliveries >= self.settings.max_deliveries
    }

    fn backoff_ms(&self, deliveries: u32) -> u64 {
        let base = self.settings.redelivery_delay.as_millis() as u64;
        if base == 0 {
            return 0;
        }
        let max = self.settings.redelivery_delay_max.as_millis() as u64;
        let factor = 1u64 << deliveries.saturating_sub(1).min(30);
        base.saturating_mul(factor)
            .min(if max == 0 { u64::MAX } else { max })
    }

    fn dead_letter_or_drop(&mut self, seq: u64, effects: &mut Effects) {
        self.detach(seq);
        if self.settings.dead_letter {
            effects.dead_letter.push(seq);
        } else {
            self.remove(seq);
            self.counters.dropped += 1;
            effects.records.push(Record::Settle {
                seq,
                reason: SettleReason::Dropped,
            });
        }
    }

    /// Content and metadata of a message being moved (to the DLQ or by a redrive).
    pub fn moving(&self, seq: u64) -> Option<Delivery> {
        let e = self.entries.get(&seq)?;
        (e.state == State::Moving).then(|| Delivery {
            seq,
            deliveries: e.deliveries,
            enqueued_at_ms: e.enqueued_at_ms,
            key: e.key.clone(),
            loc: e.loc,
            content: e.content.clone(),
        })
    }

    /// The move succeeded: the message is settled here.
    pub fn moved(&mut self, seq: u64, reason: SettleReason) -> Record {
        self.remove(seq);
        match reason {
            SettleReason::DeadLettered => self.counters.dead_lettered += 1,
            _ => self.counters.acked += 1,
        }
        Record::Settle { seq, reason }
    }

    /// The move failed: the message waits here again.
    pub fn move_failed(&mut self, seq: u64) {
        if self
            .entries
            .get(&seq)
            .is_some_and(|e| e.state == State::Moving)
        {
            self.make_ready(seq);
        }
    }

    /// Takes up to `max` ready messages out for a redrive.
    pub fn take_for_move(&mut self, max: usize) -> Vec<u64> {
        let mut seqs: Vec<u64> = Vec::new();
        while seqs.len() < max {
            let Some(&seq) = self.ready.first() else {
                break;
            };
            self.detach(seq);
            seqs.push(seq);
        }
        seqs
    }

    // ---- time ---------------------------------------------------------------

    /// The next time something is due.
    pub fn next_deadline(&self) -> Option<u64> {
        let a = self.delayed.first().map(|x| x.0);
        let b = self.leases.first().map(|x| x.0);
        let c = (!self.settings.retention_max_age.is_zero())
            .then(|| {
                self.ready.first().map(|s| {
                    self.entries[s].enqueued_at_ms
                        + self.settings.retention_max_age.as_millis() as u64
                })
            })
            .flatten();
        [a, b, c].into_iter().flatten().min()
    }

    /// Expires leases, releases delayed messages and applies the age limit.
    pub fn tick(&mut self, now: u64, effects: &mut Effects) {
        while let Some(&(deadline, seq)) = self.leases.first() {
            if deadline > now {
                break;
            }
            let deliveries = self.entries[&seq].deliveries;
            if self.exhausted(deliveries) {
                self.dead_letter_or_drop(seq, effects);
            } else {
                self.detach(seq);
                self.make_ready(seq);
                self.counters.redelivered += 1;
                effects.woke = true;
            }
        }
        while let Some(&(until, seq)) = self.delayed.first() {
            if until > now {
                break;
            }
            self.detach(seq);
            self.make_ready(seq);
            effects.woke = true;
        }
        let max_age = self.settings.retention_max_age.as_millis() as u64;
        if max_age > 0 {
            while let Some(&seq) = self.ready.first() {
                if self.entries[&seq].enqueued_at_ms + max_age > now {
                    break;
                }
                self.remove(seq);
                self.counters.dropped += 1;
                effects.records.push(Record::Settle {
                    seq,
                    reason: SettleReason::Expired,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
