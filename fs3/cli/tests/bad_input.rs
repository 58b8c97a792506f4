//! Bad input to a running fs3 data plane (1 mgmtd, 3 storage daemons on real processes):
//! stale chain versions, unknown chunks and targets, out-of-range offsets, malformed frames and
//! headers, writes to the wrong replica, and a disk that fills up. Each gets a clear error,
//! nothing stored is damaged, and every daemon keeps running.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{assert_replicas_identical, chains, chunk, cluster, content, spec, start};
use ff_harness::Tmpfs;
use ff_harness::fs3::Fs3Cluster;
use ff_net::{Call, NetClient, NetConfig, NetError, Transport};
use fs3_client::{ChunkUpdate, ClientError};
use fs3_proto::storage::{ReadRequest, UpdateKind, WriteRequest, fault, method};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The chain's targets head first, with their data addresses.
async fn chain_targets(cluster: &Fs3Cluster) -> (u64, u64, Vec<(u64, String)>) {
    let routing = cluster.routing().await.unwrap();
    let chain = &routing.chains[0];
    let addr = |target: u64| {
        let node = routing
            .targets
            .iter()
            .find(|t| t.id == target)
            .unwrap()
            .node_id;
        routing
            .nodes
            .iter()
            .find(|n| n.id == node)
            .unwrap()
            .addr
            .clone()
    };
    let targets = chain
        .targets
        .iter()
        .map(|t| (t.target_id, addr(t.target_id)))
        .collect();
    (chain.id, chain.version, targets)
}

fn write_call(header: WriteRequest, payload: Bytes) -> Call {
    Call {
        method: method::WRITE,
        header: header.encode_to_vec().into(),
        payload,
    }
}

