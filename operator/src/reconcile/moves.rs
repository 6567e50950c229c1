//! Step: moving a replicated Queue's partition copies onto other brokers (a change
//! of `replicas`). The plan ([`crate::layout::plan`]) gives the brokers' settings the
//! new placement while the StatefulSet runs the old and the new brokers; each
//! partition's leader moves its group there (the broker's `replica` module). This
//! step asks the brokers which groups have their new members: once all have, the
//! plan records the new placement, the settings drop the old members (their copies
//! are deleted) and the StatefulSet takes the count asked for. The claims of brokers
//! a scale-down removed hold nothing anyone needs then, and are deleted
//! ([`release_claims`]): kept, they would hand a later broker of that ordinal a stale
//! copy of a group it left.

use super::guard::{self, Scale};
use super::{Context, Error, EventReason, partitions, publish};
use crate::crd::Queue;
use crate::layout::Plan;
use crate::{resources, settings};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::events::EventType;

/// Holds a new move back until every running broker runs the settings of the
/// layout as it is. A broker still on the settings of the last move (its rollout
/// of the settled members not done) would, leading a partition, move the copies
/// back where that move placed them. Pods that run nothing yet (Pending) cannot.
pub async fn wait_for_rollout(
    ctx: &Context,
    q: &Queue,
    ns: &str,
    existing: Option<&StatefulSet>,
    scale: &mut Scale,
) -> Result<(), Error> {
    let Some(wait) = guard::before_move(q, existing, scale) else {
        return Ok(());
    };
    let name = q.name_any();
    let settled = settings::render(
        &name,
        ns,
        &wait.plan.spec,
        wait.plan.layout.raft,
        wait.plan.placed.as_ref(),
    )
    .map_err(Error::Settings)?;
    let pods: Vec<Pod> = of_queue(ctx, ns, &name).await?;
    let stale = pods.iter().any(|p| {
        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        running && p.annotations().get(resources::HASH_ANNOTATION) != Some(&settled.hash)
    });
    if stale {
        tracing::info!(queue = %name, "a move waits until every broker runs the current settings");
        *scale = wait;
    }
    Ok(())
}

/// A move under way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Moving {
    /// Brokers the copies move onto.
    pub to: i32,
    /// Partitions whose group has not moved yet.
    pub left: Vec<i32>,
    pub partitions: i32,
    /// The broker count asked for meanwhile, moved onto next.
    pub then: Option<i32>,
}

/// Follows the move the plan carries, if any: finishes it in the plan when the
/// brokers report every group moved, else says what is left.
pub async fn follow(
    ctx: &Context,
    q: &Queue,
    ns: &str,
    plan: &mut Plan,
) -> Result<Option<Moving>, Error> {
    let Some(m) = plan.moving.clone() else {
        return Ok(None);
    };
    let name = q.name_any();
    let pods: Vec<Pod> = of_queue(ctx, ns, &name).await?;
    let answers = ctx.brokers.ask(&pods).await.unwrap_or_default();
    let dead_letter = plan.spec.delivery.dead_letter;
    let left = partitions::moves_left(&name, dead_letter, &m.target, &answers);
    let from = plan.layout.brokers;
    if !left.is_empty() {
        if plan.layout.moving_to
            != q.status
                .as_ref()
                .and_then(|s| s.layout.as_ref())
                .and_then(|l| l.moving_to)
        {
            publish(
                ctx,
                q,
                EventType::Normal,
                EventReason::PartitionsMoving,
                "Move",
                &format!(
                    "moving partition copies from {from} to {} brokers: {} of {} partitions to move",
                    m.brokers,
                    left.len(),
                    m.target.len()
                ),
            )
            .await;
        }
        return Ok(Some(Moving {
            to: m.brokers,
            left,
            partitions: m.target.len() as i32,
            then: plan.then,
        }));
    }
    plan.finish_move();
    publish(
        ctx,
        q,
        EventType::Normal,
        EventReason::PartitionsMoved,
        "Move",
        &format!(
            "every partition's copies moved from {from} to {} brokers",
            m.brokers
        ),
    )
    .await;
    Ok(None)
}

/// Deletes the volume claims of brokers beyond the StatefulSet's count, once a
/// replicated Queue's copies moved off them (a placement is recorded and no move is
/// under way). A claim whose pod still runs stays until the pod is gone (the API
/// server's claim protection).
pub async fn release_claims(ctx: &Context, q: &Queue, ns: &str, plan: &Plan) -> Result<(), Error> {
    if plan.layout.placement.is_none() || plan.layout.moving_to.is_some() {
        return Ok(());
    }
    let name = q.name_any();
    let claims: Vec<PersistentVolumeClaim> = of_queue(ctx, ns, &name).await?;
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let live: Vec<String> = claims
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .map(|c| c.name_any())
        .collect();
    let left = left_behind(&live, &resources::sts_name(&name), plan.spec.replicas);
    for claim in &left {
        match api.delete(claim, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if !left.is_empty() {
        publish(
            ctx,
            q,
            EventType::Normal,
            EventReason::VolumesDeleted,
            "Move",
            &format!(
                "deleted the claims of brokers the Queue no longer runs (their copies moved to the others): {}",
                left.join(", ")
            ),
        )
        .await;
    }
    Ok(())
}

/// The claims (`data-<statefulset>-<ordinal>`) of ordinals at or beyond `brokers`.
fn left_behind(claims: &[String], sts: &str, brokers: i32) -> Vec<String> {
    let prefix = format!("data-{sts}-");
    claims
        .iter()
        .filter(|c| {
            c.strip_prefix(&prefix)
                .and_then(|n| n.parse::<i32>().ok())
                .is_some_and(|n| n >= brokers)
        })
        .cloned()
        .collect()
}

/// The objects of kind `K` in `ns` labelled as queue `name`'s.
async fn of_queue<K>(ctx: &Context, ns: &str, name: &str) -> Result<Vec<K>, Error>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let selector = resources::queue_selector(name);
    Ok(api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_claims_of_removed_ordinals_are_left_behind() {
        let claims: Vec<String> = [
            "data-sluice-orders-0",
            "data-sluice-orders-2",
            "data-sluice-orders-3",
            "data-sluice-orders-10",
            "data-sluice-orders-x",
            "data-sluice-orders-archive-7",
            "other",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            left_behind(&claims, "sluice-orders", 3),
            ["data-sluice-orders-3", "data-sluice-orders-10"]
        );
    }
}
