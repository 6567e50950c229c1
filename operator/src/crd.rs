//! The `Queue` custom resource (`queues.sluice.dev`, version `v1alpha1`).
//!
//! Every field carries a doc comment: kube-derive and schemars turn them into the
//! OpenAPI descriptions that `kubectl explain queue.spec` prints. `crds/` is generated
//! from these types by `sluice-operator crd` (a test fails when it drifts).

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_config::GoDuration;
use std::collections::BTreeMap;

/// Pattern of a duration string (sluice-config's grammar, which the broker parses):
/// `0`, or one or more `<number><unit>` with units ns, us, ms, s, m, h, d, e.g.
/// "30s", "1h30m", "1.5h", "14d". Duration fields are [`GoDuration`]s, whose schema
/// carries this pattern.
pub use sluice_config::DURATION_PATTERN;
/// Pattern of a storage quantity such as `1Gi`, `500Mi`, `10G`.
pub const QUANTITY_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";

/// A durable, partitioned message queue served by a StatefulSet of Sluice brokers.
///
/// The operator turns a Queue into a StatefulSet `sluice-<name>` (one broker per
/// replica, a data volume each), a headless Service `sluice-<name>`, a ConfigMap
/// `sluice-<name>-config` holding `broker.toml` and a PodDisruptionBudget
/// `sluice-<name>`, all owned by the Queue.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "Queue",
    plural = "queues",
    singular = "queue",
    shortname = "slq",
    namespaced,
    status = "QueueStatus",
    category = "sluice",
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas","description":"Broker pods requested"}"#,
    printcolumn = r#"{"name":"Copies","type":"integer","jsonPath":".status.layout.replication","description":"Copies of each partition"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas","description":"Broker pods ready"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","description":"Reason of the Ready condition"}"#,
    printcolumn = r#"{"name":"Available","type":"string","jsonPath":".status.conditions[?(@.type==\"Available\")].reason","description":"Whether every partition has a leader (a majority of its copies up)"}"#,
    printcolumn = r#"{"name":"Msgs","type":"integer","jsonPath":".status.messages.ready","description":"Messages ready for delivery"}"#,
    printcolumn = r#"{"name":"In flight","type":"integer","jsonPath":".status.messages.inFlight","priority":1,"description":"Messages delivered and not yet settled"}"#,
    printcolumn = r#"{"name":"DLQ","type":"integer","jsonPath":".status.messages.deadLettered","description":"Messages in the dead-letter queue"}"#,
    printcolumn = r#"{"name":"Oldest","type":"date","jsonPath":".status.messages.oldestReadyTime","description":"Age of the oldest ready message"}"#,
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".status.address","priority":1,"description":"Address the sidecar routes to"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// Number of broker pods. Partition p is owned by the broker of ordinal
    /// `p % replicas`, so a change that gives a partition with messages another
    /// broker is refused (by the admission webhook, else condition `Degraded` with
    /// reason `ScaleUpBlocked` or `ScaleDownBlocked`) until data can move.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 64))]
    pub replicas: i32,

    /// Copies of each partition, on as many different brokers: 1, 3 or 5, at most
    /// `replicas`. With 3, each partition is a consensus group (Raft) over three
    /// brokers: a write is answered once two of them hold it, and the partition stays
    /// available while any two are up. Default: 3 with 3 or more replicas, else 1
    /// (for a new Queue; unset later, it keeps what the volumes hold). Fixed once
    /// the Queue holds messages (until data can move between brokers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "replication_schema")]
    pub replication: Option<i32>,

    /// Number of partitions: the unit of parallelism and ordering. Must be at least
    /// `replicas` (a broker without a partition would sit idle).
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = sluice_config::MAX_PARTITIONS))]
    pub partitions: i32,

    /// Persistent volume of each broker pod (a PersistentVolumeClaim per pod).
    #[serde(default)]
    pub storage: StorageSpec,

    /// When writes are flushed to disk.
    #[serde(default)]
    pub durability: DurabilitySpec,

    /// Delivery semantics: leases, redelivery and dead-lettering.
    #[serde(default)]
    pub delivery: DeliverySpec,

    /// How much the queue keeps, and what happens when it is full.
    #[serde(default)]
    pub retention: RetentionSpec,

    /// Largest message body accepted, in bytes.
    #[serde(default = "default_max_message_bytes")]
    #[schemars(range(min = 1, max = sluice_config::MAX_MESSAGE_BYTES_LIMIT))]
    pub max_message_bytes: i64,

    /// Largest number of messages in one batch call (EnqueueBatch, Dequeue).
    #[serde(default = "default_max_batch")]
    #[schemars(range(min = 1, max = sluice_config::MAX_BATCH_LIMIT))]
    pub max_batch: i32,

    /// Window during which a message with the same deduplication id is accepted
    /// only once, e.g. "5m". "0s" disables deduplication.
    #[serde(default = "default_dedup_window")]
    pub deduplication_window: GoDuration,

    /// Which workloads may use the queue. Empty: any pod whose sidecar is injected.
    #[serde(default)]
    pub access: AccessSpec,

    /// What happens to the broker data volumes when the Queue is deleted:
    /// `Retain` (default) keeps the PersistentVolumeClaims, `Delete` removes them
    /// (the operator holds a finalizer until they are gone).
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Overrides of the broker pod template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<BrokerTemplate>,
}

