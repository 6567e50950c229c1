//! The admission server: AdmissionReviews in, AdmissionReviews out, routed by path,
//! served over TLS with the certificate of [`crate::tls::CertResolver`].
//!
//! `POST /mutate` injects the sidecar into pods ([`crate::inject`]); what needs the
//! API server (the Queues' access lists, the namespace's sidecar certificate) is
//! looked up here. `POST /validate-queue` refuses Queue updates that would strand
//! messages ([`crate::layout::check_update`]). Each handler is a function from an
//! [`AdmissionRequest`] of its kind to an [`AdmissionResponse`], wrapped by
//! [`review`].

use crate::crd::Queue;
use crate::inject::{self, Access, InjectConfig, Injection, Skip};
use crate::layout;
use crate::metrics::Metrics;
use crate::tls::{CertResolver, DataPlaneCerts, TlsError};
use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::Api;
use kube::core::DynamicObject;
use kube::core::admission::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, ConvertAdmissionReviewError,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::{debug, info, warn};

/// Path of the sidecar-injection (mutating) webhook; the chart's
/// MutatingWebhookConfiguration calls it.
pub const MUTATE_PATH: &str = "/mutate";
/// Path of the Queue-update (validating) webhook; the chart's
/// ValidatingWebhookConfiguration calls it.
pub const VALIDATE_QUEUE_PATH: &str = "/validate-queue";

/// What the handlers share.
pub struct Webhook {
    pub client: Client,
    pub cfg: InjectConfig,
    pub metrics: Arc<Metrics>,
    /// Issues the sidecars' client certificate of a namespace (with data-plane TLS).
    pub certs: Option<Arc<DataPlaneCerts>>,
}

pub fn router(w: Arc<Webhook>) -> Router {
    Router::new()
        .route(MUTATE_PATH, post(mutate))
        .route(VALIDATE_QUEUE_PATH, post(validate_queue))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(w)
}

type Review = axum::Json<Value>;

/// The review as JSON, its patch base64-encoded as the API documents for `[]byte`
/// (kube serializes the bytes as an array of numbers, which Go decoders accept too,
/// but no documented client sends).
fn to_json(review: &AdmissionReview<DynamicObject>) -> Value {
    let mut out = serde_json::to_value(review).expect("an AdmissionReview serializes");
    if let Some(patch) = review.response.as_ref().and_then(|r| r.patch.as_ref()) {
        out["response"]["patch"] =
            Value::String(base64::engine::general_purpose::STANDARD.encode(patch));
    }
    out
}

/// Reads an AdmissionReview of `T`s, answers it with `handle`. A review that cannot
/// be read is answered as invalid (with no uid, which the API server treats as a
/// failed call: `failurePolicy` decides).
pub async fn review<T, F, Fut>(metrics: &Metrics, body: &[u8], handle: F) -> Review
where
    T: kube::Resource + DeserializeOwned,
    F: FnOnce(AdmissionRequest<T>) -> Fut,
    Fut: Future<Output = AdmissionResponse>,
{
    let request = serde_json::from_slice::<AdmissionReview<T>>(body)
        .map_err(|e| e.to_string())
        .and_then(|r| -> Result<AdmissionRequest<T>, String> {
            r.try_into()
                .map_err(|e: ConvertAdmissionReviewError| e.to_string())
        });
    let response = match request {
        Ok(req) => handle(req).await,
        Err(e) => {
            metrics.webhook("error");
            warn!(error = %e, "unreadable AdmissionReview");
            AdmissionResponse::invalid(format!("sluice: unreadable review: {e}"))
        }
    };
    axum::Json(to_json(&response.into_review()))
}

async fn mutate(State(w): State<Arc<Webhook>>, body: axum::body::Bytes) -> Review {
    review(&w.metrics, &body, |req: AdmissionRequest<Pod>| {
        w.mutate_pod(req)
    })
    .await
}

async fn validate_queue(State(w): State<Arc<Webhook>>, body: axum::body::Bytes) -> Review {
    let metrics = w.metrics.clone();
    review(
        &w.metrics,
        &body,
        |req: AdmissionRequest<Queue>| async move {
            let response = queue_update_response(&req);
            metrics.webhook(if response.allowed {
                "queue_allowed"
            } else {
                "queue_refused"
            });
            response
        },
    )
    .await
}

