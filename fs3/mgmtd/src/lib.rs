//! fs3-mgmtd: the cluster manager of fs3.
//!
//! - [`chain`]: how chains change when their targets' local states change (the failure
//!   detector's rules).
//! - [`machine`]: the replicated state (nodes, targets, chains, chain tables, routing version)
//!   as an ff-raft state machine.

pub mod chain;
pub mod machine;
