//! A small tmpfs mounted for a test: a disk that fills up on purpose. Mounting needs root;
//! without it the caller decides whether to skip (never under `CI=true`).

use std::path::{Path, PathBuf};

/// A mounted tmpfs, unmounted on drop.
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_mib` MiB on `path` (created if missing).
    pub fn mount(path: &Path, size_mib: u64) -> anyhow::Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| anyhow::anyhow!("cannot run mount: {e}"))?;
        anyhow::ensure!(
            output.status.success(),
            "cannot mount a tmpfs on {} (needs root): {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: a daemon that still holds files open must not keep the mount alive.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}
