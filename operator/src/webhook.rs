//! The sidecar-injection mutating admission webhook and its serving certificate.
//!
//! A pod annotated `sluice.dev/inject: "true"` gets the `sluice-sidecar` container,
//! routes to the brokers of the queues named in `sluice.dev/queues`, and
//! `SLUICE_ADDR` in its other containers. Injecting twice is a no-op. Namespaces
//! opt out with the label `sluice.dev/injection: disabled` (the chart's
//! namespaceSelector); a pod opts out with `sluice.dev/inject: "false"`.
//!
//! Certificates: by default the operator manages them itself (a CA and a serving
//! certificate in a Secret shared by the replicas, the CA patched into the
//! MutatingWebhookConfiguration's caBundle, rotated before expiry with the old CA kept
//! in the bundle during the change). With `--webhook-cert-dir` it serves files
//! written by cert-manager instead and reloads them when they change.

use crate::crd::Queue;
use crate::metrics::Metrics;
use crate::resources;
use axum::Router;
use axum::extract::State;
use axum::routing::post;
use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tracing::{info, warn};

pub const INJECT_ANNOTATION: &str = "sluice.dev/inject";
pub const QUEUES_ANNOTATION: &str = "sluice.dev/queues";
pub const INJECTED_ANNOTATION: &str = "sluice.dev/injected";
pub const DENIED_ANNOTATION: &str = "sluice.dev/denied-queues";
pub const SIDECAR_NAME: &str = "sluice-sidecar";
pub const SIDECAR_GRPC_PORT: i32 = 7070;
pub const SIDECAR_METRICS_PORT: i32 = 9191;
/// Where the sidecar finds its per-queue ServiceAccount tokens.
pub const TOKEN_DIR: &str = "/var/run/secrets/sluice.dev/tokens";
pub const TOKEN_VOLUME: &str = "sluice-tokens";
pub const TLS_VOLUME: &str = "sluice-tls";
/// Lifetime asked of the projected tokens; the kubelet renews them at 80 %.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("PEM: {0}")]
    Pem(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// What the webhook injects.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    pub sidecar_image: String,
    pub image_pull_policy: String,
    pub cluster_domain: String,
    pub cpu_request: String,
    pub memory_request: String,
    pub memory_limit: String,
    /// Mount the namespace's sidecar certificate and talk TLS to the brokers.
    pub tls: bool,
}

/// Access decision for one queue named by a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Access {
    /// The Queue does not exist (yet): route anyway, the sidecar reports it unready.
    Unknown,
    Allowed,
    Denied,
}

/// A queue named in `sluice.dev/queues`: `name`, `ns/name`, or a dead-letter queue
/// `name.dlq` (served by the brokers of `name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRef {
    pub route: String,
    pub namespace: String,
    pub queue: String,
}

pub fn parse_queues(annotation: &str, pod_ns: &str) -> Vec<QueueRef> {
    annotation
        .split([',', ' ', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (ns, name) = match s.split_once('/') {
                Some((ns, n)) => (ns.to_string(), n.to_string()),
                None => (pod_ns.to_string(), s.to_string()),
            };
            let queue = name.strip_suffix(".dlq").unwrap_or(&name).to_string();
            QueueRef {
                route: name,
                namespace: ns,
                queue,
            }
        })
        .collect()
}

/// Outcome of looking at one pod.
#[derive(Debug, Default)]
pub struct Mutation {
    pub patch: Vec<Value>,
    pub warnings: Vec<String>,
    pub skipped: Option<&'static str>,
}

fn annotations(pod: &Value) -> BTreeMap<String, String> {
    pod.pointer("/metadata/annotations")
        .and_then(|a| serde_json::from_value(a.clone()).ok())
        .unwrap_or_default()
}

