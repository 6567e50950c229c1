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

/// A MutatingWebhookConfiguration `name` as the chart makes it, but reaching the
/// operator process by URL on `https://127.0.0.1:<port>/mutate` (no kube-proxy in
/// the tests) and limited to the namespaces `namespace_selector` selects;
/// failurePolicy Fail, so that a TLS failure fails the test.
pub fn webhook_configuration(
    name: &str,
    port: u16,
    namespace_selector: Value,
) -> MutatingWebhookConfiguration {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "inject.sluice.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/mutate")},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
            "namespaceSelector": namespace_selector
        }]
    }))
    .expect("webhook configuration")
}

/// The chart's ValidatingWebhookConfiguration `name` (Queue updates), reaching the
/// operator process by URL on `https://127.0.0.1:<port>/validate-queue` and limited
/// to the namespaces `namespace_selector` selects; failurePolicy Fail.
pub fn queue_webhook_configuration(
    name: &str,
    port: u16,
    namespace_selector: Value,
) -> ValidatingWebhookConfiguration {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "queues.sluice.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/validate-queue")},
            "rules": [{"apiGroups": ["sluice.dev"], "apiVersions": ["v1alpha1"], "operations": ["UPDATE"], "resources": ["queues"]}],
            "namespaceSelector": namespace_selector
        }]
    }))
    .expect("validating webhook configuration")
}

/// Waits until the operator has patched its CA into the validating configuration
/// `name` too.
pub async fn wait_queue_webhook_ca_bundle(vwcs: &Api<ValidatingWebhookConfiguration>, name: &str) {
    eventually(
        "caBundle of the Queue check patched by the operator",
        || async {
            let c = vwcs.get(name).await.ok()?;
            c.webhooks?[0]
                .client_config
                .ca_bundle
                .as_ref()
                .filter(|b| !b.0.is_empty())
                .map(|_| ())
        },
    )
    .await;
}

/// Waits until the operator has patched its CA into the webhook configuration
/// `name`.
pub async fn wait_ca_bundle(mwcs: &Api<MutatingWebhookConfiguration>, name: &str) {
    eventually("caBundle patched by the operator", || async {
        let c = mwcs.get(name).await.ok()?;
        c.webhooks?[0]
            .client_config
            .ca_bundle
            .as_ref()
            .filter(|b| !b.0.is_empty())
            .map(|_| ())
    })
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
