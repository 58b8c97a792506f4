//! `ff-kv`: serve a node of the example replicated key-value store, talk to a cluster, bring a
//! local cluster up, run the failover demo, or benchmark commit throughput.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use ff_raft::RaftConfig;
use ff_raft_kv::procs::{ProcessCluster, ProcessClusterSpec};
use ff_raft_kv::{KvClient, KvConfig, bench, demo};

#[derive(Parser)]
#[command(
    name = "ff-kv",
    version,
    about = "ff-raft's example replicated key-value store"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args)]
struct Endpoints {
    /// Cluster members to talk to (host:port, comma separated).
    #[arg(
        long,
        env = "FF_KV_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
    )]
    endpoints: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node.
    Serve(ff_raft::DaemonArgs),
    /// Set a key.
    Put {
        key: String,
        value: String,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Read a key (linearizable).
    Get {
        key: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Delete a key.
    Delete {
        key: String,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// List keys in [start, end) (linearizable).
    Scan {
        #[arg(long, default_value = "")]
        start: String,
        #[arg(long, default_value = "")]
        end: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Show every member's view of the group.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Change the group's membership.
    Member {
        #[command(subcommand)]
        action: MemberCmd,
    },
    /// Move leadership to another voter.
    TransferLeader {
        id: u64,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Start a local cluster of node processes and keep it running until Ctrl-C.
    Up {
        #[command(flatten)]
        local: LocalArgs,
    },
    /// Start a local cluster, write keys, kill the leader, recover, verify every node; then stop.
    Demo {
        #[command(flatten)]
        local: LocalArgs,
        /// Keys written before the leader is killed (a quarter more are written after).
        #[arg(long, default_value_t = 2000)]
        keys: usize,
    },
    /// Measure committed proposals/s and commit latency of a 3-node loopback cluster.
    Bench {
        /// Directory for the nodes' data (the disk being measured); default: a temporary one.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Concurrent proposers, one measurement each.
        #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
        proposers: Vec<usize>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Bytes per value.
        #[arg(long, default_value_t = 64)]
        value_size: usize,
    },
}

#[derive(Subcommand)]
enum MemberCmd {
    /// Add node ID at ADDR: it catches up as a learner, then becomes a voter.
    Add {
        id: u64,
        addr: String,
        /// Keep it a learner (non-voting).
        #[arg(long)]
        learner: bool,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Remove node ID.
    Remove {
        id: u64,
        #[command(flatten)]
        endpoints: Endpoints,
    },
}

#[derive(clap::Args)]
struct LocalArgs {
    /// Directory for configs, data and logs; default: a temporary directory for `demo`,
    /// ./ff-kv-cluster for `up`.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// gRPC port of node 1 (node N uses port+N-1).
    #[arg(long, default_value_t = 7101)]
    port: u16,
    /// Metrics port of node 1 (node N uses port+N-1).
    #[arg(long, default_value_t = 9101)]
    metrics_port: u16,
}

fn client(endpoints: Endpoints) -> anyhow::Result<KvClient> {
    Ok(KvClient::new(
        endpoints.endpoints,
        ff_rpc::ClientOptions::default(),
    )?)
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(error) = run(cli).await {
        eprintln!("ff-kv: {error:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Serve(args) => {
            let Some(config) = args.config::<KvConfig>()? else {
                return Ok(());
            };
            serve(config, args.exit_with_parent).await
        }
        Cmd::Put {
            key,
            value,
            endpoints,
        } => {
            let version = client(endpoints)?
                .put(key.as_bytes(), value.as_bytes())
                .await?;
            println!("{key} = {value} (version {version})");
            Ok(())
        }
        Cmd::Get {
            key,
            json,
            endpoints,
        } => {
            let item = client(endpoints)?.get(key.as_bytes()).await?;
            match (item, json) {
                (Some(item), true) => println!(
                    "{}",
                    serde_json::json!({"key": key, "value": String::from_utf8_lossy(&item.value), "version": item.version})
                ),
                (Some(item), false) => println!("{}", String::from_utf8_lossy(&item.value)),
                (None, true) => println!("null"),
                (None, false) => bail!("key {key:?} not found"),
            }
            Ok(())
        }
        Cmd::Delete { key, endpoints } => {
            let existed = client(endpoints)?.delete(key.as_bytes()).await?;
            println!("{}", if existed { "deleted" } else { "not found" });
            Ok(())
        }
        Cmd::Scan {
            start,
            end,
            limit,
            json,
            endpoints,
        } => {
            let items = client(endpoints)?
                .scan(start.as_bytes(), end.as_bytes(), limit)
                .await?;
            if json {
                let list: Vec<_> = items
                    .iter()
                    .map(|i| {
                        serde_json::json!({
                            "key": String::from_utf8_lossy(&i.key),
                            "value": String::from_utf8_lossy(&i.value),
                            "version": i.version,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                println!("{:<32} {:>8}  VALUE", "KEY", "VERSION");
                for i in items {
                    println!(
                        "{:<32} {:>8}  {}",
                        String::from_utf8_lossy(&i.key),
                        i.version,
                        String::from_utf8_lossy(&i.value)
                    );
                }
            }
            Ok(())
        }
        Cmd::Status { json, endpoints } => status(client(endpoints)?, json).await,
        Cmd::Member { action } => {
            let reply = match action {
                MemberCmd::Add {
                    id,
                    addr,
                    learner,
                    endpoints,
                } => client(endpoints)?.add_member(id, &addr, learner).await?,
                MemberCmd::Remove { id, endpoints } => client(endpoints)?.remove_member(id).await?,
            };
            print_members(&reply);
            Ok(())
        }
        Cmd::TransferLeader { id, endpoints } => {
            let reply = client(endpoints)?.transfer_leader(id).await?;
            println!("node {} leads term {}", reply.leader_id, reply.term);
            Ok(())
        }
        Cmd::Up { local } => up(local).await,
        Cmd::Demo { local, keys } => run_demo(local, keys).await,
        Cmd::Bench {
            dir,
            proposers,
            seconds,
            value_size,
        } => run_bench(dir, &proposers, Duration::from_secs(seconds), value_size).await,
    }
}

async fn serve(config: KvConfig, exit_with_parent: bool) -> anyhow::Result<()> {
    let server = ff_raft_kv::server::start(config).await?;
    let failure = ff_raft::until_stopped(server.node(), exit_with_parent).await?;
    server.shutdown().await;
    match failure {
        Some(reason) => bail!("raft node stopped: {reason}"),
        None => Ok(()),
    }
}

async fn status(client: KvClient, json: bool) -> anyhow::Result<()> {
    let statuses = client.statuses().await;
    if json {
        let list: Vec<_> = statuses
            .iter()
            .map(|(endpoint, status)| match status {
                Ok(s) => serde_json::json!({
                    "endpoint": endpoint, "id": s.id, "role": s.role, "term": s.term,
                    "leader": s.leader_id, "commit_index": s.commit_index,
                    "applied_index": s.applied_index, "first_index": s.first_index,
                    "last_index": s.last_index,
                }),
                Err(e) => serde_json::json!({"endpoint": endpoint, "error": e.to_string()}),
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
        return Ok(());
    }
    println!(
        "{:<22} {:>4} {:<10} {:>6} {:>6} {:>10} {:>10} {:>10}",
        "ENDPOINT", "ID", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED", "FIRST"
    );
    let mut reachable = 0;
    for (endpoint, status) in &statuses {
        match status {
            Ok(s) => {
                reachable += 1;
                println!(
                    "{:<22} {:>4} {:<10} {:>6} {:>6} {:>10} {:>10} {:>10}",
                    endpoint,
                    s.id,
                    s.role,
                    s.term,
                    s.leader_id,
                    s.commit_index,
                    s.applied_index,
                    s.first_index
                );
            }
            Err(e) => println!("{endpoint:<22} unreachable: {e}"),
        }
    }
    if reachable == 0 {
        bail!("no endpoint answered");
    }
    Ok(())
}

fn print_members(reply: &ff_raft::proto::StatusReply) {
    println!("{:>4} {:<8} {:<22}", "ID", "KIND", "ADDRESS");
    for m in &reply.members {
        println!(
            "{:>4} {:<8} {:<22}",
            m.id,
            if m.voter { "voter" } else { "learner" },
            m.addr
        );
    }
}

fn spec(local: &LocalArgs, dir: PathBuf) -> anyhow::Result<ProcessClusterSpec> {
    Ok(ProcessClusterSpec {
        binary: std::env::current_exe().context("cannot find the ff-kv binary")?,
        dir,
        nodes: 3,
        port: local.port,
        metrics_port: local.metrics_port,
        raft: RaftConfig::default(),
    })
}

async fn up(local: LocalArgs) -> anyhow::Result<()> {
    let dir = local
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("ff-kv-cluster"));
    let mut cluster = ProcessCluster::start(spec(&local, dir.clone())?).await?;
    let result = async {
        let (leader, term) = cluster.wait_for_leader(None, Duration::from_secs(30)).await?;
        let endpoints = cluster.endpoints().join(",");
        println!("ff-kv cluster up in {}: node {leader} leads term {term}", dir.display());
        for id in 1..=3 {
            println!(
                "  node {id}: grpc {}  metrics http://{}/metrics  log {}",
                cluster.addr(id).unwrap_or_default(),
                cluster.metrics_addr(id).unwrap_or_default(),
                cluster.log_path(id).map(|p| p.display().to_string()).unwrap_or_default()
            );
        }
        println!("try:  ff-kv put hello world --endpoints {endpoints}");
        println!("      ff-kv get hello --endpoints {endpoints}");
        println!("      ff-kv status --endpoints {endpoints}");
        println!("Ctrl-C stops the cluster; its data stays in {} for the next `up`.", dir.display());
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = terminate.recv() => break,
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    for (id, code) in cluster.exited() {
                        eprintln!("node {id} exited ({code:?}); see {}", cluster.log_path(id).map(|p| p.display().to_string()).unwrap_or_default());
                    }
                }
            }
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    println!("stopping the cluster");
    cluster.stop_all().await;
    result
}

async fn run_demo(local: LocalArgs, keys: usize) -> anyhow::Result<()> {
    let temp;
    let dir = match &local.dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempdir("ff-kv-demo")?;
            temp.path().to_path_buf()
        }
    };
    let mut cluster = ProcessCluster::start(spec(&local, dir)?).await?;
    let result = demo::run(&mut cluster, keys).await;
    cluster.stop_all().await;
    result?;
    println!("demo passed");
    Ok(())
}

async fn run_bench(
    dir: Option<PathBuf>,
    proposers: &[usize],
    time: Duration,
    value_size: usize,
) -> anyhow::Result<()> {
    let temp;
    let dir = match dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            dir
        }
        None => {
            temp = tempdir("ff-kv-bench")?;
            temp.path().to_path_buf()
        }
    };
    println!(
        "ff-raft bench: 3 nodes on loopback, data in {}, fsync on, {value_size}-byte values",
        dir.display()
    );
    let fdatasync = bench::fdatasync_rate(&dir, Duration::from_secs(2))?;
    println!("disk: {fdatasync:.0} fdatasync/s (4 KiB write + fdatasync, one at a time)");
    let rows = bench::run(&dir, proposers, time, value_size).await?;
    println!(
        "{:>10} {:>12} {:>8} {:>8} {:>7} {:>15} {:>14} {:>15}",
        "proposers",
        "proposals/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "entries/fsync",
        "fsync+write ms",
        "vs fdatasync/s"
    );
    for row in rows {
        println!(
            "{:>10} {:>12.0} {:>8.2} {:>8.2} {:>7} {:>15.1} {:>14.2} {:>14.1}x",
            row.proposers,
            row.per_second,
            row.p50.as_secs_f64() * 1000.0,
            row.p99.as_secs_f64() * 1000.0,
            row.errors,
            row.entries_per_fsync,
            row.mean_fsync.as_secs_f64() * 1000.0,
            row.per_second / fdatasync
        );
    }
    Ok(())
}

fn tempdir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix(prefix).tempdir()?)
}
