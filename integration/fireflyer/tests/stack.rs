//! The whole stack on real processes (fs3 with a FUSE mount, hai, moe-train over hfreduce):
//! the demo trains to a clearly lower loss; and one training run survives, in turn, a storage
//! daemon killed with SIGKILL while it reads data and writes checkpoints (the checkpoints read
//! back intact after the daemon returns and resyncs), the hai leader killed with SIGKILL (the
//! job keeps running, the new leader reports it, it completes once), and preemption by a
//! higher-priority job (it checkpoints, is suspended, and resumes from its step).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hai_proto::{EnvVar, JobSpec, JobState};

#[test]
fn the_demo_trains_to_a_clearly_lower_loss() {
    if !common::can_run(&[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fireflyer"))
        .args(["demo", "--steps", "150", "--dir"])
        .arg(dir.path().join("stack"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = text.lines().find(|l| l.starts_with("loss: first")).unwrap();
    let numbers: Vec<f32> = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|w| w.parse().ok())
        .collect();
    let (first, last) = (numbers[0], numbers[1]);
    assert!(last < first - 2.0, "{line}");
    assert!(text.contains("job 1: completed"), "{text}");
    // Nothing left mounted or running.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(dir.path().to_str().unwrap()), "{mounts}");
}

/// The highest step in a rank log.
fn step_in(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(fireflyer::demo::parse_progress)
        .map(|p| p.step)
        .max()
        .unwrap_or(0)
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "not {what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_survives_a_storage_loss_a_leader_loss_and_preemption() {
    if !common::can_run(&[]) {
        return;
    }
    let (_dir, mut stack) = common::fresh_stack().await;
    let mount = stack.mount_point().to_path_buf();
    let data = mount.join("data");
    let status = std::process::Command::new(stack.bin("moe-train"))
        .args(["prepare", "--shards", "4", "--sequences", "1024", "--out"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(status.success());
    let checkpoints = mount.join("checkpoints").join("run");
    let steps = 1500;
    let job = stack
        .hai
        .submit(JobSpec {
            name: "moe".into(),
            command: [
                stack.bin("moe-train").display().to_string(),
                "train".into(),
                "--data".into(),
                data.display().to_string(),
                "--steps".into(),
                steps.to_string(),
                "--checkpoint-every".into(),
                "25".into(),
            ]
            .to_vec(),
            nodes: 2,
            gpus_per_node: 1,
            grace_ms: 30_000,
            checkpoint_dir: checkpoints.display().to_string(),
            env: vec![EnvVar {
                name: "RAYON_NUM_THREADS".into(),
                value: "1".into(),
            }],
            max_restarts: 3,
            ..JobSpec::default()
        })
        .await
        .unwrap();
    let logs = stack.hai.spec().log_dir.join(job.to_string());
    let log =
        |attempt: u32| -> PathBuf { logs.join(format!("attempt-{attempt}")).join("rank-0.log") };
    let first_log = log(0);
    wait_until("training", Duration::from_secs(60), || {
        step_in(&first_log) >= 50
    })
    .await;

    // A storage daemon dies while the job reads its data and writes checkpoints.
    stack.fs3.storage(2).unwrap().kill().await.unwrap();
    let at_kill = step_in(&first_log);
    wait_until(
        "training on without storage-2",
        Duration::from_secs(60),
        || step_in(&first_log) >= at_kill + 100,
    )
    .await;
    stack.fs3.storage(2).unwrap().spawn().unwrap();
    stack
        .fs3
        .wait_all_serving(Duration::from_secs(60))
        .await
        .unwrap();
    let written = moe_train::checkpoint::list(&checkpoints);
    assert!(!written.is_empty());
    for checkpoint in &written {
        moe_train::checkpoint::verify(checkpoint)
            .unwrap_or_else(|e| panic!("{} after resync: {e}", checkpoint.display()));
    }

    // The hai leader dies: the job keeps running and the new leader reports it.
    let leader = stack
        .hai
        .wait_for_leader(None, Duration::from_secs(10))
        .await
        .unwrap();
    stack.hai.server(leader).unwrap().kill().await.unwrap();
    stack
        .hai
        .wait_for_leader(Some(leader), Duration::from_secs(10))
        .await
        .unwrap();
    let before = step_in(&first_log);
    wait_until(
        "training after the leader's loss",
        Duration::from_secs(30),
        || step_in(&first_log) >= before + 20,
    )
    .await;
    let seen = stack.hai.job(job).await.unwrap();
    assert_eq!(
        (seen.state(), seen.attempt),
        (JobState::Running, 0),
        "{seen:?}"
    );
    stack.hai.server(leader).unwrap().spawn().unwrap();

    // A higher-priority job takes both nodes: the run checkpoints, is suspended, resumes.
    let urgent = stack
        .hai
        .submit(JobSpec {
            name: "urgent".into(),
            command: vec!["sleep".into(), "2".into()],
            nodes: 2,
            gpus_per_node: 1,
            priority: 10,
            ..JobSpec::default()
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let state = stack.hai.job(job).await.unwrap();
        if hai_server::state::is_ended(state.state()) {
            assert_eq!(state.state(), JobState::Completed, "{state:?}");
            assert_eq!(state.attempt, 1, "suspended once, resumed once: {state:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the run did not finish: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        stack.hai.job(urgent).await.unwrap().state(),
        JobState::Completed
    );
    let first = std::fs::read_to_string(&first_log).unwrap();
    let suspended_at: u64 = first
        .split("suspended at step ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{first}"));
    let second = std::fs::read_to_string(log(1)).unwrap();
    assert!(
        second.contains(&format!("(step {suspended_at}, loss")),
        "resumed where it stopped ({suspended_at}):\n{second}"
    );
    assert!(
        second.contains(&format!("finished at step {steps}")),
        "{second}"
    );
    let (position, _) =
        moe_train::checkpoint::verify(&moe_train::checkpoint::list(&checkpoints)[0]).unwrap();
    assert_eq!(position.step, steps);
    stack.stop().await;
}

/// Reads `cluster.json`'s process ids.
fn pids(dir: &Path) -> Vec<i32> {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).unwrap()).unwrap();
    json["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["pid"].as_i64())
        .map(|p| p as i32)
        .collect()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Starts `fireflyer up` on `dir`; waits until it says it is up.
async fn up(dir: &Path) -> std::process::Child {
    let _ = std::fs::remove_file(dir.join("cluster.json"));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_fireflyer"))
        .args(["up", "--dir"])
        .arg(dir)
        .stdout(std::fs::File::create(dir.with_extension("up.log")).unwrap())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    wait_until("fireflyer up", Duration::from_secs(120), || {
        dir.join("cluster.json").exists()
    })
    .await;
    child
}

/// SIGTERM to `up`; waits for it, and checks it left nothing behind.
async fn down(mut child: std::process::Child, dir: &Path) {
    let processes = pids(dir);
    assert!(processes.len() >= 11, "{processes:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    for pid in processes {
        assert!(!alive(pid), "process {pid} outlived `fireflyer up`");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(dir.to_str().unwrap()), "still mounted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_stops_cleanly_and_comes_back_with_its_data() {
    if !common::can_run(&[]) {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("stack");
    std::fs::create_dir_all(&dir).unwrap();
    let first = up(&dir).await;
    // Use it as a user would: through cluster.env's variables and the linked programs.
    let env = std::fs::read_to_string(dir.join("cluster.env")).unwrap();
    let vars: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| *k != "PATH")
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect();
    let mount = PathBuf::from(&vars.iter().find(|(k, _)| k == "FS3_MOUNT").unwrap().1);
    std::fs::write(mount.join("kept.txt"), b"still here").unwrap();
    let submitted = std::process::Command::new(dir.join("bin/hai"))
        .args(["submit", "--name", "hello", "--nodes", "2", "--", "true"])
        .envs(vars.clone())
        .output()
        .unwrap();
    assert!(submitted.status.success(), "{submitted:?}");
    let listed = || {
        let out = std::process::Command::new(dir.join("bin/hai"))
            .args(["jobs", "--all"])
            .envs(vars.clone())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_until("the job done", Duration::from_secs(30), || {
        listed().contains("completed")
    })
    .await;
    down(first, &dir).await;

    // Again on the same directory: the same cluster, its files and its jobs.
    let second = up(&dir).await;
    assert_eq!(
        std::fs::read(mount.join("kept.txt")).unwrap(),
        b"still here"
    );
    let jobs = listed();
    assert!(
        jobs.contains("hello") && jobs.contains("completed"),
        "{jobs}"
    );
    down(second, &dir).await;
}