/// Decides the JSON patch for a pod. `access` gives the decision for each queue.
pub fn mutate(
    pod: &Value,
    pod_ns: &str,
    cfg: &InjectConfig,
    access: &dyn Fn(&QueueRef) -> Access,
) -> Mutation {
    let ann = annotations(pod);
    if ann.get(INJECT_ANNOTATION).map(|v| v.as_str()) != Some("true") {
        return Mutation {
            skipped: Some("not-annotated"),
            ..Default::default()
        };
    }
    let containers = pod
        .pointer("/spec/containers")
        .and_then(|c| c.as_array())
        .cloned()
        .unwrap_or_default();
    if containers
        .iter()
        .any(|c| c.get("name").and_then(|n| n.as_str()) == Some(SIDECAR_NAME))
    {
        return Mutation {
            skipped: Some("already-injected"),
            ..Default::default()
        };
    }
    let queues = parse_queues(
        ann.get(QUEUES_ANNOTATION).map(|s| s.as_str()).unwrap_or(""),
        pod_ns,
    );
    let mut routes = Vec::new();
    let mut tokens = Vec::new();
    let mut denied = Vec::new();
    let mut warnings = Vec::new();
    for q in &queues {
        match access(q) {
            Access::Denied => {
                denied.push(q.route.clone());
                warnings.push(format!(
                    "sluice: queue {}/{} does not allow this pod's ServiceAccount; no route injected",
                    q.namespace, q.queue
                ));
            }
            a => {
                if a == Access::Unknown {
                    warnings.push(format!(
                        "sluice: queue {}/{} does not exist yet; the sidecar stays unready until it does",
                        q.namespace, q.queue
                    ));
                }
                routes.push(format!(
                    "{}={}",
                    q.route,
                    resources::address(&q.queue, &q.namespace, &cfg.cluster_domain)
                ));
                // A token for this queue alone: a broker refuses tokens issued for
                // other audiences, so one leaked token opens one queue.
                tokens.push(json!({"serviceAccountToken": {
                    "audience": sluice_config::token_audience(&q.namespace, &q.queue),
                    "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                    "path": q.route,
                }}));
            }
        }
    }
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let mut sidecar = json!({
        "name": SIDECAR_NAME,
        "image": cfg.sidecar_image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["sluice-sidecar"],
        // gRPC stays on loopback (only the app talks to it); the metrics port listens
        // on all interfaces so that the kubelet's readiness probe reaches it.
        "args": [
            "--listen", format!("127.0.0.1:{SIDECAR_GRPC_PORT}"),
            "--metrics-listen", format!("0.0.0.0:{SIDECAR_METRICS_PORT}"),
        ],
        "env": [
            {"name": "SLUICE_ROUTES", "value": routes.join(";")},
            field("POD_NAME", "metadata.name"),
            field("POD_NAMESPACE", "metadata.namespace"),
            field("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            {"name": "SLUICE_TOKEN_DIR", "value": TOKEN_DIR},
        ],
        "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true}],
        "ports": [
            {"name": "sluice-grpc", "containerPort": SIDECAR_GRPC_PORT, "protocol": "TCP"},
            {"name": "sluice-metrics", "containerPort": SIDECAR_METRICS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": SIDECAR_METRICS_PORT, "scheme": "HTTP"},
            "periodSeconds": 5, "failureThreshold": 3, "timeoutSeconds": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": SIDECAR_METRICS_PORT, "scheme": "HTTP"},
            "periodSeconds": 10, "failureThreshold": 6, "timeoutSeconds": 2,
        },
        "resources": {
            "requests": {"cpu": cfg.cpu_request, "memory": cfg.memory_request},
            "limits": {"memory": cfg.memory_limit},
        },
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "capabilities": {"drop": ["ALL"]},
        },
    });
    let mut volumes = vec![];
    if cfg.tls {
        // The namespace's client certificate (the webhook issues it before answering).
        let env = sidecar["env"].as_array_mut().expect("env is a list");
        env.extend(resources::tls_env().into_iter().map(|e| json!(e)));
        sidecar["volumeMounts"]
            .as_array_mut()
            .expect("mounts are a list")
            .push(json!({"name": TLS_VOLUME, "mountPath": resources::TLS_DIR, "readOnly": true}));
        volumes.push(json!({"name": TLS_VOLUME, "secret": {"secretName": crate::certs::SIDECAR_SECRET, "defaultMode": 0o444}}));
    }
    let mut patch = vec![json!({"op": "add", "path": "/spec/containers/-", "value": sidecar})];
    // Readable by the sidecar whatever user the app runs as; mounted in no other
    // container.
    volumes.insert(
        0,
        json!({"name": TOKEN_VOLUME, "projected": {"sources": tokens, "defaultMode": 0o444}}),
    );
    match pod.pointer("/spec/volumes").and_then(|v| v.as_array()) {
        Some(_) => {
            for volume in volumes {
                patch.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
            }
        }
        None => patch.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes})),
    }
    let addr = json!({"name": "SLUICE_ADDR", "value": format!("127.0.0.1:{SIDECAR_GRPC_PORT}")});
    for (i, c) in containers.iter().enumerate() {
        match c.get("env").and_then(|e| e.as_array()) {
            None => patch.push(
                json!({"op": "add", "path": format!("/spec/containers/{i}/env"), "value": [addr]}),
            ),
            Some(env) => {
                if !env
                    .iter()
                    .any(|e| e.get("name").and_then(|n| n.as_str()) == Some("SLUICE_ADDR"))
                {
                    patch.push(json!({"op": "add", "path": format!("/spec/containers/{i}/env/-"), "value": addr}));
                }
            }
        }
    }
    patch.push(
        json!({"op": "add", "path": "/metadata/annotations/sluice.dev~1injected", "value": "true"}),
    );
    if !denied.is_empty() {
        patch.push(json!({"op": "add", "path": "/metadata/annotations/sluice.dev~1denied-queues", "value": denied.join(",")}));
    }
    Mutation {
        patch,
        warnings,
        skipped: None,
    }
}

