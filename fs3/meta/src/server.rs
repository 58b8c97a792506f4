//! One meta replica: an ff-raft daemon with the meta API, its heartbeats to mgmtd, and the
//! leader's housekeeping.

use std::sync::Arc;
use std::time::Duration;

use ff_raft::{Daemon, DaemonError};
use fs3_client::{ChunkClient, RoutingCache};
use fs3_proto::meta::meta_server::MetaServer;
use tokio::task::JoinHandle;

use crate::config::MetaConfig;
use crate::machine::MetaMachine;
use crate::metrics::MetaMetrics;
use ff_rpc::tokens::admin_token;

use crate::service::MetaApi;

/// How long meta's own storage calls (truncates, garbage collection) may retry.
const STORAGE_DEADLINE: Duration = Duration::from_secs(30);

/// Why a meta replica could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The raft daemon did not start.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The administrator's token file could not be read or created.
    #[error("admin token file {path}: {cause}")]
    Token {
        /// The file.
        path: String,
        /// What went wrong.
        cause: std::io::Error,
    },
    /// The mgmtd addresses are unusable.
    #[error("mgmtd: {0}")]
    Mgmtd(String),
    /// The data transport cannot run as configured (`[net]`).
    #[error("net: {0}")]
    Net(String),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A running meta replica.
pub struct Meta {
    daemon: Daemon<MetaMachine>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meta")
            .field("addr", &self.daemon.addr())
            .finish()
    }
}

impl Meta {
    /// Starts a replica. `config` must be validated.
    pub async fn start(config: MetaConfig) -> Result<Meta, MetaError> {
        let token_path = config.admin_token_path();
        let single_replica = config.raft.initial_members.len() <= 1;
        let token =
            admin_token(&token_path, single_replica, "fs3 admin new-token").map_err(|cause| {
                MetaError::Token {
                    path: token_path.display().to_string(),
                    cause,
                }
            })?;
        let routing = Arc::new(
            RoutingCache::new(config.mgmtd.clone()).map_err(|e| MetaError::Mgmtd(e.to_string()))?,
        );
        let net = Arc::new(
            ff_net::NetClient::new(config.net.clone())
                .map_err(|e| MetaError::Net(e.to_string()))?,
        );
        let chunks = Arc::new(ChunkClient::new(routing, net, STORAGE_DEADLINE));
        let mut api_slot = None;
        let mut metrics_error = None;
        let auth = config.auth;
        let daemon = Daemon::start(
            &config.listen_addr,
            &config.metrics_addr,
            config.raft.clone(),
            MetaMachine,
            |node, registry, router| match MetaMetrics::register(registry) {
                Ok(metrics) => {
                    let api = MetaApi::new(
                        node.clone(),
                        auth,
                        &token,
                        chunks,
                        metrics,
                        config.session_lease.get(),
                    );
                    api_slot = Some(api.clone());
                    router.add_service(MetaServer::new(api))
                }
                Err(error) => {
                    metrics_error = Some(error);
                    router
                }
            },
        )
        .await?;
        let api = match (api_slot, metrics_error) {
            (Some(api), _) => api,
            (None, Some(error)) => {
                daemon.shutdown().await;
                return Err(MetaError::Metrics(error));
            }
            (None, None) => unreachable!("the service closure always runs"),
        };
        let tasks = vec![
            tokio::spawn(crate::maintenance::heartbeats(
                api.clone(),
                config.node_id,
                config.raft.advertise_addr.clone(),
                config.heartbeat_interval.get(),
            )),
            tokio::spawn(crate::maintenance::run(
                api.clone(),
                config.maintenance_interval.get(),
            )),
            tokio::spawn(crate::maintenance::collect(
                api,
                config.maintenance_interval.get(),
                config.gc_delay.get(),
            )),
        ];
        Ok(Meta { daemon, tasks })
    }

    /// The raft daemon.
    pub fn daemon(&self) -> &Daemon<MetaMachine> {
        &self.daemon
    }

    /// Stops the background tasks, then the daemon.
    pub async fn shutdown(self) {
        for task in &self.tasks {
            task.abort();
        }
        self.daemon.shutdown().await;
    }
}
