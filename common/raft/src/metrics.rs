//! Prometheus series of one raft node, registered in the daemon's own registry.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The metrics of one raft node.
#[derive(Clone)]
pub(crate) struct RaftMetrics {
    pub term: IntGauge,
    pub commit_index: IntGauge,
    pub applied_index: IntGauge,
    pub last_index: IntGauge,
    pub first_index: IntGauge,
    pub leader_id: IntGauge,
    pub is_leader: IntGauge,
    pub pending_proposals: IntGauge,
    pub proposals: IntCounterVec,
    pub reads: IntCounterVec,
    pub fsync_seconds: Histogram,
    pub write_batch_entries: Histogram,
    pub apply_batch_entries: Histogram,
    pub apply_seconds: Histogram,
    pub messages_sent: IntCounter,
    pub messages_received: IntCounter,
    pub peer_send_failures: IntCounter,
    pub messages_dropped: IntCounter,
    pub snapshots_sent: IntCounterVec,
    pub snapshots_received: IntCounter,
    pub snapshots_generated: IntCounter,
    pub compactions: IntCounter,
}

impl RaftMetrics {
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        // Every label value is created up front, so each series exists (at 0) from the start
        // and rates and alerts work before the first event.
        let counter_vec = |name: &str,
                           help: &str,
                           label: &str,
                           values: &[&str]|
         -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
            for value in values {
                c.with_label_values(&[*value]);
            }
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let histogram =
            |name: &str, help: &str, buckets: Vec<f64>| -> Result<Histogram, prometheus::Error> {
                let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let batch_buckets = prometheus::exponential_buckets(1.0, 4.0, 8)?;
        Ok(RaftMetrics {
            term: gauge("raft_term", "Current raft term")?,
            commit_index: gauge("raft_commit_index", "Highest log index known committed")?,
            applied_index: gauge(
                "raft_applied_index",
                "Highest log index applied to the state machine",
            )?,
            last_index: gauge("raft_last_index", "Highest log index stored")?,
            first_index: gauge(
                "raft_first_index",
                "Lowest log index still stored (after compaction)",
            )?,
            leader_id: gauge(
                "raft_leader_id",
                "Node id of the current leader, 0 if none known",
            )?,
            is_leader: gauge("raft_is_leader", "1 if this node is the leader")?,
            pending_proposals: gauge(
                "raft_pending_proposals",
                "Proposals accepted by this leader and not yet applied",
            )?,
            proposals: counter_vec(
                "raft_proposals_total",
                "Proposals submitted to this node, by outcome",
                "outcome",
                &["ok", "not_leader", "invalid", "timeout", "failed"],
            )?,
            reads: counter_vec(
                "raft_reads_total",
                "Reads served by this node, by consistency",
                "consistency",
                &["linearizable", "local"],
            )?,
            fsync_seconds: histogram(
                "raft_fsync_seconds",
                "Time to durably commit one batch of log entries and hard state (includes fsync)",
                prometheus::exponential_buckets(0.0001, 2.0, 16)?,
            )?,
            write_batch_entries: histogram(
                "raft_write_batch_entries",
                "Log entries made durable by one fsync (group commit size)",
                batch_buckets.clone(),
            )?,
            apply_batch_entries: histogram(
                "raft_apply_batch_entries",
                "Entries applied to the state machine in one transaction",
                batch_buckets,
            )?,
            apply_seconds: histogram(
                "raft_apply_seconds",
                "Time to apply one batch of committed entries to the state machine",
                prometheus::exponential_buckets(0.0001, 2.0, 16)?,
            )?,
            messages_sent: counter(
                "raft_messages_sent_total",
                "Raft messages handed to the transport",
            )?,
            messages_received: counter(
                "raft_messages_received_total",
                "Raft messages received from peers",
            )?,
            peer_send_failures: counter(
                "raft_peer_send_failures_total",
                "Batches that could not be delivered to a peer",
            )?,
            messages_dropped: counter(
                "raft_messages_dropped_total",
                "Messages dropped because a peer's queue was full or its address unknown",
            )?,
            snapshots_sent: counter_vec(
                "raft_snapshots_sent_total",
                "Snapshots streamed to peers, by result",
                "result",
                &["ok", "failed"],
            )?,
            snapshots_received: counter(
                "raft_snapshots_received_total",
                "Snapshots received from the leader",
            )?,
            snapshots_generated: counter(
                "raft_snapshots_generated_total",
                "Snapshot files written",
            )?,
            compactions: counter("raft_log_compactions_total", "Log compactions")?,
        })
    }
}
