//! openraft's messages to and from `sluice.replication.v1`, field by field.

use openraft::EntryPayload as RaftPayload;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use sluice_proto::replication as pb;

use super::store::{log_id as make_log_id, membership_of};
use super::{Entry, LogId, Membership, SnapshotMeta, StoredMembership, TypeConfig, Vote};

/// A message from a peer that does not hold together.
#[derive(Debug, thiserror::Error)]
#[error("malformed replication message: {0}")]
pub struct Malformed(pub &'static str);

pub fn vote_to(v: &Vote) -> pb::Vote {
    pb::Vote {
        term: v.leader_id.term,
        node: v.leader_id.node_id,
        committed: v.committed,
    }
}

pub fn vote_from(v: Option<pb::Vote>) -> Result<Vote, Malformed> {
    let v = v.ok_or(Malformed("vote missing"))?;
    Ok(if v.committed {
        Vote::new_committed(v.term, v.node)
    } else {
        Vote::new(v.term, v.node)
    })
}

pub fn log_id_to(l: &LogId) -> pb::LogId {
    pb::LogId {
        term: l.leader_id.term,
        node: l.leader_id.node_id,
        index: l.index,
    }
}

pub fn log_id_from(l: pb::LogId) -> LogId {
    make_log_id(l.term, l.node, l.index)
}

fn opt_log_id_to(l: &Option<LogId>) -> Option<pb::LogId> {
    l.as_ref().map(log_id_to)
}

fn opt_log_id_from(l: Option<pb::LogId>) -> Option<LogId> {
    l.map(log_id_from)
}

pub fn membership_to(m: &Membership) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|c| pb::NodeSet {
                ids: c.iter().copied().collect(),
            })
            .collect(),
        nodes: m.nodes().map(|(id, _)| *id).collect(),
    }
}

pub fn membership_from(m: pb::Membership) -> Membership {
    let configs: Vec<Vec<u64>> = m.configs.into_iter().map(|c| c.ids).collect();
    membership_of(&configs, &m.nodes)
}

fn entry_to(e: &Entry) -> pb::Entry {
    use pb::entry::Payload;
    pb::Entry {
        log_id: Some(log_id_to(&e.log_id)),
        payload: Some(match &e.payload {
            RaftPayload::Blank => Payload::Blank(pb::Blank {}),
            RaftPayload::Normal(records) => Payload::Records(records.clone()),
            RaftPayload::Membership(m) => Payload::Membership(membership_to(m)),
        }),
    }
}

fn entry_from(e: pb::Entry) -> Result<Entry, Malformed> {
    use pb::entry::Payload;
    Ok(Entry {
        log_id: log_id_from(e.log_id.ok_or(Malformed("entry without log id"))?),
        payload: match e.payload.ok_or(Malformed("entry without payload"))? {
            Payload::Blank(_) => RaftPayload::Blank,
            Payload::Records(records) => RaftPayload::Normal(records),
            Payload::Membership(m) => RaftPayload::Membership(membership_from(m)),
        },
    })
}

pub fn append_to(
    group: pb::Group,
    rpc: &AppendEntriesRequest<TypeConfig>,
) -> pb::AppendEntriesRequest {
    pb::AppendEntriesRequest {
        group: Some(group),
        vote: Some(vote_to(&rpc.vote)),
        prev_log_id: opt_log_id_to(&rpc.prev_log_id),
        entries: rpc.entries.iter().map(entry_to).collect(),
        leader_commit: opt_log_id_to(&rpc.leader_commit),
    }
}

pub fn append_from(
    req: pb::AppendEntriesRequest,
) -> Result<AppendEntriesRequest<TypeConfig>, Malformed> {
    Ok(AppendEntriesRequest {
        vote: vote_from(req.vote)?,
        prev_log_id: opt_log_id_from(req.prev_log_id),
        entries: req
            .entries
            .into_iter()
            .map(entry_from)
            .collect::<Result<_, _>>()?,
        leader_commit: opt_log_id_from(req.leader_commit),
    })
}

pub fn append_response_to(r: &AppendEntriesResponse<u64>) -> pb::AppendEntriesResponse {
    use pb::append_entries_response::Result as R;
    pb::AppendEntriesResponse {
        result: Some(match r {
            AppendEntriesResponse::Success => R::Success(pb::Blank {}),
            AppendEntriesResponse::PartialSuccess(m) => R::PartialSuccess(pb::PartialSuccess {
                matching: opt_log_id_to(m),
            }),
            AppendEntriesResponse::Conflict => R::Conflict(pb::Blank {}),
            AppendEntriesResponse::HigherVote(v) => R::HigherVote(vote_to(v)),
        }),
    }
}

