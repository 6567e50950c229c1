//! The objects a Queue owns, built from its spec. Pure functions: unit-testable
//! without an API server.

use crate::crd::Queue;
use crate::layout::Layout;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar,
    EnvVarSource, HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
    SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeProjection,
    VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::api::core::v1::{
    SecretVolumeSource, ServiceAccount, ServiceAccountTokenProjection,
};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use kube::ResourceExt;
use serde_json::{Value, json};
use std::collections::BTreeMap;

pub const GRPC_PORT: i32 = 7171;
pub const METRICS_PORT: i32 = 9090;
pub const CONFIG_KEY: &str = "broker.toml";
pub const HASH_ANNOTATION: &str = "sluice.dev/config-hash";
pub const QUEUE_LABEL: &str = "sluice.dev/queue";
/// On the StatefulSet: the layout its volumes are made for ([`Layout`] as JSON),
/// written in the same apply as the StatefulSet, so the guard reads it even when
/// the Queue it is given (from the watch cache) does not show `status.layout` yet.
pub const LAYOUT_ANNOTATION: &str = "sluice.dev/layout";

/// The container the webhook injects into app pods, and what it listens on.
pub const SIDECAR_NAME: &str = "sluice-sidecar";
pub const SIDECAR_GRPC_PORT: i32 = 7070;
pub const SIDECAR_METRICS_PORT: i32 = 9191;
/// Where the sidecar finds its per-queue ServiceAccount tokens.
pub const TOKEN_DIR: &str = "/var/run/secrets/sluice.dev/tokens";
/// The sidecar's volumes in an app pod: its tokens, and (with data-plane TLS) the
/// namespace's client certificate.
pub const TOKEN_VOLUME: &str = "sluice-tokens";
pub const SIDECAR_TLS_VOLUME: &str = "sluice-tls";
/// Lifetime asked of the projected tokens; the kubelet renews them at 80 %.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;

/// Names of the owned objects.
pub fn sts_name(queue: &str) -> String {
    format!("sluice-{queue}")
}
pub fn svc_name(queue: &str) -> String {
    sts_name(queue)
}
/// The ConfigMap of one version of the settings, named by their hash: a pod template
/// names exactly the settings it was rolled out with, so a broker that restarts in
/// the middle of a rollout reads its own version, never a newer one.
pub fn cm_name(queue: &str, hash: &str) -> String {
    format!("{}-{hash}", cm_prefix(queue))
}
/// What the names of a queue's settings ConfigMaps start with (the prefix alone was
/// the name of the single ConfigMap of operators before the hashed names).
pub fn cm_prefix(queue: &str) -> String {
    format!("sluice-{queue}-config")
}
pub fn pdb_name(queue: &str) -> String {
    sts_name(queue)
}
/// ServiceAccount of the brokers of a Queue with an access list: their token lets
/// them ask the API server about the tokens callers present (TokenReview).
pub fn broker_sa_name(queue: &str) -> String {
    format!("sluice-{queue}-broker")
}
/// Secret of the brokers' serving certificate.
pub fn tls_secret_name(queue: &str) -> String {
    format!("sluice-{queue}-tls")
}
/// Where the brokers and sidecars find their certificate, key and CA.
pub const TLS_DIR: &str = "/etc/sluice-tls";
pub const TLS_HASH_ANNOTATION: &str = "sluice.dev/tls-hash";
/// Address the sidecar routes to.
pub fn address(queue: &str, ns: &str, cluster_domain: &str) -> String {
    format!("{}.{ns}.svc.{cluster_domain}:{GRPC_PORT}", svc_name(queue))
}

/// Address of broker `ordinal` of a queue for the other brokers (replication): the
/// pod's own name under the headless Service, found through the pod's DNS search
/// path (`<ns>.svc` is enough; the cluster domain is not needed).
pub fn peer_address(queue: &str, ns: &str, ordinal: u32) -> String {
    format!(
        "{}-{ordinal}.{}.{ns}.svc:{GRPC_PORT}",
        sts_name(queue),
        svc_name(queue)
    )
}

/// Selector labels of a queue's broker pods.
/// The storage a volume claim (or a StatefulSet's claim template) asks for.
pub fn requested_size(claim: &PersistentVolumeClaim) -> Option<String> {
    claim
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
        .map(|q| q.0.clone())
}

