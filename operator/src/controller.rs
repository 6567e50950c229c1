//! The Queue reconciler (kube-runtime `Controller`).

use crate::crd::{DeletionPolicy, Queue, QueueStatus};
use crate::metrics::Metrics;
use crate::resources::{self, Defaults};
use crate::settings;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

pub const FIELD_MANAGER: &str = "sluice-operator";
pub const FINALIZER: &str = "sluice.dev/delete-volumes";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serializing {0}")]
    Json(#[from] serde_json::Error),
    #[error("Queue has no namespace")]
    NoNamespace,
    #[error(
        "spec.access needs the brokers to review tokens, but the operator was given no ClusterRoleBinding to add them to (--token-review-binding; the chart sets it)"
    )]
    NoTokenReviewBinding,
    #[error(
        "ClusterRoleBinding {0} (for the brokers' TokenReviews) does not exist; the chart creates it"
    )]
    TokenReviewBindingMissing(String),
    #[error("data-plane certificates: {0}")]
    Certs(#[from] crate::tls::TlsError),
}

/// Lets the brokers of a Queue with an access list review callers' tokens: their
/// own ServiceAccount, added to the chart's binding to `system:auth-delegator`.
/// (One shared binding rather than one per Queue: a cluster-scoped object cannot be
/// owned by a Queue, so per-Queue bindings would need a finalizer to be removed.)
async fn grant_token_review(
    ctx: &Context,
    q: &Queue,
    ns: &str,
    pp: &PatchParams,
) -> Result<(), Error> {
    let name = q.name_any();
    let sa_api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), ns);
    sa_api
        .patch(
            &resources::broker_sa_name(&name),
            pp,
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

/// State shared by reconciliations.
pub struct Context {
    pub client: Client,
    pub defaults: Defaults,
    pub pdb: ApiResource,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Issues the brokers' certificates; None when the data plane runs without TLS.
    pub certs: Option<Arc<crate::tls::DataPlaneCerts>>,
}

/// Finds which PodDisruptionBudget version the server serves (policy/v1 from
/// Kubernetes 1.21, policy/v1beta1 before).
pub async fn pdb_resource(client: &Client) -> Result<ApiResource, kube::Error> {
    let groups = client.list_api_groups().await?;
    let policy = groups.groups.iter().find(|g| g.name == "policy");
    let has_v1 = policy.is_some_and(|g| g.versions.iter().any(|v| v.version == "v1"));
    let version = if has_v1 {
        // policy/v1 exists from 1.21 but check the resource is really there.
        let res = client.list_api_group_resources("policy/v1").await?;
        if res
            .resources
            .iter()
            .any(|r| r.name == "poddisruptionbudgets")
        {
            "v1"
        } else {
            "v1beta1"
        }
    } else {
        "v1beta1"
    };
    Ok(ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("policy", version, "PodDisruptionBudget"),
        "poddisruptionbudgets",
    ))
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (queues, sts, svc, cm) = match &namespace {
        Some(ns) => (
            Api::<Queue>::namespaced(client.clone(), ns),
            Api::<StatefulSet>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
            Api::<ConfigMap>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::<Queue>::all(client.clone()),
            Api::<StatefulSet>::all(client.clone()),
            Api::<Service>::all(client.clone()),
            Api::<ConfigMap>::all(client.clone()),
        ),
    };
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=sluice-operator");
    Controller::new(queues, watcher::Config::default())
        .owns(sts, owned.clone())
        .owns(svc, owned.clone())
        .owns(cm, owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => {
                    tracing::debug!(queue = %obj.name, ns = ?obj.namespace, "reconciled")
                }
                Err(e) => warn!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

fn error_policy(q: Arc<Queue>, err: &Error, ctx: Arc<Context>) -> Action {
    warn!(queue = %q.name_any(), ns = ?q.namespace(), error = %err, "reconcile error; retrying");
    ctx.metrics.reconcile_errors.inc();
    Action::requeue(Duration::from_secs(10))
}

async fn reconcile(q: Arc<Queue>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer();
    let res = reconcile_inner(&q, &ctx).await;
    ctx.metrics
        .reconciliations
        .get_or_create(&crate::metrics::ResultLabel {
            result: if res.is_ok() { "ok" } else { "error" }.into(),
        })
        .inc();
    if let Err(e) = &res {
        // Tell the user, best effort: the error policy retries with a delay.
        let msg = e.to_string();
        let _ = publish(
            &ctx,
            &q,
            EventType::Warning,
            "ReconcileError",
            "Reconcile",
            &msg,
        )
        .await;
        let mut status = q.status.clone().unwrap_or_default();
        set_condition(
            &mut status,
            "Degraded",
            true,
            "ReconcileError",
            &msg,
            q.metadata.generation,
        );
        let _ = patch_status(&ctx, &q, status).await;
    }
    res
}

async fn reconcile_inner(q: &Queue, ctx: &Context) -> Result<Action, Error> {
    let ns = q.namespace().ok_or(Error::NoNamespace)?;
    let name = q.name_any();
    let client = ctx.client.clone();
    let queues: Api<Queue> = Api::namespaced(client.clone(), &ns);

    // Deletion: only a Queue with deletionPolicy Delete carries our finalizer.
    if q.metadata.deletion_timestamp.is_some() {
        if q.finalizers().iter().any(|f| f == FINALIZER) {
            let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
            let sel = format!("{}={}", resources::QUEUE_LABEL, name);
            let list = pvcs.list(&ListParams::default().labels(&sel)).await?;
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
                "VolumesDeleted",
                "Delete",
                &format!(
                    "deleted {} PersistentVolumeClaim(s) (deletionPolicy Delete)",
                    list.items.len()
                ),
            )
            .await;
            remove_finalizer(&queues, q).await?;
        }
        return Ok(Action::await_change());
    }

    // Finalizer only when deletion needs work.
    let wants_finalizer = q.spec.deletion_policy == DeletionPolicy::Delete;
    let has_finalizer = q.finalizers().iter().any(|f| f == FINALIZER);
    if wants_finalizer && !has_finalizer {
        let mut f = q.finalizers().to_vec();
        f.push(FINALIZER.into());
        set_finalizers(&queues, q, f).await?;
        // The update triggers another reconcile.
        return Ok(Action::await_change());
    }
    if !wants_finalizer && has_finalizer {
        remove_finalizer(&queues, q).await?;
        return Ok(Action::await_change());
    }

    let mut status = q.status.clone().unwrap_or_default();
    let generation = q.metadata.generation;
    status.address = Some(resources::address(&name, &ns, &ctx.defaults.cluster_domain));

    // Semantic validation: refuse to run what the schema could not check.
    if let Err(e) = settings::validate(&q.spec) {
        let msg = e.to_string();
        let already = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.reason == "InvalidSpec" && c.message == msg);
        set_condition(&mut status, "Ready", false, "InvalidSpec", &msg, generation);
        set_condition(
            &mut status,
            "Degraded",
            true,
            "InvalidSpec",
            &msg,
            generation,
        );
        set_condition(
            &mut status,
            "Progressing",
            false,
            "InvalidSpec",
            "nothing is applied until the spec is fixed",
            generation,
        );
        status.observed_generation = generation;
        patch_status(ctx, q, status).await?;
        if !already {
            publish(ctx, q, EventType::Warning, "InvalidSpec", "Validate", &msg).await;
        }
        ctx.metrics.invalid_specs.inc();
        return Ok(Action::await_change());
    }

    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let sts_name = resources::sts_name(&name);
    let existing = sts_api.get_opt(&sts_name).await?;

    // Scaling down would orphan the partitions of the removed pods: refuse.
    let current = existing
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas);
    let mut replicas = q.spec.replicas;
    let mut blocked = None;
    if let Some(cur) = current
        && q.spec.replicas < cur
    {
        replicas = cur;
        blocked = Some(format!(
            "scale-down from {cur} to {} refused: brokers {}..{} own partitions whose messages would be lost (partition data cannot move between brokers yet); staying at {cur} replicas",
            q.spec.replicas,
            q.spec.replicas,
            cur - 1
        ));
    }

    let rendered = settings::render(&name, &ns, &q.spec, replicas).expect("validated above");
    let pp = PatchParams::apply(FIELD_MANAGER).force();

    if !q.spec.access.service_accounts.is_empty() {
        grant_token_review(ctx, q, &ns, &pp).await?;
    }

    let cm_api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    cm_api
        .patch(
            &resources::cm_name(&name),
            &pp,
            &Patch::Apply(resources::config_map(q, &rendered.toml)),
        )
        .await?;
    let svc_api: Api<Service> = Api::namespaced(client.clone(), &ns);
    svc_api
        .patch(
            &resources::svc_name(&name),
            &pp,
            &Patch::Apply(resources::service(q)),
        )
        .await?;
    let mut desired = resources::stateful_set(q, &ctx.defaults, replicas, &rendered.hash);
    if let Some(certs) = &ctx.certs {
        let secret = resources::tls_secret_name(&name);
        let fingerprint = certs
            .broker_secret(
                &name,
                &ns,
                &secret,
                resources::owned_meta(q, secret.clone()),
                &ctx.defaults.cluster_domain,
            )
            .await?;
        resources::with_tls(&mut desired, &name, &fingerprint);
    }
    let applied = sts_api
        .patch(&sts_name, &pp, &Patch::Apply(&desired))
        .await?;
    let pdb_api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ctx.pdb);
    let pdb = resources::pdb(q, &ctx.pdb.api_version);
    pdb_api
        .patch(&resources::pdb_name(&name), &pp, &Patch::Apply(pdb))
        .await?;

    // Events for what changed.
    match &existing {
        None => {
            publish(
                ctx,
                q,
                EventType::Normal,
                "Created",
                "Apply",
                &format!(
                    "created StatefulSet, Service {sts_name}, ConfigMap {} and PodDisruptionBudget",
                    resources::cm_name(&name)
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
                .and_then(|a| a.get(resources::HASH_ANNOTATION))
                .cloned();
            if old_hash.as_deref() != Some(rendered.hash.as_str()) {
                publish(
                    ctx,
                    q,
                    EventType::Normal,
                    "RollingUpdate",
                    "Apply",
                    &format!(
                        "broker settings changed (hash {}): rolling the brokers",
                        rendered.hash
                    ),
                )
                .await;
            }
            if current != Some(replicas) {
                publish(
                    ctx,
                    q,
                    EventType::Normal,
                    "Scaled",
                    "Apply",
                    &format!("scaled from {} to {replicas} brokers", current.unwrap_or(0)),
                )
                .await;
            }
        }
    }
    if let Some(msg) = &blocked {
        let already = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.reason == "ScaleDownBlocked" && c.status == "True");
        if !already {
            publish(ctx, q, EventType::Warning, "ScaleDownBlocked", "Scale", msg).await;
        }
    }

    // Status from what the StatefulSet and its pods report.
    let ss = applied.status.clone().unwrap_or_default();
    let ready = ss.ready_replicas.unwrap_or(0);
    let updated = ss.updated_replicas.unwrap_or(0);
    let sts_generation_seen =
        ss.observed_generation.unwrap_or(0) >= applied.metadata.generation.unwrap_or(0);
    status.replicas = Some(replicas);
    status.ready_replicas = Some(ready);
    status.config_hash = Some(rendered.hash.clone());
    status.endpoints = (0..replicas)
        .map(|i| {
            format!(
                "{sts_name}-{i}.{}.{ns}.svc.{}:{}",
                resources::svc_name(&name),
                ctx.defaults.cluster_domain,
                resources::GRPC_PORT
            )
        })
        .collect();
    status.observed_generation = generation;

    let rolled = sts_generation_seen && updated >= replicas && ss.replicas <= replicas;
    if rolled {
        set_condition(
            &mut status,
            "Progressing",
            false,
            "RolloutComplete",
            &format!("{replicas} broker(s) run the current settings"),
            generation,
        );
    } else {
        set_condition(
            &mut status,
            "Progressing",
            true,
            "RollingOut",
            &format!(
                "{updated}/{replicas} broker(s) run the current settings (hash {})",
                rendered.hash
            ),
            generation,
        );
    }
    if ready >= replicas {
        set_condition(
            &mut status,
            "Ready",
            true,
            "AllBrokersReady",
            &format!("{ready}/{replicas} brokers ready"),
            generation,
        );
    } else {
        let why = pods_summary(ctx, &ns, &name).await;
        set_condition(
            &mut status,
            "Ready",
            false,
            "BrokersNotReady",
            &format!("{ready}/{replicas} brokers ready; {why}"),
            generation,
        );
    }
    match &blocked {
        Some(msg) => set_condition(
            &mut status,
            "Degraded",
            true,
            "ScaleDownBlocked",
            msg,
            generation,
        ),
        None => set_condition(
            &mut status,
            "Degraded",
            false,
            "AsExpected",
            "all owned objects applied",
            generation,
        ),
    }
    patch_status(ctx, q, status).await?;
    ctx.metrics.queues_reconciled.inc();

    // Pods come and go without touching what we watch when no kubelet reports
    // status; poll while not ready, and resync now and then to repair PDB drift.
    if ready >= replicas && rolled {
        Ok(Action::requeue(Duration::from_secs(300)))
    } else {
        Ok(Action::requeue(Duration::from_secs(15)))
    }
}

