//! End-to-end scenarios: a real control plane, the operator, the node agent running
//! the pods as local processes, cluster DNS; brokers that store and deliver messages
//! and an injected sidecar that an app talks to. Each test runs in a world of its own
//! (network, mount and PID namespaces; see sluice_e2e::harness and docs/e2e.md), or
//! on the cluster `SLUICE_E2E_KUBECONFIG` points at. They reach the cluster through
//! its API only (the app pods' job servers through the pod proxy); the checks that
//! look at this machine's node (volume directories, processes, direct connections
//! to broker pod IPs) run where the node is ours.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, ServiceAccount};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use sluice_e2e::harness::{AppJob, Crash, REMOTE_ENV, World, WorldOptions, isolated, pod_ready};
use sluice_proto::v1::{self, queues_client::QueuesClient};
use sluice_testkit::{eventually, eventually_within};
use std::sync::Arc;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn queue_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("sluice.dev", "v1alpha1", "Queue");
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

async fn apply_queue(client: &Client, ns: &str, name: &str, spec: Value) {
    let q = json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "Queue",
                   "metadata": {"name": name}, "spec": spec});
    queue_api(client, ns)
        .patch(
            name,
            &PatchParams::apply("sluice-e2e").force(),
            &Patch::Apply(&q),
        )
        .await
        .expect("apply Queue");
}

fn condition(obj: &Value, type_: &str) -> Option<(String, String, String)> {
    obj.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
                c["message"].as_str().unwrap_or("").to_string(),
            )
        })
}

/// Waits until the Queue reports Ready=True with `replicas` ready brokers and every
/// broker pod is Ready; returns the broker pods.
/// The queue most scenarios start from: `orders` in `ns` (an app namespace), 3 brokers
/// over 6 partitions, all Ready. Returns the broker pods.
async fn three_broker_orders(w: &World, ns: &str) -> Vec<Pod> {
    three_broker_orders_with(w, ns, 1).await
}

/// [`three_broker_orders`] with `replication` copies of each partition.
async fn three_broker_orders_with(w: &World, ns: &str, replication: u32) -> Vec<Pod> {
    w.app_namespace(ns).await;
    apply_queue(
        &w.client,
        ns,
        "orders",
        json!({"replicas": 3, "partitions": 6, "replication": replication,
               "storage": {"size": "1Gi"}}),
    )
    .await;
    let pods = queue_ready(&w.client, ns, "orders", 3).await;
    // What was asked for, nothing held back: a reconcile that guessed the layout
    // once refused the replication and rolled the brokers to single copies.
    let q = serde_json::to_value(queue_api(&w.client, ns).get("orders").await.unwrap()).unwrap();
    assert_eq!(
        q.pointer("/status/layout/replication")
            .and_then(Value::as_u64),
        Some(replication.into()),
        "{q}"
    );
    assert_eq!(
        condition(&q, "Degraded").map(|c| c.0).as_deref(),
        Some("False"),
        "{q}"
    );
    partitions_led(&w.client, ns, replication).await;
    pods
}

/// `orders` in the app namespace `ns` on 2 brokers over 4 partitions, Ready, and the
/// app pod `app` (ServiceAccount `default`) routed to it, Ready.
async fn orders_on_two_brokers_with_an_app(w: &World, ns: &str) {
    w.app_namespace(ns).await;
    apply_queue(
        &w.client,
        ns,
        "orders",
        json!({"replicas": 2, "partitions": 4, "storage": {"size": "1Gi"}}),
    )
    .await;
    queue_ready(&w.client, ns, "orders", 2).await;
    w.app_pod(ns, "app", "orders", "default").await;
}

/// Waits for the operator to report, from the brokers' own reports, every one of
/// the 6 partitions of `orders` led with all `replication` copies in sync.
async fn partitions_led(client: &Client, ns: &str, replication: u32) {
    partitions_of_led(client, ns, 6, replication).await
}

/// [`partitions_led`] for a Queue of `partitions` partitions.
async fn partitions_of_led(client: &Client, ns: &str, partitions: usize, replication: u32) {
    let queues = queue_api(client, ns);
    eventually("every partition led, all copies in sync", || async {
        let q = serde_json::to_value(queues.get("orders").await.ok()?).ok()?;
        let (status, reason, _) = condition(&q, "Available")?;
        let parts = q.pointer("/status/partitions")?.as_array()?;
        let all_in_sync = parts.len() == partitions
            && parts.iter().all(|p| {
                p["leader"]
                    .as_str()
                    .is_some_and(|l| l.starts_with("sluice-orders-"))
                    && p["inSync"].as_u64() == Some(replication.into())
            });
        (status == "True" && reason == "AllPartitionsLed" && all_in_sync).then_some(())
    })
    .await;
}

async fn queue_ready(client: &Client, ns: &str, name: &str, replicas: usize) -> Vec<Pod> {
    let queues = queue_api(client, ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("Queue {ns}/{name} Ready=True with {replicas} ready brokers"),
        || async {
            let q = serde_json::to_value(queues.get(name).await.ok()?).ok()?;
            let (status, reason, _) = condition(&q, "Ready")?;
            let ready = q.pointer("/status/readyReplicas")?.as_u64()? as usize;
            (status == "True" && reason == "AllBrokersReady" && ready == replicas).then_some(())
        },
    )
    .await;
    eventually("every broker pod Ready", || async {
        let list = pods
            .list(&ListParams::default().labels(&format!("sluice.dev/queue={name}")))
            .await
            .ok()?;
        (list.items.len() == replicas && list.items.iter().all(pod_ready)).then_some(list.items)
    })
    .await
}

/// Through the app pod `pod`'s sidecar: `count` messages `<prefix>-<i>` into `orders`,
/// every one acknowledged. Returns the producer's result.
async fn produce_all(w: &World, ns: &str, pod: &str, prefix: &str, count: u64) -> Value {
    let n = count.to_string();
    let args = [
        "produce", "--queue", "orders", "--count", &n, "--prefix", prefix,
    ];
    let produced = w.app(ns, pod, &args).await;
    assert_eq!(produced["acked"], count, "{produced}");
    assert_eq!(produced["failed"], 0, "{produced}");
    produced
}

/// Dequeues and acks from `orders` until every `<prefix>-<i>` (i < count) was
/// received. Returns the consumer's result.
async fn consume_all(w: &World, ns: &str, pod: &str, prefix: &str, count: u64) -> Value {
    let n = count.to_string();
    let args = [
        "consume", "--queue", "orders", "--count", &n, "--prefix", prefix,
    ];
    let consumed = w.app(ns, pod, &args).await;
    assert_eq!(consumed["missing"], 0, "{consumed}");
    consumed
}

/// Consumes until every message the produce job `producer` had acknowledged
/// (`n_acked` of them) was delivered at least once.
async fn consume_acknowledged(w: &World, ns: &str, pod: &str, producer: &AppJob, n_acked: u64) {
    let id = producer.id.to_string();
    let args = ["consume", "--queue", "orders", "--expect-job", &id];
    let consumed = w.app(ns, pod, &args).await;
    assert_eq!(
        consumed["missing"], 0,
        "acknowledged messages lost: {consumed}"
    );
    assert_eq!(consumed["expected"].as_u64().unwrap(), n_acked);
}

async fn round_trip(w: &World, ns: &str, pod: &str, prefix: &str, count: u64) {
    produce_all(w, ns, pod, prefix, count).await;
    consume_all(w, ns, pod, prefix, count).await;
}

fn container_names(p: &Pod) -> Vec<String> {
    p.spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .map(|c| c.name.clone())
        .collect()
}

#[test]
fn queue_with_three_replicas_runs_three_ready_brokers_on_bound_volumes() {
    isolated(
        "queue_with_three_replicas_runs_three_ready_brokers_on_bound_volumes",
        WorldOptions::default(),
        queue_with_three_replicas_runs_three_ready_brokers_on_bound_volumes_in,
    );
}

