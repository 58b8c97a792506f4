//! The mgmtd gRPC API and the leader's failure detector.
//!
//! Heartbeats are not replicated: the leader keeps, in memory, when it last heard from each
//! service and the local state each reported for its targets. A new leader knows nothing for a
//! while, so it judges no one until a full lease has passed since it took over. Every
//! `detector_interval` the leader derives each target's local state (offline if its service's
//! lease ran out or an operator took it offline), runs every chain through
//! [`next_chain`](crate::chain::next_chain), and proposes the changed chains, each conditional
//! on the chain version it was computed from.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ff_raft::{Consistency, RaftError, RaftNode, Role};
use fs3_proto::mgmtd::mgmtd_server::Mgmtd;
use fs3_proto::mgmtd::{
    AdminReply, BootstrapRequest, Command, CreateChainTableRequest, CreateChainsRequest,
    GetRoutingRequest, HeartbeatReply, HeartbeatRequest, ListNodesReply, ListNodesRequest,
    LocalState as WireLocal, Node, NodeStatus, PublicState as WirePublic, Query, RegisterTargets,
    RoutingInfo, SetTargetOfflineRequest, Target, TargetStatus, UpdateChains, command,
};
use tonic::{Request, Response, Status};

use crate::chain::{
    Chain as DomainChain, ChainTarget as DomainTarget, LocalState, PublicState, next_chain,
};
use crate::machine::MgmtdMachine;
use crate::metrics::MgmtdMetrics;

/// What the leader knows of services' liveness.
#[derive(Debug, Default)]
struct Liveness {
    /// When this replica became leader (None while it is not).
    leader_since: Option<Instant>,
    /// Last heartbeat per node.
    nodes: HashMap<u64, Instant>,
    /// Last reported local state per target.
    targets: HashMap<u64, LocalState>,
    /// Last reported (capacity, free bytes) per target.
    space: HashMap<u64, (u64, u64)>,
}

/// The mgmtd API of one replica.
#[derive(Clone)]
pub struct MgmtdApi {
    node: RaftNode<MgmtdMachine>,
    live: Arc<Mutex<Liveness>>,
    lease: std::time::Duration,
    metrics: MgmtdMetrics,
}

fn to_public(state: i32) -> PublicState {
    match WirePublic::try_from(state) {
        Ok(WirePublic::Serving) => PublicState::Serving,
        Ok(WirePublic::Syncing) => PublicState::Syncing,
        Ok(WirePublic::Waiting) => PublicState::Waiting,
        Ok(WirePublic::Lastsrv) => PublicState::LastServing,
        _ => PublicState::Offline,
    }
}

fn to_wire_public(state: PublicState) -> i32 {
    (match state {
        PublicState::Serving => WirePublic::Serving,
        PublicState::Syncing => WirePublic::Syncing,
        PublicState::Waiting => WirePublic::Waiting,
        PublicState::LastServing => WirePublic::Lastsrv,
        PublicState::Offline => WirePublic::Offline,
    }) as i32
}

fn to_local(state: i32) -> Option<LocalState> {
    match WireLocal::try_from(state) {
        Ok(WireLocal::UpToDate) => Some(LocalState::UpToDate),
        Ok(WireLocal::Online) => Some(LocalState::Online),
        Ok(WireLocal::LocalOffline) => Some(LocalState::Offline),
        _ => None,
    }
}

fn to_wire_local(state: LocalState) -> i32 {
    (match state {
        LocalState::UpToDate => WireLocal::UpToDate,
        LocalState::Online => WireLocal::Online,
        LocalState::Offline => WireLocal::LocalOffline,
    }) as i32
}

/// The one place mgmtd errors become statuses.
fn status(error: RaftError) -> Status {
    error.into()
}

