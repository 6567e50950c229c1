//! The Queue reconciler (kube-runtime `Controller`).
//!
//! [`run`] wires the controller (Queues, and the StatefulSets, Services and
//! ConfigMaps they own). A reconciliation goes through kube's finalizer helper when
//! the Queue needs the finalizer (`deletionPolicy: Delete`, or it still carries it):
//! [`cleanup`](cleanup::cleanup) on deletion, else the steps of [`apply`]:
//! [`validate`](validate::validate), the layout [`guard`], the applies
//! ([`apply`](mod@apply)), the Events, and the [`status`] with conditions computed by
//! [`conditions::compute`].

pub mod apply;
pub mod cleanup;
pub mod conditions;
#[cfg(test)]
mod fixtures;
pub mod guard;
pub mod moves;
pub mod partitions;
pub mod status;
pub mod validate;
pub mod volumes;

use crate::crd::{DeletionPolicy, Queue, QueueStatus};
use crate::metrics::{ErrorLabel, Metrics};
use crate::resources::{self, Defaults};
use crate::settings;
use conditions::Observed;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, GroupVersionKind, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;
use validate::Validation;

pub const FIELD_MANAGER: &str = "sluice-operator";
pub const FINALIZER: &str = "sluice.dev/delete-volumes";
/// Delay before a failed reconciliation is retried.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);
/// The longest one reconciliation may take. Each step is short (API calls, broker
/// reports bounded at 2 s); one that hangs (a stuck connection waits out the
/// client's 295 s read timeout) would otherwise hold the Queue's reconciliations
/// back, as kube's controller runs one at a time per object, and no trigger could
/// start another. Cut, it fails and is retried like any error.
pub const RECONCILE_TIMEOUT: Duration = Duration::from_secs(60);

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
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// The spec passed validation but the one carried out (with refused changes held
    /// back) did not: a bug, as every plan of a valid spec is valid.
    #[error("the spec carried out, with refused changes held back: {0}")]
    Settings(crate::settings::SpecError),
    #[error(
        "the reconciliation did not finish within {0:?} (cut and retried; its last step is in the debug log)"
    )]
    TimedOut(Duration),
}

impl Error {
    /// The `error` label of `sluice_operator_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Json(_) => "json",
            Error::NoNamespace => "no_namespace",
            Error::NoTokenReviewBinding => "no_token_review_binding",
            Error::TokenReviewBindingMissing(_) => "token_review_binding_missing",
            Error::Certs(_) => "certs",
            Error::Finalizer(_) => "finalizer",
            Error::Settings(_) => "settings",
            Error::TimedOut(_) => "timed_out",
        }
    }
}

impl From<finalizer::Error<Error>> for Error {
    /// The step's own error when a step failed (so messages read as they would
    /// without the helper); the API error when the finalizer patch failed.
    fn from(e: finalizer::Error<Error>) -> Self {
        match e {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e) => {
                Error::Kube(e)
            }
            other => Error::Finalizer(other.to_string()),
        }
    }
}

/// The reasons of the Events the reconciler publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventReason {
    Created,
    RollingUpdate,
    Scaled,
    /// A change of the spec held back (the `Degraded` condition's reason).
    Refused(conditions::Reason),
    InvalidSpec,
    ReconcileError,
    VolumesDeleted,
    VolumesGrowing,
    /// Partition copies started moving onto other brokers.
    PartitionsMoving,
    /// Every partition's copies moved.
    PartitionsMoved,
}

impl EventReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EventReason::Created => "Created",
            EventReason::RollingUpdate => "RollingUpdate",
            EventReason::Scaled => "Scaled",
            EventReason::Refused(reason) => reason.as_str(),
            EventReason::InvalidSpec => "InvalidSpec",
            EventReason::ReconcileError => "ReconcileError",
            EventReason::VolumesDeleted => "VolumesDeleted",
            EventReason::VolumesGrowing => "VolumesGrowing",
            EventReason::PartitionsMoving => "PartitionsMoving",
            EventReason::PartitionsMoved => "PartitionsMoved",
        }
    }
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
    /// Asks the brokers for their partition reports.
    pub brokers: partitions::BrokerClient,
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
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabel {
            error: err.metric_label().into(),
        })
        .inc();
    Action::requeue(RETRY_AFTER)
}

