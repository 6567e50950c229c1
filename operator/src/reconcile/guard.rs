//! Step: the layout guard. Changes that would strand messages (a partition given
//! another broker, fewer partitions, other volumes) are held back: the reconciler
//! carries out the rest of the spec ([`crate::layout::plan`]) and the Queue says what
//! was refused and why. What the volumes hold comes from `status.layout`, or, for a
//! Queue reconciled before it was recorded, from the StatefulSet.

use super::conditions::{self, ConditionType};
use super::{Context, Error, EventReason, publish};
use crate::crd::{Queue, QueueSpec, QueueStatus, StorageSpec};
use crate::layout::{self, Layout, Plan};
use crate::resources;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::Api;
use kube::runtime::events::EventType;

/// The StatefulSet as it is before this reconciliation applies anything.
pub async fn existing(ctx: &Context, ns: &str, queue: &str) -> Result<Option<StatefulSet>, Error> {
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api.get_opt(&resources::sts_name(queue)).await?)
}

/// What the volumes hold: the record on the StatefulSet (read fresh, and written in
/// the same apply), else the status's record (the StatefulSet may be gone, or older
/// than the annotation), else what the StatefulSet runs (its replicas and claim
/// template, with the partitions of the spec: nothing older is known), else nothing
/// (a new Queue).
///
/// The StatefulSet comes first because the Queue a reconciliation is given comes
/// from the watch cache: right after a Queue is created, a reconciliation woken by
/// the new StatefulSet can see it without `status.layout`. Guessing from the
/// StatefulSet then held replication at 1, recorded that, and rolled a replicated
/// Queue back to single copies for good.
pub fn held(
    status: Option<&QueueStatus>,
    existing: Option<&StatefulSet>,
    spec: &QueueSpec,
) -> Option<Layout> {
    if let Some(layout) = existing.and_then(recorded_on) {
        return Some(layout);
    }
    if let Some(layout) = status.and_then(|s| s.layout.clone()) {
        return Some(layout);
    }
    let sts = existing?.spec.as_ref()?;
    let template = sts.volume_claim_templates.as_ref().and_then(|t| t.first());
    let storage = StorageSpec {
        size: template
            .and_then(resources::requested_size)
            .unwrap_or_else(|| spec.storage.size.clone()),
        storage_class_name: template
            .and_then(|t| t.spec.as_ref())
            .and_then(|c| c.storage_class_name.clone()),
    };
    Some(Layout {
        partitions: spec.partitions,
        brokers: sts.replicas.unwrap_or(spec.replicas),
        // A StatefulSet without a recorded layout predates replication and Raft
        // groups.
        replication: 1,
        raft: false,
        storage,
        placement: None,
        moving_to: None,
    })
}

/// The layout recorded on a StatefulSet ([`resources::LAYOUT_ANNOTATION`]).
fn recorded_on(sts: &StatefulSet) -> Option<Layout> {
    let json = sts
        .metadata
        .annotations
        .as_ref()?
        .get(resources::LAYOUT_ANNOTATION)?;
    serde_json::from_str(json).ok()
}

/// The guard's decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Scale {
    /// Replicas of the existing StatefulSet, if there is one.
    pub current: Option<i32>,
    /// What is carried out.
    pub plan: Plan,
}

impl Scale {
    /// Replicas to apply.
    pub fn replicas(&self) -> i32 {
        self.plan.spec.replicas
    }

    /// The Degraded reason and message for what was refused.
    pub fn refused(&self) -> Option<(conditions::Reason, String)> {
        let first = self.plan.refusals.first()?;
        Some((first.reason(), layout::message(&self.plan.refusals)))
    }
}

/// Plans the spec of `q` against what its volumes hold.
pub fn check(q: &Queue, existing: Option<&StatefulSet>) -> Scale {
    let current = existing
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas);
    let held = held(q.status.as_ref(), existing, &q.spec);
    Scale {
        current,
        plan: layout::plan(&q.spec, held.as_ref()),
    }
}

/// When the plan of `q` starts a move of its copies: the plan that waits instead,
/// keeping the brokers it has (see [`super::moves::wait_for_rollout`]).
pub fn before_move(q: &Queue, existing: Option<&StatefulSet>, scale: &Scale) -> Option<Scale> {
    let held = held(q.status.as_ref(), existing, &q.spec)?;
    if held.moving_to.is_some() || scale.plan.moving.is_none() {
        return None;
    }
    let wait = QueueSpec {
        replicas: held.brokers,
        ..q.spec.clone()
    };
    Some(Scale {
        current: scale.current,
        plan: layout::plan(&wait, Some(&held)),
    })
}

