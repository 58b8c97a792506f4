//! A local fs3 cluster as real processes on loopback: mgmtd replicas (a raft group), storage
//! daemons with one or more targets each, and meta replicas (another raft group), all started
//! from the `fs3` binary with generated configs. What the fs3 end-to-end tests kill with SIGKILL, what `fs3 bench storage` measures,
//! and what `fireflyer up` starts.
//!
//! Layout under the cluster directory: `mgmtd-N.toml`, `mgmtd-N/` (raft data), `mgmtd-N.log`,
//! `storage-N.toml`, `storage-N.log`, `meta-N.toml`, `meta-N/` (raft data and, on meta-1, the
//! administrator's token `admin.token`), `meta-N.log`; targets live in `TARGET_ROOT/storage-N/target-ID/`.
//! Configs are written once: starting again on the same directory brings back the same
//! cluster with its data.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ff_raft::{MemberConfig, RaftConfig};
use ff_rpc::{ClientOptions, LeaderClient};
use fs3_client::{ChunkClient, Fs3, Fs3Options, RoutingCache};
use fs3_meta::MetaConfig;
use fs3_mgmtd::MgmtdConfig;
use fs3_proto::meta::{ChainTableQuery, Credentials, query};
use fs3_proto::mgmtd::mgmtd_client::MgmtdClient;
use fs3_proto::mgmtd::{
    BootstrapRequest, GetRoutingRequest, ListNodesRequest, LocalState, PublicState, RoutingInfo,
};
use fs3_storage::engine::EngineConfig;
use fs3_storage::{StorageConfig, TargetConfig};

use crate::process::ChildProcess;
use crate::{NotReady, ensure_free, wait_for};

/// The chain table a new cluster is bootstrapped into.
pub const TABLE_ID: u64 = 1;

/// meta replica N registers at mgmtd as node `META_NODE_BASE + N` (storage daemons are 1..).
pub const META_NODE_BASE: u64 = 1000;

/// What to start.
#[derive(Debug, Clone)]
pub struct Fs3ClusterSpec {
    /// The `fs3` binary.
    pub binary: PathBuf,
    /// Directory for configs, mgmtd data and logs.
    pub dir: PathBuf,
    /// Directory under which the targets live (may be another disk); defaults to `dir`.
    pub target_root: Option<PathBuf>,
    /// mgmtd replicas (1 or 3 in practice).
    pub mgmtd_replicas: u64,
    /// Storage daemons.
    pub storage_nodes: u64,
    /// Targets per storage daemon.
    pub targets_per_node: u64,
    /// Replicas per chain for the bootstrapped table.
    pub replication: u32,
    /// First of a block of [`Fs3ClusterSpec::port_count`] consecutive free loopback ports; 0:
    /// chosen by [`Fs3Cluster::start`] for the spec as it is then.
    pub base_port: u16,
    /// meta replicas (0: none; the namespace is then unavailable).
    pub meta_replicas: u64,
    /// Whether every daemon serves `/metrics` (on ports after the service ports).
    pub metrics: bool,
    /// How long meta keeps an unlinked file's chunks.
    pub gc_delay: Duration,
    /// How long meta keeps a silent client's write sessions.
    pub session_lease: Duration,
    /// mgmtd's lease: a storage daemon silent this long has its targets taken offline.
    pub lease: Duration,
    /// mgmtd raft tick (elections take about ten ticks).
    pub raft_tick: Duration,
    /// Chunk engine settings of every target.
    pub engine: EngineConfig,
    /// Daemons listen on the wildcard address and are dialled as `localhost:PORT`, a name to
    /// resolve, as in a Kubernetes deployment (instead of `127.0.0.1:PORT` everywhere).
    pub dial_by_name: bool,
}

impl Fs3ClusterSpec {
    /// A spec with test-friendly timings: `mgmtd_replicas` mgmtd, `storage_nodes` daemons of one
    /// target each, replication `replication`, 3 s lease.
    pub fn new(
        binary: impl Into<PathBuf>,
        dir: impl Into<PathBuf>,
        mgmtd_replicas: u64,
        storage_nodes: u64,
        replication: u32,
        base_port: u16,
    ) -> Self {
        Fs3ClusterSpec {
            binary: binary.into(),
            dir: dir.into(),
            target_root: None,
            mgmtd_replicas,
            storage_nodes,
            targets_per_node: 1,
            replication,
            base_port,
            meta_replicas: 0,
            metrics: true,
            gc_delay: Duration::from_secs(2),
            session_lease: Duration::from_secs(10),
            lease: Duration::from_secs(3),
            raft_tick: Duration::from_millis(50),
            engine: EngineConfig {
                // Tests and demos run many targets on one small disk.
                reserved_space: ff_config::ByteSize::mib(16),
                max_chunk_size: ff_config::ByteSize::mib(16),
                class_growth: ff_config::ByteSize::mib(16),
                ..EngineConfig::default()
            },
            dial_by_name: false,
        }
    }

