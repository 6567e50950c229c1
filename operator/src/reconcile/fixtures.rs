//! A mock API server for the reconciler's unit tests, in the style of kube-rs's
//! controller-rs: a `tower_test::mock::pair` behind a `kube::Client`, and one
//! [`Scenario`] per test that asserts the requests the reconciler makes (method,
//! path, query, patch type, body) in order and answers them as an API server would.
//! A request beyond the scenario fails the test, and so does a missing one.

use super::{Context, Error, FIELD_MANAGER, FINALIZER, reconcile};
use crate::crd::{Queue, QueueSpec, QueueStatus};
use crate::metrics::Metrics;
use crate::resources::Defaults;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{ApiResource, GroupVersionKind};
use kube::client::Body;
use kube::runtime::controller::Action;
use serde::Serialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tower_test::mock::{self, Handle, SendResponse};

pub const NS: &str = "shop";
pub const NAME: &str = "orders";
pub const BINDING: &str = "sluice-broker-token-review";
const QUEUE_PATH: &str = "/apis/sluice.dev/v1alpha1/namespaces/shop/queues/orders";
const STS_PATH: &str = "/apis/apps/v1/namespaces/shop/statefulsets/sluice-orders";
const CMS_PATH: &str = "/api/v1/namespaces/shop/configmaps";
const SVC_PATH: &str = "/api/v1/namespaces/shop/services/sluice-orders";
const PDB_PATH: &str = "/apis/policy/v1/namespaces/shop/poddisruptionbudgets/sluice-orders";
const SA_PATH: &str = "/api/v1/namespaces/shop/serviceaccounts/sluice-orders-broker";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";
const PODS_PATH: &str = "/api/v1/namespaces/shop/pods";
const PVCS_PATH: &str = "/api/v1/namespaces/shop/persistentvolumeclaims";

impl Queue {
    /// Queue `orders` in `shop` with the given spec (JSON, defaults for the rest).
    pub fn test(spec: Value) -> Queue {
        let spec: QueueSpec = serde_json::from_value(spec).expect("valid spec");
        let mut q = Queue::new(NAME, spec);
        q.metadata.namespace = Some(NS.into());
        q.metadata.uid = Some("0b7c2a4e".into());
        q.metadata.generation = Some(1);
        q.metadata.resource_version = Some("100".into());
        q
    }

    pub fn finalized(mut self) -> Queue {
        self.metadata
            .finalizers
            .get_or_insert_with(Vec::new)
            .push(FINALIZER.into());
        self
    }

    pub fn deleting(mut self) -> Queue {
        self.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(1_000).unwrap()));
        self
    }

    pub fn with_status(mut self, status: QueueStatus) -> Queue {
        self.status = Some(status);
        self
    }
}

/// An existing StatefulSet of the Queue: `replicas`, pod template hash `hash`.
pub fn existing_sts(replicas: i32, hash: &str) -> StatefulSet {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": { "name": "sluice-orders", "namespace": NS, "generation": 1 },
        "spec": {
            "replicas": replicas,
            "serviceName": "sluice-orders",
            "selector": { "matchLabels": { "sluice.dev/queue": NAME } },
            "template": {
                "metadata": { "annotations": { "sluice.dev/config-hash": hash } },
                "spec": { "containers": [] }
            }
        },
        "status": { "replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas }
    }))
    .unwrap()
}

