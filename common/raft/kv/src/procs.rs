//! A cluster of ff-kv nodes as real child processes on loopback: what `ff-kv up` and
//! `ff-kv demo` run, and what the crash tests kill with SIGKILL.
//!
//! Each node gets a generated config `DIR/node-N.toml`, a data directory `DIR/node-N/` and a
//! log `DIR/node-N.log`. Configs are written once: a second start on the same directory brings
//! the same cluster back with its data. Children are started with `--exit-with-parent` and a
//! piped stdin, so they exit when the supervising process dies, however it dies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ff_harness::{ChildProcess, ensure_free};
use ff_raft::proto::StatusReply;
use ff_raft::{MemberConfig, RaftConfig};
use tokio::time::Instant;

use crate::client::KvClient;
use crate::config::KvConfig;

/// Where a process cluster lives and how its nodes are numbered.
#[derive(Debug, Clone)]
pub struct ProcessClusterSpec {
    /// The `ff-kv` binary.
    pub binary: PathBuf,
    /// Directory for configs, data and logs.
    pub dir: PathBuf,
    /// Number of founding nodes.
    pub nodes: u64,
    /// gRPC port of node 1; node N listens on `port + N - 1`.
    pub port: u16,
    /// Metrics port of node 1 (0: no metrics endpoints).
    pub metrics_port: u16,
    /// Raft tuning applied to every node.
    pub raft: RaftConfig,
}

struct ChildNode {
    addr: String,
    metrics_addr: String,
    process: ChildProcess,
}

/// Running (or stopped) node processes.
pub struct ProcessCluster {
    spec: ProcessClusterSpec,
    nodes: BTreeMap<u64, ChildNode>,
    client: KvClient,
}

impl std::fmt::Debug for ProcessCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessCluster")
            .field("dir", &self.spec.dir)
            .finish()
    }
}

