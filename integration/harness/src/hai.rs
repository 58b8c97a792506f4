//! A local hai cluster as real processes on loopback: hai server replicas (a raft group sharing
//! one administrator's token) and node agents (virtual nodes on this machine), started from
//! the `hai` binary with generated configs. What the hai end-to-end tests kill with SIGKILL and
//! what `fireflyer up` starts.
//!
//! Layout under the cluster directory: `admin.token`, `server-N.toml`, `server-N/` (raft data),
//! `server-N.log`, `agent-NAME.toml`, `agent-NAME/` (the agent's records), `agent-NAME.log`,
//! and `logs/` (the ranks' logs, shared by the agents as the fs3 mount is in production).
//! Configs are written once: starting again on the same directory brings back the same
//! cluster with its jobs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ff_raft::{MemberConfig, RaftConfig};
use ff_rpc::{ClientOptions, LeaderClient};
use hai_agent::AgentConfig;
use hai_proto::hai_client::HaiClient;
use hai_proto::{Empty, Job, JobRequest, JobSpec, ListNodesReply, NodeState, SubmitRequest};
use hai_server::ServerConfig;

use crate::process::ChildProcess;
use crate::{NotReady, ensure_free, wait_for};

/// Ports each agent hands out as MASTER_PORT.
pub const PORTS_PER_AGENT: u16 = 10;

/// What to start.
#[derive(Debug, Clone)]
pub struct HaiClusterSpec {
    /// The `hai` binary.
    pub binary: PathBuf,
    /// Directory for configs, data and logs.
    pub dir: PathBuf,
    /// Server replicas (1 or 3).
    pub servers: u64,
    /// Agents: node name and GPUs offered.
    pub agents: Vec<(String, u32)>,
    /// First of a block of [`HaiClusterSpec::port_count`] consecutive free loopback ports; 0:
    /// chosen by [`HaiCluster::start`].
    pub base_port: u16,
    /// An agent silent this long has its node marked down.
    pub node_lease: Duration,
    /// Raft tick of the servers (elections take about ten ticks).
    pub raft_tick: Duration,
    /// Whether every process serves `/metrics`.
    pub metrics: bool,
    /// How long the servers keep ended jobs (the servers' default unless set).
    pub job_retention: Option<Duration>,
    /// Extra environment for every agent (and so every rank).
    pub agent_env: Vec<(String, String)>,
    /// The ranks' log directory (shared by the agents; `DIR/logs` by default).
    pub log_dir: PathBuf,
}

impl HaiClusterSpec {
    /// Test-friendly timings: `servers` replicas, agents `node-1..=agents` with `gpus` each,
    /// a 3 s node lease and a 50 ms raft tick.
    pub fn new(
        binary: impl Into<PathBuf>,
        dir: impl Into<PathBuf>,
        servers: u64,
        agents: usize,
        gpus: u32,
        base_port: u16,
    ) -> HaiClusterSpec {
        let dir: PathBuf = dir.into();
        HaiClusterSpec {
            binary: binary.into(),
            log_dir: dir.join("logs"),
            dir,
            servers,
            agents: (1..=agents).map(|i| (format!("node-{i}"), gpus)).collect(),
            base_port,
            node_lease: Duration::from_secs(3),
            raft_tick: Duration::from_millis(50),
            metrics: false,
            job_retention: None,
            agent_env: Vec::new(),
        }
    }

    /// Ports the cluster uses from `base_port`: servers, their metrics, then the agents'
    /// MASTER_PORT ranges.
    pub fn port_count(&self) -> u16 {
        (self.servers as u16) * 2 + self.agents.len() as u16 * (PORTS_PER_AGENT + 1)
    }

    /// Agent `index`'s metrics address (empty when metrics are off).
    fn agent_metrics_addr(&self, index: usize) -> String {
        if self.metrics {
            let first = self.base_port
                + self.servers as u16 * 2
                + self.agents.len() as u16 * PORTS_PER_AGENT;
            format!("127.0.0.1:{}", first + index as u16)
        } else {
            String::new()
        }
    }

