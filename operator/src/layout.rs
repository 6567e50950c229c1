//! Which changes of a Queue keep every message reachable, and how.
//!
//! A broker opens the partitions whose copies it holds, from its own volume. Every
//! partition of a Queue is a Raft group (with one copy or more), so a change of
//! `replicas` moves copies between brokers through their groups: the plan records
//! the move, and [`crate::reconcile::moves`] follows it to the end. What cannot be
//! carried out is refused: dropping a partition, shrinking the volumes or changing
//! their class (acknowledged messages would sit on a volume nobody reads, or the
//! StatefulSet, whose claim templates are immutable, would wedge), changing the copy
//! count, and moving the plain single-copy logs of a Queue made before partitions
//! were Raft groups (`status.layout.raft` false: partition `p` on broker
//! `p % brokers`). Volumes may grow: the reconciler expands the claims and makes the
//! StatefulSet again around the running pods ([`crate::reconcile::volumes`]), where
//! their StorageClass allows it. The admission webhook refuses with these messages
//! ([`check_update`]); the reconciler holds the same line from the layout recorded in
//! `status.layout` ([`plan`]), so the guard stands without the webhook and without
//! the StatefulSet.

use crate::crd::{QueueSpec, StorageSpec, default_replication, quantity_bytes};
use crate::reconcile::conditions::Reason;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_config::placement;

/// What the brokers' volumes hold: partition `p` lives on the brokers of
/// `replica_set(p, brokers, replication)`. `partitions` is a high-water mark: a
/// partition once rolled out keeps its messages until they can be drained.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Layout {
    /// Partitions rolled out so far.
    pub partitions: i32,
    /// Brokers the partitions are spread over.
    pub brokers: i32,
    /// Copies of each partition (recorded before the field existed: 1).
    #[serde(default = "one")]
    pub replication: i32,
    /// Every partition is a Raft group, also with one copy, so its copies can move
    /// between brokers. Queues made before the field existed keep single copies in
    /// plain logs (false) and cannot move them.
    #[serde(default)]
    pub raft: bool,
    /// The brokers' volume claim template.
    pub storage: StorageSpec,
    /// Replicated, once copies moved: the brokers holding each partition's copies,
    /// as last seen committed. Absent: `replica_set(p, brokers, replication)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Vec<Vec<u32>>>,
    /// A move of the copies onto this many brokers, under way: the StatefulSet runs
    /// the larger of the two counts until every partition's group has moved.
    /// Written as null when none, so that the status's merge patch removes it.
    #[serde(default)]
    pub moving_to: Option<i32>,
}

impl Layout {
    /// The layout a spec asks for.
    pub fn of(spec: &QueueSpec) -> Self {
        Self {
            partitions: spec.partitions,
            brokers: spec.replicas,
            replication: spec
                .replication
                .unwrap_or_else(|| default_replication(spec.replicas)),
            raft: true,
            storage: spec.storage.clone(),
            placement: None,
            moving_to: None,
        }
    }

    /// Whether copies can move between brokers: the partitions are Raft groups.
    pub fn movable(&self) -> bool {
        self.raft || self.replication > 1
    }

    /// The brokers holding each partition's copies (sorted), for the partitions
    /// rolled out.
    pub fn members(&self) -> Vec<Vec<u32>> {
        self.placement.clone().unwrap_or_else(|| {
            (0..self.partitions)
                .map(|p| {
                    let mut c = self.copies(p, self.brokers);
                    c.sort_unstable();
                    c
                })
                .collect()
        })
    }

    fn copies(&self, p: i32, brokers: i32) -> Vec<u32> {
        sluice_config::replica_set(p as u32, brokers.max(1) as u32, self.replication as u32)
    }

    /// Partitions that hold messages whose brokers differ with `brokers` brokers.
    fn moved_by(&self, brokers: i32) -> Vec<i32> {
        (0..self.partitions)
            .filter(|&p| self.copies(p, self.brokers) != self.copies(p, brokers))
            .collect()
    }
}

fn one() -> i32 {
    1
}

