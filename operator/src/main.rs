use clap::{Args, Parser, Subcommand, ValueEnum};
use kube::Client;
use sluice_operator::admission::{self, Webhook};
use sluice_operator::inject::InjectConfig;
use sluice_operator::leader::LeaderElector;
use sluice_operator::metrics::Metrics;
use sluice_operator::reconcile::{self, Context};
use sluice_operator::resources::Defaults;
use sluice_operator::resources::SidecarDefaults;
use sluice_operator::tls::{self, CertResolver, DataPlaneCerts, SelfManaged};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "sluice-operator",
    version,
    about = "Sluice Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the Queue CustomResourceDefinition as YAML (what crds/ holds).
    Crd,
    /// Apply this build's Queue CRD to the cluster (server-side) and wait until it
    /// is served: how an existing CRD is upgraded (Helm never upgrades crds/).
    InstallCrds,
    /// Run the operator: reconciler (when leader), webhook, KEDA scaler, metrics.
    Run(Box<RunArgs>),
}

#[derive(Clone, Copy, ValueEnum)]
enum SidecarMode {
    Auto,
    Native,
    Container,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn duration(s: &str) -> Result<Duration, String> {
    sluice_config::parse_duration(s).map_err(|e| format!("{e} (e.g. 30s, 5m, 1h)"))
}

#[derive(Args)]
struct RunArgs {
    /// Watch Queues of this namespace only (default: all namespaces).
    #[arg(long, env = "SLUICE_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Namespace the operator runs in (Lease, webhook Secret).
    #[arg(long, env = "POD_NAMESPACE", default_value = "sluice-system")]
    namespace: String,
    /// Identity of this replica in the leader Lease and in Events.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Broker image for Queues that do not set spec.template.image.
    #[arg(
        long,
        env = "SLUICE_BROKER_IMAGE",
        default_value = "sluice-broker:0.1.0"
    )]
    broker_image: String,
    /// Sidecar image the webhook injects.
    #[arg(
        long,
        env = "SLUICE_SIDECAR_IMAGE",
        default_value = "sluice-sidecar:0.1.0"
    )]
    sidecar_image: String,
    #[arg(long, default_value = "IfNotPresent")]
    image_pull_policy: String,
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// ClusterRoleBinding to `system:auth-delegator` (created by the chart) that the
    /// brokers of Queues with `spec.access` join, so they can review callers' tokens.
    #[arg(long, env = "SLUICE_TOKEN_REVIEW_BINDING")]
    token_review_binding: Option<String>,
    /// OpenTelemetry collector (OTLP over gRPC, e.g. `http://otel-collector:4317`)
    /// that brokers and injected sidecars send their enqueue, delivery and settle
    /// spans to. Off when unset.
    #[arg(long, env = "SLUICE_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Mutual TLS between sidecars and brokers, with certificates the operator
    /// issues from a CA it keeps in --data-plane-ca-secret.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    data_plane_tls: bool,
    /// Secret (in --namespace) holding the data plane's CA.
    #[arg(long, default_value = "sluice-data-plane-ca")]
    data_plane_ca_secret: String,
    #[arg(long, default_value = "50m")]
    sidecar_cpu_request: String,
    #[arg(long, default_value = "32Mi")]
    sidecar_memory_request: String,
    #[arg(long, default_value = "128Mi")]
    sidecar_memory_limit: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_listen: SocketAddr,
    /// Do not serve the sidecar-injection webhook.
    #[arg(long)]
    disable_webhook: bool,
    /// Address of KEDA's external scaler API (gRPC, plaintext: it serves only
    /// message counts).
    #[arg(long, default_value = "0.0.0.0:6000")]
    scaler_listen: SocketAddr,
    /// Apply this build's Queue CRD at start-up (an upgrade brings the CRD along;
    /// needs get and patch on customresourcedefinitions/queues.sluice.dev).
    #[arg(long)]
    install_crds: bool,
    /// Do not serve KEDA's external scaler API.
    #[arg(long)]
    disable_scaler: bool,
    /// How the webhook injects the sidecar: `auto` as a native sidecar (an init
    /// container with restartPolicy Always) where the API server is 1.29 or later,
    /// else as the pod's last container; `native` or `container` to choose.
    #[arg(long, value_enum, default_value = "auto")]
    sidecar_mode: SidecarMode,
    /// Address of the webhook (TLS).
    #[arg(long, default_value = "0.0.0.0:9443")]
    webhook_listen: SocketAddr,
    /// Serve tls.crt/tls.key from this directory (cert-manager) instead of
    /// managing the certificate.
    #[arg(long)]
    webhook_cert_dir: Option<PathBuf>,
    /// Secret holding the self-managed webhook certificate.
    #[arg(long, default_value = "sluice-webhook-tls")]
    webhook_secret: String,
    /// MutatingWebhookConfiguration whose caBundle the operator keeps current.
    #[arg(long, default_value = "sluice-sidecar-injector")]
    webhook_config_name: String,
    /// Service in front of the webhook (its DNS names go in the certificate).
    #[arg(long, default_value = "sluice-webhook")]
    webhook_service: String,
    /// More names (or IPs) for the serving certificate.
    #[arg(long)]
    webhook_extra_san: Vec<String>,
    #[arg(long, value_parser = duration, default_value = "8760h")]
    cert_validity: Duration,
    #[arg(long, value_parser = duration, default_value = "720h")]
    cert_renew_before: Duration,
    #[arg(long, value_parser = duration, default_value = "5m")]
    cert_check_interval: Duration,
    /// Elect a leader with a Lease (run two replicas safely).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    #[arg(long, default_value = "sluice-operator")]
    lease_name: String,
    #[arg(long, value_parser = duration, default_value = "15s")]
    lease_duration: Duration,
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Crd => {
            print!("{}", sluice_operator::crd::crd_yaml());
            std::process::ExitCode::SUCCESS
        }
        Cmd::InstallCrds => {
            init_tracing(LogFormat::Text);
            let done = async {
                let client = Client::try_default().await?;
                sluice_operator::crd::install(&client).await?;
                anyhow::Ok(())
            };
            match done.await {
                Ok(()) => {
                    info!("the Queue CRD is up to date");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    error!(error = %format!("{e:#}"), "installing the CRD failed");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Cmd::Run(args) => {
            init_tracing(args.log_format);
            match run(*args).await {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    error!(error = %format!("{e:#}"), "operator stopped");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.with_ansi(false).init(),
    }
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::new());
    let identity = a.identity.clone().unwrap_or_else(|| {
        std::env::var("HOSTNAME")
            .unwrap_or_else(|_| format!("sluice-operator-{}", std::process::id()))
    });

    if a.install_crds {
        // Not fatal: the CRD Helm installed may be current, and the reconciler
        // still works; the log says what is missing.
        match sluice_operator::crd::install(&client).await {
            Ok(()) => info!("the Queue CRD is up to date"),
            Err(e) => error!(error = %e, "could not apply the Queue CRD (--install-crds)"),
        }
    }

    let certs = a.data_plane_tls.then(|| {
        Arc::new(DataPlaneCerts::new(
            client.clone(),
            &a.namespace,
            &a.data_plane_ca_secret,
        ))
    });

    // /metrics, /healthz, /readyz
    let listener = tokio::net::TcpListener::bind(a.metrics_listen).await?;
    info!(addr = %a.metrics_listen, "metrics listening");
    let app = sluice_operator::metrics::router(metrics.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, "metrics server");
        }
    });

    // Webhook on every replica (stateless), certificates shared through a Secret.
    if a.disable_webhook {
        metrics.ready.store(true, Ordering::Relaxed);
    } else {
        let resolver = Arc::new(CertResolver::default());
        match &a.webhook_cert_dir {
            Some(dir) => {
                tokio::spawn(tls::watch_cert_dir(
                    dir.clone(),
                    resolver.clone(),
                    metrics.clone(),
                ));
            }
            None => {
                let svc = &a.webhook_service;
                let ns = &a.namespace;
                let mut sans = vec![
                    format!("{svc}.{ns}.svc"),
                    format!("{svc}.{ns}.svc.{}", a.cluster_domain),
                    format!("{svc}.{ns}"),
                    svc.clone(),
                ];
                sans.extend(a.webhook_extra_san.iter().cloned());
                let sm = SelfManaged {
                    namespace: ns.clone(),
                    secret_name: a.webhook_secret.clone(),
                    webhook_config_name: a.webhook_config_name.clone(),
                    sans,
                    validity: a.cert_validity,
                    renew_before: a.cert_renew_before,
                    check_interval: a.cert_check_interval,
                };
                tokio::spawn(sm.run(client.clone(), resolver.clone(), metrics.clone()));
            }
        }
        let native_sidecar = match a.sidecar_mode {
            SidecarMode::Native => true,
            SidecarMode::Container => false,
            SidecarMode::Auto => {
                let v = client.apiserver_version().await?;
                sluice_operator::inject::native_sidecars_served(&v.major, &v.minor)
            }
        };
        info!(native_sidecar, "sidecar injection");
        let webhook = Arc::new(Webhook {
            client: client.clone(),
            cfg: InjectConfig {
                sidecar: SidecarDefaults {
                    image: a.sidecar_image.clone(),
                    image_pull_policy: a.image_pull_policy.clone(),
                    cpu_request: a.sidecar_cpu_request.clone(),
                    memory_request: a.sidecar_memory_request.clone(),
                    memory_limit: a.sidecar_memory_limit.clone(),
                    tls: a.data_plane_tls,
                    otlp_endpoint: a.otlp_endpoint.clone(),
                },
                cluster_domain: a.cluster_domain.clone(),
                native_sidecar,
            },
            metrics: metrics.clone(),
            certs: certs.clone(),
        });
        let addr = a.webhook_listen;
        tokio::spawn(async move {
            if let Err(e) = admission::serve_tls(addr, resolver, admission::router(webhook)).await {
                error!(error = %e, "webhook server stopped");
                std::process::exit(1);
            }
        });
    }

    // KEDA's external scaler on every replica: it only reads.
    if !a.disable_scaler {
        let addr = a.scaler_listen;
        let scaler = sluice_operator::scaler::Scaler::new(client.clone()).into_service();
        info!(addr = %addr, "KEDA external scaler listening");
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(scaler)
                .serve(addr)
                .await;
            if let Err(e) = served {
                error!(error = %e, "KEDA external scaler stopped");
                std::process::exit(1);
            }
        });
    }

    let ctx = Arc::new(Context {
        client: client.clone(),
        defaults: Defaults {
            broker_image: a.broker_image.clone(),
            image_pull_policy: a.image_pull_policy.clone(),
            cluster_domain: a.cluster_domain.clone(),
            token_review_binding: a.token_review_binding.clone(),
            otlp_endpoint: a.otlp_endpoint.clone(),
        },
        pdb: reconcile::pdb_resource(&client).await?,
        recorder: reconcile::recorder(client.clone(), Some(identity.clone())),
        metrics: metrics.clone(),
        certs,
        brokers: Default::default(),
    });
    info!(pdb = %ctx.pdb.api_version, "PodDisruptionBudget version served");

    let elector = a.leader_elect.then(|| {
        LeaderElector::new(
            client.clone(),
            &a.namespace,
            &a.lease_name,
            &identity,
            a.lease_duration,
        )
    });
    if let Some(el) = &elector {
        tokio::select! {
            _ = el.acquire() => {}
            _ = shutdown_signal() => return Ok(()),
        }
        metrics.leader.set(1);
    }
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if elector.is_some() {
        // Renew in the background; losing the Lease stops the reconciler.
        let el = LeaderElector::new(
            client.clone(),
            &a.namespace,
            &a.lease_name,
            &identity,
            a.lease_duration,
        );
        let lost = lost.clone();
        tokio::spawn(async move {
            el.hold().await;
            lost.store(true, Ordering::SeqCst);
            let _ = lost_tx.send(());
        });
    } else {
        drop(lost_tx);
    }
    let shutdown = async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = async { if lost_rx.await.is_err() { std::future::pending::<()>().await } } => {}
        }
    };
    info!(namespace = ?a.watch_namespace, "starting the Queue controller");
    reconcile::run(ctx, a.watch_namespace.clone(), shutdown).await;
    metrics.leader.set(0);
    if lost.load(Ordering::SeqCst) {
        anyhow::bail!("leadership lost; exiting so that a fresh process can queue for the Lease");
    }
    if let Some(el) = &elector {
        el.release().await;
    }
    info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
