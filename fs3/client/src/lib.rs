//! fs3-client: what applications (and fs3's own services) use to reach fs3.
//!
//! - [`routing`]: mgmtd's routing information, indexed, cached and refreshed on staleness.
//! - [`chunks`]: chunk reads and writes over CRAQ chains.
//! - [`fs`]: the file-system client (namespace through meta, file data through chunks).

pub mod chunks;
pub mod fs;
pub mod routing;

pub use fs::{Fs3, Fs3Options, FsError, WriteSession};

/// The root directory's inode id.
pub const ROOT: u64 = 1;

/// Largest file length (as ext4 with 4 KiB blocks): beyond it, EFBIG. It also bounds the work of
/// cutting or collecting a file's chunks.
pub const MAX_FILE_SIZE: u64 = 16 << 40;

pub use chunks::{ChunkClient, ChunkData, ChunkUpdate};
pub use routing::{Routing, RoutingCache};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The chunk (or file) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The storage is full.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// The request is malformed or out of range.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// No replica could serve the request within the deadline.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// mgmtd could not be reached.
    #[error("mgmtd: {0}")]
    Mgmtd(String),
    /// The replica read holds a damaged copy (its checksum does not match).
    #[error("corrupt replica: {0}")]
    Corrupt(String),
    /// A storage service failed.
    #[error("storage: {0}")]
    Storage(String),
    /// A peer sent something malformed.
    #[error("protocol: {0}")]
    Protocol(String),
}