    /// How many consecutive ports the cluster uses from `base_port`.
    pub fn port_count(&self) -> u16 {
        let services = self.mgmtd_replicas + self.storage_nodes + self.meta_replicas;
        let total = if self.metrics { services * 2 } else { services };
        u16::try_from(total).unwrap_or(u16::MAX)
    }

    fn port(&self, offset: u64) -> String {
        format!("127.0.0.1:{}", u64::from(self.base_port) + offset)
    }

    /// Where a service dialled at `addr` (one of the `*_addr` below) listens.
    fn listen_addr(&self, addr: &str) -> String {
        match addr.strip_prefix("localhost:") {
            Some(port) if self.dial_by_name => format!("0.0.0.0:{port}"),
            _ => addr.to_string(),
        }
    }

    /// A service's address as others dial it.
    fn service_addr(&self, offset: u64) -> String {
        let port = u64::from(self.base_port) + offset;
        if self.dial_by_name {
            format!("localhost:{port}")
        } else {
            format!("127.0.0.1:{port}")
        }
    }

    fn mgmtd_addr(&self, id: u64) -> String {
        self.service_addr(id - 1)
    }

    fn storage_addr(&self, node: u64) -> String {
        self.service_addr(self.mgmtd_replicas + node - 1)
    }

    fn meta_addr(&self, id: u64) -> String {
        self.service_addr(self.mgmtd_replicas + self.storage_nodes + id - 1)
    }

    fn metrics_addr(&self, service_index: u64) -> String {
        if self.metrics {
            self.port(self.mgmtd_replicas + self.storage_nodes + self.meta_replicas + service_index)
        } else {
            String::new()
        }
    }

    /// Target ids of storage daemon `node`.
    pub fn targets_of(&self, node: u64) -> Vec<u64> {
        (1..=self.targets_per_node)
            .map(|t| node * 100 + t)
            .collect()
    }

    /// The storage daemon holding `target`.
    pub fn node_of(&self, target: u64) -> u64 {
        target / 100
    }

    /// Directory of `target`.
    pub fn target_path(&self, target: u64) -> PathBuf {
        self.target_root
            .as_ref()
            .unwrap_or(&self.dir)
            .join(format!("storage-{}", self.node_of(target)))
            .join(format!("target-{target}"))
    }
}

/// A running (or partly stopped) local fs3 cluster.
#[derive(Debug)]
pub struct Fs3Cluster {
    spec: Fs3ClusterSpec,
    mgmtd: BTreeMap<u64, ChildProcess>,
    storage: BTreeMap<u64, ChildProcess>,
    meta: BTreeMap<u64, ChildProcess>,
    metrics: BTreeMap<String, String>,
    client: LeaderClient,
}

/// The process of daemon `name` (`mgmtd-1`, `storage-2`, …) running `fs3 KIND`, with its
/// config written to `DIR/NAME.toml` unless that file exists (a restart keeps the config).
fn daemon<C: serde::Serialize>(
    spec: &Fs3ClusterSpec,
    kind: &str,
    name: &str,
    config: impl FnOnce() -> C,
) -> anyhow::Result<ChildProcess> {
    let config_path = spec.dir.join(format!("{name}.toml"));
    if !config_path.exists() {
        std::fs::write(&config_path, toml::to_string(&config())?)?;
    }
    Ok(ChildProcess::new(
        name,
        &spec.binary,
        [
            kind.into(),
            "--config".into(),
            config_path.into_os_string(),
            std::ffi::OsString::from("--exit-with-parent"),
        ],
        spec.dir.join(format!("{name}.log")),
    ))
}

