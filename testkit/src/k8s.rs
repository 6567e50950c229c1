//! Kubernetes pieces the operator's control-plane tests and the e2e suite share
//! (feature `kube`): the webhook registration a test makes for an operator process,
//! and reading what the operator put into a StatefulSet.

use crate::eventually;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Probe;
use kube::api::Api;
use serde_json::{Value, json};

/// One webhook as the chart registers it, but reaching the operator process by URL
/// on `https://127.0.0.1:<port><path>` (no kube-proxy in the tests) and limited to
/// the namespaces `namespace_selector` selects; failurePolicy Fail, so that a TLS
/// failure fails the test.
fn webhook_json(
    name: &str,
    hook: &str,
    port: u16,
    path: &str,
    rule: Value,
    namespace_selector: Value,
    side_effects: &str,
) -> Value {
    json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": hook,
            "admissionReviewVersions": ["v1"],
            "sideEffects": side_effects,
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "clientConfig": {"url": format!("https://127.0.0.1:{port}{path}")},
            "rules": [rule],
            "namespaceSelector": namespace_selector
        }]
    })
}

/// The chart's MutatingWebhookConfiguration `name` (sidecar injection into pods).
pub fn webhook_configuration(
    name: &str,
    port: u16,
    namespace_selector: Value,
) -> MutatingWebhookConfiguration {
    let rule = json!({"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]});
    let cfg = webhook_json(
        name,
        "inject.sluice.dev",
        port,
        "/mutate",
        rule,
        namespace_selector,
        // As the chart: a pod's creation may issue a Secret, a dry run nothing.
        "NoneOnDryRun",
    );
    serde_json::from_value(cfg).expect("webhook configuration")
}

/// The chart's ValidatingWebhookConfiguration `name` (Queue updates).
pub fn queue_webhook_configuration(
    name: &str,
    port: u16,
    namespace_selector: Value,
) -> ValidatingWebhookConfiguration {
    let rule = json!({"apiGroups": ["sluice.dev"], "apiVersions": ["v1alpha1"], "operations": ["UPDATE"], "resources": ["queues"]});
    let cfg = webhook_json(
        name,
        "queues.sluice.dev",
        port,
        "/validate-queue",
        rule,
        namespace_selector,
        "None",
    );
    serde_json::from_value(cfg).expect("validating webhook configuration")
}

/// Waits until the operator has patched its CA into the webhook configuration
/// `name`, mutating or validating (read as JSON: they share these fields, not a type).
pub async fn wait_ca_bundle<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    eventually(
        &format!("caBundle of {name} patched by the operator"),
        || async {
            let c = serde_json::to_value(api.get(name).await.ok()?).ok()?;
            c["webhooks"][0]["clientConfig"]["caBundle"]
                .as_str()
                .filter(|b| !b.is_empty())
                .map(|_| ())
        },
    )
    .await;
}

/// Waits until the StatefulSet `name` exists; `what` says why it should.
pub async fn wait_statefulset(api: &Api<StatefulSet>, name: &str, what: &str) -> StatefulSet {
    eventually(&format!("StatefulSet {name} {what}"), || async {
        api.get_opt(name).await.ok().flatten()
    })
    .await
}

/// The settings hash (`sluice.dev/config-hash`) on a StatefulSet's pod template.
pub fn config_hash(sts: &StatefulSet) -> Option<String> {
    sts.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get("sluice.dev/config-hash")
        .cloned()
}

/// The path an HTTP probe asks for (None for no probe, or not an HTTP one).
pub fn probe_path(probe: Option<&Probe>) -> Option<&str> {
    probe?.http_get.as_ref()?.path.as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_configuration_reaches_the_port_and_selects_namespaces() {
        let c = webhook_configuration("inj", 4443, json!({"matchLabels": {"a": "b"}}));
        let w = &c.webhooks.unwrap()[0];
        assert_eq!(
            w.client_config.url.as_deref(),
            Some("https://127.0.0.1:4443/mutate")
        );
        assert_eq!(w.failure_policy.as_deref(), Some("Fail"));
        let sel = w.namespace_selector.as_ref().unwrap();
        assert_eq!(sel.match_labels.as_ref().unwrap()["a"], "b");
    }

    #[test]
    fn reads_the_config_hash_and_probe_paths() {
        let sts: StatefulSet = serde_json::from_value(json!({
            "spec": {"selector": {}, "serviceName": "s", "template": {
                "metadata": {"annotations": {"sluice.dev/config-hash": "abc"}},
                "spec": {"containers": [{"name": "b",
                    "readinessProbe": {"httpGet": {"path": "/readyz", "port": 1}},
                    "livenessProbe": {"tcpSocket": {"port": 1}}}]}
            }}
        }))
        .unwrap();
        assert_eq!(config_hash(&sts).as_deref(), Some("abc"));
        let c = &sts.spec.unwrap().template.spec.unwrap().containers[0];
        assert_eq!(probe_path(c.readiness_probe.as_ref()), Some("/readyz"));
        assert_eq!(probe_path(c.liveness_probe.as_ref()), None);
        assert_eq!(probe_path(None), None);
    }
}
