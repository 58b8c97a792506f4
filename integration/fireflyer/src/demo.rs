//! `fireflyer demo`: the stack up, the corpus prepared onto fs3, the MoE model trained on 2
//! nodes under hai (data read from and checkpoints written to fs3, gradients averaged with
//! hfreduce), its progress followed from rank 0's log on the mount, and a summary.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use hai_proto::{EnvVar, JobSpec, JobState};

use crate::stack::Stack;

/// `fireflyer demo` options.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Directory of the stack (reused if present).
    #[arg(long, default_value = "fireflyer-demo")]
    dir: PathBuf,
    /// Training steps.
    #[arg(long, default_value_t = 400)]
    steps: u64,
    /// Keep the stack up afterwards, until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

/// How long the training may take before the demo gives up.
const TRAINING_TIMEOUT: Duration = Duration::from_secs(600);

/// One progress line of rank 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Steps done.
    pub step: u64,
    /// Loss.
    pub loss: f32,
    /// Tokens per second, all ranks.
    pub tokens_per_second: f64,
    /// Smallest and largest expert share.
    pub load: (f32, f32),
}

/// Parses `step 10/400 loss 3.5839 tokens/s 14206 expert load min 0.054 max 0.188 ...`.
pub fn parse_progress(line: &str) -> Option<Progress> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |key: &str| -> Option<&str> {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1).copied())
    };
    if words.first() != Some(&"step") {
        return None;
    }
    Some(Progress {
        step: after("step")?.split('/').next()?.parse().ok()?,
        loss: after("loss")?.parse().ok()?,
        tokens_per_second: after("tokens/s")?.parse().ok()?,
        load: (after("min")?.parse().ok()?, after("max")?.parse().ok()?),
    })
}

/// Parses `finished at step N: first loss A, last loss B`.
pub fn parse_finished(line: &str) -> Option<(f32, f32)> {
    let rest = line.strip_prefix("finished at step ")?;
    let first = rest
        .split("first loss ")
        .nth(1)?
        .split(',')
        .next()?
        .parse()
        .ok()?;
    let last = rest.split("last loss ").nth(1)?.trim().parse().ok()?;
    Some((first, last))
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let began = Instant::now();
    let mut stack = Stack::start(&args.dir).await?;
    let result = train(&stack, args.steps, began).await;
    if args.keep && result.is_ok() {
        println!(
            "\nthe stack stays up: `source {}`; Ctrl-C stops it",
            stack.dir().join("cluster.env").display()
        );
        let _ = ff_raft::stop_signal(false).await;
    }
    println!("stopping the stack ...");
    stack.stop().await;
    result
}

