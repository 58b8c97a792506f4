//! ff-net's verbs layer on a real RDMA device: run inside the Soft-RoCE guest by
//! `integration/rdma/qemu-test.sh` (both ends in one guest, over `rxe0`). Links carry SEND
//! messages and one-sided RDMA READ and WRITE with the bytes checked, and a peer process killed
//! mid-transfer gives an error, not a hang. On a host without a device, the error says so.

#![cfg(feature = "rdma")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use ff_net::rdma::{
    Device, Link, ProtectionDomain, RdmaError, RegisteredMemory, RegisteredPool, RemoteBuf,
};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1 << 20;

/// Whether this machine has an RDMA device (the guest has `rxe0`).
fn has_device() -> bool {
    std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some())
}

/// Whether the device tests can run; outside CI, a host without a device skips them.
fn device_here() -> bool {
    let here = has_device();
    if !here {
        assert!(
            std::env::var("CI").is_err(),
            "run through integration/rdma/qemu-test.sh"
        );
        eprintln!("skipping: no RDMA device (run integration/rdma/qemu-test.sh)");
    }
    here
}

/// A message naming `len` bytes of `offered`, after `tag`, in a registered buffer: (buffer,
/// message length).
fn offer(
    pd: &Arc<ProtectionDomain>,
    tag: &[u8],
    offered: &RegisteredMemory,
    len: usize,
) -> (RegisteredMemory, usize) {
    let mut message = RegisteredMemory::new(pd, 4096).unwrap();
    let mut bytes = tag.to_vec();
    RemoteBuf::of(offered, len).encode(&mut bytes);
    message.as_mut_slice()[..bytes.len()].copy_from_slice(&bytes);
    (message, bytes.len())
}

fn domain() -> Arc<ProtectionDomain> {
    let device = Device::open("").unwrap();
    ProtectionDomain::new(&device).unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Both ends of a link in this process: (accepting side, connecting side).
async fn link_pair(pd: &Arc<ProtectionDomain>) -> (Link, Link) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepting = {
        let pd = pd.clone();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            Link::establish(stream, &pd, 16, 16, 4096).await.unwrap()
        })
    };
    let stream = TcpStream::connect(addr).await.unwrap();
    let connecting = Link::establish(stream, pd, 16, 16, 4096).await.unwrap();
    (accepting.await.unwrap(), connecting)
}

