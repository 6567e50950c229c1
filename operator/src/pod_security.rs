//! What the Pod Security Standards' `restricted` profile asks of a pod
//! (kubernetes.io/docs/concepts/security/pod-security-standards, the rules Pod
//! Security admission enforces from Kubernetes 1.23). Kubernetes 1.20, which our
//! tests run, has no Pod Security admission, so every pod spec Sluice makes (the
//! brokers', the operator's from the chart, an app pod after injection) is checked
//! against these rules by tests instead.

use k8s_openapi::api::core::v1::{Container, PodSpec, SecurityContext};

/// Each rule the pod breaks, named as Pod Security admission names it, with where.
pub fn restricted_violations(spec: &PodSpec) -> Vec<String> {
    let mut out = Vec::new();
    let pod = spec.security_context.as_ref();
    if spec.host_network == Some(true) || spec.host_pid == Some(true) || spec.host_ipc == Some(true)
    {
        out.push("host namespaces: hostNetwork, hostPID and hostIPC must be unset or false".into());
    }
    for v in spec.volumes.iter().flatten() {
        let allowed = v.config_map.is_some()
            || v.csi.is_some()
            || v.downward_api.is_some()
            || v.empty_dir.is_some()
            || v.ephemeral.is_some()
            || v.persistent_volume_claim.is_some()
            || v.projected.is_some()
            || v.secret.is_some();
        if !allowed {
            out.push(format!(
                "restricted volume types: volume {:?} is none of configMap, csi, downwardAPI, emptyDir, ephemeral, persistentVolumeClaim, projected, secret",
                v.name
            ));
        }
    }
    if pod
        .and_then(|p| p.sysctls.as_ref())
        .is_some_and(|s| !s.is_empty())
    {
        out.push("sysctls: none outside the safe set (Sluice sets none)".into());
    }
    let pod_non_root = pod.and_then(|p| p.run_as_non_root);
    let pod_user = pod.and_then(|p| p.run_as_user);
    let pod_seccomp = pod
        .and_then(|p| p.seccomp_profile.as_ref())
        .map(|s| s.type_.as_str());
    if pod_non_root == Some(false) {
        out.push("runAsNonRoot != true: the pod sets runAsNonRoot false".into());
    }
    if pod_user == Some(0) {
        out.push("runAsUser=0: the pod runs as root".into());
    }
    if pod_seccomp.is_some_and(|t| !secure_seccomp(t)) {
        out.push("seccompProfile: the pod's type must be RuntimeDefault or Localhost".into());
    }
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    for c in containers {
        out.extend(
            container_violations(c, pod_non_root, pod_seccomp)
                .into_iter()
                .map(|v| format!("container {:?}: {v}", c.name)),
        );
    }
    out
}

fn secure_seccomp(type_: &str) -> bool {
    matches!(type_, "RuntimeDefault" | "Localhost")
}

fn container_violations(
    c: &Container,
    pod_non_root: Option<bool>,
    pod_seccomp: Option<&str>,
) -> Vec<String> {
    let mut out = Vec::new();
    let none = SecurityContext::default();
    let sc = c.security_context.as_ref().unwrap_or(&none);
    if sc.privileged == Some(true) {
        out.push("privileged: must be unset or false".into());
    }
    if sc.allow_privilege_escalation != Some(false) {
        out.push("allowPrivilegeEscalation != false".into());
    }
    let caps = sc.capabilities.as_ref();
    if !caps
        .and_then(|c| c.drop.as_ref())
        .is_some_and(|d| d.iter().any(|d| d == "ALL"))
    {
        out.push("unrestricted capabilities: must drop ALL".into());
    }
    if let Some(added) = caps.and_then(|c| c.add.as_ref())
        && added.iter().any(|a| a != "NET_BIND_SERVICE")
    {
        out.push(format!(
            "unrestricted capabilities: adds {added:?} (only NET_BIND_SERVICE may be added)"
        ));
    }
    match sc.run_as_non_root.or(pod_non_root) {
        Some(true) => {}
        _ => out.push("runAsNonRoot != true (on the container or the pod)".into()),
    }
    if sc.run_as_user == Some(0) {
        out.push("runAsUser=0".into());
    }
    let seccomp = sc
        .seccomp_profile
        .as_ref()
        .map(|s| s.type_.as_str())
        .or(pod_seccomp);
    if !seccomp.is_some_and(secure_seccomp) {
        out.push("seccompProfile: RuntimeDefault or Localhost, on the container or the pod".into());
    }
    if sc.proc_mount.as_deref().is_some_and(|m| m != "Default") {
        out.push("procMount: must be Default".into());
    }
    if sc
        .se_linux_options
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        .is_some_and(|t| !matches!(t, "container_t" | "container_init_t" | "container_kvm_t"))
    {
        out.push("seLinuxOptions: a custom type".into());
    }
    for p in c.ports.iter().flatten() {
        if p.host_port.is_some_and(|h| h != 0) {
            out.push(format!("hostPort {}", p.host_port.unwrap_or_default()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_rule_is_checked_and_a_compliant_pod_passes() {
        let good: PodSpec = serde_json::from_value(json!({
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "app",
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
                },
            }],
            "volumes": [{"name": "data", "emptyDir": {}}],
        }))
        .unwrap();
        assert_eq!(restricted_violations(&good), Vec::<String>::new());
        let bad: PodSpec = serde_json::from_value(json!({
            "hostNetwork": true,
            "securityContext": {"runAsUser": 0, "seccompProfile": {"type": "Unconfined"}},
            "initContainers": [{"name": "init"}],
            "containers": [{
                "name": "app",
                "ports": [{"containerPort": 80, "hostPort": 80}],
                "securityContext": {
                    "privileged": true,
                    "capabilities": {"add": ["SYS_ADMIN"]},
                    "procMount": "Unmasked",
                },
            }],
            "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
        }))
        .unwrap();
        let found = restricted_violations(&bad).join("\n");
        for rule in [
            "host namespaces",
            "restricted volume types: volume \"host\"",
            "runAsUser=0: the pod",
            "seccompProfile: the pod's type",
            "container \"init\": allowPrivilegeEscalation != false",
            "container \"init\": unrestricted capabilities: must drop ALL",
            "container \"init\": runAsNonRoot != true",
            "container \"app\": privileged",
            "container \"app\": unrestricted capabilities: adds [\"SYS_ADMIN\"]",
            "container \"app\": procMount",
            "container \"app\": hostPort 80",
        ] {
            assert!(found.contains(rule), "{rule} not in:\n{found}");
        }
    }
}
