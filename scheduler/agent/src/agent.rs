//! The agent's loop: it follows the leader's assignments for its node (a watch stream,
//! reconnected on leader change), makes the node's processes match them (start, suspend, stop),
//! watches its ranks end, and heartbeats the leader with what runs and what exited.
//!
//! Rules that keep a job from ever running twice: an attempt the agent has a record of is
//! never started again (a restarted agent reads its records first), and a record is removed
//! only once its exit was acknowledged and the attempt is no longer assigned here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use hai_proto::agent_client::AgentClient;
use hai_proto::{
    Action, Assignment, Assignments, HeartbeatRequest, Node, NodeState, RankExit, WatchRequest,
};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use crate::config::AgentConfig;
use crate::metrics::AgentMetrics;
use crate::rank::{self, AttemptRecord, RankRecord};

/// How often ranks are checked for exits and grace periods.
const TICK: Duration = Duration::from_millis(100);
/// A watch stream silent for this long is taken for dead (the leader sends every 5 s).
const WATCH_SILENCE: Duration = Duration::from_secs(15);
/// Assignment updates queued from the watch task.
const WATCH_QUEUE: usize = 4;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The token file could not be read.
    #[error("token file {path}: {cause}")]
    Token {
        /// The file.
        path: String,
        /// What went wrong.
        cause: std::io::Error,
    },
    /// A directory could not be made.
    #[error("{path}: {cause}")]
    Directory {
        /// The directory.
        path: String,
        /// What went wrong.
        cause: std::io::Error,
    },
    /// The server addresses are unusable.
    #[error("servers: {0}")]
    Servers(String),
    /// The metrics endpoint could not start.
    #[error("metrics: {0}")]
    Metrics(String),
}

/// One attempt of a job on this node.
struct Attempt {
    record: AttemptRecord,
    dir: PathBuf,
    /// Wrappers this agent started (the others were adopted after a restart).
    children: BTreeMap<u32, tokio::process::Child>,
    /// Exit code and detail of every rank that ended.
    exits: BTreeMap<u32, (i32, String)>,
    /// The stop signal sent (suspend or stop), when, and the grace before SIGKILL.
    signaled: Option<(Action, Instant, Duration)>,
    killed: bool,
    /// The exit was acknowledged by the leader.
    reported: bool,
    /// In the latest assignments.
    assigned: bool,
}

impl Attempt {
    fn key(&self) -> (u64, u32) {
        (self.record.job_id, self.record.attempt)
    }

    fn alive(&self) -> impl Iterator<Item = &RankRecord> {
        self.record
            .ranks
            .iter()
            .filter(|r| !self.exits.contains_key(&r.rank))
    }

    fn signal_all(&self, signal: Signal) {
        for rank in self.alive() {
            rank::signal_group(rank, signal);
        }
    }

    /// Sends the suspend (flag file, SIGUSR1) or stop (SIGTERM) signal once.
    fn begin_stop(&mut self, action: Action, grace: Duration) {
        if self
            .signaled
            .is_some_and(|(a, _, _)| a == Action::Stop || a == action)
        {
            return;
        }
        if action == Action::Suspend {
            let control = rank::control_dir(&self.dir);
            if let Err(error) = std::fs::write(control.join("suspend"), b"") {
                tracing::warn!(%error, "cannot write the suspend flag");
            }
            self.signal_all(Signal::SIGUSR1);
        } else {
            self.signal_all(Signal::SIGTERM);
        }
        tracing::info!(
            job = self.record.job_id,
            attempt = self.record.attempt,
            ?action,
            "signalled"
        );
        self.signaled = Some((action, Instant::now(), grace));
    }

