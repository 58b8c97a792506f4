//! `fs3 admin` against a running cluster (1 mgmtd, 4 storage daemons, replication 3), as an
//! operator runs it: tables and JSON that match mgmtd's state, chains and tables created by hand,
//! targets taken offline and back, and one-line errors for refused requests and for an mgmtd
//! that cannot be reached.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Output;
use std::time::Duration;

use fs3_proto::mgmtd::PublicState;

fn admin(mgmtd: &str, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_fs3"))
        .arg("admin")
        .arg("--mgmtd")
        .arg(mgmtd)
        .args(args)
        .output()
        .unwrap()
}

fn json(mgmtd: &str, args: &[&str]) -> serde_json::Value {
    let output = admin(mgmtd, &[args, &["--json"]].concat());
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operators_see_and_change_the_cluster() {
    let (dir, mut cluster) = common::cluster(1, 4).await;
    let mgmtd = cluster.mgmtd_endpoints().join(",");

    // Four targets; the bootstrap made one chain of three, the fourth is unchained.
    let status = json(&mgmtd, &["status"]);
    assert_eq!(status["nodes"], 4);
    assert_eq!(status["nodes_alive"], 4);
    assert_eq!(status["targets"], 4);
    assert_eq!(status["chains"], 1);
    assert_eq!(status["serving"], 3);
    let targets = json(&mgmtd, &["targets"]);
    let unchained: Vec<u64> = targets
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["state"] == "unchained")
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(unchained.len(), 1, "{targets}");
    let spare = unchained[0];
    let routing = cluster.routing().await.unwrap();
    let chained = routing.chains[0].targets[0].target_id;
    let table = admin(&mgmtd, &["chains"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("TARGETS (head first)") && text.contains("serving"),
        "{text}"
    );

    // A chain reusing a chained target is refused, in one line, and changes nothing.
    let refused = admin(
        &mgmtd,
        &[
            "create-chain",
            "--id",
            "7",
            "--targets",
            &format!("{spare},{chained}"),
        ],
    );
    assert!(!refused.status.success());
    let message = stderr(&refused);
    assert!(message.contains("already belongs to a chain"), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
    assert_eq!(json(&mgmtd, &["status"])["chains"], 1);

    // The spare target as a chain of its own, in a table of its own.
    let created = admin(
        &mgmtd,
        &["create-chain", "--id", "7", "--targets", &spare.to_string()],
    );
    assert!(created.status.success(), "{}", stderr(&created));
    let created = admin(&mgmtd, &["create-table", "--id", "2", "--chains", "7"]);
    assert!(created.status.success(), "{}", stderr(&created));
    let chains = json(&mgmtd, &["chains"]);
    let seven = chains
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == 7)
        .unwrap()
        .clone();
    assert_eq!(seven["targets"][0]["target"], spare);

    // Offline by hand, then back.
    let offline = admin(&mgmtd, &["offline", &chained.to_string()]);
    assert!(offline.status.success(), "{}", stderr(&offline));
    cluster
        .wait_target_state(chained, PublicState::Offline, Duration::from_secs(10))
        .await
        .unwrap();
    let targets = json(&mgmtd, &["targets"]);
    let row = targets
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == chained)
        .unwrap()
        .clone();
    assert_eq!(row["admin_offline"], true, "{row}");
    let online = admin(&mgmtd, &["online", &chained.to_string()]);
    assert!(online.status.success(), "{}", stderr(&online));
    cluster
        .wait_all_serving(Duration::from_secs(30))
        .await
        .unwrap();

    // No mgmtd at the address: a clear one-line error, not a hang.
    let unreachable = admin("127.0.0.1:1", &["status"]);
    assert!(!unreachable.status.success());
    let message = stderr(&unreachable);
    assert!(
        message.contains("cannot reach an mgmtd leader at 127.0.0.1:1"),
        "{message}"
    );
    cluster.stop_all().await;
    drop(dir);
}
