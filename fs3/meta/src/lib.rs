//! fs3-meta: the metadata service of fs3.
//!
//! - [`keys`]: how inodes, directory entries, sessions and the rest are keyed in redb.
//! - [`perm`]: POSIX permission checks.
//! - [`namespace`]: the namespace operations, deterministic, inside the apply transaction.
//! - [`machine`]: the ff-raft state machine over them.
//! - [`service`]: the gRPC API (authentication, clock, truncation on storage).
//! - [`maintenance`]: heartbeats to mgmtd and the leader's housekeeping (chain tables,
//!   expired sessions, garbage collection).
//! - [`metrics`]: the replica's Prometheus series.
//! - [`server`]: a running replica.

pub mod config;
pub mod keys;
pub mod machine;
pub mod maintenance;
pub mod metrics;
pub mod namespace;
pub mod perm;
pub mod server;
pub mod service;

pub use config::MetaConfig;
pub use server::{Meta, MetaError};
pub use service::{MetaApi, new_token, token_hash};
