//! `sluice --kube`: a queue of a cluster, reached through the Kubernetes API server
//! with the caller's kubeconfig and RBAC, so nobody needs a debug pod to look at one.
//!
//! The command runs a sidecar in its own process (the same router an injected one
//! runs) whose routes lead to local tunnels: each tunnel connection is an HTTP/1.1
//! upgrade through the API server's pod proxy to a broker pod's `/tunnel`
//! (`sluice_dataplane::server::tunnel`), which joins it to the broker's gRPC port.
//! Mutual TLS and tokens work as for an injected sidecar, end to end: the client
//! certificate is the namespace's (Secret `sluice-sidecar-tls`), and a Queue with an
//! access list gets a token of one of its ServiceAccounts by TokenRequest. So the
//! caller needs, in the Queue's namespace: `get` on queues.sluice.dev, `list` on
//! pods, `get` and `create` on pods/proxy, `get` on that Secret (with data-plane
//! TLS), and `create` on serviceaccounts/token (with an access list).

use anyhow::{Context, Result, bail};
use http::header;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use sluice_dataplane::server::tls::TlsFiles;
use sluice_dataplane::server::tunnel::{TUNNEL_PATH, TUNNEL_PROTOCOL};
use sluice_operator::crd::Queue;
use sluice_operator::resources;
use sluice_operator::tls::data_plane::SIDECAR_SECRET;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Where `--kube` looks.
#[derive(Debug, Clone, Default)]
pub struct KubeTarget {
    /// The kubeconfig context (its current one when `None`).
    pub context: Option<String>,
    /// The Queue's namespace (the context's when `None`).
    pub namespace: Option<String>,
    /// For a Queue with an access list: the ServiceAccount whose token to present
    /// (the list's first when `None`).
    pub service_account: Option<String>,
}

/// The in-process sidecar and what it needs kept: stops when dropped.
pub struct Session {
    /// The sidecar's API, for the command's client.
    pub addr: String,
    _files: tempfile::TempDir,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Opens the way to `queue` (a dead-letter queue is reached through its queue).
pub async fn open(queue: &str, target: &KubeTarget) -> Result<Session> {
    let config = match &target.context {
        Some(context) => {
            let options = KubeConfigOptions {
                context: Some(context.clone()),
                ..Default::default()
            };
            Config::from_custom_kubeconfig(Kubeconfig::read()?, &options).await?
        }
        None => Config::infer()
            .await
            .context("no Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster)")?,
    };
    let ns = target
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config)?;
    let base = queue
        .strip_suffix(sluice_config::DLQ_SUFFIX)
        .unwrap_or(queue);
    let q = Api::<Queue>::namespaced(client.clone(), &ns)
        .get(base)
        .await
        .map_err(|e| match api_code(&e) {
            Some(404) => anyhow::anyhow!("there is no Queue {base:?} in namespace {ns:?}"),
            _ => anyhow::Error::new(e).context(format!("reading Queue {ns}/{base}")),
        })?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(&resources::queue_selector(base)))
        .await
        .with_context(|| format!("listing the broker pods of {ns}/{base}"))?
        .items;
    let names: Vec<String> = pods
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    if names.is_empty() {
        bail!("Queue {ns}/{base} has no broker pods yet (see `kubectl get slq -n {ns} {base}`)");
    }
    // Whether the API server lets us through, with its own words if not.
    let probe = http::Request::get(proxy_path(&ns, &names[0], "/healthz"))
        .body(Vec::new())
        .expect("a valid request");
    if let Err(e) = client.request_text(probe).await
        && matches!(api_code(&e), Some(401 | 403))
    {
        return Err(anyhow::Error::new(e).context(format!(
            "reaching the brokers of {ns}/{base} through the API server needs get and create on pods/proxy"
        )));
    }

    let files = tempfile::Builder::new().prefix("sluice-kube-").tempdir()?;
    let tls = if pods.iter().any(serves_tls) {
        Some(client_certificate(&client, &ns, files.path()).await?)
    } else {
        None
    };
    let token_dir = files.path().join("tokens");
    std::fs::create_dir(&token_dir)?;
    if let Some(sa) = q.spec.access.service_accounts.iter().find(|sa| {
        target
            .service_account
            .as_ref()
            .is_none_or(|n| *n == sa.name)
    }) {
        let sa_ns = sa.namespace.clone().unwrap_or_else(|| ns.clone());
        let token = token(
            &client,
            &sa_ns,
            &sa.name,
            &sluice_config::token_audience(&ns, base),
        )
        .await?;
        write_private(&token_dir.join(base), token.as_bytes())?;
    } else if let Some(name) = &target.service_account {
        bail!("ServiceAccount {name:?} is not in the access list of Queue {ns}/{base}");
    }

    let mut tasks = Vec::new();
    let mut addrs = Vec::new();
    for pod in names {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(listener.local_addr()?.to_string());
        tasks.push(tokio::spawn(tunnels(
            listener,
            client.clone(),
            proxy_path(&ns, &pod, TUNNEL_PATH),
        )));
    }
    let security = sluice_sidecar::router::RouteSecurity {
        token_dir: Some(token_dir),
        tls,
        server_name: Some(format!("{}.{ns}.svc", resources::svc_name(base))),
    };
    let router =
        sluice_sidecar::Router::secured(BTreeMap::from([(base.to_string(), addrs)]), &security)?;
    let api = TcpListener::bind("127.0.0.1:0").await?;
    let addr = format!("http://{}", api.local_addr()?);
    let serving = router.clone();
    tasks.push(tokio::spawn(async move {
        let forever = std::future::pending();
        let ready = sluice_sidecar::Readiness::Serving;
        if let Err(e) =
            sluice_sidecar::run(serving, api, None, forever, Duration::ZERO, ready).await
        {
            eprintln!("error: the local sidecar stopped: {e}");
        }
    }));
    // Until a broker answers (or long enough to say why not in the call's error).
    for _ in 0..100 {
        if router.is_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Session {
        addr,
        _files: files,
        tasks,
    })
}