async fn queue_with_three_replicas_runs_three_ready_brokers_on_bound_volumes_in(w: Arc<World>) {
    let client = w.client.clone();
    let ns = &w.ns("shop");
    let brokers = three_broker_orders(&w, ns).await;

    // Every broker has its own IP and answers its readiness endpoint on it.
    let mut ips: Vec<String> = brokers
        .iter()
        .map(|p| p.status.as_ref().unwrap().pod_ip.clone().expect("pod IP"))
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 3, "three distinct pod IPs: {ips:?}");
    for p in &brokers {
        let name = p.name_any();
        let ready = w.pod_get(ns, &name, 9090, "/readyz").await;
        assert!(ready.is_some(), "{name} answers /readyz on its pod IP");
    }

    // Each claim is bound to a volume (here: one the agent provisioned, into which
    // the broker wrote its partitions: the PVC really is its /var/lib/sluice).
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    for i in 0..3 {
        let pvc = pvcs
            .get(&format!("data-sluice-orders-{i}"))
            .await
            .expect("claim");
        assert_eq!(pvc.status.as_ref().unwrap().phase.as_deref(), Some("Bound"));
        let pv = pvs
            .get(pvc.spec.as_ref().unwrap().volume_name.as_ref().unwrap())
            .await
            .unwrap();
        if w.node().is_some() {
            let dir = pv.spec.unwrap().host_path.unwrap().path;
            let entries = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
            assert!(
                entries > 0,
                "broker {i} wrote nothing into its volume {dir}"
            );
        }
    }

    // The Queue's status tells the truth.
    let q = serde_json::to_value(queue_api(&client, ns).get("orders").await.unwrap()).unwrap();
    assert_eq!(q.pointer("/status/readyReplicas"), Some(&json!(3)));
    let (status, reason, _) = condition(&q, "Progressing").unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "RolloutComplete"),
        "{q}"
    );
    let endpoints = q
        .pointer("/status/endpoints")
        .and_then(|e| e.as_array())
        .unwrap();
    assert_eq!(endpoints.len(), 3);
}

#[test]
fn injected_sidecar_carries_ten_thousand_messages() {
    isolated(
        "injected_sidecar_carries_ten_thousand_messages",
        WorldOptions::default(),
        injected_sidecar_carries_ten_thousand_messages_in,
    );
}

