//! A cluster of ff-kv nodes inside one process, on loopback gRPC, each with its own data
//! directory: the harness of the in-process tests and of the benchmark.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ff_raft::{MemberConfig, RaftConfig, RaftNode, Role};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::config::KvConfig;
use crate::machine::KvMachine;
use crate::server::{self, KvServer};

/// Why the local cluster could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A node failed to start.
    #[error("node {id}: {cause}")]
    Start {
        /// The node.
        id: u64,
        /// Why.
        cause: ff_raft::DaemonError,
    },
    /// A port could not be reserved.
    #[error("cannot reserve a loopback port: {0}")]
    Port(std::io::Error),
    /// No node with that id runs.
    #[error("node {0} is not running")]
    NotRunning(u64),
    /// The cluster did not settle in time.
    #[error("{0}")]
    Timeout(String),
}

struct LocalNode {
    config: KvConfig,
    server: Option<KvServer>,
    /// The port of a stopped node stays bound here, so that no other cluster in this process
    /// takes it before the node restarts.
    parked: Option<TcpListener>,
}

/// Nodes of one raft group running in this process.
pub struct LocalCluster {
    dir: PathBuf,
    template: RaftConfig,
    nodes: BTreeMap<u64, LocalNode>,
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("dir", &self.dir)
            .finish()
    }
}

async fn reserve_port() -> Result<TcpListener, LocalError> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(LocalError::Port)
}

impl LocalCluster {
    /// Starts nodes `1..=size` as the founding members, with `template`'s tuning, under `dir`.
    /// The group gets a unique cluster name, so clusters in one process never talk to each other.
    pub async fn start(
        dir: &Path,
        size: u64,
        mut template: RaftConfig,
    ) -> Result<Self, LocalError> {
        template.cluster = format!("{}-{:016x}", template.cluster, rand::random::<u64>());
        let mut listeners = Vec::new();
        for id in 1..=size {
            let listener = reserve_port().await?;
            let addr = listener.local_addr().map_err(LocalError::Port)?.to_string();
            listeners.push((id, addr, listener));
        }
        let members: Vec<MemberConfig> = listeners
            .iter()
            .map(|(id, addr, _)| MemberConfig {
                id: *id,
                addr: addr.clone(),
            })
            .collect();
        let mut cluster = LocalCluster {
            dir: dir.to_path_buf(),
            template,
            nodes: BTreeMap::new(),
        };
        for (id, addr, listener) in listeners {
            let config = cluster.config_for(id, &addr, members.clone());
            cluster.launch(id, config, listener).await?;
        }
        Ok(cluster)
    }

    fn config_for(&self, id: u64, addr: &str, initial_members: Vec<MemberConfig>) -> KvConfig {
        let mut raft = self.template.clone();
        raft.node_id = id;
        raft.data_dir = self.dir.join(format!("node-{id}"));
        raft.advertise_addr = addr.to_string();
        raft.initial_members = initial_members;
        KvConfig {
            listen_addr: addr.to_string(),
            metrics_addr: "127.0.0.1:0".to_string(),
            raft,
        }
    }

    async fn launch(
        &mut self,
        id: u64,
        config: KvConfig,
        listener: TcpListener,
    ) -> Result<(), LocalError> {
        let server = server::start_on(config.clone(), listener)
            .await
            .map_err(|source| LocalError::Start { id, cause: source })?;
        self.nodes.insert(
            id,
            LocalNode {
                config,
                server: Some(server),
                parked: None,
            },
        );
        Ok(())
    }

    /// Starts a new, empty node `id` that is not a member yet; returns its address. Add it with
    /// `add_member` on the group.
    pub async fn start_joiner(&mut self, id: u64) -> Result<String, LocalError> {
        let listener = reserve_port().await?;
        let addr = listener.local_addr().map_err(LocalError::Port)?.to_string();
        let config = self.config_for(id, &addr, Vec::new());
        self.launch(id, config, listener).await?;
        Ok(addr)
    }

