//! A storage daemon: opens its targets, serves the data service over ff-net, heartbeats mgmtd
//! (reporting each target's local state), follows routing changes, and drives recovery.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ff_metrics::MetricsServer;
use ff_net::{NetClient, Server};
use fs3_client::RoutingCache;
use fs3_proto::mgmtd::mgmtd_client::MgmtdClient;
use fs3_proto::mgmtd::{HeartbeatRequest, NodeKind, TargetReport};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::StorageConfig;
use crate::engine::{ChunkEngine, EngineError};
use crate::metrics::StorageMetrics;
use crate::recovery::{Syncs, local_state, start_syncs, update_phases};
use crate::service::{Phase, Storage, StorageHandler, Target};

/// Why a storage daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A target could not be opened.
    #[error("target {target} at {path}: {cause}")]
    Target {
        /// The target.
        target: u64,
        /// Its directory.
        path: String,
        /// Why.
        cause: EngineError,
    },
    /// The data address could not be bound.
    #[error("cannot listen on {addr}: {cause}")]
    Bind {
        /// The address.
        addr: String,
        /// What the operating system said.
        cause: std::io::Error,
    },
    /// Something else.
    #[error("{0}")]
    Other(String),
}

/// A running storage daemon.
pub struct StorageDaemon {
    storage: Arc<Storage>,
    server: Server,
    metrics: Option<MetricsServer>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for StorageDaemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageDaemon")
            .field("node", &self.storage.node_id)
            .field("addr", &self.server.local_addr())
            .finish()
    }
}

impl StorageDaemon {
    /// Opens the targets, binds, and starts serving and heartbeating. `config` must be
    /// validated.
    pub async fn start(config: StorageConfig) -> Result<StorageDaemon, StartError> {
        let listener = TcpListener::bind(&config.listen_addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen_addr.clone(),
                cause: source,
            })?;
        let mut targets = BTreeMap::new();
        for target in &config.targets {
            let engine_config = config.engine.clone();
            let path = target.path.clone();
            let engine =
                tokio::task::spawn_blocking(move || ChunkEngine::open(&path, &engine_config))
                    .await
                    .map_err(|e| StartError::Other(format!("opening target {}: {e}", target.id)))?
                    .map_err(|source| StartError::Target {
                        target: target.id,
                        path: target.path.display().to_string(),
                        cause: source,
                    })?;
            targets.insert(
                target.id,
                Arc::new(Target {
                    id: target.id,
                    path: target.path.clone(),
                    engine,
                    phase: Mutex::new(Phase::Starting),
                }),
            );
        }
        let registry = Registry::new();
        let metrics = StorageMetrics::register(&registry)
            .map_err(|e| StartError::Other(format!("metrics: {e}")))?;
        let routing = Arc::new(
            RoutingCache::new(config.mgmtd.clone())
                .map_err(|e| StartError::Other(e.to_string()))?,
        );
        let storage = Arc::new(Storage {
            node_id: config.node_id,
            targets,
            routing,
            net: Arc::new(
                NetClient::new(config.net.clone()).map_err(|e| StartError::Other(e.to_string()))?,
            ),
            locks: Default::default(),
            repairs: Default::default(),
            last_heartbeat: Mutex::new(None),
            isolation_timeout: config.isolation_timeout.get(),
            forward_timeout: config.net.request_timeout.get().mul_f64(0.6),
            metrics,
        });
        let server = Server::start(
            listener,
            Arc::new(StorageHandler(storage.clone())),
            &config.net,
        )
        .map_err(|source| StartError::Bind {
            addr: config.listen_addr.clone(),
            cause: source,
        })?;
        let metrics = if config.metrics_addr.is_empty() {
            None
        } else {
            Some(
                MetricsServer::start(&config.metrics_addr, registry)
                    .await
                    .map_err(|e| StartError::Other(e.to_string()))?,
            )
        };
        let advertised = if config.advertise_addr.is_empty() {
            server.local_addr().to_string()
        } else {
            config.advertise_addr.clone()
        };
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let tasks = vec![
            tokio::spawn(heartbeats(
                storage.clone(),
                advertised,
                hostname,
                config.heartbeat_interval.get(),
            )),
            tokio::spawn(recovery(
                storage.clone(),
                config
                    .heartbeat_interval
                    .get()
                    .min(Duration::from_millis(500)),
            )),
        ];
        tracing::info!(node = config.node_id, addr = %server.local_addr(), targets = config.targets.len(), "storage serving");
        Ok(StorageDaemon {
            storage,
            server,
            metrics,
            tasks,
        })
    }

    /// The data service's address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.local_addr()
    }

    /// The metrics endpoint, if enabled.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// The shared state (for in-process inspection).
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// Stops heartbeating and serving.
    pub async fn shutdown(self) {
        for task in &self.tasks {
            task.abort();
        }
        self.server.shutdown();
        if let Some(metrics) = self.metrics {
            metrics.shutdown().await;
        }
    }
}