/// Describes why pods are not ready ("3 Pending: no node is available to run them").
async fn pods_summary(ctx: &Context, ns: &str, queue: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let sel = format!("{}={}", resources::QUEUE_LABEL, queue);
    let list = match pods.list(&ListParams::default().labels(&sel)).await {
        Ok(l) => l,
        Err(e) => return format!("pods unknown ({e})"),
    };
    if list.items.is_empty() {
        return "no broker pod exists yet (the StatefulSet controller creates them)".into();
    }
    let mut pending = 0;
    let mut unscheduled = None;
    let mut other = Vec::new();
    for p in &list.items {
        let st = p.status.clone().unwrap_or_default();
        let phase = st.phase.unwrap_or_else(|| "Unknown".into());
        if phase == "Pending" {
            pending += 1;
            if let Some(c) = st
                .conditions
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            {
                unscheduled = Some(c.message.unwrap_or_default());
            } else if p.spec.as_ref().and_then(|s| s.node_name.clone()).is_some()
                && unscheduled.is_none()
            {
                unscheduled = Some("scheduled, waiting for the node to start it".into());
            }
        } else {
            other.push(format!("{}: {phase}", p.name_any()));
        }
    }
    let mut s = String::new();
    if pending > 0 {
        s.push_str(&format!("{pending} pod(s) Pending"));
        match unscheduled {
            Some(m) if !m.is_empty() => s.push_str(&format!(" ({m})")),
            _ => s.push_str(" (not scheduled: no node has taken them yet)"),
        }
    }
    if !other.is_empty() {
        if !s.is_empty() {
            s.push_str("; ");
        }
        s.push_str(&other.join(", "));
    }
    s
}

