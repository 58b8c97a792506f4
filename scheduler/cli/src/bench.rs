//! `hai bench`: starts a local cluster (3 servers, 2 agents, raft fsync on as always) and
//! measures what users of a scheduler feel: acknowledged submissions per second with 1 and 64
//! concurrent clients, submit-to-running latency, and how long the cluster is without a leader
//! after the leader is killed with SIGKILL.
//!
//! Submissions in the rate passes ask for more nodes than exist, so they stay queued (as
//! Slurm's `sbatch --hold` jobs do in `bench/compare-slurm.sh`); the latency pass runs real
//! one-node jobs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ff_harness::hai::{HaiCluster, HaiClusterSpec};
use hai_proto::hai_client::HaiClient;
use hai_proto::{JobRequest, JobSpec, JobState, SubmitRequest};

/// What to measure.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Directory for the cluster (removed afterwards unless --keep).
    #[arg(long, default_value = "hai-bench")]
    dir: PathBuf,
    /// Submissions in each rate pass.
    #[arg(long, default_value_t = 2000)]
    submissions: usize,
    /// Jobs in the latency pass.
    #[arg(long, default_value_t = 100)]
    latency_jobs: usize,
    /// Keep the cluster directory.
    #[arg(long)]
    keep: bool,
}

fn client(cluster: &HaiCluster) -> anyhow::Result<ff_rpc::LeaderClient> {
    let endpoints: Vec<String> = cluster
        .spec()
        .servers_env()
        .split(',')
        .map(String::from)
        .collect();
    Ok(ff_rpc::LeaderClient::new(
        endpoints,
        ff_rpc::ClientOptions {
            total_timeout: Duration::from_secs(20),
            ..ff_rpc::ClientOptions::default()
        },
    )?)
}

async fn submit(
    client: &ff_rpc::LeaderClient,
    token: &str,
    spec: JobSpec,
    request_id: String,
) -> Result<u64, tonic::Status> {
    let request = SubmitRequest {
        spec: Some(spec),
        request_id,
    };
    client
        .call_idempotent(|channel| {
            let request = ff_rpc::with_token(tonic::Request::new(request.clone()), token);
            async move { HaiClient::new(channel).submit(request).await }
        })
        .await
        .map(|reply| reply.job_id)
}

fn queued_job(name: String) -> JobSpec {
    JobSpec {
        name,
        command: vec!["true".into()],
        // More than the cluster has: it stays queued.
        nodes: 1000,
        ..JobSpec::default()
    }
}

