//! The positional-syscall fallback: each operation runs on tokio's blocking pool.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::buf::AlignedBuf;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("I/O task failed: {e}")))?
}

pub(super) async fn read_at(
    file: Arc<File>,
    offset: u64,
    mut buf: AlignedBuf,
) -> io::Result<AlignedBuf> {
    blocking(move || {
        file.read_exact_at(buf.as_mut_slice(), offset)?;
        Ok(buf)
    })
    .await
}

pub(super) async fn write_at(
    file: Arc<File>,
    offset: u64,
    buf: AlignedBuf,
) -> io::Result<AlignedBuf> {
    blocking(move || {
        file.write_all_at(buf.as_slice(), offset)?;
        Ok(buf)
    })
    .await
}

pub(super) async fn sync_data(file: Arc<File>) -> io::Result<()> {
    blocking(move || file.sync_data()).await
}
