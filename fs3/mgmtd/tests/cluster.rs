//! Three mgmtd replicas in one process over loopback gRPC, with simulated storage services
//! heartbeating: registration, bootstrap, failure detection within the lease, recovery
//! through waiting and syncing back to serving, admin offline, and a leader change that loses
//! nothing.

// Tests may panic on anything unexpected; that is how they fail.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ff_raft::{MemberConfig, RaftConfig};
use ff_rpc::{ClientOptions, LeaderClient};
use fs3_mgmtd::{Mgmtd, MgmtdConfig};
use fs3_proto::mgmtd::mgmtd_client::MgmtdClient;
use fs3_proto::mgmtd::{
    BootstrapRequest, GetRoutingRequest, HeartbeatRequest, LocalState, NodeKind, PublicState,
    RoutingInfo, SetTargetOfflineRequest, TargetReport,
};
use tokio::time::Instant;

const LEASE: Duration = Duration::from_millis(1500);

async fn start_replicas(dir: &std::path::Path) -> (Vec<Option<Mgmtd>>, Vec<MgmtdConfig>) {
    let listeners: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    drop(listeners);
    let members: Vec<MemberConfig> = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| MemberConfig {
            id: i as u64 + 1,
            addr: addr.clone(),
        })
        .collect();
    let cluster = format!("mgmtd-test-{:x}", rand_u32());
    let mut configs = Vec::new();
    let mut replicas = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let config = MgmtdConfig {
            listen_addr: addr.clone(),
            metrics_addr: String::new(),
            lease: ff_config::Duration(LEASE),
            detector_interval: ff_config::Duration::millis(100),
            raft: RaftConfig {
                node_id: i as u64 + 1,
                cluster: cluster.clone(),
                data_dir: dir.join(format!("mgmtd-{}", i + 1)),
                advertise_addr: addr.clone(),
                initial_members: members.clone(),
                tick_interval: ff_config::Duration::millis(50),
                ..RaftConfig::default()
            },
        };
        replicas.push(Some(Mgmtd::start(config.clone()).await.unwrap()));
        configs.push(config);
    }
    (replicas, configs)
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7)
}

fn client(configs: &[MgmtdConfig]) -> LeaderClient {
    LeaderClient::new(
        configs.iter().map(|c| c.listen_addr.clone()).collect(),
        ClientOptions {
            total_timeout: Duration::from_secs(20),
            ..ClientOptions::default()
        },
    )
    .unwrap()
}

async fn heartbeat(client: &LeaderClient, node: u64, state: LocalState) {
    let request = HeartbeatRequest {
        node_id: node,
        kind: NodeKind::Storage as i32,
        addr: format!("127.0.0.1:{}", 10_000 + node),
        hostname: format!("host{node}"),
        targets: (1..=2)
            .map(|t| TargetReport {
                target_id: node * 100 + t,
                state: state as i32,
                path: format!("/data/{t}"),
                ..TargetReport::default()
            })
            .collect(),
    };
    client
        .call(|channel| {
            let request = request.clone();
            async move { MgmtdClient::new(channel).heartbeat(request).await }
        })
        .await
        .unwrap();
}

async fn routing(client: &LeaderClient) -> RoutingInfo {
    client
        .call(|channel| async move {
            MgmtdClient::new(channel)
                .get_routing(GetRoutingRequest { known_version: 0 })
                .await
        })
        .await
        .unwrap()
}

/// The state of `target` in whichever chain holds it.
fn state_of(routing: &RoutingInfo, target: u64) -> PublicState {
    routing
        .chains
        .iter()
        .flat_map(|c| c.targets.iter())
        .find(|t| t.target_id == target)
        .map(|t| PublicState::try_from(t.state).unwrap())
        .unwrap()
}

