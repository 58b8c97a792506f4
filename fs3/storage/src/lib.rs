//! fs3-storage: the storage service of fs3.
//!
//! - [`buf`]: 4 KiB-aligned buffers for Direct I/O.
//! - [`io`]: a target's block I/O through io_uring, or positional syscalls as a fallback.

pub mod buf;
pub mod io;
