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
use sluice_proto::replication as pb;
use sluice_proto::replication::replication_client::ReplicationClient;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

use super::convert::{self, Malformed};
use super::{NodeId, TypeConfig, Vote};

/// Channels to the queue's brokers, by ordinal. Connected lazily and kept: a peer
/// that is down costs a failed connect per attempt, not a stuck call.
pub struct Peers {
    channels: Vec<Option<Channel>>,
}

impl Peers {
    /// `addresses[i]` is broker i's gRPC address (`host:port`).
    pub fn new(addresses: &[String]) -> Self {
        let channels = addresses
            .iter()
            .map(|a| {
                Endpoint::from_shared(format!("http://{a}")).ok().map(|e| {
                    e.connect_timeout(Duration::from_secs(1))
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(5))
                        .keep_alive_timeout(Duration::from_secs(5))
                        .connect_lazy()
                })
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