    /// Server `id`'s address.
    pub fn server_addr(&self, id: u64) -> String {
        format!("127.0.0.1:{}", self.base_port + (id - 1) as u16)
    }

    fn metrics_addr(&self, id: u64) -> String {
        if self.metrics {
            format!(
                "127.0.0.1:{}",
                self.base_port + self.servers as u16 + (id - 1) as u16
            )
        } else {
            String::new()
        }
    }

    /// Every server's address, comma-separated (for `HAI_SERVER`).
    pub fn servers_env(&self) -> String {
        (1..=self.servers)
            .map(|id| self.server_addr(id))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The administrator's token file.
    pub fn token_path(&self) -> PathBuf {
        self.dir.join("admin.token")
    }

    /// An agent's records directory.
    pub fn agent_state_dir(&self, name: &str) -> PathBuf {
        self.dir.join(format!("agent-{name}"))
    }
}

/// A running hai cluster.
#[derive(Debug)]
pub struct HaiCluster {
    spec: HaiClusterSpec,
    servers: BTreeMap<u64, ChildProcess>,
    agents: BTreeMap<String, ChildProcess>,
    client: LeaderClient,
    token: String,
}

fn write_once<C: serde::Serialize>(
    path: &std::path::Path,
    config: impl FnOnce() -> C,
) -> anyhow::Result<()> {
    if !path.exists() {
        std::fs::write(path, toml::to_string(&config())?)?;
    }
    Ok(())
}

impl HaiCluster {
    /// Writes configs (unless present), starts every process and waits until a leader has
    /// every agent's node up.
    pub async fn start(mut spec: HaiClusterSpec, timeout: Duration) -> anyhow::Result<HaiCluster> {
        anyhow::ensure!(spec.servers >= 1, "a cluster needs at least one server");
        spec.base_port = crate::ports::claim_ports(spec.base_port, spec.port_count())?;
        std::fs::create_dir_all(&spec.log_dir)?;
        if !spec.token_path().exists() {
            std::fs::write(
                spec.token_path(),
                format!("{}\n", ff_rpc::tokens::new_token()),
            )?;
        }
        let token = std::fs::read_to_string(spec.token_path())?
            .trim()
            .to_string();
        let members: Vec<MemberConfig> = (1..=spec.servers)
            .map(|id| MemberConfig {
                id,
                addr: spec.server_addr(id),
            })
            .collect();
        let addrs: Vec<String> = members.iter().map(|m| m.addr.clone()).collect();
        ensure_free(addrs.iter().map(String::as_str))?;
        let mut servers = BTreeMap::new();
        for id in 1..=spec.servers {
            let name = format!("server-{id}");
            let path = spec.dir.join(format!("{name}.toml"));
            write_once(&path, || ServerConfig {
                listen_addr: spec.server_addr(id),
                metrics_addr: spec.metrics_addr(id),
                admin_token_file: spec.token_path(),
                node_lease: ff_config::Duration(spec.node_lease),
                schedule_interval: ff_config::Duration::millis(200),
                job_retention: spec.job_retention.map_or_else(
                    || ServerConfig::default().job_retention,
                    ff_config::Duration,
                ),
                raft: RaftConfig {
                    node_id: id,
                    cluster: "hai".to_string(),
                    data_dir: spec.dir.join(&name),
                    advertise_addr: spec.server_addr(id),
                    initial_members: members.clone(),
                    tick_interval: ff_config::Duration(spec.raft_tick),
                    ..RaftConfig::default()
                },
            })?;
            servers.insert(id, Self::process(&spec, "server", &name, path));
        }
        let mut agents = BTreeMap::new();
        for (index, (node, gpus)) in spec.agents.iter().enumerate() {
            let name = format!("agent-{node}");
            let path = spec.dir.join(format!("{name}.toml"));
            let port_min =
                spec.base_port + spec.servers as u16 * 2 + index as u16 * PORTS_PER_AGENT;
            write_once(&path, || AgentConfig {
                node: node.clone(),
                servers: addrs.clone(),
                token_file: spec.token_path(),
                metrics_addr: spec.agent_metrics_addr(index),
                gpus: *gpus,
                port_min,
                port_max: port_min + PORTS_PER_AGENT - 1,
                log_dir: spec.log_dir.clone(),
                state_dir: spec.agent_state_dir(node),
                heartbeat_interval: ff_config::Duration(spec.node_lease / 6),
                stop_grace: ff_config::Duration::secs(5),
                ..AgentConfig::default()
            })?;
            agents.insert(node.clone(), Self::process(&spec, "agent", &name, path));
        }
        let client = LeaderClient::new(
            addrs,
            ClientOptions {
                total_timeout: Duration::from_secs(10),
                ..ClientOptions::default()
            },
        )?;
        let mut cluster = HaiCluster {
            spec,
            servers,
            agents,
            client,
            token,
        };
        for process in cluster.servers.values_mut() {
            process.spawn()?;
        }
        for process in cluster.agents.values_mut() {
            process.spawn()?;
        }
        cluster.wait_nodes_up(timeout).await?;
        Ok(cluster)
    }

