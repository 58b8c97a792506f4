//! What the CLI prints: the job table (squeue-like), one job, nodes, users, and rank logs.

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use hai_proto::{Job, JobState};
use hai_server::state::{is_ended, state_name};

use crate::client::Client;

fn now_ms() -> i64 {
    hai_server::service::now_ms()
}

/// Run time so far (every attempt).
fn run_time(job: &Job) -> Duration {
    let current = match job.state() {
        JobState::Running | JobState::Suspending | JobState::Cancelling | JobState::Failing => {
            (now_ms() - job.attempt_started_ms).max(0)
        }
        _ if is_ended(job.state()) && job.attempt_started_ms > 0 && job.placement.is_some() => {
            (job.ended_ms - job.attempt_started_ms).max(0)
        }
        _ => 0,
    };
    Duration::from_millis((job.earlier_run_ms + current).max(0) as u64)
}

fn clock(duration: Duration) -> String {
    let s = duration.as_secs();
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

fn nodes_of(job: &Job) -> String {
    match &job.placement {
        Some(p) if !p.nodes.is_empty() => p
            .nodes
            .iter()
            .map(|n| n.node.as_str())
            .collect::<Vec<_>>()
            .join(","),
        _ => format!("({})", job.spec.as_ref().map_or(0, |s| s.nodes)),
    }
}

/// `hai jobs`.
pub async fn jobs(client: &Client, all: bool, json: bool) -> anyhow::Result<()> {
    let jobs = client.jobs(all).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&jobs.iter().map(job_json).collect::<Vec<_>>())?
        );
        return Ok(());
    }
    println!(
        "{:>6} {:<16} {:<10} {:>5} {:<10} {:>9} {:<20} REASON",
        "ID", "NAME", "USER", "PRI", "STATE", "TIME", "NODES"
    );
    for job in &jobs {
        let spec = job.spec.clone().unwrap_or_default();
        println!(
            "{:>6} {:<16} {:<10} {:>5} {:<10} {:>9} {:<20} {}",
            job.id,
            truncate(&spec.name, 16),
            truncate(&job.owner, 10),
            spec.priority,
            state_name(job.state()),
            clock(run_time(job)),
            truncate(&nodes_of(job), 20),
            job.reason
        );
    }
    Ok(())
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let cut: String = text.chars().take(width - 1).collect();
        format!("{cut}…")
    }
}

fn job_json(job: &Job) -> serde_json::Value {
    let spec = job.spec.clone().unwrap_or_default();
    serde_json::json!({
        "id": job.id,
        "name": spec.name,
        "user": job.owner,
        "priority": spec.priority,
        "state": state_name(job.state()),
        "attempt": job.attempt,
        "restarts": job.restarts,
        "time_s": run_time(job).as_secs_f64(),
        "nodes": job.placement.as_ref().map(|p| p.nodes.iter().map(|n| serde_json::json!({
            "node": n.node, "first_rank": n.first_rank, "ranks": n.ranks,
            "exited": n.exited, "exit_code": n.exit_code, "exit_detail": n.exit_detail,
        })).collect::<Vec<_>>()),
        "master": job.placement.as_ref().map(|p| format!("{}:{}", p.master_addr, p.master_port)),
        "reason": job.reason,
        "last_stop": job.last_stop,
        "command": spec.command,
        "nodes_wanted": spec.nodes,
        "gpus_per_node": spec.gpus_per_node,
        "grace_ms": spec.grace_ms,
        "time_limit_ms": spec.time_limit_ms,
        "after": spec.after,
        "array_size": spec.array_size,
        "checkpoint_dir": spec.checkpoint_dir,
        "submitted_ms": job.submitted_ms,
        "started_ms": job.started_ms,
        "ended_ms": job.ended_ms,
    })
}

/// `hai show`.
pub async fn job(client: &Client, id: u64, json: bool) -> anyhow::Result<()> {
    let job = client.job(id).await?;
    let value = job_json(&job);
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    if let serde_json::Value::Object(map) = value {
        for (key, value) in map {
            println!("{key:>14}: {value}");
        }
    }
    Ok(())
}