impl Fs3Cluster {
    /// Writes configs (unless present), starts every process, waits for an mgmtd leader and
    /// every storage daemon, bootstraps chain table [`TABLE_ID`] if there is none, and waits
    /// until every chain is fully serving.
    pub async fn start(mut spec: Fs3ClusterSpec, timeout: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(
            spec.mgmtd_replicas >= 1 && spec.storage_nodes >= 1 && spec.targets_per_node >= 1,
            "a cluster needs at least one mgmtd, one storage daemon and one target"
        );
        spec.base_port = crate::ports::claim_ports(spec.base_port, spec.port_count())?;
        std::fs::create_dir_all(&spec.dir)?;
        let members: Vec<MemberConfig> = (1..=spec.mgmtd_replicas)
            .map(|id| MemberConfig {
                id,
                addr: spec.mgmtd_addr(id),
            })
            .collect();
        let mgmtd_endpoints: Vec<String> = members.iter().map(|m| m.addr.clone()).collect();
        let mut metrics = BTreeMap::new();
        let mut mgmtd = BTreeMap::new();
        for id in 1..=spec.mgmtd_replicas {
            let name = format!("mgmtd-{id}");
            let metrics_addr = spec.metrics_addr(id - 1);
            let process = daemon(&spec, "mgmtd", &name, || MgmtdConfig {
                listen_addr: spec.listen_addr(&spec.mgmtd_addr(id)),
                metrics_addr: metrics_addr.clone(),
                lease: ff_config::Duration(spec.lease),
                detector_interval: ff_config::Duration(spec.lease / 10),
                raft: RaftConfig {
                    node_id: id,
                    cluster: "fs3-mgmtd".to_string(),
                    data_dir: spec.dir.join(&name),
                    advertise_addr: spec.mgmtd_addr(id),
                    initial_members: members.clone(),
                    tick_interval: ff_config::Duration(spec.raft_tick),
                    ..RaftConfig::default()
                },
            })?;
            metrics.insert(name, metrics_addr);
            mgmtd.insert(id, process);
        }
        let mut storage = BTreeMap::new();
        for node in 1..=spec.storage_nodes {
            let name = format!("storage-{node}");
            let metrics_addr = spec.metrics_addr(spec.mgmtd_replicas + node - 1);
            let process = daemon(&spec, "storage", &name, || StorageConfig {
                node_id: node,
                listen_addr: spec.listen_addr(&spec.storage_addr(node)),
                advertise_addr: spec.storage_addr(node),
                metrics_addr: metrics_addr.clone(),
                mgmtd: mgmtd_endpoints.clone(),
                heartbeat_interval: ff_config::Duration(spec.lease / 6),
                isolation_timeout: ff_config::Duration(spec.lease / 2),
                targets: spec
                    .targets_of(node)
                    .into_iter()
                    .map(|id| TargetConfig {
                        id,
                        path: spec.target_path(id),
                    })
                    .collect(),
                engine: spec.engine.clone(),
                ..StorageConfig::default()
            })?;
            metrics.insert(name, metrics_addr);
            storage.insert(node, process);
        }
        let meta_members: Vec<MemberConfig> = (1..=spec.meta_replicas)
            .map(|id| MemberConfig {
                id,
                addr: spec.meta_addr(id),
            })
            .collect();
        let mut meta = BTreeMap::new();
        for id in 1..=spec.meta_replicas {
            let name = format!("meta-{id}");
            let metrics_addr = spec.metrics_addr(spec.mgmtd_replicas + spec.storage_nodes + id - 1);
            let process = daemon(&spec, "meta", &name, || MetaConfig {
                listen_addr: spec.listen_addr(&spec.meta_addr(id)),
                metrics_addr: metrics_addr.clone(),
                node_id: META_NODE_BASE + id,
                mgmtd: mgmtd_endpoints.clone(),
                heartbeat_interval: ff_config::Duration(spec.lease / 6),
                gc_delay: ff_config::Duration(spec.gc_delay),
                session_lease: ff_config::Duration(spec.session_lease),
                // Every replica shares meta-1's token file, so any of them knows the admin.
                admin_token_file: spec.dir.join("meta-1").join("admin.token"),
                maintenance_interval: ff_config::Duration(Duration::from_millis(200)),
                raft: RaftConfig {
                    node_id: id,
                    cluster: "fs3-meta".to_string(),
                    data_dir: spec.dir.join(&name),
                    advertise_addr: spec.meta_addr(id),
                    initial_members: meta_members.clone(),
                    tick_interval: ff_config::Duration(spec.raft_tick),
                    ..RaftConfig::default()
                },
                ..MetaConfig::default()
            })?;
            metrics.insert(name, metrics_addr);
            meta.insert(id, process);
        }
        let addrs: Vec<String> = (1..=spec.mgmtd_replicas)
            .map(|id| spec.listen_addr(&spec.mgmtd_addr(id)))
            .chain((1..=spec.storage_nodes).map(|n| spec.listen_addr(&spec.storage_addr(n))))
            .chain((1..=spec.meta_replicas).map(|n| spec.listen_addr(&spec.meta_addr(n))))
            .chain(metrics.values().cloned())
            .collect();
        ensure_free(addrs.iter().map(String::as_str))?;
        let client = LeaderClient::new(
            mgmtd_endpoints,
            ClientOptions {
                total_timeout: Duration::from_secs(20),
                request_timeout: Duration::from_secs(5),
                connect_timeout: Duration::from_millis(500),
                ..ClientOptions::default()
            },
        )?;
        let mut cluster = Fs3Cluster {
            spec,
            mgmtd,
            storage,
            meta,
            metrics,
            client,
        };
        for process in cluster.mgmtd.values_mut() {
            process.spawn()?;
        }
        cluster.wait_for_mgmtd_leader(None, timeout).await?;
        for process in cluster.storage.values_mut() {
            process.spawn()?;
        }
        cluster.wait_registered(timeout).await?;
        if cluster.routing().await?.tables.is_empty() {
            let replication = cluster.spec.replication;
            cluster
                .client
                .call(|channel| async move {
                    MgmtdClient::new(channel)
                        .bootstrap(BootstrapRequest {
                            table_id: TABLE_ID,
                            replication,
                        })
                        .await
                })
                .await
                .map_err(|s| anyhow::anyhow!("bootstrap: {}", s.message()))?;
        }
        cluster.wait_all_serving(timeout).await?;
        if cluster.spec.meta_replicas > 0 {
            // Every replica reads one shared token file, made here as an operator would.
            let token_file = cluster.admin_token_path();
            if !token_file.exists() {
                if let Some(dir) = token_file.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&token_file, format!("{}\n", fs3_meta::new_token()))?;
                std::fs::set_permissions(
                    &token_file,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )?;
            }
            for process in cluster.meta.values_mut() {
                process.spawn()?;
            }
            cluster.wait_meta_ready(timeout).await?;
        }
        Ok(cluster)
    }

    /// Where the administrator's token of meta is.
    pub fn admin_token_path(&self) -> PathBuf {
        self.spec.dir.join("meta-1").join("admin.token")
    }

    /// The administrator's token of meta.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.admin_token_path())?
            .trim()
            .to_string())
    }

    /// A file-system client with the administrator's token.
    pub async fn fs_client(&self) -> anyhow::Result<Fs3> {
        Ok(Fs3::connect(Fs3Options {
            mgmtd: self.mgmtd_endpoints(),
            token: self.admin_token()?,
            ..Fs3Options::default()
        })
        .await?)
    }

    /// Waits until every meta replica has registered at mgmtd (clients find them there), a
    /// client can connect, and meta knows the bootstrapped chain table.
    pub async fn wait_meta_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_for(
            "meta ready",
            timeout,
            Duration::from_millis(100),
            || async {
                let routing = self.probe_routing().await?;
                let metas = routing
                    .nodes
                    .iter()
                    .filter(|n| n.kind == fs3_proto::mgmtd::NodeKind::Meta as i32)
                    .count() as u64;
                if metas < self.spec.meta_replicas {
                    return Err(format!(
                        "{metas} of {} meta replicas registered",
                        self.spec.meta_replicas
                    )
                    .into());
                }
                let fs = self
                    .fs_client()
                    .await
                    .map_err(|e| NotReady::Pending(e.to_string()))?;
                let table = fs
                    .query(
                        &Credentials::default(),
                        query::Op::ChainTable(ChainTableQuery { table_id: TABLE_ID }),
                    )
                    .await
                    .map_err(|e| NotReady::Pending(e.to_string()))?;
                if table.chains.is_empty() {
                    Err("meta has not copied the chain table yet".to_string().into())
                } else {
                    Ok(())
                }
            },
        )
        .await
    }

    /// The process of meta replica `id`.
    pub fn meta_process(&mut self, id: u64) -> anyhow::Result<&mut ChildProcess> {
        self.meta
            .get_mut(&id)
            .ok_or_else(|| anyhow::anyhow!("no meta replica {id}"))
    }

    /// Every process of the cluster.
    pub fn processes(&self) -> Vec<crate::ProcessInfo> {
        let metrics = |name: &str| self.metrics.get(name).cloned().unwrap_or_default();
        let mut out = Vec::new();
        let groups = [
            ("mgmtd", &self.mgmtd),
            ("storage", &self.storage),
            ("meta", &self.meta),
        ];
        for (role, processes) in groups {
            for (id, process) in processes {
                let address = match role {
                    "mgmtd" => self.spec.mgmtd_addr(*id),
                    "storage" => self.spec.storage_addr(*id),
                    _ => self.spec.meta_addr(*id),
                };
                out.push(crate::ProcessInfo {
                    role: role.to_string(),
                    name: process.name().to_string(),
                    pid: process.pid(),
                    address,
                    metrics: metrics(process.name()),
                });
            }
        }
        out
    }

    /// What the cluster was started from.
    pub fn spec(&self) -> &Fs3ClusterSpec {
        &self.spec
    }

    /// The mgmtd endpoints.
    pub fn mgmtd_endpoints(&self) -> Vec<String> {
        (1..=self.spec.mgmtd_replicas)
            .map(|id| self.spec.mgmtd_addr(id))
            .collect()
    }

    /// A client of the mgmtd group (follows the leader).
    pub fn mgmtd(&self) -> &LeaderClient {
        &self.client
    }

    /// Metrics endpoint of each daemon, by name (`mgmtd-1`, `storage-2`, …).
    pub fn metrics_endpoints(&self) -> &BTreeMap<String, String> {
        &self.metrics
    }

    /// A chunk client with its own routing cache and connections; operations retry for up to
    /// `deadline`.
    pub fn chunk_client(&self, deadline: Duration) -> anyhow::Result<ChunkClient> {
        let routing = Arc::new(RoutingCache::new(self.mgmtd_endpoints())?);
        let net = Arc::new(ff_net::NetClient::new(ff_net::NetConfig::default())?);
        Ok(ChunkClient::new(routing, net, deadline))
    }

    /// The current routing information from the mgmtd leader.
    pub async fn routing(&self) -> anyhow::Result<RoutingInfo> {
        self.client
            .call(|channel| async move {
                MgmtdClient::new(channel)
                    .get_routing(GetRoutingRequest { known_version: 0 })
                    .await
            })
            .await
            .map_err(|s| anyhow::anyhow!("get routing: {}", s.message()))
    }

    /// The process of storage daemon `node`.
    pub fn storage(&mut self, node: u64) -> anyhow::Result<&mut ChildProcess> {
        self.storage
            .get_mut(&node)
            .ok_or_else(|| anyhow::anyhow!("no storage daemon {node}"))
    }

    /// The process of mgmtd replica `id`.
    pub fn mgmtd_process(&mut self, id: u64) -> anyhow::Result<&mut ChildProcess> {
        self.mgmtd
            .get_mut(&id)
            .ok_or_else(|| anyhow::anyhow!("no mgmtd replica {id}"))
    }

    /// Waits until the running mgmtd replicas agree on a leader other than `not`; returns it.
    pub async fn wait_for_mgmtd_leader(
        &self,
        not: Option<u64>,
        timeout: Duration,
    ) -> anyhow::Result<u64> {
        let members = self.running_members(&self.mgmtd, "mgmtd", |id| self.spec.mgmtd_addr(id));
        wait_for(
            "an agreed mgmtd leader",
            timeout,
            Duration::from_millis(50),
            || async {
                self.check_processes()?;
                crate::raft::agreed_leader(&self.client, &members, not).await
            },
        )
        .await
    }

    /// (name, address) of every running replica in `group`.
    fn running_members(
        &self,
        group: &BTreeMap<u64, ChildProcess>,
        kind: &str,
        addr: impl Fn(u64) -> String,
    ) -> Vec<(String, String)> {
        group
            .iter()
            .filter(|(_, p)| p.is_running())
            .map(|(id, _)| (format!("{kind}-{id}"), addr(*id)))
            .collect()
    }

    /// Waits until every running mgmtd replica has applied everything the leader committed.
    pub async fn wait_mgmtd_converged(&self, timeout: Duration) -> anyhow::Result<u64> {
        wait_for(
            "mgmtd replicas converged",
            timeout,
            Duration::from_millis(50),
            || async {
                self.check_processes()?;
                let mut statuses = Vec::new();
                for (id, process) in &self.mgmtd {
                    if process.is_running() {
                        statuses.push(self.mgmtd_status(*id).await.map_err(NotReady::from)?);
                    }
                }
                let commit = statuses
                    .iter()
                    .find(|s| s.role == "leader")
                    .map(|s| s.commit_index)
                    .ok_or_else(|| NotReady::from("no leader".to_string()))?;
                if statuses.iter().all(|s| s.applied_index >= commit) {
                    Ok(commit)
                } else {
                    let applied: Vec<u64> = statuses.iter().map(|s| s.applied_index).collect();
                    Err(format!("commit {commit}, applied {applied:?}").into())
                }
            },
        )
        .await
    }

    /// Fails (for good) if a process that should run has exited, with its log tail.
    fn check_processes(&self) -> Result<(), NotReady> {
        for process in self
            .mgmtd
            .values()
            .chain(self.storage.values())
            .chain(self.meta.values())
        {
            process.check_running().map_err(NotReady::Failed)?;
        }
        Ok(())
    }

    async fn mgmtd_status(&self, id: u64) -> Result<ff_raft::proto::StatusReply, String> {
        self.raft_status(&format!("mgmtd-{id}"), &self.spec.mgmtd_addr(id))
            .await
    }

    /// The raft status of the replica `name` at `addr` (mgmtd or meta).
    async fn raft_status(
        &self,
        name: &str,
        addr: &str,
    ) -> Result<ff_raft::proto::StatusReply, String> {
        crate::raft::status(&self.client, name, addr).await
    }

    /// Waits until the running meta replicas agree on a leader other than `not`; returns it.
    pub async fn wait_for_meta_leader(
        &self,
        not: Option<u64>,
        timeout: Duration,
    ) -> anyhow::Result<u64> {
        let members = self.running_members(&self.meta, "meta", |id| self.spec.meta_addr(id));
        wait_for(
            "an agreed meta leader",
            timeout,
            Duration::from_millis(50),
            || crate::raft::agreed_leader(&self.client, &members, not),
        )
        .await
    }

    /// The routing, for readiness probes: fails for good if a daemon died.
    async fn probe_routing(&self) -> Result<RoutingInfo, NotReady> {
        self.check_processes()?;
        self.routing()
            .await
            .map_err(|e| NotReady::Pending(e.to_string()))
    }

    async fn wait_registered(&self, timeout: Duration) -> anyhow::Result<()> {
        let expected = self.spec.storage_nodes * self.spec.targets_per_node;
        wait_for(
            "every storage target registered",
            timeout,
            Duration::from_millis(100),
            || async {
                let routing = self.probe_routing().await?;
                let registered = routing.targets.len() as u64;
                if registered >= expected {
                    Ok(())
                } else {
                    Err(format!("{registered} of {expected} targets registered").into())
                }
            },
        )
        .await
    }

    /// The public state of `target` in its chain (None if it is in no chain).
    pub async fn target_state(&self, target: u64) -> anyhow::Result<Option<PublicState>> {
        Ok(state_in(&self.routing().await?, target))
    }

    /// Waits until `target` has public state `state`.
    pub async fn wait_target_state(
        &self,
        target: u64,
        state: PublicState,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        wait_for(
            &format!("target {target} {}", state.as_str_name()),
            timeout,
            Duration::from_millis(50),
            || async {
                let routing = self.probe_routing().await?;
                match state_in(&routing, target) {
                    Some(now) if now == state => Ok(()),
                    now => Err(format!("target {target} is {now:?}").into()),
                }
            },
        )
        .await
    }

    /// Waits until every chain's targets are all serving and every target reports itself up
    /// to date (so mgmtd has no reason to change a chain right after).
    pub async fn wait_all_serving(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_for(
            "every chain fully serving",
            timeout,
            Duration::from_millis(100),
            || async {
                let routing = self.probe_routing().await?;
                let nodes = self
                    .client
                    .call(|channel| async move {
                        MgmtdClient::new(channel)
                            .list_nodes(ListNodesRequest {})
                            .await
                    })
                    .await
                    .map_err(|s| NotReady::Pending(format!("list nodes: {}", s.message())))?;
                let local: BTreeMap<u64, LocalState> = nodes
                    .targets
                    .iter()
                    .map(|t| (t.target_id, t.local_state()))
                    .collect();
                let lagging: Vec<String> = routing
                    .chains
                    .iter()
                    .flat_map(|c| c.targets.iter())
                    .filter(|t| {
                        t.state() != PublicState::Serving
                            || local.get(&t.target_id) != Some(&LocalState::UpToDate)
                    })
                    .map(|t| {
                        format!(
                            "{} {}/{:?}",
                            t.target_id,
                            t.state().as_str_name(),
                            local.get(&t.target_id)
                        )
                    })
                    .collect();
                if routing.chains.is_empty() {
                    Err("no chains yet".to_string().into())
                } else if lagging.is_empty() {
                    Ok(())
                } else {
                    Err(format!("not serving: {}", lagging.join(", ")).into())
                }
            },
        )
        .await
    }

    /// Stops every process gracefully (meta and storage first, so mgmtd does not see them die).
    pub async fn stop_all(&mut self) {
        let processes = self
            .meta
            .values_mut()
            .chain(self.storage.values_mut())
            .chain(self.mgmtd.values_mut());
        for process in processes {
            if let Err(error) = process.stop(Duration::from_secs(10)).await {
                tracing::warn!(name = process.name(), %error, "stopping failed");
            }
        }
    }
}