/// Refuses an update of a Queue that would strand messages, saying why and what to
/// do instead (`kubectl apply` prints it). Anything else is admitted: creations,
/// and reviews without both objects.
pub fn queue_update_response(req: &AdmissionRequest<Queue>) -> AdmissionResponse {
    let response = AdmissionResponse::from(req);
    let (Some(old), Some(new)) = (req.old_object.as_ref(), req.object.as_ref()) else {
        return response;
    };
    let held = old.status.as_ref().and_then(|s| s.layout.as_ref());
    let refusals = layout::check_update(&old.spec, held, &new.spec);
    if refusals.is_empty() {
        return response;
    }
    info!(queue = %req.name, ns = ?req.namespace, "refused a Queue update that would strand messages");
    let mut denied = response.deny(format!("sluice: {}", layout::message(&refusals)));
    // 422 Unprocessable Entity: what the API server itself answers for a field it
    // does not accept (kubectl prints "is invalid").
    denied.result.code = 422;
    denied.result.reason = "Invalid".into();
    denied
}

/// The pod's namespace: the request's, else the object's, else `default`.
fn namespace(req: &AdmissionRequest<Pod>) -> String {
    req.namespace
        .clone()
        .or_else(|| req.object.as_ref()?.metadata.namespace.clone())
        .unwrap_or_else(|| "default".into())
}

/// The answer to a pod's review, given what the injector decided.
pub fn injection_response(req: &AdmissionRequest<Pod>, injection: Injection) -> AdmissionResponse {
    let mut response = AdmissionResponse::from(req);
    if !injection.warnings.is_empty() {
        response.warnings = Some(injection.warnings);
    }
    if injection.skipped.is_some() {
        return response;
    }
    match response.clone().with_patch(injection.patch) {
        Ok(patched) => patched,
        Err(e) => {
            // Cannot happen (the operations are JSON already); admit the pod as is.
            warn!(error = %e, "serializing the patch");
            response
        }
    }
}

impl Webhook {
    /// Injects the sidecar into a pod being created.
    async fn mutate_pod(&self, req: AdmissionRequest<Pod>) -> AdmissionResponse {
        let ns = namespace(&req);
        let Some(pod) = req.object.as_ref() else {
            self.metrics.webhook(Skip::NotAnnotated.label());
            return AdmissionResponse::from(&req);
        };
        let skip = inject::skip(pod);
        if skip == Some(Skip::NotAnnotated) {
            self.metrics.webhook(Skip::NotAnnotated.label());
            return AdmissionResponse::from(&req);
        }
        // The sidecar mounts the namespace's client certificate: make sure it exists
        // before the pod does. Refusing the pod (and letting its controller retry) is
        // better than creating one whose sidecar cannot start. A dry run changes
        // nothing (the configuration declares `sideEffects: NoneOnDryRun`): it shows
        // the injection without issuing the certificate.
        if req.dry_run {
            debug!(%ns, "dry run: the sidecars' certificate is not issued");
        } else if let Err(e) = self.sidecar_certificate(&ns).await {
            self.metrics.webhook("error");
            warn!(error = %e, %ns, "could not issue the sidecars' certificate");
            let mut denied = AdmissionResponse::from(&req).deny(format!(
                "sluice: could not issue the sidecar certificate for namespace {ns}: {e}"
            ));
            denied.result.code = 503;
            return denied;
        }
        let decisions = match skip {
            Some(_) => BTreeMap::new(),
            None => self.access_decisions(pod, &ns).await,
        };
        let injection = inject::inject(pod, &ns, &self.cfg, |q| {
            decisions
                .get(&(q.namespace.clone(), q.queue.clone()))
                .copied()
                .unwrap_or(Access::Unknown)
        });
        match injection.skipped {
            Some(why) => self.metrics.webhook(why.label()),
            None => {
                self.metrics.webhook("injected");
                let name = pod
                    .metadata
                    .name
                    .as_ref()
                    .or(pod.metadata.generate_name.as_ref());
                info!(pod = ?name, %ns, "injected sidecar");
            }
        }
        injection_response(&req, injection)
    }

