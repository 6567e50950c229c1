//! The operator, as a real process, against a real kube-apiserver,
//! controller-manager and scheduler (Kubernetes 1.20, see scripts/k8s/cluster.sh).
//! No kubelet runs: broker pods stay Pending, and the status must say so.

mod common;

use common::*;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use sluice_operator::crd::Queue;
use sluice_proto::externalscaler::ScaledObjectRef;
use sluice_proto::externalscaler::external_scaler_client::ExternalScalerClient;
use std::process::Command;

async fn apply_queue(client: &Client, ns: &str, mut q: Value) -> Queue {
    q["metadata"]["namespace"] = json!(ns);
    let name = q["metadata"]["name"].as_str().unwrap().to_string();
    let api: Api<Queue> = Api::namespaced(client.clone(), ns);
    api.patch(
        &name,
        &PatchParams::apply("sluice-tests").force(),
        &Patch::Apply(&q),
    )
    .await
    .unwrap_or_else(|e| panic!("apply Queue {name}: {e}"))
}

fn condition<'a>(
    q: &'a Queue,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    q.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Waits for a Queue whose status satisfies `pred`.
async fn wait_queue(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    pred: impl Fn(&Queue) -> bool,
) -> Queue {
    let api: Api<Queue> = Api::namespaced(client.clone(), ns);
    eventually(what, || async {
        let q = api.get_opt(name).await.ok().flatten()?;
        pred(&q).then_some(q)
    })
    .await
}

/// The replicas the StatefulSet `name` is given.
async fn sts_replicas(api: &Api<StatefulSet>, name: &str) -> Option<i32> {
    api.get(name).await.unwrap().spec?.replicas
}

/// Waits for `Degraded=True` with `reason` on the Queue `name`.
async fn wait_degraded(client: &Client, ns: &str, name: &str, reason: &str) -> Queue {
    wait_queue(client, ns, name, &format!("Degraded=True {reason}"), |q| {
        condition(q, "Degraded").is_some_and(|c| c.status == "True" && c.reason == reason)
    })
    .await
}

/// Events (events.k8s.io/v1, as the operator writes them) about a Queue.
async fn queue_events(client: &Client, ns: &str, name: &str) -> Vec<(String, String, String)> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("events.k8s.io", "v1", "Event"),
        "events",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    let list = api.list(&ListParams::default()).await.unwrap();
    list.items
        .into_iter()
        .filter(|e| e.data["regarding"]["name"] == name && e.data["regarding"]["kind"] == "Queue")
        .map(|e| {
            (
                e.data["type"].as_str().unwrap_or("").to_string(),
                e.data["reason"].as_str().unwrap_or("").to_string(),
                e.data["note"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

async fn wait_event(
    client: &Client,
    ns: &str,
    name: &str,
    reason: &str,
) -> (String, String, String) {
    eventually(&format!("Event {reason} on Queue {name}"), || async {
        queue_events(client, ns, name)
            .await
            .into_iter()
            .find(|e| e.1 == reason)
    })
    .await
}

fn op_args(ns: &str) -> Vec<String> {
    vec![
        format!("--watch-namespace={ns}"),
        format!("--namespace={ns}"),
        format!("--lease-name=op-{ns}"),
        "--disable-webhook".into(),
        "--broker-image=sluice-broker:test".into(),
        format!("--token-review-binding=tr-{ns}"),
    ]
}

/// The binding `op_args` names, as the chart creates it: Queues with spec.access
/// need it.
async fn create_token_review_binding(client: &Client, ns: &str) -> Api<ClusterRoleBinding> {
    let api: Api<ClusterRoleBinding> = Api::all(client.clone());
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("tr-{ns}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"},
        "subjects": []
    }))
    .unwrap();
    api.create(&PostParams::default(), &binding).await.unwrap();
    api
}

/// Waits until the brokers of `queue` have their ServiceAccount and are subjects of
/// the token-review binding `binding`.
async fn wait_broker_may_review_tokens(client: &Client, ns: &str, queue: &str, binding: &str) {
    let sa = format!("sluice-{queue}-broker");
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    eventually(&format!("{sa} on ClusterRoleBinding {binding}"), || async {
        bindings
            .get(binding)
            .await
            .ok()?
            .subjects?
            .iter()
            .any(|s| s.name == sa && s.namespace.as_deref() == Some(ns))
            .then_some(())
    })
    .await;
    let owned = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .get(&sa)
        .await
        .expect("the brokers' ServiceAccount");
    assert_eq!(
        owned.owner_references()[0].name,
        queue,
        "owned by the Queue"
    );
    // The StatefulSet is applied after the binding (and the ConfigMap, the Service
    // and the brokers' certificate): wait for it too.
    let sts_api = Api::<StatefulSet>::namespaced(client.clone(), ns);
    let sts = eventually(&format!("StatefulSet sluice-{queue}"), || async {
        sts_api.get_opt(&format!("sluice-{queue}")).await.ok()?
    })
    .await;
    let pod = sts.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some(sa.as_str()));
}

fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_queue_creates_owned_objects_rolls_repairs_and_cascades() {
    let client = admin().await;
    install_crd(&client).await;
    let ns = &unique("it-lifecycle");
    namespace(&client, ns, json!({})).await;
    let _op = start_operator(ns, &cluster().kubeconfig, &as_refs(&op_args(ns)));

    let orders = example("orders.yaml").remove(0);
    let q = apply_queue(&client, ns, orders).await;
    let uid = q.uid().unwrap();

    // Owned objects with the right content.
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let sts = wait_statefulset(&sts_api, "sluice-orders", "of the example Queue").await;
    let owner = &sts.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("Queue", uid.as_str(), Some(true))
    );
    let spec = sts.spec.clone().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.service_name.as_deref(), Some("sluice-orders"));
    let pod = spec.template.spec.clone().unwrap();
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("sluice-broker:test"));
    assert_eq!(probe_path(c.readiness_probe.as_ref()), Some("/readyz"));
    assert_eq!(probe_path(c.liveness_probe.as_ref()), Some("/healthz"));
    assert!(pod.affinity.unwrap().pod_anti_affinity.is_some());
    assert_eq!(pod.termination_grace_period_seconds, Some(60));
    let vct = &spec.volume_claim_templates.unwrap()[0];
    assert_eq!(
        vct.spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"]
            .0,
        "2Gi"
    );
    let hash1 = config_hash(&sts).expect("config hash");

    let cm_api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = cm_api
        .get(&format!("sluice-orders-config-{hash1}"))
        .await
        .unwrap();
    assert_eq!(
        cm.immutable,
        Some(true),
        "a version of the settings never changes"
    );
    let toml = cm.data.unwrap()["broker.toml"].clone();
    for line in [
        "name = \"orders\"",
        "partitions = 6",
        "replicas = 3",
        "fsync = \"always\"",
        "visibility_timeout = \"30s\"",
        "redelivery_delay = \"1s\"",
        "redelivery_delay_max = \"5m\"",
        "retention_max_age = \"336h\"",
        "overflow = \"reject_new\"",
    ] {
        assert!(
            toml.lines().any(|l| l == line),
            "broker.toml lacks {line:?}:\n{toml}"
        );
    }
    let svc: Service = Api::namespaced(client.clone(), ns)
        .get("sluice-orders")
        .await
        .unwrap();
    assert_eq!(svc.spec.unwrap().cluster_ip.as_deref(), Some("None"));
    // Kubernetes 1.20 serves policy/v1beta1 only: the operator must have found it.
    let pdb_ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("policy", "v1beta1", "PodDisruptionBudget"),
        "poddisruptionbudgets",
    );
    let pdb = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &pdb_ar)
        .get("sluice-orders")
        .await
        .unwrap();
    assert_eq!(pdb.data["spec"]["maxUnavailable"], 1);
    assert_eq!(pdb.metadata.owner_references.unwrap()[0].uid, uid);

    // Status: honest about pods that no node runs.
    let q = wait_queue(
        &client,
        ns,
        "orders",
        "status Ready=False BrokersNotReady mentioning Pending",
        |q| {
            condition(q, "Ready").is_some_and(|c| {
                c.status == "False"
                    && c.reason == "BrokersNotReady"
                    && c.message.contains("Pending")
            }) && q.status.as_ref().unwrap().observed_generation == q.metadata.generation
        },
    )
    .await;
    let st = q.status.clone().unwrap();
    assert_eq!(
        st.address.as_deref(),
        Some(format!("sluice-orders.{ns}.svc.cluster.local:7171").as_str())
    );
    assert_eq!(st.replicas, Some(3));
    assert_eq!(st.ready_replicas, Some(0));
    assert_eq!(st.endpoints.len(), 3);
    assert_eq!(condition(&q, "Degraded").unwrap().status, "False");
    assert!(condition(&q, "Progressing").is_some());
    wait_event(&client, ns, "orders", "Created").await;
    // The controller-manager made pods and claims from the StatefulSet.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    eventually("3 broker pods", || async {
        let l = pods
            .list(&ListParams::default().labels("sluice.dev/queue=orders"))
            .await
            .ok()?;
        (l.items.len() == 3).then_some(())
    })
    .await;

    // Update: a settings change rolls the brokers (new hash on the pod template).
    let mut changed = example("orders.yaml").remove(0);
    changed["spec"]["delivery"]["visibilityTimeout"] = json!("1m");
    apply_queue(&client, ns, changed.clone()).await;
    let hash2 = eventually("config hash changes", || async {
        let h = config_hash(&sts_api.get("sluice-orders").await.ok()?)?;
        (h != hash1).then_some(h)
    })
    .await;
    let cm = cm_api
        .get(&format!("sluice-orders-config-{hash2}"))
        .await
        .unwrap();
    assert!(cm.data.unwrap()["broker.toml"].contains("visibility_timeout = \"1m\""));
    // The pods still run the first settings (no kubelet here rolls them): theirs
    // stay, so a broker restarting now reads what its pod was rolled with.
    let first = cm_api
        .get(&format!("sluice-orders-config-{hash1}"))
        .await
        .unwrap();
    assert!(!first.data.unwrap()["broker.toml"].contains("visibility_timeout = \"1m\""));
    wait_event(&client, ns, "orders", "RollingUpdate").await;
    wait_queue(&client, ns, "orders", "status.configHash follows", |q| {
        q.status.as_ref().and_then(|s| s.config_hash.clone()) == Some(hash2.clone())
    })
    .await;

    // Without the webhook (this operator runs none), the reconciler holds the line.
    // Scale down below the brokers owning partitions: refused, with a condition.
    let mut smaller = changed.clone();
    smaller["spec"]["replicas"] = json!(2);
    apply_queue(&client, ns, smaller).await;
    wait_degraded(&client, ns, "orders", "ScaleDownBlocked").await;
    assert_eq!(sts_replicas(&sts_api, "sluice-orders").await, Some(3));
    wait_event(&client, ns, "orders", "ScaleDownBlocked").await;
    // Scale up: carried out by moving copies. The StatefulSet runs four brokers,
    // the volumes hold the old placement until the brokers report the copies moved
    // (none run here, so the move stays under way), and the settings carry where
    // each partition's copies go.
    let mut bigger = changed.clone();
    bigger["spec"]["replicas"] = json!(4);
    apply_queue(&client, ns, bigger.clone()).await;
    let q = wait_queue(
        &client,
        ns,
        "orders",
        "Progressing=True PartitionsMoving",
        |q| {
            condition(q, "Progressing")
                .is_some_and(|c| c.status == "True" && c.reason == "PartitionsMoving")
        },
    )
    .await;
    assert!(
        condition(&q, "Progressing")
            .unwrap()
            .message
            .contains("moving partition copies onto 4 brokers: 6 of 6 partitions left"),
        "{:?}",
        condition(&q, "Progressing")
    );
    wait_event(&client, ns, "orders", "PartitionsMoving").await;
    let layout = q.status.as_ref().unwrap().layout.clone().unwrap();
    assert_eq!(
        (layout.partitions, layout.brokers, layout.moving_to),
        (6, 3, Some(4))
    );
    assert_eq!(sts_replicas(&sts_api, "sluice-orders").await, Some(4));
    let moving_hash = q.status.as_ref().unwrap().config_hash.clone().unwrap();
    let settings = cm_api
        .get(&format!("sluice-orders-config-{moving_hash}"))
        .await
        .unwrap()
        .data
        .unwrap()["broker.toml"]
        .clone();
    assert!(
        settings.contains("placement = [[") && settings.contains("members = [[0, 1, 2]"),
        "{settings}"
    );
    // Another count while copies move: accepted, and carried out after them. The
    // move goes on onto four brokers and says what comes next; nothing is refused.
    let mut five = changed.clone();
    five["spec"]["replicas"] = json!(5);
    apply_queue(&client, ns, five).await;
    let q = wait_queue(&client, ns, "orders", "the next count named", |q| {
        condition(q, "Progressing").is_some_and(|c| {
            c.reason == "PartitionsMoving"
                && c.message
                    .ends_with("; then onto 5 brokers, as asked meanwhile")
        })
    })
    .await;
    assert!(
        condition(&q, "Degraded").is_some_and(|c| c.status == "False"),
        "{:?}",
        condition(&q, "Degraded")
    );
    assert_eq!(
        q.status
            .as_ref()
            .unwrap()
            .layout
            .as_ref()
            .unwrap()
            .moving_to,
        Some(4)
    );
    assert_eq!(sts_replicas(&sts_api, "sluice-orders").await, Some(4));
    let changed = bigger;
    // Fewer partitions: refused, the brokers keep reading all six.
    let mut fewer = changed.clone();
    fewer["spec"]["partitions"] = json!(4);
    apply_queue(&client, ns, fewer).await;
    wait_degraded(&client, ns, "orders", "PartitionsDecreaseBlocked").await;
    let cm = cm_api
        .get(&format!("sluice-orders-config-{moving_hash}"))
        .await
        .unwrap();
    assert!(cm.data.unwrap()["broker.toml"].contains("partitions = 6"));
    // Back to what the volumes hold: Degraded clears.
    apply_queue(&client, ns, changed.clone()).await;
    wait_queue(&client, ns, "orders", "Degraded back to False", |q| {
        condition(q, "Degraded").is_some_and(|c| c.status == "False")
    })
    .await;

    // Drift: a deleted StatefulSet comes back; an edited ConfigMap is restored.
    let old_uid = sts_api.get("sluice-orders").await.unwrap().uid().unwrap();
    sts_api
        .delete("sluice-orders", &DeleteParams::default())
        .await
        .unwrap();
    // A scale-down asked for while no StatefulSet exists is still refused: the
    // guard reads status.layout, not the StatefulSet.
    let mut smaller = changed.clone();
    smaller["spec"]["replicas"] = json!(1);
    apply_queue(&client, ns, smaller).await;
    let back = eventually("StatefulSet recreated", || async {
        let s = sts_api.get_opt("sluice-orders").await.ok().flatten()?;
        (s.uid().unwrap() != old_uid && s.metadata.deletion_timestamp.is_none()).then_some(s)
    })
    .await;
    assert_eq!(
        back.spec.unwrap().replicas,
        Some(4),
        "recreated at the size of the move under way"
    );
    apply_queue(&client, ns, changed.clone()).await;
    // The settings cannot be edited in place (immutable); a deleted version comes back.
    let current = format!("sluice-orders-config-{moving_hash}");
    let edit = cm_api
        .patch(
            &current,
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"broker.toml": "# vandalised"}})),
        )
        .await;
    assert!(
        matches!(&edit, Err(kube::Error::Api(e)) if e.code == 422),
        "{edit:?}"
    );
    cm_api
        .delete(&current, &DeleteParams::default())
        .await
        .unwrap();
    eventually("ConfigMap restored", || async {
        let cm = cm_api.get_opt(&current).await.ok()??;
        (cm.metadata.deletion_timestamp.is_none()
            && cm
                .data?
                .get("broker.toml")?
                .contains("visibility_timeout = \"1m\""))
        .then_some(())
    })
    .await;
    let hash_now = config_hash(&sts_api.get("sluice-orders").await.unwrap()).expect("config hash");
    let sts_name_edit = json!({"spec": {"template": {"metadata": {"annotations": {"sluice.dev/config-hash": "tampered"}}}}});
    sts_api
        .patch(
            "sluice-orders",
            &PatchParams::default(),
            &Patch::Merge(sts_name_edit),
        )
        .await
        .unwrap();
    eventually("StatefulSet hash restored", || async {
        let h = config_hash(&sts_api.get("sluice-orders").await.ok()?)?;
        (h == hash_now).then_some(())
    })
    .await;

    // Deletion cascades through the garbage collector; deletionPolicy Retain keeps the claims.
    let queues: Api<Queue> = Api::namespaced(client.clone(), ns);
    assert!(
        queues.get("orders").await.unwrap().finalizers().is_empty(),
        "Retain needs no finalizer"
    );
    queues
        .delete("orders", &DeleteParams::default())
        .await
        .unwrap();
    eventually("owned objects garbage-collected", || async {
        let sts = sts_api.get_opt("sluice-orders").await.ok()?;
        let cms = cm_api
            .list(&ListParams::default().labels("sluice.dev/queue=orders"))
            .await
            .ok()?;
        let svc = Api::<Service>::namespaced(client.clone(), ns)
            .get_opt("sluice-orders")
            .await
            .ok()?;
        let pdb = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &pdb_ar)
            .get_opt("sluice-orders")
            .await
            .ok()?;
        (sts.is_none() && cms.items.is_empty() && svc.is_none() && pdb.is_none()).then_some(())
    })
    .await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let kept = pvcs
        .list(&ListParams::default().labels("sluice.dev/queue=orders"))
        .await
        .unwrap();
    assert!(
        kept.items.len() >= 3,
        "deletionPolicy Retain keeps the data claims"
    );
    assert!(
        kept.items
            .iter()
            .all(|p| p.metadata.deletion_timestamp.is_none())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_queues_are_refused_by_schema_or_reported() {
    let client = admin().await;
    install_crd(&client).await;
    let ns = &unique("it-invalid");
    namespace(&client, ns, json!({})).await;
    let api: Api<Queue> = Api::namespaced(client.clone(), ns);

    // What the schema can check, the API server refuses, naming the field.
    for (spec, field) in [
        (json!({"replicas": 0}), "spec.replicas"),
        (
            json!({"durability": {"fsync": "sometimes"}}),
            "spec.durability.fsync",
        ),
        (
            json!({"delivery": {"visibilityTimeout": "30 seconds"}}),
            "spec.delivery.visibilityTimeout",
        ),
        (
            json!({"retention": {"overflow": "explode"}}),
            "spec.retention.overflow",
        ),
        (json!({"storage": {"size": "lots"}}), "spec.storage.size"),
        (json!({"deletionPolicy": "Shred"}), "spec.deletionPolicy"),
        // Copies: 1, 3 or 5 (an even number survives no more failures).
        (json!({"replication": 2}), "spec.replication"),
        (json!({"replicas": 4, "replication": 4}), "spec.replication"),
    ] {
        let q = json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "Queue", "metadata": {"name": "bad"}, "spec": spec});
        let obj: DynamicObject = serde_json::from_value(q).unwrap();
        let dynapi: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<Queue>(&()));
        match dynapi.create(&PostParams::default(), &obj).await {
            Ok(_) => panic!("schema accepted an invalid {field}"),
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "{e:?}");
                assert!(
                    e.message.contains(field),
                    "message does not name {field}: {}",
                    e.message
                );
            }
            Err(e) => panic!("{e}"),
        }
    }

    // What it cannot (replicas > partitions): Ready=False InvalidSpec + a Warning Event,
    // and nothing is created.
    let _op = start_operator(ns, &cluster().kubeconfig, &as_refs(&op_args(ns)));
    let lopsided = example("invalid-replicas-exceed-partitions.yaml").remove(0);
    apply_queue(&client, ns, lopsided.clone()).await;
    let q = wait_queue(&client, ns, "lopsided", "Ready=False InvalidSpec", |q| {
        condition(q, "Ready").is_some_and(|c| c.status == "False" && c.reason == "InvalidSpec")
    })
    .await;
    assert!(
        condition(&q, "Ready")
            .unwrap()
            .message
            .contains("spec.partitions")
    );
    assert_eq!(condition(&q, "Degraded").unwrap().status, "True");
    let ev = wait_event(&client, ns, "lopsided", "InvalidSpec").await;
    assert_eq!(ev.0, "Warning");
    assert!(ev.2.contains("spec.partitions"));
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    assert!(sts_api.get_opt("sluice-lopsided").await.unwrap().is_none());

    // More copies than brokers: InvalidSpec naming spec.replication.
    let thin = json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "Queue",
        "metadata": {"name": "thin"},
        "spec": {"replicas": 2, "partitions": 4, "replication": 3}});
    apply_queue(&client, ns, thin).await;
    let q = wait_queue(&client, ns, "thin", "Ready=False InvalidSpec", |q| {
        condition(q, "Ready").is_some_and(|c| c.status == "False" && c.reason == "InvalidSpec")
    })
    .await;
    let message = condition(&q, "Ready").unwrap().message.clone();
    assert!(
        message.contains("spec.replication: 3 copies need as many brokers, but replicas is 2"),
        "{message}"
    );

    // Fixing the spec brings the queue up.
    let mut fixed = lopsided;
    fixed["spec"]["partitions"] = json!(8);
    apply_queue(&client, ns, fixed).await;
    wait_statefulset(&sts_api, "sluice-lopsided", "after the fix").await;
    wait_queue(
        &client,
        ns,
        "lopsided",
        "Ready reason leaves InvalidSpec",
        |q| {
            condition(q, "Ready").is_some_and(|c| c.reason == "BrokersNotReady")
                && condition(q, "Degraded").is_some_and(|c| c.status == "False")
        },
    )
    .await;
    let _ = api;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_policy_delete_removes_volumes_through_a_finalizer() {
    let client = admin().await;
    install_crd(&client).await;
    let ns = &unique("it-delete");
    namespace(&client, ns, json!({})).await;
    let _op = start_operator(ns, &cluster().kubeconfig, &as_refs(&op_args(ns)));
    let bindings = create_token_review_binding(&client, ns).await;
    let emails = example("emails.yaml").remove(0);
    apply_queue(&client, ns, emails).await;
    // spec.access: the brokers get a ServiceAccount that may review tokens.
    wait_broker_may_review_tokens(&client, ns, "emails", &format!("tr-{ns}")).await;
    let queues: Api<Queue> = Api::namespaced(client.clone(), ns);
    eventually("finalizer added for deletionPolicy Delete", || async {
        queues
            .get("emails")
            .await
            .ok()?
            .finalizers()
            .iter()
            .any(|f| f == "sluice.dev/delete-volumes")
            .then_some(())
    })
    .await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    eventually("data claim created by the StatefulSet", || async {
        let l = pvcs
            .list(&ListParams::default().labels("sluice.dev/queue=emails"))
            .await
            .ok()?;
        (!l.items.is_empty()).then_some(())
    })
    .await;
    queues
        .delete("emails", &DeleteParams::default())
        .await
        .unwrap();
    eventually("Queue gone after the finalizer ran", || async {
        queues.get_opt("emails").await.ok()?.is_none().then_some(())
    })
    .await;
    eventually("data claims deleted", || async {
        let l = pvcs
            .list(&ListParams::default().labels("sluice.dev/queue=emails"))
            .await
            .ok()?;
        l.items
            .iter()
            .all(|p| p.metadata.deletion_timestamp.is_some())
            .then_some(())
    })
    .await;

    // Switching Delete -> Retain removes the finalizer again.
    let mut q = example("emails.yaml").remove(0);
    q["metadata"]["name"] = json!("emails2");
    apply_queue(&client, ns, q.clone()).await;
    eventually("finalizer on emails2", || async {
        (!queues.get("emails2").await.ok()?.finalizers().is_empty()).then_some(())
    })
    .await;
    q["spec"]["deletionPolicy"] = json!("Retain");
    apply_queue(&client, ns, q).await;
    eventually("finalizer removed for Retain", || async {
        queues
            .get("emails2")
            .await
            .ok()?
            .finalizers()
            .is_empty()
            .then_some(())
    })
    .await;
    bindings
        .delete(&format!("tr-{ns}"), &DeleteParams::default())
        .await
        .unwrap();
}