/// `hai nodes`.
pub async fn nodes(client: &Client, json: bool) -> anyhow::Result<()> {
    let reply = client.nodes().await?;
    let rows: Vec<serde_json::Value> = reply
        .nodes
        .iter()
        .zip(&reply.usage)
        .map(|(node, used)| {
            let state = match (node.state(), node.drain) {
                (hai_proto::NodeState::Down, _) => "down",
                (_, true) => "draining",
                _ => "up",
            };
            serde_json::json!({
                "node": node.name, "host": node.host, "state": state,
                "gpus": format!("{}/{}", used.gpus, node.gpus),
                "cpus": format!("{}/{}", used.cpus, node.cpus),
                "memory_mb": format!("{}/{}", used.memory_mb, node.memory_mb),
                "jobs": used.jobs,
                "heartbeat_age_ms": node.heartbeat_age_ms,
                "reason": node.down_reason,
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<9} {:>7} {:>7} {:>13} {:<12} REASON",
        "NODE", "STATE", "GPUS", "CPUS", "MEMORY_MB", "JOBS"
    );
    for row in rows {
        let text = |k: &str| row[k].as_str().unwrap_or_default().to_string();
        println!(
            "{:<16} {:<9} {:>7} {:>7} {:>13} {:<12} {}",
            text("node"),
            text("state"),
            text("gpus"),
            text("cpus"),
            text("memory_mb"),
            row["jobs"].to_string(),
            text("reason")
        );
    }
    Ok(())
}

/// `hai admin user list`.
pub async fn users(client: &Client) -> anyhow::Result<()> {
    for user in client.users().await? {
        let quotas: Vec<String> = user
            .quotas
            .iter()
            .map(|q| format!("{}={}", q.priority, q.max_nodes))
            .collect();
        println!(
            "{}{}{}",
            user.name,
            if user.admin { " admin" } else { "" },
            if quotas.is_empty() {
                String::new()
            } else {
                format!(" quotas {}", quotas.join(","))
            }
        );
    }
    Ok(())
}

/// `hai logs`: the rank logs of the job's latest attempt that ran (or `attempt`), read from the
/// log directory its nodes write to (shared by the nodes in production: the fs3 mount).
pub async fn logs(
    client: &Client,
    id: u64,
    rank: Option<u32>,
    attempt: Option<u32>,
    follow: bool,
) -> anyhow::Result<()> {
    let job = client.job(id).await?;
    let nodes = client.nodes().await?.nodes;
    let log_dirs: Vec<PathBuf> = {
        let mut dirs: Vec<PathBuf> = nodes.iter().map(|n| PathBuf::from(&n.log_dir)).collect();
        dirs.sort();
        dirs.dedup();
        dirs
    };
    let attempt = attempt.unwrap_or_else(|| {
        // A requeued job's latest attempt has not run yet: show the one before.
        if job.placement.is_none() && job.attempt > 0 {
            job.attempt - 1
        } else {
            job.attempt
        }
    });
    let files: Vec<PathBuf> = log_dirs
        .iter()
        .map(|d| d.join(id.to_string()).join(format!("attempt-{attempt}")))
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.ends_with(".log") && rank.is_none_or(|r| name == format!("rank-{r}.log"))
        })
        .collect();
    let mut files = files;
    // In rank order.
    files.sort_by_key(|p| {
        p.file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.strip_prefix("rank-"))
            .and_then(|r| r.parse::<u32>().ok())
    });
    if files.is_empty() {
        bail!(
            "no logs of job {id} attempt {attempt} under {} (is the log directory shared with this machine?)",
            log_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut offsets = vec![0u64; files.len()];
    let many = files.len() > 1;
    loop {
        for (file, offset) in files.iter().zip(offsets.iter_mut()) {
            let Ok(mut handle) = std::fs::File::open(file) else {
                continue;
            };
            handle.seek(SeekFrom::Start(*offset))?;
            let mut text = String::new();
            handle.read_to_string(&mut text)?;
            *offset += text.len() as u64;
            let label = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            let mut out = std::io::stdout().lock();
            for line in text.lines() {
                if many {
                    writeln!(out, "[{label}] {line}")?;
                } else {
                    writeln!(out, "{line}")?;
                }
            }
        }
        if !follow || is_ended(client.job(id).await?.state()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
