//! The data plane's certificates, kept in Secrets: one CA (in the operator's
//! namespace), a serving certificate per Queue for its brokers (in the Queue's
//! namespace, owned by it), and a client certificate per app namespace for the
//! injected sidecars. Brokers accept only clients with a certificate of this CA;
//! sidecars accept only brokers whose certificate it signed for the queue's name.

use super::issue::{Ca, Leaf, Usage};
use super::{TlsError, USAGE_ANNOTATION, leaf_secret, outlives, secret_text};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tracing::info;

/// Subject of the CA; leaves name it as their issuer.
pub const CA_NAME: &str = "sluice-data-plane-ca";
/// Secret of the sidecars' client certificate, in every namespace with injected pods.
pub const SIDECAR_SECRET: &str = "sluice-sidecar-tls";
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// A leaf this close to expiry is issued again (brokers roll; new sidecars get it).
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);
const FIELD_MANAGER: &str = "sluice-operator";

/// Issues and keeps the data plane's certificates.
pub struct DataPlaneCerts {
    client: Client,
    /// Namespace and name of the CA's Secret.
    ca_namespace: String,
    ca_secret: String,
    ca: Mutex<Option<Arc<Ca>>>,
}

/// First 16 hex digits of the SHA-256 of a certificate: a pod annotation that rolls
/// the brokers when their certificate changes.
pub fn fingerprint(cert_pem: &str) -> String {
    crate::settings::hex(&Sha256::digest(cert_pem.as_bytes()))[..16].to_string()
}

/// The names a Queue's brokers answer to: the Service and every pod behind it.
pub fn broker_names(queue: &str, ns: &str, cluster_domain: &str) -> Vec<String> {
    let svc = crate::resources::svc_name(queue);
    vec![
        format!("{svc}.{ns}.svc.{cluster_domain}"),
        format!("*.{svc}.{ns}.svc.{cluster_domain}"),
        format!("{svc}.{ns}.svc"),
        format!("*.{svc}.{ns}.svc"),
        format!("{svc}.{ns}"),
        svc,
    ]
}

/// The certificate in `existing`, if it can stay: signed by the current CA, far from
/// expiry, and issued for `usage` (a broker certificate from before brokers
/// replicated over TLS was issued for serving only, and is issued again).
fn still_good(existing: &Secret, ca_pem: &str, usage: Usage) -> Option<String> {
    let issued_for = existing
        .metadata
        .annotations
        .as_ref()?
        .get(USAGE_ANNOTATION)?;
    (secret_text(existing, "ca.crt").as_deref() == Some(ca_pem)
        && outlives(existing, RENEW_BEFORE)
        && issued_for == usage.name())
    .then(|| secret_text(existing, "tls.crt"))
    .flatten()
}

impl DataPlaneCerts {
    pub fn new(client: Client, ca_namespace: &str, ca_secret: &str) -> Self {
        DataPlaneCerts {
            client,
            ca_namespace: ca_namespace.to_string(),
            ca_secret: ca_secret.to_string(),
            ca: Mutex::new(None),
        }
    }

