//! Every certificate the operator deals with, in one place:
//!
//! - [`issue`]: a CA and the leaves it signs (the webhook's serving certificate,
//!   brokers' serving certificates, sidecars' client certificates);
//! - [`data_plane`]: the data plane's CA and leaves, kept in Secrets;
//! - [`rotation`]: the webhook's self-managed serving certificate, its Secret, the
//!   caBundle, and rotation before expiry;
//! - [`resolver`]: the certificate the webhook serves, swapped while it runs (from
//!   [`rotation`], or from cert-manager's files).
//!
//! Both kinds of certificate Secret have the same shape (`kubernetes.io/tls` with
//! `tls.crt`, `tls.key`, `ca.crt`, and their expiry in an annotation so that renewal
//! needs no certificate parsing), built and read by the helpers here.

pub mod data_plane;
pub mod issue;
pub mod resolver;
pub mod rotation;

pub use data_plane::{DataPlaneCerts, SIDECAR_SECRET};
pub use issue::{Ca, Leaf, Usage};
pub use resolver::{CertResolver, watch_cert_dir};
pub use rotation::SelfManaged;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use std::collections::BTreeMap;
use std::time::Duration;

/// When a certificate Secret's leaf expires (Unix seconds).
pub const NOT_AFTER_ANNOTATION: &str = "sluice.dev/not-after";
/// What the certificate in a data-plane Secret was issued for ([`Usage::name`]).
pub const USAGE_ANNOTATION: &str = "sluice.dev/certificate-usage";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("issuing a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("PEM: {0}")]
    Pem(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("Secret {0} lacks {1}")]
    Incomplete(String, &'static str),
    #[error("Secret {0}: {1}")]
    Conflict(String, &'static str),
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The text under `key` of a Secret.
pub(crate) fn secret_text(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// Whether a certificate Secret's leaf is valid for longer than `renew_before`.
pub(crate) fn outlives(s: &Secret, renew_before: Duration) -> bool {
    let not_after: u64 = s
        .annotations()
        .get(NOT_AFTER_ANNOTATION)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    not_after > now_unix() + renew_before.as_secs()
}

/// A `kubernetes.io/tls` Secret holding `leaf` (valid for `validity` from now) and
/// the CA bundle that verifies it; `meta` names it and may carry more annotations.
pub(crate) fn leaf_secret(
    mut meta: ObjectMeta,
    ca_bundle: &str,
    leaf: &Leaf,
    validity: Duration,
) -> Secret {
    meta.annotations.get_or_insert_with(BTreeMap::new).insert(
        NOT_AFTER_ANNOTATION.to_string(),
        (now_unix() + validity.as_secs()).to_string(),
    );
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: meta,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_string(), bytes(&leaf.cert_pem)),
            ("tls.key".to_string(), bytes(&leaf.key_pem)),
            ("ca.crt".to_string(), bytes(ca_bundle)),
        ])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaf_secret_outlives_only_a_shorter_renewal_window() {
        let (ca, leaf) = issue::new_ca_and_server_leaf(
            "test-ca",
            &["svc.ns.svc".into()],
            Duration::from_secs(3600),
        )
        .unwrap();
        let s = leaf_secret(
            ObjectMeta {
                name: Some("s".into()),
                annotations: Some(BTreeMap::from([("keep".into(), "me".into())])),
                ..Default::default()
            },
            &ca.cert_pem,
            &leaf,
            Duration::from_secs(3600),
        );
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(s.annotations()["keep"], "me");
        assert_eq!(
            secret_text(&s, "ca.crt").as_deref(),
            Some(ca.cert_pem.as_str())
        );
        assert_eq!(
            secret_text(&s, "tls.key").as_deref(),
            Some(leaf.key_pem.as_str())
        );
        assert!(outlives(&s, Duration::from_secs(60)));
        assert!(!outlives(&s, Duration::from_secs(7200)));
        assert!(!outlives(&Secret::default(), Duration::ZERO));
    }
}