async fn train(stack: &Stack, steps: u64, began: Instant) -> anyhow::Result<()> {
    let mount = stack.mount_point().to_path_buf();
    let data = mount.join("data").join("corpus");
    if !data.join("manifest.json").exists() {
        println!("preparing the corpus on fs3 at {} ...", data.display());
        let status = tokio::process::Command::new(stack.bin("moe-train"))
            .arg("prepare")
            .arg("--out")
            .arg(&data)
            .status()
            .await?;
        if !status.success() {
            bail!("moe-train prepare failed ({status})");
        }
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let checkpoints = mount.join("checkpoints").join(format!("moe-demo-{stamp}"));
    let spec = JobSpec {
        name: "moe-demo".to_string(),
        command: vec![
            stack.bin("moe-train").display().to_string(),
            "train".to_string(),
            "--data".to_string(),
            data.display().to_string(),
            "--steps".to_string(),
            steps.to_string(),
            "--log-every".to_string(),
            "10".to_string(),
            "--checkpoint-every".to_string(),
            "100".to_string(),
            "--metrics-addr".to_string(),
            "127.0.0.1:0".to_string(),
        ],
        nodes: 2,
        gpus_per_node: 1,
        grace_ms: 30_000,
        checkpoint_dir: checkpoints.display().to_string(),
        // Two ranks share this machine's cores: one compute thread each.
        env: vec![EnvVar {
            name: "RAYON_NUM_THREADS".to_string(),
            value: "1".to_string(),
        }],
        max_restarts: 3,
        ..JobSpec::default()
    };
    let id = stack
        .hai
        .submit(spec)
        .await
        .map_err(|s| anyhow::anyhow!("submitting: {}", s.message()))?;
    println!("submitted moe-train on 2 nodes as hai job {id}");
    let follow = Follow::new(steps);
    let outcome = follow_job(stack, id, follow).await?;
    let log_dir = stack.hai.spec().log_dir.join(id.to_string());
    println!("\n== summary ==");
    println!("job {id}: {}", outcome.state);
    if let Some((first, last)) = outcome.finished {
        println!("loss: first {first:.4}, last {last:.4} (the corpus's floor is 0.898)");
    }
    if let Some(progress) = &outcome.last {
        println!(
            "throughput: {:.0} tokens/s over 2 ranks; expert load: smallest share {:.3}, largest {:.3} (even: {:.3})",
            progress.tokens_per_second,
            progress.load.0,
            progress.load.1,
            1.0 / 8.0
        );
    }
    println!("checkpoints: {}", checkpoints.display());
    println!("logs: {} (hai logs {id})", log_dir.display());
    println!("time: {:.0} s from start", began.elapsed().as_secs_f64());
    if outcome.state != "completed" {
        bail!("job {id} ended {}: {}", outcome.state, outcome.reason);
    }
    Ok(())
}

/// How the job ended, as followed.
struct Outcome {
    state: String,
    reason: String,
    last: Option<Progress>,
    finished: Option<(f32, f32)>,
}

/// Shows progress: a bar on a terminal, plain lines otherwise.
struct Follow {
    bar: Option<indicatif::ProgressBar>,
}

impl Follow {
    fn new(steps: u64) -> Follow {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(steps);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} steps {msg} [{elapsed_precise}]",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Follow { bar }
    }

    fn line(&self, line: &str, progress: Option<&Progress>) {
        match (&self.bar, progress) {
            (Some(bar), Some(p)) => {
                bar.set_position(p.step);
                bar.set_message(format!(
                    "loss {:.4} · {:.0} tokens/s · expert load {:.3}–{:.3}",
                    p.loss, p.tokens_per_second, p.load.0, p.load.1
                ));
            }
            (Some(bar), None) => bar.println(line),
            (None, _) => println!("{line}"),
        }
    }

    fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Follows job `id` to its end, showing rank 0's log of every attempt as it grows.
async fn follow_job(stack: &Stack, id: u64, follow: Follow) -> anyhow::Result<Outcome> {
    let deadline = Instant::now() + TRAINING_TIMEOUT;
    let mut reading: Option<(u32, u64)> = None;
    let mut last = None;
    let mut finished = None;
    loop {
        let job = stack
            .hai
            .job(id)
            .await
            .map_err(|s| anyhow::anyhow!("job {id}: {}", s.message()))?;
        let attempt = job.attempt;
        if job.placement.is_some() && reading.is_none_or(|(a, _)| a != attempt) {
            reading = Some((attempt, 0));
        }
        if let Some((a, offset)) = reading {
            let path = rank_log(&stack.hai.spec().log_dir, id, a);
            if let Ok(text) = std::fs::read(&path) {
                let fresh = text.get(offset as usize..).unwrap_or_default();
                // Whole lines only.
                let end = fresh.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                for line in String::from_utf8_lossy(&fresh[..end]).lines() {
                    let progress = parse_progress(line);
                    follow.line(line, progress.as_ref());
                    if progress.is_some() {
                        last = progress;
                    }
                    if let Some(found) = parse_finished(line) {
                        finished = Some(found);
                    }
                }
                reading = Some((a, offset + end as u64));
            }
        }
        if hai_server::state::is_ended(job.state()) {
            follow.done();
            return Ok(Outcome {
                state: hai_server::state::state_name(job.state()).to_string(),
                reason: job.reason,
                last,
                finished,
            });
        }
        if Instant::now() > deadline {
            bail!(
                "job {id} did not finish within {TRAINING_TIMEOUT:?} ({:?})",
                job.state()
            );
        }
        if job.state() == JobState::Pending && job.attempt == 0 && last.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn rank_log(log_dir: &Path, id: u64, attempt: u32) -> PathBuf {
    log_dir
        .join(id.to_string())
        .join(format!("attempt-{attempt}"))
        .join("rank-0.log")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_are_read_back() {
        let p = parse_progress(
            "step 10/400 loss 3.5839 tokens/s 14206 expert load min 0.054 max 0.188 compute 33.6ms allreduce 0.0ms",
        )
        .unwrap();
        assert_eq!(p.step, 10);
        assert!((p.loss - 3.5839).abs() < 1e-6);
        assert_eq!(p.load, (0.054, 0.188));
        assert!(parse_progress("checkpoint /x at step 10").is_none());
        assert_eq!(
            parse_finished("finished at step 100: first loss 4.1342, last loss 1.0596"),
            Some((4.1342, 1.0596))
        );
    }
}
