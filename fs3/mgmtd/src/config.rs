//! Configuration of one mgmtd replica; the commented defaults are in `deploy/config/fs3-mgmtd.toml`.

use ff_config::{ConfigError, DaemonConfig, Duration, ensure, ensure_socket_addr};
use ff_raft::RaftConfig;
use serde::{Deserialize, Serialize};

/// Configuration of one mgmtd replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MgmtdConfig {
    /// Address the gRPC server binds (mgmtd API and raft).
    pub listen_addr: String,
    /// Address of the Prometheus endpoint; empty disables it.
    pub metrics_addr: String,
    /// A service that has not sent a heartbeat for this long is considered down and its targets
    /// offline.
    pub lease: Duration,
    /// How often the leader checks leases and updates chains.
    pub detector_interval: Duration,
    /// The raft group of the mgmtd replicas.
    pub raft: RaftConfig,
}

impl Default for MgmtdConfig {
    fn default() -> Self {
        MgmtdConfig {
            listen_addr: "127.0.0.1:8000".to_string(),
            metrics_addr: "127.0.0.1:9800".to_string(),
            lease: Duration::secs(5),
            detector_interval: Duration::millis(500),
            raft: RaftConfig {
                cluster: "fs3-mgmtd".to_string(),
                data_dir: "data/mgmtd".into(),
                advertise_addr: "127.0.0.1:8000".to_string(),
                initial_members: vec![ff_raft::MemberConfig {
                    id: 1,
                    addr: "127.0.0.1:8000".to_string(),
                }],
                ..RaftConfig::default()
            },
        }
    }
}

impl DaemonConfig for MgmtdConfig {
    const ENV_PREFIX: &'static str = "FS3_MGMTD";
    const TEMPLATE: &'static str = include_str!("../../../deploy/config/fs3-mgmtd.toml");

    fn validate(&self) -> Result<(), ConfigError> {
        ensure_socket_addr(&self.listen_addr, "listen_addr", false)?;
        ensure_socket_addr(&self.metrics_addr, "metrics_addr", true)?;
        ensure(
            self.lease.get() >= std::time::Duration::from_millis(100),
            "lease",
            "must be at least 100ms",
        )?;
        ensure(
            !self.detector_interval.get().is_zero()
                && self.detector_interval.get() < self.lease.get(),
            "detector_interval",
            format!("must be above 0 and below the lease ({})", self.lease),
        )?;
        self.raft.validate("raft")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_documents_the_defaults() {
        ff_config::check_template::<MgmtdConfig>().unwrap();
    }
}