/// A change refused because it would strand messages or wedge the Queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "spec.partitions cannot go down from {from} to {to}: partitions {to}..{last} hold messages that no broker would read any more (as in Kafka, partitions only grow); keep partitions at {from} or more",
        last = from - 1
    )]
    PartitionsDecrease { from: i32, to: i32 },
    #[error(
        "spec.replicas cannot change from {from} to {to}: this Queue was made before partitions could move (its partitions are plain logs, status.layout.raft is false; partition p lives on broker p % replicas), so partitions {moved} would go to brokers whose volumes do not hold their messages; keep replicas at {from}, or create a new Queue with the replicas you want and move the traffic to it",
        moved = list(.moved)
    )]
    MovesPartitions { from: i32, to: i32, moved: Vec<i32> },
    #[error(
        "spec.replicas cannot go down to {to}: each partition has {replication} copies, each on its own broker; keep replicas at {replication} or more"
    )]
    FewerBrokersThanCopies { to: i32, replication: i32 },
    #[error(
        "spec.replication cannot change from {from} to {to} yet: the brokers' volumes hold {from} copies of each partition and copies cannot be added or removed while the partitions hold messages; keep replication at {from}, or create a new Queue with the replication you want and move the traffic to it"
    )]
    Replication { from: i32, to: i32 },
    #[error(
        "spec.storage.storageClassName cannot change from {from} to {to}: the brokers' volumes hold the messages and cannot move to another class; keep {from}, or create a new Queue with the storage you want and move the traffic to it"
    )]
    StorageClass { from: String, to: String },
    #[error(
        "spec.storage.size cannot go down from {from} to {to}: Kubernetes cannot shrink a volume claim; keep {from} or more"
    )]
    StorageShrink { from: String, to: String },
    #[error(
        "spec.storage.size cannot grow from {from} to {to}: {why}; keep {from}, or create a new Queue with the storage you want and move the traffic to it"
    )]
    NotExpandable {
        from: String,
        to: String,
        /// Which StorageClass (or its absence) forbids it.
        why: String,
    },
}

impl Refusal {
    /// The reason of the `Degraded` condition (and the Event) that reports it.
    pub fn reason(&self) -> Reason {
        match self {
            Refusal::PartitionsDecrease { .. } => Reason::PartitionsDecreaseBlocked,
            Refusal::MovesPartitions { from, to, .. } if to < from => Reason::ScaleDownBlocked,
            Refusal::FewerBrokersThanCopies { .. } => Reason::ScaleDownBlocked,
            Refusal::MovesPartitions { .. } => Reason::ScaleUpBlocked,
            Refusal::StorageClass { .. }
            | Refusal::StorageShrink { .. }
            | Refusal::NotExpandable { .. } => Reason::StorageChangeBlocked,
            Refusal::Replication { .. } => Reason::ReplicationChangeBlocked,
        }
    }
}

/// Every refusal in one message, as the webhook and the condition say it.
pub fn message(refusals: &[Refusal]) -> String {
    refusals
        .iter()
        .map(Refusal::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Partitions as a message names them: the first eight, then how many more.
pub fn list(ps: &[i32]) -> String {
    const SHOWN: usize = 8;
    let mut s = ps
        .iter()
        .take(SHOWN)
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if ps.len() > SHOWN {
        s.push_str(&format!(" and {} more", ps.len() - SHOWN));
    }
    s
}

/// What the reconciler carries out.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The spec with every refused change held back.
    pub spec: QueueSpec,
    /// What the volumes hold once it is applied: the next `status.layout`.
    pub layout: Layout,
    /// What was held back, and why.
    pub refusals: Vec<Refusal>,
    /// The volumes grow to a larger size: their claims are expanded before the
    /// StatefulSet takes the new template.
    pub grows: Option<Growth>,
    /// Replicated: where the copies go and who holds them now, for the brokers'
    /// settings. None while the formula places every copy.
    pub placed: Option<Placed>,
    /// Copies moving onto other brokers, until the brokers report them moved.
    pub moving: Option<Move>,
    /// A broker count asked for while copies move onto another: carried out by the
    /// next move, once this one is done.
    pub then: Option<i32>,
}

/// A replicated Queue's placement, as the brokers' settings carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// Where each partition's copies should be.
    pub placement: Vec<Vec<u32>>,
    /// Who holds them now (they keep their copies until the move is seen done).
    pub members: Vec<Vec<u32>>,
}

