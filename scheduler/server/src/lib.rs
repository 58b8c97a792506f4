//! hai-server: the scheduler of the HAI Platform part of fireflyer. Jobs, nodes and users live
//! in an ff-raft group; the leader alone schedules, and commits every decision through raft, so
//! a new leader continues exactly where the old one stopped.
//!
//! - [`config`]: a replica's configuration.
//! - [`state`]: the replicated records and every transition a committed command makes.
//! - [`machine`]: the ff-raft state machine over them.
//! - [`plan`]: the scheduling policy as a pure function (priority, gang placement, backfill,
//!   preemption, pending reasons).
//! - [`service`]: the `Hai` and `Agent` gRPC services; the leader's node liveness and its
//!   scheduling loop.
//! - [`server`]: a running replica.

pub mod config;
pub mod machine;
pub mod metrics;
pub mod plan;
pub mod server;
pub mod service;
pub mod state;

pub use config::ServerConfig;
pub use server::{Server, ServerError};
