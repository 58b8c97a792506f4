//! The raft loop: the one task that owns a node's `RawNode`.
//!
//! It ticks the logical clock, steps messages from peers, turns local requests into proposals
//! and read-index requests, and handles every `Ready` exactly as raft-rs requires: messages a
//! leader may send before persisting go out first; a snapshot is installed, then entries and
//! hard state are written to the log (fsync'd when raft-rs says `must_sync`); only then go the
//! messages that depend on persistence; then `advance_append`, whose `LightReady` is handled
//! the same way. Committed entries go to the apply worker (`apply`), which applies them to the
//! state machine while the loop persists and replicates the next ones; its results come back
//! here, where waiters are answered and `advance_apply_to` is called. Log writes run on the
//! blocking pool; while one runs, new requests queue up and are carried by the next `Ready` —
//! that is the group commit.
//!
//! Proposals are remembered by the (index, term) raft gave them. When that entry is applied
//! the waiter gets the state machine's response; if another entry lands at that index, or this
//! node stops being leader, the waiter is told `LeadershipLost` and the caller retries with the
//! same request id, which the apply path deduplicates.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType,
    Snapshot, SnapshotMetadata,
};
use raft::{RawNode, ReadState, SnapshotStatus, StateRole};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};

use crate::apply::{Applied, ApplyTask};
use crate::config::RaftConfig;
use crate::db::IndexTerm;
use crate::error::RaftError;
use crate::log_store::{LogBatch, LogOutcome, LogStore, RaftStorage};
use crate::log_writer::{LogTask, Persisted};
use crate::metrics::RaftMetrics;
use crate::node::{GroupStatus, MemberStatus, Role};
use crate::proto::{MemberContext, SnapshotDescriptor};
use crate::snapshot;
use crate::state_store::{AppliedResult, ConfOutcome, MemberUpdate, StateStore};
use crate::transport::{PeerEvent, Transport};

/// Most queued events or requests handled per loop turn before the loop looks at `Ready`.
const DRAIN_LIMIT: usize = 4096;

/// A request from this process to the raft loop.
#[derive(Debug)]
pub(crate) enum Command {
    /// Append an encoded `Proposal`; answered when it is applied.
    Propose {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, RaftError>>,
    },
    /// Propose a membership change; answered when it is applied.
    ConfChange {
        change: ConfChange,
        reply: oneshot::Sender<Result<(), RaftError>>,
    },
    /// Obtain a read index; answered with it once this node has applied up to it.
    Read {
        reply: oneshot::Sender<Result<u64, RaftError>>,
    },
    /// Ask raft to hand leadership to `to`.
    TransferLeader { to: u64 },
}

enum Waiter {
    Proposal(oneshot::Sender<Result<Vec<u8>, RaftError>>),
    ConfChange(oneshot::Sender<Result<(), RaftError>>),
}

