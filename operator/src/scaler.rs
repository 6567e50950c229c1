//! KEDA's external scaler (`externalscaler.ExternalScaler`), served by every operator
//! replica (it only reads), so that a ScaledObject with a trigger of type `external`
//! or `external-push` scales an app's consumers on its Queue's backlog or on the age
//! of its oldest ready message, down to zero and back.
//!
//! The figures are the ones `status.messages` shows ([`partitions::backlog`]), asked
//! of the brokers when KEDA asks, not read from the status: the status is refreshed
//! every 30 s, and a consumer scaled to zero must wake when the first message
//! arrives. `StreamIsActive` asks the brokers every [`POLL`] and pushes only changes.

use crate::crd::Queue;
use crate::reconcile::partitions::{self, Backlog, BrokerClient};
use crate::resources;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use sluice_proto::externalscaler::external_scaler_server::{ExternalScaler, ExternalScalerServer};
use sluice_proto::externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// How often a `StreamIsActive` stream asks the brokers: a message arriving at an
/// empty queue is pushed within about this long (plus one round trip).
pub const POLL: Duration = Duration::from_millis(500);
/// How often a stream lists the Queue's broker pods again (a rolled broker has a new
/// address); also how soon it notices the Queue was deleted.
const RELIST: Duration = Duration::from_secs(5);

/// Why a trigger cannot be served; each maps to the gRPC status KEDA logs.
#[derive(Debug, thiserror::Error)]
pub enum ScalerError {
    #[error("the trigger's metadata has no `queue` (the name of a Queue)")]
    NoQueue,
    #[error("`metric: {0}` is not one of backlog, ready, oldestAgeSeconds")]
    UnknownMetric(String),
    #[error("`{key}: {value}` is not a number of at least 0")]
    NotANumber { key: &'static str, value: String },
    #[error("Queue {namespace}/{name} does not exist")]
    NoSuchQueue { namespace: String, name: String },
    #[error("no broker of Queue {namespace}/{name} answered, so its backlog is unknown")]
    NoAnswer { namespace: String, name: String },
    #[error("reading Queue {namespace}/{name} from the API server: {source}")]
    Kube {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl From<ScalerError> for Status {
    fn from(e: ScalerError) -> Status {
        let msg = e.to_string();
        match e {
            ScalerError::NoQueue
            | ScalerError::UnknownMetric(_)
            | ScalerError::NotANumber { .. } => Status::invalid_argument(msg),
            ScalerError::NoSuchQueue { .. } => Status::not_found(msg),
            ScalerError::NoAnswer { .. } | ScalerError::Kube { .. } => Status::unavailable(msg),
        }
    }
}

/// What a trigger measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Ready and in-flight messages: the work consumers have or are doing (as
    /// KEDA's SQS and RabbitMQ scalers count). Delayed messages are not work yet.
    Backlog,
    /// Ready messages only.
    Ready,
    /// Seconds since the oldest ready message was enqueued (0 when none is ready).
    OldestAgeSeconds,
}

impl Metric {
    fn parse(s: &str) -> Result<Metric, ScalerError> {
        match s {
            "backlog" => Ok(Metric::Backlog),
            "ready" => Ok(Metric::Ready),
            "oldestAgeSeconds" => Ok(Metric::OldestAgeSeconds),
            other => Err(ScalerError::UnknownMetric(other.into())),
        }
    }

    /// The metric in metric names (lower case, dashes).
    fn slug(self) -> &'static str {
        match self {
            Metric::Backlog => "backlog",
            Metric::Ready => "ready",
            Metric::OldestAgeSeconds => "oldest-age-seconds",
        }
    }

    /// The target per replica when the trigger sets none: 5 messages (SQS's
    /// scaler's default queue length), or 30 seconds.
    fn default_target(self) -> f64 {
        match self {
            Metric::Backlog | Metric::Ready => 5.0,
            Metric::OldestAgeSeconds => 30.0,
        }
    }

    /// The metric's value in `b` at `now_ms` (ms since the Unix epoch).
    pub fn value(self, b: &Backlog, now_ms: u64) -> f64 {
        let q = &b.queue;
        match self {
            Metric::Backlog => (q.ready + q.in_flight) as f64,
            Metric::Ready => q.ready as f64,
            Metric::OldestAgeSeconds => q
                .oldest_ready_ms
                .map_or(0.0, |t| now_ms.saturating_sub(t) as f64 / 1000.0),
        }
    }
}

/// A ScaledObject trigger's metadata, read:
/// `queue` (required), `namespace` (default: the ScaledObject's), `metric`
/// (`backlog`, `ready` or `oldestAgeSeconds`; default `backlog`), `target` (per
/// replica) and `activationTarget` (active above it; default 0).
#[derive(Clone, Debug, PartialEq)]
pub struct Trigger {
    pub namespace: String,
    pub queue: String,
    pub metric: Metric,
    pub target: f64,
    pub activation: f64,
}

impl Trigger {
    pub fn parse(r: &ScaledObjectRef) -> Result<Trigger, ScalerError> {
        let meta = &r.scaler_metadata;
        let queue = meta
            .get("queue")
            .filter(|q| !q.is_empty())
            .ok_or(ScalerError::NoQueue)?
            .clone();
        let namespace = meta
            .get("namespace")
            .filter(|n| !n.is_empty())
            .unwrap_or(&r.namespace)
            .clone();
        let metric = meta
            .get("metric")
            .map_or(Ok(Metric::Backlog), |m| Metric::parse(m))?;
        let number = |key: &'static str, default: f64| -> Result<f64, ScalerError> {
            let Some(v) = meta.get(key) else {
                return Ok(default);
            };
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .ok_or_else(|| ScalerError::NotANumber {
                    key,
                    value: v.clone(),
                })
        };
        Ok(Trigger {
            target: number("target", metric.default_target())?,
            activation: number("activationTarget", 0.0)?,
            namespace,
            queue,
            metric,
        })
    }

