//! Disk space for tests: checking there is enough before writing a lot, and scratch space in
//! memory for files that need no disk (sources and copies compared against what a cluster
//! stored), so that tests on machines with little free disk fail only for want of it, and
//! say so.

use anyhow::{Context, bail};
use std::path::Path;

/// Bytes free for an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> anyhow::Result<u64> {
    let stat =
        nix::sys::statvfs::statvfs(path).with_context(|| format!("statvfs {}", path.display()))?;
    Ok(stat.blocks_available() * stat.fragment_size())
}

/// Fails, naming `needed` and what is free, when the filesystem holding `path` has less than
/// `needed` bytes free: `what` says what would write them.
pub fn require_free(path: &Path, needed: u64, what: &str) -> anyhow::Result<()> {
    let free = free_bytes(path)?;
    if free < needed {
        bail!(
            "{what} needs {} MiB free on the filesystem of {}; it has {} MiB",
            needed >> 20,
            path.display(),
            free >> 20
        );
    }
    Ok(())
}

/// A temporary directory for `bytes` of scratch files: in memory (`/dev/shm`) where the
/// machine has one with room for them, else under the usual temporary directory. Not for
/// files opened with O_DIRECT: tmpfs refuses it.
pub fn memory_scratch(bytes: u64) -> anyhow::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() && free_bytes(shm).is_ok_and(|free| free >= bytes) {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    };
    dir.context("creating a scratch directory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_than_the_disk_holds_is_refused_with_both_figures() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        require_free(dir.path(), 1, "one byte").unwrap();
        let error = require_free(dir.path(), u64::MAX, "everything")
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("everything needs "), "{error}");
        assert!(error.contains("MiB free on the filesystem of"), "{error}");
    }

    #[test]
    fn memory_scratch_is_writable_and_removed_when_dropped() {
        let dir = memory_scratch(1 << 20).unwrap();
        let path = dir.path().to_path_buf();
        std::fs::write(path.join("x"), b"x").unwrap();
        drop(dir);
        assert!(!path.exists());
    }
}
