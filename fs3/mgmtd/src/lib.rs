//! fs3-mgmtd: the cluster manager of fs3.
//!
//! - [`chain`]: how chains change when their targets' local states change (the failure
//!   detector's rules).
//! - [`machine`]: the replicated state (nodes, targets, chains, chain tables, routing version)
//!   as an ff-raft state machine.
//! - [`metrics`]: the replica's Prometheus series.
//! - [`service`]: the gRPC API, heartbeats and the leader's failure detector.
//! - [`server`]: a running replica.

pub mod chain;
pub mod config;
pub mod machine;
pub mod metrics;
pub mod server;
pub mod service;

pub use config::MgmtdConfig;
pub use server::Mgmtd;
pub use service::MgmtdApi;
