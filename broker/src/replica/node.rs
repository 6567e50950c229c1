//! One copy of a replicated partition on this broker: its Raft node, the proposer that
//! turns the leader's records into entries, and the watch that says whether this
//! copy leads (and may serve) right now.

use bytes::{Bytes, BytesMut};
use openraft::error::ClientWriteError;
use openraft::{Config, ServerState, SnapshotPolicy};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, watch};

use super::machine::{Machine, Shared};
use super::network::{Network, Peers};
use super::store::{Index, LogReader, LogStore, copy_id, recover};
use super::{NodeId, Raft, ordinal};
use crate::error::BrokerError;
use crate::log::record::Record;
use crate::log::{Location, LogError, LogObserver, LogOptions, LogWriter};
use crate::partition::PartitionState;

/// Whether this copy serves the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Another copy leads (or none does yet): calls go there.
    Follower { leader: Option<NodeId> },
    /// This copy leads, in this term, and its state holds every committed entry.
    Leader { term: u64 },
}

/// What a copy reports of its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyState {
    /// Where this copy leads (with a recent majority): how many copies, itself among
    /// them, hold every entry it has applied. None on a copy that does not lead.
    pub in_sync: Option<u32>,
    /// The Raft term this copy is in.
    pub term: u64,
}

/// Records the leader wants in the log, and who waits for them.
struct Proposal {
    records: Bytes,
    done: Option<oneshot::Sender<Result<Location, BrokerError>>>,
}

pub struct Replica {
    pub raft: Raft,
    pub me: NodeId,
    peers: Arc<Peers>,
    queue: String,
    partition: u32,
    pub writer: Arc<LogWriter>,
    log: LogReader,
    index: Arc<Mutex<Index>>,
    shared: Arc<Shared>,
    proposals: mpsc::UnboundedSender<Proposal>,
    role: watch::Receiver<Role>,
}

/// How long a leader serves without hearing from a majority: twice the longest
/// election timeout, by when the others have elected another leader. Metrics, where
/// openraft reports it, are refreshed at every tick, so the age is current.
const QUORUM_LEASE_MS: u64 = 2_000;

/// How long the leader waits for a joining copy to catch up before it looks again
/// (the copy stays a learner meanwhile and keeps receiving the log, so nothing is
/// lost by asking again; a copy whose broker is down is simply waited for).
const CATCH_UP: std::time::Duration = std::time::Duration::from_secs(10);
/// The longest one round of a move (adding learners, their catching up, the
/// membership change) may take before it is given up and tried again from the
/// membership as it then is. A change whose joint configuration cannot commit (its
/// new copy's broker restarting at that moment) otherwise waited forever, and the
/// move with it: seen once in the e2e single-copy scaling scenario, where the
/// leader of a one-copy group logged "moving" and then nothing for minutes.
const MOVE_ROUND: std::time::Duration = std::time::Duration::from_secs(30);
/// The first pause after a failed move step; doubled up to [`MOVE_RETRY_MAX`].
const MOVE_RETRY: std::time::Duration = std::time::Duration::from_millis(500);
const MOVE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Raft timing for brokers on one network: heartbeats every 100 ms, an election after
/// 0.5–1 s without one, so a dead leader is replaced within about a second and a half.
fn config(queue: &str, partition: u32) -> Config {
    Config {
        cluster_name: format!("{queue}/{partition}"),
        heartbeat_interval: 100,
        election_timeout_min: 500,
        election_timeout_max: 1000,
        // Snapshots are taken at the floors the leader publishes, never by count.
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        max_payload_entries: 256,
        ..Default::default()
    }
}

fn not_leader(queue: &str, partition: u32, leader: Option<NodeId>) -> BrokerError {
    BrokerError::NotLeader {
        queue: queue.to_string(),
        partition,
        leader: leader.map(ordinal),
    }
}