fn replication_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "integer",
        "format": "int32",
        "enum": sluice_config::REPLICATION_CHOICES,
    })
}

/// The replication a new Queue gets when its spec does not say: three copies from
/// three brokers on, else one (two copies would stop at the first failure, like
/// one, at twice the cost). Only a new Queue gets it: an unset replication keeps
/// what the volumes hold ([`crate::layout::plan`]), so scaling 2 brokers to 3
/// leaves a Queue on one copy instead of refusing a change of copies.
pub fn default_replication(replicas: i32) -> i32 {
    if replicas >= 3 { 3 } else { 1 }
}

/// Persistent storage of each broker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each broker's volume, a Kubernetes quantity such as "1Gi".
    #[serde(default = "default_storage_size")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub size: String,
    /// StorageClass of the volumes; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// Bytes of a quantity of [`QUANTITY_PATTERN`], to compare sizes written in different
/// units ("1024Mi" is "1Gi"). None for anything else. (k8s-openapi keeps a Quantity
/// as its string, and the pattern is narrow enough that parsing it is a few lines.)
pub fn quantity_bytes(q: &str) -> Option<u128> {
    let unit_at = q
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(q.len());
    let (number, unit) = q.split_at(unit_at);
    let scale: u128 = match unit {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return None,
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || whole.len() > 20 || fraction.len() > 9 {
        return None;
    }
    let whole: u128 = whole.parse().ok()?;
    let fraction_bytes = if fraction.is_empty() {
        0
    } else {
        fraction.parse::<u128>().ok()? * scale / 10u128.pow(fraction.len() as u32)
    };
    Some(whole * scale + fraction_bytes)
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

/// Flush policy of the broker's log.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum Fsync {
    /// Every enqueue returns only after its record is on disk (group commit).
    #[default]
    Always,
    /// Flush every `fsyncInterval`; a crash may lose the last interval.
    Interval,
    /// Leave flushing to the operating system.
    Never,
}

impl Fsync {
    pub fn as_str(self) -> &'static str {
        match self {
            Fsync::Always => "always",
            Fsync::Interval => "interval",
            Fsync::Never => "never",
        }
    }
}

/// Durability settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DurabilitySpec {
    /// `always`, `interval` or `never`.
    #[serde(default)]
    pub fsync: Fsync,
    /// Flush period when fsync is `interval`, e.g. "10ms".
    #[serde(default = "default_fsync_interval")]
    pub fsync_interval: GoDuration,
}

impl Default for DurabilitySpec {
    fn default() -> Self {
        Self {
            fsync: Fsync::Always,
            fsync_interval: default_fsync_interval(),
        }
    }
}

