//! Receiving Raft messages from the other copies: `sluice.replication.v1.Replication`
//! on the broker's gRPC port, handed to the group each message names.

use openraft::Snapshot;
use sluice_proto::replication as pb;
use sluice_proto::replication::replication_server::Replication;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use tonic::{Request, Response, Status};

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

    fn get(&self, group: Option<&pb::Group>) -> Result<Raft, Status> {
        let g = group.ok_or_else(|| Status::invalid_argument("message names no group"))?;
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

#[tonic::async_trait]
impl Replication for ReplicationService {
    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        self.groups.check_peer(&request)?;
        let req = request.into_inner();
        let raft = self.groups.get(req.group.as_ref())?;
        let rpc = convert::append_from(req).map_err(malformed)?;
        let resp = raft.append_entries(rpc).await.map_err(raft_failed)?;
        Ok(Response::new(convert::append_response_to(&resp)))
    }

    async fn vote(
        &self,
        request: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        self.groups.check_peer(&request)?;
        let req = request.into_inner();
        let raft = self.groups.get(req.group.as_ref())?;
        let rpc = convert::vote_request_from(req).map_err(malformed)?;
        let resp = raft.vote(rpc).await.map_err(raft_failed)?;
        Ok(Response::new(convert::vote_response_to(&resp)))
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