impl Replica {
    /// Opens the copy of `partition` in `dir` on broker `ordinal`: reads its log and
    /// starts its Raft node. With `form` (broker ordinals: this copy is a member), it
    /// forms the group if it never was; without, it waits for the leader to add it (a
    /// copy placed on this broker by a move, with a node id of its own: see
    /// [`copy_id`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        dir: &Path,
        queue: &str,
        partition: u32,
        ordinal: u32,
        form: Option<&[u32]>,
        peers: Arc<Peers>,
        options: LogOptions,
        observer: Arc<dyn LogObserver>,
    ) -> Result<Arc<Replica>, BrokerError> {
        let found = {
            let dir = dir.to_path_buf();
            let observer = observer.clone();
            tokio::task::spawn_blocking(move || recover(&dir, observer.as_ref()))
                .await
                .map_err(|e| BrokerError::Internal(format!("reading the log: {e}")))??
        };
        let writer = Arc::new(LogWriter::open(
            dir,
            &found.segments,
            found.end,
            options,
            observer,
            format!("{queue}-{partition}"),
        )?);
        if let Some(torn) = found.torn_entry {
            tracing::warn!(
                queue,
                partition,
                segment = torn.segment,
                offset = torn.offset,
                "cutting an entry a crash left incomplete"
            );
            writer.truncate(torn.segment, torn.offset).await?;
        }
        let me = copy_id(dir, ordinal, form.is_none(), &found)?;
        let index = Arc::new(Mutex::new(found.index));
        let store = LogStore::new(dir, me, writer.clone(), index.clone())?;
        let (floor_tx, mut floor_rx) = watch::channel(0u64);
        let (machine, shared) = Machine::open(dir, index.clone(), floor_tx)?;
        let config = Arc::new(
            config(queue, partition)
                .validate()
                .map_err(|e| BrokerError::Internal(format!("raft config: {e}")))?,
        );
        let raft = Raft::new(
            me,
            config,
            Network::new(peers.clone(), queue, partition),
            store,
            machine,
        )
        .await
        .map_err(|e| BrokerError::Internal(format!("starting raft: {e}")))?;
        if let Some(members) = form
            && !raft
                .is_initialized()
                .await
                .map_err(|e| BrokerError::Internal(format!("raft: {e}")))?
        {
            // Every member forms the group with the same members: safe (openraft),
            // and no member has to come up first.
            let members: BTreeSet<NodeId> = members.iter().map(|&m| u64::from(m)).collect();
            if let Err(e) = raft.initialize(members).await {
                tracing::debug!(queue, partition, error = %e, "group already formed");
            }
        }
        let (role_tx, role_rx) = watch::channel(Role::Follower { leader: None });
        let (proposals, rx) = mpsc::unbounded_channel();
        let replica = Arc::new(Replica {
            raft: raft.clone(),
            me,
            peers,
            queue: queue.to_string(),
            partition,
            log: LogReader::new(index.clone(), writer.reader.clone()),
            writer,
            index,
            shared,
            proposals,
            role: role_rx,
        });
        tokio::spawn(propose(raft.clone(), rx, queue.to_string(), partition));
        tokio::spawn(follow_roles(raft.clone(), me, role_tx));
        // Snapshot at each new floor; openraft then purges the log below it.
        tokio::spawn(async move {
            while floor_rx.changed().await.is_ok() {
                if raft.trigger().snapshot().await.is_err() {
                    break;
                }
            }
        });
        Ok(replica)
    }

    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    /// The role, and its changes from now on.
    pub fn roles(&self) -> watch::Receiver<Role> {
        let mut rx = self.role.clone();
        rx.mark_unchanged();
        rx
    }

    /// Fails unless this copy leads and a majority answered it lately. A leader cut
    /// off from the others keeps its role until it hears of a newer term, which it
    /// cannot; meanwhile the others elect a leader, and a write sent here could only
    /// wait. Without a recent quorum it answers as a follower that knows no leader,
    /// so callers look elsewhere at once.
    pub fn check_leader(&self) -> Result<u64, BrokerError> {
        match self.role() {
            Role::Leader { term } if self.quorum_is_recent() => Ok(term),
            Role::Leader { .. } => Err(not_leader(&self.queue, self.partition, None)),
            Role::Follower { leader } => Err(not_leader(&self.queue, self.partition, leader)),
        }
    }

    pub fn state(&self) -> CopyState {
        let m = self.raft.metrics().borrow().clone();
        if self.check_leader().is_err() {
            return CopyState {
                in_sync: None,
                term: m.current_term,
            };
        }
        let applied = m.last_applied.map_or(0, |l| l.index);
        let in_sync = m.replication.as_ref().map_or(1, |copies| {
            copies
                .values()
                .filter(|matched| matched.is_some_and(|l| l.index >= applied))
                .count() as u32
        });
        CopyState {
            in_sync: Some(in_sync),
            term: m.current_term,
        }
    }

    /// On the leader: the group's voters, once a membership without a change in
    /// progress is committed (applied here). None elsewhere, or mid-change.
    pub fn members(&self) -> Option<Vec<u32>> {
        self.check_leader().ok()?;
        let m = self.raft.metrics().borrow().clone();
        let config = &m.membership_config;
        let applied = m.last_applied.map(|l| l.index);
        let committed = config.log_id().is_none_or(|l| Some(l.index) <= applied);
        let joint = config.membership().get_joint_config().len() > 1;
        (committed && !joint).then(|| {
            // Sorted by broker (ids of moved copies sort by incarnation first).
            let mut brokers: Vec<u32> = config.voter_ids().map(ordinal).collect();
            brokers.sort_unstable();
            brokers
        })
    }

    /// Moves the group onto `target` (broker ordinals): each broker new to it joins
    /// as a learner and catches up from the log (or the floor snapshot), then one
    /// joint-consensus change makes the target the voters, and copies left out stop
    /// being members. Runs on the leader, and ends when the group is there or this
    /// copy stops leading: the next leader starts it again. A leader moved off steps
    /// down once the change is committed.
    ///
    /// `known`: every broker the settings name for the partition (placed or a
    /// member). A group with a voter outside it has moved on settings newer than
    /// this broker's (it still runs an older pod during a rollout): it is left as it
    /// is, or two leaders on two versions would move the copies back and forth.
    pub async fn converge(self: Arc<Self>, target: Vec<u32>, known: Vec<u32>) {
        let target: BTreeSet<u32> = target.into_iter().collect();
        let known: BTreeSet<u32> = known.into_iter().collect();
        let mut backoff = MOVE_RETRY;
        loop {
            if self.check_leader().is_err() {
                return;
            }
            let (voters, learners, joint) = {
                let m = self.raft.metrics().borrow().membership_config.clone();
                let membership = m.membership();
                (
                    membership.voter_ids().collect::<BTreeSet<_>>(),
                    membership.learner_ids().collect::<BTreeSet<_>>(),
                    membership.get_joint_config().len() > 1,
                )
            };
            let on: BTreeSet<u32> = voters.iter().map(|&v| ordinal(v)).collect();
            let (queue, partition) = (&self.queue, self.partition);
            let stale = stale_learners(&voters, &learners, &target);
            if on == target && !joint && stale.is_empty() {
                return;
            }
            if !on.is_subset(&known) {
                tracing::info!(
                    queue,
                    partition,
                    brokers = ?on,
                    ?known,
                    "the group has members these settings do not name (newer settings are rolling out): leaving its copies where they are"
                );
                return;
            }
            tracing::info!(
                queue,
                partition,
                brokers = ?on,
                ?target,
                "moving the partition's copies"
            );
            let moved = async {
                if on != target || joint {
                    // Voters staying keep their ids; each broker new to the group
                    // says which copy it holds (a learner of an earlier round may
                    // be a copy since deleted there).
                    let mut next: BTreeSet<NodeId> = voters
                        .iter()
                        .copied()
                        .filter(|&v| target.contains(&ordinal(v)))
                        .collect();
                    let mut joining = Vec::new();
                    for &b in target.difference(&on) {
                        let id = self.peers.copy_id(b, queue, partition).await.map_err(|e| {
                            format!("asking broker {b} for its copy: {}", e.message())
                        })?;
                        joining.push(id);
                        next.insert(id);
                    }
                    for &n in &joining {
                        self.raft
                            .add_learner(n, openraft::EmptyNode {}, false)
                            .await
                            .map_err(|e| format!("adding copy {n}: {e}"))?;
                    }
                    // Swapped in before it holds the log, a copy the joint majority
                    // needs (with one copy, the new one always) would hold up every
                    // write until it caught up, or forever if its broker is down.
                    // openraft's blocking add_learner returned at once for a learner
                    // that was not answering, so the leader looks itself.
                    let added = self.raft.metrics().borrow().last_log_index.unwrap_or(0);
                    self.raft
                        .wait(Some(CATCH_UP))
                        .metrics(
                            |m| {
                                joining.iter().all(|n| {
                                    m.replication
                                        .as_ref()
                                        .and_then(|r| r.get(n).copied().flatten())
                                        .is_some_and(|held| held.index >= added)
                                })
                            },
                            "the joining copies catch up",
                        )
                        .await
                        .map_err(|_| {
                            format!("copies {joining:?} did not catch up within {CATCH_UP:?}")
                        })?;
                    self.raft
                        .change_membership(next, false)
                        .await
                        .map_err(|e| format!("changing the members: {e}"))?;
                }
                let stale = {
                    let m = self.raft.metrics().borrow().membership_config.clone();
                    let membership = m.membership();
                    stale_learners(
                        &membership.voter_ids().collect(),
                        &membership.learner_ids().collect(),
                        &target,
                    )
                };
                if !stale.is_empty() {
                    self.raft
                        .change_membership(openraft::ChangeMembers::RemoveNodes(stale), false)
                        .await
                        .map_err(|e| format!("removing learners: {e}"))?;
                }
                Ok::<_, String>(())
            };
            let moved = tokio::time::timeout(MOVE_ROUND, moved)
                .await
                .unwrap_or_else(|_| Err(format!("a round took over {MOVE_ROUND:?}")));
            match moved {
                Ok(()) => {
                    tracing::info!(queue, partition, ?target, "the partition's copies moved");
                    backoff = MOVE_RETRY;
                }
                Err(e) => {
                    tracing::warn!(queue, partition, error = %e, "moving the partition's copies failed; trying again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MOVE_RETRY_MAX);
                }
            }
        }
    }

    /// Whether a majority acknowledged this leader within [`QUORUM_LEASE_MS`].
    fn quorum_is_recent(&self) -> bool {
        self.raft
            .metrics()
            .borrow()
            .millis_since_quorum_ack
            .is_some_and(|ms| ms < QUORUM_LEASE_MS)
    }

    /// Queues records for the log; nobody waits for them.
    pub fn append(&self, records: Bytes) {
        let _ = self.proposals.send(Proposal {
            records,
            done: None,
        });
    }

    /// Queues records for the log; the answer says where they landed here once a
    /// majority of the copies holds them.
    pub fn append_waiting(
        &self,
        records: Bytes,
    ) -> oneshot::Receiver<Result<Location, BrokerError>> {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(p)) = self.proposals.send(Proposal {
            records,
            done: Some(tx),
        }) && let Some(done) = p.done
        {
            let _ = done.send(Err(BrokerError::Log(LogError::Stopped)));
        }
        rx
    }

    /// The state a new leader serves from: every record of the entries up to `last`
    /// replayed over the latest snapshot, as at start-up.
    pub fn rebuild(
        &self,
        mut state: PartitionState,
        last: u64,
        now: u64,
    ) -> Result<PartitionState, LogError> {
        if let Some((_, snap)) = &*self.shared.snapshot.lock().unwrap() {
            state.replay(
                now,
                Record::Floor {
                    index: 0,
                    next_seq: snap.next_seq,
                },
                Location {
                    segment: 0,
                    offset: 0,
                    len: 0,
                },
            );
        }
        self.log
            .records_upto(last, |rec, loc| state.replay(now, rec, loc))?;
        state.finish_replay();
        Ok(state)
    }

    /// The index of the last entry whose records all lie in segments below `segment`:
    /// what a floor at that segment lets every copy drop.
    pub fn last_entry_below(&self, segment: u64) -> Option<u64> {
        self.index.lock().unwrap().last_below(segment)
    }

    pub async fn close(&self) {
        let _ = self.raft.shutdown().await;
        if let Err(e) = self.writer.flush().await {
            tracing::warn!(queue = %self.queue, partition = self.partition, error = %e, "flush at shutdown failed");
        }
        self.writer.close();
    }
}

