//! Sending a partition's Raft messages to the other copies: one gRPC channel per
//! peer broker, shared by every group of the queue; each message names its group.
//! AppendEntries and Vote travel on one long-lived `Exchange` stream per peer
//! ([`Link`]): a unary call per message cost an HTTP/2 stream, headers and a task at
//! both ends, and a write makes four of them. A peer without `Exchange` (an older
//! broker during an upgrade) gets the unary calls.

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
use sluice_proto::replication::peer_answer::Answer;
use sluice_proto::replication::peer_call::Call;
use sluice_proto::replication::replication_client::ReplicationClient;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
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
    peers: Vec<Option<Arc<Peer>>>,
}

/// One peer broker: its channel, and the `Exchange` stream its calls share.
pub struct Peer {
    channel: Channel,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    /// The peer answered `Exchange` with UNIMPLEMENTED: unary calls from now on.
    unary: AtomicBool,
}

/// An open `Exchange` stream: calls go out on `calls`; the answers are matched to
/// who waits for them by id. Once the stream ends, every waiting call fails as
/// unreachable and the next call opens another.
struct Link {
    calls: mpsc::UnboundedSender<pb::PeerCall>,
    /// Who waits for which answer; None once the stream ended.
    waiting: Mutex<Option<HashMap<u64, oneshot::Sender<Answer>>>>,
    next_id: AtomicU64,
}

impl Link {
    fn is_open(&self) -> bool {
        self.waiting.lock().unwrap().is_some()
    }

    /// The stream ended: every call still waiting fails (its sender is dropped).
    fn close(&self) {
        self.waiting.lock().unwrap().take();
    }

    async fn call(&self, call: Call, ttl: Duration) -> Result<Answer, tonic::Status> {
        let ended = || tonic::Status::unavailable("the replication stream to the peer ended");
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap()
            .as_mut()
            .ok_or_else(ended)?
            .insert(id, tx);
        let sent = self.calls.send(pb::PeerCall {
            id,
            call: Some(call),
        });
        if sent.is_err() {
            self.close();
            return Err(ended());
        }
        match tokio::time::timeout(ttl, rx).await {
            Ok(answer) => answer.map_err(|_| ended()),
            Err(_) => {
                if let Some(w) = self.waiting.lock().unwrap().as_mut() {
                    w.remove(&id);
                }
                Err(tonic::Status::deadline_exceeded(format!(
                    "no answer from the peer within {ttl:?}"
                )))
            }
        }
    }
}

impl Peer {
    fn new(channel: Channel) -> Self {
        Peer {
            channel,
            link: tokio::sync::Mutex::new(None),
            unary: AtomicBool::new(false),
        }
    }

    fn client(&self) -> ReplicationClient<Channel> {
        ReplicationClient::new(self.channel.clone())
    }

    /// The open stream, opened if there is none; None when the peer has no
    /// `Exchange`.
    async fn link(&self, ttl: Duration) -> Result<Option<Arc<Link>>, tonic::Status> {
        if self.unary.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let mut slot = self.link.lock().await;
        if let Some(link) = slot.as_ref().filter(|l| l.is_open()) {
            return Ok(Some(link.clone()));
        }
        let (calls, outbound) = mpsc::unbounded_channel();
        let outbound = tokio_stream::wrappers::UnboundedReceiverStream::new(outbound);
        let opened = tokio::time::timeout(ttl, self.client().exchange(outbound)).await;
        let answers = match opened {
            Ok(Ok(answers)) => answers.into_inner(),
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                tracing::info!("peer has no replication stream: unary calls");
                self.unary.store(true, Ordering::Relaxed);
                return Ok(None);
            }
            Ok(Err(s)) => return Err(s),
            Err(_) => {
                return Err(tonic::Status::deadline_exceeded(
                    "opening the replication stream timed out",
                ));
            }
        };
        let link = Arc::new(Link {
            calls,
            waiting: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU64::new(0),
        });
        tokio::spawn(read_answers(answers, Arc::downgrade(&link)));
        *slot = Some(link.clone());
        Ok(Some(link))
    }
}

