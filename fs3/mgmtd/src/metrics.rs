//! Prometheus series of an mgmtd replica (besides ff-raft's own): its API's requests and
//! latency, and the cluster as this replica has applied it — routing version, each chain's
//! version, targets by public state, and (on the leader) services by liveness.

use ff_metrics::RequestMetrics;
use fs3_proto::mgmtd::{PublicState, RoutingInfo};
use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts, Registry};

/// The API operations, for pre-registered series.
const OPS: [&str; 7] = [
    "heartbeat",
    "get_routing",
    "create_chains",
    "create_chain_table",
    "bootstrap",
    "set_target_offline",
    "list_nodes",
];

/// The metrics of one mgmtd replica.
#[derive(Clone, Debug)]
pub struct MgmtdMetrics {
    /// The API's requests.
    pub requests: RequestMetrics,
    routing_version: IntGauge,
    chain_version: IntGaugeVec,
    /// Serving replicas per chain.
    chain_serving: IntGaugeVec,
    targets: IntGaugeVec,
    services: IntGaugeVec,
    /// Chains changed by the failure detector.
    pub chain_changes: IntCounter,
}

impl MgmtdMetrics {
    /// Registers the series in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        ff_metrics::register_build_info(registry, "fs3_mgmtd")?;
        let requests = RequestMetrics::register(registry, "fs3_mgmtd", "mgmtd API", &OPS)?;
        let routing_version = IntGauge::new(
            "fs3_mgmtd_routing_version",
            "Routing version this replica has applied",
        )?;
        let chain_version = IntGaugeVec::new(
            Opts::new("fs3_mgmtd_chain_version", "Version of each chain"),
            &["chain"],
        )?;
        let targets = IntGaugeVec::new(
            Opts::new("fs3_mgmtd_targets", "Targets in chains, by public state"),
            &["state"],
        )?;
        let services = IntGaugeVec::new(
            Opts::new(
                "fs3_mgmtd_services",
                "Registered services by liveness (the leader's view; zero elsewhere)",
            ),
            &["liveness"],
        )?;
        let chain_changes = IntCounter::new(
            "fs3_mgmtd_chain_changes_total",
            "Chains changed by the failure detector",
        )?;
        registry.register(Box::new(routing_version.clone()))?;
        registry.register(Box::new(chain_version.clone()))?;
        let chain_serving = IntGaugeVec::new(
            Opts::new(
                "fs3_mgmtd_chain_serving_replicas",
                "Replicas of each chain that serve reads and writes",
            ),
            &["chain"],
        )?;
        registry.register(Box::new(chain_serving.clone()))?;
        registry.register(Box::new(targets.clone()))?;
        registry.register(Box::new(services.clone()))?;
        registry.register(Box::new(chain_changes.clone()))?;
        Ok(MgmtdMetrics {
            requests,
            routing_version,
            chain_version,
            chain_serving,
            targets,
            services,
            chain_changes,
        })
    }

    /// Sets the cluster gauges from `routing`.
    pub fn set_routing(&self, routing: &RoutingInfo) {
        self.routing_version
            .set(i64::try_from(routing.version).unwrap_or(i64::MAX));
        self.chain_version.reset();
        self.chain_serving.reset();
        for chain in &routing.chains {
            let id = chain.id.to_string();
            self.chain_version
                .with_label_values(&[&id])
                .set(i64::try_from(chain.version).unwrap_or(i64::MAX));
            let serving = chain
                .targets
                .iter()
                .filter(|t| t.state() == PublicState::Serving)
                .count();
            self.chain_serving
                .with_label_values(&[&id])
                .set(serving as i64);
        }
        for state in [
            PublicState::Serving,
            PublicState::Syncing,
            PublicState::Waiting,
            PublicState::Lastsrv,
            PublicState::Offline,
        ] {
            let count = routing
                .chains
                .iter()
                .flat_map(|c| c.targets.iter())
                .filter(|t| t.state() == state)
                .count();
            self.targets
                .with_label_values(&[&state.as_str_name().to_ascii_lowercase()])
                .set(count as i64);
        }
    }

    /// Sets the liveness gauges (`alive` and `dead` services).
    pub fn set_services(&self, alive: usize, dead: usize) {
        self.services
            .with_label_values(&["alive"])
            .set(alive as i64);
        self.services.with_label_values(&["dead"]).set(dead as i64);
    }
}
