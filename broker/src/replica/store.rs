//! A replicated partition's Raft log, kept in the partition's segmented log: each
//! entry is an [`EntryHeader`] record followed by the records it carries. An index in
//! memory says where every entry not yet purged lies; the vote and the purge point sit
//! in a small file beside the segments (`raft.meta`, replaced atomically).

use bytes::{Bytes, BytesMut};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    CommittedLeaderId, EntryPayload as RaftPayload, ErrorSubject, ErrorVerb, LogState,
    RaftLogReader,
};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Entry, LogId, Membership, NodeId, StorageError, TypeConfig, Vote, storage_error};
use crate::log::record::{EntryHeader, EntryPayload, Frame, Record, read_frame};
use crate::log::{Location, LogError, LogWriter, SegmentReader};

/// Where an entry lies and what it carries.
#[derive(Debug, Clone)]
struct Slot {
    log_id: LogId,
    /// The header's place once written.
    header: Option<Location>,
    /// Until written: the entry itself, so replication need not wait for the disk.
    pending: Option<Entry>,
    /// Bytes of records after the header (0 for blank and membership entries).
    records_len: u32,
    membership: Option<Arc<Membership>>,
}

impl Slot {
    fn records_at(&self) -> Option<Location> {
        let h = self.header?;
        (self.records_len > 0).then_some(Location {
            segment: h.segment,
            offset: h.offset + u64::from(h.len),
            len: self.records_len,
        })
    }
}

/// The entries of the log not yet purged, by index.
#[derive(Debug, Default)]
pub struct Index {
    slots: BTreeMap<u64, Slot>,
    last_purged: Option<LogId>,
}

impl Index {
    /// Where the records of entry `index` lie in this broker's log.
    pub fn records_at(&self, index: u64) -> Option<Location> {
        self.slots.get(&index).and_then(Slot::records_at)
    }

    pub fn log_id(&self, index: u64) -> Option<LogId> {
        self.slots.get(&index).map(|s| s.log_id)
    }

    /// The last of the leading entries written wholly in segments below `segment`
    /// (an entry and its records share a segment). An entry not written yet ends the
    /// run: it may hold messages the leader has not placed.
    pub fn last_below(&self, segment: u64) -> Option<u64> {
        self.slots
            .iter()
            .take_while(|(_, s)| s.header.is_some_and(|h| h.segment < segment))
            .map(|(&i, _)| i)
            .last()
    }

    pub fn last_purged(&self) -> Option<LogId> {
        self.last_purged
    }
}

pub fn log_id(term: u64, node: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, node), index)
}

fn header_of(e: &Entry) -> EntryHeader {
    EntryHeader {
        index: e.log_id.index,
        term: e.log_id.leader_id.term,
        node: e.log_id.leader_id.node_id,
        payload: match &e.payload {
            RaftPayload::Blank => EntryPayload::Blank,
            RaftPayload::Normal(records) => EntryPayload::Records {
                len: records.len() as u32,
            },
            RaftPayload::Membership(m) => EntryPayload::Membership {
                configs: m
                    .get_joint_config()
                    .iter()
                    .map(|c| c.iter().copied().collect())
                    .collect(),
                nodes: m.nodes().map(|(id, _)| *id).collect(),
            },
        },
    }
}

pub fn membership_of(configs: &[Vec<u64>], nodes: &[u64]) -> Membership {
    let configs: Vec<BTreeSet<u64>> = configs
        .iter()
        .map(|c| c.iter().copied().collect())
        .collect();
    let nodes: BTreeSet<u64> = nodes.iter().copied().collect();
    Membership::new(configs, nodes)
}

/// The vote and the purge point, persisted together.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Meta {
    vote: Option<Vote>,
    purged: Option<LogId>,
}

const META_FILE: &str = "raft.meta";

