//! hai as a user meets it, on 3 servers and 2 agents (real processes on loopback): jobs run to
//! completion as gangs with the scheduler's environment, wait with a reason when they cannot
//! run, fail with their exit code, are cancelled or stopped at their time limit, run after
//! other jobs (or are cancelled when those fail), run as arrays; another user's cancel is
//! refused; drained
//! nodes take nothing; malformed input gets a clear error.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_as_gangs_wait_fail_and_are_cancelled() {
    let (dir, mut cluster) = cluster_with(3, 2, 2, |spec| spec.metrics = true).await;

    // A 2-node gang: every rank runs with the scheduler's environment; logs per rank.
    let gang = submit(
        &cluster,
        None,
        &[
            "--name",
            "hello",
            "--nodes",
            "2",
            "--",
            "sh",
            "-c",
            "echo rank $RANK of $WORLD_SIZE local $LOCAL_RANK/$LOCAL_WORLD_SIZE on $HAI_NODE job $HAI_JOB_ID attempt $HAI_ATTEMPT master $MASTER_ADDR:$MASTER_PORT",
        ],
    );
    let done = wait_state(&cluster, gang, "completed", Duration::from_secs(30)).await;
    assert_eq!(done["nodes"].as_array().unwrap().len(), 2, "{done}");
    let logs = ok(&cluster, None, &["logs", &gang.to_string()]);
    for rank in 0..2 {
        assert!(
            logs.contains(&format!("rank {rank} of 2 local 0/1 on node-{}", rank + 1))
                && logs.contains(&format!("job {gang} attempt 0 master 127.0.0.1:")),
            "{logs}"
        );
    }
    let one = ok(&cluster, None, &["logs", &gang.to_string(), "--rank", "1"]);
    assert!(
        one.contains("rank 1 of 2") && !one.contains("rank 0 of 2"),
        "{one}"
    );

    // Too large for the cluster: waits, saying why.
    let large = submit(&cluster, None, &["--nodes", "3", "--", "true"]);
    let waiting = wait_job(&cluster, large, Duration::from_secs(10), "explained", |j| {
        j["reason"].as_str().unwrap_or("").contains("too large")
    })
    .await;
    assert_eq!(waiting["state"], "pending");
    let table = ok(&cluster, None, &["jobs"]);
    assert!(
        table.contains("ID") && table.contains("REASON") && table.contains("too large"),
        "{table}"
    );
    ok(&cluster, None, &["cancel", &large.to_string()]);
    wait_state(&cluster, large, "cancelled", Duration::from_secs(10)).await;

    // A failing rank fails the job with its code.
    let failing = submit(
        &cluster,
        None,
        &["--restart", "never", "--", "sh", "-c", "exit 7"],
    );
    let failed = wait_state(&cluster, failing, "failed", Duration::from_secs(30)).await;
    assert!(
        failed["reason"].as_str().unwrap().contains("code 7"),
        "{failed}"
    );

    // Cancel a running job: SIGTERM, and it is gone within its grace.
    let sleeper = submit(&cluster, None, &["--grace", "2s", "--", "sleep", "300"]);
    wait_state(&cluster, sleeper, "running", Duration::from_secs(30)).await;
    ok(&cluster, None, &["cancel", &sleeper.to_string()]);
    wait_state(&cluster, sleeper, "cancelled", Duration::from_secs(10)).await;
    let again = refused(&cluster, None, &["cancel", &sleeper.to_string()]);
    assert!(again.contains("has ended"), "{again}");

    // A job that outlives its time limit is stopped and fails, restart policy or not; one
    // that ends within its limit completes.
    let overrun = submit(
        &cluster,
        None,
        &[
            "--time-limit",
            "2s",
            "--grace",
            "1s",
            "--restart",
            "on-failure",
            "--",
            "sleep",
            "300",
        ],
    );
    let timed_out = wait_state(&cluster, overrun, "failed", Duration::from_secs(30)).await;
    assert!(
        timed_out["reason"]
            .as_str()
            .unwrap()
            .contains("time limit of 2s reached"),
        "{timed_out}"
    );
    assert_eq!(timed_out["attempt"], 0, "not requeued: {timed_out}");
    assert_eq!(timed_out["time_limit_ms"], 2000, "{timed_out}");
    let within = submit(&cluster, None, &["--time-limit", "1m", "--", "true"]);
    wait_state(&cluster, within, "completed", Duration::from_secs(30)).await;
    // Counted by the leader that stopped it (summed over replicas: leadership may move).
    let mut stops = 0.0;
    for process in cluster.processes() {
        if process.role == "hai-server" {
            let text = ff_metrics::http_get(&process.metrics, "/metrics")
                .await
                .unwrap();
            stops += ff_metrics::series_value(&text, "hai_time_limit_stops_total")
                .unwrap_or_else(|| panic!("no hai_time_limit_stops_total:\n{text}"));
        }
    }
    assert_eq!(stops, 1.0);

    // Jobs after others: one waits, saying for what, until the job before it completes; the
    // jobs after one that fails are cancelled, in a chain; an unknown or failed job to run
    // after is refused at submission.
    // Jobs that hold until the test opens a gate, so that none ends before the test has seen
    // what it looks for.
    let gated = |gate: &str, then: &str| {
        let gate = dir.path().join(gate);
        format!(
            "until [ -f {} ]; do sleep 0.1; done; {then}",
            gate.display()
        )
    };
    let open_gate = |gate: &str| std::fs::write(dir.path().join(gate), b"").unwrap();
    let first = submit(&cluster, None, &["--", "sh", "-c", &gated("first", "true")]);
    let second = submit(
        &cluster,
        None,
        &["--after", &first.to_string(), "--", "true"],
    );
    let expected = format!("waiting for job(s) {first} to complete");
    wait_job(
        &cluster,
        second,
        Duration::from_secs(10),
        "explained",
        |j| j["reason"] == expected.as_str(),
    )
    .await;
    open_gate("first");
    let first_done = wait_state(&cluster, first, "completed", Duration::from_secs(30)).await;
    let second_done = wait_state(&cluster, second, "completed", Duration::from_secs(30)).await;
    assert!(
        second_done["started_ms"].as_i64() >= first_done["ended_ms"].as_i64(),
        "{first_done}\n{second_done}"
    );
    let doomed = submit(
        &cluster,
        None,
        &[
            "--restart",
            "never",
            "--",
            "sh",
            "-c",
            &gated("doomed", "exit 3"),
        ],
    );
    let next = submit(
        &cluster,
        None,
        &["--after", &doomed.to_string(), "--", "true"],
    );
    let last = submit(
        &cluster,
        None,
        &["--after", &next.to_string(), "--", "true"],
    );
    open_gate("doomed");
    wait_state(&cluster, doomed, "failed", Duration::from_secs(30)).await;
    for (job, before, how) in [(next, doomed, "failed"), (last, next, "cancelled")] {
        let cancelled = wait_state(&cluster, job, "cancelled", Duration::from_secs(10)).await;
        assert_eq!(
            cancelled["reason"],
            format!("job {before}, which it runs after, {how}").as_str(),
            "{cancelled}"
        );
        assert!(cancelled["started_ms"] == 0, "never ran: {cancelled}");
    }
    let unknown = refused(
        &cluster,
        None,
        &["submit", "--after", "99999", "--", "true"],
    );
    assert!(unknown.contains("there is no job 99999"), "{unknown}");
    let hopeless = refused(
        &cluster,
        None,
        &["submit", "--after", &doomed.to_string(), "--", "true"],
    );
    assert!(hopeless.contains("could never run"), "{hopeless}");

    // A job array: one submission, consecutive ids printed one per line, every task with its
    // own index and name.
    let tasks = submit_all(
        &cluster,
        None,
        &[
            "--name",
            "sweep",
            "--array",
            "3",
            "--",
            "sh",
            "-c",
            "echo task $HAI_ARRAY_INDEX of $HAI_ARRAY_SIZE from $HAI_ARRAY_FIRST_JOB",
        ],
    );
    assert_eq!(tasks.len(), 3, "{tasks:?}");
    assert_eq!(tasks[2], tasks[0] + 2, "consecutive: {tasks:?}");
    for (index, task) in tasks.iter().enumerate() {
        let done = wait_state(&cluster, *task, "completed", Duration::from_secs(30)).await;
        assert_eq!(done["name"], format!("sweep[{index}]").as_str(), "{done}");
        let logs = ok(&cluster, None, &["logs", &task.to_string()]);
        assert!(
            logs.contains(&format!("task {index} of 3 from {}", tasks[0])),
            "{logs}"
        );
    }

    // An array cancelled as a range of ids, waiting and running tasks alike.
    let tasks = submit_all(&cluster, None, &["--array", "3", "--", "sleep", "300"]);
    wait_state(&cluster, tasks[0], "running", Duration::from_secs(30)).await;
    ok(
        &cluster,
        None,
        &["cancel", &format!("{}-{}", tasks[0], tasks[2])],
    );
    for task in &tasks {
        wait_state(&cluster, *task, "cancelled", Duration::from_secs(30)).await;
    }

    // Users: another user's job may not be cancelled by them; the owner or an admin may.
    let alice = ok(&cluster, None, &["admin", "user", "add", "alice"]);
    let bob = ok(&cluster, None, &["admin", "user", "add", "bob"]);
    let (alice, bob) = (alice.trim(), bob.trim());
    assert_eq!(ok(&cluster, Some(alice), &["whoami"]).trim(), "alice");
    let hers = submit(
        &cluster,
        Some(alice),
        &["--grace", "1s", "--", "sleep", "300"],
    );
    let denied = refused(&cluster, Some(bob), &["cancel", &hers.to_string()]);
    assert!(denied.contains("belongs to alice"), "{denied}");
    let denied = refused(&cluster, Some(bob), &["drain", "node-1"]);
    assert!(denied.contains("not an administrator"), "{denied}");
    ok(&cluster, Some(alice), &["cancel", &hers.to_string()]);
    wait_state(&cluster, hers, "cancelled", Duration::from_secs(15)).await;
    let anonymous = refused(&cluster, Some("not-a-token"), &["jobs"]);
    assert!(anonymous.contains("unknown token"), "{anonymous}");

    // Drained nodes take nothing; resumed, they do.
    ok(&cluster, None, &["drain", "node-1"]);
    let blocked = submit(&cluster, None, &["--nodes", "2", "--", "true"]);
    wait_job(
        &cluster,
        blocked,
        Duration::from_secs(10),
        "explained",
        |j| j["reason"].as_str().unwrap_or("").contains("too large"),
    )
    .await;
    let nodes = ok(&cluster, None, &["nodes"]);
    assert!(nodes.contains("draining"), "{nodes}");
    ok(&cluster, None, &["resume", "node-1"]);
    wait_state(&cluster, blocked, "completed", Duration::from_secs(30)).await;

    // Malformed input: clear errors, nothing queued.
    let before = ok(&cluster, None, &["jobs", "--all", "--json"]);
    let zero = refused(&cluster, None, &["submit", "--nodes", "0", "--", "true"]);
    assert!(zero.contains("nodes"), "{zero}");
    let negative = refused(&cluster, None, &["submit", "--nodes", "-2", "--", "true"]);
    assert!(negative.contains("-2"), "{negative}");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "command = [\"true\"]\nnodez = 1\n").unwrap();
    let unknown = refused(&cluster, None, &["submit", file.to_str().unwrap()]);
    assert!(unknown.contains("unknown field"), "{unknown}");
    let missing = refused(&cluster, None, &["show", "9999"]);
    assert!(missing.contains("no job 9999"), "{missing}");
    assert_eq!(ok(&cluster, None, &["jobs", "--all", "--json"]), before);

    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_jobs_are_forgotten_after_the_retention() {
    let (_dir, cluster) = cluster_with(1, 1, 1, |spec| {
        spec.job_retention = Some(Duration::from_secs(2));
    })
    .await;
    let done = submit(&cluster, None, &["--", "true"]);
    let running = submit(&cluster, None, &["--", "sleep", "300"]);
    wait_state(&cluster, done, "completed", Duration::from_secs(30)).await;
    // Forgotten by the leader once its retention has passed; the running job stays.
    let started = std::time::Instant::now();
    loop {
        let output = hai(&cluster, None, &["show", &done.to_string()]);
        if !output.status.success() {
            let error = String::from_utf8_lossy(&output.stderr);
            assert!(error.contains(&format!("no job {done}")), "{error}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "job {done} still shown a minute after it completed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(show(&cluster, running)["state"], "running");
    let all = ok(&cluster, None, &["jobs", "--all"]);
    assert!(!all.contains(&format!("\n{done:>6} ")), "{all}");
}