pub fn append_response_from(
    r: pb::AppendEntriesResponse,
) -> Result<AppendEntriesResponse<u64>, Malformed> {
    use pb::append_entries_response::Result as R;
    Ok(
        match r
            .result
            .ok_or(Malformed("append response without result"))?
        {
            R::Success(_) => AppendEntriesResponse::Success,
            R::PartialSuccess(p) => {
                AppendEntriesResponse::PartialSuccess(opt_log_id_from(p.matching))
            }
            R::Conflict(_) => AppendEntriesResponse::Conflict,
            R::HigherVote(v) => AppendEntriesResponse::HigherVote(vote_from(Some(v))?),
        },
    )
}

pub fn vote_request_to(group: pb::Group, rpc: &VoteRequest<u64>) -> pb::VoteRequest {
    pb::VoteRequest {
        group: Some(group),
        vote: Some(vote_to(&rpc.vote)),
        last_log_id: opt_log_id_to(&rpc.last_log_id),
    }
}

pub fn vote_request_from(req: pb::VoteRequest) -> Result<VoteRequest<u64>, Malformed> {
    Ok(VoteRequest {
        vote: vote_from(req.vote)?,
        last_log_id: opt_log_id_from(req.last_log_id),
    })
}

pub fn vote_response_to(r: &VoteResponse<u64>) -> pb::VoteResponse {
    pb::VoteResponse {
        vote: Some(vote_to(&r.vote)),
        vote_granted: r.vote_granted,
        last_log_id: opt_log_id_to(&r.last_log_id),
    }
}

pub fn vote_response_from(r: pb::VoteResponse) -> Result<VoteResponse<u64>, Malformed> {
    Ok(VoteResponse {
        vote: vote_from(r.vote)?,
        vote_granted: r.vote_granted,
        last_log_id: opt_log_id_from(r.last_log_id),
    })
}

pub fn snapshot_meta_to(m: &SnapshotMeta) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: opt_log_id_to(&m.last_log_id),
        membership_log_id: opt_log_id_to(m.last_membership.log_id()),
        membership: Some(membership_to(m.last_membership.membership())),
        snapshot_id: m.snapshot_id.clone(),
    }
}

pub fn snapshot_meta_from(m: pb::SnapshotMeta) -> Result<SnapshotMeta, Malformed> {
    Ok(SnapshotMeta {
        last_log_id: opt_log_id_from(m.last_log_id),
        last_membership: StoredMembership::new(
            opt_log_id_from(m.membership_log_id),
            membership_from(
                m.membership
                    .ok_or(Malformed("snapshot without membership"))?,
            ),
        ),
        snapshot_id: m.snapshot_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn append_entries_survive_the_wire() {
        let rpc = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(5, 2),
            prev_log_id: Some(make_log_id(4, 1, 10)),
            entries: vec![
                Entry {
                    log_id: make_log_id(5, 2, 11),
                    payload: RaftPayload::Blank,
                },
                Entry {
                    log_id: make_log_id(5, 2, 12),
                    payload: RaftPayload::Normal(Bytes::from_static(b"records")),
                },
                Entry {
                    log_id: make_log_id(5, 2, 13),
                    payload: RaftPayload::Membership(membership_of(
                        &[vec![0, 1, 2]],
                        &[0, 1, 2, 3],
                    )),
                },
            ],
            leader_commit: Some(make_log_id(5, 2, 11)),
        };
        let group = pb::Group {
            queue: "q".into(),
            partition: 3,
            to: Some(super::super::node_id(1, 7)),
        };
        let back = append_from(append_to(group, &rpc)).unwrap();
        assert_eq!(back.vote, rpc.vote);
        assert_eq!(back.prev_log_id, rpc.prev_log_id);
        assert_eq!(back.entries, rpc.entries);
        assert_eq!(back.leader_commit, rpc.leader_commit);
        for r in [
            AppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(Some(make_log_id(1, 0, 3))),
            AppendEntriesResponse::PartialSuccess(None),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(Vote::new(9, 1)),
        ] {
            assert_eq!(append_response_from(append_response_to(&r)).unwrap(), r);
        }
        assert!(append_from(pb::AppendEntriesRequest::default()).is_err());
    }
}