    async fn sidecar_certificate(&self, ns: &str) -> Result<(), TlsError> {
        match &self.certs {
            Some(certs) if self.cfg.sidecar.tls => certs.sidecar_secret(ns).await.map(|_| ()),
            _ => Ok(()),
        }
    }

    /// Whether each Queue the pod names admits its ServiceAccount (one API lookup
    /// per queue; a Queue that cannot be read is routed anyway).
    async fn access_decisions(&self, pod: &Pod, ns: &str) -> BTreeMap<(String, String), Access> {
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .unwrap_or("default");
        let mut decisions = BTreeMap::new();
        for q in inject::queues(pod, ns) {
            let api: Api<Queue> = Api::namespaced(self.client.clone(), &q.namespace);
            let d = match api.get_opt(&q.queue).await {
                Ok(Some(queue)) => inject::access(&queue, &q.namespace, sa, ns),
                Ok(None) => Access::Unknown,
                Err(e) => {
                    warn!(error = %e, queue = %q.queue, "could not read Queue; routing anyway");
                    Access::Unknown
                }
            };
            decisions.insert((q.namespace, q.queue), d);
        }
        decisions
    }
}

/// Serves the admission router over TLS until the process ends.
pub async fn serve_tls(
    addr: SocketAddr,
    resolver: Arc<CertResolver>,
    app: Router,
) -> Result<(), TlsError> {
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
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let io = hyper_util::rt::TokioIo::new(tls);
            let svc = hyper_util::service::TowerToHyperService::new(app);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                debug!(%peer, error = %e, "webhook connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg() -> InjectConfig {
        InjectConfig {
            sidecar: crate::resources::test_sidecar_defaults(false),
            cluster_domain: "cluster.local".into(),
            native_sidecar: false,
        }
    }

    /// A review as the API server sends it for a pod's creation.
    fn review_body(annotations: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": "CREATE",
                "userInfo": {"username": "admin"},
                "object": {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"generateName": "app-", "annotations": annotations},
                    "spec": {"containers": [{"name": "app", "image": "app"}]}
                },
                "dryRun": false
            }
        }))
        .unwrap()
    }

    /// What the server would answer, with every queue allowed.
    async fn answer(body: &[u8]) -> Value {
        let metrics = Metrics::new();
        let axum::Json(out) = review(&metrics, body, |req: AdmissionRequest<Pod>| async move {
            let pod = req.object.clone().unwrap();
            let injection = inject::inject(&pod, &namespace(&req), &cfg(), |_| Access::Allowed);
            injection_response(&req, injection)
        })
        .await;
        out
    }

    #[tokio::test]
    async fn an_annotated_pod_is_answered_with_a_json_patch() {
        let out = answer(&review_body(
            json!({"sluice.dev/inject": "true", "sluice.dev/queues": "orders"}),
        ))
        .await;
        assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(out["kind"], "AdmissionReview");
        let r = &out["response"];
        assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(r["allowed"], true);
        assert_eq!(r["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().expect("patch as base64"))
            .unwrap();
        let ops: Vec<Value> = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(ops[0]["op"], "add");
        assert_eq!(ops[0]["path"], "/spec/containers/-");
        assert_eq!(ops[0]["value"]["name"], "sluice-sidecar");
        assert!(
            ops.iter()
                .any(|o| o["path"] == "/metadata/annotations/sluice.dev~1injected")
        );
    }

    #[tokio::test]
    async fn an_unannotated_pod_is_admitted_unchanged() {
        let out = answer(&review_body(json!({}))).await;
        let r = &out["response"];
        assert_eq!(r["allowed"], true);
        assert!(r.get("patch").is_none());
        assert!(r.get("patchType").is_none());
    }

    #[tokio::test]
    async fn an_unreadable_review_is_answered_as_invalid() {
        let out = answer(b"{not json").await;
        assert_eq!(out["response"]["allowed"], false);
        assert_eq!(out["response"]["uid"], "");
        assert!(
            out["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .contains("unreadable review")
        );
    }
}

#[cfg(test)]
mod queue_update_tests {
    use super::*;
    use serde_json::json;

    /// A review as the API server sends it for `kubectl apply` of a changed Queue.
    fn update(old_spec: Value, old_status: Value, new_spec: Value) -> Vec<u8> {
        let queue = |spec: Value, status: Value| {
            json!({
                "apiVersion": "sluice.dev/v1alpha1", "kind": "Queue",
                "metadata": {"name": "orders", "namespace": "shop"},
                "spec": spec, "status": status
            })
        };
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "e911857d-c318-11e8-bbad-025000000001",
                "kind": {"group": "sluice.dev", "version": "v1alpha1", "kind": "Queue"},
                "resource": {"group": "sluice.dev", "version": "v1alpha1", "resource": "queues"},
                "name": "orders",
                "namespace": "shop",
                "operation": "UPDATE",
                "userInfo": {"username": "admin"},
                "object": queue(new_spec, json!({})),
                "oldObject": queue(old_spec, old_status),
                "dryRun": false
            }
        }))
        .unwrap()
    }

    async fn answer(body: &[u8]) -> Value {
        let metrics = Metrics::new();
        let axum::Json(out) = review(&metrics, body, |req: AdmissionRequest<Queue>| async move {
            queue_update_response(&req)
        })
        .await;
        out["response"].clone()
    }

    #[tokio::test]
    async fn a_scale_that_moves_partitions_is_denied_with_the_reason() {
        // A Queue made before Raft groups: its single copies cannot move.
        let plain = json!({"layout": {"partitions": 6, "brokers": 2, "storage": {"size": "1Gi"}}});
        let r = answer(&update(
            json!({"replicas": 2, "partitions": 6}),
            plain.clone(),
            json!({"replicas": 3, "partitions": 6}),
        ))
        .await;
        assert_eq!(r["uid"], "e911857d-c318-11e8-bbad-025000000001");
        assert_eq!(r["allowed"], false);
        assert_eq!(r["status"]["code"], 422);
        let msg = r["status"]["message"].as_str().unwrap();
        assert!(
            msg.starts_with("sluice: spec.replicas cannot change from 2 to 3"),
            "{msg}"
        );
        assert!(msg.contains("create a new Queue"), "{msg}");
        // Raft groups (every Queue made since, and one without a status yet): moved.
        let mut raft = plain;
        raft["layout"]["raft"] = json!(true);
        for status in [raft, json!({})] {
            let r = answer(&update(
                json!({"replicas": 2, "partitions": 6}),
                status,
                json!({"replicas": 3, "partitions": 6}),
            ))
            .await;
            assert_eq!(r["allowed"], true, "{r}");
        }
    }

    #[tokio::test]
    async fn the_recorded_layout_is_what_an_update_is_checked_against() {
        // The old spec already asked for 3 replicas (refused by the reconciler while
        // the webhook was away); the volumes hold 8 partitions over 2 brokers.
        let held = json!({"layout": {"partitions": 8, "brokers": 2, "storage": {"size": "1Gi"}}});
        let back = answer(&update(
            json!({"replicas": 3, "partitions": 8}),
            held.clone(),
            json!({"replicas": 2, "partitions": 8}),
        ))
        .await;
        assert_eq!(back["allowed"], true, "{back}");
        let fewer = answer(&update(
            json!({"replicas": 2, "partitions": 8}),
            held,
            json!({"replicas": 2, "partitions": 7}),
        ))
        .await;
        assert_eq!(fewer["allowed"], false);
        assert!(
            fewer["status"]["message"]
                .as_str()
                .unwrap()
                .contains("spec.partitions cannot go down from 8 to 7")
        );
    }

    #[tokio::test]
    async fn growing_partitions_volumes_and_other_settings_are_admitted() {
        // (Whether the volumes' StorageClass can grow them is the reconciler's to
        // find out: it says so in Degraded.)
        let r = answer(&update(
            json!({"replicas": 2, "partitions": 6}),
            json!({}),
            json!({"replicas": 2, "partitions": 8, "delivery": {"visibilityTimeout": "45s"},
                   "storage": {"size": "2Gi"}}),
        ))
        .await;
        assert_eq!(r["allowed"], true, "{r}");
        assert!(r.get("patch").is_none());
    }
}
