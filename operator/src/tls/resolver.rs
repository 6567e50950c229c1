//! The certificate the webhook serves, swapped while the server runs: loaded by
//! [`super::rotation`] (self-managed) or from files ([`watch_cert_dir`],
//! cert-manager).

use super::TlsError;
use crate::metrics::Metrics;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tracing::{info, warn};

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
    /// Loads a PEM certificate chain and key; a no-op (false) when unchanged.
    pub fn load(&self, cert_pem: &str, key_pem: &str) -> Result<bool, TlsError> {
        if *self.loaded_pem.read().expect("lock") == cert_pem {
            return Ok(false);
        }
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::Pem(e.to_string()))?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key)?;
        *self.current.write().expect("lock") = Some(Arc::new(CertifiedKey::new(certs, signing)));
        *self.loaded_pem.write().expect("lock") = cert_pem.to_string();
        Ok(true)
    }

    pub fn has_cert(&self) -> bool {
        self.current.read().map(|c| c.is_some()).unwrap_or(false)
    }
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
        metrics.ready.store(resolver.has_cert(), Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::issue::new_ca_and_server_leaf;

    #[test]
    fn loads_a_certificate_once_and_swaps_a_new_one() {
        let sans = ["sluice-webhook.sluice.svc".to_string(), "127.0.0.1".into()];
        let (ca, leaf) =
            new_ca_and_server_leaf("sluice-webhook-ca", &sans, Duration::from_secs(3600)).unwrap();
        assert!(ca.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let r = CertResolver::default();
        assert!(!r.has_cert());
        assert!(r.load(&leaf.cert_pem, &leaf.key_pem).unwrap());
        assert!(!r.load(&leaf.cert_pem, &leaf.key_pem).unwrap(), "unchanged");
        assert!(r.has_cert());
        let (_, next) =
            new_ca_and_server_leaf("sluice-webhook-ca", &sans, Duration::from_secs(3600)).unwrap();
        assert!(r.load(&next.cert_pem, &next.key_pem).unwrap(), "rotated");
        assert!(matches!(r.load("junk", "junk"), Err(TlsError::Pem(_))));
    }
}
