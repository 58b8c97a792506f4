//! ff-net's throughput and latency between a client and a server in this process, over the
//! transport asked for (`--transport tcp|rdma|auto`, default auto):
//!
//! - write: calls carrying a payload of `--size` bytes (the server pulls it), `--depth` at once;
//! - read: calls whose reply carries `--size` bytes (the server pushes it), `--depth` at once;
//! - latency: one 8-byte call at a time, median and 99th percentile round trip.
//!
//! `integration/rdma/bench.sh` runs it in the Soft-RoCE guest beside perftest.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ff_net::{
    Call, Fault, Handler, NetClient, NetConfig, Reply, Request, Server, Transport, TransportKind,
};

const SINK: u16 = 1;
const SOURCE: u16 = 2;

/// Takes payloads; hands out `size`-byte replies on request.
struct Bench {
    reply: Bytes,
}

impl Handler for Bench {
    async fn handle(&self, request: Request) -> Result<Reply, Fault> {
        match request.method {
            SINK => Ok(Reply::default()),
            SOURCE => Ok(Reply {
                header: Bytes::new(),
                payload: self.reply.clone(),
            }),
            other => Err(Fault {
                code: 1,
                message: format!("unknown method {other}"),
            }),
        }
    }
}

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// Bytes per second moved by `depth` concurrent streams of `method` calls for `duration`.
async fn throughput(
    client: &Arc<NetClient>,
    addr: &str,
    method: u16,
    payload: Bytes,
    size: usize,
    depth: usize,
    duration: Duration,
) -> f64 {
    let start = Instant::now();
    let streams = (0..depth).map(|_| {
        let client = client.clone();
        let addr = addr.to_string();
        let payload = payload.clone();
        tokio::spawn(async move {
            let mut calls = 0u64;
            while start.elapsed() < duration {
                let call = Call {
                    method,
                    header: Bytes::new(),
                    payload: payload.clone(),
                };
                client.call(&addr, call).await.unwrap();
                calls += 1;
            }
            calls
        })
    });
    let mut calls = 0;
    for stream in streams {
        calls += stream.await.unwrap();
    }
    (calls * size as u64) as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let transport = match arg("--transport", "auto").as_str() {
        "tcp" => TransportKind::Tcp,
        "rdma" => TransportKind::Rdma,
        _ => TransportKind::Auto,
    };
    let size: usize = arg("--size", "1048576").parse().unwrap();
    let depth: usize = arg("--depth", "8").parse().unwrap();
    let seconds: f64 = arg("--seconds", "3").parse().unwrap();
    let duration = Duration::from_secs_f64(seconds);
    let config = NetConfig {
        transport,
        ..NetConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bench = Arc::new(Bench {
        reply: Bytes::from(vec![7u8; size]),
    });
    let server = Server::start(listener, bench, &config).unwrap();
    let addr = server.local_addr().to_string();
    let client = Arc::new(NetClient::new(config).unwrap());
    // Connect (and, over RDMA, register the staging buffers) before measuring.
    let payload = Bytes::from(vec![3u8; size]);
    throughput(
        &client,
        &addr,
        SINK,
        payload.clone(),
        size,
        depth,
        Duration::from_millis(300),
    )
    .await;
    let rdma = client.rdma_connections().await > 0;

    let write = throughput(&client, &addr, SINK, payload, size, depth, duration).await;
    let read = throughput(&client, &addr, SOURCE, Bytes::new(), size, depth, duration).await;
    let mut rtts = Vec::new();
    let ping = Bytes::from_static(&[1; 8]);
    let start = Instant::now();
    while start.elapsed() < duration && rtts.len() < 100_000 {
        let call = Call {
            method: SINK,
            header: Bytes::new(),
            payload: ping.clone(),
        };
        let sent = Instant::now();
        client.call(&addr, call).await.unwrap();
        rtts.push(sent.elapsed().as_secs_f64() * 1e6);
    }
    rtts.sort_by(f64::total_cmp);
    let percentile = |p: f64| rtts[((rtts.len() - 1) as f64 * p) as usize];
    println!(
        "ff-net over {}: write {:.1} MB/s, read {:.1} MB/s ({} B calls, {depth} in flight); \
         8 B round trip p50 {:.1} us, p99 {:.1} us ({} calls)",
        if rdma { "RDMA" } else { "TCP" },
        write / 1e6,
        read / 1e6,
        size,
        percentile(0.5),
        percentile(0.99),
        rtts.len()
    );
}
