//! Time-sharing on 3 servers and 2 agents: a higher-priority job takes the nodes of a running
//! lower-priority one, which checkpoints on SIGUSR1, is suspended and requeued, and resumes
//! from its checkpoint once the nodes are free; a job that ignores the signal is killed after
//! its grace period.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_job_checkpoints_and_resumes_where_it_stopped() {
    let (dir, mut cluster) = cluster(3, 2, 2).await;
    let script = steps_script(dir.path());

    let low = submit(
        &cluster,
        None,
        &[
            "--name",
            "low",
            "--nodes",
            "2",
            "--priority",
            "0",
            "--grace",
            "10s",
            "--env",
            "STEPS=50",
            "--",
            &script,
        ],
    );
    wait_state(&cluster, low, "running", Duration::from_secs(30)).await;
    // Its steps under way (it has said where it starts, and a step or two passed): only then
    // is there a checkpoint past step 0 to resume from.
    ff_harness::wait_for(
        "the low job's steps to start",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            // Until the first rank has written, there are no logs to show.
            let output = hai(&cluster, None, &["logs", &low.to_string()]);
            let logs = String::from_utf8_lossy(&output.stdout);
            if output.status.success() && logs.contains("starts at step") {
                Ok(())
            } else {
                let error = String::from_utf8_lossy(&output.stderr);
                Err(format!("logs so far: {logs:?} {error}").into())
            }
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let high = submit(
        &cluster,
        None,
        &[
            "--name",
            "high",
            "--nodes",
            "2",
            "--priority",
            "10",
            "--",
            "sh",
            "-c",
            "sleep 1; echo high ran",
        ],
    );
    let suspended = wait_job(&cluster, low, Duration::from_secs(20), "requeued", |j| {
        j["attempt"] == 1
    })
    .await;
    assert!(
        suspended["last_stop"]
            .as_str()
            .unwrap()
            .contains("preempted by job"),
        "{suspended}"
    );
    wait_state(&cluster, high, "completed", Duration::from_secs(30)).await;
    let resumed = wait_state(&cluster, low, "completed", Duration::from_secs(60)).await;
    assert_eq!(resumed["attempt"], 1, "{resumed}");
    let first = ok(
        &cluster,
        None,
        &["logs", &low.to_string(), "--attempt", "0"],
    );
    let second = ok(
        &cluster,
        None,
        &["logs", &low.to_string(), "--attempt", "1"],
    );
    assert!(first.contains("checkpointed at"), "{first}");
    let step_at = |text: &str, marker: &str| -> u32 {
        text.lines()
            .find_map(|l| l.split(marker).nth(1))
            .and_then(|rest| rest.trim().parse().ok())
            .unwrap()
    };
    let saved = step_at(&first, "checkpointed at");
    let started = step_at(&second, "starts at step");
    assert!(
        saved > 0 && started == saved,
        "saved {saved}, resumed at {started}"
    );
    assert!(second.contains("done at step 50"), "{second}");

    // A job that ignores SIGUSR1 is killed after its grace, then requeued.
    let stubborn = submit(
        &cluster,
        None,
        &[
            "--nodes",
            "2",
            "--priority",
            "0",
            "--grace",
            "2s",
            "--",
            "sh",
            "-c",
            "trap '' USR1; sleep 60",
        ],
    );
    wait_state(&cluster, stubborn, "running", Duration::from_secs(30)).await;
    let urgent = submit(
        &cluster,
        None,
        &["--nodes", "2", "--priority", "5", "--", "true"],
    );
    let signalled = Instant::now();
    let requeued = wait_job(
        &cluster,
        stubborn,
        Duration::from_secs(20),
        "requeued",
        |j| j["attempt"] == 1,
    )
    .await;
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "killed after {took:?}: {requeued}"
    );
    assert!(
        requeued["last_stop"]
            .as_str()
            .unwrap()
            .contains("stopped with code"),
        "{requeued}"
    );
    wait_state(&cluster, urgent, "completed", Duration::from_secs(30)).await;
    ok(&cluster, None, &["cancel", &stubborn.to_string()]);
    wait_state(&cluster, stubborn, "cancelled", Duration::from_secs(30)).await;

    cluster.stop_all().await;
}
