//! Step: deletion with `deletionPolicy: Delete`. Runs under kube's finalizer helper
//! (the finalizer `sluice.dev/delete-volumes` is released once this succeeds): the
//! data volume claims go, then the Queue.

use super::{Context, Error, EventReason, publish};
use crate::crd::Queue;
use crate::resources;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use tracing::info;

/// Deletes the Queue's PersistentVolumeClaims (those not already being deleted).
pub async fn cleanup(q: &Queue, ctx: &Context) -> Result<Action, Error> {
    let ns = q.namespace().ok_or(Error::NoNamespace)?;
    let name = q.name_any();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let list = pvcs
        .list(&ListParams::default().labels(&resources::queue_selector(&name)))
        .await?;
    for pvc in &list.items {
        if pvc.metadata.deletion_timestamp.is_none() {
            pvcs.delete(&pvc.name_any(), &DeleteParams::default())
                .await?;
            info!(queue = %name, %ns, pvc = %pvc.name_any(), "deleted data volume claim");
        }
    }
    publish(
        ctx,
        q,
        EventType::Normal,
        EventReason::VolumesDeleted,
        "Delete",
        &format!(
            "deleted {} PersistentVolumeClaim(s) (deletionPolicy Delete)",
            list.items.len()
        ),
    )
    .await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{Scenario, reconcile_with};
    use crate::crd::Queue;
    use kube::runtime::controller::Action;
    use serde_json::json;

    #[tokio::test]
    async fn deletion_removes_the_claims_then_releases_the_queue() {
        let q = Queue::test(json!({ "deletionPolicy": "Delete" }))
            .finalized()
            .deleting();
        let pvcs = vec!["data-sluice-orders-0", "data-sluice-orders-1"];
        let (res, _) = reconcile_with(q, Scenario::Cleanup { pvcs }).await;
        assert_eq!(res.unwrap(), Action::await_change());
    }
}