impl Meta {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        let mut put = |v: u64| out.extend_from_slice(&v.to_le_bytes());
        match self.vote {
            Some(v) => {
                put(1);
                put(v.leader_id.term);
                put(v.leader_id.node_id);
                put(u64::from(v.committed));
            }
            None => put(0),
        }
        match self.purged {
            Some(p) => {
                put(1);
                put(p.leader_id.term);
                put(p.leader_id.node_id);
                put(p.index);
            }
            None => put(0),
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(data: &[u8]) -> Option<Meta> {
        let (body, crc) = data.split_at_checked(data.len().checked_sub(4)?)?;
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) {
            return None;
        }
        let mut words = body
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()));
        let mut next = || words.next();
        let vote = match next()? {
            0 => None,
            _ => {
                let (term, node, committed) = (next()?, next()?, next()?);
                Some(if committed == 1 {
                    Vote::new_committed(term, node)
                } else {
                    Vote::new(term, node)
                })
            }
        };
        let purged = match next()? {
            0 => None,
            _ => Some(log_id(next()?, next()?, next()?)),
        };
        Some(Meta { vote, purged })
    }

    fn load(dir: &Path) -> Result<Meta, LogError> {
        let path = dir.join(META_FILE);
        match std::fs::read(&path) {
            Ok(data) => Meta::decode(&data).ok_or(LogError::Damaged {
                segment: 0,
                offset: 0,
                why: "raft.meta is damaged",
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Meta::default()),
            Err(e) => Err(LogError::Io {
                op: "reading",
                path,
                source: e,
            }),
        }
    }

    /// What copy `me` may believe after a restart. openraft resumes leading when the
    /// saved vote is a leader's own, in the same term; but a leader sends entries
    /// before its own disk has them, so it may have died with entries on the
    /// followers that its log lacks, and would then give those indexes other entries
    /// in the same term (two different entries with one log id). So a restarted
    /// leader comes back as a candidate of its term: the group elects a leader in a
    /// new term, whose log the others compare and repair as Raft requires.
    fn restarted(self, me: NodeId) -> Meta {
        let vote = self.vote.map(|v| match v.leader_id.voted_for() {
            Some(node) if v.committed && node == me => Vote::new(v.leader_id.term, node),
            _ => v,
        });
        Meta { vote, ..self }
    }

    fn save(&self, dir: &Path) -> std::io::Result<()> {
        write_atomically(dir, META_FILE, &self.encode())
    }
}

/// Writes `name` in `dir` through a synced temporary file and a rename, so a crash
/// leaves the old contents or the new, never a mix.
pub(crate) fn write_atomically(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

const COPY_ID_FILE: &str = "copy.id";

/// The node id of the copy in `dir`, on broker `ordinal`.
///
/// A copy that forms its group, and every copy from before ids had incarnations, is
/// the broker's ordinal. A copy placed here by a move (`joining`, in an empty
/// directory) gets a new incarnation, kept in `copy.id`. Openraft counts a node as
/// a voter when the last membership in *its* log names it; a new copy replays the
/// group's log from the start, and a membership from when an earlier copy on this
/// broker was a voter (with one copy, the only voter) would otherwise let it elect
/// itself on a restart before it reaches the membership that added it (seen in the
/// e2e single-copy scenario: two leaders, then a panic in openraft's follower).
/// Openraft asks that a node id never be reused; this is how it is not.
pub fn copy_id(
    dir: &Path,
    ordinal: u32,
    joining: bool,
    found: &Recovered,
) -> Result<NodeId, LogError> {
    let path = dir.join(COPY_ID_FILE);
    let io = |op: &'static str, source: std::io::Error| LogError::Io {
        op,
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            return text
                .trim()
                .parse::<NodeId>()
                .ok()
                .filter(|&id| super::ordinal(id) == ordinal)
                .ok_or(LogError::Damaged {
                    segment: 0,
                    offset: 0,
                    why: "copy.id is damaged or names another broker",
                });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("reading", e)),
    }
    let empty = found.index.slots.is_empty() && Meta::load(dir)? == Meta::default();
    if !(joining && empty) {
        return Ok(super::node_id(ordinal, 0));
    }
    let id = super::node_id(ordinal, new_incarnation());
    write_atomically(dir, COPY_ID_FILE, id.to_string().as_bytes()).map_err(|e| io("writing", e))?;
    Ok(id)
}

/// A random non-zero incarnation (std's hasher keys are random per process, and
/// the clock makes two in one process differ).
fn new_incarnation() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() as u32).max(1)
}

/// What [`recover`] found in a replicated partition's log.
pub struct Recovered {
    pub index: Index,
    pub segments: Vec<u64>,
    pub end: u64,
    /// An entry whose records were cut off by a crash: the log is cut at its header
    /// before appending.
    pub torn_entry: Option<Location>,
}

