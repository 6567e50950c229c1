//! Queue settings: the one description of a queue that the operator writes (into the
//! ConfigMap key `broker.toml`), the broker reads, and `sluice dev` defaults.
//!
//! Durations are Kubernetes-style strings ("30s", "5m", "1h30m", "250ms"), parsed the
//! way Go's `time.ParseDuration` does (plus `d` for days), so a value means the same
//! in a Queue manifest and in the broker.
//!
//! The operator owns none of this: it converts a Queue's spec into [`QueueSettings`],
//! checks it with [`QueueSettings::validate_naming`] and writes it with
//! [`BrokerFile::to_toml`]; its schema's bounds are the constants below. The feature
//! `schemars` adds the JSON schema of [`GoDuration`] for the operator's CRD (the
//! broker does not build it).

use serde::{Deserialize, Serialize};
use std::time::Duration;

mod duration;
pub mod placement;
pub mod report;
pub use duration::{
    DURATION_MAX_CHARS, DURATION_PATTERN, GoDuration, format_duration, parse_duration,
};
pub use placement::replica_set;

/// Errors in queue settings and names.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid duration {value:?}: {reason}")]
    Duration { value: String, reason: String },
    #[error("invalid queue name {name:?}: {reason}")]
    QueueName { name: String, reason: &'static str },
    #[error("queue {queue}: {field}: {reason}")]
    Invalid {
        queue: String,
        field: &'static str,
        reason: String,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The longest queue name; leaves room for the `.dlq` suffix within DNS label rules.
pub const MAX_QUEUE_NAME: usize = 59;
/// Suffix of a queue's dead-letter queue.
pub const DLQ_SUFFIX: &str = ".dlq";

/// Checks a queue name: 1–59 characters of `a-z 0-9 - _`, starting with a letter or
/// digit; a dead-letter queue adds `.dlq`.
pub fn validate_queue_name(name: &str) -> Result<(), ConfigError> {
    let base = name.strip_suffix(DLQ_SUFFIX).unwrap_or(name);
    let err = |reason| ConfigError::QueueName {
        name: name.to_string(),
        reason,
    };
    if base.is_empty() {
        return Err(err("must not be empty"));
    }
    if base.len() > MAX_QUEUE_NAME {
        return Err(err("must be at most 59 characters (plus .dlq)"));
    }
    if !base.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(err("must start with a letter or digit"));
    }
    if !base
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(err(
            "may hold only lowercase letters, digits, '-' and '_' (and end in .dlq for a dead-letter queue)",
        ));
    }
    Ok(())
}

/// How hard the broker works to keep a message before answering its producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    /// Answer only once the record is on disk (group commit: one fsync for many writes).
    #[default]
    Always,
    /// Answer once written to the OS; fsync every `fsync_interval`.
    Interval,
    /// Answer once written to the OS; never fsync (the OS flushes when it likes).
    Never,
}

impl FsyncMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FsyncMode::Always => "always",
            FsyncMode::Interval => "interval",
            FsyncMode::Never => "never",
        }
    }
}

/// What happens when a retention limit (messages or bytes) is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Refuse new messages with RESOURCE_EXHAUSTED.
    #[default]
    RejectNew,
    /// Drop the oldest waiting messages to make room.
    DropOldest,
}