/// What the mock API server expects, and answers, in one test.
pub enum Scenario {
    /// A new Queue: the StatefulSet does not exist; ConfigMap, Service, StatefulSet,
    /// PDB applied in that order; `Created`; brokers not ready (pods listed); status.
    Create,
    /// The StatefulSet exists with other settings (and `Scaled` when `replicas`
    /// differs from its 3): the applies, `RollingUpdate`; the applied StatefulSet
    /// reports every broker ready and rolled, so no pods are listed.
    Update { old: StatefulSet, replicas: i32 },
    /// An access list: the brokers' ServiceAccount is applied and added to the
    /// TokenReview binding before the other applies.
    AccessList,
    /// An invalid spec: status `InvalidSpec`, a Warning Event, nothing applied.
    InvalidSpec,
    /// An invalid spec already reported: no request at all.
    Quiet,
    /// A scale-down (the StatefulSet exists, status.layout does not yet): the
    /// StatefulSet keeps its replicas, `ScaleDownBlocked` Event and condition.
    ScaleDownBlocked { old: StatefulSet },
    /// `deletionPolicy: Delete` on a Queue without the finalizer: it is added.
    AddFinalizer,
    /// `Retain` on a Queue with the finalizer: it is removed.
    RemoveFinalizer,
    /// Deletion with the finalizer: claims deleted, `VolumesDeleted`, finalizer
    /// released.
    Cleanup { pvcs: Vec<&'static str> },
    /// The ConfigMap apply fails: Warning `ReconcileError`, `Degraded=True`.
    ApplyFails,
    /// The StatefulSet read never answers (a stuck connection): the reconciliation
    /// is cut, reported like any failure (Warning `ReconcileError`, `Degraded=True`).
    Hangs,
    /// `storage.size` 1Gi (recorded on `old`) to 2Gi; three bound claims of class
    /// `standard`. Where the class allows expansion: each claim patched to 2Gi, the
    /// StatefulSet deleted with its pods orphaned, `VolumesGrowing`, nothing applied.
    /// Where it does not: applied at 1Gi, `StorageChangeBlocked` Event and condition.
    GrowVolumes {
        old: StatefulSet,
        class_allows: bool,
    },
}

/// The mock API server's side of the pair.
pub struct ApiServerVerifier {
    handle: Handle<Request<Body>, Response<Body>>,
    queue: Queue,
    /// Requests seen, for failure messages.
    seen: Vec<String>,
    /// Whether the Queue's partitions are Raft groups, as the reconciler decides
    /// from the StatefulSet it reads ([`Self::get_sts`]): in the settings' hash.
    raft: bool,
}

/// One request the reconciler made.
pub struct Call {
    pub query: String,
    pub content_type: String,
    pub body: Value,
    send: SendResponse<Response<Body>>,
}

impl Call {
    pub fn respond(self, code: StatusCode, body: &impl Serialize) {
        self.send.send_response(
            Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(body).unwrap()))
                .unwrap(),
        );
    }

    pub fn ok(self, body: &impl Serialize) {
        self.respond(StatusCode::OK, body)
    }

    /// Answers with what was sent (an apply or create as the server stores it).
    pub fn echo(self) {
        let body = self.body.clone();
        self.ok(&body)
    }

    pub fn fail(self, code: StatusCode, reason: &str) {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("mock: {reason}"), "reason": reason, "code": code.as_u16(),
        });
        self.respond(code, &status)
    }

    /// A server-side apply, forced, by our field manager.
    pub fn assert_apply(&self) {
        assert_eq!(self.content_type, "application/apply-patch+yaml");
        assert!(
            self.query
                .contains(&format!("fieldManager={FIELD_MANAGER}"))
                && self.query.contains("force=true"),
            "apply query {}",
            self.query
        );
    }
}