    /// The name of the metric the HPA sees (KEDA puts its trigger index before it).
    pub fn metric_name(&self) -> String {
        format!(
            "sluice-{}-{}-{}",
            self.namespace,
            self.queue,
            self.metric.slug()
        )
    }

    /// Active (consumers wanted) when the value is above the activation target.
    pub fn active(&self, value: f64) -> bool {
        value > self.activation
    }
}

/// The scaler service: a kube client to find a Queue's brokers, and the client that
/// asks them for their partition reports.
#[derive(Clone)]
pub struct Scaler {
    client: kube::Client,
    brokers: BrokerClient,
}

impl Scaler {
    pub fn new(client: kube::Client) -> Scaler {
        Scaler {
            client,
            brokers: BrokerClient::default(),
        }
    }

    pub fn into_service(self) -> ExternalScalerServer<Scaler> {
        ExternalScalerServer::new(self)
    }

    /// The broker pods of the trigger's Queue; an error when the Queue is gone.
    async fn pods(&self, t: &Trigger) -> Result<Vec<Pod>, ScalerError> {
        let kube_err = |source| ScalerError::Kube {
            namespace: t.namespace.clone(),
            name: t.queue.clone(),
            source,
        };
        let queues: Api<Queue> = Api::namespaced(self.client.clone(), &t.namespace);
        if queues.get_opt(&t.queue).await.map_err(kube_err)?.is_none() {
            return Err(ScalerError::NoSuchQueue {
                namespace: t.namespace.clone(),
                name: t.queue.clone(),
            });
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &t.namespace);
        let lp = ListParams::default().labels(&resources::queue_selector(&t.queue));
        Ok(pods.list(&lp).await.map_err(kube_err)?.items)
    }

    /// The trigger's metric now, asked of `pods`.
    async fn value(&self, t: &Trigger, pods: &[Pod]) -> Result<f64, ScalerError> {
        let no_answer = || ScalerError::NoAnswer {
            namespace: t.namespace.clone(),
            name: t.queue.clone(),
        };
        let answers = self.brokers.ask(pods).await.ok_or_else(no_answer)?;
        let backlog = partitions::backlog(&t.queue, &answers).ok_or_else(no_answer)?;
        Ok(t.metric.value(&backlog, now_ms()))
    }

    async fn measure(&self, t: &Trigger) -> Result<f64, ScalerError> {
        let pods = self.pods(t).await?;
        self.value(t, &pods).await
    }

