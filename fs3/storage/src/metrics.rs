//! Prometheus series of a storage daemon.

use ff_metrics::RequestMetrics;
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// The metrics of one storage daemon.
#[derive(Clone, Debug)]
pub struct StorageMetrics {
    /// Requests served, by operation and outcome, and their latency.
    pub requests: RequestMetrics,
    /// Bytes read from and written to targets by clients.
    pub bytes: IntCounterVec,
    /// Local targets, by phase (starting, recovering, up_to_date).
    pub targets: IntGaugeVec,
    /// Chunks copied to a recovering successor, and repaired from a replica.
    pub recovery: IntCounterVec,
    /// The routing version this daemon routes with.
    pub routing_version: IntGauge,
    /// Size and free space of each target's filesystem.
    disk: IntGaugeVec,
    /// Open connections to other storage daemons (CRAQ forwards, syncs), by transport.
    peer_connections: IntGaugeVec,
}

impl StorageMetrics {
    /// Registers the series in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        ff_metrics::register_build_info(registry, "fs3_storage")?;
        let requests = RequestMetrics::register(
            registry,
            "fs3_storage",
            "storage",
            &["write", "read", "dump_meta", "sync_done"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "fs3_storage_bytes_total",
                "Chunk bytes read and written for clients",
            ),
            &["direction"],
        )?;
        let targets = IntGaugeVec::new(
            Opts::new("fs3_storage_targets", "Local targets, by phase"),
            &["phase"],
        )?;
        let recovery = IntCounterVec::new(
            Opts::new(
                "fs3_storage_recovery_chunks_total",
                "Chunks copied to successors or repaired",
            ),
            &["kind"],
        )?;
        let routing_version = IntGauge::new(
            "fs3_storage_routing_version",
            "Routing version this daemon routes with",
        )?;
        let disk = IntGaugeVec::new(
            Opts::new(
                "fs3_storage_target_disk_bytes",
                "Size and free space of the filesystem each target is on",
            ),
            &["target", "kind"],
        )?;
        for direction in ["read", "write"] {
            bytes.with_label_values(&[direction]);
        }
        for phase in ["starting", "recovering", "up_to_date"] {
            targets.with_label_values(&[phase]);
        }
        for kind in ["synced", "removed", "repaired"] {
            recovery.with_label_values(&[kind]);
        }
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(targets.clone()))?;
        registry.register(Box::new(recovery.clone()))?;
        registry.register(Box::new(routing_version.clone()))?;
        registry.register(Box::new(disk.clone()))?;
        let peer_connections = IntGaugeVec::new(
            Opts::new(
                "fs3_storage_peer_connections",
                "Open connections to other storage daemons, by transport (tcp, rdma)",
            ),
            &["transport"],
        )?;
        for transport in ["tcp", "rdma"] {
            peer_connections.with_label_values(&[transport]);
        }
        registry.register(Box::new(peer_connections.clone()))?;
        Ok(StorageMetrics {
            requests,
            bytes,
            targets,
            recovery,
            routing_version,
            disk,
            peer_connections,
        })
    }

    /// Records the open connections to other storage daemons.
    pub fn set_peer_connections(&self, connections: ff_net::Connections) {
        for (transport, count) in [("tcp", connections.tcp), ("rdma", connections.rdma)] {
            self.peer_connections
                .with_label_values(&[transport])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Records target `target`'s filesystem size and free space.
    pub fn set_disk(&self, target: u64, capacity: u64, free: u64) {
        let target = target.to_string();
        for (kind, bytes) in [("capacity", capacity), ("free", free)] {
            self.disk
                .with_label_values(&[target.as_str(), kind])
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }
}
