//! ff-harness: real processes on one machine, for tests, demos and benchmarks.
//!
//! - [`raft`]: asking a raft group's replicas who leads.
//! - [`process`]: one supervised child process (start, SIGTERM with grace, SIGKILL, log file).
//! - [`ports`]: finding free loopback ports, refusing ports already in use.
//! - [`fs3`]: a local fs3 cluster (mgmtd replicas and storage daemons as processes).
//! - [`hai`]: a local hai cluster (server replicas and node agents as processes).
//! - [`tmpfs`]: a small tmpfs, for disks that fill up on purpose.
//! - [`disk`]: free space checked before big writes; scratch space in memory.
//!
//! Errors here are reported to the person running a test or demo, so they are `anyhow`
//! errors carrying context rather than typed errors for a caller to match on.

pub mod disk;
pub mod fs3;
pub mod hai;
pub mod ports;
pub mod process;
pub mod raft;
pub mod tmpfs;

pub use ports::{ensure_free, free_port_block};
pub use process::ChildProcess;
pub use tmpfs::Tmpfs;

/// Whether RDMA tests can run here (an RDMA device exists, as in the Soft-RoCE guest of
/// `integration/rdma/qemu-test.sh`). Without one they skip with a printed reason, except in CI,
/// where the guest must have run them: there a missing device fails.
pub fn rdma_device_here() -> bool {
    let here = std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some());
    if !here {
        assert!(
            std::env::var("CI").is_err(),
            "RDMA tests need a device: run them through integration/rdma/qemu-test.sh"
        );
        eprintln!("skipping: no RDMA device (run integration/rdma/qemu-test.sh)");
    }
    here
}

/// One process of a local cluster, as `fireflyer up` lists them in `cluster.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProcessInfo {
    /// What it is: `mgmtd`, `storage`, `meta`, `hai-server`, `hai-agent`, `fuse`.
    pub role: String,
    /// Its name in the cluster (`storage-2`, `node-1`).
    pub name: String,
    /// Its process id, if it runs.
    pub pid: Option<u32>,
    /// Where it serves (empty if nowhere).
    pub address: String,
    /// Where its `/metrics` are (empty if nowhere).
    pub metrics: String,
}

/// Why a readiness probe did not succeed yet.
#[derive(Debug)]
pub enum NotReady {
    /// Not yet; worth asking again.
    Pending(String),
    /// Never will be (a process died): stop waiting.
    Failed(String),
}

impl From<String> for NotReady {
    fn from(reason: String) -> Self {
        NotReady::Pending(reason)
    }
}

/// Polls `probe` every `interval` until it yields a value, fails for good, or `timeout`
/// passes; the error then names `what` and the last reason `probe` gave.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: std::time::Duration,
    interval: std::time::Duration,
    mut probe: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, NotReady>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(value) => return Ok(value),
            Err(NotReady::Failed(reason)) => anyhow::bail!("{what}: {reason}"),
            Err(NotReady::Pending(reason)) => {
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!("{what}: not reached within {timeout:?}; last: {reason}");
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}
