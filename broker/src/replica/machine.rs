//! The state machine of a replicated partition, on every copy: Raft's bookkeeping
//! (what was applied, the membership) and the floor the leader publishes, from which
//! snapshots are made. The queue semantics are not here: only the leader keeps them,
//! rebuilt from the log when it takes over (see the module above).

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{EntryPayload as RaftPayload, ErrorSubject, ErrorVerb};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

use super::store::{Index, each_record, log_id, membership_of, write_atomically};
use super::{
    Applied, Entry, FloorSnapshot, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
    storage_error,
};
use crate::log::LogError;
use crate::log::record::Record;

const SNAPSHOT_FILE: &str = "raft.snapshot";

/// The floor the leader last published: entries up to `index` may go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Floor {
    pub index: u64,
    pub next_seq: u64,
}

fn encode_snapshot(meta: &SnapshotMeta, data: &FloorSnapshot) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |v: u64| out.extend_from_slice(&v.to_le_bytes());
    let id = |l: &Option<LogId>| {
        l.map_or((0, 0, 0, 0), |l| {
            (1, l.leader_id.term, l.leader_id.node_id, l.index)
        })
    };
    for l in [&meta.last_log_id, meta.last_membership.log_id()] {
        let (some, t, n, i) = id(l);
        put(some);
        put(t);
        put(n);
        put(i);
    }
    let configs = meta.last_membership.membership().get_joint_config();
    put(configs.len() as u64);
    for c in configs {
        put(c.len() as u64);
        for n in c {
            put(*n);
        }
    }
    let nodes: Vec<u64> = meta
        .last_membership
        .membership()
        .nodes()
        .map(|(n, _)| *n)
        .collect();
    put(nodes.len() as u64);
    for n in nodes {
        put(n);
    }
    put(data.next_seq);
    put(meta.snapshot_id.len() as u64);
    out.extend_from_slice(meta.snapshot_id.as_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode_snapshot(data: &[u8]) -> Option<(SnapshotMeta, FloorSnapshot)> {
    let (data, crc) = data.split_at_checked(data.len().checked_sub(4)?)?;
    if crc32fast::hash(data) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let word = |i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            data.get(i * 8..i * 8 + 8)?.try_into().ok()?,
        ))
    };
    let mut i = 0;
    let mut next = || {
        let v = word(i);
        i += 1;
        v
    };
    let mut ids = [None, None];
    for slot in &mut ids {
        let (some, t, n, idx) = (next()?, next()?, next()?, next()?);
        *slot = (some == 1).then(|| log_id(t, n, idx));
    }
    let n_configs = next()? as usize;
    if n_configs > 16 {
        return None;
    }
    let mut configs = Vec::new();
    for _ in 0..n_configs {
        let n = next()? as usize;
        if n > 1024 {
            return None;
        }
        configs.push((0..n).map(|_| next()).collect::<Option<Vec<u64>>>()?);
    }
    let n_nodes = next()? as usize;
    if n_nodes > 1024 {
        return None;
    }
    let nodes = (0..n_nodes).map(|_| next()).collect::<Option<Vec<u64>>>()?;
    let next_seq = next()?;
    let id_len = next()? as usize;
    let id = data.get(i * 8..)?;
    if id.len() != id_len {
        return None;
    }
    let snapshot_id = String::from_utf8(id.to_vec()).ok()?;
    Some((
        SnapshotMeta {
            last_log_id: ids[0],
            last_membership: StoredMembership::new(ids[1], membership_of(&configs, &nodes)),
            snapshot_id,
        },
        FloorSnapshot { next_seq },
    ))
}

/// What the partition above reads of the machine.
#[derive(Debug, Default)]
pub struct Shared {
    /// The latest snapshot's floor: a new leader's sequence numbers start above it.
    pub snapshot: Mutex<Option<(SnapshotMeta, FloorSnapshot)>>,
}

pub struct Machine {
    dir: PathBuf,
    index: Arc<Mutex<Index>>,
    shared: Arc<Shared>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    floor: Option<Floor>,
    /// Wakes the partition's task that asks Raft for a snapshot at a new floor.
    floor_moved: watch::Sender<u64>,
}