impl ProcessCluster {
    /// Writes the configs (unless they exist) and starts every node.
    pub async fn start(spec: ProcessClusterSpec) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&spec.dir)?;
        let addr_of = |id: u64| format!("127.0.0.1:{}", u64::from(spec.port) + id - 1);
        let members: Vec<MemberConfig> = (1..=spec.nodes)
            .map(|id| MemberConfig {
                id,
                addr: addr_of(id),
            })
            .collect();
        let mut nodes = BTreeMap::new();
        for id in 1..=spec.nodes {
            let addr = addr_of(id);
            let metrics_addr = if spec.metrics_port == 0 {
                String::new()
            } else {
                format!("127.0.0.1:{}", u64::from(spec.metrics_port) + id - 1)
            };
            let config_path = spec.dir.join(format!("node-{id}.toml"));
            if !config_path.exists() {
                let mut raft = spec.raft.clone();
                raft.node_id = id;
                raft.data_dir = spec.dir.join(format!("node-{id}"));
                raft.advertise_addr = addr.clone();
                raft.initial_members = members.clone();
                let config = KvConfig {
                    listen_addr: addr.clone(),
                    metrics_addr: metrics_addr.clone(),
                    raft,
                };
                std::fs::write(&config_path, toml::to_string(&config)?)?;
            }
            let process = ChildProcess::new(
                format!("node-{id}"),
                &spec.binary,
                [
                    "serve".into(),
                    "--config".into(),
                    config_path.into_os_string(),
                    "--exit-with-parent".into(),
                ],
                spec.dir.join(format!("node-{id}.log")),
            );
            nodes.insert(
                id,
                ChildNode {
                    addr,
                    metrics_addr,
                    process,
                },
            );
        }
        ensure_free(
            nodes
                .values()
                .flat_map(|n| [n.addr.as_str(), n.metrics_addr.as_str()]),
        )
        .map_err(|e| anyhow::anyhow!("{e}: use --port / --metrics-port"))?;
        let endpoints = nodes.values().map(|n| n.addr.clone()).collect();
        let options = ff_rpc::ClientOptions {
            total_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_millis(500),
            ..ff_rpc::ClientOptions::default()
        };
        let client = KvClient::new(endpoints, options)?;
        let mut cluster = ProcessCluster {
            spec,
            nodes,
            client,
        };
        let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
        for id in ids {
            cluster.spawn(id)?;
        }
        Ok(cluster)
    }

    /// A client over every node.
    pub fn client(&self) -> &KvClient {
        &self.client
    }

    /// gRPC addresses of the nodes.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.addr.clone()).collect()
    }

    /// gRPC address of node `id`.
    pub fn addr(&self, id: u64) -> Option<&str> {
        self.nodes.get(&id).map(|n| n.addr.as_str())
    }

    /// Metrics address of node `id` (empty if disabled).
    pub fn metrics_addr(&self, id: u64) -> Option<&str> {
        self.nodes.get(&id).map(|n| n.metrics_addr.as_str())
    }

    /// Log file of node `id`.
    pub fn log_path(&self, id: u64) -> Option<&Path> {
        self.nodes.get(&id).map(|n| n.process.log_path())
    }

    /// The process id of node `id`, if it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes.get(&id)?.process.pid()
    }

    fn node(&mut self, id: u64) -> anyhow::Result<&mut ChildProcess> {
        self.nodes
            .get_mut(&id)
            .map(|n| &mut n.process)
            .ok_or_else(|| anyhow::anyhow!("no node {id}"))
    }

    /// Starts node `id`'s process.
    pub fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        self.node(id)?.spawn()
    }

    /// Kills node `id` with SIGKILL and reaps it.
    pub async fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        self.node(id)?.kill().await
    }

    /// Asks node `id` to stop (SIGTERM) and waits up to `grace`, then kills it.
    pub async fn stop(&mut self, id: u64, grace: Duration) -> anyhow::Result<Option<i32>> {
        self.node(id)?.stop(grace).await
    }

    /// Stops every node gracefully.
    pub async fn stop_all(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            if let Err(error) = self.stop(id, Duration::from_secs(10)).await {
                tracing::warn!(node = id, %error, "stopping node failed");
            }
        }
    }

    /// Ids of nodes whose process exited on its own; reaps them.
    pub fn exited(&mut self) -> Vec<(u64, Option<i32>)> {
        self.nodes
            .iter_mut()
            .filter_map(|(id, node)| node.process.try_exited().map(|code| (*id, code)))
            .collect()
    }

    /// Status of every running node that answers.
    pub async fn statuses(&self) -> BTreeMap<u64, StatusReply> {
        let mut statuses = BTreeMap::new();
        for (id, node) in &self.nodes {
            if !node.process.is_running() {
                continue;
            }
            if let Ok(status) = self.client.status_of(&node.addr).await {
                statuses.insert(*id, status);
            }
        }
        statuses
    }

    /// Waits until the running nodes agree on a leader, excluding `not`; returns (leader, term).
    pub async fn wait_for_leader(
        &self,
        not: Option<u64>,
        timeout: Duration,
    ) -> anyhow::Result<(u64, u64)> {
        let deadline = Instant::now() + timeout;
        loop {
            let statuses = self.statuses().await;
            let running = self
                .nodes
                .values()
                .filter(|n| n.process.is_running())
                .count();
            if let Some(leader) = statuses.values().find(|s| s.role == "leader") {
                let agreed = statuses.len() == running
                    && statuses
                        .values()
                        .all(|s| s.leader_id == leader.id && s.term == leader.term);
                if agreed && Some(leader.id) != not {
                    return Ok((leader.id, leader.term));
                }
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "no agreed leader within {timeout:?}: {:?}",
                    statuses
                        .iter()
                        .map(|(id, s)| (*id, s.role.clone(), s.term, s.leader_id))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every running node has applied what the leader has committed.
    pub async fn wait_converged(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let statuses = self.statuses().await;
            let running = self
                .nodes
                .values()
                .filter(|n| n.process.is_running())
                .count();
            if let Some(leader) = statuses.values().find(|s| s.role == "leader") {
                let target = leader.commit_index;
                if statuses.len() == running && statuses.values().all(|s| s.applied_index >= target)
                {
                    return Ok(target);
                }
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "nodes did not converge within {timeout:?}: {:?}",
                    statuses
                        .iter()
                        .map(|(id, s)| (*id, s.role.clone(), s.commit_index, s.applied_index))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
