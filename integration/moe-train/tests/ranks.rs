//! moe-train as real processes, without the rest of the stack: two data-parallel ranks
//! (hfreduce between them) learn the corpus; a rerun resumes from the checkpoint; a damaged
//! checkpoint is skipped for the one before, with a warning; SIGUSR1 makes both ranks
//! checkpoint at the same step and exit 0.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn prepare(dir: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_moe-train"))
        .args(["prepare", "--out"])
        .arg(dir)
        .args(["--shards", "4", "--sequences", "512"])
        .status()
        .unwrap();
    assert!(status.success());
}

fn ranks(data: &Path, checkpoints: &Path, steps: u64, extra: &[&str]) -> Vec<Child> {
    let port = ff_harness::free_port_block(1).unwrap();
    (0..2)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_moe-train"))
                .arg("train")
                .arg("--data")
                .arg(data)
                .arg("--checkpoint-dir")
                .arg(checkpoints)
                .args([
                    "--steps",
                    &steps.to_string(),
                    "--checkpoint-every",
                    "20",
                    "--log-every",
                    "10",
                ])
                .args(extra)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("LOCAL_RANK", "0")
                .env("LOCAL_WORLD_SIZE", "1")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("HFREDUCE_NODE_ID", format!("node{rank}"))
                .env("RAYON_NUM_THREADS", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

fn finish(children: Vec<Child>) -> Vec<Output> {
    let outputs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for (rank, output) in outputs.iter().enumerate() {
        assert!(
            output.status.success(),
            "rank {rank} failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    outputs
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn losses(log: &str) -> Vec<f32> {
    log.lines()
        .filter_map(|l| l.split(" loss ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn two_ranks_learn_resume_skip_damage_and_suspend_together() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let checkpoints = dir.path().join("checkpoints");
    prepare(&data);

    // Learn: the loss falls well below where it starts (ln 64 ≈ 4.16; the floor is 0.9).
    let first = finish(ranks(&data, &checkpoints, 60, &[]));
    let log = text(&first[0]);
    let seen = losses(&log);
    assert!(seen.len() >= 6, "{log}");
    assert!(*seen.last().unwrap() < seen[0] - 1.5, "{seen:?}");
    assert!(checkpoints.join("step-00000060").is_dir());

    // Resume: the step continues.
    let second = finish(ranks(&data, &checkpoints, 80, &[]));
    for output in &second {
        assert!(
            text(output).contains("resumed from") && text(output).contains("(step 60"),
            "{}",
            text(output)
        );
    }
    assert!(
        text(&second[0]).contains("step 70/80"),
        "{}",
        text(&second[0])
    );

    // A damaged newest checkpoint is skipped, with a warning, for the one before it.
    let newest = checkpoints
        .join("step-00000080")
        .join("tensors.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&newest, bytes).unwrap();
    let third = finish(ranks(&data, &checkpoints, 90, &[]));
    let log = text(&third[0]);
    assert!(
        log.contains("warning: skipping checkpoint") && log.contains("step-00000080"),
        "{log}"
    );
    assert!(log.contains("(step 60"), "{log}");

    // SIGUSR1 to both: they agree on a step, rank 0 checkpoints it, both exit 0.
    let children = ranks(&data, &checkpoints, 100_000, &[]);
    // Training (with its signal handler) is under way once this run's first checkpoint is
    // there; a fixed wait could signal ranks still starting, which SIGUSR1 would kill.
    let started = std::time::Instant::now();
    while !checkpoints.join("step-00000100").is_dir() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint at step 100 in 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for child in &children {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .unwrap();
    }
    let suspended = finish(children);
    let steps: Vec<u64> = suspended
        .iter()
        .map(|o| {
            let log = text(o);
            log.split("suspended at step ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("{log}"))
        })
        .collect();
    assert_eq!(steps[0], steps[1], "both ranks stop at one step");
    assert!(checkpoints.join(format!("step-{:08}", steps[0])).is_dir());
}
