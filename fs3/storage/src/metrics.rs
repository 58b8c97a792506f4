//! Prometheus series of a storage daemon.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The metrics of one storage daemon.
#[derive(Clone, Debug)]
pub struct StorageMetrics {
    /// Requests served, by operation and outcome.
    pub requests: IntCounterVec,
    /// Bytes read from and written to targets by clients.
    pub bytes: IntCounterVec,
    /// Time to serve a request, by operation.
    pub seconds: HistogramVec,
    /// Local targets, by phase (starting, recovering, up_to_date).
    pub targets: IntGaugeVec,
    /// Chunks copied to a recovering successor, and repaired from a replica.
    pub recovery: IntCounterVec,
    /// The routing version this daemon routes with.
    pub routing_version: IntGauge,
}

impl StorageMetrics {
    /// Registers the series in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "fs3_storage_requests_total",
                "Requests served, by operation and outcome",
            ),
            &["op", "outcome"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "fs3_storage_bytes_total",
                "Chunk bytes read and written for clients",
            ),
            &["direction"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "fs3_storage_request_seconds",
                "Time to serve a request, by operation",
            )
            .buckets(prometheus::exponential_buckets(0.0001, 2.0, 18)?),
            &["op"],
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
        for op in ["write", "read", "dump_meta", "sync_done"] {
            for outcome in ["ok", "error"] {
                requests.with_label_values(&[op, outcome]);
            }
            seconds.with_label_values(&[op]);
        }
        for direction in ["read", "write"] {
            bytes.with_label_values(&[direction]);
        }
        for phase in ["starting", "recovering", "up_to_date"] {
            targets.with_label_values(&[phase]);
        }
        for kind in ["synced", "removed", "repaired"] {
            recovery.with_label_values(&[kind]);
        }
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        registry.register(Box::new(targets.clone()))?;
        registry.register(Box::new(recovery.clone()))?;
        registry.register(Box::new(routing_version.clone()))?;
        Ok(StorageMetrics {
            requests,
            bytes,
            seconds,
            targets,
            recovery,
            routing_version,
        })
    }
}