    /// Notes ranks that ended; kills the rest once a grace period is over; stops the others
    /// when one rank failed (one failed rank stops the gang).
    fn poll(&mut self, stop_grace: Duration) {
        for rank in &self.record.ranks {
            if self.exits.contains_key(&rank.rank) {
                continue;
            }
            let ended = match self.children.get_mut(&rank.rank) {
                Some(child) => match child.try_wait() {
                    Ok(Some(status)) => Some(
                        rank::recorded_exit(&self.dir, rank.rank)
                            .unwrap_or_else(|| rank::exit_code(status)),
                    ),
                    Ok(None) => None,
                    Err(_) => Some(-1),
                },
                None if rank::alive(rank) => None,
                None => Some(rank::recorded_exit(&self.dir, rank.rank).unwrap_or(-1)),
            };
            if let Some(code) = ended {
                let detail = match code {
                    0 => String::new(),
                    -1 => format!(
                        "rank {} ended while the agent was away; no exit code recorded",
                        rank.rank
                    ),
                    c if c > 128 => format!("rank {} killed by signal {}", rank.rank, c - 128),
                    c => format!("rank {} exited with code {c}", rank.rank),
                };
                self.exits.insert(rank.rank, (code, detail));
            }
        }
        let failed = self.exits.values().any(|(code, _)| *code != 0);
        if failed && self.alive().next().is_some() && self.signaled.is_none() {
            self.begin_stop(Action::Stop, stop_grace);
        }
        if let Some((_, at, grace)) = self.signaled
            && !self.killed
            && at.elapsed() >= grace
            && self.alive().next().is_some()
        {
            tracing::warn!(job = self.record.job_id, "grace over; killing");
            self.signal_all(Signal::SIGKILL);
            self.killed = true;
        }
    }

    /// The attempt's outcome on this node, once every rank has ended.
    fn outcome(&self) -> Option<(i32, String)> {
        if let Some(exit) = &self.record.exit {
            return Some(exit.clone());
        }
        if self.alive().next().is_some() {
            return None;
        }
        Some(
            self.exits
                .values()
                .find(|(code, _)| *code != 0)
                .cloned()
                .unwrap_or((0, String::new())),
        )
    }
}

/// A node agent.
pub struct NodeAgent {
    config: AgentConfig,
    name: String,
    token: String,
    client: ff_rpc::LeaderClient,
    /// This program, to start rank wrappers (`EXE rank-exec`).
    exe: PathBuf,
    attempts: BTreeMap<(u64, u32), Attempt>,
    metrics: AgentMetrics,
    registry: prometheus::Registry,
}

impl std::fmt::Debug for NodeAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAgent")
            .field("node", &self.name)
            .finish()
    }
}

fn make_dir(path: &Path) -> Result<(), AgentError> {
    std::fs::create_dir_all(path).map_err(|cause| AgentError::Directory {
        path: path.display().to_string(),
        cause,
    })
}

/// Memory of this machine in MB, from /proc/meminfo.
fn machine_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb / 1024)
}

impl NodeAgent {
    /// An agent for `config` (validated); `exe` is the program whose `rank-exec` wraps ranks.
    pub fn new(config: AgentConfig, exe: PathBuf) -> Result<NodeAgent, AgentError> {
        let token = std::fs::read_to_string(&config.token_file)
            .map(|t| t.trim().to_string())
            .map_err(|cause| AgentError::Token {
                path: config.token_file.display().to_string(),
                cause,
            })?;
        make_dir(&config.log_dir)?;
        make_dir(&config.state_dir.join("attempts"))?;
        let interval = config.heartbeat_interval.get();
        let options = ff_rpc::ClientOptions {
            request_timeout: interval.max(Duration::from_secs(2)),
            total_timeout: interval.max(Duration::from_secs(2)) * 2,
            ..ff_rpc::ClientOptions::default()
        };
        let client = ff_rpc::LeaderClient::new(config.servers.clone(), options)
            .map_err(|e| AgentError::Servers(e.to_string()))?;
        let name = config.node_name();
        let registry = prometheus::Registry::new();
        let metrics =
            AgentMetrics::register(&registry).map_err(|e| AgentError::Metrics(e.to_string()))?;
        let mut agent = NodeAgent {
            config,
            name,
            token,
            client,
            exe,
            attempts: BTreeMap::new(),
            metrics,
            registry,
        };
        agent.recover();
        Ok(agent)
    }

