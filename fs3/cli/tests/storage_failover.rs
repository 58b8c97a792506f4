//! kill -9 of a storage daemon (the chain's head, and in another test its tail) in the middle
//! of a write stream (1 mgmtd, 3 storage daemons, replication 3): every acknowledged write reads
//! back; the dead daemon's target goes offline within the lease; writes continue on the other
//! two; after a restart the target resyncs while writes continue, serves again, and all
//! replicas end byte-identical.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{assert_replicas_identical, chains, chunk, cluster, content};
use fs3_client::{ChunkClient, ChunkUpdate};
use fs3_proto::mgmtd::PublicState;
use tokio::time::Instant;

const INODE: u64 = 9;
/// Chunks written or removed only while the victim is down.
const COLD: u64 = 10;
const CHUNKS: u32 = 48;
const WRITERS: u32 = 4;
const CHUNK_LEN: usize = 64 * 1024;

/// Per chunk: the last acknowledged generation, and a newer generation whose write failed (it
/// may or may not have landed).
#[derive(Default, Clone, Copy, Debug)]
struct Acked {
    generation: u32,
    unsure: Option<u32>,
}

struct Stream {
    acked: Mutex<BTreeMap<u32, Acked>>,
    count: AtomicU64,
    failures: AtomicU64,
    stop: AtomicBool,
}

