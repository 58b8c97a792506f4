//! Every process of a running stack serves `/metrics` that Prometheus's own linter accepts
//! (`promtool check metrics`: naming, units, `_total` counters, help texts), each with its
//! `*_build_info`, and the series operators need are there.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};

fn promtool_check(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    if output.status.success() {
        String::new()
    } else {
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_daemon_serves_metrics_promtool_accepts() {
    if !common::can_run(&["promtool"]) {
        return;
    }
    let (_dir, mut stack) = common::fresh_stack().await;
    let mut scraped = std::collections::BTreeMap::new();
    for process in stack.processes() {
        if process.metrics.is_empty() {
            continue;
        }
        let response = ff_metrics::http_get(&process.metrics, "/metrics")
            .await
            .unwrap();
        let text = response
            .split_once("\r\n\r\n")
            .map_or(response.as_str(), |(_, body)| body)
            .to_string();
        let problems = promtool_check(&text);
        assert!(
            problems.is_empty(),
            "{} ({}): {problems}",
            process.name,
            process.role
        );
        scraped
            .entry(process.role.clone())
            .or_insert_with(String::new)
            .push_str(&text);
    }
    let expect = [
        (
            "mgmtd",
            vec![
                "fs3_mgmtd_build_info",
                "fs3_mgmtd_targets",
                "raft_term",
                "raft_commit_index",
            ],
        ),
        (
            "storage",
            vec![
                "fs3_storage_build_info",
                "fs3_storage_bytes_total",
                "fs3_storage_request_seconds_bucket",
            ],
        ),
        (
            "meta",
            vec![
                "fs3_meta_build_info",
                "fs3_meta_requests_total",
                "raft_applied_index",
            ],
        ),
        (
            "hai-server",
            vec![
                "hai_server_build_info",
                "hai_jobs",
                "hai_nodes",
                "hai_preemptions_total",
                "hai_queue_wait_seconds_bucket",
            ],
        ),
        (
            "hai-agent",
            vec![
                "hai_agent_build_info",
                "hai_agent_ranks",
                "hai_agent_attempt_exits_total",
            ],
        ),
    ];
    for (role, names) in expect {
        let text = scraped
            .get(role)
            .unwrap_or_else(|| panic!("no {role} scraped"));
        for name in names {
            assert!(text.contains(name), "{role} lacks {name}");
        }
    }
    // Every metric a Grafana panel queries is one the daemons (or moe-train) export.
    let mut exported: std::collections::BTreeSet<String> = scraped
        .values()
        .flat_map(|text| text.lines())
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    let registry = prometheus::Registry::new();
    moe_train::metrics::TrainMetrics::register(&registry).unwrap();
    exported.extend(registry.gather().iter().map(|f| f.name().to_string()));
    let dashboards =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/dashboards");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dashboards).unwrap() {
        let path = entry.unwrap().path();
        let dashboard: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(
            dashboard["uid"]
                .as_str()
                .is_some_and(|u| u.starts_with("fireflyer-")),
            "{}",
            path.display()
        );
        assert_eq!(
            dashboard["templating"]["list"][0]["type"],
            "datasource",
            "{}",
            path.display()
        );
        for panel in dashboard["panels"].as_array().unwrap() {
            assert_eq!(
                panel["datasource"]["uid"],
                "${datasource}",
                "{}",
                path.display()
            );
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for name in expr
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                    .filter(|w| {
                        ["fs3_", "hai_", "raft_", "moe_train_"]
                            .iter()
                            .any(|p| w.starts_with(p))
                    })
                {
                    assert!(
                        exported.contains(name),
                        "{}: panel {:?} queries {name}, which nothing exports",
                        path.display(),
                        panel["title"]
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} metric references found");
    stack.stop().await;
}
