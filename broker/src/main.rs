//! `sluice-broker`: serves the queues of its settings file.

use anyhow::Context;
use clap::Parser;
use sluice_broker::BrokerOptions;
use sluice_broker::auth::{Authenticator, tokenreview::KubeTokenReview};
use sluice_broker::replica::network::PeerTls;
use sluice_broker::server::run;
use sluice_config::BrokerFile;
use sluice_dataplane::server::{bind, init_tracing, shutdown_signal, tls::TlsFiles};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "sluice-broker",
    version,
    about = "Sluice broker: durable queues over gRPC"
)]
struct Args {
    /// Settings file (TOML, `[[queue]]` tables); the operator mounts it from a ConfigMap.
    #[arg(long, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data")]
    data_dir: PathBuf,
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:7171")]
    listen: SocketAddr,
    /// HTTP address of /metrics, /healthz and /readyz.
    #[arg(long, env = "SLUICE_METRICS_LISTEN", default_value = "127.0.0.1:9190")]
    metrics_listen: SocketAddr,
    /// This broker's ordinal among the queue's replicas; by default the trailing -N of
    /// POD_NAME or HOSTNAME (a StatefulSet pod's name), else 0.
    #[arg(long, env = "SLUICE_ORDINAL")]
    ordinal: Option<u32>,
    /// Create unknown queues on first use, with default settings.
    #[arg(long)]
    auto_create: bool,
    /// Bytes of message bodies kept in memory.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    cache_bytes: u64,
    /// Log segment size in bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    segment_bytes: u64,
    /// Free bytes of the data volume kept for acks: below them, Enqueue answers
    /// RESOURCE_EXHAUSTED while acks and deliveries go on.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    disk_reserve_bytes: u64,
    /// Calls that may wait for messages on one queue at once (long-poll Dequeues and
    /// Subscribe streams); more are answered RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 10_000)]
    max_waiters: usize,
    /// Serve gRPC over mutual TLS with this certificate (PEM); needs --tls-key and
    /// --tls-ca. The operator mounts them from the Queue's Secret.
    #[arg(long, env = "SLUICE_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "SLUICE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that signed the certificates clients must present.
    #[arg(long, env = "SLUICE_TLS_CA", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Namespace of the Queue this broker serves: part of the audience of the tokens
    /// that open a queue with an access list.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Log as JSON lines.
    #[arg(long, env = "SLUICE_LOG_JSON")]
    log_json: bool,
}

fn ordinal_from_env() -> u32 {
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find_map(|name| name.rsplit_once('-').and_then(|(_, n)| n.parse().ok()))
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = init_tracing(args.log_json, "sluice-broker");
    let file = match &args.config {
        Some(path) => BrokerFile::load(path)?,
        None => BrokerFile::default(),
    };
    if file.queues.is_empty() && !args.auto_create {
        anyhow::bail!(
            "no queues configured: pass --config with [[queue]] tables, or --auto-create"
        );
    }
    let mut options = BrokerOptions::new(&args.data_dir);
    options.ordinal = args.ordinal.unwrap_or_else(ordinal_from_env);
    options.queues = file.queues;
    options.auto_create = args.auto_create.then(sluice_config::QueueSettings::default);
    options.cache_bytes = args.cache_bytes;
    options.storage.segment_bytes = args.segment_bytes;
    options.storage.disk_reserve_bytes = args.disk_reserve_bytes;
    options.storage.max_waiters = args.max_waiters;
    if let (Some(cert), Some(key), Some(ca)) = (args.tls_cert, args.tls_key, args.tls_ca) {
        let files = TlsFiles { cert, key, ca };
        options.tls = Some(files.server().context("TLS settings")?);
        options.peer_tls = Some(PeerTls::load(files).context("TLS settings for peers")?);
    }
    if options.queues.iter().any(|q| !q.access.is_empty()) {
        // Tokens are checked with the API server (TokenReview): in a pod through
        // the broker's own ServiceAccount, elsewhere through KUBECONFIG.
        let client = kube::Client::try_default().await.context(
            "a queue has an access list: connecting to the Kubernetes API to review tokens",
        )?;
        options.authenticator = Some(std::sync::Arc::new(Authenticator::new(
            std::sync::Arc::new(KubeTokenReview::new(client)),
            &args.namespace,
        )));
    }
    let grpc = bind(args.listen).await?;
    let http = bind(args.metrics_listen).await?;
    run(options, grpc, Some(http), shutdown_signal())
        .await
        .context("broker failed")
}
