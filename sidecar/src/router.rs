//! The brokers behind each queue, found by resolving the route's addresses (a
//! headless Service resolves to every broker pod) and asking each broker which
//! partitions it owns. Long-lived HTTP/2 channels, one per broker.

use sluice_proto::v1::{self, queues_client::QueuesClient};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::Notify;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use sluice_dataplane::partitioning::LEADER_METADATA;
use sluice_dataplane::server::tls::{TlsError, TlsFiles};
use sluice_dataplane::server::{CONNECTION_WINDOW, MAX_REQUEST_BYTES, STREAM_WINDOW};
use tonic::{Code, Request, Status};

use crate::batcher::{BatchCall, Batcher};
use crate::credentials::Credentials;
use crate::metrics::{BrokersUp, SidecarMetrics};

/// A client of one broker, presenting the route's credentials on every call.
pub type BrokerClient = QueuesClient<InterceptedService<Channel, Credentials>>;

/// How often brokers are re-resolved and re-described.
pub const REFRESH: Duration = Duration::from_secs(2);
/// How often a route with a broker down looks again.
pub const RETRY: Duration = Duration::from_millis(200);
/// How long an enqueue to a replicated partition follows its moving leader.
pub const LEADER_WAIT: Duration = Duration::from_secs(5);
/// No unary call to a broker waits longer than this (a long poll adds its wait).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A request to a broker that gives up after [`CALL_TIMEOUT`] and `extra` (a long
/// poll's own wait), carrying the current span's trace context (while spans are
/// exported) so the broker's span is its child.
pub fn timed<T>(msg: T, extra: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(CALL_TIMEOUT + extra);
    sluice_dataplane::trace::inject_current(r.metadata_mut());
    r
}

pub struct BrokerConn {
    pub addr: SocketAddr,
    pub client: BrokerClient,
    healthy: AtomicBool,
    /// Set when the broker says another one leads a partition now: the route asks
    /// every broker again at once.
    relayout: Arc<AtomicBool>,
}

impl BrokerConn {
    fn new(
        addr: SocketAddr,
        credentials: Credentials,
        tls: Option<&ClientTlsConfig>,
        relayout: Arc<AtomicBool>,
    ) -> Result<Arc<Self>, tonic::transport::Error> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .expect("a socket address is a valid URI");
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .initial_connection_window_size(CONNECTION_WINDOW)
            .initial_stream_window_size(STREAM_WINDOW)
            .connect_lazy();
        let max = MAX_REQUEST_BYTES;
        Ok(Arc::new(BrokerConn {
            addr,
            client: QueuesClient::with_interceptor(channel, credentials)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            healthy: AtomicBool::new(false),
            relayout,
        }))
    }

    pub fn client(&self) -> BrokerClient {
        self.client.clone()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Takes a failed call's status: marks the broker down after a transport failure
    /// (the next refresh looks again) and returns what the app should see. A broker
    /// that did not answer in time is UNAVAILABLE to the app: tonic reports its own
    /// timeout as CANCELLED, which would tell the app that it cancelled the call.
    pub fn failed(&self, status: Status) -> Status {
        let status = if is_local_timeout(&status) {
            Status::unavailable(format!(
                "broker {} did not answer in time: {}",
                self.addr,
                status.message()
            ))
        } else {
            status
        };
        if status.metadata().contains_key(LEADER_METADATA) {
            // A replicated partition moved to another broker: this one is fine.
            self.relayout.store(true, Ordering::Relaxed);
        } else if is_transport_failure(&status) {
            self.healthy.store(false, Ordering::Relaxed);
        }
        status
    }
}

/// tonic's client-side timeout (`Request::set_timeout`) ends a call with CANCELLED.
fn is_local_timeout(status: &Status) -> bool {
    status.code() == Code::Cancelled && status.message() == "Timeout expired"
}

/// A failure of the broker or the way to it, rather than an answer about the request.
pub fn is_transport_failure(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown
    ) || is_local_timeout(status)
}

