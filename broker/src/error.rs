//! The broker's error type and its gRPC status.

use crate::log::LogError;
use crate::partition::EnqueueRefused;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// A replicated partition's copy here does not lead it.
    #[error("{}", not_leader_text(.queue, *.partition, *.leader))]
    NotLeader {
        queue: String,
        partition: u32,
        leader: Option<u32>,
    },
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Refused(#[from] EnqueueRefused),
    #[error(transparent)]
    Config(#[from] sluice_config::ConfigError),
    #[error(transparent)]
    Invalid(#[from] sluice_dataplane::Invalid),
}

use sluice_dataplane::partitioning::LEADER_METADATA;

fn not_leader_text(queue: &str, partition: u32, leader: Option<u32>) -> String {
    match leader {
        Some(l) => format!(
            "partition {partition} of queue {queue} is led by broker {l}, not this one; send through the sidecar"
        ),
        None => format!(
            "partition {partition} of queue {queue} has no leader right now (an election is under way); try again shortly"
        ),
    }
}

impl BrokerError {
    pub fn code(&self) -> Code {
        match self {
            BrokerError::InvalidArgument(_) | BrokerError::Config(_) | BrokerError::Invalid(_) => {
                Code::InvalidArgument
            }
            BrokerError::NotFound(_) => Code::NotFound,
            BrokerError::FailedPrecondition(_) => Code::FailedPrecondition,
            BrokerError::ResourceExhausted(_)
            | BrokerError::Refused(_)
            | BrokerError::Log(LogError::DiskFull { .. }) => Code::ResourceExhausted,
            BrokerError::Unavailable(_) | BrokerError::Log(_) | BrokerError::NotLeader { .. } => {
                Code::Unavailable
            }
            BrokerError::Internal(_) => Code::Internal,
            BrokerError::Unauthenticated(_) => Code::Unauthenticated,
            BrokerError::PermissionDenied(_) => Code::PermissionDenied,
        }
    }

    /// The same error again (for answering every caller of a failed group).
    pub fn clone_status(&self) -> BrokerError {
        if let BrokerError::NotLeader {
            queue,
            partition,
            leader,
        } = self
        {
            return BrokerError::NotLeader {
                queue: queue.clone(),
                partition: *partition,
                leader: *leader,
            };
        }
        match self.code() {
            Code::ResourceExhausted => BrokerError::ResourceExhausted(self.to_string()),
            Code::InvalidArgument => BrokerError::InvalidArgument(self.to_string()),
            Code::NotFound => BrokerError::NotFound(self.to_string()),
            Code::FailedPrecondition => BrokerError::FailedPrecondition(self.to_string()),
            Code::Internal => BrokerError::Internal(self.to_string()),
            Code::Unauthenticated => BrokerError::Unauthenticated(self.to_string()),
            Code::PermissionDenied => BrokerError::PermissionDenied(self.to_string()),
            _ => BrokerError::Unavailable(self.to_string()),
        }
    }
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        let mut status = Status::new(e.code(), e.to_string());
        if let BrokerError::NotLeader { leader, .. } = e {
            let value = leader.map_or("none".to_string(), |l| l.to_string());
            status
                .metadata_mut()
                .insert(LEADER_METADATA, value.parse().expect("ascii"));
        }
        status
    }
}