/// State of the webhook HTTP handler.
pub struct Handler {
    pub client: Client,
    pub cfg: InjectConfig,
    pub metrics: Arc<Metrics>,
    /// Issues the sidecars' client certificate of a namespace (with `cfg.tls`).
    pub certs: Option<Arc<crate::certs::DataPlaneCerts>>,
}

pub fn router(h: Arc<Handler>) -> Router {
    Router::new()
        .route("/mutate", post(handle))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .with_state(h)
}

async fn handle(State(h): State<Arc<Handler>>, body: axum::body::Bytes) -> axum::Json<Value> {
    let review: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            h.metrics.webhook("error");
            return axum::Json(json!({
                "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "response": {"uid": "", "allowed": true, "warnings": [format!("sluice: unreadable review: {e}")]}
            }));
        }
    };
    let api_version = review
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or("admission.k8s.io/v1")
        .to_string();
    let req = review.get("request").cloned().unwrap_or(Value::Null);
    let uid = req
        .get("uid")
        .and_then(|u| u.as_str())
        .unwrap_or("")
        .to_string();
    let ns = req
        .get("namespace")
        .and_then(|n| n.as_str())
        .or_else(|| {
            req.pointer("/object/metadata/namespace")
                .and_then(|n| n.as_str())
        })
        .unwrap_or("default")
        .to_string();
    let pod = req.get("object").cloned().unwrap_or(Value::Null);
    let sa = pod
        .pointer("/spec/serviceAccountName")
        .and_then(|s| s.as_str())
        .unwrap_or("default")
        .to_string();

    // Resolve access for each named queue (an API lookup per queue).
    let ann = annotations(&pod);
    let mut decisions = BTreeMap::new();
    if ann.get(INJECT_ANNOTATION).map(|s| s.as_str()) == Some("true") {
        for q in parse_queues(
            ann.get(QUEUES_ANNOTATION).map(|s| s.as_str()).unwrap_or(""),
            &ns,
        ) {
            let api: Api<Queue> = Api::namespaced(h.client.clone(), &q.namespace);
            let d = match api.get_opt(&q.queue).await {
                Ok(Some(queue)) => {
                    let list = &queue.spec.access.service_accounts;
                    if list.is_empty()
                        || list.iter().any(|r| {
                            r.name == sa && r.namespace.as_deref().unwrap_or(&q.namespace) == ns
                        })
                    {
                        Access::Allowed
                    } else {
                        Access::Denied
                    }
                }
                Ok(None) => Access::Unknown,
                Err(e) => {
                    warn!(error = %e, queue = %q.queue, "could not read Queue; routing anyway");
                    Access::Unknown
                }
            };
            decisions.insert((q.namespace.clone(), q.queue.clone()), d);
        }
    }
    // The sidecar mounts the namespace's client certificate: make sure it exists
    // before the pod does. Refusing the pod (and letting its controller retry) is
    // better than creating one whose sidecar cannot start.
    if h.cfg.tls
        && ann.get(INJECT_ANNOTATION).map(|s| s.as_str()) == Some("true")
        && let Some(certs) = &h.certs
        && let Err(e) = certs.sidecar_secret(&ns).await
    {
        h.metrics.webhook("error");
        warn!(error = %e, %ns, "could not issue the sidecars' certificate");
        return axum::Json(
            json!({"apiVersion": api_version, "kind": "AdmissionReview", "response": {
                "uid": uid, "allowed": false,
                "status": {"code": 503, "message": format!("sluice: could not issue the sidecar certificate for namespace {ns}: {e}")}
            }}),
        );
    }
    let m = mutate(&pod, &ns, &h.cfg, &|q| {
        decisions
            .get(&(q.namespace.clone(), q.queue.clone()))
            .cloned()
            .unwrap_or(Access::Unknown)
    });
    let mut response = json!({"uid": uid, "allowed": true});
    match m.skipped {
        Some(why) => h.metrics.webhook(why),
        None => {
            let bytes = serde_json::to_vec(&m.patch).unwrap_or_default();
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
            h.metrics.webhook("injected");
            info!(pod = ?pod.pointer("/metadata/name").or(pod.pointer("/metadata/generateName")), %ns, "injected sidecar");
        }
    }
    if !m.warnings.is_empty() {
        response["warnings"] = json!(m.warnings);
    }
    axum::Json(json!({"apiVersion": api_version, "kind": "AdmissionReview", "response": response}))
}

