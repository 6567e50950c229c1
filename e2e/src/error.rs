//! Errors of the e2e library (the agent, the network, the DNS server, the harness).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{cmd}: {detail}")]
    Command { cmd: String, detail: String },
    #[error("i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("i/o: {0}")]
    PlainIo(#[from] std::io::Error),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("pod {pod}: {detail}")]
    Pod { pod: String, detail: String },
    #[error("no binary for image {image:?} / command {command:?} in {dir}")]
    NoBinary {
        image: String,
        command: String,
        dir: PathBuf,
    },
    #[error("dns: {0}")]
    Dns(#[from] hickory_proto::ProtoError),
}

pub type Result<T> = std::result::Result<T, Error>;

pub fn io_at(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