async fn injected_sidecar_carries_ten_thousand_messages_in(w: Arc<World>) {
    let client = w.client.clone();
    let ns = &w.ns("shop");
    three_broker_orders(&w, ns).await;

    let created = w.app_pod(ns, "app", "orders", "default").await;
    assert_eq!(
        container_names(&created),
        ["app", "sluice-sidecar"],
        "sidecar injected"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = pods.get("app").await.unwrap();
    let statuses = pod.status.unwrap().container_statuses.unwrap();
    assert!(
        statuses.iter().all(|s| s.ready),
        "both containers ready: {statuses:?}"
    );
    let env = created.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap_or_default();
    assert!(
        env.iter().any(|e| e.name == "SLUICE_ADDR"),
        "SLUICE_ADDR injected into the app"
    );

    produce_all(&w, ns, "app", "m", 10_000).await;
    let before = w.app(ns, "app", &["stats", "--queue", "orders"]).await;
    assert_eq!(before["ready"], 10000, "stats after enqueue: {before}");

    let consumed = consume_all(&w, ns, "app", "m", 10_000).await;
    assert_eq!(consumed["unique"], 10000, "{consumed}");
    assert!(consumed["acked"].as_u64().unwrap() >= 10000, "{consumed}");

    let after = w.app(ns, "app", &["stats", "--queue", "orders"]).await;
    assert_eq!(after["ready"], 0, "{after}");
    assert_eq!(after["in_flight"], 0, "{after}");
    assert_eq!(after["enqueued_total"], 10000, "{after}");
    assert_eq!(after["acked_total"], 10000, "{after}");
}

#[test]
fn keda_scaler_wakes_consumers_on_the_first_message_and_lets_them_go_to_zero() {
    isolated(
        "keda_scaler_wakes_consumers_on_the_first_message_and_lets_them_go_to_zero",
        WorldOptions::default(),
        keda_scaler_in,
    );
}

/// KEDA's side of the external scaler API, with the client generated from KEDA's
/// proto, against the operator and real brokers: what a ScaledObject of type
/// `external-push` with `queue: orders` sees while the queue fills and drains.
async fn keda_scaler_in(w: Arc<World>) {
    use sluice_proto::externalscaler::external_scaler_client::ExternalScalerClient;
    use sluice_proto::externalscaler::{GetMetricsRequest, ScaledObjectRef};
    let Some(op) = &w.operator else {
        eprintln!("skipped: the operator runs in the cluster, its scaler port is not ours");
        return;
    };
    let ns = &w.ns("shop");
    orders_on_two_brokers_with_an_app(&w, ns).await;

    let mut keda = ExternalScalerClient::connect(format!("http://127.0.0.1:{}", op.scaler_port))
        .await
        .expect("connect to the operator's scaler");
    let trigger = |meta: &[(&str, &str)]| ScaledObjectRef {
        name: "consumers".into(),
        namespace: ns.to_string(),
        scaler_metadata: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let orders = trigger(&[("queue", "orders"), ("target", "4")]);
    let metrics = |r: &ScaledObjectRef| GetMetricsRequest {
        scaled_object_ref: Some(r.clone()),
        metric_name: format!("sluice-{ns}-orders-backlog"),
    };
    let backlog = |res: tonic::Response<sluice_proto::externalscaler::GetMetricsResponse>| {
        res.into_inner().metric_values[0].metric_value_float
    };

    let spec = keda
        .get_metric_spec(orders.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    assert_eq!(
        spec.metric_specs[0].metric_name,
        format!("sluice-{ns}-orders-backlog")
    );
    assert_eq!(spec.metric_specs[0].target_size_float, 4.0);
    let mut activity = keda
        .stream_is_active(orders.clone())
        .await
        .expect("StreamIsActive")
        .into_inner();
    let mut next_activity = async || {
        tokio::time::timeout(std::time::Duration::from_secs(60), activity.message())
            .await
            .expect("an activity change pushed")
            .expect("the stream stays open")
            .expect("an answer")
            .result
    };
    assert!(
        !next_activity().await,
        "an empty queue: consumers may go to zero"
    );
    assert!(
        !keda
            .is_active(orders.clone())
            .await
            .unwrap()
            .into_inner()
            .result
    );
    assert_eq!(
        backlog(keda.get_metrics(metrics(&orders)).await.unwrap()),
        0.0
    );

    produce_all(&w, ns, "app", "wake", 10).await;
    assert!(
        next_activity().await,
        "the first messages wake the consumers"
    );
    assert!(
        keda.is_active(orders.clone())
            .await
            .unwrap()
            .into_inner()
            .result
    );
    assert_eq!(
        backlog(keda.get_metrics(metrics(&orders)).await.unwrap()),
        10.0
    );
    let age = trigger(&[("queue", "orders"), ("metric", "oldestAgeSeconds")]);
    let res = keda.get_metrics(metrics(&age)).await.unwrap().into_inner();
    assert!(res.metric_values[0].metric_value_float > 0.0, "{res:?}");

    consume_all(&w, ns, "app", "wake", 10).await;
    assert!(!next_activity().await, "drained: back to zero");
    assert_eq!(
        backlog(keda.get_metrics(metrics(&orders)).await.unwrap()),
        0.0
    );

    let missing = keda
        .is_active(trigger(&[("queue", "payments")]))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    assert!(missing.message().contains("payments"), "{missing:?}");
    let unnamed = keda.get_metric_spec(trigger(&[])).await.unwrap_err();
    assert_eq!(unnamed.code(), tonic::Code::InvalidArgument, "{unnamed:?}");
}

/// The name of the volume bound to a claim.
async fn volume_of(client: &Client, ns: &str, claim: &str) -> String {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pvc = pvcs.get(claim).await.expect("claim");
    pvc.spec.unwrap().volume_name.expect("claim bound")
}

/// On the real node: the deleted pod's broker gets SIGTERM and its grace from the
/// kubelet, the crashed one a SIGKILL through containerd, and the kubelet restarts it.
#[test]
fn brokers_deleted_and_killed_during_traffic_lose_no_acknowledged_message() {
    isolated(
        "brokers_deleted_and_killed_during_traffic_lose_no_acknowledged_message",
        WorldOptions {
            real_node: true,
            ..WorldOptions::default()
        },
        brokers_deleted_and_killed_during_traffic,
    );
}

/// Scenario 4 with the local world seen as a cluster reached only by its KUBECONFIG
/// (`WorldOptions::as_remote`): the chart installs the operator, the "kill" deletes
/// the pod without grace, and only the API is used. What `SLUICE_E2E_KUBECONFIG`
/// does on a real cluster, exercised here.
#[test]
fn through_the_kubeconfig_only_crashed_brokers_lose_no_acknowledged_message() {
    if std::env::var_os(REMOTE_ENV).is_some() {
        eprintln!("on a real cluster already: the scenario above covers this");
        return;
    }
    isolated(
        "through_the_kubeconfig_only_crashed_brokers_lose_no_acknowledged_message",
        WorldOptions {
            as_remote: true,
            real_node: true,
            ..WorldOptions::default()
        },
        brokers_deleted_and_killed_during_traffic,
    );
}

/// Scenario 4 with three copies of each partition: the brokers find each other by
/// the pods' names under the headless Service (the cluster DNS), the writes go on
/// through the sidecar while brokers die, and nothing acknowledged is lost.
#[test]
fn replicated_brokers_deleted_and_killed_during_traffic_lose_no_acknowledged_message() {
    isolated(
        "replicated_brokers_deleted_and_killed_during_traffic_lose_no_acknowledged_message",
        WorldOptions::default(),
        |w| brokers_deleted_and_killed(w, 3),
    );
}

/// A replicated broker loses its volume under traffic: its PersistentVolumeClaim and
/// its pod are deleted while a producer writes 10,000 messages. The StatefulSet
/// brings the pod back on a new, empty volume; the broker is rebuilt from its peers,
/// and every one of the 10,000 messages is acknowledged and delivered.
#[test]
fn replicated_broker_losing_its_volume_under_traffic_loses_no_message() {
    isolated(
        "replicated_broker_losing_its_volume_under_traffic_loses_no_message",
        WorldOptions::default(),
        broker_volume_lost_under_traffic,
    );
}

async fn broker_volume_lost_under_traffic(w: Arc<World>) {
    let client = w.client.clone();
    let ns = &w.ns("shop");
    three_broker_orders_with(&w, ns, 3).await;
    let claim = "data-sluice-orders-1";
    let volume_before = volume_of(&client, ns, claim).await;
    w.app_pod(ns, "app", "orders", "default").await;
    let producer = producing(&w, ns, 10_000, "v").await;

    // The claim goes once its pod does (the claim's protection finalizer).
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    claims
        .delete(claim, &DeleteParams::default())
        .await
        .expect("delete the broker's claim");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.delete("sluice-orders-1", &DeleteParams::default())
        .await
        .expect("delete the broker pod");

    let produced = producer.result().await;
    assert_eq!(
        produced["acked"].as_u64(),
        Some(10_000),
        "every write acknowledged: {produced}"
    );
    queue_ready(&client, ns, "orders", 3).await;
    assert_ne!(
        volume_of(&client, ns, claim).await,
        volume_before,
        "the broker came back on a new volume"
    );
    consume_acknowledged(&w, ns, "app", &producer, 10_000).await;
    // The rebuilt copy is in sync again, as the brokers tell the operator.
    partitions_led(&client, ns, 3).await;
}

/// A producer job in the app pod `app` writing `count` messages `<prefix>-<i>` into
/// `orders`, 16 at a time, once 2,000 of them are acknowledged.
async fn producing(w: &World, ns: &str, count: u64, prefix: &str) -> AppJob {
    let count = count.to_string();
    let args = [
        "produce",
        "--queue",
        "orders",
        "--count",
        &count,
        "--prefix",
        prefix,
        "--concurrency",
        "16",
    ];
    let producer = w.app_job(ns, "app", &args).await;
    eventually("traffic flowing", || async {
        (producer.acked().await >= 2000).then_some(())
    })
    .await;
    producer
}

async fn brokers_deleted_and_killed_during_traffic(w: Arc<World>) {
    brokers_deleted_and_killed(w, 1).await
}

async fn brokers_deleted_and_killed(w: Arc<World>, replication: u32) {
    let client = w.client.clone();
    let ns = &w.ns("shop");
    let before = three_broker_orders_with(&w, ns, replication).await;
    let uid_of = |pods: &[Pod], name: &str| {
        pods.iter()
            .find(|p| p.name_any() == name)
            .map(|p| p.uid())
            .unwrap()
    };
    let (uid1, uid2) = (
        uid_of(&before, "sluice-orders-1"),
        uid_of(&before, "sluice-orders-2"),
    );
    let pv1 = volume_of(&client, ns, "data-sluice-orders-1").await;
    let pv2 = volume_of(&client, ns, "data-sluice-orders-2").await;
    w.app_pod(ns, "app", "orders", "default").await;

    // Traffic: a producer job remembers every acknowledged message.
    let producer = producing(&w, ns, 20_000, "k").await;

    // Delete one broker pod (SIGTERM, grace) and crash another mid-traffic.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.delete("sluice-orders-1", &DeleteParams::default())
        .await
        .expect("delete broker pod");
    let crash = w.crash(ns, "sluice-orders-2", "broker").await;
    let at_kill = producer.acked().await;

    let produced = producer.result().await;
    let n_acked = produced["acked"].as_u64().unwrap();
    assert!(
        n_acked > at_kill,
        "traffic went on after the kills: {produced}"
    );

    // Both come back, on the same volumes: a new pod for the deleted one; the
    // crashed one restarted in place (SIGKILL) or recreated (deleted without grace).
    let after = queue_ready(&client, ns, "orders", 3).await;
    assert_ne!(
        uid_of(&after, "sluice-orders-1"),
        uid1,
        "sluice-orders-1 was recreated"
    );
    let p2 = after
        .iter()
        .find(|p| p.name_any() == "sluice-orders-2")
        .unwrap();
    match crash {
        Crash::InPlace => {
            let restarts = p2
                .status
                .as_ref()
                .unwrap()
                .container_statuses
                .as_ref()
                .unwrap()[0]
                .restart_count;
            assert_eq!(p2.uid(), uid2, "the killed broker kept its pod");
            assert!(restarts >= 1, "the killed broker was restarted in place");
        }
        Crash::Recreated => assert_ne!(p2.uid(), uid2, "sluice-orders-2 was recreated"),
    }
    assert_eq!(volume_of(&client, ns, "data-sluice-orders-1").await, pv1);
    assert_eq!(volume_of(&client, ns, "data-sluice-orders-2").await, pv2);
    eventually("app pod Ready again", || async {
        pods.get("app").await.ok().filter(pod_ready).map(|_| ())
    })
    .await;

    // Every acknowledged message is delivered (at least once).
    consume_acknowledged(&w, ns, "app", &producer, n_acked).await;
}

/// A replicated Queue grows from 3 to 5 brokers and back to 3 while producers
/// write keyed messages through the sidecar: the copies move live (the Queue says
/// PartitionsMoving, then records the new placement from the brokers' reports),
/// every acknowledged message is delivered, and each key in order.
#[test]
fn replicated_queue_scales_up_and_down_under_traffic_by_moving_its_partitions() {
    isolated(
        "replicated_queue_scales_up_and_down_under_traffic_by_moving_its_partitions",
        WorldOptions::default(),
        replicated_queue_scales_by_moving_partitions_in,
    );
}

/// Waits until `orders` (6 partitions of 3 copies) has moved its copies onto
/// `brokers` brokers: the layout records them with no move under way, and the
/// Queue said PartitionsMoving on the way (sampled).
async fn moved_onto(client: &Client, ns: &str, brokers: u64) -> Value {
    copies_moved_onto(client, ns, brokers, 6, 3).await
}

/// [`moved_onto`] for `partitions` partitions of `copies` copies.
async fn copies_moved_onto(
    client: &Client,
    ns: &str,
    brokers: u64,
    partitions: usize,
    copies: usize,
) -> Value {
    let queues = queue_api(client, ns);
    let saw_moving = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let q = eventually_within(
        &format!("copies moved onto {brokers} brokers"),
        std::time::Duration::from_secs(300),
        || {
            let (queues, saw) = (queues.clone(), saw_moving.clone());
            async move {
                let q = serde_json::to_value(queues.get("orders").await.ok()?).ok()?;
                if condition(&q, "Progressing")
                    .is_some_and(|(s, r, _)| s == "True" && r == "PartitionsMoving")
                {
                    saw.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                let layout = q.pointer("/status/layout")?;
                (layout["brokers"].as_u64() == Some(brokers) && layout.get("movingTo").is_none())
                    .then_some(q)
            }
        },
    )
    .await;
    assert!(
        saw_moving.load(std::sync::atomic::Ordering::Relaxed),
        "Progressing=True PartitionsMoving was reported during the move"
    );
    let placement = q
        .pointer("/status/layout/placement")
        .and_then(Value::as_array)
        .unwrap();
    assert_eq!(placement.len(), partitions, "{q}");
    for placed in placement {
        let placed = placed.as_array().unwrap();
        assert_eq!(placed.len(), copies, "{q}");
        assert!(placed.iter().all(|b| b.as_u64().unwrap() < brokers), "{q}");
    }
    q
}

/// Starts a producer job in `app` writing 2,500 keyed messages (16 keys of its
/// own, `<prefix>-kN`) and waits until it is under way.
async fn keyed_traffic(w: &World, ns: &str, prefix: &str) -> AppJob {
    let args = [
        "produce",
        "--queue",
        "orders",
        "--count",
        "2500",
        "--prefix",
        prefix,
        "--concurrency",
        "16",
        "--keyed",
    ];
    let job = w.app_job(ns, "app", &args).await;
    eventually("traffic flowing", || async {
        (job.acked().await >= 300).then_some(())
    })
    .await;
    job
}

/// The claims of `orders`' brokers, by name.
async fn claims_of_orders(client: &Client, ns: &str) -> Option<Vec<String>> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let mut names: Vec<String> = pvcs
        .list(&ListParams::default().labels("sluice.dev/queue=orders"))
        .await
        .ok()?
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    names.sort();
    Some(names)
}

/// The issue's path for a default small Queue: one copy of each partition, brokers
/// 1 -> 3 -> 5 -> 2 -> 1 (the last asked for while the copies move onto 2) and
/// partitions 4 -> 8, with 10,000 keyed messages written during the moves. Every partition is a Raft group of one, so its copy moves as a
/// replicated one does. Partitions grow between two producers: a key's partition
/// is its hash modulo the partitions, so a key written across the change would be
/// split over two partitions (as in Kafka) and lose its order.
#[test]
fn single_copy_queue_scales_one_three_five_two_one_and_grows_partitions_under_traffic() {
    isolated(
        "single_copy_queue_scales_one_three_five_two_one_and_grows_partitions_under_traffic",
        WorldOptions::default(),
        single_copy_queue_scales_in,
    );
}

async fn single_copy_queue_scales_in(w: Arc<World>) {
    let client = w.client.clone();
    let ns = &w.ns("shop");
    w.app_namespace(ns).await;
    let spec = |replicas: u32, partitions: u32| json!({"replicas": replicas, "partitions": partitions, "storage": {"size": "1Gi"}});
    apply_queue(&client, ns, "orders", spec(1, 4)).await;
    queue_ready(&client, ns, "orders", 1).await;
    partitions_of_led(&client, ns, 4, 1).await;
    w.app_pod(ns, "app", "orders", "default").await;

    let a = keyed_traffic(&w, ns, "a").await;
    apply_queue(&client, ns, "orders", spec(3, 4)).await;
    copies_moved_onto(&client, ns, 3, 4, 1).await;
    queue_ready(&client, ns, "orders", 3).await;
    let produced_a = a.result().await;

    apply_queue(&client, ns, "orders", spec(3, 8)).await;
    partitions_of_led(&client, ns, 8, 1).await;
    let b = keyed_traffic(&w, ns, "b").await;
    apply_queue(&client, ns, "orders", spec(5, 8)).await;
    copies_moved_onto(&client, ns, 5, 8, 1).await;
    queue_ready(&client, ns, "orders", 5).await;

    // 5 -> 2, and 1 asked for while those copies move: accepted, and carried out
    // by a second move once the first is done.
    let c = keyed_traffic(&w, ns, "c").await;
    apply_queue(&client, ns, "orders", spec(2, 8)).await;
    eventually("copies moving onto 2 brokers", || async {
        let q = serde_json::to_value(queue_api(&client, ns).get("orders").await.ok()?).ok()?;
        (q.pointer("/status/layout/movingTo")?.as_u64() == Some(2)).then_some(())
    })
    .await;
    apply_queue(&client, ns, "orders", spec(1, 8)).await;
    eventually("the move names the count asked meanwhile", || async {
        let q = serde_json::to_value(queue_api(&client, ns).get("orders").await.ok()?).ok()?;
        let (_, reason, message) = condition(&q, "Progressing")?;
        (reason == "PartitionsMoving"
            && message.ends_with("then onto 1 brokers, as asked meanwhile"))
        .then_some(())
    })
    .await;
    let d = keyed_traffic(&w, ns, "d").await;
    copies_moved_onto(&client, ns, 1, 8, 1).await;
    queue_ready(&client, ns, "orders", 1).await;
    partitions_of_led(&client, ns, 8, 1).await;
    // The brokers that left took nothing with them: their claims go.
    eventually("only broker 0's claim left", || async {
        let names = claims_of_orders(&client, ns).await?;
        (names == ["data-sluice-orders-0"]).then_some(())
    })
    .await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    eventually("app pod Ready again", || async {
        pods.get("app").await.ok().filter(pod_ready).map(|_| ())
    })
    .await;
    let mut expected = produced_a["acked"].as_u64().unwrap();
    assert_eq!(produced_a["failed"], 0, "{produced_a}");
    for job in [&b, &c, &d] {
        let produced = job.result().await;
        assert_eq!(produced["failed"], 0, "{produced}");
        expected += produced["acked"].as_u64().unwrap();
    }
    assert_eq!(expected, 10_000);
    consume_keyed_exactly(&w, ns, &[&a, &b, &c, &d], expected).await;
}

/// Consumes `orders` in `app` expecting exactly what the keyed producer `jobs` had
/// acknowledged (`expected` in all): nothing missing, no key out of order.
async fn consume_keyed_exactly(w: &World, ns: &str, jobs: &[&AppJob], expected: u64) {
    let ids: Vec<String> = jobs.iter().map(|j| j.id.to_string()).collect();
    let mut args = vec!["consume", "--queue", "orders", "--lanes", "16"];
    for id in &ids {
        args.extend(["--expect-job", id.as_str()]);
    }
    let consumed = w.app(ns, "app", &args).await;
    assert_eq!(
        consumed["missing"], 0,
        "acknowledged messages lost: {consumed}"
    );
    assert_eq!(
        consumed["expected"].as_u64().unwrap(),
        expected,
        "{consumed}"
    );
    assert_eq!(consumed["out_of_order"], 0, "keys out of order: {consumed}");
}

async fn replicated_queue_scales_by_moving_partitions_in(w: Arc<World>) {
    let client = w.client.clone();
    let ns = &w.ns("shop");
    three_broker_orders_with(&w, ns, 3).await;
    w.app_pod(ns, "app", "orders", "default").await;
    let spec = |replicas: u32| {
        json!({"replicas": replicas, "partitions": 6, "replication": 3,
               "storage": {"size": "1Gi"}})
    };
    let produce = |prefix: &'static str| {
        let w = w.clone();
        let ns = ns.to_string();
        async move {
            let args = [
                "produce",
                "--queue",
                "orders",
                "--count",
                "5000",
                "--prefix",
                prefix,
                "--concurrency",
                "16",
                "--keyed",
            ];
            let job = w.app_job(&ns, "app", &args).await;
            eventually("traffic flowing", || async {
                (job.acked().await >= 500).then_some(())
            })
            .await;
            job
        }
    };

    let up = produce("up").await;
    apply_queue(&client, ns, "orders", spec(5)).await;
    moved_onto(&client, ns, 5).await;
    queue_ready(&client, ns, "orders", 5).await;
    partitions_led(&client, ns, 3).await;

    let down = produce("down").await;
    apply_queue(&client, ns, "orders", spec(3)).await;
    moved_onto(&client, ns, 3).await;
    queue_ready(&client, ns, "orders", 3).await;
    partitions_led(&client, ns, 3).await;
    // The brokers that left took nothing with them: their claims go.
    eventually("the claims of brokers 3 and 4 deleted", || async {
        let names = claims_of_orders(&client, ns).await?;
        (names.len() == 3
            && names
                .iter()
                .all(|n| !n.ends_with("-3") && !n.ends_with("-4")))
        .then_some(())
    })
    .await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    eventually("app pod Ready again", || async {
        pods.get("app").await.ok().filter(pod_ready).map(|_| ())
    })
    .await;
    let mut expected = 0;
    for job in [&up, &down] {
        let produced = job.result().await;
        assert_eq!(produced["failed"], 0, "{produced}");
        expected += produced["acked"].as_u64().unwrap();
    }
    // `kubectl get slq` shows the backlog: every message waits, the oldest since
    // before the moves.
    let queues = queue_api(&client, ns);
    let depth = |q: &Value, field: &str| {
        q.pointer(&format!("/status/messages/{field}"))
            .and_then(Value::as_i64)
    };
    eventually("the Queue shows its backlog", || async {
        let q = serde_json::to_value(queues.get("orders").await.ok()?).ok()?;
        let oldest = q
            .pointer("/status/messages/oldestReadyTime")?
            .as_str()?
            .to_string();
        (depth(&q, "ready")? >= expected as i64 && depth(&q, "inFlight")? == 0).then_some(oldest)
    })
    .await;
    consume_keyed_exactly(&w, ns, &[&up, &down], expected).await;
    eventually("the Queue shows it drained", || async {
        let q = serde_json::to_value(queues.get("orders").await.ok()?).ok()?;
        // Cleared: the status's merge patch removes a null.
        let none_ready = q
            .pointer("/status/messages/oldestReadyTime")
            .is_none_or(Value::is_null);
        (depth(&q, "ready")? == 0 && depth(&q, "inFlight")? == 0 && none_ready).then_some(())
    })
    .await;
}

#[test]
fn deleting_queues_removes_what_they_owned_and_volumes_per_deletion_policy() {
    isolated(
        "deleting_queues_removes_what_they_owned_and_volumes_per_deletion_policy",
        WorldOptions::default(),
        deleting_queues_removes_what_they_owned_and_volumes_per_deletion_policy_in,
    );
}

async fn deleting_queues_removes_what_they_owned_and_volumes_per_deletion_policy_in(w: Arc<World>) {
    let client = w.client.clone();
    let ns = &w.ns("shop");
    w.app_namespace(ns).await;
    apply_queue(
        &client,
        ns,
        "kept",
        json!({"replicas": 1, "partitions": 1, "deletionPolicy": "Retain"}),
    )
    .await;
    apply_queue(
        &client,
        ns,
        "gone",
        json!({"replicas": 2, "partitions": 2, "deletionPolicy": "Delete"}),
    )
    .await;
    queue_ready(&client, ns, "kept", 1).await;
    queue_ready(&client, ns, "gone", 2).await;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let kept_pv = volume_of(&client, ns, "data-sluice-kept-0").await;
    let mut gone_pvs = Vec::new();
    for i in 0..2 {
        gone_pvs.push(volume_of(&client, ns, &format!("data-sluice-gone-{i}")).await);
    }
    // Where the node is ours, the volumes' directories are looked at too.
    let dir_of = |pv: PersistentVolume| w.node().map(|_| pv.spec.unwrap().host_path.unwrap().path);
    let kept_dir = dir_of(pvs.get(&kept_pv).await.unwrap());
    let mut gone_dirs = Vec::new();
    for pv in &gone_pvs {
        gone_dirs.extend(dir_of(pvs.get(pv).await.unwrap()));
    }

    let queues = queue_api(&client, ns);
    for q in ["kept", "gone"] {
        queues
            .delete(q, &DeleteParams::default())
            .await
            .expect("delete Queue");
    }
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    for q in ["kept", "gone"] {
        let sel = ListParams::default().labels(&format!("sluice.dev/queue={q}"));
        eventually(&format!("everything Queue {q} owned is gone"), || async {
            let gone = queues.get_opt(q).await.ok()?.is_none()
                && sts.list(&sel).await.ok()?.items.is_empty()
                && svcs.list(&sel).await.ok()?.items.is_empty()
                && cms.list(&sel).await.ok()?.items.is_empty()
                && pods.list(&sel).await.ok()?.items.is_empty();
            gone.then_some(())
        })
        .await;
    }
    // Retain: the claim, its volume and the data stay.
    let kept = pvcs
        .get("data-sluice-kept-0")
        .await
        .expect("retained claim");
    assert_eq!(kept.status.unwrap().phase.as_deref(), Some("Bound"));
    assert!(pvs.get_opt(&kept_pv).await.unwrap().is_some());
    if let Some(dir) = &kept_dir {
        assert!(std::fs::read_dir(dir).unwrap().count() > 0, "retained data");
    }
    // Delete: claims, volumes and their directories go.
    eventually("the Delete queue's claims and volumes are gone", || async {
        for i in 0..2 {
            if pvcs
                .get_opt(&format!("data-sluice-gone-{i}"))
                .await
                .ok()?
                .is_some()
            {
                return None;
            }
        }
        for pv in &gone_pvs {
            if pvs.get_opt(pv).await.ok()?.is_some() {
                return None;
            }
        }
        gone_dirs
            .iter()
            .all(|d| !std::path::Path::new(d).exists())
            .then_some(())
    })
    .await;
    // No broker process of either queue is left on the node.
    if let Some(agent) = w.node() {
        for p in ["sluice-kept-0", "sluice-gone-0", "sluice-gone-1"] {
            assert!(
                agent.pod_ip(ns, p).is_none(),
                "{p} still running on the node"
            );
        }
    }
}

#[test]
fn setting_partition_and_storage_changes_roll_out_while_the_queue_serves() {
    isolated(
        "setting_partition_and_storage_changes_roll_out_while_the_queue_serves",
        WorldOptions::default(),
        setting_partition_and_storage_changes_roll_out_while_the_queue_serves_in,
    );
}

/// The StorageClass whose volumes the node agent grows (it plays the class's
/// resizer), where the node is ours.
const EXPANDABLE: &str = "sluice-e2e-expandable";

async fn setting_partition_and_storage_changes_roll_out_while_the_queue_serves_in(w: Arc<World>) {
    let client = w.client.clone();
    let ns = &w.ns("shop");
    w.app_namespace(ns).await;
    let ours = w.node().is_some();
    if ours {
        let classes: Api<StorageClass> = Api::all(client.clone());
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": {"name": EXPANDABLE},
            "provisioner": "sluice.dev/e2e-agent",
            "allowVolumeExpansion": true,
        }))
        .unwrap();
        classes
            .patch(
                EXPANDABLE,
                &PatchParams::apply("sluice-e2e").force(),
                &Patch::Apply(&class),
            )
            .await
            .unwrap();
    }
    // Replicas stay: this Queue has one copy per partition, whose replica change is
    // refused (operator/tests/control_plane.rs); scenario 9 moves a replicated one.
    let storage = |size: &str| {
        if ours {
            json!({"size": size, "storageClassName": EXPANDABLE})
        } else {
            json!({"size": size})
        }
    };
    let spec = |partitions: u32, vt: &str| json!({"replicas": 2, "partitions": partitions, "delivery": {"visibilityTimeout": vt}, "storage": storage("1Gi")});
    apply_queue(&client, ns, "orders", spec(6, "30s")).await;
    let before = queue_ready(&client, ns, "orders", 2).await;
    w.app_pod(ns, "app", "orders", "default").await;
    let d = w.app(ns, "app", &["describe", "--queue", "orders"]).await;
    assert_eq!(d["visibility_timeout_ms"], 30_000, "{d}");
    let hash = |p: &Pod| {
        p.annotations()
            .get("sluice.dev/config-hash")
            .cloned()
            .unwrap_or_default()
    };
    let old_hash = hash(&before[0]);

    // Traffic during the rollout.
    let producer = w
        .app_job(
            ns,
            "app",
            &[
                "produce",
                "--queue",
                "orders",
                "--count",
                "4000",
                "--prefix",
                "r",
                "--concurrency",
                "8",
            ],
        )
        .await;

    apply_queue(&client, ns, "orders", spec(8, "45s")).await;
    let queues = queue_api(&client, ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    // Status tells the truth throughout: sampled until the rollout completes.
    let saw_rolling_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
    eventually_within(
        "rollout complete",
        std::time::Duration::from_secs(300),
        || {
            let (queues, pods) = (queues.clone(), pods.clone());
            let (saw, old_hash) = (saw_rolling_out.clone(), old_hash.clone());
            async move {
                let q = serde_json::to_value(queues.get("orders").await.ok()?).ok()?;
                let generation = q.pointer("/metadata/generation")?.as_i64()?;
                if q.pointer("/status/observedGeneration")?.as_i64()? != generation {
                    return None;
                }
                let (ready, _, msg) = condition(&q, "Ready")?;
                let (progressing, preason, _) = condition(&q, "Progressing")?;
                let ready_n = q.pointer("/status/readyReplicas")?.as_u64()?;
                let list = pods
                    .list(&ListParams::default().labels("sluice.dev/queue=orders"))
                    .await
                    .ok()?;
                let really_ready = list.items.iter().filter(|p| pod_ready(p)).count() as u64;
                if ready == "True" {
                    assert_eq!(ready_n, 2, "Ready=True claims all brokers ready: {q}");
                } else {
                    assert!(!msg.is_empty(), "Ready=False says why: {q}");
                }
                assert!(ready_n <= 2, "{q}");
                if progressing == "True" {
                    assert_eq!(preason, "RollingOut", "{q}");
                    saw.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                let all_new = list.items.len() == 2
                    && list
                        .items
                        .iter()
                        .all(|p| hash(p) != old_hash && pod_ready(p));
                let done =
                    ready == "True" && progressing == "False" && preason == "RolloutComplete";
                if done {
                    assert!(
                        all_new,
                        "RolloutComplete only once every pod runs the new settings: {q}"
                    );
                }
                (done && really_ready == 2).then_some(())
            }
        },
    )
    .await;
    assert!(
        saw_rolling_out.load(std::sync::atomic::Ordering::Relaxed),
        "Progressing=True (RollingOut) was reported during the rollout"
    );
    let after = queue_ready(&client, ns, "orders", 2).await;
    for p in &before {
        let now = after.iter().find(|a| a.name_any() == p.name_any()).unwrap();
        assert_ne!(now.uid(), p.uid(), "{} was replaced", p.name_any());
    }

    // The queue kept serving through the rollout, and serves with the new settings.
    let produced = producer.result().await;
    let n_acked = produced["acked"].as_u64().unwrap();
    assert!(n_acked > 0, "{produced}");
    eventually("app pod Ready again", || async {
        pods.get("app").await.ok().filter(pod_ready).map(|_| ())
    })
    .await;
    // Every message acknowledged before and during the change is delivered: the
    // old partitions kept their brokers.
    consume_acknowledged(&w, ns, "app", &producer, n_acked).await;
    let d = eventually("brokers describe the new settings", || async {
        let d = w.app(ns, "app", &["describe", "--queue", "orders"]).await;
        (d["visibility_timeout_ms"] == 45_000).then_some(d)
    })
    .await;
    assert_eq!(d["partitions"], 8, "{d}");
    round_trip(&w, ns, "app", "after", 1000).await;
    if ours {
        let grown = json!({"replicas": 2, "partitions": 8, "delivery": {"visibilityTimeout": "45s"}, "storage": storage("2Gi")});
        volumes_grow_in_place(&w, ns, grown).await;
    }
}

/// `storage.size` 1Gi → 2Gi on `orders`: the claims grow (the agent resizes them as
/// the class's resizer would), the StatefulSet is made again with the new claim
/// template around the same running brokers, and messages stored before it are
/// delivered after it. A Queue whose volumes have no StorageClass is refused the
/// same change, with the reason, and is not wedged by it.
async fn volumes_grow_in_place(w: &World, ns: &str, grown: Value) {
    let client = &w.client;
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let queues = queue_api(client, ns);
    let brokers_before = queue_ready(client, ns, "orders", 2).await;
    let sts_before = sts_api.get("sluice-orders").await.unwrap().uid();
    produce_all(w, ns, "app", "grow", 500).await;

    apply_queue(client, ns, "orders", grown).await;
    let template_size = |s: &StatefulSet| {
        s.spec.as_ref()?.volume_claim_templates.as_ref()?[0]
            .spec
            .as_ref()?
            .resources
            .as_ref()?
            .requests
            .as_ref()?
            .get("storage")
            .map(|q| q.0.clone())
    };
    eventually("the StatefulSet made again with 2Gi claims", || async {
        let s = sts_api.get_opt("sluice-orders").await.ok()??;
        (s.uid() != sts_before
            && s.metadata.deletion_timestamp.is_none()
            && template_size(&s).as_deref() == Some("2Gi"))
        .then_some(())
    })
    .await;
    eventually("every claim at 2Gi and the Queue done growing", || async {
        let q = serde_json::to_value(queues.get("orders").await.ok()?).ok()?;
        let generation = q.pointer("/metadata/generation")?.as_i64()?;
        let (progressing, reason, _) = condition(&q, "Progressing")?;
        let (degraded, _, _) = condition(&q, "Degraded")?;
        let claims = pvcs
            .list(&ListParams::default().labels("sluice.dev/queue=orders"))
            .await
            .ok()?
            .items;
        let at_2gi = claims.len() == 2
            && claims.iter().all(|c| {
                let capacity = c.status.as_ref().and_then(|s| s.capacity.as_ref());
                capacity
                    .and_then(|m| m.get("storage"))
                    .map(|q| q.0.as_str())
                    == Some("2Gi")
            });
        (q.pointer("/status/observedGeneration")?.as_i64()? == generation
            && q.pointer("/status/layout/storage/size")?.as_str()? == "2Gi"
            && progressing == "False"
            && reason == "RolloutComplete"
            && degraded == "False"
            && at_2gi)
            .then_some(())
    })
    .await;
    // The same brokers, never restarted, now owned by the new StatefulSet.
    let brokers_after = queue_ready(client, ns, "orders", 2).await;
    for p in &brokers_before {
        let now = brokers_after
            .iter()
            .find(|a| a.name_any() == p.name_any())
            .unwrap();
        assert_eq!(now.uid(), p.uid(), "{} kept running", p.name_any());
    }
    consume_all(w, ns, "app", "grow", 500).await;

    // Volumes without a StorageClass cannot grow: Degraded says why, the Queue
    // keeps its size and takes the next valid change.
    let plain = |size: &str| json!({"replicas": 1, "partitions": 1, "storage": {"size": size}});
    apply_queue(client, ns, "plain", plain("1Gi")).await;
    queue_ready(client, ns, "plain", 1).await;
    apply_queue(client, ns, "plain", plain("2Gi")).await;
    let (_, msg) = eventually("growth without a StorageClass refused", || async {
        let q = serde_json::to_value(queues.get("plain").await.ok()?).ok()?;
        let (status, reason, msg) = condition(&q, "Degraded")?;
        (status == "True" && reason == "StorageChangeBlocked").then_some((q, msg))
    })
    .await;
    assert!(
        msg.starts_with("spec.storage.size cannot grow from 1Gi to 2Gi: volume claim data-sluice-plain-0 has no StorageClass"),
        "{msg}"
    );
    let sts = sts_api.get("sluice-plain").await.unwrap();
    assert_eq!(template_size(&sts).as_deref(), Some("1Gi"));
    apply_queue(client, ns, "plain", plain("1Gi")).await;
    eventually("Degraded clears once the size is back", || async {
        let q = serde_json::to_value(queues.get("plain").await.ok()?).ok()?;
        let (status, _, _) = condition(&q, "Degraded")?;
        (status == "False").then_some(())
    })
    .await;
}

#[test]
fn helm_install_runs_the_operator_as_a_pod_that_serves_queues_and_injects() {
    isolated(
        "helm_install_runs_the_operator_as_a_pod_that_serves_queues_and_injects",
        WorldOptions {
            real_node: true,
            ..WorldOptions::default()
        },
        helm_install_runs_the_operator_as_a_pod_that_serves_queues_and_injects_in,
    );
}

async fn helm_install_runs_the_operator_as_a_pod_that_serves_queues_and_injects_in(w: Arc<World>) {
    let client = w.client.clone();
    // On a cluster the world has installed it already: this upgrades in place.
    let helm = w.install_chart().await;
    assert!(helm.contains("STATUS: deployed"), "{helm}");

    // The operator runs as pods (of the real node's kubelet, here); one of them leads.
    let op = w.operator_leader().await;
    let c = &op.spec.as_ref().unwrap().containers[0];
    assert_eq!(c.image, Some(w.image("sluice-operator")));

    // It reconciles Queues with the chart's RBAC and in-cluster config...
    let ns = &w.ns("shop");
    w.app_namespace(ns).await;
    apply_queue(
        &client,
        ns,
        "orders",
        json!({"replicas": 1, "partitions": 2}),
    )
    .await;
    queue_ready(&client, ns, "orders", 1).await;

    // ... and the API server reaches its webhook through the chart's Service
    // (failurePolicy Ignore: until the caBundle is in, pods come back plain, and
    // `app_pod` creates them again).
    let name = "app";
    let created = w.app_pod(ns, name, "orders", "default").await;
    assert_eq!(container_names(&created), ["app", "sluice-sidecar"]);
    round_trip(&w, ns, name, "h", 500).await;
}

/// A token of ServiceAccount `sa` for `audience`, from the API server.
async fn sa_token(client: &Client, ns: &str, sa: &str, audience: &str) -> String {
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": [audience], "expirationSeconds": 600}
    }))
    .unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .expect("TokenRequest")
        .status
        .expect("token")
        .token
}

