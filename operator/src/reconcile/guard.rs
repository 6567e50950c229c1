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

/// What the volumes hold: the status's record, else what the StatefulSet runs (its
/// replicas and claim template, with the partitions of the spec: nothing older is
/// known), else nothing (a new Queue).
pub fn held(
    status: Option<&QueueStatus>,
    existing: Option<&StatefulSet>,
    spec: &QueueSpec,
) -> Option<Layout> {
    if let Some(layout) = status.and_then(|s| s.layout.clone()) {
        return Some(layout);
    }
    let sts = existing?.spec.as_ref()?;
    let claim = sts
        .volume_claim_templates
        .as_ref()
        .and_then(|t| t.first())
        .and_then(|t| t.spec.as_ref());
    let storage = StorageSpec {
        size: claim
            .and_then(|c| c.resources.as_ref()?.requests.as_ref()?.get("storage"))
            .map(|q| q.0.clone())
            .unwrap_or_else(|| spec.storage.size.clone()),
        storage_class_name: claim.and_then(|c| c.storage_class_name.clone()),
    };
    Some(Layout {
        partitions: spec.partitions,
        brokers: sts.replicas.unwrap_or(spec.replicas),
        // A StatefulSet without a recorded layout predates replication.
        replication: 1,
        storage,
    })
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
            storage: StorageSpec::default(),
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
    use crate::settings;
    use kube::runtime::controller::Action;
    use serde_json::json;

    #[tokio::test]
    async fn a_scale_down_is_refused_and_said() {
        let q = Queue::test(json!({ "replicas": 3 }));
        // Same settings as running: the only change asked for is the scale-down.
        let mut running = q.spec.clone();
        running.replicas = 5;
        let hash = settings::render(NAME, NS, &running).unwrap().hash;
        let old = existing_sts(5, &hash);
        let (res, _) = reconcile_with(q, Scenario::ScaleDownBlocked { old }).await;
        assert_eq!(res.unwrap(), Action::requeue(RESYNC_HEALTHY));
    }
}