/// The settings of one queue. Field names are those of `broker.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    pub name: String,
    pub partitions: u32,
    /// Broker pods sharing the partitions.
    pub replicas: u32,
    /// Copies of each partition, on as many different brokers ([`replica_set`]): 1,
    /// 3 or 5. With more than one, each partition is a Raft group over its copies and
    /// a write is answered once a majority holds it. Written only when above 1.
    #[serde(skip_serializing_if = "is_one")]
    pub replication: u32,
    /// Each partition is a Raft group even with one copy, so that its copy can move
    /// to another broker (the operator's Queues; [`Self::raft_groups`]). Written only
    /// when set.
    #[serde(skip_serializing_if = "is_false")]
    pub raft: bool,
    /// gRPC address of every broker of the queue, by ordinal: how replicas of a
    /// partition reach each other. Needed when `replication` is above 1.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// Replicated: for each partition, the brokers that should hold its copies (the
    /// operator's [`placement::rebalance`]). A partition's leader moves the copies
    /// there. Empty: the [`replica_set`] formula.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<Vec<u32>>,
    /// Replicated: for each partition, the members of its group as last seen
    /// committed. They form a new group, and keep their copies until the group has
    /// moved off them; a broker deletes a copy it is neither a member of nor placed
    /// on. Empty: the same as `placement`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<Vec<u32>>,
    pub fsync: FsyncMode,
    #[serde(with = "duration::serde_str")]
    pub fsync_interval: Duration,
    #[serde(with = "duration::serde_str")]
    pub visibility_timeout: Duration,
    /// Deliveries before a message is dead-lettered (0 = unlimited).
    pub max_deliveries: u32,
    /// Whether failing messages go to `<name>.dlq` (otherwise they are dropped).
    pub dead_letter: bool,
    /// Base of the exponential redelivery backoff after a nack without a delay.
    #[serde(with = "duration::serde_str")]
    pub redelivery_delay: Duration,
    #[serde(with = "duration::serde_str")]
    pub redelivery_delay_max: Duration,
    #[serde(with = "duration::serde_str")]
    pub default_delay: Duration,
    pub max_message_bytes: u64,
    pub max_batch: u32,
    #[serde(with = "duration::serde_str")]
    pub dedup_window: Duration,
    /// Age after which a waiting message is dropped (0 = unlimited).
    #[serde(with = "duration::serde_str")]
    pub retention_max_age: Duration,
    /// Unsettled messages the queue holds at most (0 = unlimited).
    pub retention_max_messages: u64,
    /// Bytes of unsettled message bodies the queue holds at most (0 = unlimited).
    pub retention_max_bytes: u64,
    pub overflow: Overflow,
    /// ServiceAccounts (`namespace/name`) allowed to use the queue. Empty: every
    /// caller. When set, each call carries a ServiceAccount token for the queue's
    /// audience ([`token_audience`]) and the broker checks it with a TokenReview.
    /// Written only when set (the operator's settings hash of a Queue without a list
    /// stays what it was).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<String>,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            name: String::new(),
            partitions: 4,
            replicas: 1,
            replication: 1,
            raft: false,
            peers: Vec::new(),
            placement: Vec::new(),
            members: Vec::new(),
            fsync: FsyncMode::Always,
            fsync_interval: Duration::from_millis(10),
            visibility_timeout: Duration::from_secs(30),
            max_deliveries: 5,
            dead_letter: true,
            redelivery_delay: Duration::ZERO,
            redelivery_delay_max: Duration::from_secs(15 * 60),
            default_delay: Duration::ZERO,
            max_message_bytes: 256 * 1024,
            max_batch: 1000,
            dedup_window: Duration::from_secs(5 * 60),
            retention_max_age: Duration::from_secs(14 * 24 * 3600),
            retention_max_messages: 0,
            retention_max_bytes: 0,
            overflow: Overflow::RejectNew,
            access: Vec::new(),
        }
    }
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Copy counts a partition may have: odd, so that a majority is well defined and
/// one more copy always buys one more failure survived.
pub const REPLICATION_CHOICES: [u32; 3] = [1, 3, 5];

/// The audience of the ServiceAccount tokens that open a queue: the sidecar's
/// projected token for it and the broker's TokenReview both name it, so a token
/// issued for one queue (or for the API server) opens no other.
pub fn token_audience(namespace: &str, queue: &str) -> String {
    let base = queue.strip_suffix(DLQ_SUFFIX).unwrap_or(queue);
    format!("sluice.dev/{namespace}/{base}")
}

/// Parses an access entry, `namespace/name`, into its two parts.
pub fn parse_service_account(entry: &str) -> Option<(&str, &str)> {
    let (ns, name) = entry.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    (ok(ns) && ok(name)).then_some((ns, name))
}

/// Upper bounds that keep one setting from exhausting a broker. The operator's Queue
/// schema takes its ranges from these.
pub const MAX_PARTITIONS: u32 = 1024;
pub const MAX_MESSAGE_BYTES_LIMIT: u64 = 64 * 1024 * 1024;
pub const MAX_BATCH_LIMIT: u32 = 10_000;
pub const MAX_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(12 * 3600);
pub const MAX_DELAY: Duration = Duration::from_secs(15 * 24 * 3600);

impl QueueSettings {
    /// Default settings for a queue of this name.
    pub fn named(name: &str) -> Self {
        QueueSettings {
            name: name.to_string(),
            ..Default::default()
        }
    }

