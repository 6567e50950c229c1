//! Step: the applies, in this order: the brokers' ServiceAccount and their place in
//! the TokenReview binding (only with an access list), the ConfigMap of the current
//! settings (a new one per version, see [`resources::cm_name`]), the headless
//! Service, the StatefulSet (with its TLS Secret when the data plane uses TLS) and
//! the PodDisruptionBudget. All by server-side apply, field manager `sluice-operator`,
//! forced. Then the Events for what changed.

use super::guard::Scale;
use super::{Context, Error, EventReason, FIELD_MANAGER, publish};
use crate::crd::Queue;
use crate::layout::Layout;
use crate::resources;
use crate::settings::BrokerSettings;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use tracing::info;

fn params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Applies every owned object of `q` (the Queue as carried out: refused changes
/// held back); answers the StatefulSet as the server has it.
pub async fn apply_all(
    ctx: &Context,
    q: &Queue,
    ns: &str,
    rendered: &BrokerSettings,
    layout: &Layout,
) -> Result<StatefulSet, Error> {
    if !q.spec.access.service_accounts.is_empty() {
        grant_token_review(ctx, q, ns).await?;
    }
    config_map(ctx, q, ns, rendered).await?;
    service(ctx, q, ns).await?;
    let applied = stateful_set(ctx, q, ns, rendered, layout).await?;
    pdb(ctx, q, ns).await?;
    Ok(applied)
}

/// Lets the brokers of a Queue with an access list review callers' tokens: their
/// own ServiceAccount, added to the chart's binding to `system:auth-delegator`.
/// (One shared binding rather than one per Queue: a cluster-scoped object cannot be
/// owned by a Queue, so per-Queue bindings would need a finalizer to be removed.)
async fn grant_token_review(ctx: &Context, q: &Queue, ns: &str) -> Result<(), Error> {
    let name = q.name_any();
    let sa_api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), ns);
    sa_api
        .patch(
            &resources::broker_sa_name(&name),
            &params(),
            &Patch::Apply(resources::service_account(q)),
        )
        .await?;
    let binding_name = ctx
        .defaults
        .token_review_binding
        .clone()
        .ok_or(Error::NoTokenReviewBinding)?;
    let api: Api<ClusterRoleBinding> = Api::all(ctx.client.clone());
    let binding = api
        .get_opt(&binding_name)
        .await?
        .ok_or_else(|| Error::TokenReviewBindingMissing(binding_name.clone()))?;
    // A replace carries the resourceVersion read: a concurrent change makes it fail
    // with a conflict, and the next reconcile reads again.
    if let Some(updated) = resources::with_broker_subject(binding, &name, ns) {
        api.replace(&binding_name, &PostParams::default(), &updated)
            .await?;
        info!(queue = %name, binding = %binding_name, "brokers may now review tokens");
    }
    Ok(())
}

async fn config_map(
    ctx: &Context,
    q: &Queue,
    ns: &str,
    rendered: &BrokerSettings,
) -> Result<(), Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    api.patch(
        &resources::cm_name(&q.name_any(), &rendered.hash),
        &params(),
        &Patch::Apply(resources::config_map(q, &rendered.toml, &rendered.hash)),
    )
    .await?;
    Ok(())
}

