//! Errors of ff-raft, and the one place they become gRPC statuses.

use ff_rpc::LeaderHint;
use tonic::Status;

/// Why a raft operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    /// This node is not the leader and the request may not be forwarded.
    #[error("node is not the leader{}", hint_text(.leader))]
    NotLeader {
        /// Where the leader is believed to be.
        leader: Option<LeaderHint>,
    },
    /// No leader was known for the whole time allowed.
    #[error("no leader elected within {0:?}")]
    NoLeader(std::time::Duration),
    /// The deadline passed; a proposal may or may not have been applied.
    #[error("timed out after {0:?}; the operation may or may not have taken effect")]
    Timeout(std::time::Duration),
    /// Leadership moved while the request was in flight; it is safe to retry.
    #[error("leadership changed while the request was in flight")]
    LeadershipLost,
    /// The command bytes are not a valid command of the state machine.
    #[error("invalid command: {0}")]
    InvalidCommand(String),
    /// The query bytes are not a valid query of the state machine.
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// A membership change was refused.
    #[error("membership change refused: {0}")]
    Membership(String),
    /// Another membership change is still being applied; retry shortly.
    #[error("another membership change is in progress")]
    MembershipBusy,
    /// The node has stopped (shut down, removed, or failed).
    #[error("raft node stopped: {0}")]
    Stopped(String),
    /// A forwarded request failed at the other end or on the way.
    #[error("forwarding to {addr} failed: {message}")]
    Forward {
        /// The node forwarded to.
        addr: String,
        /// What went wrong.
        message: String,
        /// Whether it is safe to retry.
        retryable: bool,
    },
    /// Durable storage failed or holds something it should not.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The state machine failed.
    #[error("state machine: {0}")]
    StateMachine(#[from] StateMachineError),
    /// raft-rs refused an operation.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ff_config::ConfigError),
}

fn hint_text(leader: &Option<LeaderHint>) -> String {
    match leader {
        Some(hint) => format!("; leader is node {} at {}", hint.id, hint.addr),
        None => "; no leader known".to_string(),
    }
}

impl RaftError {
    /// Whether the same request may simply be sent again.
    pub fn is_retryable(&self) -> bool {
        match self {
            RaftError::NotLeader { .. } | RaftError::LeadershipLost | RaftError::MembershipBusy => {
                true
            }
            RaftError::Forward { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

impl From<RaftError> for Status {
    fn from(error: RaftError) -> Self {
        let message = error.to_string();
        match error {
            RaftError::NotLeader { leader } => ff_rpc::not_leader(message, leader.as_ref()),
            RaftError::NoLeader(_)
            | RaftError::LeadershipLost
            | RaftError::MembershipBusy
            | RaftError::Stopped(_) => Status::unavailable(message),
            RaftError::Forward { retryable, .. } => {
                if retryable {
                    Status::unavailable(message)
                } else {
                    Status::aborted(message)
                }
            }
            RaftError::Timeout(_) => Status::deadline_exceeded(message),
            RaftError::InvalidCommand(_) | RaftError::InvalidQuery(_) | RaftError::Config(_) => {
                Status::invalid_argument(message)
            }
            RaftError::Membership(_) => Status::failed_precondition(message),
            RaftError::Storage(_)
            | RaftError::StateMachine(_)
            | RaftError::Raft(_)
            | RaftError::Metrics(_) => Status::internal(message),
        }
    }
}

/// A failure of durable storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database reported an error.
    #[error("raft storage: {context}: {cause}")]
    Db {
        /// What was being done.
        context: String,
        /// redb's error.
        cause: redb::Error,
    },
    /// The database or a snapshot holds data that cannot be right.
    #[error("raft storage is corrupt: {0}")]
    Corrupt(String),
    /// A file operation failed.
    #[error("raft storage: {context}: {cause}")]
    Io {
        /// What was being done.
        context: String,
        /// What the operating system said.
        cause: std::io::Error,
    },
    /// The data directory belongs to another node or cluster.
    #[error("data directory {dir} belongs to {found}, but this node is configured as {expected}")]
    WrongIdentity {
        /// The directory.
        dir: String,
        /// Who the directory belongs to.
        found: String,
        /// Who this node is configured as.
        expected: String,
    },
}

impl StorageError {
    /// Wraps a redb error with what was being done.
    pub(crate) fn db(context: impl Into<String>, source: impl Into<redb::Error>) -> Self {
        StorageError::Db {
            context: context.into(),
            cause: source.into(),
        }
    }

    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StorageError::Io {
            context: context.into(),
            cause: source,
        }
    }
}

/// A failure inside a state machine.
#[derive(Debug, thiserror::Error)]
pub enum StateMachineError {
    /// The database reported an error.
    #[error("storage: {0}")]
    Storage(#[from] redb::Error),
    /// Reading or writing snapshot data failed.
    #[error("snapshot i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Stored or received data is not what the state machine wrote.
    #[error("corrupt data: {0}")]
    Corrupt(String),
}

macro_rules! redb_into_sm_error {
    ($($t:ty),*) => {$(
        impl From<$t> for StateMachineError {
            fn from(e: $t) -> Self {
                StateMachineError::Storage(e.into())
            }
        }
    )*};
}
redb_into_sm_error!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError
);
