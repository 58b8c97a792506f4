//! Bytes flipped in a chunk file on one target's disk (1 mgmtd, 3 storage daemons): that
//! replica reports the checksum mismatch, clients still read the right data from the others,
//! and the damaged copy is repaired from a good replica.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use common::{assert_replicas_identical, chains, chunk, cluster, content};
use fs3_client::{ChunkUpdate, ClientError};
use tokio::time::Instant;

/// Finds `needle` in the target's data files and flips the bytes after it; returns how many
/// copies were damaged.
fn flip_bytes_after(target_dir: &Path, needle: &[u8]) -> usize {
    let mut damaged = 0;
    for entry in std::fs::read_dir(target_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "dat") {
            continue;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut data = Vec::new();
        file.read_to_end(&mut data).unwrap();
        let mut from = 0;
        while let Some(at) = data[from..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
        {
            let spot = at + needle.len() + 100;
            file.seek(SeekFrom::Start(spot as u64)).unwrap();
            let flipped: Vec<u8> = data[spot..spot + 16].iter().map(|b| !b).collect();
            file.write_all(&flipped).unwrap();
            damaged += 1;
            from = at + 1;
        }
        // The engine reads with O_DIRECT: push the change to the disk itself.
        file.sync_all().unwrap();
    }
    damaged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flipped_bytes_are_detected_and_repaired() {
    let (dir, mut cluster) = cluster(1, 3).await;
    let client = cluster.chunk_client(Duration::from_secs(30)).unwrap();
    let chain = chains(&cluster).await[0];
    let data = content(5, 0, 1, 200_000);
    client
        .write(chain, chunk(5, 0), ChunkUpdate::replace(data.clone()))
        .await
        .unwrap();
    let routing = cluster.routing().await.unwrap();
    let victim = routing.chains[0].targets[1].target_id;

    // The chunk's bytes are unique, so its first 64 bytes locate it in the class file.
    let damaged = flip_bytes_after(&cluster.spec().target_path(victim), &data[..64]);
    assert_eq!(damaged, 1, "exactly one copy of the chunk on the target");

    // That replica reports the damage instead of returning wrong bytes.
    match client
        .read_replica(chain, victim, chunk(5, 0), 0, 1 << 20)
        .await
    {
        Err(ClientError::Corrupt(message)) => eprintln!("replica {victim}: {message}"),
        other => panic!("corrupt replica read: {other:?}"),
    }
    // Clients still read the right data, again and again.
    for _ in 0..20 {
        let read = client.read(chain, chunk(5, 0), 0, 1 << 20).await.unwrap();
        assert!(read.data == data);
    }
    // The damaged copy is repaired from a good replica.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client
            .read_replica(chain, victim, chunk(5, 0), 0, 1 << 20)
            .await
        {
            Ok(read) if read.data == data => break,
            other => {
                assert!(Instant::now() < deadline, "not repaired: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_replicas_identical(&client, &cluster, 3).await;
    let metrics =
        cluster.metrics_endpoints()[&format!("storage-{}", cluster.spec().node_of(victim))].clone();
    // Counted once the repair finishes (a moment after its data is readable).
    ff_harness::wait_for(
        "the repair counted",
        Duration::from_secs(5),
        Duration::from_millis(100),
        || async {
            let text = ff_metrics::http_get(&metrics, "/metrics")
                .await
                .map_err(|e| ff_harness::NotReady::Pending(e.to_string()))?;
            if text.contains("fs3_storage_recovery_chunks_total{kind=\"repaired\"} 1") {
                Ok(())
            } else {
                Err(format!("repair not counted:\n{text}").into())
            }
        },
    )
    .await
    .unwrap();
    cluster.stop_all().await;
    drop(dir);
}
