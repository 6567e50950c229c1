//! The queues one broker process serves.

use sluice_config::{DLQ_SUFFIX, QueueSettings, validate_queue_name};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use crate::auth::Authenticator;
use crate::error::BrokerError;
use crate::log::LogObserver;
use crate::partition::CacheBudget;
use crate::queue::{Queue, StorageOptions};
use crate::replica::service::Groups;

#[derive(Debug, Clone)]
pub struct BrokerOptions {
    pub data_dir: PathBuf,
    /// This broker's place among the queue's replicas.
    pub ordinal: u32,
    /// Queues configured up front.
    pub queues: Vec<QueueSettings>,
    /// When set, an unknown queue is created on first use with these settings
    /// (`sluice dev`); otherwise it is NOT_FOUND.
    pub auto_create: Option<QueueSettings>,
    /// Bytes of message bodies kept in memory across all queues.
    pub cache_bytes: u64,
    pub storage: StorageOptions,
    /// Checks the tokens of calls to queues with an access list; required when a
    /// configured queue has one.
    pub authenticator: Option<Arc<Authenticator>>,
    /// Serve gRPC over mutual TLS (clients must present a certificate of the CA).
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// How replicating brokers reach each other when they serve TLS.
    pub peer_tls: Option<crate::replica::network::PeerTls>,
}

impl BrokerOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        BrokerOptions {
            data_dir: data_dir.into(),
            ordinal: 0,
            queues: Vec::new(),
            auto_create: None,
            cache_bytes: 256 * 1024 * 1024,
            storage: StorageOptions::default(),
            authenticator: None,
            tls: None,
            peer_tls: None,
        }
    }
}

pub struct Broker {
    options: BrokerOptions,
    queues: RwLock<HashMap<String, Arc<Queue>>>,
    /// Queues found at open whose logs are not replayed yet, by their name and their
    /// dead-letter queue's name.
    pending: Mutex<HashMap<String, Arc<Pending>>>,
    /// Every queue found at open, smallest log first: the order the recovery worker
    /// takes them in.
    found: Vec<Arc<Pending>>,
    /// Replays that calls asked for, under way: the worker starts no other meanwhile.
    asked: AtomicUsize,
    /// Set by `close`: no replay starts after it.
    closing: AtomicBool,
    budget: Arc<CacheBudget>,
    observer: Arc<dyn LogObserver>,
    /// The Raft nodes of replicated partitions, for the replication service.
    pub groups: Arc<Groups>,
}

/// A queue of the data directory or the settings whose log is still to be replayed.
struct Pending {
    settings: QueueSettings,
    /// Taken by the recovery worker or the call that replays it.
    claimed: AtomicBool,
    /// None until the replay ends; then whether it worked.
    outcome: watch::Sender<Option<Result<(), String>>>,
}

/// How long a call to a queue still being recovered waits for it before it is told
/// to try again (UNAVAILABLE).
const RECOVERY_WAIT: Duration = Duration::from_secs(5);

