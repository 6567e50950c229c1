//! The Queue's conditions: typed condition types and reasons, and one pure function
//! ([`compute`]) that derives them from what the reconciler observed. [`merge`] writes
//! them into the status, keeping `lastTransitionTime` when a status did not change.

use super::moves::Moving;
use super::partitions::PartitionsSeen;
use crate::crd::QueueStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The condition types a Queue reports, in the Kubernetes convention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionType {
    /// True when every broker is ready.
    Ready,
    /// True while pods do not all run the current settings.
    Progressing,
    /// True when something needs a human.
    Degraded,
    /// True when every partition has a leader (a majority of its copies up), as
    /// the brokers report it.
    Available,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::Progressing => "Progressing",
            ConditionType::Degraded => "Degraded",
            ConditionType::Available => "Available",
        }
    }
}

/// The reasons a condition gives (also the reasons of the matching Events).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Ready=True.
    AllBrokersReady,
    /// Ready=False: fewer brokers ready than the StatefulSet runs.
    BrokersNotReady,
    /// Progressing=False: every broker runs the current settings.
    RolloutComplete,
    /// Progressing=True.
    RollingOut,
    /// Progressing=True: every broker runs the current settings; some volumes have
    /// not reached the size asked for.
    VolumesGrowing,
    /// Progressing=True: partition copies are moving onto other brokers.
    PartitionsMoving,
    /// Degraded=False.
    AsExpected,
    /// Degraded=True: fewer replicas were refused (partitions would move).
    ScaleDownBlocked,
    /// Degraded=True: more replicas were refused (partitions would move).
    ScaleUpBlocked,
    /// Degraded=True: fewer partitions were refused.
    PartitionsDecreaseBlocked,
    /// Degraded=True: a change of the volumes' size or class was refused.
    StorageChangeBlocked,
    /// Degraded=True: a change of replication was refused (copies would be added or dropped).
    ReplicationChangeBlocked,
    /// Ready=False, Degraded=True, Progressing=False: the spec failed validation.
    InvalidSpec,
    /// Degraded=True: the last reconciliation failed.
    ReconcileError,
    /// Available=True: every partition led, every copy in sync.
    AllPartitionsLed,
    /// Available=True: every partition led, some on fewer copies than they have.
    UnderReplicated,
    /// Available=False: some partition has no leader (fewer than a majority of
    /// its copies answer); its writes wait until one is elected.
    NoMajority,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::AllBrokersReady => "AllBrokersReady",
            Reason::BrokersNotReady => "BrokersNotReady",
            Reason::RolloutComplete => "RolloutComplete",
            Reason::RollingOut => "RollingOut",
            Reason::VolumesGrowing => "VolumesGrowing",
            Reason::PartitionsMoving => "PartitionsMoving",
            Reason::AsExpected => "AsExpected",
            Reason::ScaleDownBlocked => "ScaleDownBlocked",
            Reason::ScaleUpBlocked => "ScaleUpBlocked",
            Reason::PartitionsDecreaseBlocked => "PartitionsDecreaseBlocked",
            Reason::StorageChangeBlocked => "StorageChangeBlocked",
            Reason::ReplicationChangeBlocked => "ReplicationChangeBlocked",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::ReconcileError => "ReconcileError",
            Reason::AllPartitionsLed => "AllPartitionsLed",
            Reason::UnderReplicated => "UnderReplicated",
            Reason::NoMajority => "NoMajority",
        }
    }
}

/// One condition as computed, before it meets the stored status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueCondition {
    pub type_: ConditionType,
    pub status: bool,
    pub reason: Reason,
    pub message: String,
}