/// Learners to remove: those of an earlier target that changed meanwhile, and
/// earlier copies of a broker whose copy now is a voter.
fn stale_learners(
    voters: &BTreeSet<NodeId>,
    learners: &BTreeSet<NodeId>,
    target: &BTreeSet<u32>,
) -> BTreeSet<NodeId> {
    learners
        .iter()
        .copied()
        .filter(|&l| {
            !target.contains(&ordinal(l)) || voters.iter().any(|&v| ordinal(v) == ordinal(l))
        })
        .collect()
}

/// How long records nobody waits for (leases of deliveries, floors) wait for a write
/// somebody waits for, to ride in its entry. Each entry costs the group a round: an
/// AppendEntries and an fsync on every copy, then another AppendEntries to say it is
/// committed. A delivery is followed by its ack within this time when consumers keep
/// up, so the lease rides with the ack. (Losing a lease record to a failover only
/// means the new leader delivers the message again: at least once, as before.)
const RIDE_ALONG: std::time::Duration = std::time::Duration::from_millis(20);

/// Turns queued records into log entries, in the order they were queued: whatever
/// waits when an entry is proposed rides in it.
async fn propose(
    raft: Raft,
    mut rx: mpsc::UnboundedReceiver<Proposal>,
    queue: String,
    partition: u32,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 1024).await > 0 {
        let deadline = tokio::time::Instant::now() + RIDE_ALONG;
        while batch.iter().all(|p| p.done.is_none()) {
            match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, 1024)).await {
                Ok(n) if n > 0 => {}
                // The time is up, or nothing more will come.
                _ => break,
            }
        }
        let mut records = BytesMut::new();
        let mut waiting = Vec::new();
        for p in batch.drain(..) {
            let offset = records.len() as u64;
            let len = p.records.len() as u32;
            records.extend_from_slice(&p.records);
            if let Some(done) = p.done {
                waiting.push((done, offset, len));
            }
        }
        let answer = match raft.client_write_ff(records.freeze()).await {
            Ok(rx) => rx,
            Err(e) => {
                for (done, ..) in waiting {
                    let _ = done.send(Err(BrokerError::Unavailable(format!("raft stopped: {e}"))));
                }
                continue;
            }
        };
        let (queue, partition) = (queue.clone(), partition);
        tokio::spawn(async move {
            let result = match answer.await {
                Ok(Ok(resp)) => resp.data.records_at.ok_or_else(|| {
                    BrokerError::Internal("a written entry has no place in the log".into())
                }),
                Ok(Err(ClientWriteError::ForwardToLeader(f))) => {
                    Err(not_leader(&queue, partition, f.leader_id))
                }
                Ok(Err(e)) => Err(BrokerError::Unavailable(format!(
                    "partition {partition} of queue {queue}: {e}"
                ))),
                Err(_) => Err(not_leader(&queue, partition, None)),
            };
            for (done, offset, len) in waiting {
                let _ = done.send(
                    result
                        .as_ref()
                        .map(|at| Location {
                            segment: at.segment,
                            offset: at.offset + offset,
                            len,
                        })
                        .map_err(BrokerError::clone_status),
                );
            }
        });
    }
}

/// Keeps the role up to date: leader once this copy leads *and* has applied an entry
/// of its own term (then every committed entry is in its log and applied).
async fn follow_roles(raft: Raft, me: NodeId, role: watch::Sender<Role>) {
    let mut metrics = raft.metrics();
    loop {
        let next = {
            let m = metrics.borrow_and_update();
            let leading = m.state == ServerState::Leader
                && m.current_leader == Some(me)
                && m.last_applied
                    .is_some_and(|a| a.leader_id.term == m.current_term);
            if leading {
                Role::Leader {
                    term: m.current_term,
                }
            } else {
                Role::Follower {
                    leader: m.current_leader.filter(|&l| l != me),
                }
            }
        };
        role.send_if_modified(|r| {
            let changed = *r != next;
            *r = next;
            changed
        });
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