/// A Warning Event for a refused change, unless the status already says so.
pub async fn announce(ctx: &Context, q: &Queue, status: &QueueStatus, scale: &Scale) {
    let Some((reason, msg)) = scale.refused() else {
        return;
    };
    let said = status.conditions.iter().any(|c| {
        c.type_ == ConditionType::Degraded.as_str()
            && c.status == "True"
            && c.reason == reason.as_str()
            && c.message == msg
    });
    if !said {
        publish(
            ctx,
            q,
            EventType::Warning,
            EventReason::Refused(reason),
            "Guard",
            &msg,
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sts(replicas: i32, size: &str) -> StatefulSet {
        serde_json::from_value(json!({
            "spec": {
                "replicas": replicas, "selector": {}, "serviceName": "s", "template": {},
                "volumeClaimTemplates": [{"spec": {
                    "storageClassName": "fast",
                    "resources": {"requests": {"storage": size}}
                }}]
            }
        }))
        .unwrap()
    }

    #[test]
    fn the_status_record_outranks_the_statefulset() {
        let mut q = Queue::test(json!({"replicas": 3, "partitions": 6}));
        let recorded = Layout {
            partitions: 8,
            brokers: 2,
            replication: 1,
            raft: false,
            storage: StorageSpec::default(),
            placement: None,
            moving_to: None,
        };
        q.status = Some(QueueStatus {
            layout: Some(recorded.clone()),
            ..Default::default()
        });
        assert_eq!(
            held(q.status.as_ref(), Some(&sts(5, "9Gi")), &q.spec),
            Some(recorded)
        );
        // Without a StatefulSet too: an orphaning delete does not lift the guard.
        let s = check(&q, None);
        assert_eq!((s.current, s.replicas()), (None, 2));
        let (reason, msg) = s.refused().unwrap();
        // The first refusal names the condition; the message has them all.
        assert_eq!(reason, conditions::Reason::PartitionsDecreaseBlocked);
        assert!(
            msg.contains("spec.replicas cannot change from 2 to 3"),
            "{msg}"
        );
        assert!(
            msg.contains("spec.partitions cannot go down from 8 to 6"),
            "{msg}"
        );
    }

    #[test]
    fn a_new_statefulsets_record_stands_in_for_a_status_not_seen_yet() {
        // Right after creation: the StatefulSet is there, the cached Queue has no
        // status. Replication 3 is what the volumes were made for, not a refusal.
        let q = Queue::test(json!({"replicas": 3, "partitions": 6, "replication": 3}));
        let mut made = sts(3, "1Gi");
        made.metadata.annotations = Some(
            [(
                resources::LAYOUT_ANNOTATION.to_string(),
                serde_json::to_string(&Layout::of(&q.spec)).unwrap(),
            )]
            .into(),
        );
        let s = check(&q, Some(&made));
        assert_eq!(s.refused(), None);
        assert_eq!(s.plan.layout.replication, 3);
        // It outranks an older status record, which a cached Queue may still show.
        let mut stale = q.clone();
        stale.status = Some(QueueStatus {
            layout: Some(Layout {
                partitions: 4,
                ..s.plan.layout.clone()
            }),
            ..Default::default()
        });
        assert_eq!(check(&stale, Some(&made)).plan.layout.partitions, 6);
        // Without the record (a StatefulSet from before it), the old guess stands.
        assert_eq!(
            check(&q, Some(&sts(3, "1Gi"))).refused().map(|r| r.0),
            Some(conditions::Reason::ReplicationChangeBlocked)
        );
    }

    #[test]
    fn without_a_record_the_statefulset_says_what_the_volumes_hold() {
        let q = Queue::test(json!({"replicas": 3, "partitions": 6}));
        let h = held(None, Some(&sts(5, "2Gi")), &q.spec).unwrap();
        assert_eq!((h.partitions, h.brokers), (6, 5));
        assert_eq!(h.storage.size, "2Gi");
        assert_eq!(h.storage.storage_class_name.as_deref(), Some("fast"));
        let s = check(&q, Some(&sts(5, "1Gi")));
        assert_eq!((s.current, s.replicas()), (Some(5), 5));
        assert_eq!(s.refused().unwrap().0, conditions::Reason::ScaleDownBlocked);
        // The held storage class is applied again, not the spec's default.
        assert_eq!(
            s.plan.spec.storage.storage_class_name.as_deref(),
            Some("fast")
        );
        // A new Queue: as asked.
        let new = check(&q, None);
        assert_eq!(
            (new.current, new.replicas(), new.refused()),
            (None, 3, None)
        );
    }
}

#[cfg(test)]
mod mock_tests {
    use super::super::fixtures::{NAME, NS, Scenario, existing_sts, reconcile_with};
    use super::super::status::RESYNC_HEALTHY;
    use crate::crd::Queue;
    use crate::layout::Layout;
    use crate::{resources, settings};
    use kube::runtime::controller::Action;
    use serde_json::json;

    #[tokio::test]
    async fn a_scale_down_is_refused_and_said() {
        let q = Queue::test(json!({ "replicas": 3, "replication": 1 }));
        // Same settings as running: the only change asked for is the scale-down.
        let mut running = q.spec.clone();
        running.replicas = 5;
        let hash = settings::render(NAME, NS, &running, false, None)
            .unwrap()
            .hash;
        let old = existing_sts(5, &hash);
        let (res, _) = reconcile_with(q, Scenario::ScaleDownBlocked { old }).await;
        assert_eq!(res.unwrap(), Action::requeue(RESYNC_HEALTHY));
    }

    /// The race a CI run found: woken by the StatefulSet it just made, the
    /// reconciler got the Queue without `status.layout`, held replication at 1 and
    /// rolled the brokers to single copies. The StatefulSet's record prevents it:
    /// the scenario asserts `Degraded=False AsExpected` and the settings of the spec.
    #[tokio::test]
    async fn a_replicated_queue_seen_before_its_status_keeps_its_copies() {
        let q = Queue::test(json!({ "replicas": 3, "replication": 3 }));
        let mut old = existing_sts(3, "0000000000000000");
        old.metadata.annotations = Some(
            [(
                resources::LAYOUT_ANNOTATION.to_string(),
                serde_json::to_string(&Layout::of(&q.spec)).unwrap(),
            )]
            .into(),
        );
        let (res, _) = reconcile_with(q, Scenario::Update { old, replicas: 3 }).await;
        // Healthy and replicated: the brokers are asked again within a minute.
        assert_eq!(res.unwrap(), Action::requeue(RESYNC_HEALTHY));
    }
}
