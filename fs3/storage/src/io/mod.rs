//! Block I/O of a target: Direct I/O reads, writes and data syncs on the target's files,
//! through io_uring (one ring and one submission thread per target) or, as a fallback chosen in
//! config, positional syscalls on the blocking pool.

mod psync;
mod uring;

use std::fs::File;
use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::buf::{AlignedBuf, AlignedPool};

pub use uring::UringIo;

/// Which syscall interface a target's I/O goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoBackend {
    /// io_uring: one ring per target, many operations in flight, no thread per operation.
    IoUring,
    /// `pread`/`pwrite`/`fdatasync` on the blocking thread pool; for kernels without io_uring.
    Psync,
}

/// The I/O engine of one target, with the pool its buffers come from.
#[derive(Debug)]
pub struct Io {
    backend: Backend,
    pool: AlignedPool,
}

#[derive(Debug)]
enum Backend {
    /// See [`IoBackend::IoUring`].
    Uring(UringIo),
    /// See [`IoBackend::Psync`].
    Psync,
}

/// Idle buffers a target keeps for reuse.
const POOL_LIMIT: usize = 64 << 20;

impl Io {
    /// Starts the backend; `depth` is the io_uring queue depth.
    pub fn start(backend: IoBackend, depth: u32, name: &str) -> io::Result<Io> {
        let backend = match backend {
            IoBackend::IoUring => Backend::Uring(UringIo::start(depth, name)?),
            IoBackend::Psync => Backend::Psync,
        };
        Ok(Io {
            backend,
            pool: AlignedPool::new(POOL_LIMIT),
        })
    }

    /// The pool buffers for this target's I/O come from.
    pub fn pool(&self) -> &AlignedPool {
        &self.pool
    }

    /// Reads `len` bytes (a multiple of 4 KiB) at `offset` (4 KiB-aligned).
    pub async fn read_at(
        &self,
        file: &Arc<File>,
        offset: u64,
        len: usize,
    ) -> io::Result<AlignedBuf> {
        let buf = self.pool.zeroed(len);
        match &self.backend {
            Backend::Uring(uring) => uring.read_at(file.clone(), offset, buf).await,
            Backend::Psync => psync::read_at(file.clone(), offset, buf).await,
        }
    }

    /// Writes all of `buf` (length a multiple of 4 KiB) at `offset` (4 KiB-aligned); gives the
    /// buffer back for reuse.
    pub async fn write_at(
        &self,
        file: &Arc<File>,
        offset: u64,
        buf: AlignedBuf,
    ) -> io::Result<AlignedBuf> {
        match &self.backend {
            Backend::Uring(uring) => uring.write_at(file.clone(), offset, buf).await,
            Backend::Psync => psync::write_at(file.clone(), offset, buf).await,
        }
    }

    /// Makes the file's data durable (`fdatasync`).
    pub async fn sync_data(&self, file: &Arc<File>) -> io::Result<()> {
        match &self.backend {
            Backend::Uring(uring) => uring.sync_data(file.clone()).await,
            Backend::Psync => psync::sync_data(file.clone()).await,
        }
    }
}

/// Opens (creating if needed) a file for Direct I/O.
pub fn open_direct(path: &std::path::Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn round_trip(backend: IoBackend) {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(open_direct(&dir.path().join("f")).unwrap());
        let io = Io::start(backend, 32, "test").unwrap();
        // Many writes in flight at once.
        let writes = (0..64u64).map(|i| {
            let mut buf = AlignedBuf::zeroed(8192);
            buf.as_mut_slice().fill(i as u8);
            io.write_at(&file, i * 8192, buf)
        });
        for write in futures::future::join_all(writes).await {
            write.unwrap();
        }
        io.sync_data(&file).await.unwrap();
        for i in 0..64u64 {
            let buf = io.read_at(&file, i * 8192, 8192).await.unwrap();
            assert!(buf.as_slice().iter().all(|b| *b == i as u8), "block {i}");
        }
        // Reading past the end is an error, not silently short data.
        assert!(io.read_at(&file, 64 * 8192, 4096).await.is_err());
        // Misaligned Direct I/O is refused by the kernel with a clear error.
        assert!(io.read_at(&file, 100, 4096).await.is_err());
    }

    #[tokio::test]
    async fn uring_round_trip() {
        round_trip(IoBackend::IoUring).await;
    }

    #[tokio::test]
    async fn psync_round_trip() {
        round_trip(IoBackend::Psync).await;
    }
}
