//! Sidecar injection, pure: a typed Pod in, a JSON patch out, no I/O.
//!
//! A pod annotated `sluice.dev/inject: "true"` gets the `sluice-sidecar` container
//! (built in [`crate::resources::sidecar_container`], beside the broker's), routes
//! to the brokers of the queues named in `sluice.dev/queues`, one token per route,
//! and `SLUICE_ADDR` in its other containers. Injecting twice is a no-op. A pod
//! opts out with `sluice.dev/inject: "false"` (namespaces with the label
//! `sluice.dev/injection: disabled`, through the chart's namespaceSelector).
//!
//! What needs the API server (whether a Queue admits the pod's ServiceAccount, the
//! namespace's client certificate) is decided by the caller:
//! [`crate::admission`].

use crate::crd::Queue;
use crate::resources::{self, QueueToken, SIDECAR_GRPC_PORT, SIDECAR_NAME, SidecarDefaults};
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{EnvVar, Pod, Probe};
use serde::Serialize;

pub const INJECT_ANNOTATION: &str = "sluice.dev/inject";
pub const QUEUES_ANNOTATION: &str = "sluice.dev/queues";
pub const INJECTED_ANNOTATION: &str = "sluice.dev/injected";
pub const DENIED_ANNOTATION: &str = "sluice.dev/denied-queues";
/// `"true"`: the sidecar is ready only while every queue has a broker that answers.
pub const READY_REQUIRES_BROKERS_ANNOTATION: &str = "sluice.dev/ready-requires-brokers";
/// What the app's containers are given to find the sidecar.
pub const ADDR_ENV: &str = "SLUICE_ADDR";

/// What the webhook injects.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    pub sidecar: SidecarDefaults,
    pub cluster_domain: String,
    /// Inject a native sidecar: the first init container, `restartPolicy: Always`
    /// (Kubernetes 1.29 on, [`native_sidecars_served`]). The kubelet then starts it
    /// before the app (once its startup probe passes) and stops it after the app's
    /// containers, so the app has the queue for all of its own shutdown. Otherwise
    /// the sidecar is the pod's last container and drains for
    /// [`drain_seconds`] after SIGTERM while the app shuts down beside it.
    pub native_sidecar: bool,
}

/// Whether an API server of this version runs native sidecars: init containers with
/// `restartPolicy: Always`, on by default from 1.29 (beta; GA in 1.33). `minor` as
/// `/version` reports it (providers add a `+`).
pub fn native_sidecars_served(major: &str, minor: &str) -> bool {
    let n = |s: &str| s.trim_end_matches('+').parse::<u32>().unwrap_or(0);
    (n(major), n(minor)) >= (1, 29)
}

/// Access decision for one queue named by a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The Queue does not exist (yet): route anyway, the sidecar reports it unready.
    Unknown,
    Allowed,
    Denied,
}

/// Whether `queue` (in `queue_ns`) admits pods of ServiceAccount `sa` in `pod_ns`:
/// an empty access list admits everyone; an entry without a namespace means the
/// Queue's own.
pub fn access(queue: &Queue, queue_ns: &str, sa: &str, pod_ns: &str) -> Access {
    let list = &queue.spec.access.service_accounts;
    let listed = list
        .iter()
        .any(|r| r.name == sa && r.namespace.as_deref().unwrap_or(queue_ns) == pod_ns);
    if list.is_empty() || listed {
        Access::Allowed
    } else {
        Access::Denied
    }
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

/// Why a pod is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// No `sluice.dev/inject: "true"`.
    NotAnnotated,
    /// It has the sidecar already.
    AlreadyInjected,
}