impl Waiter {
    fn fail(self, error: RaftError) {
        match self {
            Waiter::Proposal(reply) => {
                let _ = reply.send(Err(error));
            }
            Waiter::ConfChange(reply) => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

struct Pending {
    term: u64,
    waiter: Waiter,
}

struct ReadBatch {
    ctx: Vec<u8>,
    waiters: Vec<oneshot::Sender<Result<u64, RaftError>>>,
    issued: Instant,
}

/// What the loop is started with.
pub(crate) struct DriverParts {
    pub id: u64,
    pub config: RaftConfig,
    pub raw: RawNode<RaftStorage>,
    pub log: Arc<LogStore>,
    pub state: Arc<StateStore>,
    pub snapshot_dir: PathBuf,
    pub transport: Arc<Transport>,
    pub metrics: RaftMetrics,
    pub commands: mpsc::Receiver<Command>,
    pub events: mpsc::Receiver<PeerEvent>,
    pub shutdown: watch::Receiver<bool>,
    pub status: Arc<watch::Sender<GroupStatus>>,
    pub applied: IndexTerm,
    pub conf_state: ConfState,
    pub members: BTreeMap<u64, String>,
}

type GeneratedSnapshot = Result<(SnapshotMetadata, SnapshotDescriptor), RaftError>;

/// Everything the loop owns.
pub(crate) struct Driver {
    id: u64,
    config: RaftConfig,
    raw: RawNode<RaftStorage>,
    log: Arc<LogStore>,
    state: Arc<StateStore>,
    snapshot_dir: PathBuf,
    transport: Arc<Transport>,
    metrics: RaftMetrics,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Receiver<PeerEvent>,
    shutdown: watch::Receiver<bool>,
    status: Arc<watch::Sender<GroupStatus>>,
    /// Staged log batches on their way to the log writer, and its results.
    log_tasks: Option<mpsc::Sender<LogTask>>,
    log_results: mpsc::Receiver<Result<Persisted, RaftError>>,
    log_thread: Option<std::thread::JoinHandle<()>>,
    /// Batches handed to the log writer and not yet reported durable.
    log_writes_in_flight: usize,
    /// Number of the last `Ready` taken from raft-rs.
    last_ready: u64,
    /// Messages that may only leave once their `Ready` (by number) is durable.
    awaiting_persistence: VecDeque<(u64, Vec<Message>)>,
    /// Committed entries on their way to the apply worker, and its results.
    apply_tasks: Option<mpsc::Sender<ApplyTask>>,
    apply_results: mpsc::Receiver<Result<Applied, RaftError>>,
    apply_thread: Option<std::thread::JoinHandle<()>>,
    /// Position of the last entry the apply worker reported applied.
    applied: IndexTerm,
    /// Highest index whose application is durable; the log is never compacted past it.
    durable_applied: u64,
    /// A commit index learned from a `LightReady`, written with the next log write.
    pending_commit: Option<u64>,
    /// The configuration as of the last membership change handed to the apply worker.
    conf_state: ConfState,
    /// Member addresses as last applied.
    members: BTreeMap<u64, String>,
    /// Proposals and membership changes appended by this leader, by log index.
    pending: BTreeMap<u64, Pending>,
    /// Reads not yet handed to raft.
    queued_reads: Vec<oneshot::Sender<Result<u64, RaftError>>>,
    /// Reads waiting for their read index.
    reads_in_flight: Vec<ReadBatch>,
    /// Reads that have a read index and wait for it to be applied.
    reads_waiting_apply: Vec<(u64, oneshot::Sender<Result<u64, RaftError>>)>,
    next_read_ctx: u64,
    snapshot_results: mpsc::Receiver<GeneratedSnapshot>,
    snapshot_results_tx: mpsc::Sender<GeneratedSnapshot>,
    generating_snapshot: bool,
    role: StateRole,
}

impl Driver {
    pub(crate) fn new(parts: DriverParts) -> Result<Self, RaftError> {
        let (snapshot_results_tx, snapshot_results) = mpsc::channel(1);
        let (apply_tasks, apply_rx) = mpsc::channel(crate::apply::APPLY_QUEUE_CAPACITY);
        let (results_tx, apply_results) = mpsc::channel(crate::apply::APPLY_QUEUE_CAPACITY);
        let (log_tasks, log_rx) = mpsc::channel(crate::log_writer::LOG_QUEUE_CAPACITY);
        let (log_results_tx, log_results) = mpsc::channel(crate::log_writer::LOG_QUEUE_CAPACITY);
        let log_thread =
            crate::log_writer::spawn(parts.id, parts.log.clone(), log_rx, log_results_tx)
                .map_err(|e| RaftError::Stopped(format!("cannot start the log thread: {e}")))?;
        let apply_thread = crate::apply::spawn(
            parts.id,
            durable_every(&parts.config),
            parts.state.clone(),
            parts.snapshot_dir.clone(),
            parts.applied,
            apply_rx,
            results_tx,
        )
        .map_err(|e| RaftError::Stopped(format!("cannot start the apply thread: {e}")))?;
        Ok(Driver {
            id: parts.id,
            config: parts.config,
            raw: parts.raw,
            log: parts.log,
            state: parts.state,
            snapshot_dir: parts.snapshot_dir,
            transport: parts.transport,
            metrics: parts.metrics,
            commands: parts.commands,
            events: parts.events,
            shutdown: parts.shutdown,
            status: parts.status,
            log_tasks: Some(log_tasks),
            log_results,
            log_thread: Some(log_thread),
            log_writes_in_flight: 0,
            last_ready: 0,
            awaiting_persistence: VecDeque::new(),
            apply_tasks: Some(apply_tasks),
            apply_results,
            apply_thread: Some(apply_thread),
            applied: parts.applied,
            durable_applied: parts.applied.index,
            pending_commit: None,
            conf_state: parts.conf_state,
            members: parts.members,
            pending: BTreeMap::new(),
            queued_reads: Vec::new(),
            reads_in_flight: Vec::new(),
            reads_waiting_apply: Vec::new(),
            // Random, so that a late answer meant for a previous run of this node never
            // matches a read of this one.
            next_read_ctx: rand::random(),
            snapshot_results,
            snapshot_results_tx,
            generating_snapshot: false,
            role: StateRole::Follower,
        })
    }

    /// Runs until shutdown or a fatal storage error.
    pub(crate) async fn run(mut self) -> Result<(), RaftError> {
        let mut ticker = tokio::time::interval(self.config.tick_interval.get());
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let result = self.run_loop(&mut ticker).await;
        self.fail_everything(&match &result {
            Ok(()) => "the node is shutting down".to_string(),
            Err(error) => format!("the node failed: {error}"),
        });
        // Closing the queues lets the workers finish what they have and make it durable.
        self.log_tasks = None;
        self.apply_tasks = None;
        let threads = [self.log_thread.take(), self.apply_thread.take()];
        for thread in threads.into_iter().flatten() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        result
    }

    async fn run_loop(&mut self, ticker: &mut tokio::time::Interval) -> Result<(), RaftError> {
        loop {
            let accepting = self.outstanding() < self.config.max_pending_proposals;
            tokio::select! {
                biased;
                changed = self.shutdown.changed() => {
                    if changed.is_err() || *self.shutdown.borrow() {
                        return Ok(());
                    }
                }
                _ = ticker.tick() => {
                    self.raw.tick();
                }
                Some(result) = self.log_results.recv() => self.on_persisted(&result?),
                Some(result) = self.apply_results.recv() => self.on_applied(result?),
                Some(result) = self.snapshot_results.recv() => self.on_snapshot_generated(result),
                Some(event) = self.events.recv() => self.on_event(event),
                Some(command) = self.commands.recv(), if accepting => self.on_command(command),
            }
            while let Ok(result) = self.log_results.try_recv() {
                self.on_persisted(&result?);
            }
            while let Ok(result) = self.apply_results.try_recv() {
                self.on_applied(result?);
            }
            for _ in 0..DRAIN_LIMIT {
                match self.events.try_recv() {
                    Ok(event) => self.on_event(event),
                    Err(_) => break,
                }
            }
            for _ in 0..DRAIN_LIMIT {
                if self.outstanding() >= self.config.max_pending_proposals {
                    break;
                }
                match self.commands.try_recv() {
                    Ok(command) => self.on_command(command),
                    Err(_) => break,
                }
            }
            self.issue_reads();
            if self.raw.has_ready() {
                self.handle_ready().await?;
            }
            self.maybe_compact().await?;
            self.maybe_generate_snapshot();
            self.publish_status();
        }
    }

    /// Requests accepted from the queue and not answered yet; bounded by
    /// `max_pending_proposals`, beyond which callers wait in the bounded request queue.
    fn outstanding(&self) -> usize {
        self.pending.len()
            + self.queued_reads.len()
            + self
                .reads_in_flight
                .iter()
                .map(|b| b.waiters.len())
                .sum::<usize>()
            + self.reads_waiting_apply.len()
    }

    fn on_event(&mut self, event: PeerEvent) {
        match event {
            PeerEvent::Messages(messages) => {
                for message in messages {
                    self.step(message);
                }
            }
            PeerEvent::Unreachable(id) => self.raw.report_unreachable(id),
            PeerEvent::SnapshotStatus(id, ok) => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(id, status);
            }
        }
    }

    fn step(&mut self, message: Message) {
        let incoming_file = (message.get_msg_type() == MessageType::MsgSnapshot)
            .then(|| snapshot_file(message.get_snapshot()))
            .flatten();
        if let Err(error) = self.raw.step(message) {
            tracing::debug!(%error, "raft refused a message");
        }
        if let Some(file) = incoming_file {
            // raft keeps a snapshot it accepted until the next Ready installs it; the file of
            // one it refused (stale, or from an old term) is useless.
            let accepted =
                self.raw.snap().and_then(snapshot_file).as_deref() == Some(file.as_str());
            if !accepted {
                let _ = std::fs::remove_file(self.snapshot_dir.join(&file));
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Propose { data, reply } => {
                if let Some(error) = self.not_leader() {
                    let _ = reply.send(Err(error));
                    return;
                }
                match self.raw.propose(vec![], data) {
                    Ok(()) => self.track(Waiter::Proposal(reply)),
                    Err(error) => {
                        tracing::debug!(%error, "proposal dropped by raft");
                        let _ = reply.send(Err(RaftError::LeadershipLost));
                    }
                }
            }
            Command::ConfChange { change, reply } => {
                if let Some(error) = self.not_leader() {
                    let _ = reply.send(Err(error));
                    return;
                }
                match self.raw.propose_conf_change(vec![], change) {
                    Ok(()) => self.track(Waiter::ConfChange(reply)),
                    Err(error) => {
                        let _ = reply.send(Err(RaftError::Membership(error.to_string())));
                    }
                }
            }
            Command::Read { reply } => self.queued_reads.push(reply),
            Command::TransferLeader { to } => self.raw.transfer_leader(to),
        }
    }

    fn not_leader(&self) -> Option<RaftError> {
        if self.raw.raft.state == StateRole::Leader {
            return None;
        }
        let leader = self.raw.raft.leader_id;
        let hint = self.members.get(&leader).map(|addr| ff_rpc::LeaderHint {
            id: leader,
            addr: addr.clone(),
        });
        Some(RaftError::NotLeader { leader: hint })
    }

    /// Remembers the entry raft just appended for `waiter`.
    fn track(&mut self, waiter: Waiter) {
        let index = self.raw.raft.raft_log.last_index();
        let term = self.raw.raft.term;
        if let Some(old) = self.pending.insert(index, Pending { term, waiter }) {
            old.waiter.fail(RaftError::LeadershipLost);
        }
        self.metrics
            .pending_proposals
            .set(self.pending.len() as i64);
    }

    fn issue_reads(&mut self) {
        let retry_after = self.config.tick_interval.get() * self.config.heartbeat_ticks as u32 * 2;
        let now = Instant::now();
        for batch in &mut self.reads_in_flight {
            batch.waiters.retain(|w| !w.is_closed());
            if !batch.waiters.is_empty() && now.duration_since(batch.issued) >= retry_after {
                // raft-rs drops read requests silently when there is no leader or the leader has
                // not yet committed in its term; ask again.
                self.raw.read_index(batch.ctx.clone());
                batch.issued = now;
            }
        }
        self.reads_in_flight.retain(|b| !b.waiters.is_empty());
        if self.queued_reads.is_empty() {
            return;
        }
        self.next_read_ctx = self.next_read_ctx.wrapping_add(1);
        let ctx = self.next_read_ctx.to_le_bytes().to_vec();
        self.raw.read_index(ctx.clone());
        self.reads_in_flight.push(ReadBatch {
            ctx,
            waiters: std::mem::take(&mut self.queued_reads),
            issued: now,
        });
    }

    fn on_read_states(&mut self, states: Vec<ReadState>) {
        for state in states {
            if let Some(position) = self
                .reads_in_flight
                .iter()
                .position(|b| b.ctx == state.request_ctx)
            {
                let batch = self.reads_in_flight.swap_remove(position);
                for waiter in batch.waiters {
                    self.reads_waiting_apply.push((state.index, waiter));
                }
            }
        }
        self.resolve_reads();
    }

    fn resolve_reads(&mut self) {
        let applied = self.applied.index;
        let waiting = std::mem::take(&mut self.reads_waiting_apply);
        for (index, waiter) in waiting {
            if index <= applied {
                let _ = waiter.send(Ok(index));
            } else if !waiter.is_closed() {
                self.reads_waiting_apply.push((index, waiter));
            }
        }
    }

    async fn handle_ready(&mut self) -> Result<(), RaftError> {
        let mut ready = self.raw.ready();
        if let Some(soft) = ready.ss() {
            self.on_role(soft.raft_state);
        }
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        if !ready.snapshot().is_empty() {
            return self.handle_snapshot_ready(ready).await;
        }
        let committed = ready.take_committed_entries();
        if !committed.is_empty() {
            self.apply(committed).await?;
        }
        let mut batch = LogBatch {
            entries: ready.take_entries(),
            hard_state: ready.hs().cloned(),
            commit: self.pending_commit.take(),
            sync: ready.must_sync(),
            ..LogBatch::default()
        };
        let persisted_messages = ready.take_persisted_messages();
        let read_states = ready.take_read_states();
        let number = ready.number();
        if !batch.is_empty() {
            // raft-rs must be able to read the batch before advance_append_async.
            self.log.stage(&mut batch)?;
            self.log_writes_in_flight += 1;
            let tasks = self
                .log_tasks
                .as_ref()
                .ok_or_else(|| RaftError::Stopped("the log thread stopped".to_string()))?;
            tasks
                .send(LogTask::Write {
                    batch,
                    ready: Some(number),
                })
                .await
                .map_err(|_| RaftError::Stopped("the log thread stopped".to_string()))?;
        }
        self.raw.advance_append_async(ready);
        // Only a Ready that has been advanced may be reported persisted.
        self.last_ready = number;
        self.awaiting_persistence
            .push_back((number, persisted_messages));
        if self.log_writes_in_flight == 0 {
            self.all_persisted();
        }
        self.on_read_states(read_states);
        Ok(())
    }

    /// Takes a report of the log writer: raft-rs learns what is durable, and the messages that
    /// waited for it leave.
    fn on_persisted(&mut self, persisted: &Persisted) {
        self.after_log_write(&persisted.outcome);
        self.log_writes_in_flight -= persisted.batches;
        if self.log_writes_in_flight == 0 {
            self.all_persisted();
            return;
        }
        if let Some(number) = persisted.ready {
            self.raw.on_persist_ready(number);
            self.release_messages(number);
        }
    }

    /// Nothing is in flight: every `Ready` taken so far is durable.
    fn all_persisted(&mut self) {
        self.raw.on_persist_ready(self.last_ready);
        self.release_messages(self.last_ready);
    }

    fn release_messages(&mut self, up_to: u64) {
        while self
            .awaiting_persistence
            .front()
            .is_some_and(|(n, _)| *n <= up_to)
        {
            if let Some((_, messages)) = self
                .awaiting_persistence
                .pop_front()
                .filter(|(_, m)| !m.is_empty())
            {
                self.transport.send(messages);
            }
        }
    }

    /// A `Ready` with a snapshot from the leader is handled synchronously: everything queued
    /// for the log is made durable first, the snapshot is installed, the log restarts after it.
    async fn handle_snapshot_ready(&mut self, mut ready: raft::Ready) -> Result<(), RaftError> {
        self.drain_log_writer().await?;
        let snapshot = ready.snapshot().clone();
        let position = self.install_snapshot(snapshot).await?;
        let batch = LogBatch {
            install: Some(position),
            entries: ready.take_entries(),
            hard_state: ready.hs().cloned(),
            commit: self.pending_commit.take(),
            sync: true,
            ..LogBatch::default()
        };
        let outcome = self.write_log(batch).await?;
        self.after_log_write(&outcome);
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        let read_states = ready.take_read_states();
        let mut committed = ready.take_committed_entries();
        let number = ready.number();
        let mut light = self.raw.advance_append(ready);
        self.last_ready = number;
        // raft-rs learns the snapshot is persisted in advance_append; only then may the applied
        // index move to it.
        self.raw.advance_apply_to(position.index);
        if !light.messages().is_empty() {
            self.transport.send(light.take_messages());
        }
        committed.append(&mut light.take_committed_entries());
        if let Some(commit) = light.commit_index() {
            self.pending_commit = Some(commit);
        }
        if !committed.is_empty() {
            self.apply(committed).await?;
        }
        self.on_read_states(read_states);
        Ok(())
    }

    /// Waits until the log writer has made everything queued durable and processes its reports.
    async fn drain_log_writer(&mut self) -> Result<(), RaftError> {
        if self.log_writes_in_flight == 0 {
            return Ok(());
        }
        let (done, drained) = oneshot::channel();
        let tasks = self
            .log_tasks
            .as_ref()
            .ok_or_else(|| RaftError::Stopped("the log thread stopped".to_string()))?;
        tasks
            .send(LogTask::Barrier(done))
            .await
            .map_err(|_| RaftError::Stopped("the log thread stopped".to_string()))?;
        drained
            .await
            .map_err(|_| RaftError::Stopped("the log thread stopped".to_string()))?;
        while let Ok(result) = self.log_results.try_recv() {
            self.on_persisted(&result?);
        }
        Ok(())
    }

    /// Hands committed entries to the apply worker.
    async fn apply(&mut self, committed: Vec<Entry>) -> Result<(), RaftError> {
        let conf_changes = self.prepare_conf_changes(&committed);
        self.hand_to_apply(ApplyTask::Entries {
            entries: committed,
            conf_changes,
        })
        .await
    }

    /// Installs a snapshot from the leader into the state machine (through the apply worker,
    /// after everything handed to it before); returns the position the log restarts from.
    async fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<IndexTerm, RaftError> {
        let (done, answer) = oneshot::channel();
        self.hand_to_apply(ApplyTask::Restore { snapshot, done })
            .await?;
        let restored = answer
            .await
            .map_err(|_| RaftError::Stopped("the apply thread stopped".to_string()))??;
        // Results of entries applied before the snapshot are still queued; take them first.
        while let Ok(result) = self.apply_results.try_recv() {
            self.on_applied(result?);
        }
        tracing::info!(
            node = self.id,
            index = restored.applied.index,
            "snapshot installed"
        );
        self.applied = restored.applied;
        self.durable_applied = restored.applied.index;
        self.conf_state = restored.conf_state;
        self.transport.set_members(&restored.members);
        self.members = restored.members;
        self.resolve_reads();
        Ok(restored.applied)
    }

    async fn hand_to_apply(&self, task: ApplyTask) -> Result<(), RaftError> {
        let tasks = self
            .apply_tasks
            .as_ref()
            .ok_or_else(|| RaftError::Stopped("the apply thread stopped".to_string()))?;
        tasks
            .send(task)
            .await
            .map_err(|_| RaftError::Stopped("the apply thread stopped".to_string()))
    }

    fn on_role(&mut self, role: StateRole) {
        if self.role == StateRole::Leader && role != StateRole::Leader {
            // Entries this leader appended may still commit under the next leader, or be
            // overwritten; either way the caller's retry (same request id) finds out exactly once.
            let pending = std::mem::take(&mut self.pending);
            for (_, p) in pending {
                p.waiter.fail(RaftError::LeadershipLost);
            }
            self.metrics.pending_proposals.set(0);
        }
        if role != self.role {
            tracing::info!(node = self.id, term = self.raw.raft.term, role = ?role, leader = self.raw.raft.leader_id, "raft role changed");
        }
        self.role = role;
    }

    /// Applies membership changes to raft's configuration as they are handed over for applying;
    /// the storage write records the outcome in the same transaction as everything else.
    fn prepare_conf_changes(&mut self, committed: &[Entry]) -> BTreeMap<u64, ConfOutcome> {
        let mut outcomes = BTreeMap::new();
        for entry in committed {
            let outcome = match entry.get_entry_type() {
                EntryType::EntryConfChange => match ConfChange::parse_from_bytes(&entry.data) {
                    Ok(change) => {
                        let member = member_update(&change);
                        match self.raw.apply_conf_change(&change) {
                            Ok(conf_state) => ConfOutcome::Applied { conf_state, member },
                            Err(error) => ConfOutcome::Rejected(error.to_string()),
                        }
                    }
                    Err(error) => {
                        ConfOutcome::Rejected(format!("undecodable conf change: {error}"))
                    }
                },
                EntryType::EntryConfChangeV2 => match ConfChangeV2::parse_from_bytes(&entry.data) {
                    Ok(change) => match self.raw.apply_conf_change(&change) {
                        Ok(conf_state) => ConfOutcome::Applied {
                            conf_state,
                            member: MemberUpdate::Unchanged,
                        },
                        Err(error) => ConfOutcome::Rejected(error.to_string()),
                    },
                    Err(error) => {
                        ConfOutcome::Rejected(format!("undecodable conf change: {error}"))
                    }
                },
                EntryType::EntryNormal => continue,
            };
            if let ConfOutcome::Applied { conf_state, .. } = &outcome {
                self.conf_state = conf_state.clone();
            }
            outcomes.insert(entry.index, outcome);
        }
        outcomes
    }

    async fn write_log(&self, batch: LogBatch) -> Result<LogOutcome, RaftError> {
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || log.write(batch))
            .await
            .map_err(|e| RaftError::Stopped(format!("log write task failed: {e}")))?
            .map_err(RaftError::from)
    }

    fn after_log_write(&self, outcome: &LogOutcome) {
        if let Some(time) = outcome.sync_time {
            self.metrics.fsync_seconds.observe(time.as_secs_f64());
            self.metrics
                .write_batch_entries
                .observe(outcome.appended as f64);
        }
        if outcome.compacted {
            self.metrics.compactions.inc();
        }
    }

    /// Takes a result of the apply worker: records progress and answers waiters.
    fn on_applied(&mut self, applied: Applied) {
        self.applied = applied.applied;
        self.durable_applied = applied.durable;
        self.raw.advance_apply_to(applied.applied.index);
        if !applied.entries.is_empty() {
            self.metrics
                .apply_batch_entries
                .observe(applied.entries.len() as f64);
            self.metrics
                .apply_seconds
                .observe(applied.elapsed.as_secs_f64());
        }
        if let Some(members) = applied.members {
            self.transport.set_members(&members);
            self.members = members;
        }
        // Whoever gets an answer below must already see its entry in the status.
        self.publish_status();
        let mut last_applied = None;
        for entry in applied.entries {
            last_applied = Some(entry.index);
            let Some(pending) = self.pending.remove(&entry.index) else {
                continue;
            };
            if pending.term != entry.term {
                pending.waiter.fail(RaftError::LeadershipLost);
                continue;
            }
            match (pending.waiter, entry.result) {
                (Waiter::Proposal(reply), AppliedResult::Proposal(result)) => {
                    let _ = reply.send(result.map_err(RaftError::InvalidCommand));
                }
                (Waiter::ConfChange(reply), AppliedResult::ConfChange(result)) => {
                    let _ = reply.send(result.map_err(RaftError::Membership));
                }
                (Waiter::ConfChange(reply), _) => {
                    // raft-rs turns a membership change into an empty entry while another one
                    // is still unapplied.
                    let _ = reply.send(Err(RaftError::MembershipBusy));
                }
                (waiter, _) => waiter.fail(RaftError::LeadershipLost),
            }
        }
        if let Some(index) = last_applied {
            // Anything still waiting at or below the applied index was overwritten.
            let rest = self.pending.split_off(&(index + 1));
            let overwritten = std::mem::replace(&mut self.pending, rest);
            for (_, p) in overwritten {
                p.waiter.fail(RaftError::LeadershipLost);
            }
            self.metrics
                .pending_proposals
                .set(self.pending.len() as i64);
        }
        self.resolve_reads();
    }

    /// Compacts the log once it holds `snapshot_threshold` applied entries, keeping
    /// `log_retain_entries`, and never past what the state machine has made durable.
    async fn maybe_compact(&mut self) -> Result<(), RaftError> {
        let truncated = self.log.truncated().index;
        if self.applied.index.saturating_sub(truncated) < self.config.snapshot_threshold {
            return Ok(());
        }
        let target = self
            .durable_applied
            .min(self.applied.index)
            .saturating_sub(self.config.log_retain_entries);
        if target <= truncated {
            return Ok(());
        }
        let mut batch = LogBatch {
            compact_to: Some(target),
            ..LogBatch::default()
        };
        self.log.stage(&mut batch)?;
        self.log_writes_in_flight += 1;
        let tasks = self
            .log_tasks
            .as_ref()
            .ok_or_else(|| RaftError::Stopped("the log thread stopped".to_string()))?;
        tasks
            .send(LogTask::Write { batch, ready: None })
            .await
            .map_err(|_| RaftError::Stopped("the log thread stopped".to_string()))?;
        tracing::debug!(node = self.id, to = target, "log compaction queued");
        Ok(())
    }

    fn maybe_generate_snapshot(&mut self) {
        if self.generating_snapshot || !self.log.take_snapshot_request() {
            return;
        }
        self.generating_snapshot = true;
        let state = self.state.clone();
        let dir = self.snapshot_dir.clone();
        let cluster = self.config.cluster.clone();
        let results = self.snapshot_results_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = snapshot::generate(state.db(), state.machine().as_ref(), &dir, &cluster);
            let _ = results.blocking_send(result);
        });
    }

