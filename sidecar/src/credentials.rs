//! What a route presents to its brokers: the ServiceAccount token for the queue's
//! audience, from a file the kubelet keeps fresh (a projected volume the injection
//! webhook adds). The file is read again on every layout refresh, so a rotated token
//! is used within seconds; a broker of a queue without an access list ignores it.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

#[derive(Clone, Default)]
pub struct Credentials {
    path: Option<Arc<PathBuf>>,
    header: Arc<RwLock<Option<MetadataValue<Ascii>>>>,
}

impl Credentials {
    /// Nothing to present.
    pub fn none() -> Self {
        Self::default()
    }

    /// The token in `path` (read now and on every [`Credentials::reload`]).
    pub fn from_file(path: PathBuf) -> Self {
        let c = Credentials {
            path: Some(Arc::new(path)),
            header: Arc::default(),
        };
        c.reload();
        c
    }

    /// Reads the token file again; keeps the last good token if it cannot.
    pub fn reload(&self) {
        let Some(path) = &self.path else { return };
        let read = std::fs::read_to_string(path.as_path())
            .map_err(|e| e.to_string())
            .and_then(|t| {
                MetadataValue::try_from(format!("Bearer {}", t.trim()))
                    .map_err(|_| "the token is not printable ASCII".to_string())
            });
        match read {
            Ok(v) => {
                let mut h = self.header.write().unwrap();
                if h.as_ref() != Some(&v) {
                    tracing::debug!(path = %path.display(), "token loaded");
                    *h = Some(v);
                }
            }
            Err(e) => {
                // Never log the token itself; the path says which one.
                tracing::warn!(path = %path.display(), error = %e, "cannot read the route's token");
            }
        }
    }

    pub fn has_token(&self) -> bool {
        self.header.read().unwrap().is_some()
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = self.header.read().unwrap().as_ref() {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn presents_the_current_token_of_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("orders");
        std::fs::write(&file, "first\n").unwrap();
        let mut c = Credentials::from_file(file.clone());
        let auth = |c: &mut Credentials| {
            c.call(Request::new(()))
                .unwrap()
                .metadata()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(auth(&mut c).as_deref(), Some("Bearer first"));
        std::fs::write(&file, "second").unwrap();
        c.reload();
        assert_eq!(auth(&mut c).as_deref(), Some("Bearer second"));
        std::fs::remove_file(&file).unwrap();
        c.reload();
        assert_eq!(
            auth(&mut c).as_deref(),
            Some("Bearer second"),
            "last good token kept"
        );
        assert_eq!(auth(&mut Credentials::none()), None);
    }
}