/// Hands each answer to the call waiting for it, until the stream ends or nobody
/// holds the link any more.
async fn read_answers(mut answers: tonic::Streaming<pb::PeerAnswer>, link: std::sync::Weak<Link>) {
    loop {
        let next = answers.message().await;
        let Some(link) = link.upgrade() else { return };
        match next {
            Ok(Some(pb::PeerAnswer {
                id,
                answer: Some(answer),
            })) => {
                let waiter = link
                    .waiting
                    .lock()
                    .unwrap()
                    .as_mut()
                    .and_then(|w| w.remove(&id));
                if let Some(w) = waiter {
                    let _ = w.send(answer);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                link.close();
                return;
            }
        }
    }
}

impl Peers {
    /// `addresses[i]` is broker i's gRPC address (`host:port`); with `tls`, over
    /// mutual TLS. An address that cannot be used leaves that peer unreachable.
    pub fn new(addresses: &[String], tls: Option<&PeerTls>) -> Self {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let peers = addresses
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
                Some(Arc::new(Peer::new(
                    e.connect_timeout(Duration::from_secs(1))
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(5))
                        .keep_alive_timeout(Duration::from_secs(5))
                        .connect_lazy(),
                )))
            })
            .collect();
        Peers { peers }
    }

    fn peer(&self, node: NodeId) -> Option<Arc<Peer>> {
        self.peers
            .get(super::ordinal(node) as usize)
            .cloned()
            .flatten()
    }

    /// The node id of broker `ordinal`'s copy of `queue`'s `partition`.
    pub async fn copy_id(
        &self,
        ordinal: u32,
        queue: &str,
        partition: u32,
    ) -> Result<NodeId, tonic::Status> {
        let peer = self.peer(NodeId::from(ordinal)).ok_or_else(|| {
            tonic::Status::unavailable(format!("broker {ordinal} has no usable address"))
        })?;
        let group = pb::Group {
            queue: queue.to_string(),
            partition,
            to: None,
        };
        let resp = peer
            .client()
            .copy_id(timed(group, Duration::from_secs(5)))
            .await?;
        let node = resp.into_inner().node;
        if super::ordinal(node) != ordinal {
            return Err(tonic::Status::internal(format!(
                "broker {ordinal} named a copy of broker {}",
                super::ordinal(node)
            )));
        }
        Ok(node)
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
                to: None,
            },
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, _node: &EmptyNode) -> PeerClient {
        PeerClient {
            peer: self.peers.peer(target),
            group: pb::Group {
                to: Some(target),
                ..self.group.clone()
            },
            target,
        }
    }
}

pub struct PeerClient {
    peer: Option<Arc<Peer>>,
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
    fn peer(&self) -> Result<&Arc<Peer>, Unreachable> {
        self.peer
            .as_ref()
            .ok_or_else(|| Unreachable::new(&NoAddress(self.target)))
    }

    fn client(&self) -> Result<ReplicationClient<Channel>, Unreachable> {
        self.peer().map(|p| p.client())
    }

    /// The peer's stream; None when the peer takes unary calls only.
    async fn link(
        &self,
        ttl: Duration,
    ) -> Result<Option<Arc<Link>>, RPCError<NodeId, EmptyNode, RaftError<NodeId>>> {
        let peer = self.peer().map_err(RPCError::Unreachable)?;
        // Other groups' calls may be opening the stream: waiting for them counts.
        match tokio::time::timeout(ttl, peer.link(ttl)).await {
            Ok(link) => link.map_err(rpc_error),
            Err(_) => Err(rpc_error(tonic::Status::deadline_exceeded(
                "opening the replication stream timed out",
            ))),
        }
    }
}

/// A call on a stream: its answer, or the failure it carries as its unary method
/// would have failed.
async fn exchange(
    link: &Link,
    call: Call,
    ttl: Duration,
) -> Result<Answer, RPCError<NodeId, EmptyNode, RaftError<NodeId>>> {
    match link.call(call, ttl).await.map_err(rpc_error)? {
        Answer::Failure(f) => Err(rpc_error(tonic::Status::new(
            tonic::Code::from(f.code),
            f.message,
        ))),
        answer => Ok(answer),
    }
}