#[test]
fn without_a_device_the_error_says_so() {
    let wanted = if has_device() { "no-such-device0" } else { "" };
    let error = Device::open(wanted).unwrap_err();
    assert!(matches!(error, RdmaError::NoDevice(_)), "{error}");
    if has_device() {
        // A wrong name lists the devices there are.
        assert!(error.to_string().contains("found:"), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_carry_messages_reads_and_writes() {
    if !device_here() {
        return;
    }
    let pd = domain();
    let (server, client) = link_pair(&pd).await;

    // The client offers 1 MiB of its memory: a SEND names it.
    let mut offered = RegisteredMemory::new(&pd, MIB).unwrap();
    offered.as_mut_slice().copy_from_slice(&pattern(MIB, 1));
    let (message, sent) = offer(&pd, b"take", &offered, MIB);
    let message = client.send(message, sent).await.unwrap();

    let (received, len) = server.recv().await.unwrap();
    assert_eq!(len, sent);
    assert_eq!(&received.as_slice()[..4], b"take");
    let remote = RemoteBuf::decode(&received.as_slice()[4..len]).unwrap();
    server.repost(received).unwrap();

    // The server pulls it (RDMA READ), then pushes other bytes into it (RDMA WRITE).
    let pulled = server
        .read(RegisteredMemory::new(&pd, MIB).unwrap(), MIB, remote)
        .await
        .unwrap();
    assert!(
        pulled.as_slice() == pattern(MIB, 1),
        "RDMA READ brought other bytes"
    );
    let mut pushed = RegisteredMemory::new(&pd, MIB).unwrap();
    pushed.as_mut_slice().copy_from_slice(&pattern(MIB, 7));
    server.write(pushed, MIB, remote).await.unwrap();
    // A write beyond what was offered is refused before it reaches the wire.
    let too_long = server.write(
        RegisteredMemory::new(&pd, 2 * MIB).unwrap(),
        2 * MIB,
        remote,
    );
    assert!(too_long.await.is_err());

    // The SEND after the WRITE arrives after it (RC order): then the bytes are there.
    let mut done = RegisteredMemory::new(&pd, 4096).unwrap();
    done.as_mut_slice()[..4].copy_from_slice(b"done");
    server.send(done, 4).await.unwrap();
    let (received, len) = client.recv().await.unwrap();
    assert_eq!(&received.as_slice()[..len], b"done");
    assert!(
        offered.as_slice() == pattern(MIB, 7),
        "RDMA WRITE left other bytes"
    );

    // Many messages in a row, each answered, reuse the posted receives.
    let mut message = message;
    for round in 0..100u32 {
        message.as_mut_slice()[..4].copy_from_slice(&round.to_be_bytes());
        message = client.send(message, 4).await.unwrap();
        let (received, len) = server.recv().await.unwrap();
        assert_eq!(received.as_slice()[..len], round.to_be_bytes());
        server.repost(received).unwrap();
    }
}

/// The peer of `a_peer_killed_mid_transfer_gives_an_error_not_a_hang`, in its own process:
/// connects, offers a buffer, then waits to be killed.
#[tokio::test]
#[ignore = "run by a_peer_killed_mid_transfer_gives_an_error_not_a_hang as its peer process"]
async fn peer_process() {
    let addr = std::env::var("FF_RDMA_PEER_OF").unwrap();
    let pd = domain();
    let link = Link::establish(TcpStream::connect(addr).await.unwrap(), &pd, 16, 16, 4096)
        .await
        .unwrap();
    let offered = RegisteredMemory::new(&pd, 4 * MIB).unwrap();
    let (message, sent) = offer(&pd, b"", &offered, 4 * MIB);
    link.send(message, sent).await.unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
    drop(offered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_killed_mid_transfer_gives_an_error_not_a_hang() {
    if !device_here() {
        return;
    }
    let pd = domain();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut peer = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "peer_process"])
        .env(
            "FF_RDMA_PEER_OF",
            listener.local_addr().unwrap().to_string(),
        )
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (stream, _) = tokio::time::timeout(Duration::from_secs(60), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let link = Link::establish(stream, &pd, 16, 16, 4096).await.unwrap();
    let (received, len) = link.recv().await.unwrap();
    let remote = RemoteBuf::decode(&received.as_slice()[..len]).unwrap();

    // Write into the peer's memory; kill it after a few writes; keep writing.
    let mut memory = RegisteredMemory::new(&pd, 4 * MIB).unwrap();
    memory.as_mut_slice().copy_from_slice(&pattern(4 * MIB, 3));
    let mut ok = 0;
    let outcome = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match link.write(memory, 4 * MIB, remote).await {
                Ok(back) => {
                    memory = back;
                    ok += 1;
                    if ok == 3 {
                        peer.start_kill().unwrap();
                    }
                }
                Err(error) => return error,
            }
        }
    })
    .await;
    let error = outcome.expect("writes to a killed peer hung instead of failing");
    assert!(ok >= 3, "failed before the kill: {error}");
    assert!(link.is_broken());
    assert!(link.recv().await.is_err(), "a broken link still receives");
    eprintln!("after {ok} writes and the kill: {error}");
    let _ = peer.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_reuses_registrations_within_its_limit() {
    if !device_here() {
        return;
    }
    let pool = RegisteredPool::new(&domain(), 2 * MIB);
    let first = pool.take(MIB).await.unwrap();
    let second = pool.take(MIB - 100).await.unwrap();
    assert_eq!(pool.registered(), 2 * MIB);
    assert!(
        pool.take(3 * MIB).await.is_err(),
        "more than the limit at once"
    );
    // A third waits until one comes back, and then gets that registration.
    let address = first.addr();
    let waiting = tokio::time::timeout(Duration::from_millis(300), pool.take(MIB)).await;
    assert!(waiting.is_err(), "the pool went over its limit");
    pool.give(first);
    let third = pool.take(MIB).await.unwrap();
    assert_eq!(third.addr(), address, "not reused");
    // An idle buffer of another size is released to make room.
    pool.give(second);
    let small = pool.take(4096).await.unwrap();
    assert!(pool.registered() <= 2 * MIB);
    assert_eq!(small.len(), 4096);
    drop(third);
}
