//! The broker's Prometheus metrics (served by `sluice_dataplane::server::http`).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use crate::broker::Broker;
use crate::log::LogObserver;

/// The broker's own metrics; queue gauges and counters are read at scrape time.
#[derive(Debug)]
pub struct Metrics {
    fsync_seconds: Histogram,
    log_damage: Counter,
    broker: OnceLock<Weak<Broker>>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics {
            fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            log_damage: Counter::default(),
            broker: OnceLock::new(),
        })
    }

    pub fn attach(&self, broker: &Arc<Broker>) {
        let _ = self.broker.set(Arc::downgrade(broker));
    }

    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("sluice");
        r.register(
            "fsync_seconds",
            "Time one group-commit fsync took",
            self.fsync_seconds.clone(),
        );
        r.register(
            "log_damage",
            "Damaged or torn log records found and skipped",
            self.log_damage.clone(),
        );
        r.register_collector(Box::new(QueueCollector(self.clone())));
        r
    }
}

impl LogObserver for Metrics {
    fn fsync(&self, took: Duration) {
        self.fsync_seconds.observe(took.as_secs_f64());
    }
    fn damage(&self, segment: u64, offset: u64, why: &str) {
        tracing::warn!(segment, offset, why, "log damage");
        self.log_damage.inc();
    }
}

#[derive(Debug)]
struct QueueCollector(Arc<Metrics>);

impl Collector for QueueCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(broker) = self.0.broker.get().and_then(Weak::upgrade) else {
            return Ok(());
        };
        if let Some((free, reserve)) = broker.disk() {
            for (name, help, bytes) in [
                ("disk_free_bytes", "Free bytes of the data volume", free),
                (
                    "disk_reserve_bytes",
                    "Free bytes kept for settling records: below them, enqueues are refused",
                    reserve,
                ),
            ] {
                let m = encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    prometheus_client::metrics::MetricType::Gauge,
                )?;
                ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX)).encode(m)?;
            }
        }
        let queues = broker.queues();
        let rows: Vec<_> = queues
            .iter()
            .flat_map(|q| {
                q.snapshots()
                    .into_iter()
                    .map(move |(p, s)| (q.name().to_string(), p.to_string(), s))
            })
            .collect();
        type Pick = fn(&crate::partition::Snapshot) -> u64;
        let gauges: [(&str, &str, Pick); 4] = [
            ("queue_ready", "Messages ready for delivery", |s| s.ready),
            (
                "queue_in_flight",
                "Messages leased and not yet settled",
                |s| s.in_flight,
            ),
            ("queue_delayed", "Messages waiting for their delay", |s| {
                s.delayed
            }),
            ("queue_bytes", "Bytes of unsettled message bodies", |s| {
                s.bytes
            }),
        ];
        for (name, help, pick) in gauges {
            let mut m = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (q, p, s) in &rows {
                let labels = [("queue", q.as_str()), ("partition", p.as_str())];
                ConstGauge::new(pick(s) as i64).encode(m.encode_family(&labels)?)?;
            }
        }
        // The backlog's age: what a consumer that falls behind shows first.
        let now = crate::queue::now_ms();
        {
            let mut m = encoder.encode_descriptor(
                "queue_oldest_ready_age_seconds",
                "Age of the oldest message ready for delivery (0 when none)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (q, p, s) in &rows {
                let labels = [("queue", q.as_str()), ("partition", p.as_str())];
                let age = s.oldest_ready_ms.map_or(0, |t| now.saturating_sub(t)) as f64 / 1000.0;
                ConstGauge::new(age).encode(m.encode_family(&labels)?)?;
            }
        }
        let counters: [(&str, &str, Pick); 5] = [
            ("enqueued", "Messages stored", |s| s.counters.enqueued),
            (
                "acked",
                "Messages settled by an ack (or moved by a redrive)",
                |s| s.counters.acked,
            ),
            ("redelivered", "Leases that expired or were nacked", |s| {
                s.counters.redelivered
            }),
            (
                "dead_lettered",
                "Messages moved to the dead-letter queue",
                |s| s.counters.dead_lettered,
            ),
            (
                "dropped",
                "Messages dropped by retention or delivery limits",
                |s| s.counters.dropped,
            ),
        ];
        for (name, help, pick) in counters {
            let mut m = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (q, p, s) in &rows {
                let labels = [("queue", q.as_str()), ("partition", p.as_str())];
                ConstCounter::new(pick(s)).encode(m.encode_family(&labels)?)?;
            }
        }
        // Every copy says whether it leads (so a partition that no broker leads
        // shows as one without a majority: a Raft group of one too, for the moment a
        // move hands it over; a plain local log always leads); the leader says how
        // many copies hold everything committed.
        let copies: Vec<_> = queues.iter().flat_map(|q| q.reports()).collect();
        let mut m = encoder.encode_descriptor(
            "partition_leading",
            "1 where this broker's copy of a partition leads it (with a recent majority; a single local copy always does)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for r in &copies {
            let p = r.partition.to_string();
            let labels = [("queue", r.queue.as_str()), ("partition", p.as_str())];
            ConstGauge::new(i64::from(r.leader)).encode(m.encode_family(&labels)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "partition_copies_in_sync",
            "Copies of a partition (the leader's among them) holding every entry it applied; reported by the leader",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for r in &copies {
            if let Some(n) = r.in_sync {
                let p = r.partition.to_string();
                let labels = [("queue", r.queue.as_str()), ("partition", p.as_str())];
                ConstGauge::new(i64::from(n)).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