/// A queue's limits on what one call may carry, as its brokers describe them.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_message_bytes: u64,
    pub max_batch: u32,
}

#[derive(Default)]
struct Layout {
    brokers: Vec<Arc<BrokerConn>>,
    partitions: u32,
    owner: HashMap<u32, Arc<BrokerConn>>,
    settings: Option<v1::DescribeResponse>,
    /// The brokers answered, but refused this sidecar (UNAUTHENTICATED or
    /// PERMISSION_DENIED): what the app is told instead of "unreachable".
    refused: Option<Status>,
}

/// One queue's brokers and partition layout.
pub struct QueueRoute {
    pub queue: String,
    addrs: Vec<String>,
    credentials: Credentials,
    /// Mutual TLS settings per host name of `addrs` (a broker's certificate is
    /// checked against the name the route gives it); None for plaintext.
    tls: Option<HashMap<String, ClientTlsConfig>>,
    layout: RwLock<Layout>,
    relayout: Arc<AtomicBool>,
    next: AtomicUsize,
    batchers: Mutex<HashMap<u32, Arc<Batcher>>>,
    changed: Notify,
    metrics: Arc<SidecarMetrics>,
}

impl QueueRoute {
    pub fn new(
        queue: String,
        addrs: Vec<String>,
        credentials: Credentials,
        tls: Option<&TlsFiles>,
        server_name: Option<&str>,
        metrics: Arc<SidecarMetrics>,
    ) -> Result<Arc<Self>, TlsError> {
        let tls = match tls {
            None => None,
            Some(files) => {
                let mut by_host = HashMap::new();
                for a in &addrs {
                    let host = host_of(a);
                    let name = server_name.unwrap_or(host);
                    by_host.insert(host.to_string(), files.client(name)?);
                }
                Some(by_host)
            }
        };
        Ok(Arc::new(QueueRoute {
            metrics,
            queue,
            addrs,
            credentials,
            tls,
            layout: RwLock::new(Layout::default()),
            relayout: Arc::new(AtomicBool::new(false)),
            next: AtomicUsize::new(0),
            batchers: Mutex::new(HashMap::new()),
            changed: Notify::new(),
        }))
    }

    /// Resolves the addresses and asks every broker for its partitions.
    pub async fn refresh(&self) {
        self.credentials.reload();
        let mut addrs = Vec::new();
        for a in &self.addrs {
            match tokio::net::lookup_host(a).await {
                Ok(found) => addrs.extend(found.map(|sa| (sa, host_of(a)))),
                Err(e) => {
                    tracing::debug!(queue = %self.queue, addr = %a, error = %e, "cannot resolve broker address")
                }
            }
        }
        addrs.sort();
        addrs.dedup_by_key(|(sa, _)| *sa);
        let known: HashMap<SocketAddr, Arc<BrokerConn>> = self
            .layout
            .read()
            .unwrap()
            .brokers
            .iter()
            .map(|b| (b.addr, b.clone()))
            .collect();
        let brokers: Vec<Arc<BrokerConn>> = addrs
            .iter()
            .filter_map(|(a, host)| match known.get(a) {
                Some(b) => Some(b.clone()),
                None => {
                    let tls = self.tls.as_ref().and_then(|t| t.get(*host));
                    BrokerConn::new(*a, self.credentials.clone(), tls, self.relayout.clone())
                        .map_err(|e| {
                            tracing::error!(queue = %self.queue, broker = %a, error = %e, "cannot set up the connection")
                        })
                        .ok()
                }
            })
            .collect();
        let described = futures::future::join_all(brokers.iter().map(|b| {
            let mut c = b.client();
            let queue = self.queue.clone();
            async move {
                let mut req = tonic::Request::new(v1::DescribeRequest { queue });
                req.set_timeout(Duration::from_secs(2));
                c.describe(req).await.map(|r| r.into_inner())
            }
        }))
        .await;
        let mut layout = Layout {
            brokers: brokers.clone(),
            ..Default::default()
        };
        for (b, d) in brokers.iter().zip(described) {
            match d {
                Ok(d) => {
                    b.healthy.store(true, Ordering::Relaxed);
                    layout.partitions = d.partitions;
                    for p in &d.owned_partitions {
                        layout.owner.insert(*p, b.clone());
                    }
                    layout.settings = Some(d);
                }
                Err(e) if matches!(e.code(), Code::Unauthenticated | Code::PermissionDenied) => {
                    if layout.refused.is_none() {
                        tracing::warn!(queue = %self.queue, broker = %b.addr, error = %e.message(), "broker refused this sidecar");
                    }
                    b.healthy.store(false, Ordering::Relaxed);
                    layout.refused = Some(Status::new(e.code(), e.message().to_string()));
                }
                Err(e) => {
                    if b.is_healthy() {
                        tracing::warn!(queue = %self.queue, broker = %b.addr, error = %e, "broker unreachable");
                    }
                    b.healthy.store(false, Ordering::Relaxed);
                }
            }
        }
        if layout.settings.is_none() {
            // Keep the last known layout's size so keyed routing stays stable.
            layout.partitions = self.layout.read().unwrap().partitions;
        }
        *self.layout.write().unwrap() = layout;
        self.changed.notify_waiters();
    }

