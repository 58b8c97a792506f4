//! The routing information from mgmtd, indexed for lookups, and a cache that refreshes it when
//! a chain version turns out to be stale.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ff_rpc::{ClientOptions, LeaderClient};
use fs3_proto::mgmtd::mgmtd_client::MgmtdClient;
use fs3_proto::mgmtd::{
    Chain, ChainTable, GetRoutingRequest, Node, PublicState, RoutingInfo, Target,
};

use crate::ClientError;

/// One version of the routing information.
#[derive(Debug, Default)]
pub struct Routing {
    info: RoutingInfo,
    chains: HashMap<u64, usize>,
    targets: HashMap<u64, usize>,
    nodes: HashMap<u64, usize>,
    from_mgmtd: bool,
}

impl Routing {
    /// Indexes `info`.
    pub fn new(info: RoutingInfo) -> Routing {
        let chains = info
            .chains
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id, i))
            .collect();
        let targets = info
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id, i))
            .collect();
        let nodes = info
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id, i))
            .collect();
        Routing {
            info,
            chains,
            targets,
            nodes,
            from_mgmtd: true,
        }
    }

    /// Whether this came from mgmtd (an empty cache's routing did not; an empty cluster's
    /// routing, version 0, did).
    pub fn from_mgmtd(&self) -> bool {
        self.from_mgmtd
    }

    /// The routing version.
    pub fn version(&self) -> u64 {
        self.info.version
    }

    /// Everything, as mgmtd sent it.
    pub fn info(&self) -> &RoutingInfo {
        &self.info
    }

    /// A chain.
    pub fn chain(&self, id: u64) -> Option<&Chain> {
        self.chains.get(&id).map(|i| &self.info.chains[*i])
    }

    /// A chain table.
    pub fn table(&self, id: u64) -> Option<&ChainTable> {
        self.info.tables.iter().find(|t| t.id == id)
    }

    /// A target.
    pub fn target(&self, id: u64) -> Option<&Target> {
        self.targets.get(&id).map(|i| &self.info.targets[*i])
    }

    /// A node.
    pub fn node(&self, id: u64) -> Option<&Node> {
        self.nodes.get(&id).map(|i| &self.info.nodes[*i])
    }

    /// The data address of the service holding `target`.
    pub fn target_addr(&self, target: u64) -> Option<&str> {
        let node = self.target(target)?.node_id;
        self.node(node).map(|n| n.addr.as_str())
    }

    /// The chain holding `target` and the target's public state in it.
    pub fn chain_of(&self, target: u64) -> Option<(&Chain, PublicState)> {
        self.info.chains.iter().find_map(|c| {
            c.targets.iter().find(|t| t.target_id == target).map(|t| {
                (
                    c,
                    PublicState::try_from(t.state).unwrap_or(PublicState::Offline),
                )
            })
        })
    }
}

/// The targets of a chain in write order (serving, then syncing).
pub fn write_path(chain: &Chain) -> Vec<u64> {
    chain
        .targets
        .iter()
        .filter(|t| {
            matches!(
                PublicState::try_from(t.state),
                Ok(PublicState::Serving | PublicState::Syncing)
            )
        })
        .map(|t| t.target_id)
        .collect()
}

/// The targets of a chain that serve reads.
pub fn readable(chain: &Chain) -> Vec<u64> {
    chain
        .targets
        .iter()
        .filter(|t| t.state == PublicState::Serving as i32)
        .map(|t| t.target_id)
        .collect()
}

/// The latest routing known, refreshed from mgmtd on demand.
pub struct RoutingCache {
    mgmtd: LeaderClient,
    current: RwLock<Arc<Routing>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for RoutingCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutingCache")
            .field("version", &self.current().version())
            .finish()
    }
}

impl RoutingCache {
    /// A cache over the mgmtd replicas at `endpoints`; nothing is fetched yet.
    pub fn new(endpoints: Vec<String>) -> Result<RoutingCache, ClientError> {
        let options = ClientOptions {
            total_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_millis(500),
            ..ClientOptions::default()
        };
        let mgmtd =
            LeaderClient::new(endpoints, options).map_err(|e| ClientError::Mgmtd(e.to_string()))?;
        Ok(RoutingCache {
            mgmtd,
            current: RwLock::new(Arc::new(Routing::default())),
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    /// The mgmtd client (for heartbeats and admin calls).
    pub fn mgmtd(&self) -> &LeaderClient {
        &self.mgmtd
    }

    /// The latest routing fetched.
    pub fn current(&self) -> Arc<Routing> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Fetches routing newer than `seen` (the version the caller found stale), unless another
    /// caller already did.
    pub async fn refresh_after(&self, seen: u64) -> Result<Arc<Routing>, ClientError> {
        let _one_at_a_time = self.refreshing.lock().await;
        let current = self.current();
        if current.version() > seen {
            return Ok(current);
        }
        let known = current.version();
        let info = self
            .mgmtd
            .call(|channel| async move {
                MgmtdClient::new(channel)
                    .get_routing(GetRoutingRequest {
                        known_version: known,
                    })
                    .await
            })
            .await
            .map_err(|s| ClientError::Mgmtd(s.message().to_string()))?;
        // A lagging mgmtd replica may know less than we do: routing never goes back.
        if !info.changed || (current.from_mgmtd() && info.version < current.version()) {
            return Ok(current);
        }
        let routing = Arc::new(Routing::new(info));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = routing.clone();
        Ok(routing)
    }

    /// Fetches the latest routing.
    pub async fn refresh(&self) -> Result<Arc<Routing>, ClientError> {
        self.refresh_after(self.current().version()).await
    }
}
