//! One meta replica: an ff-raft daemon with the meta API, its heartbeats to mgmtd, and the
//! leader's housekeeping.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ff_raft::{Daemon, DaemonError};
use fs3_client::{ChunkClient, RoutingCache};
use fs3_proto::meta::meta_server::MetaServer;
use tokio::task::JoinHandle;

use crate::config::MetaConfig;
use crate::machine::MetaMachine;
use crate::metrics::MetaMetrics;
use crate::service::{MetaApi, new_token};

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

/// Reads the administrator's token from `path`. A single-replica group creates it (mode 0600)
/// if missing; the replicas of a larger group must all be given the same file, since any of
/// them may judge a request.
pub fn admin_token(path: &Path, may_create: bool) -> Result<String, std::io::Error> {
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_string()),
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the file is empty; delete it to have a new token made",
            ));
        }
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        Err(_) if !may_create => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "missing; a group of several meta replicas needs one token shared by all: \
                 make one with `fs3 admin new-token > FILE` and give every replica that file",
            ));
        }
        Err(_) => {}
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let token = new_token();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(file, "{token}")?;
    file.sync_all()?;
    Ok(token)
}

impl Meta {
    /// Starts a replica. `config` must be validated.
    pub async fn start(config: MetaConfig) -> Result<Meta, MetaError> {
        let token_path = config.admin_token_path();
        let single_replica = config.raft.initial_members.len() <= 1;
        let token = admin_token(&token_path, single_replica).map_err(|cause| MetaError::Token {
            path: token_path.display().to_string(),
            cause,
        })?;
        let routing = Arc::new(
            RoutingCache::new(config.mgmtd.clone()).map_err(|e| MetaError::Mgmtd(e.to_string()))?,
        );
        let net = Arc::new(ff_net::NetClient::new(ff_net::NetConfig::default()));
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
                    let api = MetaApi::new(node.clone(), auth, &token, chunks, metrics);
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
                config.session_lease.get(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_replica_makes_its_token_and_a_group_must_be_given_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("admin.token");
        let refused = admin_token(&path, false).unwrap_err().to_string();
        assert!(refused.contains("fs3 admin new-token"), "{refused}");
        assert!(!path.exists());
        let made = admin_token(&path, true).unwrap();
        assert_eq!(made.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert_eq!(
            admin_token(&path, false).unwrap(),
            made,
            "read back, not remade"
        );
        std::fs::write(&path, "  \n").unwrap();
        assert!(
            admin_token(&path, true).is_err(),
            "an empty file is refused"
        );
    }
}
