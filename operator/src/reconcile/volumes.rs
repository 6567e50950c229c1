//! Step: growing the brokers' volumes. A StatefulSet's claim templates cannot change,
//! so a larger `spec.storage.size` is carried out the known way:
//!
//! 1. every claim's StorageClass must allow expansion (`allowVolumeExpansion`), else
//!    the growth is held back and `Degraded` says why;
//! 2. every bound claim is asked for the new size (the class's resizer grows the
//!    volume; the file system grows when the kubelet next mounts it, or online);
//! 3. the StatefulSet is deleted with its pods orphaned, and the next apply makes it
//!    again with the new template. It adopts the running pods, whose template did not
//!    change, so no broker restarts.
//!
//! Each step is safe to repeat, so an operator that stops between them finishes the
//! job on its next reconciliation: the layout on the StatefulSet (and in the status)
//! records the new size only once the StatefulSet is made with it.
//! `Progressing` says which claims have not reached the size yet.

use super::{Context, Error, EventReason, publish};
use crate::crd::{Queue, quantity_bytes};
use crate::layout::Plan;
use crate::resources;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::runtime::events::EventType;
use serde_json::json;
use std::collections::BTreeMap;
use tracing::info;

/// What the reconciliation does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Apply the owned objects.
    Apply,
    /// The StatefulSet is being deleted (orphaning its pods): apply once it is gone.
    AwaitStatefulSet,
}

/// Expands the claims of a growing Queue and deletes its StatefulSet, orphaning the
/// pods, or holds the growth back when a StorageClass cannot carry it.
pub async fn grow(
    ctx: &Context,
    q: &Queue,
    ns: &str,
    existing: Option<&StatefulSet>,
    plan: &mut Plan,
) -> Result<Next, Error> {
    if existing.is_some_and(|s| s.metadata.deletion_timestamp.is_some()) {
        return Ok(Next::AwaitStatefulSet);
    }
    let Some(growth) = plan.grows.clone() else {
        return Ok(Next::Apply);
    };
    let name = q.name_any();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let claims = pvcs
        .list(&ListParams::default().labels(&resources::queue_selector(&name)))
        .await?
        .items;
    if let Some(why) = not_expandable(ctx, &claims).await? {
        plan.hold_size(why);
        return Ok(Next::Apply);
    }
    let to = quantity_bytes(&growth.to);
    for claim in &claims {
        if !is_bound(claim) || claim.metadata.deletion_timestamp.is_some() {
            // The API server resizes bound claims only; an unbound one has no data.
            continue;
        }
        if resources::requested_size(claim).and_then(|r| quantity_bytes(&r)) < to {
            pvcs.patch(
                &claim.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": growth.to}}}})),
            )
            .await?;
            info!(queue = %name, %ns, pvc = %claim.name_any(), size = %growth.to, "expanding volume claim");
        }
    }
    let template_size = existing
        .and_then(|s| {
            s.spec
                .as_ref()?
                .volume_claim_templates
                .as_ref()?
                .first()
                .cloned()
        })
        .and_then(|t| resources::requested_size(&t));
    if existing.is_some() && template_size.as_deref() != Some(growth.to.as_str()) {
        let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
        let orphan = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Orphan),
            ..Default::default()
        };
        match sts.delete(&resources::sts_name(&name), &orphan).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        publish(
            ctx,
            q,
            EventType::Normal,
            EventReason::VolumesGrowing,
            "Grow",
            &format!(
                "volumes growing from {} to {}: claims expanded; the StatefulSet is made again with the new size around the running brokers",
                growth.from, growth.to
            ),
        )
        .await;
        return Ok(Next::AwaitStatefulSet);
    }
    Ok(Next::Apply)
}

/// Why the claims cannot grow: a claim without a StorageClass, a class that is gone,
/// or one without `allowVolumeExpansion`. None when every claim can.
async fn not_expandable(
    ctx: &Context,
    claims: &[PersistentVolumeClaim],
) -> Result<Option<String>, Error> {
    let classes: Api<StorageClass> = Api::all(ctx.client.clone());
    let mut seen = BTreeMap::new();
    for claim in claims {
        let Some(class) = claim
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.clone())
            .filter(|c| !c.is_empty())
        else {
            return Ok(Some(format!(
                "volume claim {} has no StorageClass, and only volumes of a class that allows expansion can grow",
                claim.name_any()
            )));
        };
        if !seen.contains_key(&class) {
            let allows = classes
                .get_opt(&class)
                .await?
                .map(|c| c.allow_volume_expansion == Some(true));
            seen.insert(class.clone(), allows);
        }
        match seen[&class] {
            Some(true) => {}
            Some(false) => {
                return Ok(Some(format!(
                    "StorageClass {class} does not allow volume expansion (allowVolumeExpansion is not true)"
                )));
            }
            None => {
                return Ok(Some(format!(
                    "StorageClass {class} of volume claim {} does not exist",
                    claim.name_any()
                )));
            }
        }
    }
    Ok(None)
}

fn is_bound(claim: &PersistentVolumeClaim) -> bool {
    claim
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Bound")
}

/// Bound claims of the Queue whose volume has not reached `size`: each as
/// `name (capacity)`, for `Progressing`.
pub async fn short_of(
    ctx: &Context,
    ns: &str,
    queue: &str,
    size: &str,
) -> Result<Vec<String>, Error> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let claims = pvcs
        .list(&ListParams::default().labels(&resources::queue_selector(queue)))
        .await?
        .items;
    let want = quantity_bytes(size);
    Ok(claims
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none() && is_bound(c))
        .filter_map(|c| {
            let capacity = c
                .status
                .as_ref()
                .and_then(|s| s.capacity.as_ref())
                .and_then(|c| c.get("storage"))
                .map(|q| q.0.clone());
            let reached = capacity.as_deref().and_then(quantity_bytes) >= want;
            (!reached).then(|| {
                format!(
                    "{} ({})",
                    c.name_any(),
                    capacity.as_deref().unwrap_or("no capacity yet")
                )
            })
        })
        .collect())
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
    use std::time::Duration;

    /// The Queue asks for 2Gi; its StatefulSet records volumes of 1Gi.
    fn growing() -> (Queue, k8s_openapi::api::apps::v1::StatefulSet) {
        let q = Queue::test(json!({
            "replicas": 3, "replication": 1,
            "storage": { "size": "2Gi", "storageClassName": "standard" }
        }));
        let mut held = q.spec.clone();
        held.storage.size = "1Gi".into();
        let hash = settings::render(NAME, NS, &held, true, None).unwrap().hash;
        let mut old = existing_sts(3, &hash);
        old.metadata.annotations = Some(
            [(
                resources::LAYOUT_ANNOTATION.to_string(),
                serde_json::to_string(&Layout::of(&held)).unwrap(),
            )]
            .into(),
        );
        (q, old)
    }

    #[tokio::test]
    async fn growing_volumes_expands_the_claims_and_orphans_the_brokers() {
        let (q, old) = growing();
        let scenario = Scenario::GrowVolumes {
            old,
            class_allows: true,
        };
        let (res, _) = reconcile_with(q, scenario).await;
        // Back within a second to make the StatefulSet again.
        assert_eq!(res.unwrap(), Action::requeue(Duration::from_secs(1)));
    }

    #[tokio::test]
    async fn a_class_without_expansion_holds_the_size_and_says_why() {
        let (q, old) = growing();
        let scenario = Scenario::GrowVolumes {
            old,
            class_allows: false,
        };
        let (res, _) = reconcile_with(q, scenario).await;
        assert_eq!(res.unwrap(), Action::requeue(RESYNC_HEALTHY));
    }
}
