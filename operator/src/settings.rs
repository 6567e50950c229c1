//! Validation of a Queue spec beyond what the schema checks, and rendering of the
//! broker settings (`broker.toml`).

use crate::crd::{Fsync, QueueSpec};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;

/// A spec the schema accepted but the operator cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("spec.{field}: invalid duration {value:?} (use e.g. \"30s\", \"5m\", \"1h30m\")")]
    Duration { field: &'static str, value: String },
    #[error("spec.{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// Parses a Kubernetes-style duration ("30s", "5m", "1h30m", "10ms", "14d") into
/// milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return None;
        }
        let n: u64 = s[start..i].parse().ok()?;
        let ustart = i;
        while i < b.len() && b[i].is_ascii_alphabetic() {
            i += 1;
        }
        let mult = match &s[ustart..i] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(mult)?)?;
    }
    Some(total)
}

/// Renders milliseconds in a single unit the broker parses ("10ms", "30s", "15m", "336h").
pub fn format_duration_ms(ms: u64) -> String {
    if ms == 0 {
        "0s".into()
    } else if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

/// Broker settings derived from a valid spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerSettings {
    pub toml: String,
    pub hash: String,
}

/// Checks what the schema cannot (Kubernetes 1.20 has no CEL rules, and older
/// objects may predate the schema) and renders `broker.toml`.
///
/// `replicas` is the number of brokers the StatefulSet actually runs (it differs
/// from spec.replicas while a scale-down is blocked).
pub fn render(
    name: &str,
    namespace: &str,
    spec: &QueueSpec,
    replicas: i32,
) -> Result<BrokerSettings, SpecError> {
    validate(spec)?;
    let d = |field: &'static str, v: &str| -> Result<String, SpecError> {
        parse_duration_ms(v)
            .map(format_duration_ms)
            .ok_or_else(|| SpecError::Duration {
                field,
                value: v.to_string(),
            })
    };
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Written by sluice-operator from Queue {name}. Do not edit."
    );
    let _ = writeln!(t, "[[queue]]");
    let _ = writeln!(t, "name = {}", toml_str(name));
    let _ = writeln!(t, "partitions = {}", spec.partitions);
    let _ = writeln!(t, "replicas = {replicas}");
    let _ = writeln!(t, "fsync = \"{}\"", spec.durability.fsync.as_str());
    let _ = writeln!(
        t,
        "fsync_interval = \"{}\"",
        d("durability.fsyncInterval", &spec.durability.fsync_interval)?
    );
    let _ = writeln!(
        t,
        "visibility_timeout = \"{}\"",
        d(
            "delivery.visibilityTimeout",
            &spec.delivery.visibility_timeout
        )?
    );
    let _ = writeln!(t, "max_deliveries = {}", spec.delivery.max_deliveries);
    let _ = writeln!(t, "dead_letter = {}", spec.delivery.dead_letter);
    let _ = writeln!(
        t,
        "redelivery_delay = \"{}\"",
        d("delivery.redeliveryDelay", &spec.delivery.redelivery_delay)?
    );
    let _ = writeln!(
        t,
        "redelivery_delay_max = \"{}\"",
        d(
            "delivery.redeliveryDelayMax",
            &spec.delivery.redelivery_delay_max
        )?
    );
    let _ = writeln!(
        t,
        "default_delay = \"{}\"",
        d("delivery.defaultDelay", &spec.delivery.default_delay)?
    );
    let _ = writeln!(t, "max_message_bytes = {}", spec.max_message_bytes);
    let _ = writeln!(t, "max_batch = {}", spec.max_batch);
    let _ = writeln!(
        t,
        "dedup_window = \"{}\"",
        d("deduplicationWindow", &spec.deduplication_window)?
    );
    let _ = writeln!(
        t,
        "retention_max_age = \"{}\"",
        d("retention.maxAge", &spec.retention.max_age)?
    );
    let _ = writeln!(
        t,
        "retention_max_messages = {}",
        spec.retention.max_messages
    );
    let _ = writeln!(t, "retention_max_bytes = {}", spec.retention.max_bytes);
    let _ = writeln!(t, "overflow = \"{}\"", spec.retention.overflow.as_str());
    // Written only when set, so Queues without a list keep their settings hash.
    let access = access_list(namespace, spec);
    if !access.is_empty() {
        let entries: Vec<String> = access.iter().map(|a| toml_str(a)).collect();
        let _ = writeln!(t, "access = [{}]", entries.join(", "));
    }
    let hash = hex(&Sha256::digest(t.as_bytes()))[..16].to_string();
    Ok(BrokerSettings { toml: t, hash })
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