/// Deletes the settings ConfigMaps of the Queue other than `keep` (the current
/// version). Called only once every broker runs the current pod template, so no pod,
/// running or restarting, still names one of them.
pub async fn prune_config_maps(
    ctx: &Context,
    q: &Queue,
    ns: &str,
    keep: &str,
) -> Result<(), Error> {
    let name = q.name_any();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    let selector = format!("{}={name}", resources::QUEUE_LABEL);
    let prefix = resources::cm_prefix(&name);
    let owned = api.list(&ListParams::default().labels(&selector)).await?;
    for cm in owned.items {
        let old = cm.name_any();
        let ours = cm
            .owner_references()
            .iter()
            .any(|o| o.uid == q.uid().unwrap_or_default());
        if old != keep && old.starts_with(&prefix) && ours {
            match api.delete(&old, &DeleteParams::default()).await {
                Ok(_) => {
                    info!(queue = %name, configmap = %old, "deleted settings no broker runs any more")
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

async fn service(ctx: &Context, q: &Queue, ns: &str) -> Result<(), Error> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    api.patch(
        &resources::svc_name(&q.name_any()),
        &params(),
        &Patch::Apply(resources::service(q)),
    )
    .await?;
    Ok(())
}

async fn stateful_set(
    ctx: &Context,
    q: &Queue,
    ns: &str,
    rendered: &BrokerSettings,
    layout: &Layout,
) -> Result<StatefulSet, Error> {
    let name = q.name_any();
    let mut desired = resources::stateful_set(q, &ctx.defaults, &rendered.hash, layout);
    if let Some(certs) = &ctx.certs {
        let secret = resources::tls_secret_name(&name);
        let fingerprint = certs
            .broker_secret(
                &name,
                ns,
                &secret,
                resources::owned_meta(q, secret.clone()),
                &ctx.defaults.cluster_domain,
            )
            .await?;
        resources::with_tls(&mut desired, &name, &fingerprint);
    }
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api
        .patch(
            &resources::sts_name(&name),
            &params(),
            &Patch::Apply(&desired),
        )
        .await?)
}

async fn pdb(ctx: &Context, q: &Queue, ns: &str) -> Result<(), Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ctx.pdb);
    api.patch(
        &resources::pdb_name(&q.name_any()),
        &params(),
        &Patch::Apply(resources::pdb(q, &ctx.pdb.api_version)),
    )
    .await?;
    Ok(())
}

/// Events for what changed: `Created` for a new StatefulSet, else `RollingUpdate`
/// when the settings hash changed and `Scaled` when the replicas did.
pub async fn announce(
    ctx: &Context,
    q: &Queue,
    existing: Option<&StatefulSet>,
    scale: &Scale,
    rendered: &BrokerSettings,
) {
    let name = q.name_any();
    match existing {
        None => {
            publish(
                ctx,
                q,
                EventType::Normal,
                EventReason::Created,
                "Apply",
                &format!(
                    "created StatefulSet, Service {}, ConfigMap {} and PodDisruptionBudget",
                    resources::sts_name(&name),
                    resources::cm_name(&name, &rendered.hash)
                ),
            )
            .await
        }
        Some(old) => {
            let old_hash = old
                .spec
                .as_ref()
                .and_then(|s| s.template.metadata.as_ref())
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get(resources::HASH_ANNOTATION));
            if old_hash.map(String::as_str) != Some(rendered.hash.as_str()) {
                publish(
                    ctx,
                    q,
                    EventType::Normal,
                    EventReason::RollingUpdate,
                    "Apply",
                    &format!(
                        "broker settings changed (hash {}): rolling the brokers",
                        rendered.hash
                    ),
                )
                .await;
            }
            if scale.current != Some(scale.replicas()) {
                publish(
                    ctx,
                    q,
                    EventType::Normal,
                    EventReason::Scaled,
                    "Apply",
                    &format!(
                        "scaled from {} to {} brokers",
                        scale.current.unwrap_or(0),
                        scale.replicas()
                    ),
                )
                .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{Scenario, existing_sts, reconcile_with};
    use super::super::status::{RESYNC_BUSY, RESYNC_HEALTHY};
    use crate::crd::Queue;
    use kube::runtime::controller::Action;
    use serde_json::json;

    #[tokio::test]
    async fn a_new_queue_gets_its_objects_in_order_and_an_honest_status() {
        let (res, metrics) = reconcile_with(Queue::test(json!({})), Scenario::Create).await;
        assert_eq!(res.unwrap(), Action::requeue(RESYNC_BUSY));
        assert_eq!(metrics.queues_reconciled.get(), 1);
    }

    #[tokio::test]
    async fn changed_settings_and_more_partitions_roll() {
        // One copy, as the StatefulSet (from before the layout was recorded) holds.
        let q = Queue::test(json!({ "replicas": 3, "partitions": 8, "replication": 1 }));
        let scenario = Scenario::Update {
            old: existing_sts(3, "0000000000000000"),
            replicas: 3,
        };
        let (res, _) = reconcile_with(q, scenario).await;
        assert_eq!(res.unwrap(), Action::requeue(RESYNC_HEALTHY));
    }

    #[tokio::test]
    async fn an_access_list_adds_the_brokers_to_the_token_review_binding_first() {
        let q = Queue::test(json!({ "access": { "serviceAccounts": [{ "name": "app" }] } }));
        let (res, _) = reconcile_with(q, Scenario::AccessList).await;
        assert_eq!(res.unwrap(), Action::requeue(RESYNC_BUSY));
    }
}
