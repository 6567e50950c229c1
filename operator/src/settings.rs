//! A Queue's spec as broker settings: converted into sluice-config's
//! [`QueueSettings`], checked by its validator (the same the broker runs on start)
//! and written by its [`BrokerFile::to_toml`]. What is the operator's own: the
//! camelCase field paths in messages, the pod template checks, the access list's
//! namespaces, and the hash that rolls the pods.

use crate::crd::{Fsync, Overflow, QueueSpec};
use crate::layout::Placed;
use sha2::{Digest, Sha256};
use sluice_config::{BrokerFile, ConfigError, FsyncMode, QueueSettings};

/// A spec the schema accepted but the brokers could not run: the `InvalidSpec`
/// condition's message, naming the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("spec.{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("metadata.name: {0}")]
    Name(String),
}

impl SpecError {
    /// The field's path, as the message names it (`spec.partitions`, `metadata.name`).
    pub fn field(&self) -> String {
        match self {
            SpecError::Invalid { field, .. } => format!("spec.{field}"),
            SpecError::Name(_) => "metadata.name".into(),
        }
    }
}

/// Broker settings derived from a valid spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerSettings {
    pub toml: String,
    pub hash: String,
}

/// Where a `broker.toml` field comes from in a Queue's spec (the path after `spec.`).
pub fn spec_field(toml_field: &'static str) -> &'static str {
    match toml_field {
        "fsync" => "durability.fsync",
        "fsync_interval" => "durability.fsyncInterval",
        "visibility_timeout" => "delivery.visibilityTimeout",
        "max_deliveries" => "delivery.maxDeliveries",
        "dead_letter" => "delivery.deadLetter",
        "redelivery_delay" => "delivery.redeliveryDelay",
        "redelivery_delay_max" => "delivery.redeliveryDelayMax",
        "default_delay" => "delivery.defaultDelay",
        "max_message_bytes" => "maxMessageBytes",
        "max_batch" => "maxBatch",
        "dedup_window" => "deduplicationWindow",
        "retention_max_age" => "retention.maxAge",
        "retention_max_messages" => "retention.maxMessages",
        "retention_max_bytes" => "retention.maxBytes",
        "overflow" => "retention.overflow",
        "access" => "access.serviceAccounts",
        // partitions, replicas
        same => same,
    }
}

impl From<ConfigError> for SpecError {
    fn from(e: ConfigError) -> Self {
        match e {
            ConfigError::Invalid { field, reason, .. } => SpecError::Invalid {
                field,
                message: reason,
            },
            ConfigError::QueueName { name, reason } => {
                SpecError::Name(format!("{name:?} cannot name a queue: it {reason}"))
            }
            // Not reported by validation (only by parsing and reading a file).
            other => SpecError::Name(other.to_string()),
        }
    }
}

/// The spec as the settings of queue `name`, checked by sluice-config's validator.
/// The reconciler passes the spec it carries out (with refused changes held back,
/// see [`crate::layout::plan`]), so the brokers read the layout they run. `raft`:
/// every partition is a Raft group, also with one copy (`status.layout.raft`).
pub fn queue_settings(
    name: &str,
    namespace: &str,
    spec: &QueueSpec,
    raft: bool,
) -> Result<QueueSettings, SpecError> {
    fn int<T: TryFrom<i64>>(field: &'static str, v: i64, min: i64) -> Result<T, SpecError> {
        T::try_from(v)
            .ok()
            .filter(|_| v >= min)
            .ok_or_else(|| SpecError::Invalid {
                field,
                message: format!("must be at least {min}, got {v}"),
            })
    }
    let settings = QueueSettings {
        name: name.to_string(),
        partitions: int("partitions", spec.partitions.into(), 1)?,
        replicas: int("replicas", spec.replicas.into(), 1)?,
        fsync: match spec.durability.fsync {
            Fsync::Always => FsyncMode::Always,
            Fsync::Interval => FsyncMode::Interval,
            Fsync::Never => FsyncMode::Never,
        },
        fsync_interval: spec.durability.fsync_interval.into(),
        visibility_timeout: spec.delivery.visibility_timeout.into(),
        max_deliveries: int(
            "delivery.maxDeliveries",
            spec.delivery.max_deliveries.into(),
            0,
        )?,
        dead_letter: spec.delivery.dead_letter,
        redelivery_delay: spec.delivery.redelivery_delay.into(),
        redelivery_delay_max: spec.delivery.redelivery_delay_max.into(),
        default_delay: spec.delivery.default_delay.into(),
        max_message_bytes: int("maxMessageBytes", spec.max_message_bytes, 1)?,
        max_batch: int("maxBatch", spec.max_batch.into(), 1)?,
        dedup_window: spec.deduplication_window.into(),
        retention_max_age: spec.retention.max_age.into(),
        retention_max_messages: int("retention.maxMessages", spec.retention.max_messages, 0)?,
        retention_max_bytes: int("retention.maxBytes", spec.retention.max_bytes, 0)?,
        overflow: match spec.retention.overflow {
            Overflow::RejectNew => sluice_config::Overflow::RejectNew,
            Overflow::DropOldest => sluice_config::Overflow::DropOldest,
        },
        access: access_list(namespace, spec),
        ..Default::default()
    };
    let replication = spec
        .replication
        .unwrap_or_else(|| crate::crd::default_replication(spec.replicas));
    let replication = int("replication", replication.into(), 1)?;
    let settings = QueueSettings {
        replication,
        raft: raft && replication == 1,
        ..settings
    };
    // Raft groups reach each other at the brokers' addresses.
    let settings = QueueSettings {
        peers: match settings.raft_groups() {
            false => Vec::new(),
            true => (0..settings.replicas)
                .map(|i| crate::resources::peer_address(name, namespace, i))
                .collect(),
        },
        ..settings
    };
    settings.validate_naming(spec_field)?;
    Ok(settings)
}

/// Checks what the schema cannot (Kubernetes 1.20 has no CEL rules, and older
/// objects may predate the schema) and renders `broker.toml`.
/// `raft`: each partition is a Raft group (`status.layout.raft`; replicated ones
/// always are). `placed`: where the copies are, once they move (else the brokers
/// place them by the formula, and the settings do not name it).
pub fn render(
    name: &str,
    namespace: &str,
    spec: &QueueSpec,
    raft: bool,
    placed: Option<&Placed>,
) -> Result<BrokerSettings, SpecError> {
    validate_template(spec)?;
    let mut settings = queue_settings(name, namespace, spec, raft)?;
    if let Some(placed) = placed {
        settings.placement = placed.placement.clone();
        settings.members = placed.members.clone();
        settings.validate_naming(spec_field)?;
    }
    let file = BrokerFile {
        queues: vec![settings],
    };
    let toml = format!(
        "# Written by sluice-operator from Queue {name}. Do not edit.\n{}",
        file.to_toml()
    );
    let hash = hex(&Sha256::digest(toml.as_bytes()))[..16].to_string();
    Ok(BrokerSettings { toml, hash })
}

/// `namespace/name` of every ServiceAccount on the Queue's access list.
pub fn access_list(namespace: &str, spec: &QueueSpec) -> Vec<String> {
    spec.access
        .service_accounts
        .iter()
        .map(|sa| {
            format!(
                "{}/{}",
                sa.namespace.as_deref().unwrap_or(namespace),
                sa.name
            )
        })
        .collect()
}

/// Semantic checks of a Queue `name` in `namespace`: everything its brokers would
/// refuse, and the pod template.
pub fn validate(name: &str, namespace: &str, spec: &QueueSpec) -> Result<(), SpecError> {
    validate_template(spec)?;
    queue_settings(name, namespace, spec, true).map(drop)
}

/// The operator's own checks: the broker pod template.
fn validate_template(spec: &QueueSpec) -> Result<(), SpecError> {
    let inv = |field: &'static str, message: String| Err(SpecError::Invalid { field, message });
    if let Some(t) = &spec.template {
        if let Some(img) = &t.image
            && img.trim().is_empty()
        {
            return inv("template.image", "must not be empty".into());
        }
        if let Some(p) = &t.image_pull_policy
            && !matches!(p.as_str(), "Always" | "IfNotPresent" | "Never")
        {
            return inv(
                "template.imagePullPolicy",
                format!("must be Always, IfNotPresent or Never, got {p:?}"),
            );
        }
    }
    Ok(())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Queue;
    use kube::ResourceExt;

    fn spec(yaml: &str) -> QueueSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_render_the_documented_broker_toml() {
        let s = spec("{}");
        let r = render("orders", "ns", &s, false, None).unwrap();
        let expected = "# Written by sluice-operator from Queue orders. Do not edit.
[[queue]]
name = \"orders\"
partitions = 6
replicas = 3
replication = 3
peers = [\"sluice-orders-0.sluice-orders.ns.svc:7171\", \"sluice-orders-1.sluice-orders.ns.svc:7171\", \"sluice-orders-2.sluice-orders.ns.svc:7171\"]
fsync = \"always\"
fsync_interval = \"10ms\"
visibility_timeout = \"30s\"
max_deliveries = 5
dead_letter = true
redelivery_delay = \"0s\"
redelivery_delay_max = \"15m\"
default_delay = \"0s\"
max_message_bytes = 262144
max_batch = 1000
dedup_window = \"5m\"
retention_max_age = \"336h\"
retention_max_messages = 0
retention_max_bytes = 0
overflow = \"reject_new\"
";
        assert_eq!(r.toml, expected);
        assert_eq!(r.hash.len(), 16);
    }

    #[test]
    fn settings_change_changes_hash() {
        let a = render("q", "ns", &spec("{}"), false, None).unwrap();
        let b = render(
            "q",
            "ns",
            &spec("delivery: {visibilityTimeout: 1m}"),
            false,
            None,
        )
        .unwrap();
        assert_ne!(a.hash, b.hash);
        assert!(b.toml.contains("visibility_timeout = \"1m\""));
    }

    #[test]
    fn access_list_is_rendered_for_the_broker_to_read() {
        let s = spec("access: {serviceAccounts: [{name: billing}, {name: audit, namespace: ops}]}");
        let r = render("orders", "shop", &s, false, None).unwrap();
        let file = sluice_config::BrokerFile::from_toml(&r.toml, "rendered").unwrap();
        assert_eq!(file.queues[0].access, ["shop/billing", "ops/audit"]);
        assert_ne!(
            r.hash,
            render("orders", "shop", &spec("{}"), false, None)
                .unwrap()
                .hash
        );
        assert!(
            !render("orders", "shop", &spec("{}"), false, None)
                .unwrap()
                .toml
                .contains("access")
        );
        let e = validate(
            "orders",
            "shop",
            &spec("access: {serviceAccounts: [{name: Billing}]}"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("access.serviceAccounts"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let e = validate("q", "ns", &spec("replicas: 4\npartitions: 1")).unwrap_err();
        assert!(e.to_string().starts_with("spec.partitions:"), "{e}");
        let e = validate(
            "q",
            "ns",
            &spec("delivery: {redeliveryDelay: 1h, redeliveryDelayMax: 1m}"),
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("spec.delivery.redeliveryDelay:"),
            "{e}"
        );
        let e = validate("q", "ns", &spec("delivery: {visibilityTimeout: 0s}")).unwrap_err();
        assert!(e.to_string().contains("visibilityTimeout"), "{e}");
        let e = validate("q", "ns", &spec("retention: {maxBytes: 10}")).unwrap_err();
        assert!(e.to_string().contains("retention.maxBytes"), "{e}");
    }

    #[test]
    fn examples_are_valid_queues() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v = serde_yaml::Value::deserialize(doc).unwrap();
                if v.get("kind").and_then(|k| k.as_str()) != Some("Queue") {
                    continue;
                }
                let q: Queue = serde_yaml::from_value(v).unwrap();
                let invalid = q
                    .metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key("sluice.dev/example-invalid"));
                let checked = validate(&q.name_any(), "default", &q.spec);
                assert_eq!(checked.is_err(), invalid, "{}: {checked:?}", path.display(),);
                n += 1;
            }
        }
        assert!(n >= 3, "expected example Queues in {dir}");
    }
    use serde::Deserialize;

    /// The Queue schema's `spec`, as the API server checks it.
    fn spec_schema() -> serde_json::Value {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(Queue::crd()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
    }

    /// What the API server's validation of the structural schema does with the
    /// keywords our schema uses (type, minimum, maximum, pattern, minLength,
    /// maxLength, enum, properties, items): the path of the first violation.
    fn schema_refuses(
        schema: &serde_json::Value,
        v: &serde_json::Value,
        path: &str,
    ) -> Option<String> {
        use serde_json::Value;
        let refuse = |why: &str| Some(format!("{path}: {why}"));
        if v.is_null() {
            return (schema["nullable"] != Value::Bool(true)).then(|| format!("{path}: null"));
        }
        match schema["type"].as_str() {
            Some("integer") if !(v.is_i64() || v.is_u64()) => return refuse("not an integer"),
            Some("string") if !v.is_string() => return refuse("not a string"),
            Some("boolean") if !v.is_boolean() => return refuse("not a boolean"),
            Some("object") if !v.is_object() => return refuse("not an object"),
            Some("array") if !v.is_array() => return refuse("not an array"),
            _ => {}
        }
        if let (Some(min), Some(n)) = (schema["minimum"].as_f64(), v.as_f64())
            && n < min
        {
            return refuse("below minimum");
        }
        if let (Some(max), Some(n)) = (schema["maximum"].as_f64(), v.as_f64())
            && n > max
        {
            return refuse("above maximum");
        }
        if let Some(text) = v.as_str() {
            let chars = text.chars().count() as u64;
            if schema["maxLength"].as_u64().is_some_and(|m| chars > m) {
                return refuse("too long");
            }
            if schema["minLength"].as_u64().is_some_and(|m| chars < m) {
                return refuse("too short");
            }
            if let Some(p) = schema["pattern"].as_str()
                && !regex::Regex::new(p).unwrap().is_match(text)
            {
                return refuse("does not match the pattern");
            }
        }
        if let Some(allowed) = schema["enum"].as_array()
            && !allowed.contains(v)
        {
            return refuse("unsupported value");
        }
        if let (Some(props), Some(obj)) = (schema["properties"].as_object(), v.as_object()) {
            for (k, sub) in obj {
                if let Some(s) = props.get(k)
                    && let Some(e) = schema_refuses(s, sub, &format!("{path}.{k}"))
                {
                    return Some(e);
                }
            }
        }
        if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
            for (i, sub) in arr.iter().enumerate() {
                if let Some(e) = schema_refuses(items, sub, &format!("{path}[{i}]")) {
                    return Some(e);
                }
            }
        }
        None
    }

    #[derive(Debug)]
    enum Expect {
        /// The API server refuses it, naming this field.
        Refused(&'static str),
        /// The operator renders a broker.toml that the broker loads.
        Runs,
        /// The operator reports InvalidSpec naming this field.
        Invalid(&'static str),
    }
    use Expect::*;

    impl Expect {
        fn same(&self, other: &Expect) -> bool {
            match (self, other) {
                (Refused(a), Refused(b)) | (Invalid(a), Invalid(b)) => a == b,
                (Runs, Runs) => true,
                _ => false,
            }
        }
    }

    /// What happens to one Queue: refused by the schema, or else either a broker.toml
    /// that loads as the broker loads it (to the very settings the operator meant), or
    /// InvalidSpec naming a field. Never a file the brokers refuse.
    fn outcome(name: &str, spec_json: &serde_json::Value) -> Expect {
        if let Some(e) = schema_refuses(&spec_schema(), spec_json, "spec") {
            let field = e.split(':').next().unwrap().to_string();
            return Refused(Box::leak(field.into_boxed_str()));
        }
        let spec: QueueSpec = serde_json::from_value(spec_json.clone()).unwrap_or_else(|e| {
            panic!("the schema accepts {spec_json} but the operator cannot read it: {e}")
        });
        match render(name, "shop", &spec, false, None) {
            Ok(rendered) => {
                assert_eq!(validate(name, "shop", &spec), Ok(()));
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("broker.toml");
                std::fs::write(&path, &rendered.toml).unwrap();
                // The broker's load path (sluice-broker --config).
                let file = BrokerFile::load(&path).unwrap_or_else(|e| {
                    panic!(
                        "{spec_json}: brokers refuse the rendered file: {e}\n{}",
                        rendered.toml
                    )
                });
                let meant = queue_settings(name, "shop", &spec, false).unwrap();
                assert_eq!(file.queues, std::slice::from_ref(&meant), "{spec_json}");
                meant.dead_letter_queue().validate().unwrap();
                Runs
            }
            Err(e) => {
                assert_eq!(validate(name, "shop", &spec).as_ref(), Err(&e));
                let field = e.field();
                assert!(e.to_string().starts_with(&format!("{field}: ")), "{e}");
                Invalid(Box::leak(field.into_boxed_str()))
            }
        }
    }

    #[test]
    fn replicated_queues_name_every_broker_as_a_peer() {
        let s = spec("replicas: 3\npartitions: 6\nreplication: 3");
        let q = queue_settings("orders", "shop", &s, false).unwrap();
        assert_eq!(q.replication, 3);
        assert_eq!(
            q.peers,
            (0..3)
                .map(|i| format!("sluice-orders-{i}.sluice-orders.shop.svc:7171"))
                .collect::<Vec<_>>()
        );
        let one =
            queue_settings("orders", "shop", &spec("replicas: 2\npartitions: 6"), false).unwrap();
        assert_eq!((one.replication, one.peers.len()), (1, 0));
        // A Queue from before one-copy Raft groups: its settings (and so its pods)
        // stay as they were.
        assert!(
            !render("orders", "shop", &spec("replicas: 2"), false, None)
                .unwrap()
                .toml
                .contains("peers")
        );
        // One copy as a Raft group (so it can move): the peers, and the flag.
        let raft =
            queue_settings("orders", "shop", &spec("replicas: 2\npartitions: 6"), true).unwrap();
        assert!(raft.raft && raft.raft_groups());
        assert_eq!(raft.peers.len(), 2);
        // Replicated queues are Raft groups anyway; the flag stays out of their file.
        assert!(!queue_settings("orders", "shop", &s, true).unwrap().raft);
    }

    #[test]
    fn every_spec_the_schema_accepts_runs_or_is_invalid_spec() {
        use serde_json::json;
        let long_ok = "99999999999999d"; // the longest the schema allows; parses
        let cases: Vec<(serde_json::Value, Expect)> = vec![
            (json!({}), Runs),
            // replicas and partitions
            (json!({"replicas": 1, "partitions": 1}), Runs),
            (json!({"replicas": 64, "partitions": 64}), Runs),
            (json!({"replicas": 0}), Refused("spec.replicas")),
            (
                json!({"replicas": 65, "partitions": 100}),
                Refused("spec.replicas"),
            ),
            (
                json!({"replicas": 4, "partitions": 1}),
                Invalid("spec.partitions"),
            ),
            // Three copies (the default from 3 brokers) keep 4 brokers busy with 2.
            (json!({"replicas": 4, "partitions": 2}), Runs),
            (
                json!({"replicas": 4, "partitions": 2, "replication": 1}),
                Invalid("spec.partitions"),
            ),
            // replication: 1, 3 or 5 copies, no more than the brokers
            (json!({"replicas": 3, "partitions": 6}), Runs),
            (
                json!({"replicas": 5, "partitions": 5, "replication": 5}),
                Runs,
            ),
            (
                json!({"replicas": 3, "partitions": 3, "replication": 1}),
                Runs,
            ),
            (json!({"replication": 2}), Refused("spec.replication")),
            (
                json!({"replicas": 4, "partitions": 4, "replication": 4}),
                Refused("spec.replication"),
            ),
            (
                json!({"replicas": 2, "partitions": 2, "replication": 3}),
                Invalid("spec.replication"),
            ),
            (json!({"partitions": 0}), Refused("spec.partitions")),
            (json!({"partitions": 1024}), Runs),
            (json!({"partitions": 1025}), Refused("spec.partitions")),
            // The issue: the schema allowed it, the operator wrote it, brokers refused it.
            (json!({"partitions": 2000}), Refused("spec.partitions")),
            (json!({"partitions": 4096}), Refused("spec.partitions")),
            // batches and message sizes
            (json!({"maxBatch": 1}), Runs),
            (json!({"maxBatch": 10000}), Runs),
            (json!({"maxBatch": 10001}), Refused("spec.maxBatch")),
            (json!({"maxBatch": 100000}), Refused("spec.maxBatch")),
            (json!({"maxBatch": 0}), Refused("spec.maxBatch")),
            (json!({"maxMessageBytes": 1}), Runs),
            (json!({"maxMessageBytes": 67108864}), Runs),
            (
                json!({"maxMessageBytes": 67108865}),
                Refused("spec.maxMessageBytes"),
            ),
            (
                json!({"maxMessageBytes": 0}),
                Refused("spec.maxMessageBytes"),
            ),
            // retention
            (
                json!({"retention": {"maxBytes": 10}}),
                Invalid("spec.retention.maxBytes"),
            ),
            (json!({"retention": {"maxBytes": 262144}}), Runs),
            (
                json!({"retention": {"maxBytes": -1}}),
                Refused("spec.retention.maxBytes"),
            ),
            (
                json!({"retention": {"maxMessages": i64::MAX, "maxBytes": i64::MAX}}),
                Runs,
            ),
            (
                json!({"retention": {"maxMessages": -1}}),
                Refused("spec.retention.maxMessages"),
            ),
            (
                json!({"retention": {"maxAge": "0s", "overflow": "dropOldest"}}),
                Runs,
            ),
            (json!({"retention": {"maxAge": long_ok}}), Runs),
            (
                json!({"retention": {"maxAge": "999999999999999d"}}),
                Refused("spec.retention.maxAge"),
            ),
            (
                json!({"retention": {"maxAge": "99999999999999999999h"}}),
                Refused("spec.retention.maxAge"),
            ),
            // deliveries
            (json!({"delivery": {"maxDeliveries": 1}}), Runs),
            (
                json!({"delivery": {"maxDeliveries": 1000, "deadLetter": false}}),
                Runs,
            ),
            (
                json!({"delivery": {"maxDeliveries": 0}}),
                Refused("spec.delivery.maxDeliveries"),
            ),
            (
                json!({"delivery": {"maxDeliveries": 1001}}),
                Refused("spec.delivery.maxDeliveries"),
            ),
            // visibility: the schema cannot bound a duration string; config caps it at 12h
            (json!({"delivery": {"visibilityTimeout": "1ms"}}), Runs),
            (json!({"delivery": {"visibilityTimeout": "12h"}}), Runs),
            (json!({"delivery": {"visibilityTimeout": "720m"}}), Runs),
            (json!({"delivery": {"visibilityTimeout": "1.5h"}}), Runs),
            (
                json!({"delivery": {"visibilityTimeout": "12h0.001s"}}),
                Invalid("spec.delivery.visibilityTimeout"),
            ),
            (
                json!({"delivery": {"visibilityTimeout": "13h"}}),
                Invalid("spec.delivery.visibilityTimeout"),
            ),
            (
                json!({"delivery": {"visibilityTimeout": "1d"}}),
                Invalid("spec.delivery.visibilityTimeout"),
            ),
            (
                json!({"delivery": {"visibilityTimeout": "0s"}}),
                Invalid("spec.delivery.visibilityTimeout"),
            ),
            (
                json!({"delivery": {"visibilityTimeout": "0"}}),
                Invalid("spec.delivery.visibilityTimeout"),
            ),
            (
                json!({"delivery": {"visibilityTimeout": "30 seconds"}}),
                Refused("spec.delivery.visibilityTimeout"),
            ),
            (
                json!({"delivery": {"visibilityTimeout": "30"}}),
                Refused("spec.delivery.visibilityTimeout"),
            ),
            (
                json!({"delivery": {"visibilityTimeout": "-5s"}}),
                Refused("spec.delivery.visibilityTimeout"),
            ),
            (
                json!({"delivery": {"visibilityTimeout": "+5s"}}),
                Refused("spec.delivery.visibilityTimeout"),
            ),
            (
                json!({"delivery": {"visibilityTimeout": " 5s"}}),
                Refused("spec.delivery.visibilityTimeout"),
            ),
            (
                json!({"delivery": {"visibilityTimeout": "1w"}}),
                Refused("spec.delivery.visibilityTimeout"),
            ),
            (
                json!({"delivery": {"visibilityTimeout": "1h30"}}),
                Refused("spec.delivery.visibilityTimeout"),
            ),
            (
                json!({"delivery": {"visibilityTimeout": "."}}),
                Refused("spec.delivery.visibilityTimeout"),
            ),
            // default delay: at most 15 days
            (json!({"delivery": {"defaultDelay": "15d"}}), Runs),
            (json!({"delivery": {"defaultDelay": "360h"}}), Runs),
            (
                json!({"delivery": {"defaultDelay": "15d1ms"}}),
                Invalid("spec.delivery.defaultDelay"),
            ),
            (
                json!({"delivery": {"defaultDelay": long_ok}}),
                Invalid("spec.delivery.defaultDelay"),
            ),
            // redelivery backoff
            (
                json!({"delivery": {"redeliveryDelay": "1h", "redeliveryDelayMax": "1m"}}),
                Invalid("spec.delivery.redeliveryDelay"),
            ),
            (
                json!({"delivery": {"redeliveryDelay": "1m", "redeliveryDelayMax": "1m"}}),
                Runs,
            ),
            (
                json!({"delivery": {"redeliveryDelay": "1s", "redeliveryDelayMax": "0s"}}),
                Runs,
            ),
            (
                json!({"delivery": {"redeliveryDelay": ".5s", "redeliveryDelayMax": long_ok}}),
                Runs,
            ),
            // flushing
            (
                json!({"durability": {"fsync": "interval", "fsyncInterval": "0s"}}),
                Invalid("spec.durability.fsyncInterval"),
            ),
            (
                json!({"durability": {"fsync": "interval", "fsyncInterval": "1ns"}}),
                Runs,
            ),
            (
                json!({"durability": {"fsync": "interval", "fsyncInterval": "5µs"}}),
                Runs,
            ),
            (
                json!({"durability": {"fsync": "always", "fsyncInterval": "0s"}}),
                Runs,
            ),
            (
                json!({"durability": {"fsync": "sometimes"}}),
                Refused("spec.durability.fsync"),
            ),
            (
                json!({"durability": {"fsyncInterval": "10 ms"}}),
                Refused("spec.durability.fsyncInterval"),
            ),
            // deduplication
            (json!({"deduplicationWindow": "0s"}), Runs),
            (json!({"deduplicationWindow": "1h30m15s500ms"}), Runs),
            (
                json!({"deduplicationWindow": "1h30m15s500ms00s"}),
                Refused("spec.deduplicationWindow"),
            ),
            // access lists
            (
                json!({"access": {"serviceAccounts": [{"name": "billing"}, {"name": "audit", "namespace": "ops"}]}}),
                Runs,
            ),
            (
                json!({"access": {"serviceAccounts": [{"name": ""}]}}),
                Refused("spec.access.serviceAccounts[0].name"),
            ),
            (
                json!({"access": {"serviceAccounts": [{"name": "Billing"}]}}),
                Invalid("spec.access.serviceAccounts"),
            ),
            (
                json!({"access": {"serviceAccounts": [{"name": "billing", "namespace": "Ops"}]}}),
                Invalid("spec.access.serviceAccounts"),
            ),
            // the pod template: the operator's own checks
            (
                json!({"template": {"image": " "}}),
                Invalid("spec.template.image"),
            ),
            (
                json!({"template": {"imagePullPolicy": "Sometimes"}}),
                Invalid("spec.template.imagePullPolicy"),
            ),
            (
                json!({"template": {"image": "registry.example/sluice-broker:1", "imagePullPolicy": "Never"}}),
                Runs,
            ),
        ];
        let mut wrong = Vec::new();
        for (spec, expect) in &cases {
            let got = outcome("orders", spec);
            if !got.same(expect) {
                wrong.push(format!("{spec}: expected {expect:?}, got {got:?}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn queue_names_the_brokers_refuse_are_invalid_spec() {
        for ok in ["orders", "a", &"x".repeat(59)] {
            assert!(matches!(outcome(ok, &serde_json::json!({})), Runs), "{ok}");
        }
        // Kubernetes allows these object names; a broker does not allow these queue names.
        for bad in ["orders.v2", "my.queue.dlq", &"x".repeat(60)] {
            let e = validate(bad, "shop", &spec("{}")).unwrap_err();
            assert!(e.to_string().starts_with("metadata.name: "), "{e}");
            assert!(matches!(
                outcome(bad, &serde_json::json!({})),
                Invalid("metadata.name")
            ));
        }
    }

    #[test]
    fn every_settings_field_has_its_spec_path() {
        let fields = serde_json::to_value(sluice_config::QueueSettings {
            access: vec!["a/b".into()],
            ..sluice_config::QueueSettings::named("q")
        })
        .unwrap();
        for key in fields.as_object().unwrap().keys().filter(|k| *k != "name") {
            let key: &'static str = Box::leak(key.clone().into_boxed_str());
            let path = spec_field(key);
            assert!(
                path != key || ["partitions", "replicas"].contains(&key),
                "broker.toml field {key} has no spec path"
            );
            let top = path.split('.').next().unwrap();
            assert!(
                spec_schema()["properties"].get(top).is_some(),
                "{key} -> spec.{path}: no such spec field"
            );
        }
    }

    /// The schema's duration pattern (with its length limit) and the parser agree:
    /// over the characters durations are made of, a string matches exactly when it
    /// parses (the parser alone also trims blanks and takes a leading '+').
    #[test]
    fn duration_pattern_and_parser_agree() {
        use sluice_config::{DURATION_MAX_CHARS, DURATION_PATTERN, parse_duration};
        let re = regex::Regex::new(DURATION_PATTERN).unwrap();
        let alphabet = ['0', '7', '.', 'n', 'u', 'µ', 'm', 's', 'h', 'd', 'x'];
        let mut strings = vec![String::new()];
        let mut all = Vec::new();
        for _ in 0..5 {
            strings = strings
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            all.extend(strings.iter().cloned());
        }
        let mut matched = 0;
        for s in &all {
            let m = re.is_match(s);
            matched += usize::from(m);
            assert_eq!(m, parse_duration(s).is_ok(), "{s:?}: pattern says {m}");
        }
        assert!(matched > 1000, "{matched}");
        // At the length limit, the largest values still parse; one more digit would not.
        let max = DURATION_MAX_CHARS as usize;
        for unit in ["d", "h", "m", "s", "ms", "us", "µs", "ns"] {
            let s = format!("{}{unit}", "9".repeat(max - unit.chars().count()));
            assert!(re.is_match(&s));
            parse_duration(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
        }
        for s in ["9999999d9999999d", "9999999999999.9d"] {
            assert!(s.chars().count() > max || parse_duration(s).is_ok(), "{s}");
        }
        assert!(
            parse_duration(&format!("{}d", "9".repeat(max))).is_err(),
            "the limit is needed"
        );
        // The CRD carries both on every duration field.
        let schema = spec_schema();
        for path in [
            "deduplicationWindow",
            "durability.fsyncInterval",
            "delivery.visibilityTimeout",
            "delivery.redeliveryDelay",
            "delivery.redeliveryDelayMax",
            "delivery.defaultDelay",
            "retention.maxAge",
        ] {
            let mut s = &schema;
            for part in path.split('.') {
                s = &s["properties"][part];
            }
            assert_eq!(s["pattern"], DURATION_PATTERN, "{path}");
            assert_eq!(s["maxLength"], DURATION_MAX_CHARS, "{path}");
            assert!(
                s["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{path}"
            );
        }
    }
}