impl MgmtdApi {
    /// The API over `node`, with service leases of `lease`.
    pub fn new(
        node: RaftNode<MgmtdMachine>,
        lease: std::time::Duration,
        metrics: MgmtdMetrics,
    ) -> Self {
        MgmtdApi {
            node,
            live: Arc::new(Mutex::new(Liveness::default())),
            lease,
            metrics,
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Liveness> {
        // Maps and timestamps only; a poisoned lock still holds usable values.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The routing information as this replica has applied it.
    pub async fn routing(&self) -> Result<RoutingInfo, RaftError> {
        self.node
            .read_with(Query { known_version: 0 }, Consistency::Local)
            .await
    }

    async fn propose(&self, op: command::Op) -> Result<u64, Status> {
        let result = self
            .node
            .propose(Command { op: Some(op) })
            .await
            .map_err(status)?;
        if !result.error.is_empty() {
            return Err(Status::failed_precondition(result.error));
        }
        Ok(result.routing_version)
    }

    async fn admin_reply(&self) -> Result<Response<AdminReply>, Status> {
        let routing = self
            .node
            .read_with(Query { known_version: 0 }, Consistency::Linearizable)
            .await
            .map_err(status)?;
        Ok(Response::new(AdminReply {
            routing: Some(routing),
        }))
    }

    fn not_leader(&self) -> Option<Status> {
        self.node.require_leader("mgmtd").err()
    }

    /// One run of the failure detector (leader only); returns how many chains it changed.
    pub async fn detect(&self) -> Result<usize, RaftError> {
        let now = Instant::now();
        let leader = self.node.status().role == Role::Leader;
        let routing = self.routing().await?;
        self.metrics.set_routing(&routing);
        let since = {
            let mut live = self.live();
            if !leader {
                *live = Liveness::default();
                self.metrics.set_services(0, 0);
                return Ok(0);
            }
            let alive = live
                .nodes
                .values()
                .filter(|seen| now.duration_since(**seen) <= self.lease)
                .count();
            self.metrics
                .set_services(alive, routing.nodes.len().saturating_sub(alive));
            *live.leader_since.get_or_insert(now)
        };
        let judged = now.duration_since(since) >= self.lease;
        let local = {
            let live = self.live();
            let mut local: HashMap<u64, LocalState> = HashMap::new();
            for target in &routing.targets {
                let state = match live.nodes.get(&target.node_id) {
                    _ if target.admin_offline => Some(LocalState::Offline),
                    Some(seen) if now.duration_since(*seen) > self.lease => {
                        Some(LocalState::Offline)
                    }
                    Some(_) => live.targets.get(&target.id).copied(),
                    // Never heard of since this replica became leader.
                    None if judged => Some(LocalState::Offline),
                    None => None,
                };
                if let Some(state) = state {
                    local.insert(target.id, state);
                }
            }
            local
        };
        let mut updates = Vec::new();
        for chain in &routing.chains {
            let domain = DomainChain {
                id: chain.id,
                version: chain.version,
                targets: chain
                    .targets
                    .iter()
                    .map(|t| DomainTarget {
                        target: t.target_id,
                        state: to_public(t.state),
                    })
                    .collect(),
            };
            if let Some(next) = next_chain(&domain, |t| local.get(&t).copied()) {
                tracing::info!(
                    chain = chain.id,
                    version = next.version,
                    targets = ?next.targets.iter().map(|t| (t.target, t.state.as_str())).collect::<Vec<_>>(),
                    "chain changed"
                );
                updates.push(fs3_proto::mgmtd::ChainUpdate {
                    expected_version: chain.version,
                    chain: Some(fs3_proto::mgmtd::Chain {
                        id: next.id,
                        version: next.version,
                        targets: next
                            .targets
                            .iter()
                            .map(|t| fs3_proto::mgmtd::ChainTarget {
                                target_id: t.target,
                                state: to_wire_public(t.state),
                            })
                            .collect(),
                    }),
                });
            }
        }
        let changed = updates.len();
        if changed > 0 {
            let result = self
                .node
                .propose(Command {
                    op: Some(command::Op::UpdateChains(UpdateChains { updates })),
                })
                .await?;
            if result.error.is_empty() {
                // Operators see the change at once, not a detector round later.
                self.metrics.chain_changes.inc_by(changed as u64);
                self.metrics.set_routing(&self.routing().await?);
            } else {
                tracing::warn!(error = %result.error, "chain update refused");
            }
        }
        Ok(changed)
    }
}

#[tonic::async_trait]
impl Mgmtd for MgmtdApi {
    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        self.metrics
            .requests
            .timed("heartbeat", async move {
                if let Some(status) = self.not_leader() {
                    return Err(status);
                }
                let beat = request.into_inner();
                if beat.node_id == 0 {
                    return Err(Status::invalid_argument("node id 0 is invalid"));
                }
                {
                    let mut live = self.live();
                    live.nodes.insert(beat.node_id, Instant::now());
                    for target in &beat.targets {
                        if let Some(state) = to_local(target.state) {
                            live.targets.insert(target.target_id, state);
                        }
                        live.space
                            .insert(target.target_id, (target.capacity_bytes, target.free_bytes));
                    }
                }
                // Registration goes through raft only when something is new.
                let routing = self.routing().await.map_err(status)?;
                let node = Node {
                    id: beat.node_id,
                    kind: beat.kind,
                    addr: beat.addr.clone(),
                    hostname: beat.hostname.clone(),
                };
                let mut version = routing.version;
                if !routing.nodes.contains(&node) {
                    version = self.propose(command::Op::RegisterNode(node)).await?;
                }
                let unknown: Vec<Target> = beat
                    .targets
                    .iter()
                    .filter(|t| {
                        !routing
                            .targets
                            .iter()
                            .any(|known| known.id == t.target_id && known.path == t.path)
                    })
                    .map(|t| Target {
                        id: t.target_id,
                        node_id: beat.node_id,
                        path: t.path.clone(),
                        admin_offline: false,
                    })
                    .collect();
                if !unknown.is_empty() {
                    version = self
                        .propose(command::Op::RegisterTargets(RegisterTargets {
                            targets: unknown,
                        }))
                        .await?;
                }
                Ok(Response::new(HeartbeatReply {
                    routing_version: version,
                    lease_ms: self.lease.as_millis() as u64,
                }))
            })
            .await
    }

    async fn get_routing(
        &self,
        request: Request<GetRoutingRequest>,
    ) -> Result<Response<RoutingInfo>, Status> {
        self.metrics
            .requests
            .timed("get_routing", async move {
                let known = request.into_inner().known_version;
                let routing = self
                    .node
                    .read_with(
                        Query {
                            known_version: known,
                        },
                        Consistency::Local,
                    )
                    .await
                    .map_err(status)?;
                Ok(Response::new(routing))
            })
            .await
    }

    async fn create_chains(
        &self,
        request: Request<CreateChainsRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        self.metrics
            .requests
            .timed("create_chains", async move {
                self.propose(command::Op::CreateChains(request.into_inner()))
                    .await?;
                self.admin_reply().await
            })
            .await
    }

    async fn create_chain_table(
        &self,
        request: Request<CreateChainTableRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        self.metrics
            .requests
            .timed("create_chain_table", async move {
                self.propose(command::Op::CreateChainTable(request.into_inner()))
                    .await?;
                self.admin_reply().await
            })
            .await
    }

    async fn bootstrap(
        &self,
        request: Request<BootstrapRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        self.metrics
            .requests
            .timed("bootstrap", async move {
                self.propose(command::Op::Bootstrap(request.into_inner()))
                    .await?;
                self.admin_reply().await
            })
            .await
    }

    async fn set_target_offline(
        &self,
        request: Request<SetTargetOfflineRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        self.metrics
            .requests
            .timed("set_target_offline", async move {
                self.propose(command::Op::SetTargetOffline(request.into_inner()))
                    .await?;
                self.admin_reply().await
            })
            .await
    }

    async fn list_nodes(
        &self,
        _request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesReply>, Status> {
        self.metrics
            .requests
            .timed("list_nodes", async move {
                if let Some(status) = self.not_leader() {
                    return Err(status);
                }
                let routing = self.routing().await.map_err(status)?;
                let now = Instant::now();
                let live = self.live();
                let nodes = routing
                    .nodes
                    .iter()
                    .map(|node| {
                        let seen = live.nodes.get(&node.id).map(|t| now.duration_since(*t));
                        NodeStatus {
                            node: Some(node.clone()),
                            last_heartbeat_ms_ago: seen.map(|d| d.as_millis() as u64),
                            alive: seen.is_some_and(|d| d <= self.lease),
                        }
                    })
                    .collect();
                let targets = live
                    .targets
                    .iter()
                    .map(|(id, state)| {
                        let (capacity_bytes, free_bytes) =
                            live.space.get(id).copied().unwrap_or_default();
                        TargetStatus {
                            target_id: *id,
                            local_state: to_wire_local(*state),
                            capacity_bytes,
                            free_bytes,
                        }
                    })
                    .collect();
                Ok(Response::new(ListNodesReply { nodes, targets }))
            })
            .await
    }
}