impl Skip {
    /// The `result` label of the webhook request counter.
    pub fn label(self) -> &'static str {
        match self {
            Skip::NotAnnotated => "not-annotated",
            Skip::AlreadyInjected => "already-injected",
        }
    }
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// Whether (and why not) the pod gets a sidecar.
pub fn skip(pod: &Pod) -> Option<Skip> {
    if annotation(pod, INJECT_ANNOTATION) != Some("true") {
        return Some(Skip::NotAnnotated);
    }
    let spec = pod.spec.as_ref();
    let containers = spec.map(|s| s.containers.iter()).into_iter().flatten();
    let inits = spec
        .and_then(|s| s.init_containers.as_ref())
        .into_iter()
        .flatten();
    if containers.chain(inits).any(|c| c.name == SIDECAR_NAME) {
        return Some(Skip::AlreadyInjected);
    }
    None
}

/// The queues a pod names (whatever its inject annotation says).
pub fn queues(pod: &Pod, pod_ns: &str) -> Vec<QueueRef> {
    parse_queues(annotation(pod, QUEUES_ANNOTATION).unwrap_or(""), pod_ns)
}

/// Outcome of looking at one pod.
#[derive(Debug, Default)]
pub struct Injection {
    /// Empty when skipped.
    pub patch: Patch,
    /// For the API client (denied or missing queues).
    pub warnings: Vec<String>,
    pub skipped: Option<Skip>,
}

fn add(path: &[&str], value: impl Serialize) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(path.iter().copied()),
        value: serde_json::to_value(value).expect("Kubernetes types serialize"),
    })
}

