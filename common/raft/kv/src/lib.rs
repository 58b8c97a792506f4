//! ff-raft's example daemon: a replicated key-value store.
//!
//! It exists to exercise ff-raft the way fs3 and hai use it — a state machine over redb, a
//! daemon with a config file and `/metrics`, a CLI that follows the leader — and to host the
//! tests and the benchmark that prove the raft layer. The `ff-kv` binary serves a node, talks
//! to a cluster, brings up a local cluster (`up`), runs a failover demo (`demo`) and measures
//! commit throughput (`bench`).

pub mod bench;
pub mod client;
pub mod config;
pub mod demo;
pub mod local;
pub mod machine;
pub mod procs;
pub mod server;

/// Generated command and query types.
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("ffkv.v1");
}

pub use client::{KvClient, KvError};
pub use config::KvConfig;
pub use machine::KvMachine;
pub use server::KvServer;
