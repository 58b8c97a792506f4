//! `fs3 up`: a whole fs3 cluster on this machine, as real processes, in the foreground until
//! Ctrl-C or SIGTERM. The cluster lives in one directory; running `fs3 up` again on it brings
//! back the same cluster with its data (the options it was created with are kept in
//! `DIR/up.json`, and different ones are refused rather than silently ignored).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ff_harness::fs3::{Fs3Cluster, Fs3ClusterSpec};
use serde_json::json;

/// The shape of a local cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Up {
    /// Directory for configs, data and logs.
    pub dir: PathBuf,
    /// mgmtd replicas.
    pub mgmtd: u64,
    /// Storage daemons.
    pub storage: u64,
    /// Targets per storage daemon.
    pub targets: u64,
    /// Replicas per chain.
    pub replication: u32,
    /// meta replicas.
    pub meta: u64,
    /// First port (mgmtd replicas, then storage daemons, then metrics endpoints).
    pub port: u16,
}

impl Up {
    fn record(&self) -> serde_json::Value {
        json!({
            "mgmtd": self.mgmtd,
            "storage": self.storage,
            "targets": self.targets,
            "replication": self.replication,
            "meta": self.meta,
            "port": self.port,
        })
    }

    /// Checks the options against those the directory's cluster was created with (and records
    /// them for a new directory).
    fn check_directory(&self) -> anyhow::Result<()> {
        let path = self.dir.join("up.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let recorded: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("{} is damaged", path.display()))?;
                anyhow::ensure!(
                    recorded == self.record(),
                    "{} holds a cluster created with {recorded}; run with those options, or \
                     choose another --dir",
                    self.dir.display()
                );
                Ok(())
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&self.dir)
                    .with_context(|| format!("cannot create {}", self.dir.display()))?;
                std::fs::write(&path, self.record().to_string())
                    .with_context(|| format!("cannot write {}", path.display()))
            }
            Err(error) => Err(error).with_context(|| format!("cannot read {}", path.display())),
        }
    }
}

/// Runs the cluster until `stop` resolves.
pub async fn run(
    mut up: Up,
    stop: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    // Daemons find their files from any working directory.
    up.dir = std::path::absolute(&up.dir)
        .with_context(|| format!("invalid --dir {}", up.dir.display()))?;
    anyhow::ensure!(up.mgmtd >= 1, "--mgmtd-replicas must be at least 1");
    anyhow::ensure!(up.meta >= 1, "--meta-replicas must be at least 1");
    anyhow::ensure!(
        up.storage >= 1 && up.targets >= 1,
        "--storage and --targets must be at least 1"
    );
    anyhow::ensure!(
        up.replication >= 1 && u64::from(up.replication) <= up.storage,
        "--replication must be between 1 and the number of storage daemons ({})",
        up.storage
    );
    up.check_directory()?;
    let binary = std::env::current_exe().context("cannot find the fs3 binary")?;
    let mut spec = Fs3ClusterSpec::new(
        binary,
        &up.dir,
        up.mgmtd,
        up.storage,
        up.replication,
        up.port,
    );
    spec.targets_per_node = up.targets;
    spec.meta_replicas = up.meta;
    spec.gc_delay = Duration::from_secs(300);
    spec.session_lease = Duration::from_secs(60);
    spec.lease = Duration::from_secs(5);
    spec.raft_tick = Duration::from_millis(100);
    eprintln!(
        "starting {} mgmtd, {} storage daemons x {} targets, replication {}, {} meta in {} ...",
        up.mgmtd,
        up.storage,
        up.targets,
        up.replication,
        up.meta,
        up.dir.display()
    );
    let mut cluster = Fs3Cluster::start(spec, Duration::from_secs(60))
        .await
        .with_context(|| {
            format!(
                "the cluster did not come up; logs are in {}",
                up.dir.display()
            )
        })?;
    let mgmtd = cluster.mgmtd_endpoints().join(",");
    println!("fs3 is up: every chain serving.");
    println!("  mgmtd:   {mgmtd}");
    for (name, addr) in cluster.metrics_endpoints() {
        println!("  metrics: {name} http://{addr}/metrics");
    }
    let token = cluster.admin_token_path();
    println!("  token:   {} (the administrator's)", token.display());
    println!("  logs:    {}/*.log", up.dir.display());
    println!(
        "Try: export FS3_MGMTD={mgmtd} FS3_TOKEN_FILE={}",
        token.display()
    );
    println!("     fs3 admin status; fs3 ls /; mkdir -p /mnt/fs3 && fs3 mount /mnt/fs3");
    println!("Ctrl-C stops the cluster; `fs3 up` with the same --dir brings it back.");
    let result = stop.await;
    eprintln!("stopping ...");
    cluster.stop_all().await;
    result
}
