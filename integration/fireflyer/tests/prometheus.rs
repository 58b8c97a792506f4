//! A real Prometheus server (Debian's `prometheus`) run the way `docs/operations.md` tells an
//! operator to run it against a `fireflyer up` stack: `--config.file=DIR/prometheus/prometheus.yml`,
//! targets from the file service discovery `up` writes. Through Prometheus's HTTP API: every
//! target is scraped, the series the dashboards and alerts are built on exist, and killing a
//! storage daemon fires the alerts about it.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use ff_harness::ChildProcess;
use serde_json::Value;

/// `GET http://addr/path?query…` on Prometheus's API through curl; the response's `data`.
fn api(addr: &str, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
    let mut curl = Command::new("curl");
    curl.args([
        "--silent",
        "--show-error",
        "--fail",
        "--max-time",
        "5",
        "--get",
    ]);
    for (key, value) in query {
        curl.arg("--data-urlencode").arg(format!("{key}={value}"));
    }
    let output = curl
        .arg(format!("http://{addr}{path}"))
        .output()
        .map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let body: Value = serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())?;
    if body["status"] != "success" {
        return Err(body.to_string());
    }
    Ok(body["data"].clone())
}

/// Polls `check` every second until it returns `Ok`, or fails the test with its last reason.
async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(reason) if Instant::now() > deadline => {
                panic!("{what}: not within {timeout:?}: {reason}")
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// How many series `selector` has right now.
fn series_count(addr: &str, selector: &str) -> Result<usize, String> {
    let data = api(addr, "/api/v1/query", &[("query", selector)])?;
    Ok(data["result"].as_array().map_or(0, Vec::len))
}

/// The names of the alerts in `state` (pending, firing).
fn alerts_in(addr: &str, state: &str) -> Result<Vec<String>, String> {
    let data = api(addr, "/api/v1/alerts", &[])?;
    Ok(data["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["state"] == state)
        .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_string))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_stack_and_alerts_on_a_dead_storage_daemon() {
    if !common::can_run(&["prometheus", "curl"]) {
        return;
    }
    let (dir, mut stack) = common::fresh_stack().await;
    let endpoints = stack
        .processes()
        .into_iter()
        .filter(|p| !p.metrics.is_empty())
        .count();
    let addr = format!("127.0.0.1:{}", ff_harness::free_port_block(1).unwrap());
    let config = stack.dir().join("prometheus/prometheus.yml");
    let mut prometheus = ChildProcess::new(
        "prometheus",
        "prometheus",
        [
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
            format!("--web.listen-address={addr}"),
        ],
        dir.path().join("prometheus.log"),
    );
    prometheus.spawn().unwrap();

    // Every endpoint of the stack is discovered from the file `up` wrote, and answers.
    eventually("every target up", Duration::from_secs(60), || {
        prometheus.check_running()?;
        let data = api(&addr, "/api/v1/targets", &[("state", "active")])?;
        let targets = data["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let up = targets.iter().filter(|t| t["health"] == "up").count();
        if targets.len() == endpoints && up == endpoints {
            Ok(())
        } else {
            Err(format!(
                "{up} of {} up, {endpoints} expected",
                targets.len()
            ))
        }
    })
    .await;

    // The series the dashboards and alert rules are built on, from the roles that export them.
    for selector in [
        r#"up{role="fs3-mgmtd"} == 1"#,
        r#"up{role="fs3-meta"} == 1"#,
        r#"up{role="fs3-storage"} == 1"#,
        r#"up{role="fs3-fuse"} == 1"#,
        r#"up{role="hai-server"} == 1"#,
        r#"up{role="hai-agent"} == 1"#,
        "fs3_mgmtd_targets",
        "fs3_mgmtd_chain_serving_replicas",
        "fs3_storage_requests_total",
        "fs3_storage_target_disk_bytes",
        "fs3_meta_requests_total",
        "fs3_fuse_requests_total",
        r#"raft_is_leader{role="fs3-mgmtd"}"#,
        r#"raft_commit_index{role="hai-server"}"#,
        "hai_nodes",
        "hai_jobs",
        "hai_agent_ranks",
        "fs3_storage_build_info",
    ] {
        eventually(selector, Duration::from_secs(30), || {
            match series_count(&addr, selector)? {
                0 => Err("no series".to_string()),
                _ => Ok(()),
            }
        })
        .await;
    }
    let page_alerts = alerts_in(&addr, "firing").unwrap();
    assert!(
        !page_alerts.iter().any(|a| a.starts_with("Fs3Storage")),
        "a healthy stack fires {page_alerts:?}"
    );

    // A storage daemon dies: Prometheus sees it gone, mgmtd takes its target offline.
    stack.fs3.storage(2).unwrap().kill().await.unwrap();
    let firing = eventually(
        "the storage alerts firing",
        Duration::from_secs(150),
        || {
            prometheus.check_running()?;
            let firing = alerts_in(&addr, "firing")?;
            let wanted = ["Fs3StorageDaemonDown", "Fs3StorageTargetOffline"];
            if wanted.iter().all(|w| firing.iter().any(|f| f == w)) {
                Ok(firing)
            } else {
                Err(format!("firing: {firing:?}"))
            }
        },
    )
    .await;
    eprintln!("firing after the kill: {firing:?}");

    prometheus.stop(Duration::from_secs(10)).await.unwrap();
    stack.stop().await;
}
