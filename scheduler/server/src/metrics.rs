//! Prometheus series of a hai server replica (besides ff-raft's own): API requests, jobs by
//! state and nodes by state (as the leader sees them), preemptions, time-limit stops, forgotten
//! ended jobs, and how long jobs waited
//! before they started.

use ff_metrics::RequestMetrics;
use hai_proto::{Job, JobState, Node, NodeState};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGaugeVec, Opts, Registry};

use crate::state::state_name;

/// The metrics of one hai server.
#[derive(Clone, Debug)]
pub struct HaiMetrics {
    /// API requests.
    pub requests: RequestMetrics,
    /// Jobs by state (set by the leader's scheduling loop).
    jobs: IntGaugeVec,
    /// Nodes by state: up, draining, down.
    nodes: IntGaugeVec,
    /// Running jobs suspended to make room for higher-priority ones.
    pub preemptions: IntCounter,
    /// Running attempts stopped for outliving their time limit.
    pub time_limit_stops: IntCounter,
    /// Ended jobs forgotten after the retention.
    pub jobs_forgotten: IntCounter,
    /// Seconds from submission (or requeue) to start.
    pub queue_wait: Histogram,
}

const ALL_STATES: [JobState; 9] = [
    JobState::Pending,
    JobState::Running,
    JobState::Suspending,
    JobState::Suspended,
    JobState::Cancelling,
    JobState::Failing,
    JobState::Completed,
    JobState::Failed,
    JobState::Cancelled,
];

impl HaiMetrics {
    /// Registers the series in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        ff_metrics::register_build_info(registry, "hai_server")?;
        let requests = RequestMetrics::register(
            registry,
            "hai_server",
            "hai API",
            &[
                "submit",
                "list_jobs",
                "get_job",
                "cancel",
                "suspend",
                "heartbeat",
            ],
        )?;
        let jobs = IntGaugeVec::new(
            Opts::new("hai_jobs", "Jobs not yet ended, by state (leader only)"),
            &["state"],
        )?;
        let nodes = IntGaugeVec::new(
            Opts::new(
                "hai_nodes",
                "Nodes by state: up, draining, down (leader only)",
            ),
            &["state"],
        )?;
        let preemptions = IntCounter::new(
            "hai_preemptions_total",
            "Running jobs suspended to make room for higher-priority ones",
        )?;
        let time_limit_stops = IntCounter::new(
            "hai_time_limit_stops_total",
            "Running attempts stopped (and failed) for outliving their job's time limit",
        )?;
        let jobs_forgotten = IntCounter::new(
            "hai_jobs_forgotten_total",
            "Ended jobs forgotten once older than the server's job_retention",
        )?;
        let queue_wait = Histogram::with_opts(
            HistogramOpts::new(
                "hai_queue_wait_seconds",
                "Time from submission or requeue to the start of an attempt",
            )
            .buckets(vec![
                0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0, 21600.0,
            ]),
        )?;
        // Every series exists from the start (zero on followers), so dashboards see zeros.
        for state in ALL_STATES {
            jobs.with_label_values(&[state_name(state)]);
        }
        for state in ["up", "draining", "down"] {
            nodes.with_label_values(&[state]);
        }
        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(nodes.clone()))?;
        registry.register(Box::new(preemptions.clone()))?;
        registry.register(Box::new(time_limit_stops.clone()))?;
        registry.register(Box::new(jobs_forgotten.clone()))?;
        registry.register(Box::new(queue_wait.clone()))?;
        Ok(HaiMetrics {
            requests,
            jobs,
            nodes,
            preemptions,
            time_limit_stops,
            jobs_forgotten,
            queue_wait,
        })
    }

    /// Sets the job and node gauges from the leader's view.
    pub fn set_state(&self, jobs: &[Job], nodes: &[Node]) {
        for state in ALL_STATES {
            let count = jobs.iter().filter(|j| j.state() == state).count();
            self.jobs
                .with_label_values(&[state_name(state)])
                .set(count as i64);
        }
        let count = |f: &dyn Fn(&Node) -> bool| nodes.iter().filter(|n| f(n)).count() as i64;
        self.nodes
            .with_label_values(&["up"])
            .set(count(&|n| n.state() == NodeState::Up && !n.drain));
        self.nodes
            .with_label_values(&["draining"])
            .set(count(&|n| n.state() == NodeState::Up && n.drain));
        self.nodes
            .with_label_values(&["down"])
            .set(count(&|n| n.state() == NodeState::Down));
    }
}