/// Copies moving onto `brokers` brokers: done when every partition's group has
/// `target` as its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub brokers: i32,
    pub target: Vec<Vec<u32>>,
}

/// Volumes asked to grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Growth {
    pub from: String,
    pub to: String,
}

impl Plan {
    /// Holds the volumes at their size after all (the reconciler found their
    /// StorageClass cannot expand them).
    pub fn hold_size(&mut self, why: String) {
        if let Some(g) = self.grows.take() {
            self.refusals.push(Refusal::NotExpandable {
                from: g.from.clone(),
                to: g.to,
                why,
            });
            self.spec.storage.size = g.from.clone();
            self.layout.storage.size = g.from;
        }
    }

    /// The brokers report every partition moved: the new placement is what the
    /// volumes hold, the StatefulSet runs the brokers asked for, and copies left
    /// behind may go.
    pub fn finish_move(&mut self) {
        if let Some(m) = self.moving.take() {
            self.spec.replicas = m.brokers;
            self.layout.brokers = m.brokers;
            self.layout.moving_to = None;
            self.layout.placement = Some(m.target.clone());
            self.placed = Some(Placed {
                placement: m.target.clone(),
                members: m.target,
            });
        }
    }
}

/// Moves from the layout the volumes hold (none for a new Queue) towards `wanted`:
/// partitions may grow (new partitions get owners, old ones keep theirs); a replica
/// change may not give a partition with messages another owner; the volumes may grow
/// but keep their class.
pub fn plan(wanted: &QueueSpec, held: Option<&Layout>) -> Plan {
    let mut spec = wanted.clone();
    let mut refusals = Vec::new();
    let mut grows = None;
    let mut then = None;
    // Unset: what the volumes hold, or for a new Queue the default for its size.
    let replication = wanted.replication.unwrap_or_else(|| {
        held.map_or_else(|| default_replication(wanted.replicas), |h| h.replication)
    });
    spec.replication = Some(replication);
    if let Some(held) = held {
        if replication != held.replication {
            refusals.push(Refusal::Replication {
                from: held.replication,
                to: replication,
            });
            spec.replication = Some(held.replication);
        }
        if wanted.partitions < held.partitions {
            refusals.push(Refusal::PartitionsDecrease {
                from: held.partitions,
                to: wanted.partitions,
            });
            spec.partitions = held.partitions;
        }
        let movable = held.movable();
        if movable && wanted.replicas < held.replication {
            refusals.push(Refusal::FewerBrokersThanCopies {
                to: wanted.replicas,
                replication: held.replication,
            });
            spec.replicas = held.moving_to.unwrap_or(held.brokers);
        } else if let Some(to) = held.moving_to
            && wanted.replicas != to
        {
            // The move under way goes on to its end and the next one starts from
            // there: re-targeted midway, the settings (which name the members last
            // seen committed) could leave off both lists a copy that is a member.
            then = Some(wanted.replicas);
            spec.replicas = to;
        }
        if wanted.replicas != held.brokers && !movable {
            let moved = held.moved_by(wanted.replicas);
            if !moved.is_empty() {
                refusals.push(Refusal::MovesPartitions {
                    from: held.brokers,
                    to: wanted.replicas,
                    moved,
                });
                spec.replicas = held.brokers;
            }
        }
        if held.storage.storage_class_name != wanted.storage.storage_class_name {
            let show = |c: &Option<String>| {
                c.clone()
                    .unwrap_or_else(|| "the cluster default class".into())
            };
            refusals.push(Refusal::StorageClass {
                from: show(&held.storage.storage_class_name),
                to: show(&wanted.storage.storage_class_name),
            });
            spec.storage.storage_class_name = held.storage.storage_class_name.clone();
        }
        let (from, to) = (&held.storage.size, &wanted.storage.size);
        match (quantity_bytes(from), quantity_bytes(to)) {
            _ if from == to => {}
            (Some(f), Some(t)) if t == f => spec.storage.size = from.clone(),
            (Some(f), Some(t)) if t > f => {
                grows = Some(Growth {
                    from: from.clone(),
                    to: to.clone(),
                })
            }
            _ => {
                refusals.push(Refusal::StorageShrink {
                    from: from.clone(),
                    to: to.clone(),
                });
                spec.storage.size = from.clone();
            }
        }
    }
    let mut layout = Layout::of(&spec);
    // Plain logs stay plain: their copies would have to be rewritten as Raft entries.
    layout.raft = held.is_none_or(|h| h.raft);
    let (mut placed, mut moving) = (None, None);
    if let Some(held) = held.filter(|h| h.movable()) {
        let members = held.members();
        let to = held.moving_to.unwrap_or(spec.replicas);
        let partitions = spec.partitions as u32;
        let replication = held.replication as u32;
        if to != held.brokers {
            // Copies move onto `to` brokers; the StatefulSet runs both the old and
            // the new brokers until they have.
            let target = placement::rebalance(&members, partitions, to as u32, replication);
            let mut now = members.clone();
            // New partitions form where they are placed.
            now.extend_from_slice(&target[now.len()..]);
            spec.replicas = held.brokers.max(to);
            layout.brokers = held.brokers;
            layout.placement = Some(members);
            layout.moving_to = Some(to);
            placed = Some(Placed {
                placement: target.clone(),
                members: now,
            });
            moving = Some(Move {
                brokers: to,
                target,
            });
        } else if held.placement.is_some() {
            // Moved before: new partitions are placed among the same brokers.
            let all = placement::rebalance(&members, partitions, to as u32, replication);
            let mut kept = members;
            kept.extend_from_slice(&all[kept.len()..]);
            layout.placement = Some(kept.clone());
            placed = Some(Placed {
                placement: kept.clone(),
                members: kept,
            });
        }
    }
    Plan {
        layout,
        spec,
        refusals,
        grows,
        placed,
        moving,
        then,
    }
}

