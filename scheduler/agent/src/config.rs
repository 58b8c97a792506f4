//! Configuration of one node agent; the commented defaults are in
//! `deploy/config/hai-agent.toml`.

use std::path::PathBuf;

use ff_config::{
    ConfigError, DaemonConfig, Duration, ensure, ensure_host_port, ensure_socket_addr,
};
use serde::{Deserialize, Serialize};

/// Configuration of one node agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// This node's name in the scheduler (unique); empty: the host name.
    pub node: String,
    /// The address other nodes' ranks reach this node at (MASTER_ADDR when it holds rank 0).
    pub host: String,
    /// hai server replicas.
    pub servers: Vec<String>,
    /// Address of the Prometheus endpoint; empty disables it.
    pub metrics_addr: String,
    /// The administrator's token (the servers' `admin_token_file`).
    pub token_file: PathBuf,
    /// GPUs this node offers.
    pub gpus: u32,
    /// CPUs this node offers; 0: every CPU of the machine.
    pub cpus: u32,
    /// Memory this node offers, in MB; 0: all of the machine's.
    pub memory_mb: u64,
    /// First port handed to jobs as MASTER_PORT.
    pub port_min: u16,
    /// Last port handed to jobs as MASTER_PORT.
    pub port_max: u16,
    /// Ranks' logs: `LOG_DIR/JOB/attempt-A/rank-R.log` (the fs3 mount in production).
    pub log_dir: PathBuf,
    /// The agent's own records of the ranks it started (survives agent restarts).
    pub state_dir: PathBuf,
    /// How often the agent heartbeats the leader.
    pub heartbeat_interval: Duration,
    /// Grace between SIGTERM and SIGKILL for ranks stopped because of another rank's failure or
    /// because the scheduler no longer assigns them.
    pub stop_grace: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            node: String::new(),
            host: "127.0.0.1".to_string(),
            servers: vec!["127.0.0.1:8300".to_string()],
            metrics_addr: "127.0.0.1:9840".to_string(),
            token_file: "data/hai/admin.token".into(),
            gpus: 0,
            cpus: 0,
            memory_mb: 0,
            port_min: 29500,
            port_max: 29599,
            log_dir: "data/hai-agent/logs".into(),
            state_dir: "data/hai-agent/state".into(),
            heartbeat_interval: Duration::secs(1),
            stop_grace: Duration::secs(10),
        }
    }
}

impl AgentConfig {
    /// The node name: configured, or the host name.
    pub fn node_name(&self) -> String {
        if !self.node.is_empty() {
            return self.node.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".to_string())
    }
}

impl DaemonConfig for AgentConfig {
    const ENV_PREFIX: &'static str = "HAI_AGENT";
    const TEMPLATE: &'static str = include_str!("../../../deploy/config/hai-agent.toml");

    fn validate(&self) -> Result<(), ConfigError> {
        ensure(
            !self.node.contains(char::is_whitespace),
            "node",
            "must not contain spaces",
        )?;
        ensure(!self.host.is_empty(), "host", "must name this node")?;
        ensure(
            !self.servers.is_empty(),
            "servers",
            "needs at least one address",
        )?;
        for addr in &self.servers {
            ensure_host_port(addr, "servers")?;
        }
        ensure_socket_addr(&self.metrics_addr, "metrics_addr", true)?;
        ensure(
            self.port_min > 0 && self.port_min <= self.port_max,
            "port_min",
            "must be above 0 and at most port_max",
        )?;
        ensure(
            !self.heartbeat_interval.get().is_zero(),
            "heartbeat_interval",
            "must be above 0",
        )?;
        ensure(
            !self.log_dir.as_os_str().is_empty() && !self.state_dir.as_os_str().is_empty(),
            "log_dir",
            "log_dir and state_dir must name directories",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_documents_the_defaults() {
        ff_config::check_template::<AgentConfig>().unwrap();
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let config = AgentConfig {
            port_min: 10,
            port_max: 5,
            ..AgentConfig::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("port_min")
        );
    }
}
