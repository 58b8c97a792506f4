//! hfreduce: collective communication for CPU ranks, after HFReduce in the Fire-Flyer AI-HPC
//! paper — allreduce (sum, avg, min, max), broadcast, reduce-scatter, all-gather, all-to-all
//! with uneven splits, and barrier, over f32, f64, f16, bf16 (reduced in f32), i32 and i64;
//! each blocking or asynchronous.
//!
//! - [`config`]: a rank's place in the job, from the scheduler's environment.
//! - [`wire`]: what travels between ranks over ff-net (mailbox, aborts, rendezvous store).
//! - [`dtype`]: element types and reduction kernels.
//! - [`comm`]: the communicator and its collectives.
//! - [`bucket`]: gradient bucketing (averaged asynchronously as buckets fill, as PyTorch DDP).
//! - `node`: allreduce's node stage (ranks of a node through `/dev/shm`, leaders on the network).
//! - `tree`: allreduce over a double binary tree (small messages, many members).
//! - [`error`]: failures, naming ranks and calls.

pub mod bucket;
pub mod comm;
pub mod config;
pub mod dtype;
pub mod error;
mod node;
mod tree;
pub mod wire;

pub use bucket::Buckets;
pub use comm::{Communicator, Handle};
pub use config::CommConfig;
pub use dtype::{DType, Element, ReduceOp};
pub use error::CommError;
pub use half::{bf16, f16};