/// Acknowledged submissions per second with `clients` concurrent clients.
async fn rate(
    client: &Arc<ff_rpc::LeaderClient>,
    token: &str,
    clients: usize,
    total: usize,
    tag: &str,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (client, token, tag) = (client.clone(), token.to_string(), tag.to_string());
        let share = total / clients + usize::from(c < total % clients);
        tasks.spawn(async move {
            for i in 0..share {
                let name = format!("{tag}-{c}-{i}");
                submit(&client, &token, queued_job(name.clone()), name).await?;
            }
            Ok::<_, tonic::Status>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done?.map_err(|s| anyhow::anyhow!("submission failed: {}", s.message()))?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Acknowledged submissions per second through the CLI: one `hai submit` process per job,
/// `clients` at a time (as `sbatch` is measured).
async fn cli_rate(cluster: &HaiCluster, clients: usize, total: usize) -> anyhow::Result<f64> {
    let exe = std::env::current_exe().context("finding this program")?;
    let env = cluster.cli_env();
    let limit = Arc::new(tokio::sync::Semaphore::new(clients));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..total {
        let (exe, env, limit) = (exe.clone(), env.clone(), limit.clone());
        tasks.spawn(async move {
            let _slot = limit.acquire().await;
            tokio::process::Command::new(exe)
                .args(["submit", "--nodes", "1000", "--", "true"])
                .envs(env)
                .stdout(std::process::Stdio::null())
                .status()
                .await
        });
    }
    while let Some(done) = tasks.join_next().await {
        let status = done??;
        anyhow::ensure!(status.success(), "hai submit failed: {status}");
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs the benchmark and prints its table.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.dir.exists() {
        anyhow::bail!(
            "{} exists; give --dir a new directory (the benchmark starts a fresh cluster)",
            args.dir.display()
        );
    }
    let binary = std::env::current_exe().context("finding this program")?;
    let mut spec = HaiClusterSpec::new(binary, &args.dir, 3, 2, 1, 0);
    spec.base_port = ff_harness::free_port_block(spec.port_count())?;
    println!(
        "# hai bench: 3 servers (raft log fsync'd per batch), 2 agents, in {}",
        args.dir.display()
    );
    let mut cluster = HaiCluster::start(spec, Duration::from_secs(30)).await?;
    let result = measure(&mut cluster, &args).await;
    cluster.stop_all().await;
    if !args.keep {
        let _ = std::fs::remove_dir_all(&args.dir);
    }
    result
}

async fn measure(cluster: &mut HaiCluster, args: &BenchArgs) -> anyhow::Result<()> {
    let client = Arc::new(client(cluster)?);
    let token = cluster.admin_token().to_string();
    // Warm up connections and the leader.
    rate(&client, &token, 4, 40, "warmup").await?;
    let single = rate(&client, &token, 1, args.submissions / 4, "one").await?;
    let many = rate(&client, &token, 64, args.submissions, "many").await?;
    let cli_single = cli_rate(cluster, 1, (args.submissions / 8).max(1)).await?;
    let cli_many = cli_rate(cluster, 64, (args.submissions / 2).max(1)).await?;
    println!("{:<44} {:>12}", "measure", "value");
    println!(
        "{:<44} {:>12.0}",
        "acknowledged submissions/s, 1 client", single
    );
    println!(
        "{:<44} {:>12.0}",
        "acknowledged submissions/s, 64 clients", many
    );
    println!(
        "{:<44} {:>12.0}",
        "hai submit processes/s, 1 client", cli_single
    );
    println!(
        "{:<44} {:>12.0}",
        "hai submit processes/s, 64 clients", cli_many
    );

    let mut latencies = Vec::with_capacity(args.latency_jobs);
    for i in 0..args.latency_jobs {
        let spec = JobSpec {
            name: format!("latency-{i}"),
            command: vec!["true".into()],
            nodes: 1,
            ..JobSpec::default()
        };
        let started = Instant::now();
        let id = submit(&client, &token, spec, format!("latency-{i}"))
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        loop {
            let job = client
                .call_idempotent(|channel| {
                    let request =
                        ff_rpc::with_token(tonic::Request::new(JobRequest { job_id: id }), &token);
                    async move { HaiClient::new(channel).get_job(request).await }
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            if job.state() != JobState::Pending {
                latencies.push(started.elapsed());
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "job {id} did not start within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Let it finish so that the next job finds a free node.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    latencies.sort();
    println!(
        "{:<44} {:>12.1}",
        "submit -> running p50 (ms)",
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0
    );
    println!(
        "{:<44} {:>12.1}",
        "submit -> running p99 (ms)",
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0
    );

    let leader = cluster
        .wait_for_leader(None, Duration::from_secs(10))
        .await?;
    cluster.server(leader)?.kill().await?;
    let killed = Instant::now();
    cluster
        .wait_for_leader(Some(leader), Duration::from_secs(30))
        .await?;
    let elected = killed.elapsed();
    submit(
        &client,
        &token,
        queued_job("after-failover".into()),
        "after-failover".into(),
    )
    .await
    .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    let serving = killed.elapsed();
    println!(
        "{:<44} {:>12.0}",
        "leader killed -> new leader (ms)",
        elected.as_secs_f64() * 1000.0
    );
    println!(
        "{:<44} {:>12.0}",
        "leader killed -> submission acknowledged (ms)",
        serving.as_secs_f64() * 1000.0
    );
    Ok(())
}
