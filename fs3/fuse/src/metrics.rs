//! Prometheus series of a FUSE mount: kernel requests by operation and outcome with their
//! latency (as the application sees it: a write-behind write is answered before it reaches
//! storage), bytes read and written, open files, and write-back failures.

use ff_metrics::RequestMetrics;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every kernel request the mount answers, by the name its series carry.
pub const OPS: [&str; 22] = [
    "lookup",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "create",
    "read",
    "write",
    "flush",
    "fsync",
    "release",
    "opendir",
    "readdir",
    "releasedir",
    "statfs",
];

/// The metrics of one mount.
#[derive(Clone, Debug)]
pub struct FuseMetrics {
    /// Kernel requests, by operation and outcome, and their latency.
    pub(crate) requests: RequestMetrics,
    /// File bytes returned to readers and accepted from writers.
    bytes: IntCounterVec,
    /// Files open through the mount.
    pub(crate) open_files: IntGauge,
    /// Background (write-behind) writes that failed; the writer sees the error at its next
    /// write, fsync or close.
    pub(crate) writeback_errors: IntCounter,
}

impl FuseMetrics {
    /// Registers the series (and `fs3_fuse_build_info`) in `registry`.
    pub fn register(registry: &Registry) -> Result<FuseMetrics, prometheus::Error> {
        ff_metrics::register_build_info(registry, "fs3_fuse")?;
        let requests = RequestMetrics::register(registry, "fs3_fuse", "FUSE", &OPS)?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "fs3_fuse_bytes_total",
                "File bytes read and written through the mount",
            ),
            &["direction"],
        )?;
        for direction in ["read", "write"] {
            bytes.with_label_values(&[direction]);
        }
        let open_files = IntGauge::new("fs3_fuse_open_files", "Files open through the mount")?;
        let writeback_errors = IntCounter::new(
            "fs3_fuse_writeback_errors_total",
            "Write-behind writes that failed after the kernel was answered",
        )?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(open_files.clone()))?;
        registry.register(Box::new(writeback_errors.clone()))?;
        Ok(FuseMetrics {
            requests,
            bytes,
            open_files,
            writeback_errors,
        })
    }

    pub(crate) fn read(&self, bytes: usize) {
        self.bytes.with_label_values(&["read"]).inc_by(bytes as u64);
    }

    pub(crate) fn written(&self, bytes: u64) {
        self.bytes.with_label_values(&["write"]).inc_by(bytes);
    }
}
