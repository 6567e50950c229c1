//! The webhook's self-managed serving certificate: a CA and a leaf in a Secret
//! shared by the operator replicas (optimistic concurrency decides who writes), the
//! CA patched into every webhook of the Mutating- and ValidatingWebhookConfiguration
//! (one name for both), and rotation
//! before expiry with the previous CA kept in the bundle during the change.

use super::issue::new_ca_and_server_leaf;
use super::resolver::CertResolver;
use super::{TlsError, leaf_secret, outlives, secret_text};
use crate::metrics::Metrics;
use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tracing::{info, warn};

/// Subject of the webhook's CA (a new one with every rotation).
pub const CA_NAME: &str = "sluice-webhook-ca";
/// The names the Secret's certificate was issued for (a change of names reissues).
const SANS_ANNOTATION: &str = "sluice.dev/sans";

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

/// What [`SelfManaged::ensure`] settled on.
#[derive(Debug, Clone)]
pub struct Serving {
    /// The CA bundle for the caBundle (new CA, then the previous one if rotated).
    pub ca_bundle: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// Whether this call issued it.
    pub rotated: bool,
}

/// The first certificate of a PEM bundle, PEM again.
fn first_certificate(bundle: &str) -> Option<String> {
    let der = CertificateDer::pem_slice_iter(bundle.as_bytes())
        .next()?
        .ok()?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    Some(out)
}

impl SelfManaged {
    /// Makes sure the Secret holds a valid certificate for our names, creating or
    /// rotating it when needed.
    pub async fn ensure(&self, client: &Client) -> Result<Serving, TlsError> {
        let api: Api<Secret> = Api::namespaced(client.clone(), &self.namespace);
        let sans = self.sans.join(",");
        for _ in 0..5 {
            let existing = api.get_opt(&self.secret_name).await?;
            if let Some(s) = &existing
                && outlives(s, self.renew_before)
                && s.annotations().get(SANS_ANNOTATION) == Some(&sans)
                && let (Some(ca_bundle), Some(cert_pem), Some(key_pem)) = (
                    secret_text(s, "ca.crt"),
                    secret_text(s, "tls.crt"),
                    secret_text(s, "tls.key"),
                )
            {
                return Ok(Serving {
                    ca_bundle,
                    cert_pem,
                    key_pem,
                    rotated: false,
                });
            }
            // (Re)generate; keep the previous CA in the bundle so that a caBundle the
            // API server still holds keeps working while the new one is patched in.
            let (ca, leaf) = new_ca_and_server_leaf(CA_NAME, &self.sans, self.validity)?;
            let previous = existing
                .as_ref()
                .and_then(|s| secret_text(s, "ca.crt"))
                .and_then(|b| first_certificate(&b));
            let ca_bundle = match previous {
                Some(p) => format!("{}{p}", ca.cert_pem),
                None => ca.cert_pem.clone(),
            };
            let meta = ObjectMeta {
                name: Some(self.secret_name.clone()),
                namespace: Some(self.namespace.clone()),
                annotations: Some(BTreeMap::from([(
                    SANS_ANNOTATION.to_string(),
                    sans.clone(),
                )])),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "sluice-operator".to_string(),
                )])),
                ..Default::default()
            };
            let mut secret = leaf_secret(meta, &ca_bundle, &leaf, self.validity);
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
                    return Ok(Serving {
                        ca_bundle,
                        cert_pem: leaf.cert_pem,
                        key_pem: leaf.key_pem,
                        rotated: true,
                    });
                }
                // Another replica wrote it first: use theirs.
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(TlsError::Conflict(
            self.secret_name.clone(),
            "could not settle the certificate Secret",
        ))
    }

    /// Writes the CA bundle into every webhook of the mutating configuration and,
    /// when it exists, of the validating one; false when the mutating configuration
    /// does not exist (yet).
    pub async fn patch_ca_bundle(&self, client: &Client, bundle: &str) -> Result<bool, TlsError> {
        let name = &self.webhook_config_name;
        let mutating = Api::<MutatingWebhookConfiguration>::all(client.clone());
        let found = patch_config(&mutating, name, bundle).await?;
        let validating = Api::<ValidatingWebhookConfiguration>::all(client.clone());
        patch_config(&validating, name, bundle).await?;
        Ok(found)
    }

    /// Keeps the certificate valid and the caBundle current, forever.
    pub async fn run(self, client: Client, resolver: Arc<CertResolver>, metrics: Arc<Metrics>) {
        loop {
            match self.ensure(&client).await {
                Ok(serving) => {
                    if serving.rotated {
                        metrics.cert_rotations.inc();
                    }
                    match resolver.load(&serving.cert_pem, &serving.key_pem) {
                        Ok(true) => info!("serving a new webhook certificate"),
                        Ok(false) => {}
                        Err(e) => warn!(error = %e, "loading the webhook certificate"),
                    }
                    match self.patch_ca_bundle(&client, &serving.ca_bundle).await {
                        Ok(true) => {}
                        Ok(false) => {
                            warn!(config = %self.webhook_config_name, "MutatingWebhookConfiguration not found; will retry")
                        }
                        Err(e) => warn!(error = %e, "patching caBundle"),
                    }
                    metrics.ready.store(resolver.has_cert(), Ordering::Relaxed);
                }
                Err(e) => warn!(error = %e, "webhook certificate"),
            }
            tokio::time::sleep(self.check_interval).await;
        }
    }
}

/// Patches `bundle` into the webhooks of configuration `name` whose caBundle
/// differs; false when the configuration does not exist. Read as JSON: the mutating
/// and the validating configuration share the fields it needs, not a Rust type.
async fn patch_config<K>(api: &Api<K>, name: &str, bundle: &str) -> Result<bool, TlsError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    K::DynamicType: Default,
{
    let Some(cfg) = api.get_opt(name).await? else {
        return Ok(false);
    };
    let want = base64::engine::general_purpose::STANDARD.encode(bundle.as_bytes());
    let cfg = serde_json::to_value(&cfg).expect("a webhook configuration serializes");
    let stale: Vec<Value> = cfg["webhooks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["clientConfig"]["caBundle"].as_str() != Some(want.as_str()))
        .map(|w| json!({"name": w["name"], "clientConfig": {"caBundle": want}}))
        .collect();
    if stale.is_empty() {
        return Ok(true);
    }
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Strategic(json!({ "webhooks": stale })),
    )
    .await?;
    info!(config = %name, kind = %K::kind(&Default::default()), "patched caBundle");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_ca_is_the_first_certificate_of_the_bundle() {
        let sans = ["a.b.svc".to_string()];
        let (old, _) = new_ca_and_server_leaf(CA_NAME, &sans, Duration::from_secs(60)).unwrap();
        let (new, _) = new_ca_and_server_leaf(CA_NAME, &sans, Duration::from_secs(60)).unwrap();
        let bundle = format!("{}{}", new.cert_pem, old.cert_pem);
        let first = first_certificate(&bundle).unwrap();
        let normalize = |s: &str| s.replace(['\r', '\n'], "");
        assert_eq!(normalize(&first), normalize(&new.cert_pem));
        assert_eq!(first_certificate("no PEM here"), None);
    }
}
