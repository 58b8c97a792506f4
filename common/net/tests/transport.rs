//! ff-net over real loopback sockets: many concurrent calls, large payloads, errors, timeouts,
//! dead peers, garbage on the wire, and the per-connection bound on calls in flight.
//!
//! One suite, two transports: with `transport = "auto"` (the default) connections use RDMA where
//! the host has a device. `integration/rdma/qemu-test.sh` runs this binary in the Soft-RoCE
//! guest with `FF_NET_EXPECT_RDMA=1`, which also asserts that the calls went over RDMA.

// Tests may panic on anything unexpected; that is how they fail.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ff_config::ByteSize;
use ff_net::{
    Call, Fault, Handler, NetClient, NetConfig, NetError, Reply, Request, Server, Transport,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const ECHO: u16 = 1;
const FAIL: u16 = 2;
const SLOW: u16 = 3;

#[derive(Default)]
struct Echo {
    running: AtomicUsize,
    most: AtomicUsize,
}

impl Handler for Echo {
    async fn handle(&self, request: Request) -> Result<Reply, Fault> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        let result = match request.method {
            ECHO => Ok(Reply {
                header: Bytes::copy_from_slice(&request.header),
                payload: Bytes::copy_from_slice(&request.payload),
            }),
            FAIL => Err(Fault {
                code: 42,
                message: "refused on purpose".to_string(),
            }),
            SLOW => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(Reply::default())
            }
            other => Err(Fault {
                code: 1,
                message: format!("unknown method {other}"),
            }),
        };
        self.running.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

/// The configuration every test starts from (the default, transport "auto").
fn base() -> NetConfig {
    NetConfig::default()
}

/// Whether this run must prove its calls went over RDMA (in the Soft-RoCE guest).
fn expect_rdma() -> bool {
    std::env::var_os("FF_NET_EXPECT_RDMA").is_some()
}

async fn serve(config: &NetConfig) -> (Server, Arc<Echo>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo = Arc::new(Echo::default());
    (Server::start(listener, echo.clone(), config).unwrap(), echo)
}

fn call(method: u16, header: &[u8], payload: Vec<u8>) -> Call {
    Call {
        method,
        header: Bytes::copy_from_slice(header),
        payload: Bytes::from(payload),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_calls_and_large_payloads_come_back_intact() {
    let config = base();
    let (server, _) = serve(&config).await;
    let addr = server.local_addr().to_string();
    let client = Arc::new(NetClient::new(config).unwrap());
    let calls = (0..500u32).map(|i| {
        let client = client.clone();
        let addr = addr.clone();
        async move {
            let payload: Vec<u8> = (0..(i as usize * 37 % 70_000))
                .map(|b| (b as u32 ^ i) as u8)
                .collect();
            let reply = client
                .call(&addr, call(ECHO, &i.to_le_bytes(), payload.clone()))
                .await
                .unwrap();
            assert_eq!(&reply.header[..], &i.to_le_bytes());
            assert_eq!(&reply.payload[..], &payload[..]);
        }
    });
    futures::future::join_all(calls).await;
    let big: Vec<u8> = (0..32 << 20).map(|i: usize| (i % 251) as u8).collect();
    let reply = client
        .call(&addr, call(ECHO, b"big", big.clone()))
        .await
        .unwrap();
    assert!(reply.payload[..] == big[..]);
    if expect_rdma() {
        assert!(server.has_rdma() && client.rdma_connections().await > 0);
    }
}

#[tokio::test]
async fn service_errors_and_dead_peers_are_told_apart() {
    let config = NetConfig {
        connect_timeout: ff_config::Duration::millis(300),
        ..base()
    };
    let (server, _) = serve(&config).await;
    let addr = server.local_addr().to_string();
    let client = NetClient::new(config).unwrap();
    match client.call(&addr, call(FAIL, b"", vec![])).await {
        Err(NetError::Remote { code: 42, message }) => assert_eq!(message, "refused on purpose"),
        other => panic!("expected a remote error, got {other:?}"),
    }
    // The connection is still good after an error reply.
    client.call(&addr, call(ECHO, b"x", vec![1])).await.unwrap();

    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let error = client
        .call(&dead, call(ECHO, b"", vec![]))
        .await
        .unwrap_err();
    assert!(error.never_ran(), "{error:?}");
}

#[tokio::test]
async fn a_slow_call_times_out_and_the_connection_stays_usable() {
    let config = NetConfig {
        request_timeout: ff_config::Duration::millis(100),
        connections_per_peer: 1,
        ..base()
    };
    let (server, _) = serve(&config).await;
    let addr = server.local_addr().to_string();
    let client = NetClient::new(config).unwrap();
    let error = client
        .call(&addr, call(SLOW, b"", vec![]))
        .await
        .unwrap_err();
    assert!(matches!(error, NetError::Timeout { .. }), "{error:?}");
    client.call(&addr, call(ECHO, b"ok", vec![])).await.unwrap();
    // The late reply of the slow call arrives and is dropped without harm.
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.call(&addr, call(ECHO, b"ok", vec![])).await.unwrap();
}

#[tokio::test]
async fn a_server_going_away_fails_calls_in_flight() {
    let config = base();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // A "server" that answers the hello (TCP), reads a little and hangs up.
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut hello = [0u8; 8];
        tokio::io::AsyncReadExt::read_exact(&mut stream, &mut hello)
            .await
            .unwrap();
        hello[4] = 0;
        stream.write_all(&hello).await.unwrap();
        let mut buf = [0u8; 10];
        let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
        drop(stream);
    });
    let client = NetClient::new(config).unwrap();
    let error = client
        .call(&addr, call(ECHO, b"", vec![0; 1000]))
        .await
        .unwrap_err();
    assert!(matches!(error, NetError::Disconnected(_)), "{error:?}");
}

#[tokio::test]
async fn garbage_and_oversized_frames_close_only_that_connection() {
    let config = NetConfig {
        max_payload: ByteSize::kib(64),
        ..base()
    };
    let (server, _) = serve(&config).await;
    let addr = server.local_addr().to_string();
    let mut garbage = tokio::net::TcpStream::connect(&addr).await.unwrap();
    garbage.write_all(&[0xde; 100]).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut garbage, &mut rest),
    )
    .await
    .unwrap();
    // Closed, with a reset when the garbage was left unread: either way nothing comes back.
    let closed = match read {
        Ok(_) => true,
        Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(
        closed && rest.is_empty(),
        "the server should just close the connection"
    );

    let client = NetClient::new(config).unwrap();
    let error = client
        .call(&addr, call(ECHO, b"", vec![0; 100 * 1024]))
        .await
        .unwrap_err();
    assert!(matches!(error, NetError::Disconnected(_)), "{error:?}");
    // Others are served as before.
    client
        .call(&addr, call(ECHO, b"fine", vec![1; 1000]))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_in_flight_per_connection_are_bounded() {
    let config = NetConfig {
        max_in_flight_per_connection: 4,
        connections_per_peer: 1,
        ..base()
    };
    let (server, echo) = serve(&config).await;
    let addr = server.local_addr().to_string();
    let client = Arc::new(NetClient::new(config).unwrap());
    let calls = (0..20).map(|_| {
        let client = client.clone();
        let addr = addr.clone();
        async move { client.call(&addr, call(SLOW, b"", vec![])).await.unwrap() }
    });
    futures::future::join_all(calls).await;
    assert_eq!(echo.most.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn rdma_only_without_rdma_is_refused_at_start_naming_tcp() {
    let rdma_only = NetConfig {
        transport: ff_net::TransportKind::Rdma,
        ..base()
    };
    let client = NetClient::new(rdma_only.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::start(listener, Arc::new(Echo::default()), &rdma_only);
    if expect_rdma() {
        // In the guest both start, and talk over RDMA.
        let (client, server) = (client.unwrap(), server.unwrap());
        let addr = server.local_addr().to_string();
        client
            .call(&addr, call(ECHO, b"x", vec![1; 10]))
            .await
            .unwrap();
        assert_eq!(client.rdma_connections().await, 1);
        return;
    }
    // One line, saying why and what to set instead.
    let error = client.err().unwrap().to_string();
    assert!(error.contains("transport = \"tcp\""), "{error}");
    assert!(!error.contains('\n'), "{error}");
    let error = server.err().unwrap().to_string();
    assert!(error.contains("transport = \"tcp\""), "{error}");
}