    /// Pushes the trigger's activity into `tx` whenever it changes (the first
    /// answer at once) until the caller goes away or the Queue is deleted.
    async fn push_activity(
        self,
        t: Trigger,
        mut pods: Vec<Pod>,
        tx: mpsc::Sender<Result<IsActiveResponse, Status>>,
    ) {
        let mut listed = Instant::now();
        let mut last = None;
        loop {
            if listed.elapsed() >= RELIST {
                match self.pods(&t).await {
                    Ok(p) => {
                        pods = p;
                        listed = Instant::now();
                    }
                    Err(e @ ScalerError::NoSuchQueue { .. }) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, "scaler: listing brokers"),
                }
            }
            match self.value(&t, &pods).await {
                Ok(v) => {
                    let active = t.active(v);
                    if last != Some(active) {
                        if tx
                            .send(Ok(IsActiveResponse { result: active }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        last = Some(active);
                    }
                }
                // Brokers rolling: no news until they answer again.
                Err(e) => tracing::debug!(error = %e, "scaler: asking brokers"),
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn spec_of(t: &Trigger) -> GetMetricSpecResponse {
    GetMetricSpecResponse {
        metric_specs: vec![MetricSpec {
            metric_name: t.metric_name(),
            target_size: t.target.ceil() as i64,
            target_size_float: t.target,
        }],
    }
}

#[tonic::async_trait]
impl ExternalScaler for Scaler {
    async fn is_active(
        &self,
        req: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let t = Trigger::parse(req.get_ref())?;
        let v = self.measure(&t).await?;
        Ok(Response::new(IsActiveResponse {
            result: t.active(v),
        }))
    }

    type StreamIsActiveStream = ReceiverStream<Result<IsActiveResponse, Status>>;

    async fn stream_is_active(
        &self,
        req: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let t = Trigger::parse(req.get_ref())?;
        let pods = self.pods(&t).await?;
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(self.clone().push_activity(t, pods, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_metric_spec(
        &self,
        req: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        Ok(Response::new(spec_of(&Trigger::parse(req.get_ref())?)))
    }

    async fn get_metrics(
        &self,
        req: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let req = req.into_inner();
        let t = Trigger::parse(&req.scaled_object_ref.unwrap_or_default())?;
        let v = self.measure(&t).await?;
        // Answered under the name asked for: KEDA strips its own prefix first.
        let metric_name = if req.metric_name.is_empty() {
            t.metric_name()
        } else {
            req.metric_name
        };
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name,
                metric_value: v.ceil() as i64,
                metric_value_float: v,
            }],
        }))
    }

    type StreamMetricSpecStream = ReceiverStream<Result<GetMetricSpecResponse, Status>>;

    /// The spec comes from the trigger alone, so it never changes: sent once, and
    /// the stream is held open until KEDA closes it.
    async fn stream_metric_spec(
        &self,
        req: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamMetricSpecStream>, Status> {
        let spec = spec_of(&Trigger::parse(req.get_ref())?);
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            if tx.send(Ok(spec)).await.is_ok() {
                tx.closed().await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_config::report::Depth;
    use std::collections::HashMap;

    fn trigger(meta: &[(&str, &str)]) -> Result<Trigger, ScalerError> {
        Trigger::parse(&ScaledObjectRef {
            name: "consumers".into(),
            namespace: "shop".into(),
            scaler_metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
        })
    }

    #[test]
    fn a_trigger_names_a_queue_and_defaults_the_rest() {
        let t = trigger(&[("queue", "orders")]).unwrap();
        assert_eq!(
            t,
            Trigger {
                namespace: "shop".into(),
                queue: "orders".into(),
                metric: Metric::Backlog,
                target: 5.0,
                activation: 0.0,
            }
        );
        assert_eq!(t.metric_name(), "sluice-shop-orders-backlog");
        let t = trigger(&[
            ("queue", "orders"),
            ("namespace", "billing"),
            ("metric", "oldestAgeSeconds"),
            ("activationTarget", "2.5"),
        ])
        .unwrap();
        assert_eq!((t.target, t.activation), (30.0, 2.5));
        assert_eq!(t.metric_name(), "sluice-billing-orders-oldest-age-seconds");
    }

    #[test]
    fn bad_metadata_is_an_invalid_argument_that_says_what_is_wrong() {
        for (meta, says) in [
            (vec![], "no `queue`"),
            (vec![("queue", "")], "no `queue`"),
            (vec![("queue", "q"), ("metric", "depth")], "`metric: depth`"),
            (vec![("queue", "q"), ("target", "-1")], "`target: -1`"),
            (vec![("queue", "q"), ("target", "ten")], "`target: ten`"),
            (
                vec![("queue", "q"), ("activationTarget", "NaN")],
                "`activationTarget: NaN`",
            ),
        ] {
            let status = Status::from(trigger(&meta).unwrap_err());
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{meta:?}");
            assert!(status.message().contains(says), "{}", status.message());
        }
    }

    #[test]
    fn each_metric_reads_its_figure_and_activity_is_above_the_activation_target() {
        let b = Backlog {
            queue: Depth {
                ready: 7,
                in_flight: 3,
                delayed: 100,
                oldest_ready_ms: Some(10_000),
            },
            dead_lettered: 50,
        };
        assert_eq!(Metric::Backlog.value(&b, 12_500), 10.0);
        assert_eq!(Metric::Ready.value(&b, 12_500), 7.0);
        assert_eq!(Metric::OldestAgeSeconds.value(&b, 12_500), 2.5);
        let empty = Backlog::default();
        assert_eq!(Metric::OldestAgeSeconds.value(&empty, 12_500), 0.0);
        let t = trigger(&[("queue", "q"), ("activationTarget", "10")]).unwrap();
        assert!(!t.active(10.0));
        assert!(t.active(10.5));
        let t = trigger(&[("queue", "q")]).unwrap();
        assert!(!t.active(0.0), "an empty queue scales to zero");
        assert!(t.active(1.0));
    }
}