/// The JSON patch that injects the sidecar into `pod` (created in `pod_ns`);
/// `access` decides each named queue.
pub fn inject(
    pod: &Pod,
    pod_ns: &str,
    cfg: &InjectConfig,
    access: impl Fn(&QueueRef) -> Access,
) -> Injection {
    if let Some(why) = skip(pod) {
        return Injection {
            skipped: Some(why),
            ..Default::default()
        };
    }
    let mut routes = Vec::new();
    let mut tokens = Vec::new();
    let mut denied = Vec::new();
    let mut warnings = Vec::new();
    for q in queues(pod, pod_ns) {
        match access(&q) {
            Access::Denied => {
                warnings.push(format!(
                    "sluice: queue {}/{} does not allow this pod's ServiceAccount; no route injected",
                    q.namespace, q.queue
                ));
                denied.push(q.route);
            }
            a => {
                if a == Access::Unknown {
                    warnings.push(format!(
                        "sluice: queue {}/{} does not exist yet; calls for it answer UNAVAILABLE until it does",
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
                tokens.push(QueueToken {
                    audience: sluice_config::token_audience(&q.namespace, &q.queue),
                    path: q.route,
                });
            }
        }
    }

    let spec = pod.spec.as_ref();
    let containers = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    let mut sidecar = resources::sidecar_container(&cfg.sidecar, &routes);
    let grace = spec.and_then(|s| s.termination_grace_period_seconds);
    let env = sidecar.env.get_or_insert_with(Vec::new);
    env.push(EnvVar {
        name: "SLUICE_DRAIN_SECONDS".into(),
        value: Some(drain_seconds(grace).to_string()),
        ..Default::default()
    });
    if annotation(pod, READY_REQUIRES_BROKERS_ANNOTATION) == Some("true") {
        env.push(EnvVar {
            name: "SLUICE_READINESS".into(),
            value: Some("brokers".into()),
            ..Default::default()
        });
    }
    let mut ops = Vec::new();
    if cfg.native_sidecar {
        sidecar.restart_policy = Some("Always".into());
        // The app's containers start once the sidecar serves (not once its brokers
        // answer: that is readiness).
        sidecar.startup_probe = sidecar.liveness_probe.clone().map(|p| Probe {
            period_seconds: Some(1),
            failure_threshold: Some(60),
            ..p
        });
        // First, so the app's own init containers have the queue too.
        match spec.and_then(|s| s.init_containers.as_ref()) {
            Some(_) => ops.push(add(&["spec", "initContainers", "0"], sidecar)),
            None => ops.push(add(&["spec", "initContainers"], [sidecar])),
        }
    } else {
        ops.push(add(&["spec", "containers", "-"], sidecar));
    }
    let volumes = resources::sidecar_volumes(&cfg.sidecar, &tokens);
    if spec.and_then(|s| s.volumes.as_ref()).is_some() {
        ops.extend(volumes.iter().map(|v| add(&["spec", "volumes", "-"], v)));
    } else {
        ops.push(add(&["spec", "volumes"], &volumes));
    }
    let addr = EnvVar {
        name: ADDR_ENV.into(),
        value: Some(format!("127.0.0.1:{SIDECAR_GRPC_PORT}")),
        ..Default::default()
    };
    for (i, c) in containers.iter().enumerate() {
        let i = i.to_string();
        match &c.env {
            None => ops.push(add(&["spec", "containers", i.as_str(), "env"], [&addr])),
            Some(env) if !env.iter().any(|e| e.name == ADDR_ENV) => {
                ops.push(add(&["spec", "containers", i.as_str(), "env", "-"], &addr))
            }
            Some(_) => {}
        }
    }
    // The inject annotation is there, so the annotations map is.
    ops.push(add(
        &["metadata", "annotations", INJECTED_ANNOTATION],
        "true",
    ));
    if !denied.is_empty() {
        ops.push(add(
            &["metadata", "annotations", DENIED_ANNOTATION],
            denied.join(","),
        ));
    }
    Injection {
        patch: Patch(ops),
        warnings,
        skipped: None,
    }
}

/// How long the injected sidecar drains on shutdown (no new deliveries, settles
/// still taken): 5 s, ending a second before the kubelet's SIGKILL at the pod's
/// grace period (30 s unless the pod sets it), so that it always exits on its own.
pub fn drain_seconds(grace: Option<i64>) -> i64 {
    (grace.unwrap_or(30) - 1).clamp(0, 5)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::QueueSpec;
    use crate::resources::{SIDECAR_TLS_VOLUME, TLS_DIR, TOKEN_DIR, TOKEN_VOLUME};
    use k8s_openapi::api::core::v1::Container;
    use serde_json::{Value, json};

    fn cfg(tls: bool) -> InjectConfig {
        InjectConfig {
            sidecar: crate::resources::test_sidecar_defaults(tls),
            cluster_domain: "cluster.local".into(),
            native_sidecar: false,
        }
    }

    fn pod(ann: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "app", "annotations": ann},
            "spec": {"containers": [
                {"name": "app", "image": "app"},
                {"name": "b", "image": "b", "env": [{"name": "X", "value": "1"}]},
            ]}
        }))
        .unwrap()
    }

    fn annotated(queues: &str) -> Pod {
        pod(json!({"sluice.dev/inject": "true", "sluice.dev/queues": queues}))
    }

    /// Applies the patch as the API server does (RFC 6902), back to a typed Pod.
    fn apply(pod: &Pod, patch: &Patch) -> Pod {
        let mut doc = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut doc, patch).expect("the patch applies");
        serde_json::from_value(doc).unwrap()
    }

    fn containers(pod: &Pod) -> &[Container] {
        &pod.spec.as_ref().unwrap().containers
    }

    fn env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
        c.env
            .as_ref()?
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.as_deref())
    }

    fn allowed(_: &QueueRef) -> Access {
        Access::Allowed
    }

    #[test]
    fn readiness_follows_the_brokers_only_when_the_pod_asks() {
        let readiness = |p: &Pod| {
            let out = apply(p, &inject(p, "shop", &cfg(false), allowed).patch);
            let side = containers(&out).last().unwrap().clone();
            env(&side, "SLUICE_READINESS").map(str::to_string)
        };
        let mut p = annotated("orders");
        assert_eq!(
            readiness(&p),
            None,
            "the sidecar's own readiness by default"
        );
        p.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(READY_REQUIRES_BROKERS_ANNOTATION.into(), "true".into());
        assert_eq!(readiness(&p).as_deref(), Some("brokers"));
    }

    #[test]
    fn the_sidecar_drains_within_the_pods_grace_period() {
        let drain_of = |grace: Option<i64>| {
            let mut p = annotated("orders");
            p.spec.as_mut().unwrap().termination_grace_period_seconds = grace;
            let out = apply(&p, &inject(&p, "shop", &cfg(false), allowed).patch);
            let side = containers(&out).last().unwrap().clone();
            env(&side, "SLUICE_DRAIN_SECONDS").map(str::to_string)
        };
        assert_eq!(drain_of(None).as_deref(), Some("5"), "30 s by default");
        assert_eq!(drain_of(Some(5)).as_deref(), Some("4"));
        assert_eq!(drain_of(Some(0)).as_deref(), Some("0"));
    }

    #[test]
    fn annotated_pod_gets_the_sidecar_routes_tokens_and_env() {
        let p = annotated("orders, billing/invoices,orders.dlq");
        let m = inject(&p, "shop", &cfg(true), allowed);
        assert_eq!(m.skipped, None);
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        let out = apply(&p, &m.patch);
        let cs = containers(&out);
        let names: Vec<&str> = cs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["app", "b", SIDECAR_NAME]);
        let side = &cs[2];
        assert_eq!(side.image.as_deref(), Some("sluice-sidecar:test"));
        assert_eq!(
            env(side, "SLUICE_ROUTES"),
            Some(
                "orders=sluice-orders.shop.svc.cluster.local:7171;invoices=sluice-invoices.billing.svc.cluster.local:7171;orders.dlq=sluice-orders.shop.svc.cluster.local:7171"
            )
        );
        assert_eq!(env(side, "SLUICE_TOKEN_DIR"), Some(TOKEN_DIR));
        assert!(env(side, "SLUICE_TLS_CA").is_some());
        // Every other container finds the sidecar; existing env is kept.
        assert_eq!(env(&cs[0], ADDR_ENV), Some("127.0.0.1:7070"));
        assert_eq!(env(&cs[1], "X"), Some("1"));
        assert_eq!(env(&cs[1], ADDR_ENV), Some("127.0.0.1:7070"));
        assert!(cs[0].volume_mounts.is_none(), "tokens for the sidecar only");
        let ann = out.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann[INJECTED_ANNOTATION], "true");
        assert!(!ann.contains_key(DENIED_ANNOTATION));

        // One projected token per route, for that queue's audience.
        let volumes = out.spec.as_ref().unwrap().volumes.as_ref().unwrap();
        assert_eq!(volumes[0].name, TOKEN_VOLUME);
        let tokens: Vec<(&str, &str)> = volumes[0]
            .projected
            .as_ref()
            .unwrap()
            .sources
            .as_ref()
            .unwrap()
            .iter()
            .map(|s| {
                let t = s.service_account_token.as_ref().unwrap();
                (t.audience.as_deref().unwrap(), t.path.as_str())
            })
            .collect();
        assert_eq!(
            tokens,
            [
                ("sluice.dev/shop/orders", "orders"),
                ("sluice.dev/billing/invoices", "invoices"),
                ("sluice.dev/shop/orders", "orders.dlq"),
            ]
        );
        // The namespace's client certificate, mounted in the sidecar.
        assert_eq!(volumes[1].name, SIDECAR_TLS_VOLUME);
        assert_eq!(
            volumes[1].secret.as_ref().unwrap().secret_name.as_deref(),
            Some(crate::tls::SIDECAR_SECRET)
        );
        let mounts = side.volume_mounts.as_ref().unwrap();
        assert_eq!(mounts[0].mount_path, TOKEN_DIR);
        assert_eq!(mounts[1].mount_path, TLS_DIR);
    }

    /// An app pod that passes Pod Security `restricted` still does with the sidecar
    /// (its tokens and certificate volumes included); one that does not is not made
    /// worse by the sidecar's container.
    #[test]
    fn the_sidecar_keeps_a_restricted_pod_restricted() {
        use crate::pod_security::restricted_violations;
        let mut p = annotated("orders");
        let spec = p.spec.as_mut().unwrap();
        spec.security_context = Some(
            serde_json::from_value(serde_json::json!({
                "runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}
            }))
            .unwrap(),
        );
        for c in &mut spec.containers {
            c.security_context = Some(
                serde_json::from_value(serde_json::json!({
                    "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}
                }))
                .unwrap(),
            );
        }
        assert_eq!(
            restricted_violations(p.spec.as_ref().unwrap()),
            Vec::<String>::new()
        );
        // As the pod's last container and as a native sidecar alike.
        for native_sidecar in [false, true] {
            let cfg = InjectConfig {
                native_sidecar,
                ..cfg(true)
            };
            let out = apply(&p, &inject(&p, "shop", &cfg, allowed).patch);
            assert_eq!(
                restricted_violations(out.spec.as_ref().unwrap()),
                Vec::<String>::new()
            );
            // On an app pod that sets nothing, only the app's containers break the rules.
            let bare = annotated("orders");
            let out = apply(&bare, &inject(&bare, "shop", &cfg, allowed).patch);
            let broken = restricted_violations(out.spec.as_ref().unwrap());
            assert!(!broken.is_empty());
            assert!(
                broken.iter().all(|v| !v.contains(SIDECAR_NAME)),
                "{broken:?}"
            );
        }
    }

    #[test]
    fn native_sidecars_from_kubernetes_1_29() {
        assert!(!native_sidecars_served("1", "20"));
        assert!(!native_sidecars_served("1", "28+"));
        assert!(native_sidecars_served("1", "29"));
        assert!(native_sidecars_served("1", "33+"));
        assert!(!native_sidecars_served("", ""));
    }

    /// Where the cluster runs native sidecars, the sidecar is the first init
    /// container with restartPolicy Always and a startup probe: started before the
    /// app's init containers and containers, stopped after them.
    #[test]
    fn a_native_sidecar_is_the_first_init_container_and_restarts_always() {
        let native = InjectConfig {
            native_sidecar: true,
            ..cfg(true)
        };
        let mut pod = annotated("orders");
        let out = apply(&pod, &inject(&pod, "shop", &native, allowed).patch);
        let spec = out.spec.as_ref().unwrap();
        let inits = spec.init_containers.as_ref().unwrap();
        assert_eq!(inits.len(), 1);
        let side = &inits[0];
        assert_eq!(side.name, SIDECAR_NAME);
        assert_eq!(side.restart_policy.as_deref(), Some("Always"));
        let startup = side.startup_probe.as_ref().expect("a startup probe");
        let path = startup.http_get.as_ref().and_then(|h| h.path.as_deref());
        assert_eq!(
            path,
            Some("/healthz"),
            "started once it serves, brokers or not"
        );
        assert!(side.readiness_probe.is_some());
        assert!(
            containers(&out).iter().all(|c| c.name != SIDECAR_NAME),
            "not also a container"
        );
        assert_eq!(
            env(&containers(&out)[0], ADDR_ENV),
            Some(format!("127.0.0.1:{SIDECAR_GRPC_PORT}").as_str())
        );
        // The app's own init containers come after it; injecting again changes nothing.
        pod.spec.as_mut().unwrap().init_containers = Some(vec![Container {
            name: "migrate".into(),
            image: Some("app".into()),
            ..Default::default()
        }]);
        let out = apply(&pod, &inject(&pod, "shop", &native, allowed).patch);
        let names: Vec<&str> = out
            .spec
            .as_ref()
            .unwrap()
            .init_containers
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, [SIDECAR_NAME, "migrate"]);
        assert_eq!(skip(&out), Some(Skip::AlreadyInjected));
    }

    #[test]
    fn injecting_an_injected_pod_is_a_no_op() {
        let p = annotated("orders");
        let once = apply(&p, &inject(&p, "shop", &cfg(true), allowed).patch);
        let again = inject(&once, "shop", &cfg(true), allowed);
        assert_eq!(again.skipped, Some(Skip::AlreadyInjected));
        assert!(again.patch.0.is_empty());
        assert!(again.warnings.is_empty());
    }

    #[test]
    fn unannotated_and_opted_out_pods_are_untouched() {
        for ann in [json!({}), json!({"sluice.dev/inject": "false"})] {
            let m = inject(&pod(ann), "shop", &cfg(true), allowed);
            assert_eq!(m.skipped, Some(Skip::NotAnnotated));
            assert!(m.patch.0.is_empty());
        }
        let bare: Pod = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
        assert_eq!(skip(&bare), Some(Skip::NotAnnotated));
    }

    #[test]
    fn denied_queue_gets_no_route_and_is_named() {
        let p = annotated("orders,secret");
        let m = inject(&p, "shop", &cfg(true), |q| {
            if q.queue == "secret" {
                Access::Denied
            } else {
                Access::Allowed
            }
        });
        let out = apply(&p, &m.patch);
        let side = &containers(&out)[2];
        assert_eq!(
            env(side, "SLUICE_ROUTES"),
            Some("orders=sluice-orders.shop.svc.cluster.local:7171")
        );
        let sources = out.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0]
            .projected
            .as_ref()
            .unwrap()
            .sources
            .clone()
            .unwrap();
        assert_eq!(sources.len(), 1, "no token for a denied queue");
        assert_eq!(
            out.metadata.annotations.as_ref().unwrap()[DENIED_ANNOTATION],
            "secret"
        );
        assert_eq!(m.warnings.len(), 1);
        assert!(m.warnings[0].contains("shop/secret"), "{:?}", m.warnings);
    }

    #[test]
    fn a_missing_queue_is_routed_with_a_warning() {
        let p = annotated("later");
        let m = inject(&p, "shop", &cfg(true), |_| Access::Unknown);
        let out = apply(&p, &m.patch);
        assert_eq!(
            env(&containers(&out)[2], "SLUICE_ROUTES"),
            Some("later=sluice-later.shop.svc.cluster.local:7171")
        );
        assert_eq!(m.warnings.len(), 1);
        assert!(m.warnings[0].contains("does not exist yet"));
    }

    #[test]
    fn existing_volumes_and_addr_are_kept() {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "app", "annotations": {"sluice.dev/inject": "true", "sluice.dev/queues": "orders"}},
            "spec": {
                "containers": [{"name": "app", "image": "app", "env": [{"name": "SLUICE_ADDR", "value": "elsewhere:1"}]}],
                "volumes": [{"name": "data", "emptyDir": {}}]
            }
        }))
        .unwrap();
        let out = apply(&p, &inject(&p, "shop", &cfg(false), allowed).patch);
        let volumes: Vec<&str> = out
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(
            volumes,
            ["data", TOKEN_VOLUME],
            "no certificate without TLS"
        );
        let app = &containers(&out)[0];
        assert_eq!(app.env.as_ref().unwrap().len(), 1);
        assert_eq!(env(app, ADDR_ENV), Some("elsewhere:1"));
        assert!(env(&containers(&out)[1], "SLUICE_TLS_CA").is_none());
    }

    #[test]
    fn queue_names_and_access_lists() {
        assert_eq!(
            parse_queues("orders, billing/invoices\norders.dlq", "shop"),
            [
                QueueRef {
                    route: "orders".into(),
                    namespace: "shop".into(),
                    queue: "orders".into()
                },
                QueueRef {
                    route: "invoices".into(),
                    namespace: "billing".into(),
                    queue: "invoices".into()
                },
                QueueRef {
                    route: "orders.dlq".into(),
                    namespace: "shop".into(),
                    queue: "orders".into()
                },
            ]
        );
        let queue = |spec: &str| Queue::new("q", serde_yaml::from_str::<QueueSpec>(spec).unwrap());
        let open = queue("{}");
        assert_eq!(
            access(&open, "shop", "anyone", "elsewhere"),
            Access::Allowed
        );
        let listed = queue(
            "{access: {serviceAccounts: [{name: mailer}, {name: billing, namespace: finance}]}}",
        );
        assert_eq!(access(&listed, "shop", "mailer", "shop"), Access::Allowed);
        assert_eq!(access(&listed, "shop", "mailer", "other"), Access::Denied);
        assert_eq!(
            access(&listed, "shop", "billing", "finance"),
            Access::Allowed
        );
        assert_eq!(access(&listed, "shop", "default", "shop"), Access::Denied);
    }
}