/// The label selector of everything a Queue owns (pods, volume claims, settings).
pub fn queue_selector(queue: &str) -> String {
    format!("{QUEUE_LABEL}={queue}")
}

pub fn selector_labels(queue: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "sluice-broker".into()),
        ("app.kubernetes.io/instance".into(), queue.into()),
        (QUEUE_LABEL.into(), queue.into()),
    ])
}

/// Labels on every owned object.
pub fn labels(queue: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(queue);
    l.insert("app.kubernetes.io/component".into(), "broker".into());
    l.insert("app.kubernetes.io/part-of".into(), "sluice".into());
    l.insert(
        "app.kubernetes.io/managed-by".into(),
        "sluice-operator".into(),
    );
    l
}

/// Operator-wide defaults for what a Queue does not say.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub broker_image: String,
    pub image_pull_policy: String,
    pub cluster_domain: String,
    /// ClusterRoleBinding (to `system:auth-delegator`) that the brokers of Queues
    /// with an access list are added to; the chart creates it.
    pub token_review_binding: Option<String>,
    /// OTLP collector the brokers send their spans to (off when `None`).
    pub otlp_endpoint: Option<String>,
}

fn meta(q: &Queue, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: q.namespace(),
        labels: Some(labels(&q.name_any())),
        owner_references: Some(vec![owner(q)]),
        ..Default::default()
    }
}

pub fn owner(q: &Queue) -> OwnerReference {
    q.controller_owner_ref(&()).expect("Queue has a uid")
}

pub fn service_account(q: &Queue) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(q, broker_sa_name(&q.name_any())),
        automount_service_account_token: Some(true),
        ..Default::default()
    }
}

/// The binding with the brokers' ServiceAccount among its subjects, or None when
/// it is there already.
pub fn with_broker_subject(
    mut binding: ClusterRoleBinding,
    queue: &str,
    ns: &str,
) -> Option<ClusterRoleBinding> {
    let sa = broker_sa_name(queue);
    let subjects = binding.subjects.get_or_insert_with(Vec::new);
    if subjects
        .iter()
        .any(|s| s.kind == "ServiceAccount" && s.name == sa && s.namespace.as_deref() == Some(ns))
    {
        return None;
    }
    subjects.push(Subject {
        kind: "ServiceAccount".into(),
        name: sa,
        namespace: Some(ns.into()),
        api_group: None,
    });
    Some(binding)
}

/// The metadata of an object owned by the Queue (for objects built elsewhere).
pub fn owned_meta(q: &Queue, name: String) -> ObjectMeta {
    meta(q, name)
}

/// The environment that points a broker or sidecar at the certificate files in
/// [`TLS_DIR`].
pub fn tls_env() -> Vec<EnvVar> {
    [
        ("SLUICE_TLS_CERT", "tls.crt"),
        ("SLUICE_TLS_KEY", "tls.key"),
        ("SLUICE_TLS_CA", "ca.crt"),
    ]
    .into_iter()
    .map(|(name, file)| EnvVar {
        name: name.into(),
        value: Some(format!("{TLS_DIR}/{file}")),
        ..Default::default()
    })
    .collect()
}

/// Mounts the certificate files of `volume` at [`TLS_DIR`], read-only.
fn tls_mount(volume: &str) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: TLS_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

/// Serves the brokers over mutual TLS with the Queue's certificate Secret;
/// `fingerprint` (of the certificate) rolls them when it is issued again.
pub fn with_tls(sts: &mut StatefulSet, queue: &str, fingerprint: &str) {
    let template = &mut sts.spec.as_mut().expect("built with a spec").template;
    template
        .metadata
        .get_or_insert_with(Default::default)
        .annotations
        .get_or_insert_with(Default::default)
        .insert(TLS_HASH_ANNOTATION.into(), fingerprint.into());
    let pod = template.spec.as_mut().expect("built with a pod spec");
    pod.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: "tls".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(tls_secret_name(queue)),
            default_mode: Some(0o440),
            ..Default::default()
        }),
        ..Default::default()
    });
    let c = &mut pod.containers[0];
    c.env.get_or_insert_with(Vec::new).extend(tls_env());
    c.volume_mounts
        .get_or_insert_with(Vec::new)
        .push(tls_mount("tls"));
}