fn unexpected() -> RPCError<NodeId, EmptyNode, RaftError<NodeId>> {
    malformed(Malformed("an answer of another kind than the call"))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, EmptyNode, RaftError<NodeId>>> {
        let req = convert::append_to(self.group.clone(), &rpc);
        let ttl = option.hard_ttl();
        let resp = match self.link(ttl).await? {
            Some(link) => match exchange(&link, Call::AppendEntries(req), ttl).await? {
                Answer::AppendEntries(resp) => resp,
                _ => return Err(unexpected()),
            },
            None => {
                let mut client = self.client().map_err(RPCError::Unreachable)?;
                client
                    .append_entries(timed(req, ttl))
                    .await
                    .map_err(rpc_error)?
                    .into_inner()
            }
        };
        convert::append_response_from(resp).map_err(malformed)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, EmptyNode, RaftError<NodeId>>> {
        let req = convert::vote_request_to(self.group.clone(), &rpc);
        let ttl = option.hard_ttl();
        let resp = match self.link(ttl).await? {
            Some(link) => match exchange(&link, Call::Vote(req), ttl).await? {
                Answer::Vote(resp) => resp,
                _ => return Err(unexpected()),
            },
            None => {
                let mut client = self.client().map_err(RPCError::Unreachable)?;
                client
                    .vote(timed(req, ttl))
                    .await
                    .map_err(rpc_error)?
                    .into_inner()
            }
        };
        convert::vote_response_from(resp).map_err(malformed)
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

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::raft::AppendEntriesResponse;
    use sluice_proto::replication::replication_server::{Replication, ReplicationServer};
    use std::net::SocketAddr;
    use std::pin::Pin;
    use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
    use tonic::{Request, Response, Status, Streaming};

    fn success() -> pb::AppendEntriesResponse {
        pb::AppendEntriesResponse {
            result: Some(pb::append_entries_response::Result::Success(pb::Blank {})),
        }
    }

    /// A peer that takes every AppendEntries, counting those that came on the
    /// stream and those that came unary; without `streams`, it has no `Exchange`
    /// (an older broker). On the stream it answers each pair of calls in the
    /// reverse order of arrival: callers must find their answers by id.
    #[derive(Clone, Default)]
    struct FakePeer {
        streams: bool,
        opened: Arc<AtomicU64>,
        streamed: Arc<AtomicU64>,
        unary: Arc<AtomicU64>,
    }

    type Answers = Pin<Box<dyn futures::Stream<Item = Result<pb::PeerAnswer, Status>> + Send>>;

    #[tonic::async_trait]
    impl Replication for FakePeer {
        async fn append_entries(
            &self,
            _: Request<pb::AppendEntriesRequest>,
        ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
            self.unary.fetch_add(1, Ordering::Relaxed);
            Ok(Response::new(success()))
        }

        async fn vote(
            &self,
            _: Request<pb::VoteRequest>,
        ) -> Result<Response<pb::VoteResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn install_snapshot(
            &self,
            _: Request<pb::SnapshotRequest>,
        ) -> Result<Response<pb::SnapshotResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn copy_id(
            &self,
            _: Request<pb::Group>,
        ) -> Result<Response<pb::CopyIdResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        type ExchangeStream = Answers;

        async fn exchange(
            &self,
            request: Request<Streaming<pb::PeerCall>>,
        ) -> Result<Response<Answers>, Status> {
            if !self.streams {
                return Err(Status::unimplemented("an older broker"));
            }
            self.opened.fetch_add(1, Ordering::Relaxed);
            let streamed = self.streamed.clone();
            let mut calls = request.into_inner();
            let (answers, out) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok(Some(call)) = calls.message().await {
                    streamed.fetch_add(1, Ordering::Relaxed);
                    held.push(call.id);
                    if held.len() == 2 {
                        for id in held.drain(..).rev() {
                            let _ = answers.send(Ok(pb::PeerAnswer {
                                id,
                                answer: Some(Answer::AppendEntries(success())),
                            }));
                        }
                    }
                }
            });
            Ok(Response::new(Box::pin(UnboundedReceiverStream::new(out))))
        }
    }

    async fn serve(peer: FakePeer) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ReplicationServer::new(peer))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        addr
    }

    /// Ten AppendEntries at once from ten groups' clients to broker 0 at `addr`.
    async fn ten_appends(addr: SocketAddr) -> Vec<AppendEntriesResponse<NodeId>> {
        let peers = Arc::new(Peers::new(&[addr.to_string()], None));
        let calls = (0..10).map(|p| {
            let mut network = Network::new(peers.clone(), "orders", p);
            async move {
                let mut client = network.new_client(0, &EmptyNode {}).await;
                let rpc = AppendEntriesRequest {
                    vote: Vote::new(1, 1),
                    prev_log_id: None,
                    entries: vec![],
                    leader_commit: None,
                };
                client
                    .append_entries(rpc, RPCOption::new(Duration::from_secs(5)))
                    .await
                    .unwrap()
            }
        });
        futures::future::join_all(calls).await
    }

    #[tokio::test]
    async fn calls_share_one_stream_and_each_finds_its_answer() {
        let peer = FakePeer {
            streams: true,
            ..Default::default()
        };
        let answers = ten_appends(serve(peer.clone()).await).await;
        assert!(answers.iter().all(|a| *a == AppendEntriesResponse::Success));
        let seen = (
            peer.opened.load(Ordering::Relaxed),
            peer.streamed.load(Ordering::Relaxed),
            peer.unary.load(Ordering::Relaxed),
        );
        assert_eq!(seen, (1, 10, 0));
    }

    #[tokio::test]
    async fn a_peer_without_the_stream_gets_unary_calls() {
        let peer = FakePeer::default();
        let answers = ten_appends(serve(peer.clone()).await).await;
        assert!(answers.iter().all(|a| *a == AppendEntriesResponse::Success));
        let seen = (
            peer.streamed.load(Ordering::Relaxed),
            peer.unary.load(Ordering::Relaxed),
        );
        assert_eq!(seen, (0, 10));
    }
}