/// Semantic checks of a spec.
pub fn validate(spec: &QueueSpec) -> Result<(), SpecError> {
    let inv = |field: &'static str, message: String| Err(SpecError::Invalid { field, message });
    if spec.replicas < 1 {
        return inv(
            "replicas",
            format!("must be at least 1, got {}", spec.replicas),
        );
    }
    if spec.partitions < 1 {
        return inv(
            "partitions",
            format!("must be at least 1, got {}", spec.partitions),
        );
    }
    if spec.partitions < spec.replicas {
        return inv(
            "partitions",
            format!(
                "must be at least replicas ({}), got {}: a broker without a partition would sit idle",
                spec.replicas, spec.partitions
            ),
        );
    }
    let durations: [(&'static str, &str); 7] = [
        ("durability.fsyncInterval", &spec.durability.fsync_interval),
        (
            "delivery.visibilityTimeout",
            &spec.delivery.visibility_timeout,
        ),
        ("delivery.redeliveryDelay", &spec.delivery.redelivery_delay),
        (
            "delivery.redeliveryDelayMax",
            &spec.delivery.redelivery_delay_max,
        ),
        ("delivery.defaultDelay", &spec.delivery.default_delay),
        ("deduplicationWindow", &spec.deduplication_window),
        ("retention.maxAge", &spec.retention.max_age),
    ];
    for (field, v) in durations {
        if parse_duration_ms(v).is_none() {
            return Err(SpecError::Duration {
                field,
                value: v.to_string(),
            });
        }
    }
    let ms = |v: &str| parse_duration_ms(v).unwrap_or(0);
    if ms(&spec.delivery.visibility_timeout) == 0 {
        return inv(
            "delivery.visibilityTimeout",
            "must be greater than 0s".into(),
        );
    }
    if spec.durability.fsync == Fsync::Interval && ms(&spec.durability.fsync_interval) == 0 {
        return inv(
            "durability.fsyncInterval",
            "must be greater than 0s when fsync is interval".into(),
        );
    }
    if ms(&spec.delivery.redelivery_delay) > ms(&spec.delivery.redelivery_delay_max) {
        return inv(
            "delivery.redeliveryDelay",
            format!(
                "{} exceeds delivery.redeliveryDelayMax {}",
                spec.delivery.redelivery_delay, spec.delivery.redelivery_delay_max
            ),
        );
    }
    if spec.max_message_bytes < 1 {
        return inv("maxMessageBytes", "must be at least 1".into());
    }
    if spec.retention.max_bytes > 0 && spec.retention.max_bytes < spec.max_message_bytes {
        return inv(
            "retention.maxBytes",
            format!(
                "{} is smaller than maxMessageBytes {}: no message could ever be kept",
                spec.retention.max_bytes, spec.max_message_bytes
            ),
        );
    }
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
    for (i, sa) in spec.access.service_accounts.iter().enumerate() {
        if sa.name.is_empty() {
            return inv(
                "access.serviceAccounts",
                format!("entry {i} has an empty name"),
            );
        }
        // The broker parses its access list the same way (sluice-config).
        let entry = format!("{}/{}", sa.namespace.as_deref().unwrap_or("ns"), sa.name);
        if sluice_config::parse_service_account(&entry).is_none() {
            return inv(
                "access.serviceAccounts",
                format!("entry {i} ({entry}) is not a valid ServiceAccount name and namespace"),
            );
        }
    }
    Ok(())
}

fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Queue;

    fn spec(yaml: &str) -> QueueSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("30s"), Some(30_000));
        assert_eq!(parse_duration_ms("1h30m"), Some(5_400_000));
        assert_eq!(parse_duration_ms("10ms"), Some(10));
        assert_eq!(parse_duration_ms("14d"), Some(14 * 86_400_000));
        assert_eq!(parse_duration_ms("0s"), Some(0));
        assert_eq!(parse_duration_ms("5"), None);
        assert_eq!(parse_duration_ms("s"), None);
        assert_eq!(parse_duration_ms("5x"), None);
        assert_eq!(parse_duration_ms(""), None);
        assert_eq!(format_duration_ms(14 * 86_400_000), "336h");
        assert_eq!(format_duration_ms(5_400_000), "90m");
        assert_eq!(format_duration_ms(1500), "1500ms");
    }

    #[test]
    fn defaults_render_the_documented_broker_toml() {
        let s = spec("{}");
        let r = render("orders", "ns", &s, 3).unwrap();
        let expected = "# Written by sluice-operator from Queue orders. Do not edit.
[[queue]]
name = \"orders\"
partitions = 6
replicas = 3
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
        let a = render("q", "ns", &spec("{}"), 3).unwrap();
        let b = render("q", "ns", &spec("delivery: {visibilityTimeout: 1m}"), 3).unwrap();
        assert_ne!(a.hash, b.hash);
        assert!(b.toml.contains("visibility_timeout = \"1m\""));
    }

    #[test]
    fn access_list_is_rendered_for_the_broker_to_read() {
        let s = spec("access: {serviceAccounts: [{name: billing}, {name: audit, namespace: ops}]}");
        let r = render("orders", "shop", &s, 1).unwrap();
        let file = sluice_config::BrokerFile::from_toml(&r.toml, "rendered").unwrap();
        assert_eq!(file.queues[0].access, ["shop/billing", "ops/audit"]);
        assert_ne!(
            r.hash,
            render("orders", "shop", &spec("{}"), 1).unwrap().hash
        );
        assert!(
            !render("orders", "shop", &spec("{}"), 1)
                .unwrap()
                .toml
                .contains("access")
        );
        let e = validate(&spec("access: {serviceAccounts: [{name: Billing}]}")).unwrap_err();
        assert!(e.to_string().contains("access.serviceAccounts"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let e = validate(&spec("replicas: 4\npartitions: 2")).unwrap_err();
        assert!(e.to_string().starts_with("spec.partitions:"), "{e}");
        let e = validate(&spec(
            "delivery: {redeliveryDelay: 1h, redeliveryDelayMax: 1m}",
        ))
        .unwrap_err();
        assert!(
            e.to_string().starts_with("spec.delivery.redeliveryDelay:"),
            "{e}"
        );
        let e = validate(&spec("delivery: {visibilityTimeout: 0s}")).unwrap_err();
        assert!(e.to_string().contains("visibilityTimeout"), "{e}");
        let e = validate(&spec("retention: {maxBytes: 10}")).unwrap_err();
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
                assert_eq!(
                    validate(&q.spec).is_err(),
                    invalid,
                    "{}: {:?}",
                    path.display(),
                    validate(&q.spec)
                );
                n += 1;
            }
        }
        assert!(n >= 3, "expected example Queues in {dir}");
    }
    use serde::Deserialize;
}
