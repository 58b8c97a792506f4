//! The namespace on real processes: a meta replica beside mgmtd and storage, the native client
//! creating, writing, reading, renaming and removing files; tokens; truncation cutting chunks;
//! unlinked files collected from storage after the delay.

// Tests may panic on anything unexpected; that is how they fail.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use fs3_client::{Fs3, Fs3Options, ROOT};
use fs3_proto::meta::{Credentials, InodeKind, SetAttrOp};
use fs3_proto::storage::ChunkId;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_through_the_native_client() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = common::spec(dir.path(), 1, 3);
    spec.meta_replicas = 1;
    let mut cluster = common::start(spec).await;
    let fs = cluster.fs_client().await.unwrap();
    let root = Credentials::default();

    // A client without a token is turned away with a clear message.
    let refused = Fs3::connect(Fs3Options {
        mgmtd: cluster.mgmtd_endpoints(),
        ..Fs3Options::default()
    })
    .await
    .unwrap_err();
    assert_eq!(refused.errno, libc::EACCES, "{refused}");
    assert!(refused.message.contains("token"), "{refused}");

    let data_dir = fs
        .create(&root, ROOT, b"data", InodeKind::Directory, 0o755, b"")
        .await
        .unwrap();
    // 3.5 chunks of 1 MiB, written unaligned in two calls, read back whole and in pieces.
    let content = pattern(3_500_000, 7);
    let (inode, session) = fs
        .create_file(&root, data_dir.id, b"blob", 0o644, true, false)
        .await
        .unwrap();
    fs.write_at(
        &inode,
        &session,
        0,
        Bytes::copy_from_slice(&content[..1_234_567]),
    )
    .await
    .unwrap();
    fs.write_at(
        &inode,
        &session,
        1_234_567,
        Bytes::copy_from_slice(&content[1_234_567..]),
    )
    .await
    .unwrap();
    let synced = fs.sync_session(&root, &session, false).await.unwrap();
    assert_eq!(synced.length, content.len() as u64);
    let stat = fs.resolve(&root, "/data/blob").await.unwrap();
    assert_eq!((stat.id, stat.length), (inode.id, content.len() as u64));
    let read = fs.read_at(&stat, stat.length, 0, 10 << 20).await.unwrap();
    assert!(read == content, "whole-file read differs");
    let piece = fs
        .read_at(&stat, stat.length, 1_048_000, 5000)
        .await
        .unwrap();
    assert_eq!(piece, content[1_048_000..1_053_000]);

    // A sparse write leaves a hole of zeros.
    let (sparse, session) = fs
        .create_file(&root, ROOT, b"sparse", 0o644, true, false)
        .await
        .unwrap();
    fs.write_at(&sparse, &session, 5 << 20, Bytes::from_static(b"tail"))
        .await
        .unwrap();
    let sparse = fs.sync_session(&root, &session, false).await.unwrap();
    let read = fs
        .read_at(&sparse, sparse.length, (5 << 20) - 4, 8)
        .await
        .unwrap();
    assert_eq!(read, b"\0\0\0\0tail");

    // Truncating cuts chunks on storage: growing again shows zeros, not old bytes.
    fs.setattr(
        &root,
        SetAttrOp {
            inode: inode.id,
            length: Some(1000),
            ..SetAttrOp::default()
        },
    )
    .await
    .unwrap();
    let grown = fs
        .setattr(
            &root,
            SetAttrOp {
                inode: inode.id,
                length: Some(3_000_000),
                ..SetAttrOp::default()
            },
        )
        .await
        .unwrap();
    let read = fs
        .read_at(&grown, grown.length, 0, 3_000_000)
        .await
        .unwrap();
    assert_eq!(read[..1000], content[..1000]);
    assert!(
        read[1000..].iter().all(|b| *b == 0),
        "truncated bytes came back"
    );

    // Rename and list.
    fs.rename(&root, data_dir.id, b"blob", ROOT, b"moved", false)
        .await
        .unwrap();
    let names: Vec<Vec<u8>> = fs
        .readdir_all(&root, ROOT)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(
        names,
        vec![b"data".to_vec(), b"moved".to_vec(), b"sparse".to_vec()]
    );
    let err = fs.remove(&root, ROOT, b"data", false).await.unwrap_err();
    assert_eq!(err.errno, libc::EISDIR);

    // An unlinked file's chunks are removed from storage after the delay.
    fs.remove(&root, ROOT, b"moved", false).await.unwrap();
    let chunks = cluster.chunk_client(Duration::from_secs(5)).unwrap();
    let layout = grown.layout.clone().unwrap();
    let first = ChunkId {
        inode: inode.id,
        index: 0,
    };
    ff_harness::wait_for(
        "the unlinked file's chunks removed",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            match chunks.read(layout.chains[0], first, 0, 10).await {
                Err(fs3_client::ClientError::NotFound(_)) => Ok(()),
                other => Err(format!(
                    "chunk 0 still readable: {:?}",
                    other.map(|d| d.chunk_length)
                )
                .into()),
            }
        },
    )
    .await
    .unwrap();
    let statfs = fs.statfs().await.unwrap();
    assert_eq!(statfs.files, 3, "root, data and sparse");
    assert!(
        statfs.capacity_bytes > 0 && statfs.free_bytes > 0,
        "{statfs:?}"
    );
    cluster.stop_all().await;
}

