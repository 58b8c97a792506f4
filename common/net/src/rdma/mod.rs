//! The RDMA verbs backend of ff-net (feature `rdma`): devices and registered memory
//! (`verbs`), a bounded pool of registered buffers (`pool`), and links — connected queue pairs set up over TCP (`link`).

mod link;
mod pool;
mod verbs;

pub use link::{Link, LinkError, RemoteBuf};
pub use pool::RegisteredPool;
pub use verbs::{Device, ProtectionDomain, RdmaError, RegisteredMemory};