/// Reads the entries of the log in `dir` (after the segmented log's own recovery).
pub fn recover(dir: &Path, observer: &dyn crate::log::LogObserver) -> Result<Recovered, LogError> {
    let meta = Meta::load(dir)?;
    let mut index = Index {
        slots: BTreeMap::new(),
        last_purged: meta.purged,
    };
    let floor = meta.purged.map_or(0, |p| p.index + 1);
    let (segments, report) = crate::log::recover(dir, observer, |rec, loc| {
        if let Record::Entry(h) = rec {
            if h.index < floor {
                return;
            }
            // A later entry of the same index replaced an earlier one (a cut that a
            // crash left half done): the later wins, with everything after it gone.
            index.slots.split_off(&h.index);
            let (records_len, membership) = match &h.payload {
                EntryPayload::Records { len } => (*len, None),
                EntryPayload::Blank => (0, None),
                EntryPayload::Membership { configs, nodes } => {
                    (0, Some(Arc::new(membership_of(configs, nodes))))
                }
            };
            index.slots.insert(
                h.index,
                Slot {
                    log_id: log_id(h.term, h.node, h.index),
                    header: Some(loc),
                    pending: None,
                    records_len,
                    membership,
                },
            );
        }
    })?;
    // The last entry must be whole: its records end where the log's records do.
    let mut torn_entry = None;
    if let Some((&i, last)) = index.slots.last_key_value()
        && let (Some(h), Some(&active)) = (last.header, segments.last())
        && h.segment == active
        && h.offset + u64::from(h.len) + u64::from(last.records_len) > report.end
    {
        torn_entry = Some(h);
        index.slots.remove(&i);
    }
    Ok(Recovered {
        index,
        segments,
        end: report.end,
        torn_entry,
    })
}

/// The Raft log storage of one replicated partition.
pub struct LogStore {
    dir: PathBuf,
    writer: Arc<LogWriter>,
    index: Arc<Mutex<Index>>,
    meta: Meta,
}

impl LogStore {
    /// The store of copy `me`. A leader's vote read back after a restart is taken as
    /// a candidate's: see [`Meta::restarted`].
    pub fn new(
        dir: &Path,
        me: NodeId,
        writer: Arc<LogWriter>,
        index: Arc<Mutex<Index>>,
    ) -> Result<Self, LogError> {
        Ok(LogStore {
            dir: dir.to_path_buf(),
            writer,
            meta: Meta::load(dir)?.restarted(me),
            index,
        })
    }
}

/// Reads entries for replication and for the leader's replay.
#[derive(Clone)]
pub struct LogReader {
    index: Arc<Mutex<Index>>,
    reader: Arc<SegmentReader>,
}

impl LogReader {
    pub fn new(index: Arc<Mutex<Index>>, reader: Arc<SegmentReader>) -> Self {
        LogReader { index, reader }
    }

    /// The entries in `range` that are present, in order.
    pub fn entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<Entry>, LogError> {
        let slots: Vec<Slot> = self
            .index
            .lock()
            .unwrap()
            .slots
            .range(range)
            .map(|(_, s)| s.clone())
            .collect();
        slots.into_iter().map(|s| self.entry(&s)).collect()
    }

    fn entry(&self, slot: &Slot) -> Result<Entry, LogError> {
        if let Some(e) = &slot.pending {
            return Ok(e.clone());
        }
        let payload = if let Some(m) = &slot.membership {
            RaftPayload::Membership(Membership::clone(m))
        } else if let Some(at) = slot.records_at() {
            RaftPayload::Normal(self.reader.read_bytes(at)?)
        } else {
            RaftPayload::Blank
        };
        Ok(Entry {
            log_id: slot.log_id,
            payload,
        })
    }

    /// The records of the entries up to `last` (inclusive), each with its place in the
    /// log: what a new leader replays.
    pub fn records_upto(
        &self,
        last: u64,
        mut apply: impl FnMut(Record, Location),
    ) -> Result<(), LogError> {
        let slots: Vec<Slot> = self
            .index
            .lock()
            .unwrap()
            .slots
            .range(..=last)
            .map(|(_, s)| s.clone())
            .collect();
        for slot in slots {
            let Some(at) = slot.records_at() else {
                continue;
            };
            let data = self.reader.read_bytes(at)?;
            each_record(&data, at, &mut apply)?;
        }
        Ok(())
    }
}