    /// The running node `id`.
    pub fn node(&self, id: u64) -> Result<&RaftNode<KvMachine>, LocalError> {
        self.nodes
            .get(&id)
            .and_then(|n| n.server.as_ref())
            .map(KvServer::node)
            .ok_or(LocalError::NotRunning(id))
    }

    /// The metrics endpoint of running node `id`.
    pub fn metrics_addr(&self, id: u64) -> Option<std::net::SocketAddr> {
        self.nodes.get(&id)?.server.as_ref()?.metrics_addr()
    }

    /// The gRPC address of node `id` (running or not).
    pub fn addr(&self, id: u64) -> Option<String> {
        self.nodes.get(&id).map(|n| n.config.listen_addr.clone())
    }

    /// Ids of the running nodes.
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.server.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Addresses of every node, running or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes
            .values()
            .map(|n| n.config.listen_addr.clone())
            .collect()
    }

    /// Stops node `id` (its data stays).
    pub async fn stop(&mut self, id: u64) -> Result<(), LocalError> {
        let node = self.nodes.get_mut(&id).ok_or(LocalError::NotRunning(id))?;
        let server = node.server.take().ok_or(LocalError::NotRunning(id))?;
        server.shutdown().await;
        node.parked = Some(
            TcpListener::bind(&node.config.listen_addr)
                .await
                .map_err(LocalError::Port)?,
        );
        Ok(())
    }

    /// Starts a stopped node `id` again on its old address and data.
    pub async fn restart(&mut self, id: u64) -> Result<(), LocalError> {
        let node = self.nodes.get_mut(&id).ok_or(LocalError::NotRunning(id))?;
        let config = node.config.clone();
        let listener = match node.parked.take() {
            Some(listener) => listener,
            None => TcpListener::bind(&config.listen_addr)
                .await
                .map_err(LocalError::Port)?,
        };
        self.launch(id, config, listener).await
    }

    /// Waits until every running voter agrees on one leader; returns it.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64, LocalError> {
        let deadline = Instant::now() + timeout;
        loop {
            let statuses: Vec<_> = self
                .nodes
                .values()
                .filter_map(|n| n.server.as_ref())
                .map(|s| s.node().status())
                .filter(|s| {
                    matches!(
                        s.role,
                        Role::Leader | Role::Follower | Role::Candidate | Role::PreCandidate
                    )
                })
                .collect();
            let leader = statuses
                .iter()
                .find(|s| s.role == Role::Leader)
                .map(|s| (s.id, s.term));
            if let Some((id, term)) = leader
                && statuses.iter().all(|s| s.leader_id == id && s.term == term)
            {
                return Ok(id);
            }
            if Instant::now() >= deadline {
                return Err(LocalError::Timeout(format!(
                    "no agreed leader within {timeout:?}: {:?}",
                    statuses
                        .iter()
                        .map(|s| (s.id, s.role, s.term, s.leader_id))
                        .collect::<Vec<_>>()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every running node has applied at least `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), LocalError> {
        let deadline = Instant::now() + timeout;
        loop {
            let behind: Vec<(u64, u64)> = self
                .nodes
                .iter()
                .filter_map(|(id, n)| {
                    n.server
                        .as_ref()
                        .map(|s| (*id, s.node().status().applied_index))
                })
                .filter(|(_, applied)| *applied < index)
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LocalError::Timeout(format!(
                    "nodes {behind:?} (id, applied) did not reach index {index} within {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops every node.
    pub async fn shutdown(mut self) {
        for node in self.nodes.values_mut() {
            if let Some(server) = node.server.take() {
                server.shutdown().await;
            }
        }
    }
}

/// Raft tuning for fast local clusters: short ticks so elections take a few hundred ms.
pub fn fast_raft_config() -> RaftConfig {
    RaftConfig {
        tick_interval: ff_config::Duration::millis(20),
        election_ticks: 10,
        heartbeat_ticks: 2,
        propose_timeout: ff_config::Duration::secs(10),
        ..RaftConfig::default()
    }
}
