//! Mutual TLS between sidecars and brokers: PEM files in, tonic TLS settings out.
//! Both ends use the same three files (their own certificate and key, and the CA
//! that signed the other end's), as the operator issues and mounts them.

use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    NotPem { path: String, what: &'static str },
}

/// A certificate, its key, and the CA its peers' certificates must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

fn read_pem(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let text = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    // rustls would refuse it later with a vaguer message; say which file is wrong.
    if !text.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::NotPem {
            path: path.display().to_string(),
            what,
        });
    }
    Ok(text)
}

impl TlsFiles {
    fn identity(&self) -> Result<Identity, TlsError> {
        Ok(Identity::from_pem(
            read_pem(&self.cert, "certificate")?,
            read_pem(&self.key, "private key")?,
        ))
    }

    fn ca(&self) -> Result<Certificate, TlsError> {
        Ok(Certificate::from_pem(read_pem(&self.ca, "CA certificate")?))
    }

    /// A broker's side: serve with our certificate; every client must present a
    /// certificate signed by the CA (a client without one is refused in the
    /// handshake).
    pub fn server(&self) -> Result<ServerTlsConfig, TlsError> {
        Ok(ServerTlsConfig::new()
            .identity(self.identity()?)
            .client_ca_root(self.ca()?))
    }

    /// A sidecar's side: present our certificate; trust only brokers whose
    /// certificate the CA signed for `server_name` (the route's host name).
    pub fn client(&self, server_name: &str) -> Result<ClientTlsConfig, TlsError> {
        Ok(ClientTlsConfig::new()
            .identity(self.identity()?)
            .ca_certificate(self.ca()?)
            .domain_name(server_name))
    }
}
