//! Sending a partition's Raft messages to the other copies: one gRPC channel per
//! peer broker, shared by every group of the queue; each message names its group.

use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{EmptyNode, Snapshot};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sluice_dataplane::server::tls::{TlsError, TlsFiles};
use sluice_proto::replication as pb;
use sluice_proto::replication::replication_client::ReplicationClient;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::convert::{self, Malformed};
use super::{NodeId, TypeConfig, Vote};

/// How brokers that serve mutual TLS reach each other: with the certificate they
/// serve (the operator issues it for serving and for presenting to peers), and
/// they take replication messages only from a client presenting that same
/// certificate, i.e. another broker of the queue, never a sidecar of the same CA.
#[derive(Debug, Clone)]
pub struct PeerTls {
    files: TlsFiles,
    own: CertificateDer<'static>,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerTlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no certificate in it ({why})")]
    Pem { path: String, why: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl PeerTls {
    pub fn load(files: TlsFiles) -> Result<PeerTls, PeerTlsError> {
        let path = files.cert.display().to_string();
        let pem = std::fs::read(&files.cert).map_err(|source| PeerTlsError::Read {
            path: path.clone(),
            source,
        })?;
        let own = CertificateDer::from_pem_slice(&pem).map_err(|e| PeerTlsError::Pem {
            path,
            why: e.to_string(),
        })?;
        Ok(PeerTls { files, own })
    }

    /// Whether a client presented this broker's own certificate.
    pub fn is_peer(&self, presented: Option<&[CertificateDer<'static>]>) -> bool {
        presented.and_then(|c| c.first()) == Some(&self.own)
    }

    fn client(&self, host: &str) -> Result<ClientTlsConfig, TlsError> {
        self.files.client(host)
    }
}

/// Channels to the queue's brokers, by ordinal. Connected lazily and kept: a peer
/// that is down costs a failed connect per attempt, not a stuck call.
pub struct Peers {
    channels: Vec<Option<Channel>>,
}

impl Peers {
    /// `addresses[i]` is broker i's gRPC address (`host:port`); with `tls`, over
    /// mutual TLS. An address that cannot be used leaves that peer unreachable.
    pub fn new(addresses: &[String], tls: Option<&PeerTls>) -> Self {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let channels = addresses
            .iter()
            .map(|a| {
                let mut e = Endpoint::from_shared(format!("{scheme}://{a}")).ok()?;
                if let Some(tls) = tls {
                    let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
                    let with_tls = tls
                        .client(host)
                        .map_err(|err| err.to_string())
                        .and_then(|c| e.tls_config(c).map_err(|err| err.to_string()));
                    e = match with_tls {
                        Ok(e) => e,
                        Err(err) => {
                            tracing::error!(peer = %a, error = %err, "cannot set up TLS to this peer");
                            return None;
                        }
                    };
                }
                Some(
                    e.connect_timeout(Duration::from_secs(1))
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(5))
                        .keep_alive_timeout(Duration::from_secs(5))
                        .connect_lazy(),
                )
            })
            .collect();
        Peers { channels }
    }

    fn channel(&self, node: NodeId) -> Option<Channel> {
        self.channels.get(node as usize).cloned().flatten()
    }
}

/// Makes the clients of one group.
#[derive(Clone)]
pub struct Network {
    peers: Arc<Peers>,
    group: pb::Group,
}

impl Network {
    pub fn new(peers: Arc<Peers>, queue: &str, partition: u32) -> Self {
        Network {
            peers,
            group: pb::Group {
                queue: queue.to_string(),
                partition,
            },
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, _node: &EmptyNode) -> PeerClient {
        PeerClient {
            client: self.peers.channel(target).map(ReplicationClient::new),
            group: self.group.clone(),
            target,
        }
    }
}

pub struct PeerClient {
    client: Option<ReplicationClient<Channel>>,
    group: pb::Group,
    target: NodeId,
}

#[derive(Debug, thiserror::Error)]
#[error("broker {0} has no usable address in the queue's peers")]
struct NoAddress(NodeId);

fn timed<T>(msg: T, ttl: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(ttl);
    req
}

/// A failed call: unreachable (Raft backs off) when the peer could not be asked,
/// a network error when it answered something unusable.
fn rpc_error(status: tonic::Status) -> RPCError<NodeId, EmptyNode, RaftError<NodeId>> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            RPCError::Unreachable(Unreachable::new(&status))
        }
        _ => RPCError::Network(NetworkError::new(&status)),
    }
}

fn malformed(e: Malformed) -> RPCError<NodeId, EmptyNode, RaftError<NodeId>> {
    RPCError::Network(NetworkError::new(&e))
}

impl PeerClient {
    fn client(&self) -> Result<ReplicationClient<Channel>, Unreachable> {
        self.client
            .clone()
            .ok_or_else(|| Unreachable::new(&NoAddress(self.target)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, EmptyNode, RaftError<NodeId>>> {
        let mut client = self.client().map_err(RPCError::Unreachable)?;
        let req = timed(
            convert::append_to(self.group.clone(), &rpc),
            option.hard_ttl(),
        );
        let resp = client.append_entries(req).await.map_err(rpc_error)?;
        convert::append_response_from(resp.into_inner()).map_err(malformed)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, EmptyNode, RaftError<NodeId>>> {
        let mut client = self.client().map_err(RPCError::Unreachable)?;
        let req = timed(
            convert::vote_request_to(self.group.clone(), &rpc),
            option.hard_ttl(),
        );
        let resp = client.vote(req).await.map_err(rpc_error)?;
        convert::vote_response_from(resp.into_inner()).map_err(malformed)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<TypeConfig>,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let mut client = self.client()?;
        let req = timed(
            pb::SnapshotRequest {
                group: Some(self.group.clone()),
                vote: Some(convert::vote_to(&vote)),
                meta: Some(convert::snapshot_meta_to(&snapshot.meta)),
                next_seq: snapshot.snapshot.next_seq,
            },
            option.hard_ttl(),
        );
        let resp = client
            .install_snapshot(req)
            .await
            .map_err(|s| match rpc_error(s) {
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                RPCError::Network(n) => StreamingError::Network(n),
                other => StreamingError::Network(NetworkError::new(&other)),
            })?;
        let vote = convert::vote_from(resp.into_inner().vote)
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        Ok(SnapshotResponse { vote })
    }
}