/// The public state of `target` in whichever chain holds it.
pub fn state_in(routing: &RoutingInfo, target: u64) -> Option<PublicState> {
    routing
        .chains
        .iter()
        .flat_map(|c| c.targets.iter())
        .find(|t| t.target_id == target)
        .map(|t| t.state())
}

/// A running `fs3 mount` of a cluster; dropping it unmounts (lazily, in case the daemon died).
#[derive(Debug)]
pub struct Mount {
    /// The FUSE daemon.
    pub process: ChildProcess,
    point: PathBuf,
    metrics_addr: String,
}

impl Mount {
    /// Mounts `cluster` at `point` (created if missing) with `allow_other` and the
    /// administrator's token, logging to `log`, serving its metrics on `metrics_port` of
    /// 127.0.0.1 (0: a free port); waits until the kernel lists the mount.
    pub async fn start(
        cluster: &Fs3Cluster,
        point: &std::path::Path,
        log: &std::path::Path,
        metrics_port: u16,
    ) -> anyhow::Result<Mount> {
        std::fs::create_dir_all(point)?;
        let metrics_port = match metrics_port {
            0 => crate::free_port_block(1)?,
            port => port,
        };
        let metrics_addr = format!("127.0.0.1:{metrics_port}");
        let mut process = ChildProcess::new(
            "fs3-mount",
            &cluster.spec.binary,
            [
                "mount".to_string(),
                point.display().to_string(),
                "-o".to_string(),
                "allow_other".to_string(),
                "--mgmtd".to_string(),
                cluster.mgmtd_endpoints().join(","),
                "--token-file".to_string(),
                cluster.admin_token_path().display().to_string(),
                "--metrics-addr".to_string(),
                metrics_addr.clone(),
            ],
            log,
        );
        process.spawn()?;
        let mount = Mount {
            process,
            point: point.to_path_buf(),
            metrics_addr,
        };
        mount.wait_mounted().await?;
        Ok(mount)
    }

    /// The mount point.
    pub fn point(&self) -> &std::path::Path {
        &self.point
    }

    /// Where the FUSE daemon serves `/metrics`.
    pub fn metrics_addr(&self) -> &str {
        &self.metrics_addr
    }

    async fn wait_mounted(&self) -> anyhow::Result<()> {
        let point = std::fs::canonicalize(&self.point)?;
        let wanted = point.display().to_string();
        wait_for(
            "the FUSE mount",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || async {
                self.process.check_running().map_err(NotReady::Failed)?;
                let info = std::fs::read_to_string("/proc/self/mountinfo")
                    .map_err(|e| NotReady::Failed(e.to_string()))?;
                if info
                    .lines()
                    .any(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
                {
                    Ok(())
                } else {
                    Err("not mounted yet".to_string().into())
                }
            },
        )
        .await
    }

    /// Stops the FUSE daemon (SIGTERM: it unmounts), then makes sure nothing stays mounted.
    pub async fn stop(&mut self) {
        let _ = self.process.stop(Duration::from_secs(10)).await;
        let _ = nix::mount::umount2(&self.point, nix::mount::MntFlags::MNT_DETACH);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.point, nix::mount::MntFlags::MNT_DETACH);
    }
}