/// Calls `apply` for every framed record in `data`, which lies at `at`.
pub fn each_record(
    data: &Bytes,
    at: Location,
    mut apply: impl FnMut(Record, Location),
) -> Result<(), LogError> {
    let mut pos = 0usize;
    while pos < data.len() {
        match read_frame(&data.slice(pos..)) {
            Frame::Record(rec, n) => {
                apply(
                    rec,
                    Location {
                        segment: at.segment,
                        offset: at.offset + pos as u64,
                        len: n as u32,
                    },
                );
                pos += n;
            }
            Frame::Incomplete | Frame::Corrupt(_) => {
                return Err(LogError::Damaged {
                    segment: at.segment,
                    offset: at.offset + pos as u64,
                    why: "damaged record in a replicated entry",
                });
            }
        }
    }
    Ok(())
}

fn read_error(e: LogError) -> StorageError {
    storage_error(ErrorSubject::Logs, ErrorVerb::Read, e)
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let reader = self.clone();
        let range = (range.start_bound().cloned(), range.end_bound().cloned());
        tokio::task::spawn_blocking(move || reader.entries(range))
            .await
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))?
            .map_err(read_error)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.get_log_reader().await.try_get_log_entries(range).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let index = self.index.lock().unwrap();
        let last_purged_log_id = index.last_purged;
        let last_log_id = index
            .slots
            .last_key_value()
            .map(|(_, s)| s.log_id)
            .or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogReader::new(self.index.clone(), self.writer.reader.clone())
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.meta.vote = Some(*vote);
        self.meta
            .save(&self.dir)
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.meta.vote)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut buf = BytesMut::new();
        // (index, log id, offset of the header in `buf`, header length)
        let mut placed = Vec::new();
        {
            let mut index = self.index.lock().unwrap();
            for e in entries {
                let start = buf.len();
                Record::Entry(header_of(&e)).encode(&mut buf);
                let header_len = buf.len() - start;
                let records_len = match &e.payload {
                    RaftPayload::Normal(records) => {
                        buf.extend_from_slice(records);
                        records.len() as u32
                    }
                    _ => 0,
                };
                let membership = match &e.payload {
                    RaftPayload::Membership(m) => Some(Arc::new(m.clone())),
                    _ => None,
                };
                placed.push((e.log_id, start as u64, header_len as u32));
                index.slots.insert(
                    e.log_id.index,
                    Slot {
                        log_id: e.log_id,
                        header: None,
                        pending: Some(e),
                        records_len,
                        membership,
                    },
                );
            }
        }
        let index = self.index.clone();
        self.writer.append_then(buf.freeze(), move |result| {
            let result = result.map(|base| {
                let mut index = index.lock().unwrap();
                for (id, start, len) in placed {
                    // Unless a cut replaced the entry meanwhile.
                    if let Some(slot) = index.slots.get_mut(&id.index)
                        && slot.log_id == id
                    {
                        slot.header = Some(Location {
                            segment: base.segment,
                            offset: base.offset + start,
                            len,
                        });
                        slot.pending = None;
                    }
                }
            });
            callback.log_io_completed(result.map_err(std::io::Error::other));
        });
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let write_err = |e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, e);
        // Everything queued is placed first (the writer answers appends in order).
        self.writer.flush().await.map_err(write_err)?;
        let cut = {
            let mut index = self.index.lock().unwrap();
            let gone = index.slots.split_off(&log_id.index);
            gone.values().next().and_then(|s| s.header)
        };
        if let Some(at) = cut {
            self.writer
                .truncate(at.segment, at.offset)
                .await
                .map_err(write_err)?;
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.meta.purged = Some(log_id);
        self.meta
            .save(&self.dir)
            .map_err(|e| storage_error(ErrorSubject::Store, ErrorVerb::Delete, e))?;
        let first_kept = {
            let mut index = self.index.lock().unwrap();
            index.last_purged = Some(log_id);
            let kept = index.slots.split_off(&(log_id.index + 1));
            index.slots = kept;
            index.slots.values().next().and_then(|s| s.header)
        };
        // Segments wholly below the first entry kept go; a segment that holds both
        // purged and kept entries stays until all of its entries are purged.
        let floor = first_kept.map_or(self.writer.active_segment(), |h| h.segment);
        self.writer.delete_below(floor);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    struct Quiet;
    impl crate::log::LogObserver for Quiet {
        fn fsync(&self, _: std::time::Duration) {}
        fn damage(&self, _: u64, _: u64, _: &str) {}
    }

    fn enq(seq: u64) -> Bytes {
        crate::log::tests::frame(&crate::log::tests::enq(seq))
    }

    fn entry(index: u64, payload: EntryPayload, records: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        Record::Entry(EntryHeader {
            index,
            term: 1,
            node: 0,
            payload,
        })
        .encode(&mut b);
        b.extend_from_slice(records);
        b.to_vec()
    }

    #[test]
    fn recovery_finds_every_entry_and_drops_one_a_crash_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let records = [enq(1), enq(2)].concat();
        let len = records.len() as u32;
        let mut log = Vec::new();
        log.extend(entry(1, EntryPayload::Records { len }, &records));
        log.extend(entry(2, EntryPayload::Blank, &[]));
        // Entry 3's records were being written when the process died.
        log.extend(entry(
            3,
            EntryPayload::Records { len },
            &records[..records.len() / 2],
        ));
        std::fs::File::create(dir.path().join(format!("{:020}.log", 0)))
            .unwrap()
            .write_all(&log)
            .unwrap();
        let found = recover(dir.path(), &Quiet).unwrap();
        assert_eq!(
            found.index.slots.keys().copied().collect::<Vec<_>>(),
            vec![1, 2]
        );
        let torn = found.torn_entry.expect("entry 3 is torn");
        assert_eq!(torn.segment, 0);
        // Entry 1's records are where the index says.
        let at = found.index.records_at(1).unwrap();
        assert_eq!(&log[at.offset as usize..][..at.len as usize], &records[..]);
        // Both entries lie in segment 0: only a floor above it covers them.
        assert_eq!(found.index.last_below(0), None);
        assert_eq!(found.index.last_below(1), Some(2));
    }

    #[test]
    fn a_copy_placed_by_a_move_has_an_id_of_its_own_and_keeps_it() {
        let found = |dir: &Path| recover(dir, &Quiet).unwrap();
        // Forming the group, or from before ids had incarnations: the ordinal.
        let formed = tempfile::tempdir().unwrap();
        let f = found(formed.path());
        assert_eq!(copy_id(formed.path(), 3, false, &f).unwrap(), 3);
        // Joining in an empty directory: broker 3, a new incarnation, kept.
        let joined = tempfile::tempdir().unwrap();
        let f = found(joined.path());
        let id = copy_id(joined.path(), 3, true, &f).unwrap();
        assert_eq!(super::super::ordinal(id), 3);
        assert_ne!(id, 3);
        let f = found(joined.path());
        assert_eq!(copy_id(joined.path(), 3, true, &f).unwrap(), id);
        // Another copy joining the same broker later is another node.
        let again = tempfile::tempdir().unwrap();
        let f = found(again.path());
        assert_ne!(copy_id(again.path(), 3, true, &f).unwrap(), id);
        // A copy that already holds a vote (older than ids) stays its ordinal.
        let old = tempfile::tempdir().unwrap();
        Meta {
            vote: Some(Vote::new(2, 1)),
            purged: None,
        }
        .save(old.path())
        .unwrap();
        let f = found(old.path());
        assert_eq!(copy_id(old.path(), 3, true, &f).unwrap(), 3);
        // An id file naming another broker is refused, not believed.
        std::fs::write(joined.path().join(COPY_ID_FILE), "4").unwrap();
        let f = found(joined.path());
        assert!(copy_id(joined.path(), 3, true, &f).is_err());
    }

    #[test]
    fn a_restarted_leader_comes_back_as_a_candidate_of_its_term() {
        let led = Meta {
            vote: Some(Vote::new_committed(7, 2)),
            purged: None,
        };
        assert_eq!(led.restarted(2).vote, Some(Vote::new(7, 2)));
        // Another copy's leadership, or a vote not yet granted, stays as it was.
        assert_eq!(led.restarted(1), led);
        let asked = Meta {
            vote: Some(Vote::new(7, 2)),
            purged: None,
        };
        assert_eq!(asked.restarted(2), asked);
    }

    #[test]
    fn meta_round_trips_and_damage_is_refused() {
        for meta in [
            Meta::default(),
            Meta {
                vote: Some(Vote::new(3, 1)),
                purged: None,
            },
            Meta {
                vote: Some(Vote::new_committed(7, 2)),
                purged: Some(log_id(6, 0, 1234)),
            },
        ] {
            let data = meta.encode();
            assert_eq!(Meta::decode(&data), Some(meta));
            for i in 0..data.len() {
                let mut bad = data.clone();
                bad[i] ^= 1;
                assert_eq!(Meta::decode(&bad), None, "flip at {i}");
            }
        }
    }
}