impl QueueCondition {
    fn new(type_: ConditionType, status: bool, reason: Reason, message: impl Into<String>) -> Self {
        QueueCondition {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// What the StatefulSet (and, when not all are ready, its pods) report after the
/// applies.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Rollout {
    /// Brokers the StatefulSet was given (spec.replicas, or other while a scale is
    /// refused).
    pub replicas: i32,
    /// `status.replicas`: pods that exist.
    pub current: i32,
    pub ready: i32,
    /// Pods running the current pod template.
    pub updated: i32,
    /// The StatefulSet controller has seen the latest StatefulSet spec.
    pub generation_seen: bool,
    pub config_hash: String,
    /// The changes of the spec held back: the first one's reason, and why (all).
    pub refused: Option<(Reason, String)>,
    /// Why pods are not ready (see `status::pods_summary`); asked only when not all
    /// brokers are ready.
    pub pods: Option<String>,
    /// The partitions as the brokers report them; None when no broker could be
    /// asked (none ready, or none with an address yet).
    pub partitions: Option<PartitionsSeen>,
    /// While volumes grow: the size asked for, and the bound claims short of it.
    pub growing: Option<(String, Vec<String>)>,
    /// While partition copies move onto other brokers.
    pub moving: Option<Moving>,
}

impl Rollout {
    /// Every broker is ready.
    pub fn all_ready(&self) -> bool {
        self.ready >= self.replicas
    }

    /// Every broker runs the current settings, and none beyond the wanted count.
    pub fn rolled(&self) -> bool {
        self.generation_seen && self.updated >= self.replicas && self.current <= self.replicas
    }
}

/// What a reconciliation found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed<'a> {
    /// The spec failed semantic validation: nothing is applied.
    InvalidSpec { error: &'a str },
    /// The reconciliation failed: only `Degraded` is known, the other conditions stay
    /// as they were.
    Failed { error: &'a str },
    /// The owned objects were applied; what the StatefulSet reports.
    Applied(&'a Rollout),
}

/// The Queue's conditions for what was observed, in the order they are first added
/// to a status.
pub fn compute(observed: &Observed) -> Vec<QueueCondition> {
    use ConditionType::*;
    match observed {
        Observed::InvalidSpec { error } => vec![
            QueueCondition::new(Ready, false, Reason::InvalidSpec, *error),
            QueueCondition::new(Degraded, true, Reason::InvalidSpec, *error),
            QueueCondition::new(
                Progressing,
                false,
                Reason::InvalidSpec,
                "nothing is applied until the spec is fixed",
            ),
        ],
        Observed::Failed { error } => vec![QueueCondition::new(
            Degraded,
            true,
            Reason::ReconcileError,
            *error,
        )],
        Observed::Applied(r) => {
            let replicas = r.replicas;
            let growing = r.growing.as_ref().filter(|(_, short)| !short.is_empty());
            let progressing = if let Some(m) = &r.moving {
                QueueCondition::new(
                    Progressing,
                    true,
                    Reason::PartitionsMoving,
                    format!(
                        "moving partition copies onto {} brokers: {} of {} partitions left ({}){}",
                        m.to,
                        m.left.len(),
                        m.partitions,
                        crate::layout::list(&m.left),
                        m.then
                            .map(|n| format!("; then onto {n} brokers, as asked meanwhile"))
                            .unwrap_or_default()
                    ),
                )
            } else if let (true, Some((size, short))) = (r.rolled(), growing) {
                QueueCondition::new(
                    Progressing,
                    true,
                    Reason::VolumesGrowing,
                    format!(
                        "volumes growing to {size}: {} not there yet",
                        short.join(", ")
                    ),
                )
            } else if r.rolled() {
                QueueCondition::new(
                    Progressing,
                    false,
                    Reason::RolloutComplete,
                    format!("{replicas} broker(s) run the current settings"),
                )
            } else {
                QueueCondition::new(
                    Progressing,
                    true,
                    Reason::RollingOut,
                    format!(
                        "{}/{replicas} broker(s) run the current settings (hash {})",
                        r.updated, r.config_hash
                    ),
                )
            };
            let ready = if r.all_ready() {
                QueueCondition::new(
                    Ready,
                    true,
                    Reason::AllBrokersReady,
                    format!("{}/{replicas} brokers ready", r.ready),
                )
            } else {
                QueueCondition::new(
                    Ready,
                    false,
                    Reason::BrokersNotReady,
                    format!(
                        "{}/{replicas} brokers ready; {}",
                        r.ready,
                        r.pods.as_deref().unwrap_or("pods unknown")
                    ),
                )
            };
            let degraded = match &r.refused {
                Some((reason, msg)) => QueueCondition::new(Degraded, true, *reason, msg),
                None => QueueCondition::new(
                    Degraded,
                    false,
                    Reason::AsExpected,
                    "all owned objects applied",
                ),
            };
            let mut conditions = vec![progressing, ready, degraded];
            conditions.extend(r.partitions.as_ref().map(available));
            conditions
        }
    }
}

/// `Available`, from the brokers' reports.
fn available(seen: &PartitionsSeen) -> QueueCondition {
    use crate::layout::list;
    let total = seen.partitions.len();
    let unanswered = if seen.unanswered.is_empty() {
        String::new()
    } else {
        format!("; no report from {}", seen.unanswered.join(", "))
    };
    if !seen.leaderless.is_empty() {
        let majority = seen.replication / 2 + 1;
        return QueueCondition::new(
            ConditionType::Available,
            false,
            Reason::NoMajority,
            format!(
                "partitions {} have no leader: fewer than {majority} of their {} copies answer, so their writes wait{unanswered}",
                list(&seen.leaderless),
                seen.replication
            ),
        );
    }
    if !seen.under_replicated.is_empty() {
        return QueueCondition::new(
            ConditionType::Available,
            true,
            Reason::UnderReplicated,
            format!(
                "{total}/{total} partitions led; partitions {} have fewer than {} copies in sync{unanswered}",
                list(&seen.under_replicated),
                seen.replication
            ),
        );
    }
    let copies = match seen.replication {
        1 => "one copy each".to_string(),
        n => format!("{n} copies of each in sync"),
    };
    QueueCondition::new(
        ConditionType::Available,
        true,
        Reason::AllPartitionsLed,
        format!("{total}/{total} partitions led, {copies}"),
    )
}

/// Writes computed conditions into a status: a condition keeps its
/// `lastTransitionTime` unless its status changed; new ones are appended.
pub fn merge(
    status: &mut QueueStatus,
    conditions: Vec<QueueCondition>,
    generation: Option<i64>,
    now: &Time,
) {
    for c in conditions {
        let value = if c.status { "True" } else { "False" };
        match status
            .conditions
            .iter_mut()
            .find(|s| s.type_ == c.type_.as_str())
        {
            Some(s) => {
                if s.status != value {
                    s.last_transition_time = now.clone();
                }
                s.status = value.into();
                s.reason = c.reason.as_str().into();
                s.message = c.message;
                s.observed_generation = generation;
            }
            None => status.conditions.push(Condition {
                type_: c.type_.as_str().into(),
                status: value.into(),
                reason: c.reason.as_str().into(),
                message: c.message,
                observed_generation: generation,
                last_transition_time: now.clone(),
            }),
        }
    }
}

/// The stored condition of a type, if any.
pub fn find(status: &QueueStatus, type_: ConditionType) -> Option<&Condition> {
    status.conditions.iter().find(|c| c.type_ == type_.as_str())
}

/// The stored condition of a type has this reason (and, given, this status).
pub fn has(
    status: &QueueStatus,
    type_: ConditionType,
    reason: Reason,
    value: Option<bool>,
) -> bool {
    find(status, type_).is_some_and(|c| {
        c.reason == reason.as_str()
            && value.is_none_or(|v| c.status == if v { "True" } else { "False" })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConditionType::*;
    use k8s_openapi::jiff::Timestamp;

    fn rollout() -> Rollout {
        Rollout {
            replicas: 3,
            current: 3,
            ready: 3,
            updated: 3,
            generation_seen: true,
            config_hash: "abc".into(),
            refused: None,
            pods: None,
            partitions: None,
            growing: None,
            moving: None,
        }
    }

    /// Four partitions of three copies as reported: `leaderless` without a leader,
    /// `behind` led with two copies in sync.
    fn seen(leaderless: &[i32], behind: &[i32]) -> PartitionsSeen {
        PartitionsSeen {
            partitions: (0..4)
                .map(|p| crate::crd::PartitionStatus {
                    partition: p,
                    leader: (!leaderless.contains(&p)).then(|| format!("sluice-orders-{}", p % 3)),
                    in_sync: (!leaderless.contains(&p)).then_some(if behind.contains(&p) {
                        2
                    } else {
                        3
                    }),
                })
                .collect(),
            leaderless: leaderless.to_vec(),
            under_replicated: behind.to_vec(),
            unanswered: if leaderless.is_empty() {
                vec![]
            } else {
                vec!["sluice-orders-2: connection refused".into()]
            },
            replication: 3,
        }
    }

    /// (type, status, reason), as the table states a condition.
    type Row = (ConditionType, bool, Reason);

    /// (type, status, reason) triples, in order.
    fn summary(cs: &[QueueCondition]) -> Vec<Row> {
        cs.iter().map(|c| (c.type_, c.status, c.reason)).collect()
    }

    #[test]
    fn conditions_follow_the_observed_state() {
        let not_ready = Rollout {
            ready: 1,
            pods: Some("2 pod(s) Pending (no nodes)".into()),
            ..rollout()
        };
        let rolling = Rollout {
            updated: 1,
            ..rollout()
        };
        let unseen = Rollout {
            generation_seen: false,
            ..rollout()
        };
        let shrinking = Rollout {
            current: 4,
            ..rollout()
        };
        let blocked = Rollout {
            replicas: 5,
            current: 5,
            ready: 5,
            updated: 5,
            refused: Some((
                Reason::ScaleDownBlocked,
                "scale-down from 5 to 3 refused".into(),
            )),
            ..rollout()
        };
        let healthy = rollout();
        let led = Rollout {
            partitions: Some(seen(&[], &[])),
            ..rollout()
        };
        let behind = Rollout {
            partitions: Some(seen(&[], &[1])),
            ..rollout()
        };
        let growing = Rollout {
            growing: Some(("2Gi".into(), vec!["data-sluice-orders-1 (1Gi)".into()])),
            ..rollout()
        };
        let grown = Rollout {
            growing: Some(("2Gi".into(), vec![])),
            ..rollout()
        };
        let growing_while_rolling = Rollout {
            updated: 2,
            ..growing.clone()
        };
        let no_majority = Rollout {
            ready: 1,
            pods: Some("2 pod(s) Failed".into()),
            partitions: Some(seen(&[2], &[1])),
            ..rollout()
        };
        let mut table: Vec<(&str, Observed, Vec<Row>)> = vec![
            (
                "invalid spec",
                Observed::InvalidSpec { error: "bad" },
                vec![
                    (Ready, false, Reason::InvalidSpec),
                    (Degraded, true, Reason::InvalidSpec),
                    (Progressing, false, Reason::InvalidSpec),
                ],
            ),
            (
                "reconcile error",
                Observed::Failed { error: "boom" },
                vec![(Degraded, true, Reason::ReconcileError)],
            ),
            (
                "all ready and rolled",
                Observed::Applied(&healthy),
                vec![
                    (Progressing, false, Reason::RolloutComplete),
                    (Ready, true, Reason::AllBrokersReady),
                    (Degraded, false, Reason::AsExpected),
                ],
            ),
            (
                "brokers not ready",
                Observed::Applied(&not_ready),
                vec![
                    (Progressing, false, Reason::RolloutComplete),
                    (Ready, false, Reason::BrokersNotReady),
                    (Degraded, false, Reason::AsExpected),
                ],
            ),
            (
                "pods on old settings",
                Observed::Applied(&rolling),
                vec![
                    (Progressing, true, Reason::RollingOut),
                    (Ready, true, Reason::AllBrokersReady),
                    (Degraded, false, Reason::AsExpected),
                ],
            ),
            (
                "StatefulSet generation not yet observed",
                Observed::Applied(&unseen),
                vec![
                    (Progressing, true, Reason::RollingOut),
                    (Ready, true, Reason::AllBrokersReady),
                    (Degraded, false, Reason::AsExpected),
                ],
            ),
            (
                "more pods than wanted",
                Observed::Applied(&shrinking),
                vec![
                    (Progressing, true, Reason::RollingOut),
                    (Ready, true, Reason::AllBrokersReady),
                    (Degraded, false, Reason::AsExpected),
                ],
            ),
            (
                "scale-down blocked",
                Observed::Applied(&blocked),
                vec![
                    (Progressing, false, Reason::RolloutComplete),
                    (Ready, true, Reason::AllBrokersReady),
                    (Degraded, true, Reason::ScaleDownBlocked),
                ],
            ),
        ];
        table.extend([
            (
                "every partition led, every copy in sync",
                Observed::Applied(&led),
                vec![
                    (Progressing, false, Reason::RolloutComplete),
                    (Ready, true, Reason::AllBrokersReady),
                    (Degraded, false, Reason::AsExpected),
                    (Available, true, Reason::AllPartitionsLed),
                ],
            ),
            (
                "a partition behind on copies",
                Observed::Applied(&behind),
                vec![
                    (Progressing, false, Reason::RolloutComplete),
                    (Ready, true, Reason::AllBrokersReady),
                    (Degraded, false, Reason::AsExpected),
                    (Available, true, Reason::UnderReplicated),
                ],
            ),
            (
                "a partition without a majority",
                Observed::Applied(&no_majority),
                vec![
                    (Progressing, false, Reason::RolloutComplete),
                    (Ready, false, Reason::BrokersNotReady),
                    (Degraded, false, Reason::AsExpected),
                    (Available, false, Reason::NoMajority),
                ],
            ),
            (
                "volumes short of the size asked for",
                Observed::Applied(&growing),
                vec![
                    (Progressing, true, Reason::VolumesGrowing),
                    (Ready, true, Reason::AllBrokersReady),
                    (Degraded, false, Reason::AsExpected),
                ],
            ),
            (
                "every volume grown",
                Observed::Applied(&grown),
                vec![
                    (Progressing, false, Reason::RolloutComplete),
                    (Ready, true, Reason::AllBrokersReady),
                    (Degraded, false, Reason::AsExpected),
                ],
            ),
            (
                "a rollout says so before volumes do",
                Observed::Applied(&growing_while_rolling),
                vec![
                    (Progressing, true, Reason::RollingOut),
                    (Ready, true, Reason::AllBrokersReady),
                    (Degraded, false, Reason::AsExpected),
                ],
            ),
        ]);
        for (case, observed, want) in table {
            assert_eq!(summary(&compute(&observed)), want, "{case}");
        }
    }

    #[test]
    fn messages_say_why() {
        let r = Rollout {
            ready: 1,
            updated: 2,
            pods: Some("2 pod(s) Pending (no nodes)".into()),
            refused: Some((Reason::ScaleDownBlocked, "refused".into())),
            ..rollout()
        };
        let cs = compute(&Observed::Applied(&r));
        let msg: Vec<&str> = cs.iter().map(|c| c.message.as_str()).collect();
        assert_eq!(
            msg,
            [
                "2/3 broker(s) run the current settings (hash abc)",
                "1/3 brokers ready; 2 pod(s) Pending (no nodes)",
                "refused",
            ]
        );
        let cs = compute(&Observed::Applied(&rollout()));
        assert_eq!(cs[0].message, "3 broker(s) run the current settings");
        assert_eq!(cs[1].message, "3/3 brokers ready");
        assert_eq!(cs[2].message, "all owned objects applied");
        let available = |s: PartitionsSeen| {
            let r = Rollout {
                partitions: Some(s),
                ..rollout()
            };
            compute(&Observed::Applied(&r))[3].message.clone()
        };
        assert_eq!(
            available(seen(&[], &[])),
            "4/4 partitions led, 3 copies of each in sync"
        );
        assert_eq!(
            available(seen(&[], &[1, 3])),
            "4/4 partitions led; partitions 1, 3 have fewer than 3 copies in sync"
        );
        assert_eq!(
            available(seen(&[0, 2], &[])),
            "partitions 0, 2 have no leader: fewer than 2 of their 3 copies answer, so their writes wait; no report from sluice-orders-2: connection refused"
        );
        let moving = |then| {
            let r = Rollout {
                moving: Some(Moving {
                    to: 5,
                    left: vec![1, 4],
                    partitions: 6,
                    then,
                }),
                ..rollout()
            };
            compute(&Observed::Applied(&r))[0].message.clone()
        };
        assert_eq!(
            moving(None),
            "moving partition copies onto 5 brokers: 2 of 6 partitions left (1, 4)"
        );
        assert_eq!(
            moving(Some(2)),
            "moving partition copies onto 5 brokers: 2 of 6 partitions left (1, 4); then onto 2 brokers, as asked meanwhile"
        );
        let cs = compute(&Observed::InvalidSpec { error: "bad" });
        assert_eq!(cs[0].message, "bad");
        assert_eq!(cs[2].message, "nothing is applied until the spec is fixed");
    }

    #[test]
    fn merge_keeps_transition_times_of_unchanged_statuses() {
        let t0 = Time(Timestamp::from_second(1_000).unwrap());
        let t1 = Time(Timestamp::from_second(2_000).unwrap());
        let mut status = QueueStatus::default();
        merge(
            &mut status,
            compute(&Observed::Applied(&rollout())),
            Some(1),
            &t0,
        );
        let types: Vec<&str> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Progressing", "Ready", "Degraded"]);

        // Degraded flips, the others keep their status (and their time).
        merge(
            &mut status,
            compute(&Observed::Failed { error: "boom" }),
            Some(2),
            &t1,
        );
        let degraded = find(&status, Degraded).unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "ReconcileError")
        );
        assert_eq!(degraded.last_transition_time, t1);
        assert_eq!(degraded.observed_generation, Some(2));
        let ready = find(&status, Ready).unwrap();
        assert_eq!(ready.last_transition_time, t0);
        assert_eq!(ready.observed_generation, Some(1));
        assert!(has(&status, Degraded, Reason::ReconcileError, Some(true)));
        assert!(!has(&status, Degraded, Reason::ReconcileError, Some(false)));
        assert!(has(&status, Ready, Reason::AllBrokersReady, None));
        assert_eq!(status.conditions.len(), 3);
    }
}
