//! The whole stack as processes on this machine: an fs3 cluster (1 mgmtd, 1 meta, 3 storage
//! daemons, replication 3), its FUSE mount, and a hai cluster (3 servers, 2 agents as the
//! virtual nodes `node-1` and `node-2`) whose ranks log to the mount — all started from this
//! program through symlinks in `DIR/bin`, from configs generated once under DIR.
//!
//! Layout: `DIR/bin/{fs3,hai,moe-train}`, `DIR/ports.json` (the port block, chosen once),
//! `DIR/fs3/` and `DIR/hai/` (the clusters' configs, data and logs), `DIR/mnt` (the mount),
//! `DIR/cluster.env`, `DIR/cluster.json`, and `DIR/prometheus/` (config, alert rules, and the
//! targets: `prometheus --config.file=DIR/prometheus/prometheus.yml` scrapes the stack).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use ff_harness::ProcessInfo;
use ff_harness::fs3::{Fs3Cluster, Fs3ClusterSpec, Mount};
use ff_harness::hai::{HaiCluster, HaiClusterSpec};
use serde::{Deserialize, Serialize};

/// The Prometheus config for a local stack (`deploy/prometheus/prometheus.yml`).
const PROMETHEUS_CONFIG: &str = include_str!("../../../deploy/prometheus/prometheus.yml");
/// The alert rules (`deploy/prometheus/alerts.yml`).
const PROMETHEUS_ALERTS: &str = include_str!("../../../deploy/prometheus/alerts.yml");

/// How long each part may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// The ports a stack uses, chosen at its first start and kept.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Ports {
    fs3: u16,
    hai: u16,
    /// The mount's metrics (absent in stacks made before the mount served any).
    #[serde(default)]
    fuse_metrics: u16,
}

/// A running stack.
#[derive(Debug)]
pub struct Stack {
    dir: PathBuf,
    /// The fs3 cluster.
    pub fs3: Fs3Cluster,
    /// The FUSE mount.
    pub mount: Mount,
    /// The hai cluster.
    pub hai: HaiCluster,
}

fn link(bin: &Path, name: &str, target: &Path) -> anyhow::Result<()> {
    let path = bin.join(name);
    let _ = std::fs::remove_file(&path);
    std::os::unix::fs::symlink(target, &path).with_context(|| format!("linking {}", path.display()))
}

fn fs3_spec(dir: &Path, port: u16) -> Fs3ClusterSpec {
    let mut spec = Fs3ClusterSpec::new(dir.join("bin/fs3"), dir.join("fs3"), 1, 3, 3, port);
    spec.meta_replicas = 1;
    spec.metrics = true;
    spec
}

fn hai_spec(dir: &Path, port: u16) -> HaiClusterSpec {
    let mut spec = HaiClusterSpec::new(dir.join("bin/hai"), dir.join("hai"), 3, 2, 1, port);
    spec.metrics = true;
    spec.log_dir = dir.join("mnt").join("hai-logs");
    spec
}

impl Stack {
    /// Starts (or restarts) the stack in `dir`, from this program.
    pub async fn start(dir: &Path) -> anyhow::Result<Stack> {
        let exe = std::env::current_exe().context("finding this program")?;
        Stack::start_with(dir, &exe).await
    }

