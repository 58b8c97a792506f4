//! `ff-kv bench`: committed proposals per second and commit latency of a three-node cluster
//! on loopback with fsync on, next to the raw fdatasync rate of the same disk.
//!
//! Proposers call the leader's `RaftNode::propose` directly (no client RPC in the path), each
//! waiting for its previous proposal to be applied before sending the next, so the figures are
//! those of replication, durable group commit and apply.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use ff_raft::RaftConfig;

use crate::local::LocalCluster;
use crate::proto::{Command, Put, command};

/// One row of results.
#[derive(Debug, Clone)]
pub struct BenchRow {
    /// Concurrent proposers.
    pub proposers: usize,
    /// Proposals committed and applied per second.
    pub per_second: f64,
    /// Median commit latency.
    pub p50: Duration,
    /// 99th percentile commit latency.
    pub p99: Duration,
    /// Proposals that failed.
    pub errors: u64,
    /// Log entries made durable per leader fsync, on average (the group commit size).
    pub entries_per_fsync: f64,
    /// Mean time of one leader log write including its fsync.
    pub mean_fsync: Duration,
}

/// Measures 4 KiB write + fdatasync round trips per second in `dir` for `time`.
pub fn fdatasync_rate(dir: &Path, time: Duration) -> std::io::Result<f64> {
    let path = dir.join("fdatasync-probe");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let block = vec![0x5au8; 4096];
    let started = Instant::now();
    let mut count = 0u64;
    while started.elapsed() < time {
        file.write_all(&block)?;
        file.sync_data()?;
        count += 1;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Runs one measurement per entry of `proposers` on a fresh three-node cluster under `dir`.
pub async fn run(
    dir: &Path,
    proposers: &[usize],
    time: Duration,
    value_size: usize,
) -> anyhow::Result<Vec<BenchRow>> {
    let cluster = LocalCluster::start(dir, 3, RaftConfig::default()).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    let node = cluster.node(leader)?.clone();
    let value = vec![b'v'; value_size];
    let metrics = cluster
        .metrics_addr(leader)
        .map(|a| a.to_string())
        .ok_or_else(|| anyhow::anyhow!("leader has no metrics endpoint"))?;
    let mut rows = Vec::new();
    for (round, &count) in proposers.iter().enumerate() {
        let before = FsyncStats::read(&metrics).await?;
        let stop_at = Instant::now() + time;
        let mut tasks = Vec::new();
        for writer in 0..count {
            let node = node.clone();
            let value = value.clone();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                let mut seq = 0u64;
                while Instant::now() < stop_at {
                    let command = Command {
                        op: Some(command::Op::Put(Put {
                            key: format!("r{round}-w{writer}-{seq}").into_bytes(),
                            value: value.clone(),
                        })),
                    };
                    seq += 1;
                    let started = Instant::now();
                    match node.propose(command).await {
                        Ok(_) => latencies.push(started.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            }));
        }
        let started = Instant::now();
        let mut latencies = Vec::new();
        let mut errors = 0;
        for task in tasks {
            let (mut l, e) = task.await?;
            latencies.append(&mut l);
            errors += e;
        }
        let elapsed = started.elapsed().as_secs_f64();
        latencies.sort_unstable();
        let fsyncs = FsyncStats::read(&metrics).await?.since(&before);
        rows.push(BenchRow {
            entries_per_fsync: fsyncs.entries / fsyncs.count.max(1.0),
            mean_fsync: Duration::from_secs_f64(fsyncs.seconds / fsyncs.count.max(1.0)),
            proposers: count,
            per_second: latencies.len() as f64 / elapsed,
            p50: percentile(&latencies, 0.50),
            p99: percentile(&latencies, 0.99),
            errors,
        });
    }
    cluster.shutdown().await;
    Ok(rows)
}

/// Totals of the leader's fsync histograms, read from its `/metrics`.
#[derive(Debug, Default)]
struct FsyncStats {
    count: f64,
    seconds: f64,
    entries: f64,
}

impl FsyncStats {
    async fn read(addr: &str) -> anyhow::Result<Self> {
        let body = ff_metrics::http_get(addr, "/metrics").await?;
        let value = |name: &str| -> f64 {
            body.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or(0.0)
        };
        Ok(FsyncStats {
            count: value("raft_fsync_seconds_count "),
            seconds: value("raft_fsync_seconds_sum "),
            entries: value("raft_write_batch_entries_sum "),
        })
    }

    fn since(&self, before: &FsyncStats) -> FsyncStats {
        FsyncStats {
            count: self.count - before.count,
            seconds: self.seconds - before.seconds,
            entries: self.entries - before.entries,
        }
    }
}