    fn process(spec: &HaiClusterSpec, kind: &str, name: &str, config: PathBuf) -> ChildProcess {
        let mut args: Vec<std::ffi::OsString> =
            vec![kind.into(), "--config".into(), config.into_os_string()];
        args.push("--exit-with-parent".into());
        let mut process = ChildProcess::new(
            name,
            &spec.binary,
            args,
            spec.dir.join(format!("{name}.log")),
        );
        if kind == "agent" {
            process.set_env(spec.agent_env.clone());
        }
        process
    }

    /// The spec it was started with.
    pub fn spec(&self) -> &HaiClusterSpec {
        &self.spec
    }

    /// Every process of the cluster.
    pub fn processes(&self) -> Vec<crate::ProcessInfo> {
        let servers = self.servers.iter().map(|(id, p)| crate::ProcessInfo {
            role: "hai-server".to_string(),
            name: p.name().to_string(),
            pid: p.pid(),
            address: self.spec.server_addr(*id),
            metrics: self.spec.metrics_addr(*id),
        });
        let agents = self.agents.iter().map(|(node, p)| crate::ProcessInfo {
            role: "hai-agent".to_string(),
            name: node.clone(),
            pid: p.pid(),
            address: String::new(),
            metrics: self
                .spec
                .agents
                .iter()
                .position(|(n, _)| n == node)
                .map(|i| self.spec.agent_metrics_addr(i))
                .unwrap_or_default(),
        });
        servers.chain(agents).collect()
    }

    /// The administrator's token.
    pub fn admin_token(&self) -> &str {
        &self.token
    }

