//! Step: moving a replicated Queue's partition copies onto other brokers (a change
//! of `replicas`). The plan ([`crate::layout::plan`]) gives the brokers' settings the
//! new placement while the StatefulSet runs the old and the new brokers; each
//! partition's leader moves its group there (the broker's `replica` module). This
//! step asks the brokers which groups have their new members: once all have, the
//! plan records the new placement, the settings drop the old members (their copies
//! are deleted) and the StatefulSet takes the count asked for.

use super::{Context, Error, EventReason, partitions, publish};
use crate::crd::Queue;
use crate::layout::Plan;
use crate::resources;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::events::EventType;

/// A move under way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Moving {
    /// Brokers the copies move onto.
    pub to: i32,
    /// Partitions whose group has not moved yet.
    pub left: Vec<i32>,
    pub partitions: i32,
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
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let pods = pods
        .list(&ListParams::default().labels(&resources::queue_selector(&name)))
        .await?
        .items;
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