    fn on_snapshot_generated(&mut self, result: GeneratedSnapshot) {
        self.generating_snapshot = false;
        match result {
            Ok((metadata, descriptor)) => {
                tracing::info!(
                    node = self.id,
                    index = metadata.index,
                    bytes = descriptor.size,
                    "snapshot generated"
                );
                self.metrics.snapshots_generated.inc();
                self.log
                    .set_latest_snapshot(&self.snapshot_dir, metadata, descriptor);
            }
            Err(error) => tracing::error!(node = self.id, %error, "snapshot generation failed"),
        }
    }

    fn publish_status(&mut self) {
        let raft = &self.raw.raft;
        let conf = &self.conf_state;
        let applied = self.applied.index;
        let (first_index, last_index) = self.log.first_and_last();
        let is_leader = raft.state == StateRole::Leader;
        let in_voters = conf.voters.contains(&self.id);
        let in_learners = conf.learners.contains(&self.id);
        let role = match raft.state {
            StateRole::Leader => Role::Leader,
            StateRole::Candidate => Role::Candidate,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Follower if in_learners => Role::Learner,
            // A configuration that exists but names neither: this node was removed.
            StateRole::Follower if !in_voters && !conf.voters.is_empty() => Role::Removed,
            StateRole::Follower => Role::Follower,
        };
        let member = |id: u64, voter: bool| MemberStatus {
            id,
            addr: self.members.get(&id).cloned().unwrap_or_default(),
            voter,
            matched: if is_leader {
                raft.prs().get(id).map_or(0, |p| p.matched)
            } else {
                0
            },
        };
        let mut members: Vec<MemberStatus> =
            conf.voters.iter().map(|id| member(*id, true)).collect();
        members.extend(conf.learners.iter().map(|id| member(*id, false)));
        members.sort_by_key(|m| m.id);
        let status = GroupStatus {
            id: self.id,
            cluster: self.config.cluster.clone(),
            role,
            term: raft.term,
            leader_id: raft.leader_id,
            leader_addr: self
                .members
                .get(&raft.leader_id)
                .cloned()
                .or_else(|| self.transport.address_of(raft.leader_id)),
            commit_index: raft.raft_log.committed,
            applied_index: applied,
            first_index,
            last_index,
            members,
        };
        self.metrics.term.set(status.term as i64);
        self.metrics.commit_index.set(status.commit_index as i64);
        self.metrics.applied_index.set(applied as i64);
        self.metrics.first_index.set(first_index as i64);
        self.metrics.last_index.set(last_index as i64);
        self.metrics.leader_id.set(status.leader_id as i64);
        self.metrics.is_leader.set(i64::from(is_leader));
        self.status.send_if_modified(|current| {
            if *current == status {
                false
            } else {
                *current = status;
                true
            }
        });
    }

