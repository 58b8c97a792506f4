//! The raft loop: the one task that owns a node's `RawNode`.
//!
//! It ticks the logical clock, steps messages from peers, turns local requests into proposals
//! and read-index requests, and handles every `Ready` exactly as raft-rs requires: messages a
//! leader may send before persisting go out first; entries, hard state, snapshot and committed
//! entries are written in one transaction (fsync'd when raft-rs says `must_sync`); only then go
//! the messages that depend on persistence; then `advance`, and the `LightReady` it returns is
//! handled the same way. Storage work runs on the blocking pool; while it runs, new requests
//! queue up and are carried by the next `Ready` — that is the group commit.
//!
//! Proposals are remembered by the (index, term) raft gave them. When that entry is applied
//! the waiter gets the state machine's response; if another entry lands at that index, or this
//! node stops being leader, the waiter is told `LeadershipLost` and the caller retries with the
//! same request id, which the apply path deduplicates.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, MessageType, Snapshot,
    SnapshotMetadata,
};
use raft::{RawNode, ReadState, SnapshotStatus, StateRole};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};

use crate::config::RaftConfig;
use crate::error::RaftError;
use crate::metrics::RaftMetrics;
use crate::node::{GroupStatus, MemberStatus, Role};
use crate::proto::{MemberContext, SnapshotDescriptor};
use crate::snapshot;
use crate::state_machine::ErasedStateMachine;
use crate::storage::{
    AppliedResult, ConfOutcome, LogStore, MemberUpdate, RaftStorage, WriteBatch, WriteOutcome,
};
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
    pub store: Arc<LogStore>,
    pub sm: Arc<dyn ErasedStateMachine>,
    pub transport: Arc<Transport>,
    pub metrics: RaftMetrics,
    pub commands: mpsc::Receiver<Command>,
    pub events: mpsc::Receiver<PeerEvent>,
    pub shutdown: watch::Receiver<bool>,
    pub status: Arc<watch::Sender<GroupStatus>>,
    pub members: BTreeMap<u64, String>,
}

type GeneratedSnapshot = Result<(SnapshotMetadata, SnapshotDescriptor), RaftError>;

/// Everything the loop owns.
pub(crate) struct Driver {
    id: u64,
    config: RaftConfig,
    raw: RawNode<RaftStorage>,
    store: Arc<LogStore>,
    sm: Arc<dyn ErasedStateMachine>,
    transport: Arc<Transport>,
    metrics: RaftMetrics,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Receiver<PeerEvent>,
    shutdown: watch::Receiver<bool>,
    status: Arc<watch::Sender<GroupStatus>>,
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
    pub(crate) fn new(parts: DriverParts) -> Self {
        let (snapshot_results_tx, snapshot_results) = mpsc::channel(1);
        Driver {
            id: parts.id,
            config: parts.config,
            raw: parts.raw,
            store: parts.store,
            sm: parts.sm,
            transport: parts.transport,
            metrics: parts.metrics,
            commands: parts.commands,
            events: parts.events,
            shutdown: parts.shutdown,
            status: parts.status,
            members: parts.members,
            pending: BTreeMap::new(),
            queued_reads: Vec::new(),
            reads_in_flight: Vec::new(),
            reads_waiting_apply: Vec::new(),
            next_read_ctx: 0,
            snapshot_results,
            snapshot_results_tx,
            generating_snapshot: false,
            role: StateRole::Follower,
        }
    }

    /// Runs until shutdown or a fatal storage error.
    pub(crate) async fn run(mut self) -> Result<(), RaftError> {
        let mut ticker = tokio::time::interval(self.config.tick_interval.get());
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let result = self.run_loop(&mut ticker).await;
        self.fail_everything(match &result {
            Ok(()) => "the node is shutting down".to_string(),
            Err(error) => format!("the node failed: {error}"),
        });
        result
    }

