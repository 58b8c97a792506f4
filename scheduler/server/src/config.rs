//! Configuration of one hai server replica; the commented defaults are in
//! `deploy/config/hai-server.toml`.

use std::path::PathBuf;

use ff_config::{ConfigError, DaemonConfig, Duration, ensure, ensure_socket_addr};
use ff_raft::RaftConfig;
use serde::{Deserialize, Serialize};

/// Configuration of one hai server replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the gRPC server binds (hai API, agent API and raft).
    pub listen_addr: String,
    /// Address of the Prometheus endpoint; empty disables it.
    pub metrics_addr: String,
    /// The administrator's token file (relative: under `raft.data_dir`).
    pub admin_token_file: PathBuf,
    /// An agent silent for this long has its node marked down and its jobs stopped.
    pub node_lease: Duration,
    /// How often the leader's scheduling loop runs when nothing wakes it sooner.
    pub schedule_interval: Duration,
    /// How long ended jobs are kept (for `hai jobs --all`, `hai show`, `hai logs`) before the
    /// leader forgets them; 0 keeps them forever.
    pub job_retention: Duration,
    /// The raft group of the hai servers.
    pub raft: RaftConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen_addr: "127.0.0.1:8300".to_string(),
            metrics_addr: "127.0.0.1:9830".to_string(),
            admin_token_file: "admin.token".into(),
            node_lease: Duration::secs(10),
            schedule_interval: Duration::millis(500),
            job_retention: Duration::secs(7 * 24 * 3600),
            raft: RaftConfig {
                cluster: "hai".to_string(),
                data_dir: "data/hai".into(),
                advertise_addr: "127.0.0.1:8300".to_string(),
                initial_members: vec![ff_raft::MemberConfig {
                    id: 1,
                    addr: "127.0.0.1:8300".to_string(),
                }],
                ..RaftConfig::default()
            },
        }
    }
}

impl ServerConfig {
    /// Where the administrator's token lives.
    pub fn admin_token_path(&self) -> PathBuf {
        // `join` keeps an absolute path as it is.
        self.raft.data_dir.join(&self.admin_token_file)
    }
}

impl DaemonConfig for ServerConfig {
    const ENV_PREFIX: &'static str = "HAI_SERVER";
    const TEMPLATE: &'static str = include_str!("../../../deploy/config/hai-server.toml");

    fn validate(&self) -> Result<(), ConfigError> {
        ensure_socket_addr(&self.listen_addr, "listen_addr", false)?;
        ensure_socket_addr(&self.metrics_addr, "metrics_addr", true)?;
        ensure(
            self.node_lease.get() >= std::time::Duration::from_millis(500),
            "node_lease",
            "must be at least 500ms",
        )?;
        ensure(
            !self.schedule_interval.get().is_zero()
                && self.schedule_interval.get() <= std::time::Duration::from_secs(60),
            "schedule_interval",
            "must be above 0 and at most 1m",
        )?;
        ensure(
            self.job_retention.get().is_zero()
                || self.job_retention.get() >= std::time::Duration::from_secs(1),
            "job_retention",
            "must be 0 (keep forever) or at least 1s",
        )?;
        ensure(
            !self.admin_token_file.as_os_str().is_empty(),
            "admin_token_file",
            "must name a file",
        )?;
        self.raft.validate("raft")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_documents_the_defaults() {
        ff_config::check_template::<ServerConfig>().unwrap();
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let config = ServerConfig {
            node_lease: Duration::millis(10),
            ..ServerConfig::default()
        };
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("node_lease"), "{error}");
    }
}
