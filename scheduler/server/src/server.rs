//! One hai server replica: an ff-raft daemon serving the `Hai` and `Agent` APIs, and the
//! leader's scheduling loop.

use std::time::Duration;

use ff_raft::{Daemon, DaemonError};
use hai_proto::agent_server::AgentServer;
use hai_proto::hai_server::HaiServer;
use tokio::task::JoinHandle;

use crate::config::ServerConfig;
use crate::machine::HaiMachine;
use crate::metrics::HaiMetrics;
use crate::service::HaiApi;

/// Why a replica could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
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
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A running replica.
pub struct Server {
    daemon: Daemon<HaiMachine>,
    api: HaiApi,
    scheduler: JoinHandle<()>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.daemon.addr())
            .finish()
    }
}

impl Server {
    /// Starts a replica. `config` must be validated.
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        let token_path = config.admin_token_path();
        let single_replica = config.raft.initial_members.len() <= 1;
        let token = ff_rpc::tokens::admin_token(&token_path, single_replica, "hai admin new-token")
            .map_err(|cause| ServerError::Token {
                path: token_path.display().to_string(),
                cause,
            })?;
        let lease: Duration = config.node_lease.get();
        let mut api_slot = None;
        let mut metrics_error = None;
        let daemon = Daemon::start(
            &config.listen_addr,
            &config.metrics_addr,
            config.raft.clone(),
            HaiMachine,
            |node, registry, router| match HaiMetrics::register(registry) {
                Ok(metrics) => {
                    let api = HaiApi::new(
                        node.clone(),
                        token.clone(),
                        lease,
                        config.job_retention.get(),
                        metrics,
                    );
                    api_slot = Some(api.clone());
                    router
                        .add_service(HaiServer::new(api.clone()))
                        .add_service(AgentServer::new(api))
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
                return Err(ServerError::Metrics(error));
            }
            (None, None) => unreachable!("the service closure always runs"),
        };
        let scheduler = tokio::spawn(api.clone().run_scheduler(config.schedule_interval.get()));
        Ok(Server {
            daemon,
            api,
            scheduler,
        })
    }

    /// The raft daemon.
    pub fn daemon(&self) -> &Daemon<HaiMachine> {
        &self.daemon
    }

    /// The API (for in-process use and tests).
    pub fn api(&self) -> &HaiApi {
        &self.api
    }

    /// Stops the scheduling loop, then the daemon.
    pub async fn shutdown(self) {
        self.scheduler.abort();
        self.daemon.shutdown().await;
    }
}
