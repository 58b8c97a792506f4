//! Prometheus series of a node agent: ranks running, ranks started, attempts ended by outcome,
//! and heartbeats that failed.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The metrics of one agent.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    /// Ranks alive on this node.
    pub ranks: IntGauge,
    /// Ranks started.
    pub starts: IntCounter,
    /// Attempts whose ranks all ended here, by outcome (`ok`, `failed`).
    pub exits: IntCounterVec,
    /// Heartbeats the leader did not acknowledge.
    pub heartbeat_failures: IntCounter,
}

impl AgentMetrics {
    /// Registers the series in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        ff_metrics::register_build_info(registry, "hai_agent")?;
        let metrics = AgentMetrics {
            ranks: IntGauge::new("hai_agent_ranks", "Ranks alive on this node")?,
            starts: IntCounter::new("hai_agent_rank_starts_total", "Ranks started on this node")?,
            exits: IntCounterVec::new(
                Opts::new(
                    "hai_agent_attempt_exits_total",
                    "Job attempts whose ranks on this node all ended, by outcome",
                ),
                &["outcome"],
            )?,
            heartbeat_failures: IntCounter::new(
                "hai_agent_heartbeat_failures_total",
                "Heartbeats the leader did not acknowledge",
            )?,
        };
        for outcome in ["ok", "failed"] {
            metrics.exits.with_label_values(&[outcome]);
        }
        registry.register(Box::new(metrics.ranks.clone()))?;
        registry.register(Box::new(metrics.starts.clone()))?;
        registry.register(Box::new(metrics.exits.clone()))?;
        registry.register(Box::new(metrics.heartbeat_failures.clone()))?;
        Ok(metrics)
    }
}
