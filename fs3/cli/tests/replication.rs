//! fs3 data plane end to end, on real processes (1 mgmtd, 3 storage daemons, replication 3):
//! many chunks written and read back through the chunk client; every replica byte-identical;
//! partial writes, replace, truncate and remove; and a restart of the whole cluster.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{assert_replicas_identical, chains, chunk, cluster, content};
use fs3_client::{ChunkUpdate, ClientError};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_chunks_replicate_identically() {
    let (dir, mut cluster) = cluster(1, 3).await;
    let client = cluster.chunk_client(Duration::from_secs(30)).unwrap();
    let chains = chains(&cluster).await;
    assert_eq!(chains.len(), 1, "3 nodes x 1 target / replication 3");
    let chain = chains[0];

    // 64 chunks of assorted sizes, written concurrently.
    let sizes = [1usize, 4096, 5000, 65536, 1 << 20, 300_000];
    common::write_and_read_back(&client, chain, 7, 64, &sizes).await;

    // A partial write in the middle of a chunk, and one extending it.
    let base = content(8, 0, 1, 100_000);
    client
        .write(chain, chunk(8, 0), ChunkUpdate::replace(base.clone()))
        .await
        .unwrap();
    let patch = Bytes::from(vec![0xAB; 5000]);
    client
        .write(
            chain,
            chunk(8, 0),
            ChunkUpdate::write(12_345, patch.clone()),
        )
        .await
        .unwrap();
    let tail = Bytes::from(vec![0xCD; 3000]);
    let reply = client
        .write(
            chain,
            chunk(8, 0),
            ChunkUpdate::write(110_000, tail.clone()),
        )
        .await
        .unwrap();
    assert_eq!(reply.length, 113_000);
    let mut expected = base.to_vec();
    expected[12_345..17_345].copy_from_slice(&patch);
    expected.resize(110_000, 0); // the hole reads as zeros
    expected.extend_from_slice(&tail);
    let read = client.read(chain, chunk(8, 0), 0, 200_000).await.unwrap();
    assert!(read.data == expected, "partial writes");
    assert_eq!(read.version, 3);
    // A read of a sub-range.
    let read = client.read(chain, chunk(8, 0), 12_000, 1000).await.unwrap();
    assert!(read.data[..] == expected[12_000..13_000]);

    // Truncate down, then up (zero-filled).
    client
        .write(chain, chunk(8, 0), ChunkUpdate::truncate(20_000))
        .await
        .unwrap();
    client
        .write(chain, chunk(8, 0), ChunkUpdate::truncate(30_000))
        .await
        .unwrap();
    expected.truncate(20_000);
    expected.resize(30_000, 0);
    let read = client.read(chain, chunk(8, 0), 0, 200_000).await.unwrap();
    assert!(read.data == expected, "truncate");

    // Remove: the chunk is gone everywhere.
    client
        .write(chain, chunk(7, 0), ChunkUpdate::remove())
        .await
        .unwrap();
    match client.read(chain, chunk(7, 0), 0, 10).await {
        Err(ClientError::NotFound(_)) => {}
        other => panic!("removed chunk read: {other:?}"),
    }

    assert_replicas_identical(&client, &cluster, 3).await;

    // The whole cluster stops and starts again on the same directories: every replica comes
    // back through the restart protocol and the data is all there.
    cluster.stop_all().await;
    let cluster = common::start(cluster.spec().clone()).await;
    let client = cluster.chunk_client(Duration::from_secs(30)).unwrap();
    common::assert_read_back(&client, chain, 7, 1..64, &sizes).await;
    assert_replicas_identical(&client, &cluster, 3).await;
    let mut cluster = cluster;
    cluster.stop_all().await;
    drop(dir);
}