/// The chart's pods pass Pod Security `restricted` (the operator's own pod, with
/// and without cert-manager's certificate volume); the broker pods and the injected
/// sidecar are checked where they are made (`resources`, `inject`).
#[test]
fn the_charts_pods_are_restricted() {
    use k8s_openapi::api::apps::v1::Deployment;
    use serde::Deserialize;
    for extra in [
        &[][..],
        &["--set", "webhook.certificates.mode=certManager"][..],
    ] {
        let manifest = helm_template("sluice-system", "sluice", extra);
        let mut deployments = 0;
        for doc in serde_yaml::Deserializer::from_str(&manifest) {
            let v = serde_yaml::Value::deserialize(doc).unwrap();
            if v.get("kind").and_then(|k| k.as_str()) != Some("Deployment") {
                continue;
            }
            let d: Deployment = serde_yaml::from_value(v).unwrap();
            let pod = d.spec.unwrap().template.spec.unwrap();
            assert_eq!(
                sluice_operator::pod_security::restricted_violations(&pod),
                Vec::<String>::new(),
                "{extra:?}"
            );
            deployments += 1;
        }
        assert_eq!(deployments, 1, "{extra:?}");
    }
}

/// `helm template` for the test cluster's Kubernetes version (without a cluster,
/// helm assumes its own newest).
fn helm_template(ns: &str, release: &str, extra: &[&str]) -> String {
    let (ok, out, err) = run(Command::new(helm())
        .args(["template", release])
        .arg(repo_root().join("charts/sluice"))
        .args(["--namespace", ns, "--kube-version", "1.20.2"])
        .args(extra));
    assert!(ok, "helm template failed: {err}");
    out
}