    /// Settings of this queue's dead-letter queue: the same storage and limits, no
    /// further dead-lettering, no delays.
    pub fn dead_letter_queue(&self) -> Self {
        QueueSettings {
            name: format!("{}{DLQ_SUFFIX}", self.name),
            dead_letter: false,
            max_deliveries: 0,
            default_delay: Duration::ZERO,
            retention_max_messages: 0,
            retention_max_bytes: 0,
            ..self.clone()
        }
    }

    /// Whether each partition is a Raft group: replicated, or one copy that can move.
    pub fn raft_groups(&self) -> bool {
        self.raft || self.replication > 1
    }

    /// The brokers that should hold copies of `partition`, sorted.
    pub fn copies_of(&self, partition: u32) -> Vec<u32> {
        Self::sorted(self.placement.get(partition as usize), || {
            replica_set(partition, self.replicas, self.replication)
        })
    }

    /// The members of `partition`'s group as the operator last saw them, sorted.
    pub fn members_of(&self, partition: u32) -> Vec<u32> {
        match self.members.get(partition as usize) {
            Some(m) => Self::sorted(Some(m), Vec::new),
            None => self.copies_of(partition),
        }
    }

    /// The partitions broker `me` holds a copy of: those placed on it and those
    /// whose group it is still a member of.
    pub fn hosted_by(&self, me: u32) -> Vec<u32> {
        (0..self.partitions)
            .filter(|&p| self.copies_of(p).contains(&me) || self.members_of(p).contains(&me))
            .collect()
    }

    fn sorted(list: Option<&Vec<u32>>, otherwise: impl FnOnce() -> Vec<u32>) -> Vec<u32> {
        let mut v = list.cloned().unwrap_or_else(otherwise);
        v.sort_unstable();
        v
    }

