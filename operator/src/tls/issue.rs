//! Issuing: a CA, and leaves it signs for servers (the webhook, brokers) and
//! clients (sidecars). One place, so every certificate has the same shape.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::time::Duration;

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
    /// Serves, and is presented to peers that serve the same (brokers replicating
    /// to each other).
    Peer,
}

impl Usage {
    /// As recorded on a certificate's Secret (a change of usage issues it again).
    pub fn name(self) -> &'static str {
        match self {
            Usage::Server => "server",
            Usage::Client => "client",
            Usage::Peer => "server-and-peer",
        }
    }
}

/// A CA: its certificate (PEM) and the key that signs with it.
pub struct Ca {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A signed certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

fn window(validity: Duration) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack before now: clocks of nodes differ.
    (
        now - time::Duration::hours(1),
        now + time::Duration::seconds(validity.as_secs() as i64),
    )
}

fn ca_params(name: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn generate(name: &str, validity: Duration) -> Result<Ca, rcgen::Error> {
        let mut params = ca_params(name)?;
        (params.not_before, params.not_after) = window(validity);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA stored earlier: its certificate and key (PEM) and the name it was
    /// generated with. Signing needs only the name (the issuer of what it signs)
    /// and the key, so the certificate is not parsed.
    pub fn from_pem(name: &str, cert_pem: &str, key_pem: &str) -> Result<Ca, rcgen::Error> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            issuer: Issuer::new(ca_params(name)?, key),
        })
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A certificate for `name` (also its first subject alternative name unless
    /// `sans` are given) signed by this CA.
    pub fn issue(
        &self,
        name: &str,
        sans: &[String],
        usage: Usage,
        validity: Duration,
    ) -> Result<Leaf, rcgen::Error> {
        let sans = if sans.is_empty() {
            vec![name.to_string()]
        } else {
            sans.to_vec()
        };
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = match usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Peer => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        (params.not_before, params.not_after) = window(validity);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A new CA named `ca_name` and a serving certificate it signs for `sans` (the
/// first also names the leaf). The CA outlives its leaf by a day, so a leaf is never
/// checked against an expired CA.
pub fn new_ca_and_server_leaf(
    ca_name: &str,
    sans: &[String],
    validity: Duration,
) -> Result<(Ca, Leaf), rcgen::Error> {
    let ca = Ca::generate(ca_name, validity + Duration::from_secs(86_400))?;
    let name = sans.first().map(String::as_str).unwrap_or(ca_name);
    let leaf = ca.issue(name, sans, Usage::Server, validity)?;
    Ok((ca, leaf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_ca_signs_again() {
        let ca = Ca::generate("test-ca", Duration::from_secs(3600)).unwrap();
        let again = Ca::from_pem("test-ca", &ca.cert_pem, &ca.key_pem()).unwrap();
        let leaf = again
            .issue(
                "b",
                &["b.example".into()],
                Usage::Server,
                Duration::from_secs(60),
            )
            .unwrap();
        assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(leaf.key_pem.contains("PRIVATE KEY"));
    }
}
