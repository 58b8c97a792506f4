//! Configuration of one ff-kv node; the commented defaults are in `ff-kv.toml`.

use ff_config::{ConfigError, DaemonConfig, ensure_socket_addr};
use ff_raft::RaftConfig;
use serde::{Deserialize, Serialize};

/// Configuration of one ff-kv node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvConfig {
    /// Address the gRPC server binds (raft peers and clients).
    pub listen_addr: String,
    /// Address of the Prometheus endpoint; empty disables it.
    pub metrics_addr: String,
    /// Raft group membership and tuning.
    pub raft: RaftConfig,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            listen_addr: "127.0.0.1:7100".to_string(),
            metrics_addr: "127.0.0.1:9100".to_string(),
            raft: RaftConfig::default(),
        }
    }
}

impl DaemonConfig for KvConfig {
    const ENV_PREFIX: &'static str = "FF_KV";
    const TEMPLATE: &'static str = include_str!("../../../../deploy/config/ff-kv.toml");

    fn validate(&self) -> Result<(), ConfigError> {
        ensure_socket_addr(&self.listen_addr, "listen_addr", false)?;
        ensure_socket_addr(&self.metrics_addr, "metrics_addr", true)?;
        self.raft.validate("raft")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_documents_the_defaults() {
        ff_config::check_template::<KvConfig>().unwrap();
    }

    #[test]
    fn unknown_and_invalid_fields_are_refused() {
        let err =
            ff_config::load_from_str::<KvConfig>("[raft]\nnode_idd = 2\n", "x.toml", Vec::new())
                .unwrap_err()
                .to_string();
        assert!(err.contains("node_idd"), "{err}");
        let err = ff_config::load_from_str::<KvConfig>(
            "listen_addr = \"nowhere\"\n",
            "x.toml",
            Vec::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("listen_addr"), "{err}");
        let err = ff_config::load_from_str::<KvConfig>(
            "[raft]\nelection_ticks = 1\n",
            "x.toml",
            Vec::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("raft.election_ticks"), "{err}");
    }
}