    /// Checks everything a schema cannot: ranges and relations between fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_naming(|field| field)
    }

    /// [`validate`](Self::validate), naming the fields (the error's `field`, and the
    /// other fields its reason mentions) as `name_of` maps their `broker.toml` names:
    /// the operator reports them by their place in the Queue spec.
    pub fn validate_naming(
        &self,
        name_of: fn(&'static str) -> &'static str,
    ) -> Result<(), ConfigError> {
        validate_queue_name(&self.name)?;
        let bad = |field: &'static str, reason: String| {
            Err(ConfigError::Invalid {
                queue: self.name.clone(),
                field: name_of(field),
                reason,
            })
        };
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return bad(
                "partitions",
                format!(
                    "must be between 1 and {MAX_PARTITIONS}, got {}",
                    self.partitions
                ),
            );
        }
        if self.replicas == 0 {
            return bad("replicas", "must be at least 1, got 0".into());
        }
        if !REPLICATION_CHOICES.contains(&self.replication) {
            return bad(
                "replication",
                format!(
                    "must be 1, 3 or 5, got {}: an even number of copies survives no more failures than one fewer",
                    self.replication
                ),
            );
        }
        if self.replication > self.replicas {
            return bad(
                "replication",
                format!(
                    "{} copies need as many brokers, but {} is {}",
                    self.replication,
                    name_of("replicas"),
                    self.replicas
                ),
            );
        }
        // Each broker must hold a copy of some partition (copies of partition p sit on
        // brokers p .. p + replication - 1).
        if self.partitions + self.replication - 1 < self.replicas {
            let needed = self.replicas + 1 - self.replication;
            return bad(
                "partitions",
                match self.replication {
                    1 => format!(
                        "must be at least {} ({}), got {}: a broker without a partition would sit idle",
                        name_of("replicas"),
                        self.replicas,
                        self.partitions
                    ),
                    r => format!(
                        "must be at least {needed} with {} {} and {} {r}, got {}: a broker without a copy of a partition would sit idle",
                        name_of("replicas"),
                        self.replicas,
                        name_of("replication"),
                        self.partitions
                    ),
                },
            );
        }
        if self.raft_groups() && self.peers.len() != self.replicas as usize {
            return bad(
                "peers",
                format!(
                    "Raft groups need the address of each of the {} brokers, got {}",
                    self.replicas,
                    self.peers.len()
                ),
            );
        }
        for (field, lists) in [("placement", &self.placement), ("members", &self.members)] {
            if lists.is_empty() {
                continue;
            }
            if !self.raft_groups() {
                return bad(
                    field,
                    format!(
                        "is for Raft groups only (replication above 1, or {})",
                        name_of("raft")
                    ),
                );
            }
            if lists.len() != self.partitions as usize {
                return bad(
                    field,
                    format!(
                        "needs the copies of each of the {} partitions, got {}",
                        self.partitions,
                        lists.len()
                    ),
                );
            }
            for (p, copies) in lists.iter().enumerate() {
                let distinct: std::collections::BTreeSet<_> = copies.iter().collect();
                if copies.len() != self.replication as usize
                    || distinct.len() != copies.len()
                    || copies.iter().any(|&b| b >= self.replicas)
                {
                    return bad(
                        field,
                        format!(
                            "partition {p} needs {} different brokers below {}, got {copies:?}",
                            self.replication, self.replicas
                        ),
                    );
                }
            }
        }
        if self.visibility_timeout.is_zero() || self.visibility_timeout > MAX_VISIBILITY_TIMEOUT {
            return bad(
                "visibility_timeout",
                format!(
                    "must be between 1ms and {}, got {}",
                    format_duration(MAX_VISIBILITY_TIMEOUT),
                    format_duration(self.visibility_timeout)
                ),
            );
        }
        if self.fsync == FsyncMode::Interval && self.fsync_interval.is_zero() {
            return bad(
                "fsync_interval",
                format!("must be above 0s when {} is interval", name_of("fsync")),
            );
        }
        if self.max_message_bytes == 0 || self.max_message_bytes > MAX_MESSAGE_BYTES_LIMIT {
            return bad(
                "max_message_bytes",
                format!(
                    "must be between 1 and {MAX_MESSAGE_BYTES_LIMIT}, got {}",
                    self.max_message_bytes
                ),
            );
        }
        if self.max_batch == 0 || self.max_batch > MAX_BATCH_LIMIT {
            return bad(
                "max_batch",
                format!(
                    "must be between 1 and {MAX_BATCH_LIMIT}, got {}",
                    self.max_batch
                ),
            );
        }
        if self.default_delay > MAX_DELAY {
            return bad(
                "default_delay",
                format!(
                    "must be at most {}, got {}",
                    format_duration(MAX_DELAY),
                    format_duration(self.default_delay)
                ),
            );
        }
        if self.redelivery_delay > self.redelivery_delay_max && !self.redelivery_delay_max.is_zero()
        {
            return bad(
                "redelivery_delay",
                format!(
                    "{} exceeds {} {} (0s: no upper bound)",
                    format_duration(self.redelivery_delay),
                    name_of("redelivery_delay_max"),
                    format_duration(self.redelivery_delay_max)
                ),
            );
        }
        if self.retention_max_bytes > 0 && self.retention_max_bytes < self.max_message_bytes {
            return bad(
                "retention_max_bytes",
                format!(
                    "{} is smaller than {} {}: a message of the largest size could never be kept",
                    self.retention_max_bytes,
                    name_of("max_message_bytes"),
                    self.max_message_bytes
                ),
            );
        }
        if let Some(bad_entry) = self
            .access
            .iter()
            .find(|e| parse_service_account(e).is_none())
        {
            return bad(
                "access",
                format!("{bad_entry:?} is not NAMESPACE/SERVICEACCOUNT"),
            );
        }
        Ok(())
    }
}

/// The broker's settings file: the queues it serves.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerFile {
    #[serde(default, rename = "queue")]
    pub queues: Vec<QueueSettings>,
}