    async fn run_loop(&mut self, ticker: &mut tokio::time::Interval) -> Result<(), RaftError> {
        loop {
            let accepting = self.pending.len() < self.config.max_pending_proposals;
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
                Some(result) = self.snapshot_results.recv() => self.on_snapshot_generated(result),
                Some(event) = self.events.recv() => self.on_event(event),
                Some(command) = self.commands.recv(), if accepting => self.on_command(command),
            }
            for _ in 0..DRAIN_LIMIT {
                match self.events.try_recv() {
                    Ok(event) => self.on_event(event),
                    Err(_) => break,
                }
            }
            for _ in 0..DRAIN_LIMIT {
                if self.pending.len() >= self.config.max_pending_proposals {
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
                let _ = std::fs::remove_file(self.store.snapshot_dir().join(&file));
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
        self.next_read_ctx += 1;
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
        let applied = self.store.applied().index;
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
        // Persist first and acknowledge at once: applying committed entries is kept off the
        // path of the acknowledgements that commit the next ones.
        let restore = (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone());
        let entries = ready.take_entries();
        let hard_state = ready.hs().cloned();
        if restore.is_some() || !entries.is_empty() || hard_state.is_some() {
            let outcome = self
                .write(WriteBatch {
                    restore,
                    entries,
                    hard_state,
                    sync: ready.must_sync(),
                    ..WriteBatch::default()
                })
                .await?;
            self.after_write(outcome);
        }
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        let read_states = ready.take_read_states();
        let mut committed = ready.take_committed_entries();
        let mut light = self.raw.advance_append(ready);
        if !light.messages().is_empty() {
            self.transport.send(light.take_messages());
        }
        committed.append(&mut light.take_committed_entries());
        let commit = light.commit_index();
        if !committed.is_empty() || commit.is_some() {
            let conf_changes = self.prepare_conf_changes(&committed);
            let outcome = self
                .write(WriteBatch {
                    commit,
                    committed,
                    conf_changes,
                    ..WriteBatch::default()
                })
                .await?;
            self.after_write(outcome);
        }
        self.raw.advance_apply();
        self.on_read_states(read_states);
        Ok(())
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
        let applied = self.store.applied().index;
        for entry in committed {
            if entry.index <= applied {
                continue;
            }
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
            outcomes.insert(entry.index, outcome);
        }
        outcomes
    }

    async fn write(&self, batch: WriteBatch) -> Result<WriteOutcome, RaftError> {
        let store = self.store.clone();
        let sm = self.sm.clone();
        let window = self.config.dedup_window;
        tokio::task::spawn_blocking(move || store.write(batch, sm.as_ref(), window))
            .await
            .map_err(|e| RaftError::Stopped(format!("storage task failed: {e}")))?
    }

    fn after_write(&mut self, outcome: WriteOutcome) {
        if let Some(time) = outcome.sync_time {
            self.metrics.fsync_seconds.observe(time.as_secs_f64());
            self.metrics
                .write_batch_entries
                .observe(outcome.appended as f64);
        }
        if !outcome.applied.is_empty() {
            self.metrics
                .apply_batch_entries
                .observe(outcome.applied.len() as f64);
        }
        if outcome.compacted {
            self.metrics.compactions.inc();
        }
        if let Some(members) = outcome.members {
            self.transport.set_members(&members);
            self.members = members;
        }
        // Whoever gets an answer below must already see its entry in the status.
        self.publish_status();
        let mut last_applied = None;
        for applied in outcome.applied {
            last_applied = Some(applied.index);
            let Some(pending) = self.pending.remove(&applied.index) else {
                continue;
            };
            if pending.term != applied.term {
                pending.waiter.fail(RaftError::LeadershipLost);
                continue;
            }
            match (pending.waiter, applied.result) {
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
    }

    async fn maybe_compact(&mut self) -> Result<(), RaftError> {
        let applied = self.store.applied().index;
        let truncated = self.store.truncated().index;
        if applied.saturating_sub(truncated) < self.config.snapshot_threshold {
            return Ok(());
        }
        let target = applied - self.config.log_retain_entries;
        let outcome = self
            .write(WriteBatch {
                compact_to: Some(target),
                ..WriteBatch::default()
            })
            .await?;
        self.after_write(outcome);
        tracing::debug!(node = self.id, to = target, "log compacted");
        Ok(())
    }

    fn maybe_generate_snapshot(&mut self) {
        if self.generating_snapshot || !self.store.take_snapshot_request() {
            return;
        }
        self.generating_snapshot = true;
        let store = self.store.clone();
        let sm = self.sm.clone();
        let cluster = self.config.cluster.clone();
        let results = self.snapshot_results_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result =
                snapshot::generate(store.db(), sm.as_ref(), store.snapshot_dir(), &cluster);
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
                self.store.set_latest_snapshot(metadata, descriptor);
            }
            Err(error) => tracing::error!(node = self.id, %error, "snapshot generation failed"),
        }
    }

    fn publish_status(&mut self) {
        let raft = &self.raw.raft;
        let conf = self.store.conf_state();
        let applied = self.store.applied().index;
        let (first_index, last_index) = self.store.first_and_last();
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

    fn fail_everything(&mut self, reason: String) {
        for (_, p) in std::mem::take(&mut self.pending) {
            p.waiter.fail(RaftError::Stopped(reason.clone()));
        }
        for reply in std::mem::take(&mut self.queued_reads) {
            let _ = reply.send(Err(RaftError::Stopped(reason.clone())));
        }
        for batch in std::mem::take(&mut self.reads_in_flight) {
            for reply in batch.waiters {
                let _ = reply.send(Err(RaftError::Stopped(reason.clone())));
            }
        }
        for (_, reply) in std::mem::take(&mut self.reads_waiting_apply) {
            let _ = reply.send(Err(RaftError::Stopped(reason.clone())));
        }
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Propose { reply, .. } => {
                    let _ = reply.send(Err(RaftError::Stopped(reason.clone())));
                }
                Command::ConfChange { reply, .. } => {
                    let _ = reply.send(Err(RaftError::Stopped(reason.clone())));
                }
                Command::Read { reply } => {
                    let _ = reply.send(Err(RaftError::Stopped(reason.clone())));
                }
                Command::TransferLeader { .. } => {}
            }
        }
        self.status
            .send_modify(|status| status.role = Role::Stopped);
    }
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
