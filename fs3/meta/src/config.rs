//! Configuration of one meta replica; the commented defaults are in `deploy/config/fs3-meta.toml`.

use std::path::PathBuf;

use ff_config::{
    ConfigError, DaemonConfig, Duration, ensure, ensure_host_port, ensure_socket_addr,
};
use ff_raft::RaftConfig;
use serde::{Deserialize, Serialize};

/// Configuration of one meta replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetaConfig {
    /// Address the gRPC server binds (meta API and raft).
    pub listen_addr: String,
    /// Address of the Prometheus endpoint; empty disables it.
    pub metrics_addr: String,
    /// This replica's node id at mgmtd.
    pub node_id: u64,
    /// mgmtd replicas.
    pub mgmtd: Vec<String>,
    /// How often meta heartbeats mgmtd.
    pub heartbeat_interval: Duration,
    /// Require a token from every client.
    pub auth: bool,
    /// The administrator's token file (relative: under `raft.data_dir`).
    pub admin_token_file: PathBuf,
    /// A client silent for this long loses its write sessions.
    pub session_lease: Duration,
    /// How long unlinked files keep their chunks.
    pub gc_delay: Duration,
    /// How often the leader collects garbage, expires sessions and copies chain tables.
    pub maintenance_interval: Duration,
    /// Chunk data to storage (truncates, garbage collection).
    pub net: ff_net::NetConfig,
    /// The raft group of the meta replicas.
    pub raft: RaftConfig,
}

impl Default for MetaConfig {
    fn default() -> Self {
        MetaConfig {
            listen_addr: "127.0.0.1:8100".to_string(),
            metrics_addr: "127.0.0.1:9810".to_string(),
            node_id: 101,
            mgmtd: vec!["127.0.0.1:8000".to_string()],
            heartbeat_interval: Duration::secs(1),
            auth: true,
            admin_token_file: "admin.token".into(),
            session_lease: Duration::secs(60),
            gc_delay: Duration::secs(300),
            maintenance_interval: Duration::secs(1),
            net: ff_net::NetConfig::default(),
            raft: RaftConfig {
                cluster: "fs3-meta".to_string(),
                data_dir: "data/meta".into(),
                advertise_addr: "127.0.0.1:8100".to_string(),
                initial_members: vec![ff_raft::MemberConfig {
                    id: 1,
                    addr: "127.0.0.1:8100".to_string(),
                }],
                ..RaftConfig::default()
            },
        }
    }
}

impl MetaConfig {
    /// Where the administrator's token lives.
    pub fn admin_token_path(&self) -> PathBuf {
        // `join` keeps an absolute path as it is.
        self.raft.data_dir.join(&self.admin_token_file)
    }
}

impl DaemonConfig for MetaConfig {
    const ENV_PREFIX: &'static str = "FS3_META";
    const TEMPLATE: &'static str = include_str!("../../../deploy/config/fs3-meta.toml");

    fn validate(&self) -> Result<(), ConfigError> {
        ensure_socket_addr(&self.listen_addr, "listen_addr", false)?;
        ensure_socket_addr(&self.metrics_addr, "metrics_addr", true)?;
        ensure(self.node_id != 0, "node_id", "must not be 0")?;
        self.net.validate("net")?;
        ensure(
            !self.mgmtd.is_empty(),
            "mgmtd",
            "needs at least one address",
        )?;
        for addr in &self.mgmtd {
            ensure_host_port(addr, "mgmtd")?;
        }
        ensure(
            !self.heartbeat_interval.get().is_zero(),
            "heartbeat_interval",
            "must be above 0",
        )?;
        ensure(
            self.session_lease.get() >= std::time::Duration::from_secs(1),
            "session_lease",
            "must be at least 1s",
        )?;
        ensure(
            !self.maintenance_interval.get().is_zero(),
            "maintenance_interval",
            "must be above 0",
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
        ff_config::check_template::<MetaConfig>().unwrap();
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let mut config = MetaConfig {
            node_id: 0,
            ..MetaConfig::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("node_id")
        );
        config.node_id = 5;
        config.mgmtd = vec!["nowhere".to_string()];
        assert!(config.validate().unwrap_err().to_string().contains("mgmtd"));
    }
}