    fn fail_everything(&mut self, reason: &str) {
        for (_, p) in std::mem::take(&mut self.pending) {
            p.waiter.fail(RaftError::Stopped(reason.to_string()));
        }
        for reply in std::mem::take(&mut self.queued_reads) {
            let _ = reply.send(Err(RaftError::Stopped(reason.to_string())));
        }
        for batch in std::mem::take(&mut self.reads_in_flight) {
            for reply in batch.waiters {
                let _ = reply.send(Err(RaftError::Stopped(reason.to_string())));
            }
        }
        for (_, reply) in std::mem::take(&mut self.reads_waiting_apply) {
            let _ = reply.send(Err(RaftError::Stopped(reason.to_string())));
        }
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Propose { reply, .. } => {
                    let _ = reply.send(Err(RaftError::Stopped(reason.to_string())));
                }
                Command::ConfChange { reply, .. } => {
                    let _ = reply.send(Err(RaftError::Stopped(reason.to_string())));
                }
                Command::Read { reply } => {
                    let _ = reply.send(Err(RaftError::Stopped(reason.to_string())));
                }
                Command::TransferLeader { .. } => {}
            }
        }
        self.status
            .send_modify(|status| status.role = Role::Stopped);
    }
}

/// How many applied entries may trail the last durable apply commit: small enough that the
/// log can be compacted on schedule (compaction never passes the durable point).
fn durable_every(config: &RaftConfig) -> u64 {
    let slack = config
        .snapshot_threshold
        .saturating_sub(config.log_retain_entries)
        / 2;
    slack.clamp(1, 4096)
}

fn snapshot_file(snapshot: &Snapshot) -> Option<String> {
    SnapshotDescriptor::decode(snapshot.get_data())
        .ok()
        .map(|d| d.file)
}

fn member_update(change: &ConfChange) -> MemberUpdate {
    match change.get_change_type() {
        ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
            match MemberContext::decode(change.context.as_ref()) {
                Ok(context) if !context.addr.is_empty() => {
                    MemberUpdate::Add(change.node_id, context.addr)
                }
                _ => MemberUpdate::Unchanged,
            }
        }
        ConfChangeType::RemoveNode => MemberUpdate::Remove(change.node_id),
    }
}

/// How long to wait between checks while waiting for something in the group to change.
pub(crate) const POLL: Duration = Duration::from_millis(20);