impl BrokerFile {
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        let file: BrokerFile = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_string(),
            source,
        })?;
        for q in &file.queues {
            q.validate()?;
        }
        Ok(file)
    }

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_toml(&text, &shown)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("queue settings always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "orders",
            "a",
            "orders-v2",
            "o_1",
            "orders.dlq",
            &"x".repeat(59),
        ] {
            validate_queue_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            ".dlq",
            "-x",
            "Orders",
            "a b",
            "a/b",
            "ä",
            "a.b",
            &"x".repeat(60),
            "x.dlq.dlq",
        ] {
            assert!(validate_queue_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn toml_round_trip_and_defaults() {
        let file = BrokerFile::from_toml(
            r#"
            [[queue]]
            name = "orders"
            partitions = 8
            replicas = 3
            fsync = "interval"
            visibility_timeout = "1m30s"
            overflow = "drop_oldest"
            "#,
            "test",
        )
        .unwrap();
        let q = &file.queues[0];
        assert_eq!(q.partitions, 8);
        assert_eq!(q.visibility_timeout, Duration::from_secs(90));
        assert_eq!(q.overflow, Overflow::DropOldest);
        assert_eq!(q.max_deliveries, 5, "unset fields take defaults");
        let again = BrokerFile::from_toml(&file.to_toml(), "again").unwrap();
        assert_eq!(file, again);
    }

    #[test]
    fn invalid_settings_name_the_field() {
        let err = BrokerFile::from_toml(
            "[[queue]]\nname = \"q\"\nreplicas = 9\npartitions = 4\n",
            "t",
        )
        .unwrap_err();
        assert!(err.to_string().contains("replicas"), "{err}");
        let err = BrokerFile::from_toml(
            "[[queue]]\nname = \"q\"\nvisibility_timeout = \"soon\"\n",
            "t",
        )
        .unwrap_err();
        assert!(err.to_string().contains("soon"), "{err}");
        let err = BrokerFile::from_toml("[[queue]]\nname = \"q\"\ncolour = 1\n", "t").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = BrokerFile::from_toml(
            "[[queue]]\nname = \"q\"\naccess = [\"apps/billing\", \"just-a-name\"]\n",
            "t",
        )
        .unwrap_err();
        assert!(err.to_string().contains("just-a-name"), "{err}");
    }

    #[test]
    fn replication_is_odd_within_the_brokers_and_knows_its_peers() {
        let peers = |n: usize| (0..n).map(|i| format!("b{i}:7171")).collect::<Vec<_>>();
        let q = |replicas, replication, peers| QueueSettings {
            partitions: 8,
            replicas,
            replication,
            peers,
            ..QueueSettings::named("q")
        };
        q(3, 3, peers(3)).validate().unwrap();
        q(5, 5, peers(5)).validate().unwrap();
        q(2, 1, vec![]).validate().unwrap();
        for (replicas, replication, n, field, says) in [
            (4, 2, 4, "replication", "must be 1, 3 or 5, got 2"),
            (4, 4, 4, "replication", "must be 1, 3 or 5, got 4"),
            (
                2,
                3,
                2,
                "replication",
                "3 copies need as many brokers, but replicas is 2",
            ),
            (
                3,
                3,
                2,
                "peers",
                "need the address of each of the 3 brokers, got 2",
            ),
        ] {
            let err = q(replicas, replication, peers(n)).validate().unwrap_err();
            let text = err.to_string();
            assert!(text.contains(&format!("{field}: ")), "{text}");
            assert!(text.contains(says), "{text}");
        }
        // Unreplicated settings serialize as before (the operator's settings hash).
        let text = BrokerFile {
            queues: vec![QueueSettings::named("q")],
        }
        .to_toml();
        assert!(
            !text.contains("replication") && !text.contains("peers"),
            "{text}"
        );
    }

    #[test]
    fn an_explicit_placement_is_checked_and_read_back() {
        let mut q = QueueSettings {
            partitions: 2,
            replicas: 4,
            replication: 3,
            peers: (0..4).map(|i| format!("b{i}:7000")).collect(),
            ..QueueSettings::named("q")
        };
        // Without one: the formula.
        assert_eq!(q.copies_of(1), vec![1, 2, 3]);
        assert_eq!(q.members_of(1), vec![1, 2, 3]);
        // Partition 1 moving from {1, 2, 3} to {0, 2, 3}: broker 1 keeps its copy
        // until the operator saw the move done, broker 0 hosts the new one.
        q.placement = vec![vec![0, 1, 2], vec![3, 2, 0]];
        q.members = vec![vec![0, 1, 2], vec![1, 2, 3]];
        q.validate().unwrap();
        assert_eq!(q.copies_of(1), vec![0, 2, 3]);
        assert_eq!(q.members_of(1), vec![1, 2, 3]);
        assert_eq!(q.hosted_by(1), vec![0, 1]);
        assert_eq!(q.hosted_by(3), vec![1]);
        let file = BrokerFile {
            queues: vec![q.clone()],
        };
        assert_eq!(BrokerFile::from_toml(&file.to_toml(), "t").unwrap(), file);
        for (bad, says) in [
            (
                vec![vec![0, 1, 2]],
                "placement: needs the copies of each of the 2 partitions, got 1",
            ),
            (
                vec![vec![0, 1, 2], vec![0, 0, 1]],
                "placement: partition 1 needs 3 different brokers below 4",
            ),
            (
                vec![vec![0, 1, 2], vec![1, 2, 4]],
                "partition 1 needs 3 different brokers below 4, got [1, 2, 4]",
            ),
        ] {
            let err = QueueSettings {
                placement: bad,
                ..q.clone()
            }
            .validate()
            .unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
        }
        let single = QueueSettings {
            replicas: 2,
            placement: vec![vec![0], vec![1]],
            ..QueueSettings::named("q")
        };
        assert!(
            single
                .validate()
                .unwrap_err()
                .to_string()
                .contains("Raft groups only")
        );
        // One copy as a Raft group: placed and read back like replicated copies.
        let raft = QueueSettings {
            raft: true,
            peers: vec!["a:1".into(), "b:1".into()],
            partitions: 2,
            placement: vec![vec![1], vec![1]],
            ..single
        };
        raft.validate().unwrap();
        assert_eq!((raft.hosted_by(0), raft.hosted_by(1)), (vec![], vec![0, 1]));
        let back = BrokerFile::from_toml(
            &BrokerFile {
                queues: vec![raft.clone()],
            }
            .to_toml(),
            "t",
        )
        .unwrap();
        assert_eq!(back.queues[0], raft);
    }

    #[test]
    fn validation_names_fields_the_callers_way() {
        fn spec_path(field: &'static str) -> &'static str {
            match field {
                "redelivery_delay" => "delivery.redeliveryDelay",
                "redelivery_delay_max" => "delivery.redeliveryDelayMax",
                "retention_max_bytes" => "retention.maxBytes",
                "max_message_bytes" => "maxMessageBytes",
                other => other,
            }
        }
        let q = QueueSettings {
            redelivery_delay: Duration::from_secs(3600),
            redelivery_delay_max: Duration::from_secs(60),
            ..QueueSettings::named("q")
        };
        let err = q.validate_naming(spec_path).unwrap_err().to_string();
        assert_eq!(
            err,
            "queue q: delivery.redeliveryDelay: 1h exceeds delivery.redeliveryDelayMax 1m (0s: no upper bound)"
        );
        assert!(
            q.validate()
                .unwrap_err()
                .to_string()
                .contains("redelivery_delay_max")
        );
        let unbounded = QueueSettings {
            redelivery_delay_max: Duration::ZERO,
            ..q
        };
        unbounded.validate().unwrap();

        // A retention limit below the largest message: refused, by both names.
        let small = QueueSettings {
            retention_max_bytes: 10,
            ..QueueSettings::named("q")
        };
        assert!(
            small
                .validate()
                .unwrap_err()
                .to_string()
                .contains("retention_max_bytes")
        );
        let err = small.validate_naming(spec_path).unwrap_err().to_string();
        assert!(
            err.contains("retention.maxBytes: 10 is smaller than maxMessageBytes"),
            "{err}"
        );
        assert!(
            small.dead_letter_queue().validate().is_ok(),
            "no limit on the DLQ"
        );

        // The limits the operator's schema takes over.
        for (q, field) in [
            (
                QueueSettings {
                    partitions: MAX_PARTITIONS + 1,
                    ..QueueSettings::named("q")
                },
                "partitions",
            ),
            (
                QueueSettings {
                    max_batch: MAX_BATCH_LIMIT + 1,
                    ..QueueSettings::named("q")
                },
                "max_batch",
            ),
            (
                QueueSettings {
                    visibility_timeout: MAX_VISIBILITY_TIMEOUT + Duration::from_millis(1),
                    ..QueueSettings::named("q")
                },
                "visibility_timeout",
            ),
        ] {
            let err = q.validate().unwrap_err().to_string();
            assert!(err.starts_with(&format!("queue q: {field}: ")), "{err}");
        }
    }

    #[test]
    fn access_entries_and_audience() {
        let file = BrokerFile::from_toml(
            "[[queue]]\nname = \"q\"\naccess = [\"apps/billing\"]\n",
            "t",
        )
        .unwrap();
        assert_eq!(file.queues[0].access, ["apps/billing"]);
        assert_eq!(
            file.queues[0].dead_letter_queue().access,
            ["apps/billing"],
            "a dead-letter queue is opened by the same accounts"
        );
        assert_eq!(
            parse_service_account("apps/billing"),
            Some(("apps", "billing"))
        );
        for bad in ["apps", "/b", "a/", "A/b", "a/b/c"] {
            assert_eq!(parse_service_account(bad), None, "{bad}");
        }
        assert_eq!(token_audience("apps", "orders"), "sluice.dev/apps/orders");
        assert_eq!(
            token_audience("apps", "orders.dlq"),
            token_audience("apps", "orders")
        );
    }
}