/// One version of the settings: immutable (its name is its content's hash), kept
/// until no broker runs it.
pub fn config_map(q: &Queue, toml: &str, hash: &str) -> ConfigMap {
    let mut metadata = meta(q, cm_name(&q.name_any(), hash));
    metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(HASH_ANNOTATION.into(), hash.into());
    ConfigMap {
        metadata,
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), toml.to_string())])),
        immutable: Some(true),
        ..Default::default()
    }
}

pub fn service(q: &Queue) -> Service {
    let name = q.name_any();
    Service {
        metadata: meta(q, svc_name(&name)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector_labels(&name)),
            publish_not_ready_addresses: Some(false),
            ports: Some(vec![
                ServicePort {
                    name: Some("grpc".into()),
                    port: GRPC_PORT,
                    target_port: Some(IntOrString::String("grpc".into())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("metrics".into()),
                    port: METRICS_PORT,
                    target_port: Some(IntOrString::String("metrics".into())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An HTTP probe of `path` on `port` (a number or a container port's name).
fn http_probe(path: &str, port: IntOrString, period: i32, failure: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port,
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

fn default_affinity(queue: &str) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        topology_key: "kubernetes.io/hostname".into(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(selector_labels(queue)),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The broker StatefulSet of `q` as carried out (refused changes held back, see
/// [`crate::layout::plan`]); `hash` rolls the pods when the settings change.
/// `layout`: what the volumes hold once it is applied, recorded on it for the guard.
pub fn stateful_set(q: &Queue, d: &Defaults, hash: &str, layout: &Layout) -> StatefulSet {
    let name = q.name_any();
    let t = q.spec.template.clone().unwrap_or_default();
    let restricted = !q.spec.access.service_accounts.is_empty();
    let mut pod_labels = labels(&name);
    pod_labels.extend(selector_labels(&name));
    let metrics_port = IntOrString::String("metrics".into());
    let container = Container {
        name: "broker".into(),
        image: Some(t.image.clone().unwrap_or_else(|| d.broker_image.clone())),
        image_pull_policy: Some(
            t.image_pull_policy
                .clone()
                .unwrap_or_else(|| d.image_pull_policy.clone()),
        ),
        command: Some(vec!["sluice-broker".into()]),
        args: Some(vec![
            "--config".into(),
            format!("/etc/sluice/{CONFIG_KEY}"),
            "--data-dir".into(),
            "/var/lib/sluice".into(),
            "--listen".into(),
            format!("0.0.0.0:{GRPC_PORT}"),
            "--metrics-listen".into(),
            format!("0.0.0.0:{METRICS_PORT}"),
        ]),
        env: Some(
            [
                field_env("POD_NAME", "metadata.name"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
            ]
            .into_iter()
            .chain(otlp_env(d.otlp_endpoint.as_deref()))
            .collect(),
        ),
        ports: Some(vec![
            tcp_port("grpc", GRPC_PORT),
            tcp_port("metrics", METRICS_PORT),
        ]),
        readiness_probe: Some(http_probe("/readyz", metrics_port.clone(), 5, 3)),
        liveness_probe: Some(http_probe("/healthz", metrics_port, 10, 6)),
        resources: t.resources.clone(),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "data".into(),
                mount_path: "/var/lib/sluice".into(),
                ..Default::default()
            },
            VolumeMount {
                name: "config".into(),
                mount_path: "/etc/sluice".into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        security_context: Some(locked_down()),
        ..Default::default()
    };
    let mut storage_req = BTreeMap::new();
    storage_req.insert("storage".to_string(), Quantity(q.spec.storage.size.clone()));
    let mut metadata = meta(q, sts_name(&name));
    metadata.annotations = Some(BTreeMap::from([(
        LAYOUT_ANNOTATION.to_string(),
        serde_json::to_string(layout).expect("a layout serializes"),
    )]));
    StatefulSet {
        metadata,
        spec: Some(StatefulSetSpec {
            replicas: Some(q.spec.replicas),
            service_name: Some(svc_name(&name)),
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                ..Default::default()
            }),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&name)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([(
                        HASH_ANNOTATION.to_string(),
                        hash.to_string(),
                    )])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    termination_grace_period_seconds: Some(
                        t.termination_grace_period_seconds.unwrap_or(60),
                    ),
                    affinity: Some(
                        t.affinity
                            .clone()
                            .unwrap_or_else(|| default_affinity(&name)),
                    ),
                    tolerations: (!t.tolerations.is_empty()).then(|| t.tolerations.clone()),
                    node_selector: (!t.node_selector.is_empty()).then(|| t.node_selector.clone()),
                    priority_class_name: t.priority_class_name.clone(),
                    // Only brokers that review tokens talk to the API server.
                    service_account_name: restricted.then(|| broker_sa_name(&name)),
                    automount_service_account_token: Some(restricted),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        fs_group: Some(65532),
                        seccomp_profile: Some(runtime_default()),
                        ..Default::default()
                    }),
                    volumes: Some(vec![Volume {
                        name: "config".into(),
                        config_map: Some(ConfigMapVolumeSource {
                            name: cm_name(&name, hash),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("data".into()),
                    labels: Some(selector_labels(&name)),
                    ..Default::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    storage_class_name: q.spec.storage.storage_class_name.clone(),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(storage_req),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn tcp_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// Non-root, no privilege escalation, no capabilities, the runtime's default
/// seccomp profile, read-only root filesystem: what the broker and the sidecar both
/// run with (Pod Security `restricted`, see [`crate::pod_security`]).
fn locked_down() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(runtime_default()),
        ..Default::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Operator-wide settings of the injected sidecar (what [`Defaults`] is for the
/// brokers).
#[derive(Debug, Clone)]
pub struct SidecarDefaults {
    pub image: String,
    pub image_pull_policy: String,
    pub cpu_request: String,
    pub memory_request: String,
    pub memory_limit: String,
    /// Mount the namespace's client certificate and talk TLS to the brokers.
    pub tls: bool,
    /// OTLP collector the sidecars send their spans to (off when `None`).
    pub otlp_endpoint: Option<String>,
}

/// Switches span export on in a broker or sidecar: the standard OpenTelemetry
/// variable, which both read (`sluice_dataplane::server::logging`).
fn otlp_env(endpoint: Option<&str>) -> Option<EnvVar> {
    endpoint.filter(|e| !e.is_empty()).map(|e| EnvVar {
        name: "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
        value: Some(e.to_string()),
        ..Default::default()
    })
}

/// The sidecar container of an app pod, routing each queue to its brokers
/// (`routes`: `queue=host:port` entries, `SLUICE_ROUTES`).
pub fn sidecar_container(d: &SidecarDefaults, routes: &[String]) -> Container {
    let metrics_port = IntOrString::Int(SIDECAR_METRICS_PORT);
    let mut env = vec![
        EnvVar {
            name: "SLUICE_ROUTES".into(),
            value: Some(routes.join(";")),
            ..Default::default()
        },
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        EnvVar {
            name: "SLUICE_TOKEN_DIR".into(),
            value: Some(TOKEN_DIR.into()),
            ..Default::default()
        },
    ];
    let mut mounts = vec![VolumeMount {
        name: TOKEN_VOLUME.into(),
        mount_path: TOKEN_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }];
    if d.tls {
        env.extend(tls_env());
        mounts.push(tls_mount(SIDECAR_TLS_VOLUME));
    }
    env.extend(otlp_env(d.otlp_endpoint.as_deref()));
    let quantities = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
            .collect::<BTreeMap<_, _>>()
    };
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(d.image.clone()),
        image_pull_policy: Some(d.image_pull_policy.clone()),
        command: Some(vec!["sluice-sidecar".into()]),
        // gRPC stays on loopback (only the app talks to it); the metrics port listens
        // on all interfaces so that the kubelet's probes reach it.
        args: Some(vec![
            "--listen".into(),
            format!("127.0.0.1:{SIDECAR_GRPC_PORT}"),
            "--metrics-listen".into(),
            format!("0.0.0.0:{SIDECAR_METRICS_PORT}"),
        ]),
        env: Some(env),
        volume_mounts: Some(mounts),
        ports: Some(vec![
            tcp_port("sluice-grpc", SIDECAR_GRPC_PORT),
            tcp_port("sluice-metrics", SIDECAR_METRICS_PORT),
        ]),
        readiness_probe: Some(http_probe("/readyz", metrics_port.clone(), 5, 3)),
        liveness_probe: Some(http_probe("/healthz", metrics_port, 10, 6)),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[
                ("cpu", &d.cpu_request),
                ("memory", &d.memory_request),
            ])),
            limits: Some(quantities(&[("memory", &d.memory_limit)])),
            ..Default::default()
        }),
        // The app pod's security context is not ours: name the user here.
        security_context: Some(SecurityContext {
            run_as_user: Some(65532),
            ..locked_down()
        }),
        ..Default::default()
    }
}

/// One ServiceAccount token for a queue the sidecar routes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueToken {
    /// The token's audience: only that queue's brokers accept it.
    pub audience: String,
    /// File name in [`TOKEN_DIR`] (the route's queue name).
    pub path: String,
}

/// The sidecar's volumes: a projected volume with one token per route, and with
/// `d.tls` the namespace's client certificate. Readable by the sidecar whatever user
/// the app runs as; mounted in no other container.
pub fn sidecar_volumes(d: &SidecarDefaults, tokens: &[QueueToken]) -> Vec<Volume> {
    let mut volumes = vec![Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(
                tokens
                    .iter()
                    .map(|t| VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            audience: Some(t.audience.clone()),
                            expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                            path: t.path.clone(),
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            default_mode: Some(0o444),
        }),
        ..Default::default()
    }];
    if d.tls {
        // The webhook issues the namespace's certificate before it answers.
        volumes.push(Volume {
            name: SIDECAR_TLS_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(crate::tls::SIDECAR_SECRET.into()),
                default_mode: Some(0o444),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    volumes
}

/// The PodDisruptionBudget as JSON, for `policy/v1` or `policy/v1beta1` (Kubernetes
/// before 1.21 serves only the latter): at most one broker down at a time.
pub fn pdb(q: &Queue, api_version: &str) -> Value {
    let name = q.name_any();
    json!({
        "apiVersion": api_version,
        "kind": "PodDisruptionBudget",
        "metadata": serde_json::to_value(meta(q, pdb_name(&name))).expect("meta"),
        "spec": {
            "maxUnavailable": 1,
            "selector": { "matchLabels": selector_labels(&name) },
        },
    })
}

/// The sidecar settings the operator's unit tests inject with.
#[cfg(test)]
pub(crate) fn test_sidecar_defaults(tls: bool) -> SidecarDefaults {
    SidecarDefaults {
        image: "sluice-sidecar:test".into(),
        image_pull_policy: "IfNotPresent".into(),
        cpu_request: "50m".into(),
        memory_request: "32Mi".into(),
        memory_limit: "128Mi".into(),
        tls,
        otlp_endpoint: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::QueueSpec;

    fn queue(spec: &str) -> Queue {
        let mut q = Queue::new("orders", serde_yaml::from_str::<QueueSpec>(spec).unwrap());
        q.metadata.namespace = Some("shop".into());
        q.metadata.uid = Some("1234".into());
        q
    }

    fn defaults() -> Defaults {
        Defaults {
            broker_image: "sluice-broker:test".into(),
            image_pull_policy: "IfNotPresent".into(),
            cluster_domain: "cluster.local".into(),
            token_review_binding: None,
            otlp_endpoint: None,
        }
    }

    #[test]
    fn span_export_is_switched_on_in_brokers_and_sidecars_only_when_a_collector_is_named() {
        let q = queue("{}");
        let otlp = |c: &Container| {
            c.env
                .iter()
                .flatten()
                .find(|e| e.name == "OTEL_EXPORTER_OTLP_ENDPOINT")
                .and_then(|e| e.value.clone())
        };
        let broker = |d: &Defaults| {
            let sts = stateful_set(&q, d, "h", &Layout::of(&q.spec));
            otlp(&sts.spec.unwrap().template.spec.unwrap().containers[0])
        };
        let mut d = defaults();
        assert_eq!(broker(&d), None);
        let mut side = test_sidecar_defaults(false);
        assert_eq!(otlp(&sidecar_container(&side, &[])), None);

        let endpoint = "http://otel-collector.observability:4317";
        d.otlp_endpoint = Some(endpoint.into());
        side.otlp_endpoint = Some(endpoint.into());
        assert_eq!(broker(&d).as_deref(), Some(endpoint));
        assert_eq!(
            otlp(&sidecar_container(&side, &[])).as_deref(),
            Some(endpoint)
        );
    }

    #[test]
    fn tls_mounts_the_queue_certificate_and_points_the_broker_at_it() {
        let mut sts = stateful_set(
            &queue("{}"),
            &defaults(),
            "h",
            &Layout::of(&queue("{}").spec),
        );
        with_tls(&mut sts, "orders", "abc");
        let t = sts.spec.unwrap().template;
        assert_eq!(
            t.metadata.unwrap().annotations.unwrap()[TLS_HASH_ANNOTATION],
            "abc"
        );
        let pod = t.spec.unwrap();
        let vol = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "tls")
            .unwrap();
        assert_eq!(
            vol.secret.unwrap().secret_name.as_deref(),
            Some("sluice-orders-tls")
        );
        let c = &pod.containers[0];
        let env = c.env.as_ref().unwrap();
        assert!(env.iter().any(|e| e.name == "SLUICE_TLS_CERT"
            && e.value.as_deref() == Some("/etc/sluice-tls/tls.crt")));
        assert!(
            c.volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.mount_path == TLS_DIR)
        );
    }

    #[test]
    fn brokers_of_a_restricted_queue_get_their_own_service_account() {
        let open = stateful_set(
            &queue("{}"),
            &defaults(),
            "h",
            &Layout::of(&queue("{}").spec),
        );
        let pod = open.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.service_account_name, None);
        assert_eq!(pod.automount_service_account_token, Some(false));
        let q = queue("{access: {serviceAccounts: [{name: billing}]}}");
        let pod = stateful_set(&q, &defaults(), "h", &Layout::of(&q.spec))
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some("sluice-orders-broker")
        );
        assert_eq!(pod.automount_service_account_token, Some(true));
        let binding = ClusterRoleBinding::default();
        let added = with_broker_subject(binding, "orders", "shop").expect("subject added");
        assert_eq!(added.subjects.as_ref().unwrap().len(), 1);
        assert!(
            with_broker_subject(added, "orders", "shop").is_none(),
            "added once"
        );
    }

    /// The broker pods pass Pod Security `restricted`, with and without the TLS
    /// and token volumes.
    #[test]
    fn broker_pods_are_restricted() {
        use crate::pod_security::restricted_violations;
        for spec in ["{}", "{access: {serviceAccounts: [{name: billing}]}}"] {
            let q = queue(spec);
            let mut s = stateful_set(&q, &defaults(), "h", &Layout::of(&q.spec));
            with_tls(&mut s, "orders", "f");
            let pod = s.spec.unwrap().template.spec.unwrap();
            assert_eq!(restricted_violations(&pod), Vec::<String>::new(), "{spec}");
        }
    }

    #[test]
    fn statefulset_shape() {
        let q = queue("{replicas: 3, storage: {size: 2Gi, storageClassName: fast}}");
        let s = stateful_set(&q, &defaults(), "abc", &Layout::of(&q.spec));
        let spec = s.spec.unwrap();
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.service_name.as_deref(), Some("sluice-orders"));
        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("sluice-broker:test"));
        assert!(
            c.args
                .as_ref()
                .unwrap()
                .contains(&"/etc/sluice/broker.toml".to_string())
        );
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/readyz")
        );
        assert!(pod.affinity.unwrap().pod_anti_affinity.is_some());
        let pvc = &spec.volume_claim_templates.unwrap()[0];
        assert_eq!(
            pvc.spec.as_ref().unwrap().storage_class_name.as_deref(),
            Some("fast")
        );
        assert_eq!(
            spec.template.metadata.unwrap().annotations.unwrap()[HASH_ANNOTATION],
            "abc"
        );
        // The layout its volumes are made for, for the guard.
        let layout = &s.metadata.annotations.as_ref().unwrap()[LAYOUT_ANNOTATION];
        assert_eq!(
            serde_json::from_str::<Layout>(layout).unwrap(),
            Layout::of(&q.spec)
        );
        let owner = &s.metadata.owner_references.unwrap()[0];
        assert_eq!(owner.kind, "Queue");
        assert_eq!(owner.controller, Some(true));
    }

    #[test]
    fn template_overrides() {
        let q = queue(
            "template: {image: my/broker:1, priorityClassName: high, nodeSelector: {disk: ssd}, terminationGracePeriodSeconds: 5}",
        );
        let s = stateful_set(&q, &defaults(), "h", &Layout::of(&q.spec));
        let pod = s.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.containers[0].image.as_deref(), Some("my/broker:1"));
        assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
        assert_eq!(pod.node_selector.unwrap()["disk"], "ssd");
        assert_eq!(pod.termination_grace_period_seconds, Some(5));
    }

    use super::test_sidecar_defaults as sidecar_defaults;

    #[test]
    fn sidecar_container_shape() {
        let routes = ["orders=sluice-orders.shop.svc.cluster.local:7171".to_string()];
        let c = sidecar_container(&sidecar_defaults(true), &routes);
        assert_eq!(c.name, SIDECAR_NAME);
        assert_eq!(c.image.as_deref(), Some("sluice-sidecar:test"));
        assert_eq!(
            c.args.as_deref().unwrap(),
            [
                "--listen",
                "127.0.0.1:7070",
                "--metrics-listen",
                "0.0.0.0:9191"
            ]
        );
        let env = c.env.as_ref().unwrap();
        assert_eq!(env[0].name, "SLUICE_ROUTES");
        assert_eq!(env[0].value.as_deref(), Some(routes[0].as_str()));
        let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
        for want in [
            "POD_NAME",
            "POD_NAMESPACE",
            "POD_SERVICE_ACCOUNT",
            "SLUICE_TOKEN_DIR",
            "SLUICE_TLS_CA",
        ] {
            assert!(names.contains(&want), "{want} in {names:?}");
        }
        let ready = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        assert_eq!(ready.port, IntOrString::Int(SIDECAR_METRICS_PORT));
        let live = c.liveness_probe.as_ref().unwrap();
        assert_eq!(live.period_seconds, Some(10));
        let res = c.resources.as_ref().unwrap();
        assert_eq!(
            res.requests.as_ref().unwrap()["cpu"],
            Quantity("50m".into())
        );
        assert_eq!(
            res.limits.as_ref().unwrap()["memory"],
            Quantity("128Mi".into())
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_user, Some(65532));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        let mounts: Vec<&str> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(mounts, [TOKEN_DIR, TLS_DIR]);

        let plain = sidecar_container(&sidecar_defaults(false), &routes);
        assert_eq!(plain.volume_mounts.unwrap().len(), 1);
        assert!(
            !plain
                .env
                .unwrap()
                .iter()
                .any(|e| e.name.starts_with("SLUICE_TLS"))
        );
    }

    #[test]
    fn sidecar_volumes_hold_one_token_per_queue_and_the_certificate() {
        let tokens = [QueueToken {
            audience: "sluice.dev/shop/orders".into(),
            path: "orders".into(),
        }];
        let v = sidecar_volumes(&sidecar_defaults(true), &tokens);
        assert_eq!(v.len(), 2);
        let projected = v[0].projected.as_ref().unwrap();
        let token = projected.sources.as_ref().unwrap()[0]
            .service_account_token
            .as_ref()
            .unwrap();
        assert_eq!(token.audience.as_deref(), Some("sluice.dev/shop/orders"));
        assert_eq!(token.expiration_seconds, Some(3600));
        assert_eq!(
            v[1].secret.as_ref().unwrap().secret_name.as_deref(),
            Some("sluice-sidecar-tls")
        );
        assert_eq!(sidecar_volumes(&sidecar_defaults(false), &tokens).len(), 1);
    }

    #[test]
    fn pdb_and_service() {
        let q = queue("{}");
        let p = pdb(&q, "policy/v1beta1");
        assert_eq!(p["apiVersion"], "policy/v1beta1");
        assert_eq!(p["metadata"]["name"], "sluice-orders");
        assert_eq!(p["spec"]["maxUnavailable"], 1);
        let s = service(&q);
        assert_eq!(s.spec.unwrap().cluster_ip.as_deref(), Some("None"));
        assert_eq!(
            address("orders", "shop", "cluster.local"),
            "sluice-orders.shop.svc.cluster.local:7171"
        );
    }
}