/// Heartbeats `alive` nodes with their states until `done` holds or the deadline passes.
async fn beat_until(
    client: &LeaderClient,
    alive: &[(u64, LocalState)],
    timeout: Duration,
    done: impl Fn(&RoutingInfo) -> bool,
) -> RoutingInfo {
    let deadline = Instant::now() + timeout;
    loop {
        for (node, state) in alive {
            heartbeat(client, *node, *state).await;
        }
        let current = routing(client).await;
        if done(&current) {
            return current;
        }
        assert!(
            Instant::now() < deadline,
            "condition not reached: {current:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chains_follow_their_targets_through_failure_and_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let (mut replicas, configs) = start_replicas(dir.path()).await;
    let client = client(&configs);
    let all_up = [
        (1, LocalState::UpToDate),
        (2, LocalState::UpToDate),
        (3, LocalState::UpToDate),
    ];
    // Services register themselves and their targets by heartbeating.
    let registered = beat_until(&client, &all_up, Duration::from_secs(15), |r| {
        r.targets.len() == 6
    })
    .await;
    assert_eq!(registered.nodes.len(), 3);

    let reply = client
        .call(|channel| async move {
            MgmtdClient::new(channel)
                .bootstrap(BootstrapRequest {
                    table_id: 1,
                    replication: 3,
                })
                .await
        })
        .await
        .unwrap();
    let table = reply.routing.unwrap();
    assert_eq!(table.chains.len(), 2);
    assert!(table.chains.iter().all(|c| c.targets.len() == 3));

    // Node 2 goes silent: within the lease its targets are offline, at the end of their chains.
    let silent = Instant::now();
    let after_failure = beat_until(
        &client,
        &[(1, LocalState::UpToDate), (3, LocalState::UpToDate)],
        Duration::from_secs(10),
        |r| state_of(r, 201) == PublicState::Offline && state_of(r, 202) == PublicState::Offline,
    )
    .await;
    // About one lease, not never: the margin is for a loaded machine's scheduling delays.
    assert!(
        silent.elapsed() < LEASE + Duration::from_secs(4),
        "took {:?}",
        silent.elapsed()
    );
    for chain in &after_failure.chains {
        let last = chain.targets.last().unwrap();
        assert_eq!(last.target_id / 100, 2, "{chain:?}");
        assert!(chain.version > 1);
    }

    // It comes back, not yet up to date: waiting, then syncing (writes, no reads) ...
    beat_until(
        &client,
        &[
            (1, LocalState::UpToDate),
            (2, LocalState::Online),
            (3, LocalState::UpToDate),
        ],
        Duration::from_secs(10),
        |r| state_of(r, 201) == PublicState::Syncing && state_of(r, 202) == PublicState::Syncing,
    )
    .await;
    // ... and serving once its storage reports it up to date.
    beat_until(&client, &all_up, Duration::from_secs(10), |r| {
        state_of(r, 201) == PublicState::Serving && state_of(r, 202) == PublicState::Serving
    })
    .await;

    // An operator takes a target out by hand.
    client
        .call(|channel| async move {
            MgmtdClient::new(channel)
                .set_target_offline(SetTargetOfflineRequest {
                    target_id: 101,
                    offline: true,
                })
                .await
        })
        .await
        .unwrap();
    let before_leader_change = beat_until(&client, &all_up, Duration::from_secs(10), |r| {
        state_of(r, 101) == PublicState::Offline
    })
    .await;

    // The mgmtd leader goes away: a new one takes over with everything intact.
    let leader = replicas
        .iter()
        .flatten()
        .find(|m| m.daemon().node().status().role == ff_raft::Role::Leader)
        .map(|m| m.daemon().node().id())
        .unwrap();
    replicas[(leader - 1) as usize]
        .take()
        .unwrap()
        .shutdown()
        .await;
    let after = beat_until(&client, &all_up, Duration::from_secs(15), |r| {
        r.version >= before_leader_change.version
    })
    .await;
    assert_eq!(after.tables, before_leader_change.tables);
    assert_eq!(after.targets.len(), 6);
    assert_eq!(state_of(&after, 101), PublicState::Offline);
    // The new leader's detector still works: node 3 going silent is noticed.
    beat_until(
        &client,
        &[(1, LocalState::UpToDate), (2, LocalState::UpToDate)],
        Duration::from_secs(15),
        |r| state_of(r, 301) == PublicState::Offline,
    )
    .await;
    for replica in replicas.into_iter().flatten() {
        replica.shutdown().await;
    }
}