/// Three meta replicas: kill -9 the leader while a client creates files; the client follows the
/// new leader, nothing acknowledged is lost, and the old leader catches up when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_leader_killed_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = common::spec(dir.path(), 1, 3);
    spec.meta_replicas = 3;
    let mut cluster = common::start(spec).await;
    let fs = cluster.fs_client().await.unwrap();
    let root = Credentials::default();
    let leader = cluster
        .wait_for_meta_leader(None, Duration::from_secs(10))
        .await
        .unwrap();
    let mut acked = Vec::new();
    for i in 0..150u32 {
        if i == 50 {
            cluster.meta_process(leader).unwrap().kill().await.unwrap();
        }
        let name = format!("f{i}");
        let (inode, session) = fs
            .create_file(&root, ROOT, name.as_bytes(), 0o644, true, false)
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
        fs.write_at(&inode, &session, 0, Bytes::from(name.clone().into_bytes()))
            .await
            .unwrap();
        fs.sync_session(&root, &session, false).await.unwrap();
        acked.push(name);
    }
    let new_leader = cluster
        .wait_for_meta_leader(Some(leader), Duration::from_secs(10))
        .await
        .unwrap();
    assert_ne!(new_leader, leader);
    for name in &acked {
        let inode = fs.lookup(&root, ROOT, name.as_bytes()).await.unwrap();
        assert_eq!(inode.length, name.len() as u64, "{name}");
        let data = fs.read_at(&inode, inode.length, 0, 100).await.unwrap();
        assert_eq!(data, name.as_bytes());
    }
    // The old leader returns and follows; the group agrees on one leader again.
    cluster.meta_process(leader).unwrap().spawn().unwrap();
    cluster
        .wait_for_meta_leader(None, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(fs.readdir_all(&root, ROOT).await.unwrap().len(), 150);
    cluster.stop_all().await;
}

/// A live writer keeps its session however short meta's lease (clients pace their keep-alives
/// by the lease meta tells them); a writer that dies without fsync or close loses it once its
/// keep-alives stop for the lease, and meta ends its session with the length the chunks on
/// storage give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_writers_length_is_recovered_from_storage() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = common::spec(dir.path(), 1, 3);
    spec.meta_replicas = 1;
    // Shorter than the clients' own longest keep-alive interval (10 s).
    spec.session_lease = Duration::from_secs(2);
    let mut cluster = common::start(spec).await;
    let root = Credentials::default();
    let observer = cluster.fs_client().await.unwrap();

    // Alive but idle for three leases between its write and its fsync: the session holds.
    let (inode, session) = observer
        .create_file(&root, ROOT, b"idle", 0o644, true, false)
        .await
        .unwrap();
    observer
        .write_at(&inode, &session, 0, Bytes::from_static(b"still mine"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let synced = observer.sync_session(&root, &session, false).await.unwrap();
    assert_eq!(synced.length, 10);
    assert_eq!(synced.sessions, 0);
    let content = pattern(2_500_000, 3);
    {
        let writer = cluster.fs_client().await.unwrap();
        let (inode, session) = writer
            .create_file(&root, ROOT, b"unsynced", 0o644, true, false)
            .await
            .unwrap();
        writer
            .write_at(&inode, &session, 0, Bytes::copy_from_slice(&content))
            .await
            .unwrap();
        // Dropped here without fsync or close: its keep-alives stop.
    }
    assert_eq!(
        observer.resolve(&root, "/unsynced").await.unwrap().length,
        0
    );
    let recovered = ff_harness::wait_for(
        "the dead writer's length recovered",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let inode = observer
                .resolve(&root, "/unsynced")
                .await
                .map_err(|e| ff_harness::NotReady::Pending(e.to_string()))?;
            if inode.length == content.len() as u64 && inode.sessions == 0 {
                Ok(inode)
            } else {
                Err(format!("length {}, sessions {}", inode.length, inode.sessions).into())
            }
        },
    )
    .await
    .unwrap();
    let data = observer
        .read_at(&recovered, recovered.length, 0, 3_000_000)
        .await
        .unwrap();
    assert!(data == content, "recovered content differs");
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_listening_on_the_wildcard_are_dialled_by_host_name() {
    // As in Kubernetes: every daemon binds 0.0.0.0 and is reached by a name to resolve
    // (`localhost` here, which may resolve to ::1 first), raft peers and storage included.
    let dir = tempfile::tempdir().unwrap();
    let mut spec = common::spec(dir.path(), 3, 3);
    spec.meta_replicas = 1;
    spec.dial_by_name = true;
    let mut cluster = common::start(spec).await;
    let routing = cluster.routing().await.unwrap();
    // What the storage daemons advertise, not what they bind.
    assert!(
        routing.nodes.len() >= 3
            && routing
                .nodes
                .iter()
                .all(|n| n.addr.starts_with("localhost:")),
        "{:?}",
        routing.nodes
    );

    let fs = cluster.fs_client().await.unwrap();
    let root = Credentials::default();
    let content = pattern(2_500_000, 3);
    let (inode, session) = fs
        .create_file(&root, ROOT, b"named", 0o644, true, false)
        .await
        .unwrap();
    fs.write_at(&inode, &session, 0, Bytes::copy_from_slice(&content))
        .await
        .unwrap();
    let inode = fs.sync_session(&root, &session, false).await.unwrap();
    let read = fs.read_at(&inode, inode.length, 0, 4 << 20).await.unwrap();
    assert!(read == content, "read differs from what was written");
    cluster.stop_all().await;
}
