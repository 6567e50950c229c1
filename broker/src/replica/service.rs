//! Receiving Raft messages from the other copies: `sluice.replication.v1.Replication`
//! on the broker's gRPC port, handed to the group each message names.

use openraft::Snapshot;
use sluice_proto::replication as pb;
use sluice_proto::replication::peer_answer::Answer;
use sluice_proto::replication::peer_call::Call;
use sluice_proto::replication::replication_server::Replication;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::network::PeerTls;
use super::{FloorSnapshot, Raft, convert};

/// The Raft nodes of the replicated partitions this broker holds copies of, and how
/// brokers reach each other.
#[derive(Default)]
pub struct Groups {
    rafts: RwLock<HashMap<(String, u32), Raft>>,
    peer_tls: Option<PeerTls>,
}

impl Groups {
    pub fn new(peer_tls: Option<PeerTls>) -> Self {
        Groups {
            rafts: RwLock::default(),
            peer_tls,
        }
    }

    pub fn peer_tls(&self) -> Option<&PeerTls> {
        self.peer_tls.as_ref()
    }

    /// With TLS, only another broker of the queue may send replication messages.
    fn check_peer<T>(&self, request: &Request<T>) -> Result<(), Status> {
        match &self.peer_tls {
            Some(tls) if !tls.is_peer(request.peer_certs().as_deref().map(Vec::as_slice)) => {
                Err(Status::permission_denied(
                    "replication is open to the queue's brokers only (their certificate)",
                ))
            }
            _ => Ok(()),
        }
    }

    pub fn insert(&self, queue: &str, partition: u32, raft: Raft) {
        self.rafts
            .write()
            .unwrap()
            .insert((queue.to_string(), partition), raft);
    }

    pub fn remove(&self, queue: &str, partition: u32) {
        self.rafts
            .write()
            .unwrap()
            .remove(&(queue.to_string(), partition));
    }

    async fn append_entries(
        &self,
        req: pb::AppendEntriesRequest,
    ) -> Result<pb::AppendEntriesResponse, Status> {
        let raft = self.get(req.group.as_ref())?;
        let rpc = convert::append_from(req).map_err(malformed)?;
        let resp = raft.append_entries(rpc).await.map_err(raft_failed)?;
        Ok(convert::append_response_to(&resp))
    }

    async fn vote(&self, req: pb::VoteRequest) -> Result<pb::VoteResponse, Status> {
        let raft = self.get(req.group.as_ref())?;
        let rpc = convert::vote_request_from(req).map_err(malformed)?;
        let resp = raft.vote(rpc).await.map_err(raft_failed)?;
        Ok(convert::vote_response_to(&resp))
    }

    /// One call from an `Exchange` stream, answered as its unary method would be.
    async fn answer(&self, call: Option<Call>) -> Answer {
        let answered = match call {
            Some(Call::AppendEntries(req)) => {
                self.append_entries(req).await.map(Answer::AppendEntries)
            }
            Some(Call::Vote(req)) => self.vote(req).await.map(Answer::Vote),
            None => Err(Status::invalid_argument("a call without a message")),
        };
        answered.unwrap_or_else(|s| {
            Answer::Failure(pb::Failure {
                code: s.code() as i32,
                message: s.message().to_string(),
            })
        })
    }

    /// The copy a message is for. One meant for another copy of the group on this
    /// broker (an earlier one, since deleted) is refused: its sender's view of the
    /// group is older than this copy, and must not count it.
    fn get(&self, group: Option<&pb::Group>) -> Result<Raft, Status> {
        let g = group.ok_or_else(|| Status::invalid_argument("message names no group"))?;
        let raft = self.copy(g)?;
        if let Some(to) = g.to {
            let here = raft.metrics().borrow().id;
            if to != here {
                return Err(Status::failed_precondition(format!(
                    "partition {} of queue {}: the message is for copy {to}, this broker holds copy {here}",
                    g.partition, g.queue
                )));
            }
        }
        Ok(raft)
    }

    fn copy(&self, g: &pb::Group) -> Result<Raft, Status> {
        self.rafts
            .read()
            .unwrap()
            .get(&(g.queue.clone(), g.partition))
            .cloned()
            // UNAVAILABLE: the sender backs off and tries again (this broker may be
            // replaying the queue's log right now).
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "partition {} of queue {} has no open copy on this broker",
                    g.partition, g.queue
                ))
            })
    }
}

pub struct ReplicationService {
    groups: Arc<Groups>,
}

impl ReplicationService {
    pub fn new(groups: Arc<Groups>) -> Self {
        ReplicationService { groups }
    }
}

fn malformed(e: convert::Malformed) -> Status {
    Status::invalid_argument(e.to_string())
}

fn raft_failed(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("raft: {e}"))
}

type Answers = Pin<Box<dyn futures::Stream<Item = Result<pb::PeerAnswer, Status>> + Send>>;

#[tonic::async_trait]
impl Replication for ReplicationService {
    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        self.groups.check_peer(&request)?;
        let answer = self.groups.append_entries(request.into_inner()).await?;
        Ok(Response::new(answer))
    }

    async fn vote(
        &self,
        request: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        self.groups.check_peer(&request)?;
        let answer = self.groups.vote(request.into_inner()).await?;
        Ok(Response::new(answer))
    }

    type ExchangeStream = Answers;

    /// Each call is answered by a task of its own: an AppendEntries waits for its
    /// fsync, and the other groups' calls must not wait behind it.
    async fn exchange(
        &self,
        request: Request<Streaming<pb::PeerCall>>,
    ) -> Result<Response<Answers>, Status> {
        self.groups.check_peer(&request)?;
        let mut calls = request.into_inner();
        let (answers, out) = mpsc::unbounded_channel();
        let groups = self.groups.clone();
        tokio::spawn(async move {
            while let Ok(Some(call)) = calls.message().await {
                let (groups, answers) = (groups.clone(), answers.clone());
                tokio::spawn(async move {
                    let answer = groups.answer(call.call).await;
                    let _ = answers.send(Ok(pb::PeerAnswer {
                        id: call.id,
                        answer: Some(answer),
                    }));
                });
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(out))))
    }

    async fn copy_id(
        &self,
        request: Request<pb::Group>,
    ) -> Result<Response<pb::CopyIdResponse>, Status> {
        self.groups.check_peer(&request)?;
        let raft = self.groups.copy(request.get_ref())?;
        let node = raft.metrics().borrow().id;
        Ok(Response::new(pb::CopyIdResponse { node }))
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        self.groups.check_peer(&request)?;
        let req = request.into_inner();
        let raft = self.groups.get(req.group.as_ref())?;
        let vote = convert::vote_from(req.vote).map_err(malformed)?;
        let meta = convert::snapshot_meta_from(
            req.meta
                .ok_or_else(|| Status::invalid_argument("snapshot without metadata"))?,
        )
        .map_err(malformed)?;
        let resp = raft
            .install_full_snapshot(
                vote,
                Snapshot {
                    meta,
                    snapshot: Box::new(FloorSnapshot {
                        next_seq: req.next_seq,
                    }),
                },
            )
            .await
            .map_err(raft_failed)?;
        Ok(Response::new(pb::SnapshotResponse {
            vote: Some(convert::vote_to(&resp.vote)),
        }))
    }
}