    /// The CA, read from its Secret, or made and stored there if there is none.
    /// Operator replicas race to create it; the loser reads the winner's.
    pub async fn ca(&self) -> Result<Arc<Ca>, TlsError> {
        let mut cached = self.ca.lock().await;
        if let Some(ca) = cached.as_ref() {
            return Ok(ca.clone());
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.ca_namespace);
        let secret = match api.get_opt(&self.ca_secret).await? {
            Some(s) => s,
            None => {
                let ca = Ca::generate(CA_NAME, CA_VALIDITY)?;
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(self.ca_secret.clone()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/part-of".to_string(),
                            "sluice".to_string(),
                        )])),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([
                        (
                            "ca.crt".into(),
                            ByteString(ca.cert_pem.clone().into_bytes()),
                        ),
                        ("ca.key".into(), ByteString(ca.key_pem().into_bytes())),
                    ])),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &secret).await {
                    Ok(s) => {
                        info!(secret = %self.ca_secret, "generated the data-plane CA");
                        s
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => api.get(&self.ca_secret).await?,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let cert = secret_text(&secret, "ca.crt")
            .ok_or_else(|| TlsError::Incomplete(self.ca_secret.clone(), "ca.crt"))?;
        let key = secret_text(&secret, "ca.key")
            .ok_or_else(|| TlsError::Incomplete(self.ca_secret.clone(), "ca.key"))?;
        let ca = Arc::new(Ca::from_pem(CA_NAME, &cert, &key)?);
        *cached = Some(ca.clone());
        Ok(ca)
    }

    /// Makes sure Secret `name` in `ns` holds a current leaf of the CA (issuing one
    /// with `issue` if not) and returns the certificate's fingerprint.
    async fn ensure_leaf(
        &self,
        ns: &str,
        name: &str,
        meta: ObjectMeta,
        usage: Usage,
        issue: impl FnOnce(&Ca) -> Result<Leaf, rcgen::Error>,
    ) -> Result<String, TlsError> {
        let ca = self.ca().await?;
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        if let Some(existing) = api.get_opt(name).await?
            && let Some(cert) = still_good(&existing, &ca.cert_pem, usage)
        {
            return Ok(fingerprint(&cert));
        }
        let leaf = issue(&ca)?;
        let mut meta = meta;
        meta.annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(USAGE_ANNOTATION.to_string(), usage.name().to_string());
        meta.name = Some(name.to_string());
        meta.namespace = Some(ns.to_string());
        let secret = leaf_secret(meta, &ca.cert_pem, &leaf, LEAF_VALIDITY);
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await?;
        info!(secret = %name, namespace = %ns, "issued a data-plane certificate");
        Ok(fingerprint(&leaf.cert_pem))
    }

    /// The brokers' serving certificate of a Queue, in `secret` (owned by the Queue
    /// through `meta`). Returns its fingerprint.
    pub async fn broker_secret(
        &self,
        queue: &str,
        ns: &str,
        secret: &str,
        meta: ObjectMeta,
        cluster_domain: &str,
    ) -> Result<String, TlsError> {
        let names = broker_names(queue, ns, cluster_domain);
        self.ensure_leaf(ns, secret, meta, Usage::Peer, |ca| {
            // Brokers also present it to each other when they replicate.
            ca.issue(&names[0], &names, Usage::Peer, LEAF_VALIDITY)
        })
        .await
    }

    /// The injected sidecars' client certificate in namespace `ns`.
    pub async fn sidecar_secret(&self, ns: &str) -> Result<String, TlsError> {
        let meta = ObjectMeta {
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "sluice".to_string(),
            )])),
            ..Default::default()
        };
        let name = format!("sluice-sidecar.{ns}");
        self.ensure_leaf(ns, SIDECAR_SECRET, meta, Usage::Client, |ca| {
            ca.issue(&name, &[], Usage::Client, LEAF_VALIDITY)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_for(ca: &Ca, usage: Option<Usage>) -> Secret {
        let leaf = ca
            .issue("svc.ns.svc", &[], Usage::Peer, LEAF_VALIDITY)
            .unwrap();
        let annotations =
            usage.map(|u| BTreeMap::from([(USAGE_ANNOTATION.to_string(), u.name().to_string())]));
        let meta = ObjectMeta {
            annotations,
            ..Default::default()
        };
        leaf_secret(meta, &ca.cert_pem, &leaf, LEAF_VALIDITY)
    }

    #[test]
    fn a_certificate_stays_only_if_issued_for_the_same_use_by_the_current_ca() {
        let ca = Ca::generate(CA_NAME, CA_VALIDITY).unwrap();
        let peer = secret_for(&ca, Some(Usage::Peer));
        assert!(still_good(&peer, &ca.cert_pem, Usage::Peer).is_some());
        // A broker certificate from before peers: issued again.
        assert!(still_good(&secret_for(&ca, None), &ca.cert_pem, Usage::Peer).is_none());
        assert!(
            still_good(
                &secret_for(&ca, Some(Usage::Server)),
                &ca.cert_pem,
                Usage::Peer
            )
            .is_none()
        );
        // Another CA's.
        let other = Ca::generate(CA_NAME, CA_VALIDITY).unwrap();
        assert!(still_good(&peer, &other.cert_pem, Usage::Peer).is_none());
    }
}
