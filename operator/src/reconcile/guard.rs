//! Step: the scale-down guard. Scaling down would orphan the partitions of the
//! removed brokers (partition data cannot move between brokers yet), so the
//! StatefulSet keeps its size and the Queue says why.

use super::conditions::{self, ConditionType, Reason};
use super::{Context, Error, EventReason, publish};
use crate::crd::{Queue, QueueStatus};
use crate::resources;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::Api;
use kube::runtime::events::EventType;

/// The StatefulSet as it is before this reconciliation applies anything.
pub async fn existing(ctx: &Context, ns: &str, queue: &str) -> Result<Option<StatefulSet>, Error> {
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api.get_opt(&resources::sts_name(queue)).await?)
}

/// The guard's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scale {
    /// Replicas of the existing StatefulSet, if there is one.
    pub current: Option<i32>,
    /// Replicas to apply.
    pub replicas: i32,
    /// Why the wanted scale-down was refused.
    pub blocked: Option<String>,
}

/// Applies what the spec wants, except fewer replicas than the StatefulSet has.
pub fn check(wanted: i32, existing: Option<&StatefulSet>) -> Scale {
    let current = existing
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas);
    match current {
        Some(cur) if wanted < cur => Scale {
            current,
            replicas: cur,
            blocked: Some(format!(
                "scale-down from {cur} to {wanted} refused: brokers {wanted}..{} own partitions whose messages would be lost (partition data cannot move between brokers yet); staying at {cur} replicas",
                cur - 1
            )),
        },
        _ => Scale {
            current,
            replicas: wanted,
            blocked: None,
        },
    }
}

/// A Warning Event when a scale-down is refused, unless the status already says so.
pub async fn announce(ctx: &Context, q: &Queue, status: &QueueStatus, scale: &Scale) {
    if let Some(msg) = &scale.blocked
        && !conditions::has(
            status,
            ConditionType::Degraded,
            Reason::ScaleDownBlocked,
            Some(true),
        )
    {
        publish(
            ctx,
            q,
            EventType::Warning,
            EventReason::ScaleDownBlocked,
            "Scale",
            msg,
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::StatefulSetSpec;

    fn sts(replicas: i32) -> StatefulSet {
        StatefulSet {
            spec: Some(StatefulSetSpec {
                replicas: Some(replicas),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn refuses_only_a_scale_down() {
        let none = check(3, None);
        assert_eq!((none.current, none.replicas, none.blocked), (None, 3, None));
        let same = check(3, Some(&sts(3)));
        assert_eq!((same.replicas, same.blocked), (3, None));
        let up = check(5, Some(&sts(3)));
        assert_eq!((up.current, up.replicas, up.blocked), (Some(3), 5, None));
        let down = check(2, Some(&sts(5)));
        assert_eq!((down.current, down.replicas), (Some(5), 5));
        assert_eq!(
            down.blocked.as_deref(),
            Some(
                "scale-down from 5 to 2 refused: brokers 2..4 own partitions whose messages would be lost (partition data cannot move between brokers yet); staying at 5 replicas"
            )
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
        let hash = settings::render(NAME, NS, &q.spec, 5).unwrap().hash;
        let old = existing_sts(5, &hash);
        let (res, _) = reconcile_with(q, Scenario::ScaleDownBlocked { old }).await;
        assert_eq!(res.unwrap(), Action::requeue(RESYNC_HEALTHY));
    }
}