/// A direct client of a broker the way a sidecar of `ns` is one: mutual TLS with the
/// namespace's sidecar certificate, checking the broker's name against the data
/// plane's CA.
async fn broker_client(
    client: &Client,
    ns: &str,
    queue: &str,
    addr: &str,
    with_certificate: bool,
) -> Result<QueuesClient<tonic::transport::Channel>, tonic::transport::Error> {
    let secret = |ns: &str, name: &str| {
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        let name = name.to_string();
        async move {
            api.get(&name)
                .await
                .expect("certificate Secret")
                .data
                .expect("data")
        }
    };
    let ca = secret("sluice-system", "sluice-data-plane-ca").await;
    let mine = secret(ns, "sluice-sidecar-tls").await;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca["ca.crt"].0))
        .domain_name(format!("sluice-{queue}.{ns}.svc.cluster.local"));
    if with_certificate {
        tls = tls.identity(Identity::from_pem(&mine["tls.crt"].0, &mine["tls.key"].0));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await?;
    Ok(QueuesClient::new(channel))
}

/// Enqueues one message with `token` as bearer if given.
async fn enqueue_to_broker(
    client: &mut QueuesClient<tonic::transport::Channel>,
    queue: &str,
    token: Option<&str>,
) -> Result<(), tonic::Status> {
    let mut req = tonic::Request::new(v1::EnqueueRequest {
        queue: queue.into(),
        message: Some(v1::NewMessage {
            body: b"direct".to_vec().into(),
            ..Default::default()
        }),
        partition: None,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    client.enqueue(req).await.map(|_| ())
}

#[test]
fn mutual_tls_and_access_list_admit_only_listed_sidecars() {
    isolated(
        "mutual_tls_and_access_list_admit_only_listed_sidecars",
        WorldOptions::default(),
        mutual_tls_and_access_list_admit_only_listed_sidecars_in,
    );
}

async fn mutual_tls_and_access_list_admit_only_listed_sidecars_in(w: Arc<World>) {
    let client = w.client.clone();
    let ns = &w.ns("bank");
    w.app_namespace(ns).await;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    for name in ["teller", "intruder"] {
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        sas.create(&PostParams::default(), &sa).await.unwrap();
    }
    // A one-broker Queue open to the ServiceAccount `allowed` only.
    let ledger = |allowed: &str| {
        json!({"replicas": 1, "partitions": 2, "storage": {"size": "1Gi"},
               "access": {"serviceAccounts": [{"name": allowed}]}})
    };
    apply_queue(&client, ns, "ledger", ledger("teller")).await;
    let brokers = queue_ready(&client, ns, "ledger", 1).await;
    let pod_spec = brokers[0].spec.as_ref().unwrap();
    assert_eq!(
        pod_spec.service_account_name.as_deref(),
        Some("sluice-ledger-broker"),
        "the brokers run as their own ServiceAccount"
    );

    // A server-side dry run of an app pod shows the injection and changes nothing:
    // the namespace's sidecar certificate is issued only for a pod really made.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let dry_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "dry", "annotations": {"sluice.dev/inject": "true", "sluice.dev/queues": "ledger"}},
        "spec": {"containers": [{"name": "app", "image": "app"}], "serviceAccountName": "teller"}
    }))
    .unwrap();
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    eventually("a dry run that shows the injection", || async {
        let p = pods.create(&dry_run, &dry_pod).await.ok()?;
        (container_names(&p) == ["app", "sluice-sidecar"]).then_some(())
    })
    .await;
    assert!(
        secrets
            .get_opt("sluice-sidecar-tls")
            .await
            .unwrap()
            .is_none(),
        "a dry run issued the sidecars' certificate"
    );
    assert!(pods.get_opt("dry").await.unwrap().is_none());

    // The teller's app, through its injected sidecar and projected token.
    let teller = w.app_pod(ns, "teller-app", "ledger", "teller").await;
    assert_eq!(container_names(&teller), ["app", "sluice-sidecar"]);
    assert!(
        secrets
            .get_opt("sluice-sidecar-tls")
            .await
            .unwrap()
            .is_some(),
        "a pod really made gets the certificate"
    );
    // One attempt per message: a refusal shows as `failed` with its code.
    let produce = |count: &'static str, prefix: &'static str| {
        let w = w.clone();
        async move {
            let args = [
                "produce",
                "--queue",
                "ledger",
                "--count",
                count,
                "--prefix",
                prefix,
                "--retries",
                "0",
            ];
            w.app(ns, "teller-app", &args).await
        }
    };
    let produced = produce("100", "t").await;
    assert_eq!(produced["acked"], 100, "{produced}");

    // Straight to the broker, with tokens the API server issues (from this machine:
    // where the node is ours, its pod IPs are reachable).
    if w.node().is_some() {
        direct_to_the_broker(&client, ns, &brokers[0]).await;
    }

    // Taking the teller off the list: the brokers roll with the new list and
    // the teller's sidecar is refused with PERMISSION_DENIED, not left hanging.
    apply_queue(&client, ns, "ledger", ledger("auditor")).await;
    eventually("the teller refused after the access change", || async {
        let r = produce("1", "late").await;
        (r["failed"] == 1 && r["last_error"] == "PermissionDenied").then_some(())
    })
    .await;
}