    /// Environment for the `hai` CLI: `HAI_SERVER` and `HAI_TOKEN_FILE`.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        vec![
            ("HAI_SERVER".to_string(), self.spec.servers_env()),
            (
                "HAI_TOKEN_FILE".to_string(),
                self.spec.token_path().display().to_string(),
            ),
        ]
    }

    /// The nodes as the leader lists them.
    pub async fn nodes(&self) -> Result<ListNodesReply, tonic::Status> {
        let token = self.token.clone();
        self.client
            .call_idempotent(|channel| {
                let request = ff_rpc::with_token(tonic::Request::new(Empty {}), &token);
                async move { HaiClient::new(channel).list_nodes(request).await }
            })
            .await
    }

    /// Submits `spec` as the administrator; the job's id.
    pub async fn submit(&self, spec: JobSpec) -> Result<u64, tonic::Status> {
        let token = self.token.clone();
        let request = SubmitRequest {
            spec: Some(spec),
            request_id: ff_rpc::tokens::new_token(),
        };
        self.client
            .call_idempotent(|channel| {
                let request = ff_rpc::with_token(tonic::Request::new(request.clone()), &token);
                async move { HaiClient::new(channel).submit(request).await }
            })
            .await
            .map(|reply| reply.job_id)
    }

    /// Job `id` as the leader sees it.
    pub async fn job(&self, id: u64) -> Result<Job, tonic::Status> {
        let token = self.token.clone();
        self.client
            .call_idempotent(|channel| {
                let request =
                    ff_rpc::with_token(tonic::Request::new(JobRequest { job_id: id }), &token);
                async move { HaiClient::new(channel).get_job(request).await }
            })
            .await
    }

    /// Waits until every running agent's node is up.
    pub async fn wait_nodes_up(&self, timeout: Duration) -> anyhow::Result<()> {
        let wanted: Vec<String> = self
            .agents
            .iter()
            .filter(|(_, p)| p.is_running())
            .map(|(n, _)| n.clone())
            .collect();
        wait_for(
            "every agent's node up",
            timeout,
            Duration::from_millis(100),
            || async {
                self.check_processes()?;
                let nodes = self
                    .nodes()
                    .await
                    .map_err(|s| NotReady::from(s.message().to_string()))?;
                let up: Vec<&str> = nodes
                    .nodes
                    .iter()
                    .filter(|n| n.state() == NodeState::Up)
                    .map(|n| n.name.as_str())
                    .collect();
                if wanted.iter().all(|w| up.contains(&w.as_str())) {
                    Ok(())
                } else {
                    Err(format!("up: {up:?}, wanted {wanted:?}").into())
                }
            },
        )
        .await
    }

    fn check_processes(&self) -> Result<(), NotReady> {
        for process in self.servers.values().chain(self.agents.values()) {
            if process.is_running() {
                process.check_running().map_err(NotReady::Failed)?;
            }
        }
        Ok(())
    }

    /// The leader all running servers agree on, other than `not`.
    pub async fn wait_for_leader(
        &self,
        not: Option<u64>,
        timeout: Duration,
    ) -> anyhow::Result<u64> {
        let members: Vec<(String, String)> = self
            .servers
            .iter()
            .filter(|(_, p)| p.is_running())
            .map(|(id, _)| (format!("server-{id}"), self.spec.server_addr(*id)))
            .collect();
        wait_for(
            "an agreed hai leader",
            timeout,
            Duration::from_millis(20),
            || crate::raft::agreed_leader(&self.client, &members, not),
        )
        .await
    }

    /// Server `id`'s process.
    pub fn server(&mut self, id: u64) -> anyhow::Result<&mut ChildProcess> {
        self.servers
            .get_mut(&id)
            .ok_or_else(|| anyhow::anyhow!("no server {id}"))
    }

    /// The agent of node `name`.
    pub fn agent(&mut self, name: &str) -> anyhow::Result<&mut ChildProcess> {
        self.agents
            .get_mut(name)
            .ok_or_else(|| anyhow::anyhow!("no agent {name}"))
    }

    /// Stops every agent and server, then kills every rank the agents' records name (ranks
    /// outlive their agent by design; a test must not leave them behind).
    pub async fn stop_all(&mut self) {
        for process in self.agents.values_mut() {
            let _ = process.stop(Duration::from_secs(5)).await;
        }
        for process in self.servers.values_mut() {
            let _ = process.stop(Duration::from_secs(5)).await;
        }
        for (node, _) in &self.spec.agents {
            kill_recorded_ranks(&self.spec.agent_state_dir(node));
        }
    }
}

/// Kills the process group of every rank recorded under an agent's state directory.
pub fn kill_recorded_ranks(state_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(state_dir.join("attempts")) else {
        return;
    };
    for entry in entries.flatten() {
        if let Ok(record) = hai_agent::rank::load(&entry.path()) {
            for rank in &record.ranks {
                hai_agent::rank::signal_group(rank, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}
