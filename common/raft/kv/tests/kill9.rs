//! Real processes, SIGKILL: a client writes 2,000 keys while the leader process is killed and
//! restarted several times. Afterwards every acknowledged key is on every node with its value,
//! no key was applied twice, and each kill was followed by a new leader within 6 seconds (the
//! election timeout is a second or two; the margin is for a loaded CI machine — how fast
//! failover is, `ff-kv bench` measures).

// Tests may panic on anything unexpected; that is how they fail.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ff_harness::free_port_block;
use ff_raft::RaftConfig;
use ff_raft_kv::KvClient;
use ff_raft_kv::procs::{ProcessCluster, ProcessClusterSpec};

const KEYS: usize = 2000;
const WRITERS: usize = 8;
const KILLS: usize = 4;

async fn start_cluster(dir: &std::path::Path) -> ProcessCluster {
    let spec = ProcessClusterSpec {
        binary: env!("CARGO_BIN_EXE_ff-kv").into(),
        dir: dir.to_path_buf(),
        nodes: 3,
        port: free_port_block(3).expect("ports"),
        metrics_port: free_port_block(3).expect("ports"),
        raft: RaftConfig {
            cluster: format!("kill9-{:x}", rand::random::<u32>()),
            // Small enough that the kills land across log compactions too.
            snapshot_threshold: 500,
            log_retain_entries: 100,
            ..RaftConfig::default()
        },
    };
    ProcessCluster::start(spec).await.expect("start cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_leader_kills() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = start_cluster(dir.path()).await;
    cluster
        .wait_for_leader(None, Duration::from_secs(30))
        .await
        .expect("initial leader");

    let options = ff_rpc::ClientOptions {
        total_timeout: Duration::from_secs(20),
        request_timeout: Duration::from_secs(3),
        connect_timeout: Duration::from_millis(300),
        ..ff_rpc::ClientOptions::default()
    };
    let client = Arc::new(KvClient::new(cluster.endpoints(), options).unwrap());
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let (client, acknowledged, failed, next) = (
            client.clone(),
            acknowledged.clone(),
            failed.clone(),
            next.clone(),
        );
        writers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= KEYS {
                    return;
                }
                let key = format!("key-{i:05}");
                // One put call retries inside the client under one request id.
                match client
                    .put(key.as_bytes(), format!("value-{i}").as_bytes())
                    .await
                {
                    Ok(version) => {
                        assert_eq!(version, 1, "{key} was applied more than once");
                        acknowledged.lock().unwrap().insert(key);
                    }
                    Err(error) => failed.lock().unwrap().push((key, error.to_string())),
                }
            }
        }));
    }

    // Kill the leader a few times while the writers run.
    let mut election_times = Vec::new();
    for round in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (leader, term) = cluster
            .wait_for_leader(None, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        cluster.kill(leader).await.unwrap();
        let killed = Instant::now();
        let (new_leader, new_term) = cluster
            .wait_for_leader(Some(leader), Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("round {round}: no new leader after killing {leader}: {e}"));
        let took = killed.elapsed();
        assert!(new_term > term, "round {round}");
        election_times.push((leader, new_leader, took));
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.spawn(leader).unwrap();
    }
    for writer in writers {
        writer.await.unwrap();
    }
    for (killed, elected, took) in &election_times {
        assert!(
            *took < Duration::from_secs(6),
            "after killing node {killed}, node {elected} took {took:?} to lead: {election_times:?}"
        );
    }

    cluster
        .wait_converged(Duration::from_secs(60))
        .await
        .expect("converge");
    let acknowledged = acknowledged.lock().unwrap().clone();
    let failed = failed.lock().unwrap().clone();
    assert!(
        acknowledged.len() >= KEYS * 9 / 10,
        "too few writes acknowledged ({}); failures: {:?}",
        acknowledged.len(),
        &failed[..failed.len().min(5)]
    );
    // Identical on every node, nothing applied twice ...
    let contents = ff_raft_kv::demo::consistent_contents(&cluster)
        .await
        .expect("replicas agree");
    // ... and every acknowledged key there with its value.
    for key in &acknowledged {
        let i: usize = key["key-".len()..].parse().unwrap();
        let (value, _) = contents
            .get(key.as_bytes())
            .unwrap_or_else(|| panic!("acknowledged {key} is missing"));
        assert_eq!(value, format!("value-{i}").as_bytes(), "{key}");
    }

    // Every node exposes its raft state on /metrics.
    for id in 1..=3 {
        let addr = cluster.metrics_addr(id).unwrap().to_string();
        let body = ff_metrics::http_get(&addr, "/metrics").await.unwrap();
        for series in [
            "raft_term ",
            "raft_commit_index ",
            "raft_applied_index ",
            "raft_leader_id ",
            "raft_fsync_seconds_bucket",
            "raft_proposals_total",
        ] {
            assert!(body.contains(series), "node {id} /metrics lacks {series}");
        }
    }
    cluster.stop_all().await;
    println!(
        "election times after kills: {election_times:?}; acknowledged {} of {KEYS}",
        acknowledged.len()
    );
}