fn proxy_path(ns: &str, pod: &str, path: &str) -> String {
    format!(
        "/api/v1/namespaces/{ns}/pods/{pod}:{}/proxy{path}",
        resources::METRICS_PORT
    )
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Whether a broker pod serves mutual TLS (the operator points it at its files).
fn serves_tls(p: &Pod) -> bool {
    p.spec
        .iter()
        .flat_map(|s| &s.containers)
        .any(|c| c.env.iter().flatten().any(|e| e.name == "SLUICE_TLS_CERT"))
}

/// The namespace's client certificate, written to files for the router.
async fn client_certificate(client: &Client, ns: &str, dir: &std::path::Path) -> Result<TlsFiles> {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(SIDECAR_SECRET)
        .await
        .map_err(|e| match api_code(&e) {
            Some(404) => anyhow::anyhow!(
                "the brokers serve mutual TLS and namespace {ns:?} has no client certificate yet (Secret {SIDECAR_SECRET}: the operator issues it when it first injects a sidecar there)"
            ),
            _ => anyhow::Error::new(e).context(format!(
                "reading the namespace's client certificate (Secret {ns}/{SIDECAR_SECRET}) needs get on it"
            )),
        })?;
    let data = secret.data.unwrap_or_default();
    let file = |key: &str| -> Result<std::path::PathBuf> {
        let bytes = data
            .get(key)
            .with_context(|| format!("Secret {ns}/{SIDECAR_SECRET} has no {key}"))?;
        let path = dir.join(key);
        write_private(&path, &bytes.0)?;
        Ok(path)
    };
    Ok(TlsFiles {
        cert: file("tls.crt")?,
        key: file("tls.key")?,
        ca: file("ca.crt")?,
    })
}

/// A short-lived token of ServiceAccount `ns/name` for `audience`.
async fn token(client: &Client, ns: &str, name: &str, audience: &str) -> Result<String> {
    let mut request = TokenRequest::default();
    request.spec.audiences = vec![audience.to_string()];
    request.spec.expiration_seconds = Some(600);
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .with_context(|| {
            format!("a token of ServiceAccount {ns}/{name}, listed by the Queue, needs create on serviceaccounts/token (choose another with --service-account)")
        })?;
    Ok(answer
        .status
        .context("the API server issued no token")?
        .token)
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    Ok(())
}

/// Accepts local connections and joins each to a new tunnel at `path`. The first
/// failure is told on stderr (the router only sees a broker it cannot reach).
async fn tunnels(listener: TcpListener, client: Client, path: String) {
    let path = Arc::new(path);
    let told = Arc::new(AtomicBool::new(false));
    while let Ok((conn, _)) = listener.accept().await {
        let (client, path, told) = (client.clone(), path.clone(), told.clone());
        tokio::spawn(async move {
            if let Err(e) = tunnel(conn, &client, &path).await
                && !told.swap(true, Ordering::Relaxed)
            {
                eprintln!("warning: no tunnel through {path}: {e:#}");
            }
        });
    }
}

async fn tunnel(mut conn: TcpStream, client: &Client, path: &str) -> Result<()> {
    let _ = conn.set_nodelay(true);
    let request = http::Request::get(path)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, TUNNEL_PROTOCOL)
        .body(kube::client::Body::empty())
        .expect("a valid request");
    let response = client.send(request).await?;
    if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        bail!(
            "the API server answered {} to the tunnel",
            response.status()
        );
    }
    let upgraded = hyper::upgrade::on(response).await?;
    let mut remote = hyper_util::rt::TokioIo::new(upgraded);
    tokio::io::copy_bidirectional(&mut conn, &mut remote).await?;
    Ok(())
}
