//! The RDMA verbs backend of ff-net (feature `rdma`): devices and registered memory
//! (`verbs`), a bounded pool of registered buffers (`pool`), links — connected queue pairs
//! set up over TCP (`link`) —, what a process's connections share (`context`), the messages of
//! a call (`wire`), and the calling and serving sides of ff-net over a link (`client`,
//! `server`).

pub(crate) mod client;
mod context;
mod link;
mod pool;
pub(crate) mod server;
mod verbs;
mod wire;

pub use context::Context;
pub use link::{Link, LinkError, RemoteBuf};
pub use pool::RegisteredPool;
pub use verbs::{Device, ProtectionDomain, RdmaError, RegisteredMemory};