impl ApiServerVerifier {
    /// Waits for the next request and checks its method and path.
    pub async fn next(&mut self, method: Method, path: &str) -> Call {
        let Some((req, send)) = self.handle.next_request().await else {
            panic!(
                "expected {method} {path}; the reconciler made no more requests (seen: {:#?})",
                self.seen
            )
        };
        let (parts, body) = req.into_parts();
        let got = format!("{} {}", parts.method, parts.uri);
        self.seen.push(got.clone());
        assert!(
            parts.method == method && parts.uri.path() == path,
            "expected {method} {path}, got {got} (seen: {:#?})",
            self.seen
        );
        let bytes = body.collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .or_else(|_| serde_yaml::from_slice(&bytes))
                .expect("a JSON (or YAML) body")
        };
        Call {
            query: parts.uri.query().unwrap_or_default().to_string(),
            content_type: parts
                .headers
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default(),
            body,
            send,
        }
    }

    /// Expects an Event with this type and reason; answers it. Returns its note.
    pub async fn event(&mut self, type_: &str, reason: &str) -> String {
        let call = self.next(Method::POST, EVENTS_PATH).await;
        assert_eq!(
            (call.body["type"].as_str(), call.body["reason"].as_str()),
            (Some(type_), Some(reason)),
            "event {}",
            call.body
        );
        assert_eq!(call.body["regarding"]["name"], NAME);
        let note = call.body["note"].as_str().unwrap_or_default().to_string();
        call.echo();
        note
    }

    /// Expects a merge patch of the Queue's status; answers it. Returns the status.
    pub async fn status(&mut self) -> QueueStatus {
        let call = self
            .next(Method::PATCH, &format!("{QUEUE_PATH}/status"))
            .await;
        assert_eq!(call.content_type, "application/merge-patch+json");
        let status: QueueStatus =
            serde_json::from_value(call.body["status"].clone()).expect("a Queue status");
        let mut q = self.queue.clone();
        q.status = Some(status.clone());
        call.ok(&q);
        status
    }

    /// Expects the StatefulSet read; answers it (or 404).
    async fn get_sts(&mut self, existing: Option<&StatefulSet>) {
        let held = super::guard::held(self.queue.status.as_ref(), existing, &self.queue.spec);
        self.raft = held.is_none_or(|h| h.raft);
        let call = self.next(Method::GET, STS_PATH).await;
        match existing {
            Some(s) => call.ok(s),
            None => call.fail(StatusCode::NOT_FOUND, "NotFound"),
        }
    }

    /// The hash of the settings the brokers run with `spec`.
    fn hash(&self, spec: &QueueSpec) -> String {
        crate::settings::render(NAME, NS, spec, self.raft, None)
            .unwrap()
            .hash
    }

    /// Expects the ConfigMap (of the settings of `spec`, by their hash), Service,
    /// StatefulSet and PDB applies, in that order; the StatefulSet answers with
    /// `status`. Returns the applied StatefulSet.
    async fn applies(&mut self, spec: &QueueSpec, status: Value) -> Value {
        let hash = self.hash(spec);
        let cm = self
            .next(
                Method::PATCH,
                &format!("{CMS_PATH}/sluice-orders-config-{hash}"),
            )
            .await;
        cm.assert_apply();
        assert!(
            cm.body["data"]["broker.toml"]
                .as_str()
                .is_some_and(|t| t.contains("[[queue]]")),
            "ConfigMap {}",
            cm.body
        );
        assert_eq!(cm.body["immutable"], true);
        assert_eq!(
            cm.body["metadata"]["labels"]["sluice.dev/config-hash"],
            hash
        );
        cm.echo();
        let svc = self.next(Method::PATCH, SVC_PATH).await;
        svc.assert_apply();
        assert_eq!(svc.body["spec"]["clusterIP"], "None");
        svc.echo();
        let sts = self.next(Method::PATCH, STS_PATH).await;
        sts.assert_apply();
        let mut applied = sts.body.clone();
        applied["metadata"]["generation"] = json!(2);
        applied["status"] = status;
        sts.ok(&applied);
        let pdb = self.next(Method::PATCH, PDB_PATH).await;
        pdb.assert_apply();
        assert_eq!(pdb.body["apiVersion"], "policy/v1");
        assert_eq!(pdb.body["spec"]["maxUnavailable"], 1);
        pdb.echo();
        let volumes = &applied["spec"]["template"]["spec"]["volumes"];
        assert_eq!(
            volumes[0]["configMap"]["name"],
            format!("sluice-orders-config-{hash}"),
            "the pod template names its own version of the settings"
        );
        applied
    }

    /// Expects the settings ConfigMaps to be listed once every broker is rolled;
    /// answers with the current one, an older version, and one of another owner:
    /// only the older version of this Queue is deleted.
    async fn prune(&mut self, spec: &QueueSpec) {
        let hash = self.hash(spec);
        let list = self.next(Method::GET, CMS_PATH).await;
        assert!(
            list.query
                .contains("labelSelector=sluice.dev%2Fqueue%3Dorders"),
            "{}",
            list.query
        );
        let cm = |name: String, uid: &str| {
            json!({
                "metadata": { "name": name, "namespace": NS,
                    "ownerReferences": [{ "apiVersion": "sluice.dev/v1alpha1", "kind": "Queue",
                        "name": NAME, "uid": uid, "controller": true }] }
            })
        };
        list.ok(&json!({
            "apiVersion": "v1", "kind": "ConfigMapList", "metadata": {},
            "items": [
                cm(format!("sluice-orders-config-{hash}"), "0b7c2a4e"),
                cm("sluice-orders-config-00000000000000aa".into(), "0b7c2a4e"),
                cm("sluice-orders-config-00000000000000bb".into(), "another-queue-of-that-name"),
            ]
        }));
        let delete = self
            .next(
                Method::DELETE,
                &format!("{CMS_PATH}/sluice-orders-config-00000000000000aa"),
            )
            .await;
        delete.ok(
            &json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success" }),
        );
    }

    /// Expects the pods to be listed; answers with `n` ready pods running `spec`'s
    /// settings.
    async fn ready_pods(&mut self, spec: &QueueSpec, n: i32) {
        let hash = self.hash(spec);
        let call = self.next(Method::GET, PODS_PATH).await;
        let items: Vec<Value> = (0..n)
            .map(|i| {
                json!({
                    "metadata": { "name": format!("sluice-orders-{i}"), "namespace": NS,
                        "annotations": { "sluice.dev/config-hash": hash } },
                    "status": { "phase": "Running",
                        "conditions": [{ "type": "Ready", "status": "True" }] }
                })
            })
            .collect();
        call.ok(&json!({ "apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items }));
    }

    /// Expects the Queue's claims to be listed; answers with three bound 1Gi claims
    /// of class `standard`.
    async fn claims(&mut self) {
        let list = self.next(Method::GET, PVCS_PATH).await;
        assert!(
            list.query
                .contains("labelSelector=sluice.dev%2Fqueue%3Dorders")
        );
        let items: Vec<Value> = (0..3)
            .map(|i| {
                json!({
                    "metadata": { "name": format!("data-sluice-orders-{i}"), "namespace": NS },
                    "spec": { "storageClassName": "standard",
                        "resources": { "requests": { "storage": "1Gi" } } },
                    "status": { "phase": "Bound", "capacity": { "storage": "1Gi" } }
                })
            })
            .collect();
        list.ok(&json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaimList",
            "metadata": {}, "items": items
        }));
    }

    /// Expects the pods to be listed; answers with one unschedulable pod.
    async fn pods(&mut self) {
        let call = self.next(Method::GET, PODS_PATH).await;
        assert!(
            call.query
                .contains("labelSelector=sluice.dev%2Fqueue%3Dorders")
        );
        call.ok(&json!({
            "apiVersion": "v1", "kind": "PodList", "metadata": {},
            "items": [{
                "metadata": { "name": "sluice-orders-0", "namespace": NS },
                "status": { "phase": "Pending", "conditions": [{
                    "type": "PodScheduled", "status": "False",
                    "message": "0/1 nodes are available"
                }]}
            }]
        }));
    }

    /// Runs the scenario, then checks the reconciler made no further request.
    pub async fn run(mut self, scenario: Scenario) {
        match scenario {
            Scenario::Create => {
                self.get_sts(None).await;
                let spec = self.queue.spec.clone();
                let sts = self
                    .applies(&spec, json!({ "replicas": 0, "observedGeneration": 1 }))
                    .await;
                assert_eq!(sts["spec"]["replicas"], 3);
                let note = self.event("Normal", "Created").await;
                assert_eq!(
                    note,
                    format!(
                        "created StatefulSet, Service sluice-orders, ConfigMap sluice-orders-config-{} and PodDisruptionBudget",
                        self.hash(&spec)
                    )
                );
                self.pods().await;
                let st = self.status().await;
                assert_eq!(st.replicas, Some(3));
                assert_eq!(st.ready_replicas, Some(0));
                assert_eq!(st.observed_generation, Some(1));
                assert_eq!(
                    st.address.as_deref(),
                    Some("sluice-orders.shop.svc.cluster.local:7171")
                );
                assert_eq!(st.endpoints.len(), 3);
                assert_eq!(
                    st.endpoints[2],
                    "sluice-orders-2.sluice-orders.shop.svc.cluster.local:7171"
                );
                assert_eq!(
                    st.config_hash.as_deref(),
                    sts["spec"]["template"]["metadata"]["annotations"]["sluice.dev/config-hash"]
                        .as_str()
                );
                assert_conditions(
                    &st,
                    &[
                        ("Progressing", "True", "RollingOut"),
                        ("Ready", "False", "BrokersNotReady"),
                        ("Degraded", "False", "AsExpected"),
                    ],
                );
                let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
                assert_eq!(
                    ready.message,
                    "0/3 brokers ready; 1 pod(s) Pending (0/1 nodes are available)"
                );
            }
            Scenario::Update { old, replicas } => {
                self.get_sts(Some(&old)).await;
                let r = replicas;
                let spec = self.queue.spec.clone();
                let sts = self
                    .applies(
                        &spec,
                        json!({
                            "replicas": r, "readyReplicas": r, "updatedReplicas": r,
                            "observedGeneration": 2
                        }),
                    )
                    .await;
                assert_eq!(sts["spec"]["replicas"], r);
                let note = self.event("Normal", "RollingUpdate").await;
                assert!(note.starts_with("broker settings changed (hash "), "{note}");
                if r != 3 {
                    let note = self.event("Normal", "Scaled").await;
                    assert_eq!(note, format!("scaled from 3 to {r} brokers"));
                }
                self.prune(&spec).await;
                self.ready_pods(&spec, r).await;
                let st = self.status().await;
                assert_eq!(st.brokers.len(), r as usize);
                assert!(
                    st.brokers
                        .iter()
                        .all(|b| b.ready && b.config_hash == st.config_hash)
                );
                let layout = st.layout.clone().expect("status.layout recorded");
                assert_eq!(layout.brokers, r);
                assert_eq!(Some(layout.partitions), self.queue.spec.partitions.into());
                assert_eq!((st.replicas, st.ready_replicas), (Some(r), Some(r)));
                assert_conditions(
                    &st,
                    &[
                        ("Progressing", "False", "RolloutComplete"),
                        ("Ready", "True", "AllBrokersReady"),
                        ("Degraded", "False", "AsExpected"),
                    ],
                );
            }
            Scenario::AccessList => {
                self.get_sts(None).await;
                let sa = self.next(Method::PATCH, SA_PATH).await;
                sa.assert_apply();
                assert_eq!(sa.body["metadata"]["ownerReferences"][0]["name"], NAME);
                sa.echo();
                let binding = json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRoleBinding",
                    "metadata": { "name": BINDING, "resourceVersion": "7" },
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "ClusterRole", "name": "system:auth-delegator"
                    },
                    "subjects": []
                });
                let path =
                    format!("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{BINDING}");
                self.next(Method::GET, &path).await.ok(&binding);
                let put = self.next(Method::PUT, &path).await;
                assert_eq!(put.body["metadata"]["resourceVersion"], "7");
                assert_eq!(
                    put.body["subjects"],
                    json!([{ "kind": "ServiceAccount", "name": "sluice-orders-broker", "namespace": NS }])
                );
                put.echo();
                let spec = self.queue.spec.clone();
                let sts = self.applies(&spec, json!({ "replicas": 0 })).await;
                assert_eq!(
                    sts["spec"]["template"]["spec"]["serviceAccountName"],
                    "sluice-orders-broker"
                );
                self.event("Normal", "Created").await;
                self.pods().await;
                self.status().await;
            }
            Scenario::InvalidSpec => {
                let st = self.status().await;
                assert_conditions(
                    &st,
                    &[
                        ("Ready", "False", "InvalidSpec"),
                        ("Degraded", "True", "InvalidSpec"),
                        ("Progressing", "False", "InvalidSpec"),
                    ],
                );
                assert_eq!(st.observed_generation, Some(1));
                assert!(st.address.is_some());
                let msg = &st.conditions[0].message;
                assert!(msg.contains("replicas"), "{msg}");
                let note = self.event("Warning", "InvalidSpec").await;
                assert_eq!(&note, msg);
            }
            Scenario::Quiet => {}
            Scenario::ScaleDownBlocked { old } => {
                let cur = old.spec.as_ref().unwrap().replicas.unwrap();
                self.get_sts(Some(&old)).await;
                let mut running = self.queue.spec.clone();
                running.replicas = cur;
                let sts = self
                    .applies(
                        &running,
                        json!({
                            "replicas": cur, "readyReplicas": cur, "updatedReplicas": cur,
                            "observedGeneration": 2
                        }),
                    )
                    .await;
                assert_eq!(
                    sts["spec"]["replicas"], cur,
                    "the StatefulSet keeps its size"
                );
                let note = self.event("Warning", "ScaleDownBlocked").await;
                assert!(
                    note.starts_with(&format!("spec.replicas cannot change from {cur} to 3")),
                    "{note}"
                );
                self.prune(&running).await;
                self.ready_pods(&running, cur).await;
                let st = self.status().await;
                assert_eq!(st.replicas, Some(cur));
                assert_eq!(st.layout.as_ref().map(|l| l.brokers), Some(cur));
                assert_eq!(st.endpoints.len(), cur as usize);
                assert_conditions(
                    &st,
                    &[
                        ("Progressing", "False", "RolloutComplete"),
                        ("Ready", "True", "AllBrokersReady"),
                        ("Degraded", "True", "ScaleDownBlocked"),
                    ],
                );
            }
            Scenario::AddFinalizer => {
                let call = self.next(Method::PATCH, QUEUE_PATH).await;
                assert_eq!(call.content_type, "application/json-patch+json");
                assert_eq!(
                    call.body,
                    json!([
                        { "op": "test", "path": "/metadata/finalizers", "value": null },
                        { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] }
                    ])
                );
                let q = self.queue.clone().finalized();
                call.ok(&q);
            }
            Scenario::RemoveFinalizer => {
                let call = self.next(Method::PATCH, QUEUE_PATH).await;
                assert_eq!(call.content_type, "application/merge-patch+json");
                assert_eq!(
                    call.body,
                    json!({ "metadata": { "finalizers": ["other.example/keep"], "resourceVersion": "100" } })
                );
                let q = self.queue.clone();
                call.ok(&q);
            }
            Scenario::Cleanup { pvcs } => {
                let list = self.next(Method::GET, PVCS_PATH).await;
                assert!(
                    list.query
                        .contains("labelSelector=sluice.dev%2Fqueue%3Dorders")
                );
                let items: Vec<Value> = pvcs
                    .iter()
                    .map(|n| json!({ "metadata": { "name": n, "namespace": NS } }))
                    .collect();
                list.ok(&json!({
                    "apiVersion": "v1", "kind": "PersistentVolumeClaimList",
                    "metadata": {}, "items": items
                }));
                for (n, item) in pvcs.iter().zip(&items) {
                    let del = self.next(Method::DELETE, &format!("{PVCS_PATH}/{n}")).await;
                    let mut gone = item.clone();
                    gone["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
                    del.ok(&gone);
                }
                let note = self.event("Normal", "VolumesDeleted").await;
                assert_eq!(
                    note,
                    format!(
                        "deleted {} PersistentVolumeClaim(s) (deletionPolicy Delete)",
                        pvcs.len()
                    )
                );
                let call = self.next(Method::PATCH, QUEUE_PATH).await;
                assert_eq!(call.content_type, "application/json-patch+json");
                assert_eq!(
                    call.body,
                    json!([
                        { "op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER },
                        { "op": "remove", "path": "/metadata/finalizers/0" }
                    ])
                );
                let mut q = self.queue.clone();
                q.metadata.finalizers = None;
                call.ok(&q);
            }
            Scenario::GrowVolumes { old, class_allows } => {
                self.get_sts(Some(&old)).await;
                self.claims().await;
                let class = self
                    .next(
                        Method::GET,
                        "/apis/storage.k8s.io/v1/storageclasses/standard",
                    )
                    .await;
                class.ok(&json!({
                    "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                    "metadata": { "name": "standard" }, "provisioner": "example.com/disk",
                    "allowVolumeExpansion": class_allows
                }));
                if class_allows {
                    for i in 0..3 {
                        let patch = self
                            .next(
                                Method::PATCH,
                                &format!("{PVCS_PATH}/data-sluice-orders-{i}"),
                            )
                            .await;
                        assert_eq!(patch.content_type, "application/merge-patch+json");
                        assert_eq!(
                            patch.body,
                            json!({"spec": {"resources": {"requests": {"storage": "2Gi"}}}})
                        );
                        patch.echo();
                    }
                    let delete = self.next(Method::DELETE, STS_PATH).await;
                    assert_eq!(
                        delete.body["propagationPolicy"], "Orphan",
                        "{}",
                        delete.body
                    );
                    let mut going = serde_json::to_value(&old).unwrap();
                    going["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
                    delete.ok(&going);
                    let note = self.event("Normal", "VolumesGrowing").await;
                    assert!(
                        note.starts_with("volumes growing from 1Gi to 2Gi: claims expanded"),
                        "{note}"
                    );
                } else {
                    let mut running = self.queue.spec.clone();
                    running.storage.size = "1Gi".into();
                    let sts = self
                        .applies(
                            &running,
                            json!({
                                "replicas": 3, "readyReplicas": 3, "updatedReplicas": 3,
                                "observedGeneration": 2
                            }),
                        )
                        .await;
                    assert_eq!(
                        sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
                        "1Gi",
                        "the claim template keeps its size"
                    );
                    let note = self.event("Warning", "StorageChangeBlocked").await;
                    assert!(
                        note.starts_with("spec.storage.size cannot grow from 1Gi to 2Gi: StorageClass standard does not allow volume expansion"),
                        "{note}"
                    );
                    self.prune(&running).await;
                    self.ready_pods(&running, 3).await;
                    let st = self.status().await;
                    assert_eq!(st.layout.as_ref().unwrap().storage.size, "1Gi");
                    assert_conditions(
                        &st,
                        &[
                            ("Progressing", "False", "RolloutComplete"),
                            ("Ready", "True", "AllBrokersReady"),
                            ("Degraded", "True", "StorageChangeBlocked"),
                        ],
                    );
                }
            }
            Scenario::Hangs => {
                let held = self.next(Method::GET, STS_PATH).await;
                let note = self.event("Warning", "ReconcileError").await;
                assert!(note.contains("did not finish within"), "{note}");
                let st = self.status().await;
                let degraded = st.conditions.iter().find(|c| c.type_ == "Degraded");
                assert_eq!(
                    degraded.map(|c| (c.status.as_str(), c.reason.as_str())),
                    Some(("True", "ReconcileError"))
                );
                drop(held);
            }
            Scenario::ApplyFails => {
                self.get_sts(None).await;
                let path = format!(
                    "{CMS_PATH}/sluice-orders-config-{}",
                    self.hash(&self.queue.spec)
                );
                self.next(Method::PATCH, &path)
                    .await
                    .fail(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
                let note = self.event("Warning", "ReconcileError").await;
                assert!(note.starts_with("Kubernetes API: "), "{note}");
                let st = self.status().await;
                let degraded = st
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Degraded")
                    .unwrap();
                assert_eq!(
                    (degraded.status.as_str(), degraded.reason.as_str()),
                    ("True", "ReconcileError")
                );
                assert_eq!(degraded.message, note);
            }
        }
        if let Some((req, _)) = self.handle.next_request().await {
            panic!(
                "unexpected request {} {} after {:#?}",
                req.method(),
                req.uri(),
                self.seen
            );
        }
    }
}

/// Checks the conditions' (type, status, reason), in order.
pub fn assert_conditions(status: &QueueStatus, want: &[(&str, &str, &str)]) {
    let got: Vec<(&str, &str, &str)> = status
        .conditions
        .iter()
        .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
        .collect();
    assert_eq!(got, want);
}

impl Context {
    /// A context whose client talks to a mock API server (policy/v1 PDBs, a
    /// TokenReview binding, no data-plane TLS).
    pub fn test(queue: &Queue) -> (Arc<Context>, ApiServerVerifier) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, NS);
        let ctx = Context {
            client: client.clone(),
            defaults: Defaults {
                broker_image: "sluice-broker:test".into(),
                image_pull_policy: "IfNotPresent".into(),
                cluster_domain: "cluster.local".into(),
                token_review_binding: Some(BINDING.into()),
                otlp_endpoint: None,
            },
            pdb: ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("policy", "v1", "PodDisruptionBudget"),
                "poddisruptionbudgets",
            ),
            recorder: super::recorder(client, Some("test".into())),
            metrics: Arc::new(Metrics::new()),
            certs: None,
            brokers: Default::default(),
        };
        let verifier = ApiServerVerifier {
            handle,
            queue: queue.clone(),
            seen: Vec::new(),
            raft: true,
        };
        (Arc::new(ctx), verifier)
    }
}

/// Reconciles `queue` once against the mock API server playing `scenario`; answers
/// the reconciliation's result and the metrics. Fails if the scenario does.
pub async fn reconcile_with(
    queue: Queue,
    scenario: Scenario,
) -> (Result<Action, Error>, Arc<Metrics>) {
    let (ctx, verifier) = Context::test(&queue);
    let metrics = ctx.metrics.clone();
    let server = tokio::spawn(verifier.run(scenario));
    // `reconcile` drops the context (and so the client) when it returns, which
    // lets the verifier see the end of the requests.
    let res = tokio::time::timeout(Duration::from_secs(10), reconcile(Arc::new(queue), ctx))
        .await
        .expect("reconcile finishes");
    match tokio::time::timeout(Duration::from_secs(10), server).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Ok(Err(e)) => panic!("mock API server: {e}"),
        Err(_) => panic!("the mock API server still waits for the client to go away"),
    }
    (res, metrics)
}
