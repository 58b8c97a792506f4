//! Shared by the fs3 end-to-end tests: starting a local cluster of real `fs3` processes,
//! generating chunk contents that identify themselves, and comparing replicas.

#![allow(dead_code)] // each test file uses a different subset

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use ff_harness::fs3::{Fs3Cluster, Fs3ClusterSpec, TABLE_ID};
use fs3_client::{ChunkClient, ChunkUpdate};
use fs3_proto::storage::ChunkId;

pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A cluster of `mgmtd` replicas and `storage` daemons (one target each), replication 3,
/// in a fresh temporary directory.
pub async fn cluster(mgmtd: u64, storage: u64) -> (tempfile::TempDir, Fs3Cluster) {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start(spec(dir.path(), mgmtd, storage)).await;
    (dir, cluster)
}

/// The spec [`cluster`] starts, on free ports, for tests that change it first.
pub fn spec(dir: &std::path::Path, mgmtd: u64, storage: u64) -> Fs3ClusterSpec {
    // Ports are chosen when the cluster starts, for the spec as the test leaves it.
    Fs3ClusterSpec::new(env!("CARGO_BIN_EXE_fs3"), dir, mgmtd, storage, 3, 0)
}

/// Starts `spec`, printing the daemon logs if it does not come up.
pub async fn start(spec: Fs3ClusterSpec) -> Fs3Cluster {
    let dir = spec.dir.clone();
    match Fs3Cluster::start(spec, START_TIMEOUT).await {
        Ok(cluster) => cluster,
        Err(error) => {
            dump_logs(&dir);
            panic!("cluster did not start: {error:#}");
        }
    }
}

/// Prints every daemon log in `dir` (for failing tests).
pub fn dump_logs(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("==== {} (last 60 lines)", path.display());
            for line in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// The chains of the bootstrapped table.
pub async fn chains(cluster: &Fs3Cluster) -> Vec<u64> {
    let routing = cluster.routing().await.unwrap();
    routing
        .tables
        .iter()
        .find(|t| t.id == TABLE_ID)
        .unwrap()
        .chains
        .clone()
}

/// Content of chunk `index` written as generation `generation`: every 8 bytes name the chunk,
/// the generation and the offset, so a misplaced or stale block is recognisable.
pub fn content(inode: u64, index: u32, generation: u32, length: usize) -> Bytes {
    let mut data = Vec::with_capacity(length + 8);
    let mut offset = 0u64;
    while data.len() < length {
        let word = inode.rotate_left(40)
            ^ (u64::from(index) << 32)
            ^ (u64::from(generation) << 48)
            ^ offset;
        data.extend_from_slice(&word.to_le_bytes());
        offset += 8;
    }
    data.truncate(length);
    Bytes::from(data)
}

pub fn chunk(inode: u64, index: u32) -> ChunkId {
    ChunkId {
        inode,
        index: index.into(),
    }
}

/// Writes chunks 0..`count` of file `inode` on `chain` at once (their sizes cycling through
/// `sizes`, contents from [`content`], generation 1), then reads each back.
pub async fn write_and_read_back(
    client: &ChunkClient,
    chain: u64,
    inode: u64,
    count: u32,
    sizes: &[usize],
) {
    let writes = (0..count).map(|index| async move {
        let data = content(inode, index, 1, sizes[index as usize % sizes.len()]);
        client
            .write(chain, chunk(inode, index), ChunkUpdate::replace(data))
            .await
            .unwrap()
    });
    futures::future::join_all(writes).await;
    assert_read_back(client, chain, inode, 0..count, sizes).await;
}

/// Reads back whole the chunks `indices` of file `inode` that [`write_and_read_back`] wrote
/// with these `sizes`, and checks length, contents and version.
pub async fn assert_read_back(
    client: &ChunkClient,
    chain: u64,
    inode: u64,
    indices: std::ops::Range<u32>,
    sizes: &[usize],
) {
    let largest = sizes.iter().copied().max().unwrap_or(0);
    for index in indices {
        let expected = content(inode, index, 1, sizes[index as usize % sizes.len()]);
        let read = client
            .read(chain, chunk(inode, index), 0, largest as u32 + 1)
            .await
            .unwrap();
        assert_eq!(read.data.len(), expected.len(), "chunk {index}");
        assert!(read.data == expected, "chunk {index} came back different");
        assert_eq!(read.version, 1, "chunk {index}");
    }
}

/// For every chunk on any target: the (version, length, crc) each replica of its chain holds.
/// Replicas are identical when every entry lists the same triple for every target.
pub async fn replica_views(
    client: &ChunkClient,
    cluster: &Fs3Cluster,
) -> BTreeMap<(u64, (u64, u64)), BTreeMap<u64, (u64, u32, u32)>> {
    let routing = cluster.routing().await.unwrap();
    let mut views = BTreeMap::new();
    for chain in &routing.chains {
        for target in &chain.targets {
            for entry in client.dump_meta(target.target_id).await.unwrap() {
                let id = entry.chunk.unwrap();
                views
                    .entry((chain.id, (id.inode, id.index)))
                    .or_insert_with(BTreeMap::new)
                    .insert(
                        target.target_id,
                        (entry.committed_version, entry.length, entry.crc32c),
                    );
            }
        }
    }
    views
}

/// Asserts that every chunk is held identically by all `replication` replicas of its chain:
/// the same version, length and checksum in every target's metadata, and the same bytes read
/// from each replica (which verifies them against their block checksums).
pub async fn assert_replicas_identical(
    client: &ChunkClient,
    cluster: &Fs3Cluster,
    replication: usize,
) {
    let views = replica_views(client, cluster).await;
    assert!(!views.is_empty(), "no chunks at all");
    for ((chain, (inode, index)), replicas) in &views {
        assert_eq!(
            replicas.len(),
            replication,
            "chunk {inode}:{index} replicas: {replicas:?}"
        );
        let first = replicas.values().next().unwrap();
        assert!(
            replicas.values().all(|r| r == first),
            "chunk {inode}:{index} differs between replicas: {replicas:?}"
        );
        let mut contents = Vec::new();
        for target in replicas.keys() {
            let read = client
                .read_replica(
                    *chain,
                    *target,
                    ChunkId {
                        inode: *inode,
                        index: *index,
                    },
                    0,
                    u32::MAX,
                )
                .await
                .unwrap_or_else(|e| panic!("chunk {inode}:{index} on target {target}: {e}"));
            assert_eq!(read.version, first.0);
            contents.push(read.data);
        }
        assert!(
            contents.iter().all(|c| *c == contents[0]),
            "chunk {inode}:{index}: replicas hold different bytes"
        );
    }
}

/// The value of the series named exactly `series` (name and labels) in a `/metrics` text.
pub fn metric_value(text: &str, series: &str) -> f64 {
    ff_metrics::series_value(text, series).unwrap_or_else(|| panic!("no series {series}"))
}