/// One reconciliation: counted and timed; a failure is reported on the Queue
/// (Warning Event, `Degraded=True ReconcileError`) before the error policy retries.
pub async fn reconcile(q: Arc<Queue>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer();
    let res = tokio::time::timeout(RECONCILE_TIMEOUT, reconcile_queue(q.clone(), &ctx))
        .await
        .unwrap_or(Err(Error::TimedOut(RECONCILE_TIMEOUT)));
    ctx.metrics
        .reconciliations
        .get_or_create(&crate::metrics::ResultLabel {
            result: if res.is_ok() { "ok" } else { "error" }.into(),
        })
        .inc();
    if let Err(e) = &res {
        // Tell the user, best effort: the error policy retries with a delay.
        let msg = e.to_string();
        publish(
            &ctx,
            &q,
            EventType::Warning,
            EventReason::ReconcileError,
            "Reconcile",
            &msg,
        )
        .await;
        let mut status = q.status.clone().unwrap_or_default();
        conditions::merge(
            &mut status,
            conditions::compute(&Observed::Failed { error: &msg }),
            q.metadata.generation,
            &now(),
        );
        let _ = patch_status(&ctx, &q, status).await;
    }
    res
}

/// The reconcile/cleanup split. Only a Queue with `deletionPolicy: Delete` carries
/// the finalizer (kube's helper adds it, runs [`cleanup`](cleanup::cleanup) on
/// deletion and then releases it); switching back to `Retain` removes it; without it
/// a deleted Queue is left to the garbage collector.
async fn reconcile_queue(q: Arc<Queue>, ctx: &Context) -> Result<Action, Error> {
    let ns = q.namespace().ok_or(Error::NoNamespace)?;
    let queues: Api<Queue> = Api::namespaced(ctx.client.clone(), &ns);
    let wants_finalizer = q.spec.deletion_policy == DeletionPolicy::Delete;
    let has_finalizer = q.finalizers().iter().any(|f| f == FINALIZER);
    let deleting = q.metadata.deletion_timestamp.is_some();
    if !wants_finalizer && has_finalizer && !deleting {
        remove_finalizer(&queues, &q).await?;
        // The update triggers another reconcile.
        return Ok(Action::await_change());
    }
    if wants_finalizer || has_finalizer {
        finalizer(&queues, FINALIZER, q, |event| async move {
            match event {
                finalizer::Event::Apply(q) => apply(&q, ctx).await,
                finalizer::Event::Cleanup(q) => cleanup::cleanup(&q, ctx).await,
            }
        })
        .await
        .map_err(Error::from)
    } else if deleting {
        Ok(Action::await_change())
    } else {
        apply(&q, ctx).await
    }
}

