//! `fs3`: the one binary of the fs3 file system — its daemons and its operator commands. The
//! command line lives here, as a library, so that `fireflyer` can carry it as a subcommand.

mod admin;
mod bench;
mod bench_fs;
mod files;
mod mount;
mod up;

use std::path::PathBuf;

use anyhow::bail;
use clap::{Parser, Subcommand};
use ff_raft::DaemonArgs;
use fs3_meta::{Meta, MetaConfig};
use fs3_mgmtd::{Mgmtd, MgmtdConfig};
use fs3_storage::{StorageConfig, StorageDaemon};

#[derive(Parser)]
#[command(
    name = "fs3",
    version,
    about = "fs3: a 3FS-style distributed file system"
)]
struct Cli {
    /// How client commands (admin, mount, files) reach the cluster.
    #[command(flatten)]
    connect: files::Connect,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a cluster manager replica.
    Mgmtd(DaemonArgs),
    /// Run a storage daemon (its targets, CRAQ replication and recovery).
    Storage(DaemonArgs),
    /// Run a metadata service replica (the namespace).
    Meta(DaemonArgs),
    /// Mount fs3 with FUSE, in the foreground until Ctrl-C or SIGTERM.
    Mount {
        /// An empty directory.
        mountpoint: PathBuf,
        /// Mount options: allow_other, ro, nonempty, cache_timeout=SECONDS, threads=N.
        #[arg(short = 'o', value_delimiter = ',')]
        options: Vec<String>,
        /// Serve the mount's Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9105).
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<String>,
    },
    #[command(flatten)]
    Files(files::FileCmd),
    /// Run a whole local cluster (mgmtd, storage and meta daemons as processes) until Ctrl-C.
    Up {
        /// Directory for configs, data and logs; reused by later runs.
        #[arg(long, default_value = "fs3-local")]
        dir: PathBuf,
        /// mgmtd replicas (1 or 3).
        #[arg(long, default_value_t = 1)]
        mgmtd_replicas: u64,
        /// Storage daemons.
        #[arg(long, default_value_t = 3)]
        storage: u64,
        /// Targets per storage daemon.
        #[arg(long, default_value_t = 1)]
        targets: u64,
        /// Replicas per chain.
        #[arg(long, default_value_t = 3)]
        replication: u32,
        /// meta replicas (1 or 3).
        #[arg(long, default_value_t = 1)]
        meta_replicas: u64,
        /// First port: mgmtd replicas, then storage daemons, meta replicas, metrics endpoints.
        #[arg(long, default_value_t = 8000)]
        port: u16,
    },
    /// Measure fs3 next to the hardware it runs on.
    Bench {
        #[command(subcommand)]
        command: BenchCmd,
    },
    /// Inspect and change the cluster through mgmtd.
    Admin {
        /// Print JSON instead of tables.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: admin::AdminCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Raw O_DIRECT disk rates, then a local cluster's (replication 1 and 3) chunk write, read
    /// and random-read rates, with their ratios to the disk.
    Storage {
        /// Directory on the disk to measure (its benchmark files are removed afterwards).
        #[arg(long, default_value = "fs3-bench")]
        dir: PathBuf,
        /// Bytes per sequential pass.
        #[arg(long, default_value = "1GiB")]
        size: ff_config::ByteSize,
        /// Requests in flight in sequential passes (raw and client alike).
        #[arg(long, default_value_t = 16)]
        depth: usize,
        /// Requests in flight in random 4 KiB reads.
        #[arg(long, default_value_t = 32)]
        random_depth: usize,
        /// Duration of each random-read pass.
        #[arg(long, default_value = "5s")]
        random_time: ff_config::Duration,
        /// I/O backend: io-uring or psync.
        #[arg(long, value_enum, default_value = "io-uring")]
        io: IoArg,
        /// Replication factors to measure, a local cluster each (comma separated).
        #[arg(long, value_delimiter = ',', default_value = "1,3")]
        replication: Vec<u32>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One workload on an fs3 mount, a local directory and (optionally) GlusterFS, side by
    /// side: sequential write and cold read, 4 KiB random reads, create/stat/unlink.
    Fs(FsBenchArgs),
}

/// `fs3 bench fs` options (see `bench_fs`).
#[derive(clap::Args)]
struct FsBenchArgs {
    /// Working directory: a local cluster and its mount, and the local comparison directory.
    #[arg(long, default_value = "fs3-bench-fs")]
    dir: PathBuf,
    /// Measure this existing fs3 mount instead of starting a local cluster.
    #[arg(long)]
    mount: Option<PathBuf>,
    /// Also measure this GlusterFS mount (see scripts/glusterfs-bench-setup.sh).
    #[arg(long)]
    gluster: Option<PathBuf>,
    /// Size of the sequential file.
    #[arg(long, default_value = "1GiB")]
    size: ff_config::ByteSize,
    /// Files created, stated and unlinked per metadata pass.
    #[arg(long, default_value_t = 5000)]
    files: usize,
    /// Duration of the random-read pass.
    #[arg(long, default_value = "10s")]
    random_time: ff_config::Duration,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `IoBackend` on the command line.
#[derive(Clone, Copy, clap::ValueEnum)]
enum IoArg {
    IoUring,
    Psync,
}

/// Runs the `fs3` command line `args` (the program name first); returns the exit code.
pub fn main_with(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return error.exit_code();
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("fs3: cannot start: {error}");
            return 1;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("fs3: {error:#}");
            1
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let connect = cli.connect;
    match cli.command {
        Cmd::Mgmtd(args) => {
            let Some(config) = args.config::<MgmtdConfig>()? else {
                return Ok(());
            };
            let mgmtd = Mgmtd::start(config).await?;
            ff_config::systemd::notify_ready();
            let failure =
                ff_raft::until_stopped(mgmtd.daemon().node(), args.exit_with_parent).await?;
            mgmtd.shutdown().await;
            failure.map_or(Ok(()), |reason| bail!("raft node stopped: {reason}"))
        }
        Cmd::Meta(args) => {
            let Some(config) = args.config::<MetaConfig>()? else {
                return Ok(());
            };
            let meta = Meta::start(config).await?;
            ff_config::systemd::notify_ready();
            let failure =
                ff_raft::until_stopped(meta.daemon().node(), args.exit_with_parent).await?;
            meta.shutdown().await;
            failure.map_or(Ok(()), |reason| bail!("raft node stopped: {reason}"))
        }
        Cmd::Storage(args) => {
            let Some(config) = args.config::<StorageConfig>()? else {
                return Ok(());
            };
            let storage = StorageDaemon::start(config).await?;
            ff_config::systemd::notify_ready();
            ff_raft::stop_signal(args.exit_with_parent).await?;
            tracing::info!("stopping");
            storage.shutdown().await;
            Ok(())
        }
        Cmd::Up {
            dir,
            mgmtd_replicas: mgmtd,
            storage,
            targets,
            replication,
            meta_replicas: meta,
            port,
        } => {
            up::run(
                up::Up {
                    dir,
                    mgmtd,
                    storage,
                    targets,
                    replication,
                    meta,
                    port,
                },
                async { Ok(ff_raft::stop_signal(false).await?) },
            )
            .await
        }
        Cmd::Bench {
            command:
                BenchCmd::Storage {
                    dir,
                    size,
                    depth,
                    random_depth,
                    random_time,
                    io,
                    replication,
                    json,
                },
        } => {
            anyhow::ensure!(depth > 0 && random_depth > 0, "depths must be at least 1");
            anyhow::ensure!(
                replication.iter().all(|r| (1..=16).contains(r)),
                "--replication factors must be from 1 to 16"
            );
            bench::run(bench::StorageBench {
                dir,
                size,
                depth,
                random_depth,
                random_time: random_time.get(),
                io: match io {
                    IoArg::IoUring => fs3_storage::io::IoBackend::IoUring,
                    IoArg::Psync => fs3_storage::io::IoBackend::Psync,
                },
                replications: replication,
                json,
            })
            .await
        }
        Cmd::Bench {
            command: BenchCmd::Fs(args),
        } => {
            anyhow::ensure!(args.files >= 16, "--files must be at least 16");
            bench_fs::run(bench_fs::FsBench {
                dir: args.dir,
                mount: args.mount,
                gluster: args.gluster,
                size: args.size,
                files: args.files,
                random_time: args.random_time.get(),
                json: args.json,
            })
            .await
        }
        Cmd::Admin { json, command } => {
            let client = admin::client(connect.mgmtd.clone())?;
            admin::run(command, &client, &connect, json).await
        }
        Cmd::Mount {
            mountpoint,
            options,
            metrics_addr,
        } => {
            ff_raft::init_logging();
            mount::run(mountpoint, &options, metrics_addr, &connect, async {
                Ok(ff_raft::stop_signal(false).await?)
            })
            .await
        }
        Cmd::Files(command) => files::run(command, &connect).await,
    }
}
