//! In-process three-node clusters over loopback gRPC: elections, replication, forwarding,
//! linearizable reads across leader changes, catch-up by snapshot, and membership changes.

// Tests may panic on anything unexpected; that is how they fail.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ff_raft::{Consistency, RaftConfig, RaftNode, Role};
use ff_raft_kv::local::{LocalCluster, fast_raft_config};
use ff_raft_kv::proto::{Command, Put, Query, Scan, command, query};
use ff_raft_kv::{KvClient, KvMachine};

const SETTLE: Duration = Duration::from_secs(15);

fn put(key: &str, value: &str) -> Command {
    Command {
        op: Some(command::Op::Put(Put {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
        })),
    }
}

fn scan_all() -> Query {
    Query {
        op: Some(query::Op::Scan(Scan::default())),
    }
}

fn get(key: &str) -> Query {
    Query {
        op: Some(query::Op::Get(ff_raft_kv::proto::Get {
            key: key.as_bytes().to_vec(),
        })),
    }
}

async fn value_of(
    node: &RaftNode<KvMachine>,
    key: &str,
    consistency: Consistency,
) -> Option<String> {
    let result = node.read_with(get(key), consistency).await.expect("read");
    result
        .items
        .first()
        .map(|item| String::from_utf8_lossy(&item.value).into_owned())
}

async fn local_keys(node: &RaftNode<KvMachine>) -> Vec<(String, u64)> {
    node.read_with(scan_all(), Consistency::Local)
        .await
        .expect("local scan")
        .items
        .into_iter()
        .map(|i| (String::from_utf8_lossy(&i.key).into_owned(), i.version))
        .collect()
}