    /// Keeps the layout fresh for as long as the route lives.
    pub fn spawn_refresher(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last = tokio::time::Instant::now();
            while let Some(route) = weak.upgrade() {
                // While a broker is down, look again soon: a restarted broker should
                // take traffic within a fraction of a second, not a whole period.
                let degraded = route
                    .layout
                    .read()
                    .unwrap()
                    .brokers
                    .iter()
                    .any(|b| !b.is_healthy());
                let moved = route.relayout.swap(false, Ordering::Relaxed);
                if degraded || moved || last.elapsed() >= REFRESH {
                    route.refresh().await;
                    last = tokio::time::Instant::now();
                }
                drop(route);
                tokio::time::sleep(RETRY).await;
            }
        });
    }

    /// Whether some broker answers.
    pub fn is_ready(&self) -> bool {
        self.layout
            .read()
            .unwrap()
            .brokers
            .iter()
            .any(|b| b.is_healthy())
    }

    /// The queue's settings as its brokers describe them.
    pub fn settings(&self) -> Result<v1::DescribeResponse, Status> {
        self.layout
            .read()
            .unwrap()
            .settings
            .clone()
            .ok_or_else(|| self.unavailable())
    }

    /// The limits every enqueue is checked against, read in place: `settings()`
    /// clones the whole description, too much for each message.
    pub fn limits(&self) -> Result<Limits, Status> {
        let layout = self.layout.read().unwrap();
        let limits = layout.settings.as_ref().map(|s| Limits {
            max_message_bytes: s.max_message_bytes,
            max_batch: s.max_batch,
        });
        drop(layout);
        limits.ok_or_else(|| self.unavailable())
    }

    fn unavailable(&self) -> Status {
        if let Some(refused) = &self.layout.read().unwrap().refused {
            return refused.clone();
        }
        Status::unavailable(format!(
            "no broker of queue {} is reachable (tried {})",
            self.queue,
            self.addrs.join(", ")
        ))
    }

    pub fn partitions(&self) -> u32 {
        self.layout.read().unwrap().partitions
    }

    /// The healthy broker owning a partition.
    pub fn owner(&self, partition: u32) -> Result<Arc<BrokerConn>, Status> {
        let layout = self.layout.read().unwrap();
        match layout.owner.get(&partition) {
            Some(b) if b.is_healthy() => Ok(b.clone()),
            _ if layout.refused.is_some() => Err(layout.refused.clone().unwrap()),
            _ => Err(Status::unavailable(format!(
                "the broker owning partition {partition} of queue {} is unreachable",
                self.queue
            ))),
        }
    }

    /// A partition for a keyless message, round-robin over partitions with a
    /// healthy owner. A replicated queue may have none for a moment (its groups are
    /// still electing, say right after it was made, or a leader just died): then
    /// wait for one ([`Self::through_elections`]), so the app sees an election as
    /// latency rather than an error.
    pub async fn any_partition(&self) -> Result<u32, Status> {
        self.through_elections("a partition's leader", || async {
            match self.led_partition() {
                Err(e) if e.code() == Code::Unavailable => Attempt::Retry(e),
                found => Attempt::Done(found),
            }
        })
        .await
    }

    /// Runs `attempt` until it is done; one that asks to retry is tried again with a
    /// fresh layout for up to [`LEADER_WAIT`] when the queue's partitions are
    /// replicated (a new leader comes within seconds), and fails at once otherwise
    /// (an unreplicated partition's owner is its only home).
    async fn through_elections<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Attempt<T>>,
    {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            let failed = match attempt().await {
                Attempt::Done(result) => return result,
                Attempt::Retry(e) => e,
            };
            let elected = self
                .settings()
                .is_ok_and(|s| s.raft_groups || s.replication > 1);
            if !elected || tokio::time::Instant::now() >= deadline {
                return Err(failed);
            }
            tracing::debug!(queue = %self.queue, error = %failed.message(), "waiting for {what}");
            tokio::time::sleep(RETRY / 2).await;
            self.refresh().await;
        }
    }

    fn led_partition(&self) -> Result<u32, Status> {
        let layout = self.layout.read().unwrap();
        let mut candidates: Vec<u32> = layout
            .owner
            .iter()
            .filter(|(_, b)| b.is_healthy())
            .map(|(p, _)| *p)
            .collect();
        if candidates.is_empty() {
            drop(layout);
            return Err(self.unavailable());
        }
        candidates.sort_unstable();
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Ok(candidates[i % candidates.len()])
    }

    /// Healthy brokers, starting from a rotating one.
    pub fn healthy_brokers(&self) -> Vec<Arc<BrokerConn>> {
        let layout = self.layout.read().unwrap();
        let mut v: Vec<_> = layout
            .brokers
            .iter()
            .filter(|b| b.is_healthy())
            .cloned()
            .collect();
        if !v.is_empty() {
            let n = v.len();
            v.rotate_left(self.next.fetch_add(1, Ordering::Relaxed) % n);
        }
        v
    }

    /// Enqueues one message to `partition`, gathered with concurrent ones into
    /// `EnqueueBatch` calls ([`Batcher`]).
    pub async fn enqueue_gathered(
        self: &Arc<Self>,
        partition: u32,
        message: v1::NewMessage,
    ) -> Result<v1::EnqueueResponse, Status> {
        let batcher = self
            .batchers
            .lock()
            .unwrap()
            .entry(partition)
            .or_default()
            .clone();
        let max = self.limits().map_or(100, |l| l.max_batch as usize);
        let route = self.clone();
        let send = move |messages: Vec<v1::NewMessage>| -> BatchCall {
            route.metrics.batch_size.observe(messages.len() as f64);
            Box::pin(async move { route.enqueue_batch(&route.queue, partition, messages).await })
        };
        batcher.enqueue(message, max, send).await
    }

    /// Sends a batch to the owner of its partition. A replicated partition whose
    /// leader moved (the broker answers with `sluice-leader`) or went away gets
    /// another leader within seconds: the batch follows it
    /// ([`Self::through_elections`]), so the app sees the failover as latency. An
    /// unreplicated partition's owner is its only home: there the app hears at once
    /// that it is away.
    pub async fn enqueue_batch(
        &self,
        queue: &str,
        partition: u32,
        messages: Vec<v1::NewMessage>,
    ) -> Result<Vec<v1::EnqueueResponse>, Status> {
        self.through_elections("the partition's leader", || async {
            let broker = match self.owner(partition) {
                Ok(b) => b,
                Err(e) if e.code() == Code::Unavailable => return Attempt::Retry(e),
                Err(e) => return Attempt::Done(Err(e)),
            };
            let mut req = tonic::Request::new(v1::EnqueueBatchRequest {
                queue: queue.to_string(),
                messages: messages.clone(),
                partition: Some(partition),
            });
            req.set_timeout(CALL_TIMEOUT);
            match broker.client().enqueue_batch(req).await {
                Ok(r) => Attempt::Done(Ok(r.into_inner().results)),
                Err(e) => {
                    let moved = e.metadata().contains_key(LEADER_METADATA);
                    let e = broker.failed(e);
                    if moved || is_transport_failure(&e) {
                        Attempt::Retry(e)
                    } else {
                        Attempt::Done(Err(e))
                    }
                }
            }
        })
        .await
    }
}