    /// Starts (or restarts) the stack in `dir` from `program` (a `fireflyer` binary).
    pub async fn start_with(dir: &Path, program: &Path) -> anyhow::Result<Stack> {
        std::fs::create_dir_all(dir.join("bin"))?;
        let dir = std::fs::canonicalize(dir)?;
        let exe = std::fs::canonicalize(program)?;
        for name in ["fs3", "hai", "moe-train"] {
            link(&dir.join("bin"), name, &exe)?;
        }
        let ports_path = dir.join("ports.json");
        let mut ports: Ports = match std::fs::read(&ports_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{}", ports_path.display()))?,
            Err(_) => {
                let fs3 = fs3_spec(&dir, 0).port_count();
                let hai = hai_spec(&dir, 0).port_count();
                let base = ff_harness::free_port_block(fs3 + hai + 1)?;
                Ports {
                    fs3: base,
                    hai: base + fs3,
                    fuse_metrics: base + fs3 + hai,
                }
            }
        };
        if ports.fuse_metrics == 0 {
            ports.fuse_metrics = ff_harness::free_port_block(1)?;
        }
        std::fs::write(&ports_path, serde_json::to_vec(&ports)?)?;
        std::fs::create_dir_all(dir.join("fs3"))?;
        std::fs::create_dir_all(dir.join("hai"))?;
        println!("starting fs3 (mgmtd, meta, 3 storage daemons) ...");
        let fs3 = Fs3Cluster::start(fs3_spec(&dir, ports.fs3), START_TIMEOUT).await?;
        fs3.wait_meta_ready(START_TIMEOUT).await?;
        let point = dir.join("mnt");
        if std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == point.to_str())
        {
            // A mount left behind by a stack that was killed: clear it.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&point)
                .status();
        }
        println!("mounting fs3 at {} ...", point.display());
        let mount = Mount::start(&fs3, &point, &dir.join("mount.log"), ports.fuse_metrics).await?;
        println!("starting hai (3 servers, 2 agents) ...");
        let hai = HaiCluster::start(hai_spec(&dir, ports.hai), START_TIMEOUT).await?;
        let stack = Stack {
            dir: dir.clone(),
            fs3,
            mount,
            hai,
        };
        stack.write_files()?;
        Ok(stack)
    }

    /// The stack's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where this program is linked as `name` (fs3, hai, moe-train).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join("bin").join(name)
    }

    /// The mount point.
    pub fn mount_point(&self) -> &Path {
        self.mount.point()
    }

    /// Every process of the stack.
    pub fn processes(&self) -> Vec<ProcessInfo> {
        let mut all = self.fs3.processes();
        all.push(ProcessInfo {
            role: "fuse".to_string(),
            name: "fs3-mount".to_string(),
            pid: self.mount.process.pid(),
            address: self.mount.point().display().to_string(),
            metrics: self.mount.metrics_addr().to_string(),
        });
        all.extend(self.hai.processes());
        all
    }

    /// `cluster.env` (shell exports) and `cluster.json` (every process).
    fn write_files(&self) -> anyhow::Result<()> {
        let env = format!(
            "# source this file to use the cluster from a shell\n\
             export PATH=\"{bin}:$PATH\"\n\
             export FS3_MGMTD={mgmtd}\n\
             export FS3_TOKEN_FILE={fs3_token}\n\
             export FS3_MOUNT={mount}\n\
             export HAI_SERVER={hai}\n\
             export HAI_TOKEN_FILE={hai_token}\n",
            bin = self.dir.join("bin").display(),
            mgmtd = self.fs3.mgmtd_endpoints().join(","),
            fs3_token = self.fs3.admin_token_path().display(),
            mount = self.mount.point().display(),
            hai = self.hai.spec().servers_env(),
            hai_token = self.hai.spec().token_path().display(),
        );
        std::fs::write(self.dir.join("cluster.env"), env)?;
        let json = serde_json::json!({
            "dir": self.dir,
            "mount": self.mount.point(),
            "fs3_mgmtd": self.fs3.mgmtd_endpoints(),
            "hai_servers": self.hai.spec().servers_env(),
            "processes": self.processes(),
        });
        std::fs::write(
            self.dir.join("cluster.json"),
            serde_json::to_vec_pretty(&json)?,
        )?;
        self.write_prometheus()
    }

    /// `DIR/prometheus/`: the deploy config and alert rules, and every metrics endpoint as a
    /// file service-discovery target with its `role`.
    fn write_prometheus(&self) -> anyhow::Result<()> {
        let dir = self.dir.join("prometheus");
        std::fs::create_dir_all(dir.join("targets"))?;
        std::fs::write(dir.join("prometheus.yml"), PROMETHEUS_CONFIG)?;
        std::fs::write(dir.join("alerts.yml"), PROMETHEUS_ALERTS)?;
        let targets: Vec<serde_json::Value> = self
            .processes()
            .into_iter()
            .filter(|p| !p.metrics.is_empty())
            .map(|p| {
                let role = match p.role.as_str() {
                    "mgmtd" | "meta" | "storage" | "fuse" => format!("fs3-{}", p.role),
                    other => other.to_string(),
                };
                serde_json::json!({
                    "targets": [p.metrics],
                    "labels": {"role": role, "name": p.name},
                })
            })
            .collect();
        std::fs::write(
            dir.join("targets").join("fireflyer.json"),
            serde_json::to_vec_pretty(&targets)?,
        )?;
        Ok(())
    }

    /// Stops everything: agents and servers, the mount (unmounted), then fs3.
    pub async fn stop(&mut self) {
        self.hai.stop_all().await;
        self.mount.stop().await;
        self.fs3.stop_all().await;
    }
}

/// `fireflyer up`: starts the stack, prints how to use it, and keeps it up until Ctrl-C or
/// SIGTERM; then stops everything and unmounts.
pub async fn up(dir: &Path) -> anyhow::Result<()> {
    let mut stack = Stack::start(dir).await?;
    let env = stack.dir().join("cluster.env");
    println!(
        "\nfireflyer is up in {dir}\n\
         \n  source {env}\n\
         \nthen, for example:\n\
         \n  ls $FS3_MOUNT; fs3 stat /\n  hai nodes; hai jobs\n  \
         hai submit --nodes 2 -- sh -c 'echo rank $RANK of $WORLD_SIZE on $HAI_NODE'\n\
         \nEvery process (role, pid, address, metrics) is in {json}.\n\
         Ctrl-C stops everything and unmounts; `fireflyer up --dir {dir}` brings it back with its data.",
        dir = stack.dir().display(),
        env = env.display(),
        json = stack.dir().join("cluster.json").display(),
    );
    let stopped = ff_raft::stop_signal(false).await;
    println!("stopping ...");
    stack.stop().await;
    stopped.context("waiting for a signal")?;
    println!("stopped");
    Ok(())
}
