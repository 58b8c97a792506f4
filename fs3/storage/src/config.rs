//! Configuration of one storage daemon; the commented defaults are in
//! `deploy/config/fs3-storage.toml`.

use std::path::PathBuf;

use ff_config::{
    ConfigError, DaemonConfig, Duration, ensure, ensure_host_port, ensure_socket_addr,
};
use ff_net::NetConfig;
use serde::{Deserialize, Serialize};

use crate::engine::EngineConfig;

/// Configuration of one storage daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// This service's node id, unique in the cluster, never 0.
    pub node_id: u64,
    /// Address the data service (ff-net) binds; clients and other storage services connect here.
    pub listen_addr: String,
    /// Address clients and other storage services dial (`host:port`, a DNS name or an IP),
    /// told to mgmtd; empty: `listen_addr`, which must then not be a wildcard like 0.0.0.0.
    pub advertise_addr: String,
    /// Address of the Prometheus endpoint; empty disables it.
    pub metrics_addr: String,
    /// mgmtd replicas (`host:port`).
    pub mgmtd: Vec<String>,
    /// How often to send heartbeats to mgmtd (well below mgmtd's lease).
    pub heartbeat_interval: Duration,
    /// Without a successful heartbeat for this long the service stops serving: mgmtd may have
    /// moved its targets out of their chains (half of mgmtd's lease).
    pub isolation_timeout: Duration,
    /// The targets (one disk directory each) this service keeps.
    pub targets: Vec<TargetConfig>,
    /// Chunk engine settings, for every target.
    pub engine: EngineConfig,
    /// Data transport settings.
    pub net: NetConfig,
}

/// One target of a storage service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// The target's id, unique in the cluster, never 0.
    pub id: u64,
    /// Directory on the target's disk.
    pub path: PathBuf,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            node_id: 1,
            listen_addr: "127.0.0.1:8100".to_string(),
            advertise_addr: String::new(),
            metrics_addr: "127.0.0.1:9900".to_string(),
            mgmtd: vec!["127.0.0.1:8000".to_string()],
            heartbeat_interval: Duration::secs(1),
            isolation_timeout: Duration::millis(2500),
            targets: vec![TargetConfig {
                id: 101,
                path: PathBuf::from("data/storage/101"),
            }],
            engine: EngineConfig::default(),
            net: NetConfig::default(),
        }
    }
}

impl DaemonConfig for StorageConfig {
    const ENV_PREFIX: &'static str = "FS3_STORAGE";
    const TEMPLATE: &'static str = include_str!("../../../deploy/config/fs3-storage.toml");

    fn validate(&self) -> Result<(), ConfigError> {
        ensure(self.node_id != 0, "node_id", "must not be 0")?;
        ensure_socket_addr(&self.listen_addr, "listen_addr", false)?;
        if self.advertise_addr.is_empty() {
            let wildcard = self
                .listen_addr
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| a.ip().is_unspecified());
            ensure(
                !wildcard,
                "advertise_addr",
                format!(
                    "must be set when listen_addr ({}) is a wildcard: other machines cannot dial it",
                    self.listen_addr
                ),
            )?;
        } else {
            ensure_host_port(&self.advertise_addr, "advertise_addr")?;
        }
        ensure_socket_addr(&self.metrics_addr, "metrics_addr", true)?;
        ensure(!self.mgmtd.is_empty(), "mgmtd", "lists no mgmtd replica")?;
        for addr in &self.mgmtd {
            ensure_host_port(addr, "mgmtd")?;
        }
        ensure(
            !self.heartbeat_interval.get().is_zero(),
            "heartbeat_interval",
            "must not be 0",
        )?;
        ensure(
            self.isolation_timeout.get() > self.heartbeat_interval.get(),
            "isolation_timeout",
            format!(
                "must exceed heartbeat_interval ({})",
                self.heartbeat_interval
            ),
        )?;
        ensure(!self.targets.is_empty(), "targets", "lists no target")?;
        let mut ids = std::collections::HashSet::new();
        let mut paths = std::collections::HashSet::new();
        for target in &self.targets {
            ensure(target.id != 0, "targets", "target id 0 is invalid")?;
            ensure(
                ids.insert(target.id),
                "targets",
                format!("target {} is listed twice", target.id),
            )?;
            ensure(
                paths.insert(target.path.clone()),
                "targets",
                format!("two targets share {}", target.path.display()),
            )?;
        }
        self.engine.validate("engine")?;
        self.net.validate("net")?;
        ensure(
            self.net.max_payload.bytes() >= self.engine.max_chunk_size.bytes(),
            "net.max_payload",
            format!(
                "must hold a whole chunk (engine.max_chunk_size = {})",
                self.engine.max_chunk_size
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_documents_the_defaults() {
        ff_config::check_template::<StorageConfig>().unwrap();
    }

    #[test]
    fn a_wildcard_listen_address_needs_an_address_to_advertise() {
        let mut config = StorageConfig {
            listen_addr: "0.0.0.0:8100".to_string(),
            ..StorageConfig::default()
        };
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("advertise_addr"), "{error}");
        config.advertise_addr = "fs3-storage-0.fs3-storage:8100".to_string();
        config.mgmtd = vec!["fs3-mgmtd-0.fs3-mgmtd.fireflyer.svc:8000".to_string()];
        config.validate().unwrap();
        config.advertise_addr = "storage-0".to_string();
        assert!(config.validate().is_err());
        config.advertise_addr = String::new();
        config.listen_addr = "10.0.0.5:8100".to_string();
        config.validate().unwrap();
    }
}
