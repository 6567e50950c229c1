//! The sidecar's metrics: how many brokers of each queue answer, and how well
//! single enqueues coalesce into batches.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::{Arc, Weak};

use crate::router::Router;

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

pub fn registry(router: &Arc<Router>) -> Registry {
    let mut r = Registry::with_prefix("sluice_sidecar");
    r.register(
        "enqueue_batch_size",
        "Messages per coalesced batch sent to a broker",
        router.metrics.batch_size.clone(),
    );
    r.register_collector(Box::new(BrokersUp(Arc::downgrade(router))));
    r
}

#[derive(Debug)]
struct BrokersUp(Weak<Router>);

impl Collector for BrokersUp {
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