    /// Reads the records a previous run of the agent left: ranks still running are adopted,
    /// ranks that ended are noted with the exit code their wrapper recorded.
    fn recover(&mut self) {
        let root = self.config.state_dir.join("attempts");
        let Ok(entries) = std::fs::read_dir(&root) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            match rank::load(&dir) {
                Ok(record) => {
                    let alive = record.ranks.iter().filter(|r| rank::alive(r)).count();
                    tracing::info!(
                        job = record.job_id,
                        attempt = record.attempt,
                        alive,
                        "found an attempt from an earlier run"
                    );
                    let attempt = Attempt {
                        record,
                        dir,
                        children: BTreeMap::new(),
                        exits: BTreeMap::new(),
                        signaled: None,
                        killed: false,
                        reported: false,
                        assigned: false,
                    };
                    self.attempts.insert(attempt.key(), attempt);
                }
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "unreadable attempt record; removing");
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
    }

    fn node_record(&self) -> Node {
        let cpus = if self.config.cpus > 0 {
            self.config.cpus
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
        };
        let memory_mb = if self.config.memory_mb > 0 {
            self.config.memory_mb
        } else {
            machine_memory_mb()
        };
        Node {
            name: self.name.clone(),
            host: self.config.host.clone(),
            gpus: self.config.gpus,
            cpus,
            memory_mb,
            state: NodeState::Up as i32,
            port_min: u32::from(self.config.port_min),
            port_max: u32::from(self.config.port_max),
            log_dir: self.config.log_dir.display().to_string(),
            ..Node::default()
        }
    }

