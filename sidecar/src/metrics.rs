//! The sidecar's metrics: how many brokers of each queue answer, and how well
//! single enqueues coalesce into batches. Below the router: the router records into
//! [`SidecarMetrics`] and answers [`BrokersUp`] at scrape time.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::{Arc, Weak};

#[derive(Debug)]
pub struct SidecarMetrics {
    /// Messages per coalesced EnqueueBatch sent to a broker.
    pub batch_size: Histogram,
}

impl Default for SidecarMetrics {
    fn default() -> Self {
        SidecarMetrics {
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
        }
    }
}

/// How many brokers of each queue answer, read at scrape time.
pub trait BrokersUp: Send + Sync + 'static {
    /// (queue, brokers answering) for every route.
    fn brokers_up(&self) -> Vec<(String, usize)>;
}

/// The sidecar's registry: `metrics`, and `up` for as long as it lives.
pub fn registry<U: BrokersUp>(metrics: &SidecarMetrics, up: &Arc<U>) -> Registry {
    let mut r = Registry::with_prefix("sluice_sidecar");
    r.register(
        "enqueue_batch_size",
        "Messages per coalesced batch sent to a broker",
        metrics.batch_size.clone(),
    );
    let up: Weak<dyn BrokersUp> = Arc::downgrade(up) as Weak<dyn BrokersUp>;
    r.register_collector(Box::new(BrokersUpCollector(up)));
    r
}

struct BrokersUpCollector(Weak<dyn BrokersUp>);

impl std::fmt::Debug for BrokersUpCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BrokersUpCollector")
    }
}

impl Collector for BrokersUpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(router) = self.0.upgrade() else {
            return Ok(());
        };
        let mut m = encoder.encode_descriptor(
            "brokers_up",
            "Brokers of the queue that answer",
            None,
            MetricType::Gauge,
        )?;
        for (queue, up) in router.brokers_up() {
            let labels = [("queue", queue.as_str())];
            ConstGauge::new(up as i64).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
