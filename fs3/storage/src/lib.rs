//! fs3-storage: the storage service of fs3.
//!
//! - [`buf`]: 4 KiB-aligned buffers for Direct I/O.
//! - [`io`]: a target's block I/O through io_uring, or positional syscalls as a fallback.
//! - [`engine`]: the chunk engine of a target — copy-on-write chunk versions in size-class
//!   files, metadata and slot allocation in redb, per-block CRC32C.
//! - [`service`]: the data service (CRAQ chain writes, reads) over ff-net.
//! - [`recovery`]: the restart protocol, copying chunks to syncing successors, repairs.
//! - [`daemon`]: a running storage daemon (heartbeats, routing, recovery tasks).

pub mod buf;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod io;
pub mod metrics;
pub mod recovery;
pub mod service;

pub use config::{StorageConfig, TargetConfig};
pub use daemon::StorageDaemon;