/// Serves certificates that can be swapped while the server runs.
#[derive(Debug, Default)]
pub struct CertResolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
    loaded_pem: RwLock<String>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok()?.clone()
    }
}

impl CertResolver {
    /// Loads a PEM certificate chain and key; a no-op when unchanged.
    pub fn load(&self, cert_pem: &str, key_pem: &str) -> Result<bool, WebhookError> {
        if *self.loaded_pem.read().expect("lock") == cert_pem {
            return Ok(false);
        }
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| WebhookError::Pem(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| WebhookError::Pem(e.to_string()))?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key)?;
        *self.current.write().expect("lock") = Some(Arc::new(CertifiedKey::new(certs, signing)));
        *self.loaded_pem.write().expect("lock") = cert_pem.to_string();
        Ok(true)
    }

    pub fn has_cert(&self) -> bool {
        self.current.read().map(|c| c.is_some()).unwrap_or(false)
    }
}

/// Serves the webhook router over TLS until the process ends.
pub async fn serve_tls(
    addr: SocketAddr,
    resolver: Arc<CertResolver>,
    app: Router,
) -> Result<(), WebhookError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "webhook listening (TLS)");
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "accept");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let io = hyper_util::rt::TokioIo::new(tls);
            let svc = hyper_util::service::TowerToHyperService::new(app);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "webhook connection");
            }
        });
    }
}

/// Settings of the self-managed certificates.
#[derive(Debug, Clone)]
pub struct SelfManaged {
    pub namespace: String,
    pub secret_name: String,
    pub webhook_config_name: String,
    /// DNS names and IP addresses the serving certificate is valid for.
    pub sans: Vec<String>,
    pub validity: Duration,
    pub renew_before: Duration,
    pub check_interval: Duration,
}