fn kubectl_apply(stdin: &str, extra: &[&str]) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(kubectl())
        .env("KUBECONFIG", &cluster().kubeconfig)
        .args(["apply", "-f", "-"])
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Writes a kubeconfig that authenticates with a ServiceAccount token.
fn token_kubeconfig(token: &str, path: &std::path::Path) {
    let admin = std::fs::read_to_string(&cluster().kubeconfig).unwrap();
    let mut v: serde_yaml::Value = serde_yaml::from_str(&admin).unwrap();
    v["users"][0]["user"]["token"] = serde_yaml::Value::String(token.to_string());
    std::fs::write(path, serde_yaml::to_string(&v).unwrap()).unwrap();
}

async fn service_account_token(client: &Client, ns: &str, sa: &str) -> String {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    eventually(&format!("token Secret of ServiceAccount {sa}"), || async {
        let l = secrets
            .list(&ListParams::default().fields("type=kubernetes.io/service-account-token"))
            .await
            .ok()?;
        l.items.into_iter().find_map(|s| {
            if s.annotations()
                .get("kubernetes.io/service-account.name")
                .map(|n| n.as_str())
                != Some(sa)
            {
                return None;
            }
            let t = s.data?.get("token")?.0.clone();
            String::from_utf8(t).ok()
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_is_accepted_and_its_rbac_is_enough_for_the_operator() {
    let client = admin().await;
    install_crd(&client).await;
    let rel = &unique("rbac");
    let full = format!("{rel}-sluice");
    let rel_ns = &unique("it-rbac-system");
    let ns = &unique("it-rbac-apps");
    namespace(&client, rel_ns, json!({})).await;
    // The app namespace opts out of injection: nothing serves the chart's webhook
    // in this test, and (failurePolicy Ignore) it must not block pods anyway.
    namespace(&client, ns, json!({"sluice-test": rel})).await;

    // `helm template` output is accepted by the API server (server-side dry run first,
    // then for real).
    let manifest = helm_template(
        rel_ns,
        rel,
        &[
            "--set",
            "operator.replicas=2",
            "--set",
            &format!("webhook.namespaceSelector.matchLabels.sluice-test={rel}"),
        ],
    );
    let (ok, _, err) = kubectl_apply(&manifest, &["--dry-run=server"]);
    assert!(
        ok,
        "API server refused helm template output (dry run): {err}"
    );
    let (ok, _, err) = kubectl_apply(&manifest, &[]);
    assert!(ok, "API server refused helm template output: {err}");
    assert!(!manifest.contains("\"*\""), "no wildcard in RBAC");

    // The operator with the chart ServiceAccount's token, not as admin.
    let token = service_account_token(&client, rel_ns, &full).await;
    let kc = log_dir().join("rbac-kubeconfig");
    token_kubeconfig(&token, &kc);
    let webhook_port = free_port();
    let mut op = start_operator(
        "rbac",
        &kc,
        &[
            &format!("--namespace={rel_ns}"),
            &format!("--watch-namespace={ns}"),
            &format!("--lease-name={full}-leader"),
            &format!("--webhook-secret={full}-webhook-tls"),
            &format!("--webhook-config-name={full}-sidecar-injector"),
            &format!("--webhook-service={full}-webhook"),
            &format!("--webhook-listen=127.0.0.1:{webhook_port}"),
            &format!("--token-review-binding={full}-broker-token-review"),
            "--install-crds",
        ],
    );
    // The chart's rights let the operator bring its CRD up to date (it starts with
    // --install-crds, as the chart starts it); refused, it would say so and go on.
    eventually("the operator applied its CRD", || async {
        let log = op.log_text();
        assert!(!log.contains("could not apply the Queue CRD"), "{log}");
        log.contains("the Queue CRD is up to date").then_some(())
    })
    .await;
    // spec.access: the chart's rights cover the brokers' ServiceAccount and adding
    // it to the chart's token-review binding (`bind` on system:auth-delegator).
    apply_queue(&client, ns, example("emails.yaml").remove(0)).await;
    wait_broker_may_review_tokens(
        &client,
        ns,
        "emails",
        &format!("{full}-broker-token-review"),
    )
    .await;
    let mut orders = example("orders.yaml").remove(0);
    orders["spec"]["deletionPolicy"] = json!("Delete");
    apply_queue(&client, ns, orders).await;
    let q = wait_queue(
        &client,
        ns,
        "orders",
        "status written with the chart's RBAC",
        |q| {
            condition(q, "Ready").is_some_and(|c| c.reason == "BrokersNotReady")
                && condition(q, "Degraded").is_some_and(|c| c.status == "False")
        },
    )
    .await;
    assert!(
        q.finalizers()
            .iter()
            .any(|f| f == "sluice.dev/delete-volumes")
    );
    let pdb_ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("policy", "v1beta1", "PodDisruptionBudget"),
        "poddisruptionbudgets",
    );
    Api::<DynamicObject>::namespaced_with(client.clone(), ns, &pdb_ar)
        .get("sluice-orders")
        .await
        .unwrap();
    wait_event(&client, ns, "orders", "Created").await;
    // Lease, webhook Secret and caBundle with the namespaced Role / named rules.
    let lease: Lease = eventually("leader Lease", || async {
        Api::<Lease>::namespaced(client.clone(), rel_ns)
            .get_opt(&format!("{full}-leader"))
            .await
            .ok()
            .flatten()
    })
    .await;
    assert!(lease.spec.unwrap().holder_identity.is_some());
    eventually("webhook Secret", || async {
        Api::<Secret>::namespaced(client.clone(), rel_ns)
            .get_opt(&format!("{full}-webhook-tls"))
            .await
            .ok()
            .flatten()
    })
    .await;
    wait_ca_bundle(
        &Api::<MutatingWebhookConfiguration>::all(client.clone()),
        &format!("{full}-sidecar-injector"),
    )
    .await;
    // The chart's Queue check has its caBundle too (same name, the chart's RBAC).
    wait_ca_bundle(
        &Api::<ValidatingWebhookConfiguration>::all(client.clone()),
        &format!("{full}-sidecar-injector"),
    )
    .await;
    // The KEDA scaler reads the Queue and lists its brokers with these rights: it
    // gets as far as asking brokers (none run here).
    let mut keda = ExternalScalerClient::connect(format!("http://127.0.0.1:{}", op.scaler_port))
        .await
        .expect("connect to the scaler");
    let asked = keda
        .is_active(ScaledObjectRef {
            name: "consumers".into(),
            namespace: ns.to_string(),
            scaler_metadata: [("queue".to_string(), "orders".to_string())].into(),
        })
        .await
        .unwrap_err();
    assert_eq!(asked.code(), tonic::Code::Unavailable, "{asked:?}");
    assert!(
        asked.message().contains("no broker of Queue"),
        "not a refusal of the chart's RBAC: {asked:?}"
    );
    // Deletion with the finalizer (PVC delete) also works with these rights.
    let queues: Api<Queue> = Api::namespaced(client.clone(), ns);
    queues
        .delete("orders", &DeleteParams::default())
        .await
        .unwrap();
    eventually("Queue deleted with the chart's RBAC", || async {
        queues.get_opt("orders").await.ok()?.is_none().then_some(())
    })
    .await;

    // A pod in a namespace the (unreachable) chart webhook selects is not blocked.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    op.stop();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "unrelated"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("an unreachable webhook must not block pods");
    let log = op.log_text();
    assert!(
        !log.contains("forbidden"),
        "operator hit RBAC denials:\n{log}"
    );
    // Clean up the cluster-wide webhook so that it does not slow other tests.
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(
            &format!("{full}-sidecar-injector"),
            &DeleteParams::default(),
        )
        .await
        .unwrap();
}

/// Waits until the CRD carries a server-side apply of the operator's field manager
/// (what `sluice-operator install-crds` and `run --install-crds` do), and returns it.
async fn crd_applied_by_the_operator(client: &Client) -> CustomResourceDefinition {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    eventually("the CRD applied by the operator", || async {
        let crd = crds.get("queues.sluice.dev").await.ok()?;
        let applied = crd.metadata.managed_fields.iter().flatten().any(|f| {
            f.manager.as_deref() == Some(sluice_operator::crd::CRD_FIELD_MANAGER)
                && f.operation.as_deref() == Some("Apply")
        });
        applied.then_some(crd)
    })
    .await
}

/// Helm installs `crds/` once and never upgrades it: an older CRD (here, one printer
/// column short, as a chart from before `Oldest` would have it) is brought up to
/// this build's by `sluice-operator install-crds`, and the Queues stored under it
/// stay. (Other tests apply the CRD too; the operator's field manager in the CRD's
/// managed fields is what says this command applied it.)
#[tokio::test(flavor = "multi_thread")]
async fn an_older_crd_is_upgraded_by_install_crds_and_queues_stay() {
    let client = admin().await;
    install_crd(&client).await;
    let ns = &unique("it-crd-upgrade");
    namespace(&client, ns, json!({})).await;
    apply_queue(&client, ns, example("orders.yaml").remove(0)).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut old = serde_json::to_value(<Queue as kube::CustomResourceExt>::crd()).unwrap();
    old["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array_mut()
        .unwrap()
        .retain(|c| c["name"] != "Oldest");
    // An older chart's CRD, applied by someone else: the operator's field manager
    // then owns nothing in it.
    crds.patch(
        "queues.sluice.dev",
        &PatchParams::apply("an-older-chart").force(),
        &Patch::Apply(&old),
    )
    .await
    .unwrap();
    let out = Command::new(harness::bin_dir().join("sluice-operator"))
        .arg("install-crds")
        .env("KUBECONFIG", &cluster().kubeconfig)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install-crds: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let crd = crd_applied_by_the_operator(&client).await;
    let columns: Vec<String> = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect();
    assert!(columns.iter().any(|c| c == "Oldest"), "{columns:?}");
    let established = crd.status.and_then(|s| s.conditions).unwrap_or_default();
    assert!(
        established
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
    );
    let queues: Api<Queue> = Api::namespaced(client.clone(), ns);
    assert!(queues.get_opt("orders").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_calls_the_webhook_over_tls_and_pods_come_back_injected() {
    let client = admin().await;
    install_crd(&client).await;
    let cfg_name = &unique("it-webhook-injector");
    let ns = &unique("it-webhook");
    let off = &unique("it-webhook-off");
    namespace(&client, ns, json!({"sluice-test": cfg_name})).await;
    namespace(
        &client,
        off,
        json!({"sluice-test": cfg_name, "sluice.dev/injection": "disabled"}),
    )
    .await;
    let port = free_port();
    // As the chart does, but reached by URL (no kube-proxy here) and limited to
    // this test's namespaces; failurePolicy Fail so a TLS failure fails the test.
    let mwc = webhook_configuration(
        cfg_name,
        port,
        json!({
            "matchLabels": {"sluice-test": cfg_name},
            "matchExpressions": [{"key": "sluice.dev/injection", "operator": "NotIn", "values": ["disabled"]}]
        }),
    );
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let _ = mwcs.delete(cfg_name, &DeleteParams::default()).await;
    mwcs.create(&PostParams::default(), &mwc).await.unwrap();

    let op = start_operator(
        "webhook",
        &cluster().kubeconfig,
        &[
            &format!("--namespace={ns}"),
            &format!("--watch-namespace={ns}"),
            "--lease-name=op-webhook",
            &format!("--webhook-listen=127.0.0.1:{port}"),
            "--webhook-extra-san=127.0.0.1",
            &format!("--webhook-config-name={cfg_name}"),
            "--sidecar-image=sluice-sidecar:test",
        ],
    );
    op.wait_webhook_ready(&mwcs, cfg_name).await;

    // A queue that only the ServiceAccount "mailer" may use.
    apply_queue(&client, ns, json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "Queue",
        "metadata": {"name": "emails"},
        "spec": {"replicas": 1, "partitions": 1, "access": {"serviceAccounts": [{"name": "mailer"}]}}
    }))
    .await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let annotated = |name: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {"sluice.dev/inject": "true", "sluice.dev/queues": "orders,emails"}},
            "spec": {"containers": [{"name": "app", "image": "example/app"}]}
        }))
        .unwrap()
    };
    // The API server may need a moment to pick up the new caBundle: retry creation.
    let created = eventually("annotated pod created through the webhook", || async {
        match pods.create(&PostParams::default(), &annotated("app")).await {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("create pod: {e}");
                None
            }
        }
    })
    .await;
    let spec = created.spec.clone().unwrap();
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app", "sluice-sidecar"]);
    let side = &spec.containers[1];
    assert_eq!(side.image.as_deref(), Some("sluice-sidecar:test"));
    let env = side.env.clone().unwrap();
    let routes = env
        .iter()
        .find(|e| e.name == "SLUICE_ROUTES")
        .unwrap()
        .value
        .clone()
        .unwrap();
    assert_eq!(
        routes,
        format!("orders=sluice-orders.{ns}.svc.cluster.local:7171"),
        "emails denied to SA default"
    );
    assert_eq!(probe_path(side.readiness_probe.as_ref()), Some("/readyz"));
    let app_env = spec.containers[0].env.clone().unwrap();
    assert!(
        app_env
            .iter()
            .any(|e| e.name == "SLUICE_ADDR" && e.value.as_deref() == Some("127.0.0.1:7070"))
    );
    let ann = created.annotations();
    assert_eq!(
        ann.get("sluice.dev/injected").map(|s| s.as_str()),
        Some("true")
    );
    assert_eq!(
        ann.get("sluice.dev/denied-queues").map(|s| s.as_str()),
        Some("emails")
    );

    // Injecting twice is a no-op: a pod that already has the sidecar keeps one.
    let mut again = annotated("app2");
    let mut copied = spec.containers.clone();
    for c in &mut copied {
        c.volume_mounts = None; // the token volume belongs to the first pod
    }
    again.spec.as_mut().unwrap().containers = copied;
    let p2 = pods.create(&PostParams::default(), &again).await.unwrap();
    assert_eq!(
        p2.spec
            .unwrap()
            .containers
            .iter()
            .filter(|c| c.name == "sluice-sidecar")
            .count(),
        1
    );

    // Unannotated pods and opted-out namespaces are left alone.
    let plain: Pod = serde_json::from_value(json!({"metadata": {"name": "plain"}, "spec": {"containers": [{"name": "app", "image": "x"}]}})).unwrap();
    let p = pods.create(&PostParams::default(), &plain).await.unwrap();
    assert_eq!(p.spec.unwrap().containers.len(), 1);
    let p = Api::<Pod>::namespaced(client.clone(), off)
        .create(&PostParams::default(), &annotated("app"))
        .await
        .unwrap();
    assert_eq!(p.spec.unwrap().containers.len(), 1, "opted-out namespace");

    let (code, metrics) = op.http_get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("sluice_operator_webhook_requests_total{result=\"injected\"}"),
        "{metrics}"
    );
    mwcs.delete(cfg_name, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_would_strand_messages_are_refused_by_the_api_and_later_changes_apply() {
    let client = admin().await;
    install_crd(&client).await;
    let cfg_name = &unique("it-guard");
    let ns = &unique("it-guard");
    namespace(&client, ns, json!({"sluice-test": cfg_name})).await;
    let port = free_port();
    // As the chart does (both configurations under one name), by URL, for this
    // test's namespace only.
    let selector = json!({"matchLabels": {"sluice-test": cfg_name}});
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let vwcs: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let _ = mwcs.delete(cfg_name, &DeleteParams::default()).await;
    let _ = vwcs.delete(cfg_name, &DeleteParams::default()).await;
    mwcs.create(
        &PostParams::default(),
        &webhook_configuration(cfg_name, port, selector.clone()),
    )
    .await
    .unwrap();
    vwcs.create(
        &PostParams::default(),
        &queue_webhook_configuration(cfg_name, port, selector),
    )
    .await
    .unwrap();
    let op = start_operator(
        "guard",
        &cluster().kubeconfig,
        &[
            &format!("--namespace={ns}"),
            &format!("--watch-namespace={ns}"),
            "--lease-name=op-guard",
            &format!("--webhook-listen=127.0.0.1:{port}"),
            "--webhook-extra-san=127.0.0.1",
            &format!("--webhook-config-name={cfg_name}"),
            "--broker-image=sluice-broker:test",
        ],
    );
    op.wait_webhook_ready(&mwcs, cfg_name).await;
    wait_ca_bundle(&vwcs, cfg_name).await;

    let manifest = |spec: Value| {
        serde_json::to_string(&json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "Queue",
            "metadata": {"name": "orders", "namespace": ns},
            "spec": spec
        }))
        .unwrap()
    };
    let (ok, _, err) = kubectl_apply(&manifest(json!({"replicas": 2, "partitions": 6})), &[]);
    assert!(ok, "{err}");
    wait_queue(&client, ns, "orders", "status.layout recorded", |q| {
        q.status
            .as_ref()
            .and_then(|s| s.layout.as_ref())
            .is_some_and(|l| (l.partitions, l.brokers) == (6, 2))
    })
    .await;

    // Each change that would strand messages: kubectl prints why, nothing changes.
    let refused = [
        (
            json!({"replicas": 3, "partitions": 6, "replication": 3}),
            "spec.replication cannot change from 1 to 3 yet",
        ),
        (
            json!({"replicas": 2, "partitions": 4}),
            "spec.partitions cannot go down from 6 to 4",
        ),
        (
            json!({"replicas": 2, "partitions": 6, "storage": {"size": "512Mi"}}),
            "spec.storage.size cannot go down from 1Gi to 512Mi: Kubernetes cannot shrink a volume claim; keep 1Gi or more",
        ),
        (
            json!({"replicas": 2, "partitions": 6, "storage": {"size": "1Gi", "storageClassName": "fast"}}),
            "spec.storage.storageClassName cannot change from the cluster default class to fast",
        ),
    ];
    for (spec, why) in refused {
        // The API server may need a moment to trust the new caBundle: retry until
        // the webhook itself answers.
        let err = eventually(&format!("the webhook refuses {spec}"), || async {
            let (ok, _, err) = kubectl_apply(&manifest(spec.clone()), &[]);
            assert!(!ok, "{spec} was applied");
            err.contains("denied the request").then_some(err)
        })
        .await;
        assert!(err.contains(why), "{spec}: {err}");
        assert!(
            err.contains("create a new Queue") || err.contains("keep "),
            "{err}"
        );
    }
    let q: Queue = Api::namespaced(client.clone(), ns)
        .get("orders")
        .await
        .unwrap();
    assert_eq!(
        (q.spec.replicas, q.spec.partitions),
        (2, 6),
        "nothing of it stored"
    );

    // A Queue's partitions are Raft groups, so even its single copies move: the
    // webhook lets a change of replicas through (the move is the reconciler's).
    let q: Queue = Api::namespaced(client.clone(), ns)
        .get("orders")
        .await
        .unwrap();
    assert!(q.status.unwrap().layout.unwrap().raft);
    let (ok, _, err) = kubectl_apply(
        &manifest(json!({"replicas": 3, "partitions": 6})),
        &["--dry-run=server"],
    );
    assert!(ok, "{err}");

    // Not wedged: a valid change applies and rolls out.
    let (ok, _, err) = kubectl_apply(
        &manifest(
            json!({"replicas": 2, "partitions": 8, "delivery": {"visibilityTimeout": "45s"}}),
        ),
        &[],
    );
    assert!(ok, "{err}");
    let q = wait_queue(&client, ns, "orders", "8 partitions rolled out", |q| {
        q.status
            .as_ref()
            .and_then(|s| s.layout.as_ref())
            .is_some_and(|l| (l.partitions, l.brokers) == (8, 2))
    })
    .await;
    assert_eq!(condition(&q, "Degraded").unwrap().status, "False");
    let hash = q.status.as_ref().unwrap().config_hash.clone().unwrap();
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(&format!("sluice-orders-config-{hash}"))
        .await
        .unwrap();
    let toml = &cm.data.unwrap()["broker.toml"];
    assert!(
        toml.contains("partitions = 8") && toml.contains("visibility_timeout = \"45s\""),
        "{toml}"
    );
    // Metadata-only updates pass too (the operator's finalizer patches are ones).
    let (ok, _, err) = kubectl_apply(
        &manifest(
            json!({"replicas": 2, "partitions": 8, "delivery": {"visibilityTimeout": "45s"}, "deletionPolicy": "Delete"}),
        ),
        &[],
    );
    assert!(ok, "{err}");
    wait_queue(&client, ns, "orders", "finalizer added", |q| {
        q.finalizers()
            .iter()
            .any(|f| f == "sluice.dev/delete-volumes")
    })
    .await;

    let (_, metrics) = op.http_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("sluice_operator_webhook_requests_total{result=\"queue_refused\"}"),
        "{metrics}"
    );
    // Deletion passes (DELETE is not checked) and the finalizer is released.
    let queues: Api<Queue> = Api::namespaced(client.clone(), ns);
    queues
        .delete("orders", &DeleteParams::default())
        .await
        .unwrap();
    eventually("Queue deleted through its finalizer", || async {
        queues.get_opt("orders").await.ok()?.is_none().then_some(())
    })
    .await;
    mwcs.delete(cfg_name, &DeleteParams::default())
        .await
        .unwrap();
    vwcs.delete(cfg_name, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_leader_and_fail_over() {
    let client = admin().await;
    install_crd(&client).await;
    let ns = &unique("it-leader");
    namespace(&client, ns, json!({})).await;
    let args = [
        format!("--watch-namespace={ns}"),
        format!("--namespace={ns}"),
        "--lease-name=it-leader".to_string(),
        "--lease-duration=6s".to_string(),
        "--disable-webhook".to_string(),
        "--log-format=json".to_string(),
    ];
    let mut a = start_operator(
        "leader-a",
        &cluster().kubeconfig,
        &[as_refs(&args), vec!["--identity=replica-a"]].concat(),
    );
    let mut b = start_operator(
        "leader-b",
        &cluster().kubeconfig,
        &[as_refs(&args), vec!["--identity=replica-b"]].concat(),
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let holder = eventually("a leader", || async {
        leases
            .get_opt("it-leader")
            .await
            .ok()
            .flatten()?
            .spec?
            .holder_identity
            .filter(|h| !h.is_empty())
    })
    .await;
    let leader_gauge = |body: &str| {
        body.lines()
            .find(|l| l.starts_with("sluice_operator_leader "))
            .map(|l| l.ends_with(" 1"))
    };
    let (leader, follower) = if holder == "replica-a" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    eventually(
        "leader gauge 1 on the leader, 0 on the follower",
        || async {
            let l = leader_gauge(&leader.http_get("/metrics").await?.1)?;
            let f = leader_gauge(&follower.http_get("/metrics").await?.1)?;
            (l && !f).then_some(())
        },
    )
    .await;
    assert_eq!(follower.http_get("/healthz").await.unwrap().0, 200);
    assert_eq!(follower.http_get("/readyz").await.unwrap().0, 200);
    // The leader reconciles.
    apply_queue(&client, ns, json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "Queue", "metadata": {"name": "one"}, "spec": {"replicas": 1, "partitions": 1}})).await;
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    wait_statefulset(&sts_api, "sluice-one", "from the leader").await;
    // JSON logs when asked.
    let first = leader.log_text().lines().next().unwrap_or("").to_string();
    serde_json::from_str::<Value>(&first)
        .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {first}"));

    // The leader goes away: the follower takes the Lease and reconciles.
    let new_holder = if holder == "replica-a" {
        "replica-b"
    } else {
        "replica-a"
    };
    leader.stop();
    eventually("follower takes over the Lease", || async {
        let h = leases
            .get_opt("it-leader")
            .await
            .ok()
            .flatten()?
            .spec?
            .holder_identity?;
        (h == new_holder).then_some(())
    })
    .await;
    apply_queue(&client, ns, json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "Queue", "metadata": {"name": "two"}, "spec": {"replicas": 1, "partitions": 1}})).await;
    wait_statefulset(&sts_api, "sluice-two", "from the new leader").await;
    let m = follower.http_get("/metrics").await.unwrap().1;
    assert_eq!(leader_gauge(&m), Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_lint_and_install_succeed() {
    let client = admin().await;
    install_crd(&client).await;
    let chart = repo_root().join("charts/sluice");
    let rel = &unique("it-helm");
    let hns = &unique("it-helm-system");
    let (ok, out, err) = run(Command::new(helm()).arg("lint").arg("--strict").arg(&chart));
    assert!(ok, "helm lint: {out}{err}");
    assert!(out.contains("0 chart(s) failed"), "{out}");
    // cert-manager mode renders too (not applied: no cert-manager CRDs here).
    let cm = helm_template(
        "x",
        "cm",
        &["--set", "webhook.certificates.mode=certManager"],
    );
    assert!(cm.contains("kind: Certificate") && cm.contains("cert-manager.io/inject-ca-from"));
    use serde::Deserialize;
    // Monitoring: the dashboard's ConfigMap by default (Grafana's sidecar label);
    // the PodMonitor and PrometheusRule when asked for, carrying the chart's files.
    let plain = helm_template("x", "mon", &[]);
    assert!(
        plain.contains("grafana_dashboard: \"1\"") && plain.contains("\"uid\": \"sluice-queues\""),
        "{plain}"
    );
    assert!(!plain.contains("kind: PrometheusRule") && !plain.contains("kind: PodMonitor"));
    assert!(
        !plain.contains("--otlp-endpoint"),
        "no span export by default"
    );
    let traced = helm_template(
        "x",
        "mon",
        &["--set", "tracing.otlpEndpoint=http://otel-collector:4317"],
    );
    assert!(
        traced.contains("- --otlp-endpoint=http://otel-collector:4317"),
        "{traced}"
    );
    let monitored = helm_template(
        "x",
        "mon",
        &[
            "--set",
            "monitoring.podMonitor.enabled=true",
            "--set",
            "monitoring.prometheusRule.enabled=true",
        ],
    );
    let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&monitored)
        .filter_map(|d| serde_json::Value::deserialize(d).ok())
        .filter(|d| !d.is_null())
        .collect();
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).cloned();
    let rule = kind("PrometheusRule").expect("a PrometheusRule");
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert!(
        alerts.contains(&"SluicePartitionWithoutLeader"),
        "{alerts:?}"
    );
    let monitor = kind("PodMonitor").expect("a PodMonitor");
    assert_eq!(monitor["spec"]["podTargetLabels"][0], "sluice.dev/queue");
    assert_eq!(monitor["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    let (ok, out, err) = run(Command::new(helm())
        .env("KUBECONFIG", &cluster().kubeconfig)
        .args(["install", rel.as_str()])
        .arg(&chart)
        .args([
            "--namespace",
            hns.as_str(),
            "--create-namespace",
            "--set",
            "operator.replicas=2",
            "--set",
            "webhook.namespaceSelector.matchLabels.sluice-test=helm-install",
            "--wait=hookOnly",
        ]));
    assert!(ok, "helm install: {out}{err}");
    assert!(out.contains("STATUS: deployed"), "{out}");
    assert!(
        out.contains("kubectl apply"),
        "NOTES.txt tells what to do next: {out}"
    );
    let (ok, out, err) = run(Command::new(helm())
        .env("KUBECONFIG", &cluster().kubeconfig)
        .args(["status", rel.as_str(), "--namespace", hns.as_str()]));
    assert!(ok && out.contains("deployed"), "{out}{err}");
    let deploy: k8s_openapi::api::apps::v1::Deployment =
        Api::namespaced(client.clone(), hns.as_str())
            .get(&format!("{rel}-sluice"))
            .await
            .unwrap();
    assert_eq!(deploy.spec.unwrap().replicas, Some(2));
    // Remove the cluster-wide webhook so it does not slow other tests' pods.
    let (ok, _, err) = run(Command::new(helm())
        .env("KUBECONFIG", &cluster().kubeconfig)
        .args(["uninstall", rel.as_str(), "--namespace", hns.as_str()]));
    assert!(ok, "helm uninstall: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_certificate_rotates_and_keeps_serving() {
    let client = admin().await;
    install_crd(&client).await;
    let cfg_name = &unique("it-rotate-injector");
    let ns = &unique("it-rotate");
    namespace(&client, ns, json!({"sluice-test": cfg_name})).await;
    let port = free_port();
    let mwc = webhook_configuration(
        cfg_name,
        port,
        json!({"matchLabels": {"sluice-test": cfg_name}}),
    );
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    mwcs.create(&PostParams::default(), &mwc).await.unwrap();
    // A certificate that is always inside its renewal window: every check rotates it.
    let op = start_operator(
        "rotate",
        &cluster().kubeconfig,
        &[
            &format!("--namespace={ns}"),
            &format!("--watch-namespace={ns}"),
            "--lease-name=op-rotate",
            &format!("--webhook-listen=127.0.0.1:{port}"),
            "--webhook-extra-san=127.0.0.1",
            &format!("--webhook-config-name={cfg_name}"),
            "--cert-validity=1h",
            "--cert-renew-before=2h",
            "--cert-check-interval=1s",
        ],
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let first = eventually("webhook Secret", || async {
        secrets
            .get_opt("sluice-webhook-tls")
            .await
            .ok()
            .flatten()?
            .data?
            .get("tls.crt")
            .cloned()
    })
    .await;
    eventually("certificate rotated", || async {
        let now = secrets
            .get("sluice-webhook-tls")
            .await
            .ok()?
            .data?
            .get("tls.crt")
            .cloned()?;
        (now != first).then_some(())
    })
    .await;
    // During a rotation the bundle holds the new and the previous CA.
    eventually("caBundle with two CAs", || async {
        let c = mwcs.get(cfg_name).await.ok()?;
        let b = c.webhooks?[0].client_config.ca_bundle.clone()?;
        (String::from_utf8_lossy(&b.0)
            .matches("BEGIN CERTIFICATE")
            .count()
            == 2)
            .then_some(())
    })
    .await;
    let (_, m) = op.http_get("/metrics").await.unwrap();
    assert!(
        m.contains("sluice_operator_webhook_certificate_rotations_total"),
        "{m}"
    );
    // The API server still reaches the webhook over TLS after rotations.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    for i in 0..3 {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("app{i}"), "annotations": {"sluice.dev/inject": "true", "sluice.dev/queues": "orders"}},
            "spec": {"containers": [{"name": "app", "image": "example/app"}]}
        }))
        .unwrap();
        let created = eventually("pod created through the rotated webhook", || async {
            match pods.create(&PostParams::default(), &pod).await {
                Ok(p) => Some(p),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    pods.get(&format!("app{i}")).await.ok()
                }
                Err(_) => None,
            }
        })
        .await;
        assert_eq!(created.spec.unwrap().containers.len(), 2);
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    }
    mwcs.delete(cfg_name, &DeleteParams::default())
        .await
        .unwrap();
}
