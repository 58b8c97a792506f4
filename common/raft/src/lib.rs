//! ff-raft: the replicated state machine every fireflyer control-plane service stands on.
//!
//! A service implements [`StateMachine`] over redb tables, starts a [`RaftNode`] with a
//! [`RaftConfig`], and serves the node's two gRPC services next to its own:
//! [`RaftNode::peer_service`] (raft traffic between members) and [`RaftNode::raft_service`]
//! (proposals, reads, status, membership). Under the hood:
//!
//! - raft-rs 0.7 `RawNode` (protobuf codec, `check_quorum` and `pre_vote` on) driven by one
//!   tokio task ([`driver`](crate::driver));
//! - log and hard state in `log.redb`, one fsync'd transaction per `Ready` (group commit);
//!   state machine, applied index, configuration and request records in `state.redb`, applied
//!   by a worker thread while the next entries are persisted;
//! - proposals answered once applied, forwarded to the leader from followers, retried across
//!   leader changes with one request id and applied at most once;
//! - linearizable reads through ReadIndex, on any member;
//! - log compaction, and snapshots streamed in chunks to members that fell behind it;
//! - membership changes at runtime, new members catching up as learners before they vote.

mod apply;
mod config;
mod daemon;
mod db;
mod driver;
mod error;
mod log_store;
mod log_writer;
mod logging;
mod metrics;
mod node;
mod process;
pub mod records;
mod request_id;
mod service;
mod snapshot;
mod state_machine;
mod state_store;
mod transport;

/// Generated protobuf and gRPC types of ff-raft's services.
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("ffraft.v1");
}

pub use config::{MemberConfig, RaftConfig, TransportConfig};
pub use daemon::{Daemon, DaemonError};
pub use error::{RaftError, StateMachineError, StorageError};
pub use node::{Consistency, GroupStatus, MemberStatus, RaftNode, Role};
pub use process::{DaemonArgs, init_logging, stop_signal, until_stopped};
pub use request_id::{RequestIds, RequestTicket};
pub use service::{RaftApi, status_reply};
pub use state_machine::{ApplyContext, StateMachine};
pub use transport::PeerService;

/// The redb types a state machine needs, re-exported so that its version always matches.
pub use redb;