async fn writer(client: Arc<ChunkClient>, chain: u64, stream: Arc<Stream>, lane: u32) {
    let mut generation = 0u32;
    while !stream.stop.load(Ordering::Relaxed) {
        generation += 1;
        for index in (lane..CHUNKS).step_by(WRITERS as usize) {
            let data = content(INODE, index, generation, CHUNK_LEN - index as usize);
            let result = client
                .write(chain, chunk(INODE, index), ChunkUpdate::replace(data))
                .await;
            let mut acked = stream.acked.lock().unwrap();
            let entry = acked.entry(index).or_default();
            match result {
                Ok(_) => {
                    *entry = Acked {
                        generation,
                        unsure: None,
                    };
                    stream.count.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    eprintln!("write of chunk {index} gen {generation} failed: {error}");
                    entry.unsure = Some(generation);
                    stream.failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

async fn metric_text(cluster: &ff_harness::fs3::Fs3Cluster, daemon: &str) -> String {
    let addr = cluster.metrics_endpoints()[daemon].clone();
    ff_metrics::http_get(&addr, "/metrics").await.unwrap()
}

/// Waits until `count` acknowledged writes more than now have happened.
async fn wait_progress(stream: &Stream, more: u64, timeout: Duration) {
    let start = stream.count.load(Ordering::Relaxed);
    let deadline = Instant::now() + timeout;
    while stream.count.load(Ordering::Relaxed) < start + more {
        assert!(
            Instant::now() < deadline,
            "writes stalled: {} acked in {timeout:?}",
            stream.count.load(Ordering::Relaxed) - start
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_the_head_mid_stream_then_resync() {
    kill_storage_mid_stream_then_resync(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_the_tail_mid_stream_then_resync() {
    kill_storage_mid_stream_then_resync(2).await;
}

/// Kills the storage daemon holding the chain's target at `position` (0: head, 2: tail).
async fn kill_storage_mid_stream_then_resync(position: usize) {
    let (dir, mut cluster) = cluster(1, 3).await;
    let client = Arc::new(cluster.chunk_client(Duration::from_secs(30)).unwrap());
    let chain = chains(&cluster).await[0];
    let routing = cluster.routing().await.unwrap();
    let order: Vec<u64> = routing.chains[0]
        .targets
        .iter()
        .map(|t| t.target_id)
        .collect();
    let victim_target = order[position];
    let victim = cluster.spec().node_of(victim_target);

    let stream = Arc::new(Stream {
        acked: Mutex::new(BTreeMap::new()),
        count: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let writers: Vec<_> = (0..WRITERS)
        .map(|lane| tokio::spawn(writer(client.clone(), chain, stream.clone(), lane)))
        .collect();
    wait_progress(&stream, 200, Duration::from_secs(30)).await;
    // Chunks that will be removed while the victim is down.
    for index in 0..8 {
        client
            .write(
                chain,
                chunk(COLD, index),
                ChunkUpdate::replace(content(COLD, index, 1, 9000)),
            )
            .await
            .unwrap();
    }

    cluster.storage(victim).unwrap().kill().await.unwrap();
    let killed = Instant::now();
    let lease = cluster.spec().lease;
    cluster
        .wait_target_state(
            victim_target,
            PublicState::Offline,
            lease + Duration::from_secs(3),
        )
        .await
        .unwrap();
    eprintln!(
        "target {victim_target} offline after {:?}",
        killed.elapsed()
    );
    // Writes continue on the two left.
    wait_progress(&stream, 200, Duration::from_secs(30)).await;
    let routing = cluster.routing().await.unwrap();
    let serving = routing.chains[0]
        .targets
        .iter()
        .filter(|t| t.state() == PublicState::Serving)
        .count();
    assert_eq!(serving, 2, "{:?}", routing.chains[0]);
    // Operators see it: mgmtd's metrics count the offline target and the chain change (the
    // gauges follow the committed change; a scrape may come a moment before).
    let expected = [
        "fs3_mgmtd_targets{state=\"offline\"} 1",
        "fs3_mgmtd_targets{state=\"serving\"} 2",
        "raft_is_leader 1",
    ];
    let mgmtd_metrics = ff_harness::wait_for(
        "mgmtd's metrics to show the offline target",
        Duration::from_secs(5),
        Duration::from_millis(100),
        || async {
            let text = metric_text(&cluster, "mgmtd-1").await;
            match expected.iter().find(|series| !text.contains(*series)) {
                None => Ok(text),
                Some(series) => Err(format!("no {series}:\n{text}").into()),
            }
        },
    )
    .await
    .unwrap();
    assert!(
        common::metric_value(&mgmtd_metrics, "fs3_mgmtd_chain_changes_total") >= 1.0,
        "{mgmtd_metrics}"
    );
    // Changes the victim misses and nothing rewrites later: only the resync can bring them.
    for index in 0..8 {
        client
            .write(chain, chunk(COLD, index), ChunkUpdate::remove())
            .await
            .unwrap();
    }
    for index in 8..24 {
        client
            .write(
                chain,
                chunk(COLD, index),
                ChunkUpdate::replace(content(COLD, index, 2, 70_000)),
            )
            .await
            .unwrap();
    }

    // Restart: it syncs while writes continue, then serves.
    cluster.storage(victim).unwrap().spawn().unwrap();
    let restarted = Instant::now();
    let count_at_restart = stream.count.load(Ordering::Relaxed);
    cluster
        .wait_target_state(victim_target, PublicState::Serving, Duration::from_secs(60))
        .await
        .unwrap();
    eprintln!(
        "target {victim_target} serving {:?} after restart; {} writes acked meanwhile",
        restarted.elapsed(),
        stream.count.load(Ordering::Relaxed) - count_at_restart
    );
    wait_progress(&stream, 100, Duration::from_secs(30)).await;
    stream.stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }

    for index in 8..24 {
        let read = client
            .read(chain, chunk(COLD, index), 0, 1 << 20)
            .await
            .unwrap();
        assert!(
            read.data == content(COLD, index, 2, 70_000),
            "cold chunk {index}"
        );
    }
    // Every acknowledged write reads back (a failed write may or may not have landed).
    let acked = stream.acked.lock().unwrap().clone();
    assert_eq!(acked.len(), CHUNKS as usize);
    for (index, state) in &acked {
        let read = client
            .read(chain, chunk(INODE, *index), 0, CHUNK_LEN as u32)
            .await
            .unwrap();
        let len = CHUNK_LEN - *index as usize;
        let matches = |generation: u32| read.data == content(INODE, *index, generation, len);
        assert!(
            matches(state.generation) || state.unsure.is_some_and(matches),
            "chunk {index}: read does not match acked generation {state:?}"
        );
    }
    eprintln!(
        "{} writes acked, {} failed",
        stream.count.load(Ordering::Relaxed),
        stream.failures.load(Ordering::Relaxed)
    );
    assert_replicas_identical(&client, &cluster, 3).await;
    // The sources of the resync (the last serving replica) counted the chunks they copied.
    let mut synced = 0.0;
    for node in 1..=3 {
        let text = metric_text(&cluster, &format!("storage-{node}")).await;
        synced += common::metric_value(&text, "fs3_storage_recovery_chunks_total{kind=\"synced\"}");
    }
    assert!(
        synced >= 16.0,
        "only {synced} chunks synced; the cold ones need it"
    );
    cluster.stop_all().await;
    drop(dir);
}