/// A client straight to the ledger broker `broker`: mutual TLS comes first, then the
/// access list decides by the token's ServiceAccount and audience.
async fn direct_to_the_broker(client: &Client, ns: &str, broker: &Pod) {
    let ip = broker.status.as_ref().unwrap().pod_ip.clone().unwrap();
    let broker = format!("{ip}:7171");
    let audience = &format!("sluice.dev/{ns}/ledger");
    let teller_token = sa_token(client, ns, "teller", audience).await;
    let intruder_token = sa_token(client, ns, "intruder", audience).await;
    let elsewhere = sa_token(client, ns, "teller", &format!("sluice.dev/{ns}/other")).await;
    // Mutual TLS first: without the sidecars' certificate, or in plaintext,
    // nothing gets as far as the token check.
    let no_cert = match broker_client(client, ns, "ledger", &broker, false).await {
        Ok(mut c) => enqueue_to_broker(&mut c, "ledger", Some(&teller_token))
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(no_cert, "a TLS client without a certificate got in");
    let plain = match QueuesClient::connect(format!("http://{broker}")).await {
        Ok(mut c) => enqueue_to_broker(&mut c, "ledger", Some(&teller_token))
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(plain, "a plaintext client got in");
    let mut broker = broker_client(client, ns, "ledger", &broker, true)
        .await
        .expect("mutual TLS with the sidecars' certificate");
    enqueue_to_broker(&mut broker, "ledger", Some(&teller_token))
        .await
        .expect("the listed account gets in");
    let denied = enqueue_to_broker(&mut broker, "ledger", Some(&intruder_token))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains(&format!("{ns}/intruder")),
        "{denied:?}"
    );
    for (what, token) in [
        ("no token", None),
        ("another queue's token", Some(elsewhere.as_str())),
        ("garbage", Some("not-a-jwt")),
    ] {
        let e = enqueue_to_broker(&mut broker, "ledger", token)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{what}: {e:?}");
    }
    // The dead-letter queue is guarded by the same list.
    let e = enqueue_to_broker(&mut broker, "ledger.dlq", Some(&intruder_token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
}

/// The node agent itself, on what the scenarios lean on: a failing liveness probe
/// restarts the container, and a pod cut off the network turns unready and back.
#[test]
fn node_agent_restarts_unlive_containers_and_unreadies_pods_cut_off() {
    isolated(
        "node_agent_restarts_unlive_containers_and_unreadies_pods_cut_off",
        WorldOptions {
            operator: false,
            ..WorldOptions::default()
        },
        node_agent_probes,
    );
}

async fn node_agent_probes(w: Arc<World>) {
    let Some(agent) = w.node() else {
        eprintln!("the node is not ours: nothing to check here");
        return;
    };
    let ns = "probes";
    w.app_namespace(ns).await;
    let pods: Api<Pod> = Api::namespaced(w.client.clone(), ns);
    let serving = |name: &str, probe_port: u16, liveness: bool| -> Pod {
        let probe = json!({"httpGet": {"path": "/healthz", "port": probe_port},
                           "periodSeconds": 1, "failureThreshold": 1});
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "containers": [{
                    "name": "app",
                    "image": w.image("sluice-e2e-app"),
                    "args": ["serve", "--listen", "0.0.0.0:8088"],
                    "readinessProbe": probe,
                    "livenessProbe": if liveness { probe.clone() } else { Value::Null },
                }],
                "terminationGracePeriodSeconds": 1
            }
        }))
        .unwrap()
    };
    // A namespace's first pods can be refused for a moment, until the controller
    // manager has made the default ServiceAccount's token: create until admitted.
    let create = |pod: Pod| {
        let pods = pods.clone();
        eventually("the pod admitted", move || {
            let (pods, pod) = (pods.clone(), pod.clone());
            async move { pods.create(&PostParams::default(), &pod).await.ok() }
        })
    };
    // Probed where nothing listens: never ready, killed and restarted over and over.
    create(serving("unlive", 9999, true)).await;
    // Probed (for readiness only) where it serves: ready, until its link goes down.
    create(serving("cut", 8088, false)).await;
    let restarts = eventually("the unlive container restarted twice", || async {
        let p = pods.get("unlive").await.ok()?;
        let s = p.status?.container_statuses?.into_iter().next()?;
        (s.restart_count >= 2).then_some(s)
    })
    .await;
    assert!(!restarts.ready, "never ready: {restarts:?}");
    let last = restarts.last_state.and_then(|s| s.terminated);
    assert!(last.is_some(), "its last run ended (terminated state kept)");

    let ready = |want: bool| {
        let pods = pods.clone();
        async move {
            eventually(&format!("pod cut Ready={want}"), || async {
                let p = pods.get("cut").await.ok()?;
                (pod_ready(&p) == want).then_some(())
            })
            .await
        }
    };
    ready(true).await;
    agent.set_network(ns, "cut", false).unwrap();
    ready(false).await;
    agent.set_network(ns, "cut", true).unwrap();
    ready(true).await;
}