/// What the admission webhook refuses in an update from `old` (whose volumes hold
/// `held` when the status says so; else what `old` asked for) to `new`. An update
/// that leaves replicas, replication, partitions and storage as they were is never
/// refused, so metadata (finalizers, labels) and the other settings can always change.
pub fn check_update(old: &QueueSpec, held: Option<&Layout>, new: &QueueSpec) -> Vec<Refusal> {
    if Layout::of(old) == Layout::of(new) && old.replication == new.replication {
        return Vec::new();
    }
    let held = held.cloned().unwrap_or_else(|| Layout::of(old));
    plan(new, Some(&held)).refusals
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> QueueSpec {
        serde_json::from_value(v).unwrap()
    }

    /// What a Queue made before Raft groups holds: one copy, in plain logs.
    fn held(partitions: i32, brokers: i32) -> Layout {
        Layout {
            partitions,
            brokers,
            replication: 1,
            raft: false,
            storage: StorageSpec::default(),
            placement: None,
            moving_to: None,
        }
    }

    #[test]
    fn a_new_queue_is_carried_out_as_asked() {
        let s = spec(json!({"replicas": 2, "partitions": 6}));
        let p = plan(&s, None);
        let carried = QueueSpec {
            replication: Some(1),
            ..s.clone()
        };
        assert_eq!((p.spec.clone(), p.refusals.clone()), (carried, vec![]));
        assert_eq!(
            p.layout,
            Layout {
                raft: true,
                ..held(6, 2)
            }
        );
        // Its partitions are Raft groups from then on, whatever a later plan says.
        assert!(plan(&s, Some(&p.layout)).layout.raft);
        assert!(!plan(&s, Some(&held(6, 2))).layout.raft);
    }

    #[test]
    fn single_copies_move_like_replicated_ones() {
        // The path: 1 -> 3 -> 5 -> 2 -> 1 brokers, one copy of each partition.
        let mut layout = Layout {
            raft: true,
            ..held(8, 1)
        };
        for to in [3, 5, 2, 1] {
            let s = spec(json!({"replicas": to, "partitions": 8}));
            let old = spec(json!({"replicas": layout.brokers, "partitions": 8}));
            assert!(check_update(&old, Some(&layout), &s).is_empty());
            let mut p = plan(&s, Some(&layout));
            assert!(p.refusals.is_empty(), "{to}: {:?}", p.refusals);
            assert_eq!(p.spec.replicas, layout.brokers.max(to));
            let target = p.moving.clone().expect("a move").target;
            assert!(target.iter().all(|c| c.len() == 1), "{target:?}");
            // Every broker gets a fair share: loads differ by at most one.
            let load = |b: u32| target.iter().filter(|c| c[0] == b).count();
            let loads: Vec<usize> = (0..to as u32).map(load).collect();
            let (min, max) = (loads.iter().min(), loads.iter().max());
            assert!(max.unwrap() - min.unwrap() <= 1, "{to}: {target:?}");
            p.finish_move();
            assert_eq!((p.spec.replicas, p.layout.brokers), (to, to));
            layout = p.layout;
        }
        // Partitions grow on one broker as anywhere.
        let p = plan(
            &spec(json!({"replicas": 1, "partitions": 12})),
            Some(&layout),
        );
        assert_eq!(p.placed.unwrap().placement, vec![vec![0]; 12]);
    }

    #[test]
    fn replication_defaults_by_size_and_then_stays_as_the_volumes_hold_it() {
        // New Queues: as asked, else the default.
        let p = plan(
            &spec(json!({"replicas": 3, "partitions": 6, "replication": 3})),
            None,
        );
        assert_eq!((p.layout.replication, p.spec.replication), (3, Some(3)));
        let p = plan(&spec(json!({"replicas": 3, "partitions": 6})), None);
        assert_eq!(p.layout.replication, default_replication(3));
        // A Queue rolled out before the field existed keeps its one copy.
        let p = plan(
            &spec(json!({"replicas": 3, "partitions": 6})),
            Some(&held(6, 3)),
        );
        assert!(p.refusals.is_empty(), "{:?}", p.refusals);
        assert_eq!(p.layout.replication, 1);
        // Asking for another number of copies is refused and held back.
        let p = plan(
            &spec(json!({"replicas": 3, "partitions": 6, "replication": 3})),
            Some(&held(6, 3)),
        );
        assert_eq!(p.refusals, vec![Refusal::Replication { from: 1, to: 3 }]);
        assert_eq!(p.refusals[0].reason(), Reason::ReplicationChangeBlocked);
        assert_eq!(p.spec.replication, Some(1));
        assert!(p.refusals[0].to_string().contains("keep replication at 1"));
        // Replicated, a replica change is carried out by moving copies (below).
        let three = Layout {
            replication: 3,
            ..held(6, 3)
        };
        let p = plan(
            &spec(json!({"replicas": 4, "partitions": 6, "replication": 3})),
            Some(&three),
        );
        assert!(p.refusals.is_empty(), "{:?}", p.refusals);
        assert!(p.moving.is_some());
        // The webhook: a metadata-only update passes, a replication change does not.
        let old = spec(json!({"replicas": 3, "partitions": 6, "replication": 3}));
        assert!(check_update(&old, Some(&three), &old).is_empty());
        let one = spec(json!({"replicas": 3, "partitions": 6, "replication": 1}));
        assert_eq!(
            check_update(&old, Some(&three), &one),
            vec![Refusal::Replication { from: 3, to: 1 }]
        );
    }

    #[test]
    fn replicated_copies_move_onto_more_brokers_and_back() {
        let three = Layout {
            replication: 3,
            ..held(6, 3)
        };
        let five = spec(json!({"replicas": 5, "partitions": 6, "replication": 3}));
        let mut p = plan(&five, Some(&three));
        assert!(p.refusals.is_empty(), "{:?}", p.refusals);
        // The StatefulSet runs five brokers; the volumes still hold the old placement.
        assert_eq!(p.spec.replicas, 5);
        assert_eq!((p.layout.brokers, p.layout.moving_to), (3, Some(5)));
        let formula = three.members();
        assert_eq!(p.layout.placement.as_ref(), Some(&formula));
        let m = p.moving.clone().unwrap();
        assert_eq!(m.brokers, 5);
        let placed = p.placed.clone().unwrap();
        assert_eq!((&placed.placement, &placed.members), (&m.target, &formula));
        assert!(m.target.iter().flatten().any(|&b| b >= 3), "{:?}", m.target);
        // Planning again while the move runs gives the same target.
        let again = plan(&five, Some(&p.layout));
        assert_eq!(again.moving, Some(m.clone()));
        assert_eq!(again.placed, Some(placed));
        // Fewer brokers than copies: refused.
        let two = spec(json!({"replicas": 2, "partitions": 6}));
        let p2 = plan(&two, Some(&three));
        assert_eq!(
            p2.refusals,
            vec![Refusal::FewerBrokersThanCopies {
                to: 2,
                replication: 3
            }]
        );
        assert_eq!(
            (p2.spec.replicas, p2.refusals[0].reason()),
            (3, Reason::ScaleDownBlocked)
        );
        assert!(p2.moving.is_none());
        // Another replica count meanwhile is accepted and waits: the move goes on
        // to five brokers, the next starts from there.
        let four = spec(json!({"replicas": 4, "partitions": 6, "replication": 3}));
        let mut mid = plan(&four, Some(&p.layout));
        assert_eq!((mid.refusals.clone(), mid.then), (vec![], Some(4)));
        assert_eq!(mid.spec.replicas, 5);
        assert_eq!(
            (mid.moving.clone(), mid.placed.clone()),
            (again.moving, again.placed)
        );
        assert!(check_update(&five, Some(&p.layout), &four).is_empty());
        // Fewer than the copies is refused there too, and holds the move's count.
        let refused = plan(&two, Some(&p.layout));
        assert_eq!(refused.refusals[0].reason(), Reason::ScaleDownBlocked);
        assert_eq!((refused.spec.replicas, refused.then), (5, None));
        // Once done, planning the waiting count from the new layout moves on to it.
        mid.finish_move();
        let next = plan(&four, Some(&mid.layout));
        assert_eq!(next.moving.map(|m| m.brokers), Some(4));
        assert_eq!((next.spec.replicas, next.then), (5, None));
        // The brokers report it done: the new placement is what the volumes hold.
        p.finish_move();
        assert_eq!(p.spec.replicas, 5);
        assert_eq!(
            (
                p.layout.brokers,
                p.layout.moving_to,
                p.layout.placement.as_ref()
            ),
            (5, None, Some(&m.target))
        );
        // The status's merge patch must remove the move: null, not absent.
        let json = serde_json::to_value(&p.layout).unwrap();
        assert_eq!(json.get("movingTo"), Some(&serde_json::Value::Null));
        let settled = plan(&five, Some(&p.layout));
        assert!(settled.moving.is_none());
        assert_eq!(settled.placed.unwrap().members, m.target);
        // Back to three: five brokers run until the copies left 3 and 4.
        let back_spec = spec(json!({"replicas": 3, "partitions": 6, "replication": 3}));
        let mut back = plan(&back_spec, Some(&p.layout));
        assert_eq!((back.spec.replicas, back.layout.brokers), (5, 5));
        let target = back.moving.clone().unwrap().target;
        assert!(target.iter().flatten().all(|&b| b < 3), "{target:?}");
        back.finish_move();
        assert_eq!((back.spec.replicas, back.layout.brokers), (3, 3));
        // More partitions after a move: placed among the brokers, the old stay.
        let more = plan(
            &spec(json!({"replicas": 3, "partitions": 8, "replication": 3})),
            Some(&back.layout),
        );
        let placed = more.placed.unwrap();
        assert_eq!(placed.placement.len(), 8);
        assert_eq!(&placed.placement[..6], &target[..]);
        assert_eq!(placed.members, placed.placement);
    }

    #[test]
    fn growing_partitions_keeps_every_owner() {
        let p = plan(
            &spec(json!({"replicas": 2, "partitions": 8})),
            Some(&held(6, 2)),
        );
        assert!(p.refusals.is_empty(), "{:?}", p.refusals);
        assert_eq!(p.layout, held(8, 2));
    }

    #[test]
    fn fewer_partitions_is_refused_and_held() {
        let p = plan(
            &spec(json!({"replicas": 2, "partitions": 4})),
            Some(&held(8, 2)),
        );
        assert_eq!(
            p.refusals,
            vec![Refusal::PartitionsDecrease { from: 8, to: 4 }]
        );
        assert_eq!(p.refusals[0].reason(), Reason::PartitionsDecreaseBlocked);
        assert!(p.refusals[0].to_string().contains("partitions 4..7"));
        assert_eq!(p.spec.partitions, 8, "the partitions with messages stay");
        assert_eq!(p.layout, held(8, 2));
    }

    #[test]
    fn a_replica_change_that_moves_partitions_is_refused_with_them_named() {
        // The case: 6 partitions over 2 brokers, then 3.
        let p = plan(
            &spec(json!({"replicas": 3, "partitions": 6})),
            Some(&held(6, 2)),
        );
        assert_eq!(
            p.refusals,
            vec![Refusal::MovesPartitions {
                from: 2,
                to: 3,
                moved: vec![2, 3, 4, 5]
            }]
        );
        assert_eq!(p.refusals[0].reason(), Reason::ScaleUpBlocked);
        assert!(
            p.refusals[0]
                .to_string()
                .contains("partitions 2, 3, 4, 5 would go"),
            "{}",
            p.refusals[0]
        );
        assert_eq!(p.spec.replicas, 2);
        let down = plan(
            &spec(json!({"replicas": 2, "partitions": 6})),
            Some(&held(6, 3)),
        );
        assert_eq!(down.refusals[0].reason(), Reason::ScaleDownBlocked);
        assert_eq!(down.spec.replicas, 3);
    }

    #[test]
    fn partitions_may_grow_while_a_replica_change_is_held() {
        let p = plan(
            &spec(json!({"replicas": 4, "partitions": 12})),
            Some(&held(6, 3)),
        );
        assert_eq!(p.refusals.len(), 1);
        assert_eq!((p.spec.replicas, p.spec.partitions), (3, 12));
        assert_eq!(p.layout, held(12, 3));
    }

    #[test]
    fn a_held_plan_always_has_a_partition_per_broker() {
        // What validation asks of a spec (partitions >= replicas) holds for every plan
        // carried out from valid specs, refused or not.
        for (hp, hb) in [(1, 1), (4, 2), (6, 3), (8, 8)] {
            for wp in 1..=10 {
                for wb in 1..=wp {
                    let p = plan(
                        &spec(json!({"replicas": wb, "partitions": wp})),
                        Some(&held(hp, hb)),
                    );
                    assert!(p.spec.partitions >= p.spec.replicas, "{p:?}");
                    assert!(p.layout.partitions >= hp, "{p:?}");
                }
            }
        }
    }

    #[test]
    fn long_lists_are_cut() {
        let p = plan(
            &spec(json!({"replicas": 3, "partitions": 100})),
            Some(&held(100, 2)),
        );
        let msg = p.refusals[0].to_string();
        assert!(msg.contains("and 58 more"), "{msg}");
    }

    #[test]
    fn volumes_may_grow_but_not_shrink_or_change_class() {
        // Larger: carried out, as a growth for the reconciler to expand.
        let p = plan(
            &spec(json!({"storage": {"size": "5Gi"}})),
            Some(&held(6, 3)),
        );
        assert_eq!(p.refusals, vec![]);
        assert_eq!(p.spec.storage.size, "5Gi");
        assert_eq!(p.layout.storage.size, "5Gi");
        assert_eq!(
            p.grows,
            Some(Growth {
                from: "1Gi".into(),
                to: "5Gi".into()
            })
        );
        // The same size in other units changes nothing.
        let p = plan(
            &spec(json!({"storage": {"size": "1024Mi"}})),
            Some(&held(6, 3)),
        );
        assert_eq!((p.refusals.clone(), p.grows.clone()), (vec![], None));
        assert_eq!(p.spec.storage.size, "1Gi");
        // Smaller, and another class: refused, held as they were.
        let s = spec(json!({"storage": {"size": "512Mi", "storageClassName": "fast"}}));
        let p = plan(&s, Some(&held(6, 3)));
        let said: Vec<String> = p.refusals.iter().map(Refusal::to_string).collect();
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(
            said[0].starts_with(
                "spec.storage.storageClassName cannot change from the cluster default class to fast"
            ),
            "{}",
            said[0]
        );
        assert!(
            said[1].starts_with("spec.storage.size cannot go down from 1Gi to 512Mi"),
            "{}",
            said[1]
        );
        assert!(
            p.refusals
                .iter()
                .all(|r| r.reason() == Reason::StorageChangeBlocked)
        );
        assert_eq!((p.spec.storage, p.grows), (StorageSpec::default(), None));
    }

    #[test]
    fn a_growth_the_class_cannot_carry_is_held_back() {
        let mut p = plan(
            &spec(json!({"storage": {"size": "2Gi"}})),
            Some(&held(6, 3)),
        );
        p.hold_size("StorageClass standard does not allow volume expansion".into());
        assert_eq!(p.spec.storage.size, "1Gi");
        assert_eq!(p.layout.storage.size, "1Gi");
        assert_eq!(p.grows, None);
        assert_eq!(
            p.refusals[0].to_string(),
            "spec.storage.size cannot grow from 1Gi to 2Gi: StorageClass standard does not allow volume expansion; keep 1Gi, or create a new Queue with the storage you want and move the traffic to it"
        );
    }

    #[test]
    fn quantities_compare_across_units() {
        use crate::crd::quantity_bytes as b;
        assert_eq!(b("1Gi"), Some(1 << 30));
        assert_eq!(b("1024Mi"), b("1Gi"));
        assert_eq!(b("1.5Gi"), Some(3 << 29));
        assert_eq!(b("10G"), Some(10_000_000_000));
        assert_eq!(b("500"), Some(500));
        assert!(b("2Gi") > b("2G"));
        for bad in ["", "Gi", "1Xi", "1.Gi x", "-1Gi"] {
            assert_eq!(b(bad), None, "{bad}");
        }
    }

    #[test]
    fn updates_that_leave_the_layout_alone_are_never_refused() {
        // A Queue whose earlier scale-up the reconciler holds back (the webhook was
        // down): its finalizers and other settings may still change.
        let old = spec(json!({"replicas": 3, "partitions": 6}));
        let mut new = old.clone();
        new.delivery.max_deliveries = 9;
        assert!(check_update(&old, Some(&held(6, 2)), &new).is_empty());
        // But a new layout change is checked against what the volumes hold.
        let more = spec(json!({"replicas": 3, "partitions": 7}));
        let r = check_update(&old, Some(&held(6, 2)), &more);
        assert_eq!(r[0].reason(), Reason::ScaleUpBlocked);
        // With no status yet, against the old spec.
        let r = check_update(&old, None, &spec(json!({"replicas": 3, "partitions": 4})));
        assert_eq!(r, vec![Refusal::PartitionsDecrease { from: 6, to: 4 }]);
        let both = message(&[
            Refusal::PartitionsDecrease { from: 6, to: 4 },
            Refusal::PartitionsDecrease { from: 6, to: 5 },
        ]);
        assert_eq!(
            both.matches("spec.partitions cannot go down").count(),
            2,
            "{both}"
        );
    }
}