/// The steps of a live Queue: validate, guard the layout, apply, announce, report.
async fn apply(q: &Queue, ctx: &Context) -> Result<Action, Error> {
    let ns = q.namespace().ok_or(Error::NoNamespace)?;
    let name = q.name_any();
    let mut status = q.status.clone().unwrap_or_default();
    status.address = Some(resources::address(&name, &ns, &ctx.defaults.cluster_domain));

    if validate::validate(ctx, q, &status).await? == Validation::Invalid {
        return Ok(Action::await_change());
    }
    let step =
        |step: &'static str| tracing::debug!(queue = %name, ns = %ns, step, "reconcile step");
    step("guard");
    let existing = guard::existing(ctx, &ns, &name).await?;
    let mut scale = guard::check(q, existing.as_ref());
    moves::wait_for_rollout(ctx, q, &ns, existing.as_ref(), &mut scale).await?;
    step("volumes");
    if volumes::grow(ctx, q, &ns, existing.as_ref(), &mut scale.plan).await?
        == volumes::Next::AwaitStatefulSet
    {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    step("moves");
    let moving = moves::follow(ctx, q, &ns, &mut scale.plan).await?;
    // What is applied: the Queue with the refused changes held back.
    let carried = Queue {
        spec: scale.plan.spec.clone(),
        ..q.clone()
    };
    let (raft, placed) = (scale.plan.layout.raft, scale.plan.placed.as_ref());
    let rendered =
        settings::render(&name, &ns, &carried.spec, raft, placed).map_err(Error::Settings)?;
    step("apply");
    let applied = apply::apply_all(ctx, &carried, &ns, &rendered, &scale.plan.layout).await?;
    step("announce");
    moves::release_claims(ctx, q, &ns, &scale.plan).await?;
    apply::announce(ctx, q, existing.as_ref(), &scale, &rendered).await;
    guard::announce(ctx, q, &status, &scale).await;
    if status::rollout(&applied, &scale, &rendered).rolled() {
        let current = resources::cm_name(&name, &rendered.hash);
        apply::prune_config_maps(ctx, q, &ns, &current).await?;
    }
    step("report");
    status::report(ctx, q, status, &applied, &scale, &rendered, moving).await
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// Patches the status, unless it is what the Queue already has.
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

/// Removes our finalizer (Delete switched back to Retain).
async fn remove_finalizer(api: &Api<Queue>, q: &Queue) -> Result<(), Error> {
    let f: Vec<String> = q
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
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

/// Publishes an Event about the Queue, best effort (a failure is logged).
async fn publish(
    ctx: &Context,
    q: &Queue,
    type_: EventType,
    reason: EventReason,
    action: &str,
    note: &str,
) {
    let ev = Event {
        type_,
        reason: reason.as_str().into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &q.object_ref(&())).await {
        warn!(error = %e, reason = reason.as_str(), "could not publish event");
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

#[cfg(test)]
mod tests {
    use super::fixtures::{Scenario, reconcile_with};
    use super::*;
    use crate::metrics::ErrorLabel;

    #[tokio::test]
    async fn delete_policy_adds_the_finalizer_first() {
        let q = Queue::test(json!({ "deletionPolicy": "Delete" }));
        let (res, _) = reconcile_with(q, Scenario::AddFinalizer).await;
        assert_eq!(res.unwrap(), Action::await_change());
    }

    #[tokio::test]
    async fn retain_policy_removes_only_our_finalizer() {
        let mut q = Queue::test(json!({}));
        q.metadata.finalizers = Some(vec!["other.example/keep".into(), FINALIZER.into()]);
        let (res, _) = reconcile_with(q, Scenario::RemoveFinalizer).await;
        assert_eq!(res.unwrap(), Action::await_change());
    }

    #[tokio::test]
    async fn a_deleted_queue_without_finalizer_is_left_to_the_garbage_collector() {
        let q = Queue::test(json!({})).deleting();
        let (res, _) = reconcile_with(q, Scenario::Quiet).await;
        assert_eq!(res.unwrap(), Action::await_change());
    }

    #[tokio::test]
    async fn a_failed_apply_is_reported_on_the_queue_and_counted() {
        let (res, metrics) = reconcile_with(Queue::test(json!({})), Scenario::ApplyFails).await;
        let err = res.unwrap_err();
        assert_eq!(err.metric_label(), "kube");
        assert_eq!(
            metrics
                .reconciliations
                .get_or_create(&crate::metrics::ResultLabel {
                    result: "error".into()
                })
                .get(),
            1
        );
        // The error policy counts by kind and retries.
        let (ctx, _verifier) = Context::test(&Queue::test(json!({})));
        let action = error_policy(Arc::new(Queue::test(json!({}))), &err, ctx.clone());
        assert_eq!(action, Action::requeue(RETRY_AFTER));
        let label = ErrorLabel {
            error: "kube".into(),
        };
        assert_eq!(ctx.metrics.reconcile_errors.get_or_create(&label).get(), 1);
    }

    /// Time is paused: the cut comes as soon as everything waits.
    #[tokio::test(start_paused = true)]
    async fn a_reconciliation_that_hangs_is_cut_and_reported() {
        let q = Queue::test(json!({}));
        let (ctx, verifier) = Context::test(&q);
        let metrics = ctx.metrics.clone();
        let server = tokio::spawn(verifier.run(Scenario::Hangs));
        let err = reconcile(Arc::new(q), ctx).await.unwrap_err();
        assert!(matches!(err, Error::TimedOut(RECONCILE_TIMEOUT)), "{err}");
        assert_eq!(err.metric_label(), "timed_out");
        server.await.unwrap();
        let result = crate::metrics::ResultLabel {
            result: "error".into(),
        };
        assert_eq!(metrics.reconciliations.get_or_create(&result).get(), 1);
    }

    #[test]
    fn finalizer_errors_keep_the_step_error() {
        let e: Error = finalizer::Error::ApplyFailed(Error::NoNamespace).into();
        assert!(matches!(e, Error::NoNamespace));
        let e: Error = finalizer::Error::<Error>::UnnamedObject.into();
        assert_eq!(e.metric_label(), "finalizer");
    }
}
