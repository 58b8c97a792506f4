//! fs3-storage: the storage service of fs3.
//!
//! - [`buf`]: 4 KiB-aligned buffers for Direct I/O.
//! - [`io`]: a target's block I/O through io_uring, or positional syscalls as a fallback.
//! - [`engine`]: the chunk engine of a target — copy-on-write chunk versions in size-class
//!   files, metadata and slot allocation in redb, per-block CRC32C.

pub mod buf;
pub mod engine;
pub mod io;