    /// Runs until `stop` resolves. Ranks keep running when the agent stops: a restarted agent
    /// finds them.
    pub async fn run(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), AgentError> {
        let _metrics = if self.config.metrics_addr.is_empty() {
            None
        } else {
            Some(
                ff_metrics::MetricsServer::start(&self.config.metrics_addr, self.registry.clone())
                    .await
                    .map_err(|e| AgentError::Metrics(e.to_string()))?,
            )
        };
        let (updates, mut assignments) = mpsc::channel(WATCH_QUEUE);
        let watcher = tokio::spawn(watch(
            self.client_clone(),
            self.token.clone(),
            self.name.clone(),
            updates,
        ));
        let mut tick = tokio::time::interval(TICK);
        let mut heartbeat = tokio::time::interval(self.config.heartbeat_interval.get());
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                Some(update) = assignments.recv() => self.reconcile(update),
                _ = tick.tick() => {
                    // Exits are reported at once: the node's resources are free only then.
                    if self.poll() {
                        self.heartbeat().await;
                    }
                }
                _ = heartbeat.tick() => self.heartbeat().await,
            }
        }
        watcher.abort();
        tracing::info!("agent stopped; ranks left running");
        Ok(())
    }

    fn client_clone(&self) -> ff_rpc::LeaderClient {
        // A second client for the watch stream, so that a long stream never holds up heartbeats.
        ff_rpc::LeaderClient::new(self.client.endpoints(), self.client.options().clone())
            .unwrap_or_else(|_| unreachable!("the endpoints were accepted before"))
    }

    /// Makes the node's attempts match `update`.
    fn reconcile(&mut self, update: Assignments) {
        for attempt in self.attempts.values_mut() {
            attempt.assigned = false;
        }
        for assignment in update.assignments {
            let key = (assignment.job_id, assignment.attempt);
            let grace = Duration::from_millis(assignment.spec.as_ref().map_or(0, |s| s.grace_ms));
            let action = assignment.action();
            if let Some(attempt) = self.attempts.get_mut(&key) {
                attempt.assigned = true;
                if action != Action::Run && attempt.outcome().is_none() {
                    attempt.begin_stop(action, grace);
                }
                continue;
            }
            let attempt = if action == Action::Run {
                self.start(&assignment)
            } else {
                // Told to stop what it does not run (its records are gone): nothing runs here.
                self.lost(&assignment, "not running on this node".to_string())
            };
            let mut attempt = attempt;
            attempt.assigned = true;
            self.attempts.insert(key, attempt);
        }
        let grace = self.config.stop_grace.get();
        for attempt in self.attempts.values_mut() {
            if !attempt.assigned && attempt.outcome().is_none() {
                attempt.begin_stop(Action::Stop, grace);
            }
        }
    }

    /// An attempt that never ran here, reported with `detail`.
    fn lost(&self, assignment: &Assignment, detail: String) -> Attempt {
        let dir = self.attempt_dir(assignment.job_id, assignment.attempt);
        let record = AttemptRecord {
            job_id: assignment.job_id,
            attempt: assignment.attempt,
            ranks: Vec::new(),
            exit: Some((-1, detail)),
        };
        if std::fs::create_dir_all(&dir).is_ok() {
            let _ = rank::save(&dir, &record);
        }
        Attempt {
            record,
            dir,
            children: BTreeMap::new(),
            exits: BTreeMap::new(),
            signaled: None,
            killed: false,
            reported: false,
            assigned: true,
        }
    }

    fn attempt_dir(&self, job: u64, attempt: u32) -> PathBuf {
        self.config
            .state_dir
            .join("attempts")
            .join(format!("{job}-{attempt}"))
    }

    /// Starts the node's ranks of an assignment; a rank that cannot start fails the attempt.
    fn start(&self, assignment: &Assignment) -> Attempt {
        let spec = assignment.spec.clone().unwrap_or_default();
        let dir = self.attempt_dir(assignment.job_id, assignment.attempt);
        let logs = self
            .config
            .log_dir
            .join(assignment.job_id.to_string())
            .join(format!("attempt-{}", assignment.attempt));
        let checkpoint = if spec.checkpoint_dir.is_empty() {
            self.config
                .log_dir
                .join(assignment.job_id.to_string())
                .join("checkpoint")
        } else {
            PathBuf::from(&spec.checkpoint_dir)
        };
        let mut attempt = Attempt {
            record: AttemptRecord {
                job_id: assignment.job_id,
                attempt: assignment.attempt,
                ranks: Vec::new(),
                exit: None,
            },
            dir: dir.clone(),
            children: BTreeMap::new(),
            exits: BTreeMap::new(),
            signaled: None,
            killed: false,
            reported: false,
            assigned: true,
        };
        let prepared = [&dir, &rank::control_dir(&dir), &logs, &checkpoint]
            .iter()
            .try_for_each(std::fs::create_dir_all)
            .and_then(|()| rank::save(&dir, &attempt.record));
        if let Err(error) = prepared {
            attempt.record.exit = Some((
                -1,
                format!("cannot prepare the ranks' directories: {error}"),
            ));
            return attempt;
        }
        tracing::info!(
            job = assignment.job_id,
            attempt = assignment.attempt,
            ranks = assignment.ranks,
            "starting"
        );
        for local in 0..assignment.ranks {
            let rank_id = assignment.first_rank + local;
            match self.spawn_rank(assignment, &spec, local, &dir, &logs, &checkpoint) {
                Ok((child, record)) => {
                    self.metrics.starts.inc();
                    attempt.children.insert(rank_id, child);
                    attempt.record.ranks.push(record);
                    if let Err(error) = rank::save(&dir, &attempt.record) {
                        tracing::warn!(%error, "cannot save the attempt record");
                    }
                }
                Err(error) => {
                    let detail = format!("rank {rank_id} could not start: {error}");
                    tracing::warn!(%detail);
                    attempt.signal_all(Signal::SIGKILL);
                    attempt.killed = true;
                    attempt.record.exit = Some((127, detail));
                    let _ = rank::save(&dir, &attempt.record);
                    break;
                }
            }
        }
        attempt
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_rank(
        &self,
        assignment: &Assignment,
        spec: &hai_proto::JobSpec,
        local: u32,
        dir: &Path,
        logs: &Path,
        checkpoint: &Path,
    ) -> std::io::Result<(tokio::process::Child, RankRecord)> {
        let rank_id = assignment.first_rank + local;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("rank-{rank_id}.log")))?;
        let mut command = tokio::process::Command::new(&self.exe);
        command
            .arg("rank-exec")
            .arg("--exit-file")
            .arg(rank::exit_file(dir, rank_id))
            .arg("--")
            .args(&spec.command)
            .envs(spec.env.iter().map(|v| (&v.name, &v.value)))
            .env("RANK", rank_id.to_string())
            .env("WORLD_SIZE", assignment.world_size.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", assignment.ranks.to_string())
            .env("MASTER_ADDR", &assignment.master_addr)
            .env("MASTER_PORT", assignment.master_port.to_string())
            .env("HAI_JOB_ID", assignment.job_id.to_string())
            .env("HAI_ATTEMPT", assignment.attempt.to_string())
            .env("HAI_CHECKPOINT_DIR", checkpoint)
            .env("HAI_CONTROL_DIR", rank::control_dir(dir))
            .env("HAI_NODE", &self.name)
            .env("HFREDUCE_NODE_ID", &self.name)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false);
        if !spec.workdir.is_empty() {
            command.current_dir(&spec.workdir);
        }
        let child = command.spawn()?;
        let pid = child.id().map_or(0, |p| p as i32);
        let start_time = rank::start_time(pid).unwrap_or(0);
        Ok((
            child,
            RankRecord {
                rank: rank_id,
                pid,
                start_time,
            },
        ))
    }

    /// Checks every attempt; forgets those reported and no longer assigned. Whether an attempt
    /// ended since the last check.
    fn poll(&mut self) -> bool {
        let grace = self.config.stop_grace.get();
        let mut ended = false;
        for attempt in self.attempts.values_mut() {
            attempt.poll(grace);
            if attempt.record.exit.is_none()
                && let Some(outcome) = attempt.outcome()
            {
                tracing::info!(
                    job = attempt.record.job_id,
                    attempt = attempt.record.attempt,
                    code = outcome.0,
                    "ranks ended"
                );
                let outcome_label = if outcome.0 == 0 { "ok" } else { "failed" };
                self.metrics.exits.with_label_values(&[outcome_label]).inc();
                attempt.record.exit = Some(outcome);
                ended = true;
                let _ = rank::save(&attempt.dir, &attempt.record);
            }
        }
        self.metrics.ranks.set(
            self.attempts
                .values()
                .map(|a| a.alive().count() as i64)
                .sum(),
        );
        let done: Vec<(u64, u32)> = self
            .attempts
            .values()
            .filter(|a| a.reported && !a.assigned)
            .map(Attempt::key)
            .collect();
        for key in done {
            if let Some(attempt) = self.attempts.remove(&key) {
                let _ = std::fs::remove_dir_all(&attempt.dir);
            }
        }
        ended
    }

    /// Tells the leader this node lives and which attempts ended here.
    async fn heartbeat(&mut self) {
        let exited: Vec<RankExit> = self
            .attempts
            .values()
            .filter(|a| !a.reported)
            .filter_map(|a| {
                let (exit_code, detail) = a.record.exit.clone()?;
                Some(RankExit {
                    job_id: a.record.job_id,
                    attempt: a.record.attempt,
                    exit_code,
                    detail,
                })
            })
            .collect();
        let request = HeartbeatRequest {
            node: Some(self.node_record()),
            exited: exited.clone(),
        };
        let token = self.token.clone();
        let sent = self
            .client
            .call_idempotent(|channel| {
                let request = ff_rpc::with_token(tonic::Request::new(request.clone()), &token);
                async move { AgentClient::new(channel).heartbeat(request).await }
            })
            .await;
        match sent {
            Ok(_) => {
                for exit in exited {
                    if let Some(attempt) = self.attempts.get_mut(&(exit.job_id, exit.attempt)) {
                        attempt.reported = true;
                    }
                }
            }
            Err(status) => {
                self.metrics.heartbeat_failures.inc();
                tracing::warn!(code = ?status.code(), message = status.message(), "heartbeat failed");
            }
        }
    }
}

/// Follows the leader's assignments for `node`, reconnecting whenever the stream ends, fails
/// or goes silent; forwards every update.
async fn watch(
    client: ff_rpc::LeaderClient,
    token: String,
    node: String,
    updates: mpsc::Sender<Assignments>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let opened = client
            .call_idempotent(|channel| {
                let request = ff_rpc::with_token(
                    tonic::Request::new(WatchRequest { node: node.clone() }),
                    &token,
                );
                async move { AgentClient::new(channel).watch(request).await }
            })
            .await;
        match opened {
            Ok(mut stream) => {
                backoff = Duration::from_millis(100);
                loop {
                    match tokio::time::timeout(WATCH_SILENCE, stream.message()).await {
                        Ok(Ok(Some(update))) => {
                            if updates.send(update).await.is_err() {
                                return;
                            }
                        }
                        Ok(Ok(None)) => break,
                        Ok(Err(status)) => {
                            tracing::debug!(message = status.message(), "watch stream ended");
                            break;
                        }
                        Err(_) => {
                            tracing::warn!("watch stream silent; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "cannot watch assignments");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