impl Machine {
    pub fn open(
        dir: &Path,
        index: Arc<Mutex<Index>>,
        floor_moved: watch::Sender<u64>,
    ) -> Result<(Self, Arc<Shared>), LogError> {
        let path = dir.join(SNAPSHOT_FILE);
        let snapshot = match std::fs::read(&path) {
            Ok(data) => Some(decode_snapshot(&data).ok_or(LogError::Damaged {
                segment: 0,
                offset: 0,
                why: "raft.snapshot is damaged",
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(LogError::Io {
                    op: "reading",
                    path,
                    source: e,
                });
            }
        };
        let (last_applied, membership) = match &snapshot {
            Some((meta, _)) => (meta.last_log_id, meta.last_membership.clone()),
            None => (None, StoredMembership::default()),
        };
        let shared = Arc::new(Shared {
            snapshot: Mutex::new(snapshot),
        });
        Ok((
            Machine {
                dir: dir.to_path_buf(),
                index,
                shared: shared.clone(),
                last_applied,
                membership,
                floor: None,
                floor_moved,
            },
            shared,
        ))
    }
}

/// Writes the snapshot file and makes it the current snapshot.
fn keep(
    dir: &Path,
    shared: &Shared,
    meta: &SnapshotMeta,
    data: FloorSnapshot,
) -> std::io::Result<()> {
    write_atomically(dir, SNAPSHOT_FILE, &encode_snapshot(meta, &data))?;
    *shared.snapshot.lock().unwrap() = Some((meta.clone(), data));
    Ok(())
}

fn snapshot_write_error(meta: &SnapshotMeta, e: std::io::Error) -> StorageError {
    storage_error(
        ErrorSubject::Snapshot(Some(meta.signature())),
        ErrorVerb::Write,
        e,
    )
}

/// Builds the snapshot at the latest floor.
pub struct Builder {
    dir: PathBuf,
    shared: Arc<Shared>,
    at: Option<(LogId, Floor)>,
    membership: StoredMembership,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let current = self.shared.snapshot.lock().unwrap().clone();
        let (meta, data) = match (self.at, current) {
            // Nothing new since the last one: build it again as it was.
            (None, Some(cur)) => cur,
            (Some((id, _)), Some(cur)) if cur.0.last_log_id >= Some(id) => cur,
            (Some((id, floor)), _) => (
                SnapshotMeta {
                    last_log_id: Some(id),
                    last_membership: self.membership.clone(),
                    snapshot_id: format!(
                        "{}-{}-{}",
                        id.leader_id.term, id.leader_id.node_id, id.index
                    ),
                },
                FloorSnapshot {
                    next_seq: floor.next_seq,
                },
            ),
            (None, None) => (
                SnapshotMeta {
                    last_log_id: None,
                    last_membership: self.membership.clone(),
                    snapshot_id: "empty".into(),
                },
                FloorSnapshot::default(),
            ),
        };
        keep(&self.dir, &self.shared, &meta, data).map_err(|e| snapshot_write_error(&meta, e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for Machine {
    type SnapshotBuilder = Builder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let mut moved = None;
        for e in entries {
            self.last_applied = Some(e.log_id);
            let records_at = self.index.lock().unwrap().records_at(e.log_id.index);
            match &e.payload {
                RaftPayload::Blank => {}
                RaftPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(e.log_id), m.clone());
                }
                RaftPayload::Normal(records) => {
                    let at = records_at.unwrap_or(crate::log::Location {
                        segment: 0,
                        offset: 0,
                        len: 0,
                    });
                    each_record(records, at, |rec, _| {
                        if let Record::Floor { index, next_seq } = rec
                            && self.floor.is_none_or(|f| f.index < index)
                        {
                            self.floor = Some(Floor { index, next_seq });
                            moved = Some(index);
                        }
                    })
                    .map_err(|err| {
                        storage_error(ErrorSubject::Apply(e.log_id), ErrorVerb::Read, err)
                    })?;
                }
            }
            out.push(Applied { records_at });
        }
        if let Some(index) = moved {
            self.floor_moved.send_replace(index);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Builder {
        let at = self.floor.and_then(|f| {
            let id = self.index.lock().unwrap().log_id(f.index)?;
            Some((id, f))
        });
        Builder {
            dir: self.dir.clone(),
            shared: self.shared.clone(),
            at,
            membership: self.membership.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<FloorSnapshot>, StorageError> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<FloorSnapshot>,
    ) -> Result<(), StorageError> {
        keep(&self.dir, &self.shared, meta, *snapshot)
            .map_err(|e| snapshot_write_error(meta, e))?;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self
            .shared
            .snapshot
            .lock()
            .unwrap()
            .clone()
            .map(|(meta, data)| Snapshot {
                meta,
                snapshot: Box::new(data),
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_files_round_trip_and_damage_is_refused() {
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(4, 2, 99)),
            last_membership: StoredMembership::new(
                Some(log_id(1, 0, 1)),
                membership_of(&[vec![0, 1, 2]], &[0, 1, 2]),
            ),
            snapshot_id: "4-2-99".into(),
        };
        let data = FloorSnapshot { next_seq: 12345 };
        let bytes = encode_snapshot(&meta, &data);
        let (m, d) = decode_snapshot(&bytes).unwrap();
        assert_eq!((m, d), (meta, data));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(decode_snapshot(&bad).is_none(), "flip at {i}");
        }
    }
}