/// One try of a call that may wait through a leader election.
enum Attempt<T> {
    /// Its outcome, to return as it is.
    Done(Result<T, Status>),
    /// Failed in a way a new leader would fix.
    Retry(Status),
}

/// How the sidecar proves itself to brokers.
#[derive(Debug, Clone, Default)]
pub struct RouteSecurity {
    /// Directory of per-queue ServiceAccount tokens.
    pub token_dir: Option<std::path::PathBuf>,
    /// Our certificate and key, and the CA of the brokers' certificates.
    pub tls: Option<TlsFiles>,
    /// The name the brokers' certificates must bear, where the route's host is not
    /// it (`sluice --kube` routes to local tunnels); else the route's host.
    pub server_name: Option<String>,
}

/// The host part of `host:port`.
fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// Every queue the sidecar may reach.
pub struct Router {
    routes: BTreeMap<String, Arc<QueueRoute>>,
    pub metrics: Arc<SidecarMetrics>,
}

impl Router {
    /// Plaintext routes that present no token.
    pub fn new(routes: BTreeMap<String, Vec<String>>) -> Arc<Self> {
        Self::secured(routes, &RouteSecurity::default()).expect("nothing to load")
    }

    /// Routes whose calls carry the token in `<token_dir>/<queue>` (where there is
    /// one), over mutual TLS when `tls` is given.
    pub fn secured(
        routes: BTreeMap<String, Vec<String>>,
        security: &RouteSecurity,
    ) -> Result<Arc<Self>, TlsError> {
        let metrics = Arc::new(SidecarMetrics::default());
        let mut built = BTreeMap::new();
        for (q, addrs) in routes {
            let credentials = match &security.token_dir {
                Some(dir) if dir.join(&q).exists() => Credentials::from_file(dir.join(&q)),
                _ => Credentials::none(),
            };
            let route = QueueRoute::new(
                q.clone(),
                addrs,
                credentials,
                security.tls.as_ref(),
                security.server_name.as_deref(),
                metrics.clone(),
            )?;
            built.insert(q, route);
        }
        Ok(Arc::new(Router {
            routes: built,
            metrics,
        }))
    }

    /// Describes every broker once, then keeps refreshing in the background.
    pub async fn start(&self) {
        futures::future::join_all(self.routes.values().map(|r| r.refresh())).await;
        for r in self.routes.values() {
            r.spawn_refresher();
        }
    }

    /// The route of a queue; a dead-letter queue goes where its queue goes.
    pub fn route(&self, queue: &str) -> Result<Arc<QueueRoute>, Status> {
        sluice_config::validate_queue_name(queue)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let base = queue
            .strip_suffix(sluice_config::DLQ_SUFFIX)
            .unwrap_or(queue);
        self.routes.get(base).cloned().ok_or_else(|| {
            Status::not_found(format!(
                "this sidecar has no route to queue {base:?}; add it to the pod's sluice.dev/queues annotation (routes: {})",
                self.routes.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    pub fn is_ready(&self) -> bool {
        !self.routes.is_empty() && self.routes.values().all(|r| r.is_ready())
    }
}

impl BrokersUp for Router {
    fn brokers_up(&self) -> Vec<(String, usize)> {
        self.routes
            .iter()
            .map(|(q, r)| (q.clone(), r.healthy_brokers().len()))
            .collect()
    }
}