/// Sets a condition, keeping lastTransitionTime when the status did not change.
pub fn set_condition(
    status: &mut QueueStatus,
    type_: &str,
    value: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let v = if value { "True" } else { "False" };
    let now = Time(Timestamp::now());
    match status.conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != v {
                c.last_transition_time = now;
            }
            c.status = v.into();
            c.reason = reason.into();
            c.message = message.into();
            c.observed_generation = generation;
        }
        None => status.conditions.push(Condition {
            type_: type_.into(),
            status: v.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: generation,
            last_transition_time: now,
        }),
    }
}

async fn patch_status(ctx: &Context, q: &Queue, status: QueueStatus) -> Result<(), Error> {
    if q.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<Queue> = Api::namespaced(ctx.client.clone(), &q.namespace().unwrap_or_default());
    api.patch_status(
        &q.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

async fn set_finalizers(api: &Api<Queue>, q: &Queue, f: Vec<String>) -> Result<(), Error> {
    // resourceVersion makes the merge patch fail on a concurrent change instead of
    // clobbering another controller's finalizer.
    api.patch(
        &q.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({
            "metadata": { "finalizers": f, "resourceVersion": q.resource_version() }
        })),
    )
    .await?;
    Ok(())
}

async fn remove_finalizer(api: &Api<Queue>, q: &Queue) -> Result<(), Error> {
    let f: Vec<String> = q
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    set_finalizers(api, q, f).await
}

async fn publish(
    ctx: &Context,
    q: &Queue,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &q.object_ref(&())).await {
        warn!(error = %e, reason, "could not publish event");
    }
}

/// Builds the event recorder.
pub fn recorder(client: Client, instance: Option<String>) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        },
    )
}

/// Ensures the CRD exists (used by tests and `sluice-operator install-crd`).
pub async fn apply_crd(client: &Client) -> Result<(), Error> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(
        "queues.sluice.dev",
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(Queue::crd()),
    )
    .await?;
    Ok(())
}
