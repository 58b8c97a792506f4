//! kill -9 of the mgmtd leader (3 mgmtd replicas, 3 storage daemons): a new leader takes over,
//! routing keeps working for clients and storage daemons, and nothing is lost — chains, targets
//! and tables are the same, the failure detector runs on the new leader, and the old leader
//! rejoins and catches up.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{chains, chunk, cluster, content};
use fs3_client::ChunkUpdate;
use fs3_proto::mgmtd::PublicState;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_mgmtd_leader() {
    let (dir, mut cluster) = cluster(3, 3).await;
    let client = cluster.chunk_client(Duration::from_secs(30)).unwrap();
    let chain = chains(&cluster).await[0];
    for index in 0..16 {
        client
            .write(
                chain,
                chunk(3, index),
                ChunkUpdate::replace(content(3, index, 1, 10_000)),
            )
            .await
            .unwrap();
    }
    let before = cluster.routing().await.unwrap();

    let leader = cluster
        .wait_for_mgmtd_leader(None, Duration::from_secs(10))
        .await
        .unwrap();
    cluster.mgmtd_process(leader).unwrap().kill().await.unwrap();
    let new_leader = cluster
        .wait_for_mgmtd_leader(Some(leader), Duration::from_secs(20))
        .await
        .unwrap();
    eprintln!("mgmtd leader {leader} killed; {new_leader} leads");

    // No state lost: the same nodes, targets, chains and tables.
    let after = cluster.routing().await.unwrap();
    assert!(after.version >= before.version);
    assert_eq!(after.nodes, before.nodes);
    assert_eq!(after.targets, before.targets);
    assert_eq!(after.tables, before.tables);
    assert_eq!(after.chains.len(), before.chains.len());

    // Storage daemons heartbeat the new leader: a whole lease later every target still serves
    // (a leader that lost their heartbeats would take them offline).
    tokio::time::sleep(cluster.spec().lease + Duration::from_secs(1)).await;
    cluster
        .wait_all_serving(Duration::from_secs(1))
        .await
        .unwrap();

    // Clients keep routing: reads and writes work, including with a fresh routing cache.
    let fresh = cluster.chunk_client(Duration::from_secs(30)).unwrap();
    for index in 0..16 {
        let read = fresh
            .read(chain, chunk(3, index), 0, 1 << 20)
            .await
            .unwrap();
        assert!(read.data == content(3, index, 1, 10_000));
        client
            .write(
                chain,
                chunk(3, index),
                ChunkUpdate::replace(content(3, index, 2, 12_000)),
            )
            .await
            .unwrap();
    }

    // The new leader's failure detector works: a storage daemon killed now goes offline.
    let victim_target = after.chains[0].targets[2].target_id;
    let victim = cluster.spec().node_of(victim_target);
    cluster.storage(victim).unwrap().kill().await.unwrap();
    let lease = cluster.spec().lease;
    cluster
        .wait_target_state(
            victim_target,
            PublicState::Offline,
            lease + Duration::from_secs(3),
        )
        .await
        .unwrap();

    // The old leader rejoins and catches up: it applies everything committed.
    cluster.mgmtd_process(leader).unwrap().spawn().unwrap();
    cluster.storage(victim).unwrap().spawn().unwrap();
    cluster
        .wait_all_serving(Duration::from_secs(60))
        .await
        .unwrap();
    cluster
        .wait_for_mgmtd_leader(None, Duration::from_secs(20))
        .await
        .unwrap();
    cluster
        .wait_mgmtd_converged(Duration::from_secs(20))
        .await
        .unwrap();
    for index in 0..16 {
        let read = fresh
            .read(chain, chunk(3, index), 0, 1 << 20)
            .await
            .unwrap();
        assert!(read.data == content(3, index, 2, 12_000));
    }
    cluster.stop_all().await;
    drop(dir);
}