async fn cluster(template: RaftConfig) -> (tempfile::TempDir, LocalCluster) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = LocalCluster::start(dir.path(), 3, template)
        .await
        .expect("start cluster");
    (dir, cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn elects_one_leader_and_replicates_to_every_node() {
    let (_dir, cluster) = cluster(fast_raft_config()).await;
    let leader = cluster.wait_for_leader(SETTLE).await.unwrap();
    let node = cluster.node(leader).unwrap();
    for i in 0..100 {
        let result = node.propose(put(&format!("k{i:03}"), "v")).await.unwrap();
        assert_eq!(result.version, 1);
        assert!(result.error.is_empty());
    }
    let applied = node.status().applied_index;
    cluster.wait_applied(applied, SETTLE).await.unwrap();
    for id in 1..=3 {
        let keys = local_keys(cluster.node(id).unwrap()).await;
        assert_eq!(keys.len(), 100, "node {id}");
        assert!(keys.iter().all(|(_, version)| *version == 1));
    }
    let leaders = (1..=3)
        .filter(|id| cluster.node(*id).unwrap().status().role == Role::Leader)
        .count();
    assert_eq!(leaders, 1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proposals_to_a_follower_reach_the_leader() {
    let (_dir, cluster) = cluster(fast_raft_config()).await;
    let leader = cluster.wait_for_leader(SETTLE).await.unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let node = cluster.node(follower).unwrap();
    assert_eq!(node.status().role, Role::Follower);
    let result = node.propose(put("via-follower", "yes")).await.unwrap();
    assert_eq!(result.version, 1);
    // The leader has it, and a linearizable read on the follower sees it.
    assert_eq!(
        value_of(
            cluster.node(leader).unwrap(),
            "via-follower",
            Consistency::Local
        )
        .await
        .as_deref(),
        Some("yes")
    );
    assert_eq!(
        value_of(node, "via-follower", Consistency::Linearizable)
            .await
            .as_deref(),
        Some("yes")
    );
    // Through the gRPC service of a follower too.
    let client = KvClient::new(vec![cluster.addr(follower).unwrap()], Default::default()).unwrap();
    assert_eq!(client.put(b"via-grpc", b"1").await.unwrap(), 1);
    assert_eq!(client.get(b"via-grpc").await.unwrap().unwrap().value, b"1");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linearizable_reads_see_writes_across_a_leader_change() {
    let (_dir, mut cluster) = cluster(fast_raft_config()).await;
    let first = cluster.wait_for_leader(SETTLE).await.unwrap();
    cluster
        .node(first)
        .unwrap()
        .propose(put("k", "old"))
        .await
        .unwrap();
    cluster.stop(first).await.unwrap();

    let second = cluster.wait_for_leader(SETTLE).await.unwrap();
    assert_ne!(first, second);
    cluster
        .node(second)
        .unwrap()
        .propose(put("k", "new"))
        .await
        .unwrap();
    let follower = (1..=3).find(|id| *id != first && *id != second).unwrap();
    assert_eq!(
        value_of(
            cluster.node(follower).unwrap(),
            "k",
            Consistency::Linearizable
        )
        .await
        .as_deref(),
        Some("new")
    );

    // The old leader comes back with the old value applied; a linearizable read through it
    // must still answer with the new one.
    cluster.restart(first).await.unwrap();
    assert_eq!(
        value_of(cluster.node(first).unwrap(), "k", Consistency::Linearizable)
            .await
            .as_deref(),
        Some("new")
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_that_missed_a_compaction_catches_up_by_snapshot() {
    let template = RaftConfig {
        snapshot_threshold: 50,
        log_retain_entries: 10,
        snapshot_chunk_size: ff_config::ByteSize::kib(4),
        ..fast_raft_config()
    };
    let (_dir, mut cluster) = cluster(template).await;
    let leader = cluster.wait_for_leader(SETTLE).await.unwrap();
    let lagging = (1..=3).find(|id| *id != leader).unwrap();
    cluster.stop(lagging).await.unwrap();

    let node = cluster.node(leader).unwrap().clone();
    for i in 0..300 {
        // Values big enough that the snapshot spans several chunks.
        let value = format!("{i:0>200}");
        node.propose(put(&format!("key{i:04}"), &value))
            .await
            .unwrap();
    }
    let status = node.status();
    assert!(
        status.first_index > 200,
        "leader log was not compacted: {status:?}"
    );

    cluster.restart(lagging).await.unwrap();
    cluster
        .wait_applied(status.applied_index, SETTLE)
        .await
        .unwrap();
    let caught_up = cluster.node(lagging).unwrap();
    let keys = local_keys(caught_up).await;
    assert_eq!(keys.len(), 300);
    assert!(
        caught_up.status().first_index > 200,
        "the follower should hold a snapshot, not the whole log: {:?}",
        caught_up.status()
    );
    // It keeps replicating normally afterwards.
    node.propose(put("after", "snapshot")).await.unwrap();
    cluster
        .wait_applied(node.status().applied_index, SETTLE)
        .await
        .unwrap();
    assert_eq!(
        value_of(caught_up, "after", Consistency::Local)
            .await
            .as_deref(),
        Some("snapshot")
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fourth_node_joins_and_the_leader_is_removed() {
    let template = RaftConfig {
        snapshot_threshold: 50,
        log_retain_entries: 10,
        ..fast_raft_config()
    };
    let (_dir, mut cluster) = cluster(template).await;
    let leader = cluster.wait_for_leader(SETTLE).await.unwrap();
    for i in 0..120 {
        cluster
            .node(leader)
            .unwrap()
            .propose(put(&format!("a{i}"), "x"))
            .await
            .unwrap();
    }

    let addr = cluster.start_joiner(4).await.unwrap();
    assert_eq!(cluster.node(4).unwrap().status().role, Role::Follower);
    // Ask a follower: membership changes are forwarded to the leader too.
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    cluster
        .node(follower)
        .unwrap()
        .add_member(4, &addr)
        .await
        .unwrap();
    let status = cluster.node(leader).unwrap().status();
    let voters: Vec<u64> = status
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.id)
        .collect();
    assert_eq!(voters, vec![1, 2, 3, 4]);
    cluster
        .wait_applied(status.applied_index, SETTLE)
        .await
        .unwrap();
    assert_eq!(local_keys(cluster.node(4).unwrap()).await.len(), 120);

    // Remove the leader itself: leadership moves first, then the new leader removes it.
    cluster
        .node(leader)
        .unwrap()
        .remove_member(leader)
        .await
        .unwrap();
    let removed = cluster.node(leader).unwrap();
    let deadline = tokio::time::Instant::now() + SETTLE;
    while removed.status().role != Role::Removed {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            removed.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.stop(leader).await.unwrap();
    let new_leader = cluster.wait_for_leader(SETTLE).await.unwrap();
    assert_ne!(new_leader, leader);
    let node = cluster.node(new_leader).unwrap();
    let voters: Vec<u64> = node
        .status()
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.id)
        .collect();
    assert_eq!(voters.len(), 3);
    assert!(!voters.contains(&leader));
    // The three remaining voters still commit.
    node.propose(put("after-removal", "ok")).await.unwrap();
    cluster
        .wait_applied(node.status().applied_index, SETTLE)
        .await
        .unwrap();
    assert_eq!(
        value_of(
            cluster.node(4).unwrap(),
            "after-removal",
            Consistency::Local
        )
        .await
        .as_deref(),
        Some("ok")
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_request_is_applied_once() {
    let (_dir, cluster) = cluster(fast_raft_config()).await;
    cluster.wait_for_leader(SETTLE).await.unwrap();
    let client = KvClient::new(cluster.endpoints(), Default::default()).unwrap();
    let id = client.next_id();
    let command = put("once", "v");
    let first = client.propose(id, &command).await.unwrap();
    let again = client.propose(id, &command).await.unwrap();
    assert_eq!(first.version, 1);
    assert_eq!(
        again, first,
        "the retry must get the first answer, not a new write"
    );
    assert_eq!(client.get(b"once").await.unwrap().unwrap().version, 1);
    // A new id is a new write.
    assert_eq!(client.put(b"once", b"v").await.unwrap(), 2);

    // Settled requests are forgotten: a client's sequential puts leave only a record or two,
    // however many it makes.
    for i in 0..100 {
        client
            .put(format!("seq{i}").as_bytes(), b"v")
            .await
            .unwrap();
    }
    let applied = cluster.node(1).unwrap().status().applied_index;
    cluster.wait_applied(applied, SETTLE).await.unwrap();
    for id in 1..=3 {
        use ff_raft::redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};
        let records: TableDefinition<'_, (u64, u64), (u64, &[u8])> =
            TableDefinition::new("raft_requests");
        let txn = cluster.node(id).unwrap().database().begin_read().unwrap();
        let count = txn.open_table(records).unwrap().len().unwrap();
        // The explicit-id request above is never settled; the last put's own record stays.
        assert!(count <= 3, "node {id} keeps {count} request records");
    }
    cluster.shutdown().await;
}