fn remote_code(result: Result<ff_net::Response, NetError>) -> (u16, String) {
    match result {
        Err(NetError::Remote { code, message }) => (code, message),
        other => panic!("expected a fault, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let (dir, mut cluster) = cluster(1, 3).await;
    let client = cluster.chunk_client(Duration::from_secs(10)).unwrap();
    let chain = chains(&cluster).await[0];
    let original = content(4, 0, 1, 50_000);
    client
        .write(chain, chunk(4, 0), ChunkUpdate::replace(original.clone()))
        .await
        .unwrap();
    let (chain_id, version, targets) = chain_targets(&cluster).await;
    let (head, head_addr) = targets[0].clone();
    let (middle, middle_addr) = targets[1].clone();
    let net = NetClient::new(NetConfig::default()).unwrap();
    let garbage = Bytes::from(vec![0x5A; 50_000]);
    let header = |target: u64, chain_version: u64| WriteRequest {
        chain_id,
        chain_version,
        target_id: target,
        chunk: Some(chunk(4, 0)),
        kind: UpdateKind::Replace as i32,
        offset: 0,
        length: garbage.len() as u32,
        write_id: 99,
        version: 0,
        sync: false,
    };

    // Stale (and future) chain versions: rejected, naming the current version.
    for stale in [version.saturating_sub(1), version + 5] {
        let (code, message) = remote_code(
            net.call(&head_addr, write_call(header(head, stale), garbage.clone()))
                .await,
        );
        assert_eq!(code, fault::STALE_CHAIN, "{message}");
        assert!(message.contains(&format!("version {version}")), "{message}");
    }
    let read = ReadRequest {
        chain_id,
        chain_version: version + 5,
        target_id: head,
        chunk: Some(chunk(4, 0)),
        offset: 0,
        length: 10,
    };
    let (code, _) = remote_code(
        net.call(
            &head_addr,
            Call {
                method: method::READ,
                header: read.encode_to_vec().into(),
                payload: Bytes::new(),
            },
        )
        .await,
    );
    assert_eq!(code, fault::STALE_CHAIN);

    // A client write sent to a replica that is not the head: refused, naming the head.
    let (code, message) = remote_code(
        net.call(
            &middle_addr,
            write_call(header(middle, version), garbage.clone()),
        )
        .await,
    );
    assert_eq!(code, fault::NOT_SERVING, "{message}");
    assert!(message.contains(&format!("target {head} is")), "{message}");

    // A target the daemon does not have.
    let (code, message) = remote_code(
        net.call(
            &head_addr,
            write_call(header(999_999, version), garbage.clone()),
        )
        .await,
    );
    assert_eq!(code, fault::UNKNOWN_TARGET, "{message}");

    // A header that is not a write request, and an unknown method.
    let (code, message) = remote_code(
        net.call(
            &head_addr,
            Call {
                method: method::WRITE,
                header: Bytes::from_static(&[0xFF; 40]),
                payload: Bytes::new(),
            },
        )
        .await,
    );
    assert_eq!(code, fault::BAD_REQUEST, "{message}");
    let (code, message) = remote_code(
        net.call(
            &head_addr,
            Call {
                method: 4242,
                header: Bytes::new(),
                payload: Bytes::new(),
            },
        )
        .await,
    );
    assert_eq!(code, fault::BAD_REQUEST, "{message}");
    assert!(message.contains("unknown method"), "{message}");

    // Bytes that are not frames at all, and a frame announcing a payload beyond the limit:
    // the connection is dropped.
    for junk in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        [b"FFN1".as_slice(), &[0xFF; 20]].concat(),
    ] {
        let mut stream = tokio::net::TcpStream::connect(&head_addr).await.unwrap();
        stream.write_all(&junk).await.unwrap();
        let mut sink = Vec::new();
        // Closed cleanly or by a reset, both are a dropped connection; only a hang fails.
        let _closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink))
            .await
            .expect("the daemon must drop a connection speaking nonsense");
    }

    // Through the client: unknown chunk, offsets no chunk can reach.
    match client.read(chain, chunk(4, 12345), 0, 10).await {
        Err(ClientError::NotFound(message)) => eprintln!("unknown chunk: {message}"),
        other => panic!("unknown chunk read: {other:?}"),
    }
    match client.read(chain, chunk(4, 0), u32::MAX - 10, 10).await {
        Err(ClientError::BadRequest(message)) => eprintln!("read out of range: {message}"),
        other => panic!("out-of-range read: {other:?}"),
    }
    match client
        .write(
            chain,
            chunk(4, 0),
            ChunkUpdate::write(u32::MAX - 10, Bytes::from_static(b"0123456789ab")),
        )
        .await
    {
        Err(ClientError::BadRequest(message)) => eprintln!("write out of range: {message}"),
        other => panic!("out-of-range write: {other:?}"),
    }
    match client
        .write(chain + 1000, chunk(4, 0), ChunkUpdate::truncate(1))
        .await
    {
        Err(ClientError::BadRequest(message)) => eprintln!("unknown chain: {message}"),
        other => panic!("unknown chain write: {other:?}"),
    }
    // A read past the end of a chunk is short, not an error.
    let tail = client.read(chain, chunk(4, 0), 49_990, 100).await.unwrap();
    assert_eq!(tail.data.len(), 10);
    assert_eq!(tail.chunk_length, 50_000);

    // Nothing changed: the chunk is as written, on every replica; every daemon still runs.
    let read = client.read(chain, chunk(4, 0), 0, 1 << 20).await.unwrap();
    assert!(read.data == original);
    assert_eq!(read.version, 1);
    assert_replicas_identical(&client, &cluster, 3).await;
    for node in 1..=3 {
        assert!(
            cluster.storage(node).unwrap().check_running().is_ok(),
            "storage-{node} died"
        );
    }
    cluster.stop_all().await;
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_is_a_clear_error_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = match Tmpfs::mount(&dir.path().join("disk"), 128) {
        Ok(disk) => disk,
        Err(error) => {
            assert!(std::env::var("CI").is_err(), "CI must run this: {error}");
            eprintln!("skipping: {error}");
            return;
        }
    };
    let mut spec = spec(&dir.path().join("cluster"), 1, 3);
    spec.target_root = Some(disk.path().to_path_buf());
    spec.engine.reserved_space = ff_config::ByteSize::mib(4);
    let mut cluster = start(spec).await;
    let client = cluster.chunk_client(Duration::from_secs(10)).unwrap();
    let chain = chains(&cluster).await[0];

    // Three targets share the 128 MiB disk: fill it with 1 MiB chunks.
    let mut written = Vec::new();
    let mut error = None;
    for index in 0..200u32 {
        let data = content(6, index, 1, 1 << 20);
        match client
            .write(chain, chunk(6, index), ChunkUpdate::replace(data))
            .await
        {
            Ok(_) => written.push(index),
            Err(e) => {
                error = Some((index, e));
                break;
            }
        }
    }
    let (failed, error) = error.expect("128 MiB cannot hold 3 x 200 MiB");
    assert!(matches!(error, ClientError::NoSpace(_)), "{error}");
    eprintln!("{} chunks written, then: {error}", written.len());
    assert!(written.len() >= 10, "only {} chunks fit", written.len());

    // Everything acknowledged reads back; the daemons keep running.
    for index in &written {
        let read = client
            .read(chain, chunk(6, *index), 0, 1 << 20)
            .await
            .unwrap();
        assert!(read.data == content(6, *index, 1, 1 << 20), "chunk {index}");
    }
    for node in 1..=3 {
        assert!(cluster.storage(node).unwrap().check_running().is_ok());
    }

    // Freeing space makes writes succeed again, including the one that failed.
    for index in written.drain(..8) {
        client
            .write(chain, chunk(6, index), ChunkUpdate::remove())
            .await
            .unwrap();
    }
    client
        .write(
            chain,
            chunk(6, failed),
            ChunkUpdate::replace(content(6, failed, 2, 1 << 20)),
        )
        .await
        .unwrap();
    let read = client
        .read(chain, chunk(6, failed), 0, 1 << 20)
        .await
        .unwrap();
    assert!(read.data == content(6, failed, 2, 1 << 20));
    assert_replicas_identical(&client, &cluster, 3).await;
    cluster.stop_all().await;
    drop(disk);
}
