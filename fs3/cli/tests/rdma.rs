//! fs3's data plane over RDMA verbs (run inside the Soft-RoCE guest by
//! `integration/rdma/qemu-test.sh`, with `--features rdma`): a 3-daemon chain, replication 3,
//! and a client whose transport is "rdma" only, so every chunk it writes and reads moves by RDMA
//! READ and WRITE; the daemons' CRAQ forwards negotiate RDMA too ("auto"), which their
//! `fs3_storage_peer_connections{transport="rdma"}` gauge shows. Contents and checksums are
//! verified on read, and every replica is compared byte for byte.

#![cfg(feature = "rdma")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{assert_replicas_identical, chains, cluster};
use fs3_client::{ChunkClient, RoutingCache};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_moves_chunks_over_rdma() {
    if !ff_harness::rdma_device_here() {
        return;
    }
    let (_dir, mut cluster) = cluster(1, 3).await;
    let net = Arc::new(
        ff_net::NetClient::new(ff_net::NetConfig {
            transport: ff_net::TransportKind::Rdma,
            ..ff_net::NetConfig::default()
        })
        .unwrap(),
    );
    let routing = Arc::new(RoutingCache::new(cluster.mgmtd_endpoints()).unwrap());
    let client = ChunkClient::new(routing, net.clone(), Duration::from_secs(60));
    let chain = chains(&cluster).await[0];

    // Sizes from one byte (inline in a message) to 4 MiB (pulled and pushed one-sided).
    let sizes = [1usize, 4096, 20_000, 300_000, 1 << 20, 4 << 20];
    common::write_and_read_back(&client, chain, 3, 24, &sizes).await;
    assert!(
        net.rdma_connections().await > 0,
        "the client's calls did not go over RDMA"
    );
    assert_replicas_identical(&client, &cluster, 3).await;
    // The daemons forwarded to each other over RDMA too (their gauge, refreshed each heartbeat).
    let endpoints: Vec<String> = cluster.metrics_endpoints().values().cloned().collect();
    ff_harness::wait_for(
        "storage-to-storage connections over RDMA",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || async {
            let mut forwarding = 0.0;
            for addr in &endpoints {
                let text = ff_metrics::http_get(addr, "/metrics")
                    .await
                    .map_err(|e| ff_harness::NotReady::Pending(e.to_string()))?;
                if text.contains("fs3_storage_peer_connections") {
                    forwarding += common::metric_value(
                        &text,
                        "fs3_storage_peer_connections{transport=\"rdma\"}",
                    );
                }
            }
            if forwarding > 0.0 {
                Ok(())
            } else {
                Err("the CRAQ forwards did not go over RDMA".to_string().into())
            }
        },
    )
    .await
    .unwrap();
    cluster.stop_all().await;
}