#[test]
fn the_cli_reaches_a_queue_through_the_api_server_with_the_callers_rbac() {
    isolated(
        "the_cli_reaches_a_queue_through_the_api_server_with_the_callers_rbac",
        WorldOptions::default(),
        the_cli_reaches_a_queue_in,
    );
}

/// A kubeconfig of the world's cluster as ServiceAccount `ns/name`, made with the
/// Role `rules` grant: a person with only that RBAC.
async fn kubeconfig_as(w: &World, ns: &str, name: &str, rules: Value) -> std::path::PathBuf {
    let client = &w.client;
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let rbac = |kind: &str, body: Value| {
        let gvk = GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", kind);
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk));
        let obj: DynamicObject = serde_json::from_value(body).unwrap();
        async move { api.create(&PostParams::default(), &obj).await.unwrap() }
    };
    rbac(
        "Role",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": name}, "rules": rules}),
    )
    .await;
    rbac(
        "RoleBinding",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": name},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
               "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]}),
    )
    .await;
    // A token for the API server itself (no audience named).
    let request: TokenRequest =
        serde_json::from_value(json!({"spec": {"expirationSeconds": 3600}})).unwrap();
    let token = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&w.kubeconfig).unwrap()).unwrap();
    for user in config["users"].as_sequence_mut().unwrap() {
        user["user"] = serde_yaml::to_value(json!({ "token": token })).unwrap();
    }
    let path = w.dir.join(format!("{name}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

/// `sluice --kube -n <ns> <args>` with `kubeconfig`: (success, stdout, stderr).
async fn sluice_kube(
    kubeconfig: &std::path::Path,
    ns: &str,
    args: &[&str],
) -> (bool, String, String) {
    let out = tokio::process::Command::new(sluice_e2e::harness::bin_dir().join("sluice"))
        .env("KUBECONFIG", kubeconfig)
        .args(["--kube", "--namespace", ns])
        .args(args)
        .output()
        .await
        .expect("run sluice");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn the_cli_reaches_a_queue_in(w: Arc<World>) {
    let client = w.client.clone();
    let ns = &w.ns("shop");
    // An app produces through its sidecar (which also brings the namespace's client
    // certificate the brokers' mutual TLS asks for).
    orders_on_two_brokers_with_an_app(&w, ns).await;
    produce_all(&w, ns, "app", "o", 300).await;

    // What an operator of the queue is granted, and no more.
    let mut rules = json!([
        {"apiGroups": ["sluice.dev"], "resources": ["queues"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["sluice-sidecar-tls"], "verbs": ["get"]}
    ]);
    let nosy = kubeconfig_as(&w, ns, "nosy", rules.clone()).await;
    rules.as_array_mut().unwrap().extend([
        json!({"apiGroups": [""], "resources": ["pods/proxy"], "verbs": ["get", "create"]}),
        json!({"apiGroups": [""], "resources": ["serviceaccounts/token"],
               "resourceNames": ["teller"], "verbs": ["create"]}),
    ]);
    let ops = kubeconfig_as(&w, ns, "ops", rules).await;

    let (ok, out, err) = sluice_kube(&ops, ns, &["stats", "orders"]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("ready:          300"), "{out}");
    let (ok, out, err) = sluice_kube(&ops, ns, &["send", "orders", "from-the-cli"]).await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = sluice_kube(&ops, ns, &["peek", "orders", "--max", "5"]).await;
    assert!(ok && out.matches("id=").count() == 5, "{out}{err}");

    // Every message, from both brokers, through the tunnels: printed and acked.
    let (ok, out, err) = sluice_kube(
        &ops,
        ns,
        &[
            "receive", "orders", "--max", "1000", "--wait", "2s", "--ack",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(err.contains("received 301, acked 301"), "{err}");
    for body in ["o-0", "o-299", "from-the-cli"] {
        assert!(out.lines().any(|l| l == body), "{body} not received");
    }
    let (_, out, _) = sluice_kube(&ops, ns, &["stats", "orders"]).await;
    assert!(
        out.contains("ready:          0") && out.contains("in flight:      0"),
        "{out}"
    );

    // Without pods/proxy the API server refuses, and the command says what to ask for.
    let (ok, _, err) = sluice_kube(&nosy, ns, &["stats", "orders"]).await;
    assert!(!ok && err.contains("pods/proxy"), "{err}");
    let (ok, _, err) = sluice_kube(&ops, ns, &["stats", "payments"]).await;
    assert!(
        !ok && err.contains("there is no Queue \"payments\""),
        "{err}"
    );

    // A Queue with an access list: the command presents a token of a listed
    // ServiceAccount, which this person may request and nothing else may stand in for.
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "teller"}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    apply_queue(
        &client,
        ns,
        "ledger",
        json!({"replicas": 1, "partitions": 2, "storage": {"size": "1Gi"},
               "access": {"serviceAccounts": [{"name": "teller"}]}}),
    )
    .await;
    queue_ready(&client, ns, "ledger", 1).await;
    let (ok, out, err) = sluice_kube(&ops, ns, &["send", "ledger", "audited"]).await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = sluice_kube(&ops, ns, &["stats", "ledger"]).await;
    assert!(ok && out.contains("ready:          1"), "{out}{err}");
    let (ok, _, err) = sluice_kube(
        &ops,
        ns,
        &["--service-account", "intruder", "stats", "ledger"],
    )
    .await;
    assert!(!ok && err.contains("not in the access list"), "{err}");
}
