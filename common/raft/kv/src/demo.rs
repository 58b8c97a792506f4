//! `ff-kv demo`: three node processes, a write load, the leader killed with SIGKILL, a new
//! leader, the old one restarted and caught up, and every key checked on every node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::KvClient;
use crate::procs::ProcessCluster;

/// Writes `count` keys `prefix-00000…` with `concurrency` writers; returns keys per second.
pub async fn write_keys(
    client: &Arc<KvClient>,
    prefix: &str,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let next = next.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return Ok::<(), anyhow::Error>(());
                }
                let key = format!("{prefix}-{i:05}");
                client.put(key.as_bytes(), key.as_bytes()).await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Key -> (value, version) as one node holds it.
pub type Contents = BTreeMap<Vec<u8>, (Vec<u8>, u64)>;

/// Reads every node's contents from its own applied state (call after the cluster converged)
/// and checks that all nodes hold the same keys and values and that no key was applied twice.
pub async fn consistent_contents(cluster: &ProcessCluster) -> anyhow::Result<Contents> {
    let mut reference: Option<(String, Contents)> = None;
    for endpoint in cluster.endpoints() {
        let (items, applied) = cluster
            .client()
            .scan_local(&endpoint, b"", b"", crate::machine::MAX_SCAN_LIMIT)
            .await?;
        let content: Contents = items
            .into_iter()
            .map(|i| (i.key, (i.value, i.version)))
            .collect();
        for (key, (_, version)) in &content {
            anyhow::ensure!(
                *version == 1,
                "node {endpoint} (applied index {applied}): key {} was applied {version} times",
                String::from_utf8_lossy(key)
            );
        }
        match &reference {
            None => reference = Some((endpoint, content)),
            Some((first, expected)) => anyhow::ensure!(
                *expected == content,
                "node {endpoint} (applied index {applied}) differs from node {first}"
            ),
        }
    }
    Ok(reference.map(|(_, content)| content).unwrap_or_default())
}

/// Runs the demo on a started cluster; prints as it goes.
pub async fn run(cluster: &mut ProcessCluster, keys: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let (leader, term) = cluster
        .wait_for_leader(None, Duration::from_secs(30))
        .await?;
    println!(
        "3 nodes up; node {leader} leads term {term} ({:.1}s)",
        started.elapsed().as_secs_f64()
    );

    let client = Arc::new(KvClient::new(cluster.endpoints(), cluster_options())?);
    let rate = write_keys(&client, "before", keys, 16).await?;
    println!(
        "wrote {keys} keys with 16 writers: {rate:.0} writes/s, each acknowledged after a durable quorum commit"
    );

    cluster.kill(leader).await?;
    let killed = Instant::now();
    println!("killed leader node {leader} with SIGKILL");
    let (new_leader, new_term) = cluster
        .wait_for_leader(Some(leader), Duration::from_secs(30))
        .await?;
    println!(
        "node {new_leader} leads term {new_term} {:.2}s after the kill",
        killed.elapsed().as_secs_f64()
    );
    let more = keys / 4;
    let rate = write_keys(&client, "during", more, 16).await?;
    println!("wrote {more} more keys with node {leader} down: {rate:.0} writes/s");

    cluster.spawn(leader)?;
    let restarted = Instant::now();
    let index = cluster.wait_converged(Duration::from_secs(60)).await?;
    println!(
        "restarted node {leader}; all nodes applied index {index} after {:.2}s",
        restarted.elapsed().as_secs_f64()
    );
    let contents = consistent_contents(cluster).await?;
    anyhow::ensure!(
        contents.len() == keys + more && contents.iter().all(|(key, (value, _))| key == value),
        "expected {} keys each holding its own name, found {}",
        keys + more,
        contents.len()
    );
    println!(
        "verified: all {} keys present, identical and applied exactly once on every node",
        contents.len()
    );

    if let Some(metrics) = cluster.metrics_addr(new_leader).filter(|a| !a.is_empty()) {
        println!("leader metrics (http://{metrics}/metrics):");
        let body = ff_metrics::http_get(metrics, "/metrics")
            .await
            .unwrap_or_default();
        for line in body.lines().filter(|l| {
            l.starts_with("raft_term ")
                || l.starts_with("raft_commit_index ")
                || l.starts_with("raft_fsync_seconds_count")
                || l.starts_with("raft_fsync_seconds_sum")
                || l.starts_with("raft_proposals_total")
        }) {
            println!("  {line}");
        }
    }
    Ok(())
}

fn cluster_options() -> ff_rpc::ClientOptions {
    ff_rpc::ClientOptions {
        total_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_millis(500),
        ..ff_rpc::ClientOptions::default()
    }
}
