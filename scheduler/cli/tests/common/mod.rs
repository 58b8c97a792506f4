//! What the hai end-to-end tests share: a cluster of real processes, the CLI as a user runs it,
//! and waiting for a job to reach a state.

#![allow(dead_code, clippy::unwrap_used)]

use std::process::Output;
use std::time::Duration;

use ff_harness::hai::{HaiCluster, HaiClusterSpec};

/// A cluster of `servers` replicas and `agents` agents with `gpus` each, in a fresh directory.
pub async fn cluster(servers: u64, agents: usize, gpus: u32) -> (tempfile::TempDir, HaiCluster) {
    cluster_with(servers, agents, gpus, |_| {}).await
}

/// [`cluster`], with `adjust` applied to its spec before it starts.
pub async fn cluster_with(
    servers: u64,
    agents: usize,
    gpus: u32,
    adjust: impl FnOnce(&mut HaiClusterSpec),
) -> (tempfile::TempDir, HaiCluster) {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = HaiClusterSpec::new(
        env!("CARGO_BIN_EXE_hai"),
        dir.path(),
        servers,
        agents,
        gpus,
        0,
    );
    // Ports are chosen when the cluster starts.
    adjust(&mut spec);
    let cluster = HaiCluster::start(spec, Duration::from_secs(30))
        .await
        .unwrap();
    (dir, cluster)
}

/// Runs `hai ARGS` as a user of `cluster` (the admin unless `token` is given).
pub fn hai(cluster: &HaiCluster, token: Option<&str>, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_hai"));
    command.args(args).envs(cluster.cli_env());
    if let Some(token) = token {
        command.env_remove("HAI_TOKEN_FILE").env("HAI_TOKEN", token);
    }
    command.output().unwrap()
}

/// `hai ARGS`, which must succeed; its standard output.
pub fn ok(cluster: &HaiCluster, token: Option<&str>, args: &[&str]) -> String {
    let output = hai(cluster, token, args);
    assert!(
        output.status.success(),
        "hai {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `hai ARGS`, which must fail; its standard error.
pub fn refused(cluster: &HaiCluster, token: Option<&str>, args: &[&str]) -> String {
    let output = hai(cluster, token, args);
    assert!(!output.status.success(), "hai {args:?} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Submits a job; its id.
pub fn submit(cluster: &HaiCluster, token: Option<&str>, args: &[&str]) -> u64 {
    let ids = submit_all(cluster, token, args);
    assert_eq!(ids.len(), 1, "one job expected: {ids:?}");
    ids[0]
}

/// Submits a job or an array (`--array N`); every id printed, in order.
pub fn submit_all(cluster: &HaiCluster, token: Option<&str>, args: &[&str]) -> Vec<u64> {
    let mut all = vec!["submit"];
    all.extend_from_slice(args);
    let printed = ok(cluster, token, &all);
    printed
        .lines()
        .map(|line| {
            line.trim()
                .parse()
                .unwrap_or_else(|_| panic!("not job ids: {printed}"))
        })
        .collect()
}

/// `hai show ID --json`.
pub fn show(cluster: &HaiCluster, id: u64) -> serde_json::Value {
    serde_json::from_str(&ok(cluster, None, &["show", &id.to_string(), "--json"])).unwrap()
}

/// Waits until job `id` satisfies `done` (checked on `hai show --json`); the last view.
pub async fn wait_job(
    cluster: &HaiCluster,
    id: u64,
    timeout: Duration,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let job = show(cluster, id);
        if done(&job) {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} not {what} within {timeout:?}: {job}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until job `id` is in `state`.
pub async fn wait_state(
    cluster: &HaiCluster,
    id: u64,
    state: &str,
    timeout: Duration,
) -> serde_json::Value {
    wait_job(cluster, id, timeout, state, |job| job["state"] == state).await
}

/// A job script that counts steps, checkpoints its step on SIGUSR1 (then exits 0), and
/// resumes from its checkpoint.
pub const STEPS_SCRIPT: &str = r#"#!/bin/sh
ckpt="$HAI_CHECKPOINT_DIR/step-$RANK"
step=0
[ -f "$ckpt" ] && step=$(cat "$ckpt")
echo "attempt $HAI_ATTEMPT starts at step $step"
trap 'echo "$step" > "$ckpt"; echo "checkpointed at $step"; exit 0' USR1
while [ "$step" -lt "${STEPS:-20}" ]; do
  step=$((step + 1))
  sleep 0.2
done
echo "done at step $step"
"#;

/// Writes [`STEPS_SCRIPT`] into `dir`; its path.
pub fn steps_script(dir: &std::path::Path) -> String {
    let path = dir.join("steps.sh");
    std::fs::write(&path, STEPS_SCRIPT).unwrap();
    let mut permissions = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&path, permissions).unwrap();
    path.display().to_string()
}