impl Broker {
    /// Checks the configured queues and finds (with auto-create) the queues on disk;
    /// their logs are replayed by [`recover`](Self::recover), and each queue is served
    /// as soon as its own log is.
    pub fn open(
        options: BrokerOptions,
        observer: Arc<dyn LogObserver>,
    ) -> Result<Arc<Broker>, BrokerError> {
        std::fs::create_dir_all(&options.data_dir).map_err(|e| {
            BrokerError::Unavailable(format!(
                "creating data directory {}: {e}",
                options.data_dir.display()
            ))
        })?;
        let mut found: Vec<QueueSettings> = Vec::new();
        for q in &options.queues {
            q.validate()?;
            if q.raft_groups() && options.tls.is_some() && options.peer_tls.is_none() {
                return Err(BrokerError::FailedPrecondition(format!(
                    "queue {} has Raft groups and the broker serves TLS, but has no certificate to present to its peers",
                    q.name
                )));
            }
            if !q.access.is_empty() && options.authenticator.is_none() {
                return Err(BrokerError::FailedPrecondition(format!(
                    "queue {} admits only listed ServiceAccounts, but no Kubernetes API is configured to check tokens (in a pod: the broker's ServiceAccount token; elsewhere: KUBECONFIG)",
                    q.name
                )));
            }
            found.push(q.clone());
        }
        if let Some(template) = &options.auto_create {
            let entries = std::fs::read_dir(&options.data_dir)
                .map_err(|e| BrokerError::Unavailable(format!("listing data directory: {e}")))?;
            let mut names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| {
                    !name.ends_with(DLQ_SUFFIX)
                        && validate_queue_name(name).is_ok()
                        && !found.iter().any(|q| &q.name == name)
                })
                .collect();
            names.sort();
            found.extend(names.into_iter().map(|name| QueueSettings {
                name,
                ..template.clone()
            }));
        }
        // Smallest first: the most queues back soonest.
        found.sort_by_cached_key(|q| log_bytes(&options.data_dir.join(&q.name)));
        let found: Vec<Arc<Pending>> = found
            .into_iter()
            .map(|settings| {
                Arc::new(Pending {
                    settings,
                    claimed: AtomicBool::new(false),
                    outcome: watch::Sender::new(None),
                })
            })
            .collect();
        let mut pending = HashMap::new();
        for p in &found {
            if p.settings.dead_letter {
                pending.insert(p.settings.dead_letter_queue().name, p.clone());
            }
            pending.insert(p.settings.name.clone(), p.clone());
        }
        Ok(Arc::new(Broker {
            budget: CacheBudget::new(options.cache_bytes),
            queues: RwLock::new(HashMap::new()),
            pending: Mutex::new(pending),
            found,
            asked: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            observer,
            groups: Arc::new(Groups::new(options.peer_tls.clone())),
            options,
        }))
    }

    /// Replays the logs of the queues found at open, one queue at a time (each replays
    /// its partitions on every core), smallest first; a queue a call asks for is
    /// replayed at once instead of in its turn, and the next queue in line waits for
    /// it. Resolves when every queue is served, or with the first queue that cannot be
    /// recovered.
    pub async fn recover(self: &Arc<Self>) -> Result<(), BrokerError> {
        let broker = self.clone();
        tokio::task::spawn_blocking(move || {
            while let Some(p) = broker.claim_next() {
                broker.replay(&p)?;
            }
            Ok::<(), BrokerError>(())
        })
        .await
        .map_err(|e| BrokerError::Internal(format!("recovery worker: {e}")))??;
        // Replays that calls started may still run.
        for p in &self.found {
            if let Err(why) = Self::outcome(p).await {
                return Err(BrokerError::Unavailable(why));
            }
        }
        Ok(())
    }

    fn claim_next(&self) -> Option<Arc<Pending>> {
        // A call waits for the queue it asked for: give that replay the cores. (A
        // short sleep, not a condition variable: this happens only at start-up.)
        while self.asked.load(Ordering::Acquire) > 0 && !self.closing.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if self.closing.load(Ordering::Relaxed) {
            return None;
        }
        self.found
            .iter()
            .find(|p| !p.claimed.swap(true, Ordering::AcqRel))
            .cloned()
    }

    /// Replays one queue's log (blocking) and starts serving it.
    fn replay(&self, p: &Pending) -> Result<(), BrokerError> {
        let started = Instant::now();
        match self.add(p.settings.clone()) {
            Ok(queue) => {
                let mut pending = self.pending.lock().unwrap();
                pending.remove(queue.name());
                if let Some(dlq) = &queue.dlq {
                    pending.remove(dlq.name());
                }
                drop(pending);
                tracing::info!(
                    queue = queue.name(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "queue recovered; serving it"
                );
                p.outcome.send_replace(Some(Ok(())));
                Ok(())
            }
            Err(e) => {
                tracing::error!(queue = %p.settings.name, error = %e, "queue cannot be recovered");
                p.outcome.send_replace(Some(Err(format!(
                    "queue {} cannot be recovered: {e}",
                    p.settings.name
                ))));
                Err(e)
            }
        }
    }

    /// Waits for the end of a queue's replay.
    async fn outcome(p: &Pending) -> Result<(), String> {
        let mut rx = p.outcome.subscribe();
        let done = rx.wait_for(Option::is_some).await;
        match done.as_deref() {
            Ok(Some(outcome)) => outcome.clone(),
            _ => Err(format!("queue {} was never recovered", p.settings.name)),
        }
    }

    /// Lets a call wait (a while) for a queue that is still being recovered; replays
    /// it now if no worker has taken it yet.
    async fn await_recovery(
        self: &Arc<Self>,
        p: Arc<Pending>,
        name: &str,
    ) -> Result<(), BrokerError> {
        if !self.closing.load(Ordering::Relaxed) && !p.claimed.swap(true, Ordering::AcqRel) {
            self.asked.fetch_add(1, Ordering::AcqRel);
            let (broker, queue) = (self.clone(), p.clone());
            let replay = tokio::task::spawn_blocking(move || broker.replay(&queue));
            let (broker, queue) = (self.clone(), p.clone());
            // Failures reach `recover` through the outcome; so does a panic.
            tokio::spawn(async move {
                if let Err(e) = replay.await {
                    queue.outcome.send_replace(Some(Err(format!(
                        "replaying queue {}: {e}",
                        queue.settings.name
                    ))));
                }
                broker.asked.fetch_sub(1, Ordering::AcqRel);
            });
        }
        match tokio::time::timeout(RECOVERY_WAIT, Self::outcome(&p)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(BrokerError::Unavailable(why)),
            Err(_) => Err(BrokerError::Unavailable(format!(
                "queue {name:?} is still being recovered from its log; try again shortly"
            ))),
        }
    }

    fn add(&self, settings: QueueSettings) -> Result<Arc<Queue>, BrokerError> {
        let queue = Queue::open(
            &self.options.data_dir,
            settings,
            self.options.ordinal,
            &self.options.storage,
            self.budget.clone(),
            self.observer.clone(),
            &self.groups,
        )?;
        let mut map = self.queues.write().unwrap();
        if let Some(dlq) = &queue.dlq {
            map.insert(dlq.name().to_string(), dlq.clone());
        }
        map.insert(queue.name().to_string(), queue.clone());
        Ok(queue)
    }

    fn get(&self, name: &str) -> Option<Arc<Queue>> {
        self.queues.read().unwrap().get(name).cloned()
    }

    /// Lets a call with `token` use `queue`: always for a queue without an access
    /// list, otherwise when the token belongs to a listed ServiceAccount.
    pub async fn authorize(&self, queue: &Queue, token: Option<&str>) -> Result<(), BrokerError> {
        if queue.settings.access.is_empty() {
            return Ok(());
        }
        match &self.options.authenticator {
            Some(a) => a.authorize(queue, token).await,
            None => Err(BrokerError::Unavailable(
                "this broker cannot check tokens".into(),
            )),
        }
    }

    /// The queue of this name (once recovered), created with the template when
    /// auto-create is on.
    pub async fn queue(self: &Arc<Self>, name: &str) -> Result<Arc<Queue>, BrokerError> {
        validate_queue_name(name)?;
        // Pending before open: a replay that ends opens the queue, then unlists it.
        let pending = self.pending.lock().unwrap().get(name).cloned();
        if let Some(p) = pending {
            self.await_recovery(p, name).await?;
        }
        if let Some(q) = self.get(name) {
            return Ok(q);
        }
        let Some(template) = &self.options.auto_create else {
            return Err(BrokerError::NotFound(format!(
                "queue {name:?} does not exist on this broker"
            )));
        };
        // One creator at a time, so two first requests do not open the log twice.
        static CREATE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = CREATE.lock().unwrap();
        if let Some(q) = self.get(name) {
            return Ok(q);
        }
        let base = name.strip_suffix(DLQ_SUFFIX).unwrap_or(name);
        let settings = QueueSettings {
            name: base.to_string(),
            ..template.clone()
        };
        settings.validate()?;
        if settings.raft_groups() {
            return Err(BrokerError::FailedPrecondition(format!(
                "queue {name:?} is not configured here, and queues created on first use are not Raft groups"
            )));
        }
        tracing::info!(queue = base, "creating queue on first use");
        self.add(settings)?;
        self.get(name).ok_or_else(|| {
            BrokerError::NotFound(format!("queue {name:?} has no dead-letter queue"))
        })
    }

    /// The data volume's free bytes, and the reserve below which enqueues are
    /// refused ([`StorageOptions::disk_reserve_bytes`]). None if the volume cannot
    /// be read.
    pub fn disk(&self) -> Option<(u64, u64)> {
        let st = rustix::fs::statvfs(&self.options.data_dir).ok()?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        Some((free, self.options.storage.disk_reserve_bytes))
    }

    pub fn queues(&self) -> Vec<Arc<Queue>> {
        let mut v: Vec<_> = self.queues.read().unwrap().values().cloned().collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }

    pub fn ordinal(&self) -> u32 {
        self.options.ordinal
    }

    /// Syncs and closes every log (after the replays under way).
    pub async fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
        for p in &self.found {
            if p.claimed.load(Ordering::Acquire) {
                let _ = Self::outcome(p).await;
            }
        }
        for q in self.queues() {
            q.close().await;
        }
    }
}

/// Bytes of the segments of every partition under a queue's directory (0 when it
/// has none yet).
fn log_bytes(queue_dir: &std::path::Path) -> u64 {
    let Ok(partitions) = std::fs::read_dir(queue_dir) else {
        return 0;
    };
    partitions
        .flatten()
        .map(|p| crate::log::segment_bytes(&p.path()))
        .sum()
}
