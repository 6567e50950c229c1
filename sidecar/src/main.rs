//! `sluice-sidecar`: the app's localhost gRPC endpoint.

use anyhow::Context;
use clap::Parser;
use sluice_dataplane::server::{bind, init_tracing, shutdown_signal, tls::TlsFiles};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "sluice-sidecar",
    version,
    about = "Sluice sidecar: queues on localhost"
)]
struct Args {
    /// Where the app connects. Loopback by default: only the pod's own containers.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// HTTP address of /readyz, /healthz and /metrics.
    #[arg(long, env = "SLUICE_METRICS_LISTEN", default_value = "127.0.0.1:9191")]
    metrics_listen: SocketAddr,
    /// QUEUE=HOST:PORT[,HOST:PORT...]; repeatable.
    #[arg(long = "route")]
    routes: Vec<String>,
    /// Routes as `q1=a:1,b:2;q2=c:3` (what the injection webhook sets).
    #[arg(long, env = "SLUICE_ROUTES", default_value = "")]
    routes_env: String,
    /// Run the broker in this process (no Kubernetes), on a local data directory.
    /// Only in a sidecar built with the `embedded` feature; `sluice dev` does the same.
    #[arg(long)]
    embedded: bool,
    /// Directory of ServiceAccount tokens, one file per queue (`<dir>/<queue>`),
    /// presented to that queue's brokers; the injection webhook mounts them.
    #[arg(long, env = "SLUICE_TOKEN_DIR")]
    token_dir: Option<std::path::PathBuf>,
    /// Talk to brokers over mutual TLS with this client certificate (PEM); needs
    /// --tls-key and --tls-ca. The injection webhook mounts them.
    #[arg(long, env = "SLUICE_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long, env = "SLUICE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// CA (PEM) that signed the brokers' certificates.
    #[arg(long, env = "SLUICE_TLS_CA", requires = "tls_cert")]
    tls_ca: Option<std::path::PathBuf>,
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data")]
    data_dir: PathBuf,
    #[arg(long, env = "SLUICE_LOG_JSON")]
    log_json: bool,
    /// On SIGTERM (or `POST /shutdown` from inside the pod): seconds to keep taking
    /// enqueues, acks and nacks, with no new deliveries, before stopping. Keep it
    /// below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "SLUICE_DRAIN_SECONDS", default_value_t = 5)]
    drain_seconds: u64,
    /// What readiness (/readyz, gRPC health) follows: `serving` (the sidecar serves;
    /// a missing or unreachable queue does not hold the pod back) or `brokers` (also
    /// every queue has a broker that answers). The injection webhook sets `brokers`
    /// for pods annotated `sluice.dev/ready-requires-brokers: "true"`.
    #[arg(long, env = "SLUICE_READINESS", value_enum, default_value_t = ReadinessArg::Serving)]
    readiness: ReadinessArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ReadinessArg {
    Serving,
    Brokers,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = init_tracing(args.log_json, "sluice-sidecar");
    let grpc = bind(args.listen).await?;
    let http = bind(args.metrics_listen).await?;
    if args.embedded {
        return embedded(&args.data_dir, grpc, http).await;
    }
    let routes = sluice_sidecar::routes::parse_routes(
        args.routes
            .iter()
            .map(String::as_str)
            .chain([args.routes_env.as_str()]),
    )?;
    if routes.is_empty() {
        anyhow::bail!(
            "no routes: pass --route QUEUE=HOST:PORT or set SLUICE_ROUTES (or use --embedded)"
        );
    }
    let tls = match (args.tls_cert, args.tls_key, args.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(TlsFiles { cert, key, ca }),
        _ => None,
    };
    let security = sluice_sidecar::router::RouteSecurity {
        token_dir: args.token_dir,
        tls,
        server_name: None,
    };
    let router = sluice_sidecar::Router::secured(routes, &security).context("TLS settings")?;
    let grace = std::time::Duration::from_secs(args.drain_seconds);
    let readiness = match args.readiness {
        ReadinessArg::Brokers => sluice_sidecar::Readiness::BrokersReachable,
        ReadinessArg::Serving => sluice_sidecar::Readiness::Serving,
    };
    sluice_sidecar::run(
        router,
        grpc,
        Some(http),
        shutdown_signal(),
        grace,
        readiness,
    )
    .await
    .context("sidecar failed")
}

/// One in-process broker serves the API directly: with a single local broker there
/// is nothing to route, so no hop is added.
#[cfg(feature = "embedded")]
async fn embedded(
    data_dir: &std::path::Path,
    grpc: tokio::net::TcpListener,
    http: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    let mut options = sluice_broker::BrokerOptions::new(data_dir);
    options.auto_create = Some(sluice_config::QueueSettings::default());
    sluice_broker::server::run(options, grpc, Some(http), shutdown_signal())
        .await
        .context("embedded broker failed")
}

#[cfg(not(feature = "embedded"))]
async fn embedded(
    _data_dir: &std::path::Path,
    _grpc: tokio::net::TcpListener,
    _http: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    anyhow::bail!(
        "this sidecar was built without the broker: run `sluice dev`, or build with `cargo build -p sluice-sidecar --features embedded`"
    )
}
