//! hai-agent: the node agent of the hai scheduler. It registers its node, heartbeats the
//! leader, follows the leader's assignments for its node, starts each rank as its own process
//! group with the scheduler's environment, suspends (SIGUSR1 plus a flag file) and stops
//! (SIGTERM, then SIGKILL after the grace) them, and reports how they ended.
//!
//! - [`config`]: the agent's configuration.
//! - [`rank`]: ranks as processes under a wrapper that records their exit codes.
//! - [`agent`]: the loop.
//! - [`metrics`]: what the agent serves on `/metrics`.

pub mod agent;
pub mod config;
pub mod metrics;
pub mod rank;

pub use agent::{AgentError, NodeAgent};
pub use config::AgentConfig;