const NOT_AFTER_ANNOTATION: &str = "sluice.dev/not-after";
const SANS_ANNOTATION: &str = "sluice.dev/sans";

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn secret_str(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// Generates a CA and a serving certificate signed by it: (ca_pem, cert_pem, key_pem).
pub fn generate(
    sans: &[String],
    validity: Duration,
) -> Result<(String, String, String), WebhookError> {
    // The CA outlives its leaf by a day, so a leaf is never checked against an
    // expired CA.
    let ca = crate::pki::Ca::generate("sluice-webhook-ca", validity + Duration::from_secs(86_400))?;
    let name = sans
        .first()
        .cloned()
        .unwrap_or_else(|| "sluice-webhook".into());
    let leaf = ca.issue(&name, sans, crate::pki::Usage::Server, validity)?;
    Ok((ca.cert_pem, leaf.cert_pem, leaf.key_pem))
}

impl SelfManaged {
    /// Makes sure the Secret holds a valid certificate for our names, creating or
    /// rotating it when needed; returns (ca bundle, cert, key, rotated).
    pub async fn ensure(
        &self,
        client: &Client,
    ) -> Result<(String, String, String, bool), WebhookError> {
        let api: Api<Secret> = Api::namespaced(client.clone(), &self.namespace);
        let sans = self.sans.join(",");
        for _ in 0..5 {
            let existing = api.get_opt(&self.secret_name).await?;
            if let Some(s) = &existing {
                let ann = s.annotations();
                let not_after: i64 = ann
                    .get(NOT_AFTER_ANNOTATION)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let fresh = not_after - self.renew_before.as_secs() as i64 > now_unix();
                if fresh
                    && ann.get(SANS_ANNOTATION) == Some(&sans)
                    && let (Some(ca), Some(crt), Some(key)) = (
                        secret_str(s, "ca.crt"),
                        secret_str(s, "tls.crt"),
                        secret_str(s, "tls.key"),
                    )
                {
                    return Ok((ca, crt, key, false));
                }
            }
            // (Re)generate; keep the previous CA in the bundle so that a caBundle the
            // API server still holds keeps working while the new one is patched in.
            let (ca, crt, key) = generate(&self.sans, self.validity)?;
            let prev_ca = existing
                .as_ref()
                .and_then(|s| secret_str(s, "ca.crt"))
                .and_then(|b| {
                    CertificateDer::pem_slice_iter(b.as_bytes())
                        .next()
                        .and_then(|c| c.ok())
                        .map(|c| pem_encode("CERTIFICATE", &c))
                });
            let bundle = match prev_ca {
                Some(p) => format!("{ca}{p}"),
                None => ca.clone(),
            };
            let not_after = now_unix() + self.validity.as_secs() as i64;
            let mut secret = Secret {
                metadata: ObjectMeta {
                    name: Some(self.secret_name.clone()),
                    namespace: Some(self.namespace.clone()),
                    annotations: Some(BTreeMap::from([
                        (NOT_AFTER_ANNOTATION.to_string(), not_after.to_string()),
                        (SANS_ANNOTATION.to_string(), sans.clone()),
                    ])),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_string(),
                        "sluice-operator".to_string(),
                    )])),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(BTreeMap::from([
                    (
                        "ca.crt".to_string(),
                        ByteString(bundle.clone().into_bytes()),
                    ),
                    ("tls.crt".to_string(), ByteString(crt.clone().into_bytes())),
                    ("tls.key".to_string(), ByteString(key.clone().into_bytes())),
                ])),
                ..Default::default()
            };
            let res = match &existing {
                None => api
                    .create(&PostParams::default(), &secret)
                    .await
                    .map(|_| ()),
                Some(old) => {
                    secret.metadata.resource_version = old.resource_version();
                    api.replace(&self.secret_name, &PostParams::default(), &secret)
                        .await
                        .map(|_| ())
                }
            };
            match res {
                Ok(()) => {
                    info!(secret = %self.secret_name, "generated webhook serving certificate");
                    return Ok((bundle, crt, key, true));
                }
                // Another replica wrote it first: use theirs.
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(WebhookError::Pem(
            "could not settle the certificate Secret".into(),
        ))
    }

    /// Writes the CA bundle into every webhook of the configuration.
    pub async fn patch_ca_bundle(
        &self,
        client: &Client,
        bundle: &str,
    ) -> Result<bool, WebhookError> {
        let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        let Some(cfg) = api.get_opt(&self.webhook_config_name).await? else {
            return Ok(false);
        };
        let want = bundle.as_bytes().to_vec();
        let hooks: Vec<Value> = cfg
            .webhooks
            .unwrap_or_default()
            .into_iter()
            .filter(|w| w.client_config.ca_bundle.as_ref().map(|b| &b.0) != Some(&want))
            .map(|w| json!({"name": w.name, "clientConfig": {"caBundle": base64::engine::general_purpose::STANDARD.encode(&want)}}))
            .collect();
        if hooks.is_empty() {
            return Ok(true);
        }
        api.patch(
            &self.webhook_config_name,
            &PatchParams::default(),
            &Patch::Strategic(json!({ "webhooks": hooks })),
        )
        .await?;
        info!(config = %self.webhook_config_name, "patched caBundle");
        Ok(true)
    }

    /// Keeps the certificate valid and the caBundle current, forever.
    pub async fn run(self, client: Client, resolver: Arc<CertResolver>, metrics: Arc<Metrics>) {
        loop {
            match self.ensure(&client).await {
                Ok((bundle, crt, key, rotated)) => {
                    if rotated {
                        metrics.cert_rotations.inc();
                    }
                    match resolver.load(&crt, &key) {
                        Ok(true) => info!("serving a new webhook certificate"),
                        Ok(false) => {}
                        Err(e) => warn!(error = %e, "loading the webhook certificate"),
                    }
                    match self.patch_ca_bundle(&client, &bundle).await {
                        Ok(true) => {}
                        Ok(false) => {
                            warn!(config = %self.webhook_config_name, "MutatingWebhookConfiguration not found; will retry")
                        }
                        Err(e) => warn!(error = %e, "patching caBundle"),
                    }
                    metrics
                        .ready
                        .store(resolver.has_cert(), std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => warn!(error = %e, "webhook certificate"),
            }
            tokio::time::sleep(self.check_interval).await;
        }
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Serves certificates from files (cert-manager), reloading them when they change.
pub async fn watch_cert_dir(
    dir: std::path::PathBuf,
    resolver: Arc<CertResolver>,
    metrics: Arc<Metrics>,
) {
    loop {
        let crt = std::fs::read_to_string(dir.join("tls.crt"));
        let key = std::fs::read_to_string(dir.join("tls.key"));
        match (crt, key) {
            (Ok(c), Ok(k)) => match resolver.load(&c, &k) {
                Ok(true) => {
                    info!(dir = %dir.display(), "loaded webhook certificate");
                    metrics.cert_rotations.inc();
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "webhook certificate files"),
            },
            _ => warn!(dir = %dir.display(), "webhook certificate files not there yet"),
        }
        metrics
            .ready
            .store(resolver.has_cert(), std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> InjectConfig {
        InjectConfig {
            sidecar_image: "sluice-sidecar:test".into(),
            image_pull_policy: "IfNotPresent".into(),
            cluster_domain: "cluster.local".into(),
            cpu_request: "50m".into(),
            memory_request: "32Mi".into(),
            memory_limit: "128Mi".into(),
            tls: true,
        }
    }

    fn pod(ann: Value) -> Value {
        json!({"metadata": {"name": "app", "annotations": ann},
               "spec": {"containers": [{"name": "app", "image": "app"}, {"name": "b", "image": "b", "env": [{"name": "X", "value": "1"}]}]}})
    }

    fn apply(pod: &Value, patch: &[Value]) -> Value {
        // Minimal JSON-patch "add" for the paths the webhook emits.
        let mut p = pod.clone();
        for op in patch {
            let path = op["path"].as_str().unwrap();
            let parts: Vec<String> = path[1..].split('/').map(|s| s.replace("~1", "/")).collect();
            let (last, parents) = parts.split_last().unwrap();
            let mut cur = &mut p;
            for k in parents {
                cur = match cur {
                    Value::Array(a) => &mut a[k.parse::<usize>().unwrap()],
                    v => &mut v[k.as_str()],
                };
            }
            match cur {
                Value::Array(a) if last == "-" => a.push(op["value"].clone()),
                v => v[last.as_str()] = op["value"].clone(),
            }
        }
        p
    }

    #[test]
    fn injects_sidecar_routes_and_env() {
        let p = pod(
            json!({"sluice.dev/inject": "true", "sluice.dev/queues": "orders, billing/invoices,orders.dlq"}),
        );
        let m = mutate(&p, "shop", &cfg(), &|_| Access::Allowed);
        assert!(m.skipped.is_none());
        let out = apply(&p, &m.patch);
        let cs = out["spec"]["containers"].as_array().unwrap();
        assert_eq!(cs.len(), 3);
        let side = &cs[2];
        assert_eq!(side["name"], SIDECAR_NAME);
        assert_eq!(
            side["env"][0]["value"],
            "orders=sluice-orders.shop.svc.cluster.local:7171;invoices=sluice-invoices.billing.svc.cluster.local:7171;orders.dlq=sluice-orders.shop.svc.cluster.local:7171"
        );
        assert_eq!(side["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(cs[0]["env"][0]["name"], "SLUICE_ADDR");
        assert_eq!(cs[1]["env"][1]["name"], "SLUICE_ADDR");
        assert_eq!(out["metadata"]["annotations"][INJECTED_ANNOTATION], "true");
        // One projected token per route, for that queue's audience, mounted in the
        // sidecar only.
        let vol = &out["spec"]["volumes"][0];
        assert_eq!(vol["name"], TOKEN_VOLUME);
        let sources = vol["projected"]["sources"].as_array().unwrap();
        assert_eq!(sources.len(), 3);
        assert_eq!(
            sources[1]["serviceAccountToken"]["audience"],
            "sluice.dev/billing/invoices"
        );
        assert_eq!(sources[1]["serviceAccountToken"]["path"], "invoices");
        assert_eq!(
            sources[2]["serviceAccountToken"]["audience"],
            "sluice.dev/shop/orders"
        );
        assert_eq!(side["volumeMounts"][0]["mountPath"], TOKEN_DIR);
        assert!(
            side["env"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "SLUICE_TOKEN_DIR" && e["value"] == TOKEN_DIR)
        );
        assert!(cs[0].get("volumeMounts").is_none());
        // The namespace's client certificate, mounted in the sidecar.
        assert_eq!(
            out["spec"]["volumes"][1]["secret"]["secretName"],
            crate::certs::SIDECAR_SECRET
        );
        assert_eq!(side["volumeMounts"][1]["mountPath"], resources::TLS_DIR);
        assert!(
            side["env"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "SLUICE_TLS_CA")
        );
        // Injecting the result again is a no-op.
        let again = mutate(&out, "shop", &cfg(), &|_| Access::Allowed);
        assert_eq!(again.skipped, Some("already-injected"));
        assert!(again.patch.is_empty());
    }

    #[test]
    fn leaves_unannotated_and_opted_out_pods_alone() {
        for ann in [json!({}), json!({"sluice.dev/inject": "false"})] {
            let m = mutate(&pod(ann), "shop", &cfg(), &|_| Access::Allowed);
            assert_eq!(m.skipped, Some("not-annotated"));
        }
    }

    #[test]
    fn denied_queue_gets_no_route() {
        let p = pod(json!({"sluice.dev/inject": "true", "sluice.dev/queues": "orders,secret"}));
        let m = mutate(&p, "shop", &cfg(), &|q| {
            if q.queue == "secret" {
                Access::Denied
            } else {
                Access::Allowed
            }
        });
        let out = apply(&p, &m.patch);
        assert_eq!(
            out["spec"]["containers"][2]["env"][0]["value"],
            "orders=sluice-orders.shop.svc.cluster.local:7171"
        );
        assert_eq!(out["metadata"]["annotations"][DENIED_ANNOTATION], "secret");
        assert_eq!(m.warnings.len(), 1);
    }

    #[test]
    fn generated_certificate_loads() {
        let (ca, crt, key) = generate(
            &["sluice-webhook.sluice.svc".into(), "127.0.0.1".into()],
            Duration::from_secs(3600),
        )
        .unwrap();
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
        let r = CertResolver::default();
        assert!(r.load(&crt, &key).unwrap());
        assert!(!r.load(&crt, &key).unwrap());
        assert!(r.has_cert());
    }
}