/// Heartbeats mgmtd every `interval`, reporting local target states, and refreshes routing
/// when mgmtd's version moved.
async fn heartbeats(storage: Arc<Storage>, addr: String, hostname: String, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        storage
            .metrics
            .set_peer_connections(storage.net.connections().await);
        // Until routing is known, a target's phase (and so what it reports) is a guess: a
        // starting target reports itself offline, and mgmtd would take it out of a chain it
        // was just put in. Learn the routing first.
        if !storage.routing.current().from_mgmtd() {
            match storage.routing.refresh().await {
                Ok(routing) => update_phases(&storage, &routing),
                Err(error) => {
                    tracing::warn!(%error, "cannot fetch routing from mgmtd");
                    continue;
                }
            }
        }
        let request = HeartbeatRequest {
            node_id: storage.node_id,
            kind: NodeKind::Storage as i32,
            addr: addr.clone(),
            hostname: hostname.clone(),
            targets: storage
                .targets
                .values()
                .map(|t| {
                    let (capacity_bytes, free_bytes) = disk_space(&t.path);
                    storage.metrics.set_disk(t.id, capacity_bytes, free_bytes);
                    TargetReport {
                        target_id: t.id,
                        state: local_state(t.phase()) as i32,
                        path: t.path.display().to_string(),
                        capacity_bytes,
                        free_bytes,
                    }
                })
                .collect(),
        };
        // mgmtd starts the lease when it receives the heartbeat, so the isolation clock starts
        // no later than the sending.
        let sent = Instant::now();
        let reply = storage
            .routing
            .mgmtd()
            .call(|channel| {
                let request = request.clone();
                async move { MgmtdClient::new(channel).heartbeat(request).await }
            })
            .await;
        match reply {
            Ok(reply) => {
                *storage
                    .last_heartbeat
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(sent);
                let known = storage.routing.current().version();
                if reply.routing_version != known {
                    match storage.routing.refresh_after(known).await {
                        Ok(routing) => update_phases(&storage, &routing),
                        Err(error) => tracing::warn!(%error, "cannot refresh routing"),
                    }
                }
            }
            Err(status) => tracing::warn!(error = %status.message(), "heartbeat to mgmtd failed"),
        }
    }
}

/// Starts syncs for syncing successors of local serving targets.
async fn recovery(storage: Arc<Storage>, interval: Duration) {
    let syncs = Arc::new(Syncs::default());
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        update_phases(&storage, &storage.routing.current());
        start_syncs(&storage, &syncs);
    }
}

/// Size and free space (for unprivileged users) of the filesystem holding `path`; zeros when
/// it cannot be read (the report then says nothing about space).
fn disk_space(path: &std::path::Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(path) {
        Ok(vfs) => {
            let unit = vfs.fragment_size();
            (
                vfs.blocks().saturating_mul(unit),
                vfs.blocks_available().saturating_mul(unit),
            )
        }
        Err(_) => (0, 0),
    }
}