/// Delivery settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliverySpec {
    /// How long a dequeued message stays invisible before it is delivered again
    /// unless acked, e.g. "30s"; at most 12h.
    #[serde(default = "default_visibility_timeout")]
    pub visibility_timeout: GoDuration,
    /// Deliveries after which a message goes to the dead-letter queue (or is dropped).
    #[serde(default = "default_max_deliveries")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_deliveries: i32,
    /// Move messages that exhausted `maxDeliveries` to `<name>.dlq`.
    #[serde(default = "default_true")]
    pub dead_letter: bool,
    /// Redelivery backoff: first delay of an exponential backoff, e.g. "1s".
    #[serde(default = "default_zero")]
    pub redelivery_delay: GoDuration,
    /// Upper bound of the redelivery backoff, e.g. "15m"; "0s" leaves it unbounded.
    #[serde(default = "default_redelivery_delay_max")]
    pub redelivery_delay_max: GoDuration,
    /// Delay applied to messages enqueued without one; at most 15 days (360h).
    #[serde(default = "default_zero")]
    pub default_delay: GoDuration,
}

impl Default for DeliverySpec {
    fn default() -> Self {
        Self {
            visibility_timeout: default_visibility_timeout(),
            max_deliveries: default_max_deliveries(),
            dead_letter: true,
            redelivery_delay: default_zero(),
            redelivery_delay_max: default_redelivery_delay_max(),
            default_delay: default_zero(),
        }
    }
}

/// What to do when a retention limit is reached.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum Overflow {
    /// Refuse new messages (producers get RESOURCE_EXHAUSTED).
    #[default]
    RejectNew,
    /// Drop the oldest messages to make room.
    DropOldest,
}

impl Overflow {
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::RejectNew => "reject_new",
            Overflow::DropOldest => "drop_oldest",
        }
    }
}

/// Retention limits (per queue; 0 means unlimited).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    /// Oldest message kept, e.g. "336h" (14 days); "0s" keeps messages forever.
    #[serde(default = "default_max_age")]
    pub max_age: GoDuration,
    /// Most messages kept; 0 is unlimited.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub max_messages: i64,
    /// Most bytes of message bodies kept; 0 is unlimited.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub max_bytes: i64,
    /// `rejectNew` or `dropOldest`.
    #[serde(default)]
    pub overflow: Overflow,
}

impl Default for RetentionSpec {
    fn default() -> Self {
        Self {
            max_age: default_max_age(),
            max_messages: 0,
            max_bytes: 0,
            overflow: Overflow::RejectNew,
        }
    }
}

/// Workloads allowed to use the queue.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AccessSpec {
    /// ServiceAccounts whose pods may use the queue. Empty: every pod. The injection
    /// webhook leaves out routes to queues the pod's ServiceAccount may not use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountRef>,
}

/// A ServiceAccount, by name and namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    /// Name of the ServiceAccount.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Namespace of the ServiceAccount; the Queue's namespace when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// What deletion of the Queue does to the broker volumes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum DeletionPolicy {
    /// Keep the PersistentVolumeClaims (the messages survive; recreate the Queue to reuse them).
    #[default]
    Retain,
    /// Delete the PersistentVolumeClaims with the Queue.
    Delete,
}

/// Overrides of the broker pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct BrokerTemplate {
    /// Broker image; the operator's `--broker-image` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image pull policy of the broker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// Compute resources of the broker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Scheduling affinity; replaces the default pod anti-affinity (brokers of one
    /// queue preferably on different nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Tolerations of the broker pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node selector of the broker pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// PriorityClass of the broker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Seconds a broker gets to flush after SIGTERM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub termination_grace_period_seconds: Option<i64>,
}

/// Observed state of a Queue.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, in the Kubernetes convention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Broker pods the StatefulSet runs (differs from spec.replicas while a scale
    /// is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Broker pods ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Address the sidecar routes to: the headless Service, port 7171.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Address of each broker pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Hash of the broker settings the pods were last rolled with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// What the brokers' volumes hold: the partitions rolled out so far, the brokers
    /// they are spread over and the volume claim template. Changes that would strand
    /// the messages in it are refused, from this record, even when the StatefulSet
    /// is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<crate::layout::Layout>,
    /// Every broker pod, with the settings it runs: during a rollout, which brokers
    /// run the new settings (`configHash` equal to the Queue's) and which the old.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub brokers: Vec<BrokerStatus>,
    /// Every partition as its brokers report it: the broker pod leading it and how
    /// many of its copies hold everything it applied. A partition without a leader
    /// has fewer than a majority of its copies up (the `Available` condition says
    /// which).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<PartitionStatus>,
    /// The messages the Queue holds, as its brokers report them: refreshed at every
    /// reconciliation, at least every 30 s (see docs/operator.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<MessagesStatus>,
}

