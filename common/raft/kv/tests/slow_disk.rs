//! A slow disk (a fail point delays every log write) keeps several log writes in flight at
//! once, while a follower keeps restarting into snapshots and the leader serves lagging
//! followers from both disk and the not-yet-written tail of its log. Nothing may crash, and
//! every acknowledged write must end up on every node.
//!
//! Fail points are process-wide, so these tests live in their own test binary.

// Tests may panic on anything unexpected; that is how they fail.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ff_raft::{Consistency, RaftConfig, Role};
use ff_raft_kv::local::{LocalCluster, fast_raft_config};
use ff_raft_kv::proto::{Command, Put, Query, Scan, command, query};

fn put(key: &str, value: &[u8]) -> Command {
    Command {
        op: Some(command::Op::Put(Put {
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_in_flight_survive_snapshots_and_lagging_followers() {
    fail::cfg("log_writer::before_persist", "sleep(20)").unwrap();
    let template = RaftConfig {
        snapshot_threshold: 20,
        log_retain_entries: 2,
        max_size_per_msg: ff_config::ByteSize::kib(2),
        // A cache smaller than what is in flight, so reads straddle disk and unwritten tail.
        entry_cache_size: ff_config::ByteSize::kib(4),
        max_inflight_msgs: 4,
        ..fast_raft_config()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::start(dir.path(), 3, template).await.unwrap();
    let leader = cluster
        .wait_for_leader(Duration::from_secs(15))
        .await
        .unwrap();
    let node = cluster.node(leader).unwrap().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let value = vec![b'x'; 256];
    let mut writers = Vec::new();
    for w in 0..64 {
        let (node, value, stop) = (node.clone(), value.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut written = 0;
            while !stop.load(Ordering::Relaxed) {
                node.propose(put(&format!("w{w:02}-{written:05}"), &value))
                    .await
                    .unwrap_or_else(|e| panic!("w{w}-{written}: {e}"));
                written += 1;
            }
            written
        }));
    }
    let lagging = (1..=3).find(|id| *id != leader).unwrap();
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for id in 1..=3 {
            let status = cluster.node(id).unwrap().status();
            assert_ne!(
                status.role,
                Role::Stopped,
                "round {round}: node {id} crashed: {status:?}"
            );
        }
        cluster.stop(lagging).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        cluster.restart(lagging).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for writer in writers {
        total += writer.await.unwrap();
    }
    fail::remove("log_writer::before_persist");
    for id in 1..=3 {
        let status = cluster.node(id).unwrap().status();
        assert_ne!(status.role, Role::Stopped, "node {id} crashed: {status:?}");
    }
    let applied = node.status().applied_index;
    cluster
        .wait_applied(applied, Duration::from_secs(30))
        .await
        .unwrap();
    for id in 1..=3 {
        let items = cluster
            .node(id)
            .unwrap()
            .read_with(
                Query {
                    op: Some(query::Op::Scan(Scan::default())),
                },
                Consistency::Local,
            )
            .await
            .unwrap()
            .items;
        assert_eq!(items.len(), total, "node {id}");
        assert!(
            items.iter().all(|i| i.version == 1 && i.value == value),
            "node {id}"
        );
    }
    cluster.shutdown().await;
}
