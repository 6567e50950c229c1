//! The queues one broker process serves.

use sluice_config::{DLQ_SUFFIX, QueueSettings, validate_queue_name};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::auth::Authenticator;
use crate::error::BrokerError;
use crate::log::LogObserver;
use crate::partition::CacheBudget;
use crate::queue::{Queue, StorageOptions};

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
        }
    }
}

pub struct Broker {
    options: BrokerOptions,
    queues: RwLock<HashMap<String, Arc<Queue>>>,
    budget: Arc<CacheBudget>,
    observer: Arc<dyn LogObserver>,
}

impl Broker {
    /// Opens every configured queue (and, with auto-create, every queue found on
    /// disk), recovering them from their logs.
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
        let broker = Arc::new(Broker {
            budget: CacheBudget::new(options.cache_bytes),
            queues: RwLock::new(HashMap::new()),
            observer,
            options,
        });
        for q in broker.options.queues.clone() {
            q.validate()?;
            if !q.access.is_empty() && broker.options.authenticator.is_none() {
                return Err(BrokerError::FailedPrecondition(format!(
                    "queue {} admits only listed ServiceAccounts, but no Kubernetes API is configured to check tokens (in a pod: the broker's ServiceAccount token; elsewhere: KUBECONFIG)",
                    q.name
                )));
            }
            broker.add(q)?;
        }
        if let Some(template) = broker.options.auto_create.clone() {
            let entries = std::fs::read_dir(&broker.options.data_dir)
                .map_err(|e| BrokerError::Unavailable(format!("listing data directory: {e}")))?;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.ends_with(DLQ_SUFFIX)
                    && validate_queue_name(&name).is_ok()
                    && broker.get(&name).is_none()
                {
                    broker.add(QueueSettings {
                        name,
                        ..template.clone()
                    })?;
                }
            }
        }
        Ok(broker)
    }

    fn add(&self, settings: QueueSettings) -> Result<Arc<Queue>, BrokerError> {
        let queue = Queue::open(
            &self.options.data_dir,
            settings,
            self.options.ordinal,
            &self.options.storage,
            self.budget.clone(),
            self.observer.clone(),
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

    /// The queue of this name, created with the template when auto-create is on.
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

    pub fn queue(&self, name: &str) -> Result<Arc<Queue>, BrokerError> {
        validate_queue_name(name)?;
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
        tracing::info!(queue = base, "creating queue on first use");
        self.add(settings)?;
        self.get(name).ok_or_else(|| {
            BrokerError::NotFound(format!("queue {name:?} has no dead-letter queue"))
        })
    }

    pub fn queues(&self) -> Vec<Arc<Queue>> {
        let mut v: Vec<_> = self.queues.read().unwrap().values().cloned().collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }

    pub fn ordinal(&self) -> u32 {
        self.options.ordinal
    }

    /// Syncs and closes every log.
    pub async fn close(&self) {
        for q in self.queues() {
            q.close().await;
        }
    }
}