/// The messages of a Queue, by state, summed over its partitions.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessagesStatus {
    /// Waiting for delivery.
    pub ready: i64,
    /// Delivered, not yet acked or nacked.
    pub in_flight: i64,
    /// Waiting for their delay (or redelivery backoff).
    pub delayed: i64,
    /// In the dead-letter queue (`<name>.dlq`), in any state.
    pub dead_lettered: i64,
    /// When the oldest ready message was enqueued (`kubectl get slq` shows its age,
    /// as SQS's ApproximateAgeOfOldestMessage); null when none is ready.
    #[serde(default)]
    pub oldest_ready_time: Option<String>,
}

/// One partition as the status reports it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionStatus {
    pub partition: i32,
    /// The broker pod leading it; none when no copy leads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Copies, the leader's among them, holding every entry the leader applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_sync: Option<i32>,
}

/// One broker pod as the status reports it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerStatus {
    /// The pod's name (`sluice-<queue>-<ordinal>`).
    pub name: String,
    /// Hash of the settings the pod was started with (its `sluice.dev/config-hash`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// The pod is Ready.
    pub ready: bool,
}

fn default_replicas() -> i32 {
    3
}
fn default_partitions() -> i32 {
    6
}
fn default_max_message_bytes() -> i64 {
    262_144
}
fn default_max_batch() -> i32 {
    1000
}
fn default_dedup_window() -> GoDuration {
    GoDuration::from_secs(5 * 60)
}
fn default_storage_size() -> String {
    "1Gi".into()
}
fn default_fsync_interval() -> GoDuration {
    GoDuration::from_millis(10)
}
fn default_visibility_timeout() -> GoDuration {
    GoDuration::from_secs(30)
}
fn default_max_deliveries() -> i32 {
    5
}
fn default_true() -> bool {
    true
}
fn default_zero() -> GoDuration {
    GoDuration::ZERO
}
fn default_redelivery_delay_max() -> GoDuration {
    GoDuration::from_secs(15 * 60)
}
fn default_max_age() -> GoDuration {
    GoDuration::from_secs(14 * 24 * 3600)
}

/// The CRD as YAML, exactly as written to `crds/queues.sluice.dev.yaml`.
pub fn crd_yaml() -> String {
    let crd = Queue::crd();
    let body = serde_yaml::to_string(&crd).expect("CRD serializes");
    format!(
        "# Generated by `cargo run -p sluice-operator -- crd` from operator/src/crd.rs.\n# Do not edit: a test fails when this file drifts from the Rust types.\n{body}"
    )
}

/// The field manager of the CRD applies ([`install`]).
pub const CRD_FIELD_MANAGER: &str = "sluice-operator";

/// Applies this build's CRD (server-side, taking over the fields it sets) and waits
/// until the API server serves it. Helm installs `crds/` once and never upgrades
/// it; an operator started with `--install-crds` (the chart's default) or
/// `sluice-operator install-crds` brings an older CRD up to this build's.
pub async fn install(client: &kube::Client) -> Result<(), kube::Error> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, Patch, PatchParams};
    let crd = Queue::crd();
    let name = crd.metadata.name.clone().unwrap_or_default();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(
        &name,
        &PatchParams::apply(CRD_FIELD_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await?;
    // Established within a second or two; a CRD that is not is reported by the API
    // server's own condition, so this waits boundedly and carries on.
    for _ in 0..60 {
        let served = api.get(&name).await?;
        let established = served
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    tracing::warn!(crd = %name, "the CRD is applied but not Established after 30 s");
    Ok(())
}
