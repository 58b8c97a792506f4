//! A member of a raft group as services see it: [`RaftNode`] starts the node and offers
//! proposals, linearizable reads, membership changes and status, forwarding to the leader
//! whatever only the leader may do.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::Registry;
use prost::Message as _;
use raft::RawNode;
use raft::prelude::{ConfChange, ConfChangeType};
use redb::{Database, ReadableDatabase};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::config::RaftConfig;
use crate::driver::{Command, Driver, DriverParts, POLL};
use crate::error::{RaftError, StateMachineError, StorageError};
use crate::log_store::{LogStore, RaftStorage};
use crate::logging;
use crate::metrics::RaftMetrics;
use crate::proto::raft_client::RaftClient;
use crate::proto::raft_peer_server::RaftPeerServer;
use crate::proto::raft_server::RaftServer;
use crate::proto::{
    AddMemberRequest, MemberContext, Proposal, ProposeRequest, RemoveMemberRequest, RequestId,
    TransferLeaderRequest,
};
use crate::request_id::RequestIds;
use crate::service::{FORWARDED_KEY, RaftApi};
use crate::state_machine::{ErasedStateMachine, StateMachine};
use crate::state_store::{RecoveredState, StateStore};
use crate::transport::{EVENT_QUEUE_CAPACITY, PeerEvent, PeerService, Transport};

/// What a node currently is in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Probing whether an election could be won (pre-vote).
    PreCandidate,
    /// Campaigning.
    Candidate,
    /// Leads the group.
    Leader,
    /// Receives the log but does not vote.
    Learner,
    /// No longer a member of the group.
    Removed,
    /// The node's raft loop has ended.
    Stopped,
}

impl Role {
    /// Lower-case name, as shown by CLIs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::PreCandidate => "pre-candidate",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
            Role::Learner => "learner",
            Role::Removed => "removed",
            Role::Stopped => "stopped",
        }
    }
}

/// One member as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// Node id.
    pub id: u64,
    /// Peer address, empty if unknown.
    pub addr: String,
    /// Voter (true) or learner (false).
    pub voter: bool,
    /// Highest log index known replicated to it (leader only; 0 elsewhere).
    pub matched: u64,
}

/// This node's view of its group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    /// This node's id.
    pub id: u64,
    /// The group's name.
    pub cluster: String,
    /// What this node is.
    pub role: Role,
    /// Current term.
    pub term: u64,
    /// Current leader, 0 if none known.
    pub leader_id: u64,
    /// The leader's address, if known.
    pub leader_addr: Option<String>,
    /// Highest index known committed.
    pub commit_index: u64,
    /// Highest index applied here.
    pub applied_index: u64,
    /// Lowest index still in the log.
    pub first_index: u64,
    /// Highest index in the log.
    pub last_index: u64,
    /// Voters and learners.
    pub members: Vec<MemberStatus>,
}

impl GroupStatus {
    /// The member with `id`, if it is one.
    pub fn member(&self, id: u64) -> Option<&MemberStatus> {
        self.members.iter().find(|m| m.id == id)
    }

    fn leader_hint(&self) -> Option<ff_rpc::LeaderHint> {
        match (&self.leader_addr, self.leader_id) {
            (Some(addr), id) if id != 0 => Some(ff_rpc::LeaderHint {
                id,
                addr: addr.clone(),
            }),
            _ => None,
        }
    }
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Reflects every write acknowledged before the read started (ReadIndex).
    Linearizable,
    /// This node's applied state, possibly behind the leader.
    Local,
}

enum Route {
    Local,
    Remote(String),
}

/// The untyped core shared by [`RaftNode`] handles and the gRPC services.
pub(crate) struct NodeCore {
    pub(crate) id: u64,
    pub(crate) config: RaftConfig,
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<GroupStatus>,
    db: Arc<Database>,
    sm: Arc<dyn ErasedStateMachine>,
    transport: Arc<Transport>,
    events: mpsc::Sender<PeerEvent>,
    snapshot_dir: std::path::PathBuf,
    metrics: RaftMetrics,
    ids: RequestIds,
    channels: Mutex<HashMap<String, Channel>>,
    shutdown: watch::Sender<bool>,
    stopped: watch::Receiver<Option<String>>,
    monitor: Mutex<Option<JoinHandle<()>>>,
}

/// A member of a raft group replicating the state machine `S`. Cheap to clone.
pub struct RaftNode<S> {
    core: Arc<NodeCore>,
    _machine: PhantomData<fn() -> S>,
}

impl<S> Clone for RaftNode<S> {
    fn clone(&self) -> Self {
        RaftNode {
            core: self.core.clone(),
            _machine: PhantomData,
        }
    }
}

impl<S> std::fmt::Debug for RaftNode<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode")
            .field("id", &self.core.id)
            .finish()
    }
}

impl<S: StateMachine> RaftNode<S> {
    /// Opens the node's storage, recovers its state and starts its raft loop. Its gRPC services
    /// ([`RaftNode::peer_service`], [`RaftNode::raft_service`]) must be served at
    /// `config.advertise_addr` for the node to take part.
    pub async fn start(
        config: RaftConfig,
        machine: S,
        registry: &Registry,
    ) -> Result<Self, RaftError> {
        config.validate("raft")?;
        let metrics = RaftMetrics::register(registry)?;
        let sm: Arc<dyn ErasedStateMachine> = Arc::new(machine);
        let snapshot_dir = config.data_dir.join("snapshots");
        let (state, log, recovered) = {
            let config = config.clone();
            let sm = sm.clone();
            let dir = snapshot_dir.clone();
            tokio::task::spawn_blocking(move || open_storage(&config, sm, &dir))
                .await
                .map_err(|e| RaftError::Stopped(format!("storage open task failed: {e}")))??
        };
        let raft_config = raft::Config {
            id: config.node_id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied: recovered.applied.index,
            max_size_per_msg: config.max_size_per_msg.bytes(),
            max_inflight_msgs: config.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            read_only_option: raft::ReadOnlyOption::Safe,
            ..raft::Config::default()
        };
        raft_config.validate()?;
        let raw = RawNode::new(
            &raft_config,
            RaftStorage(log.clone()),
            &logging::raft_logger(),
        )?;

        let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE_CAPACITY);
        let (command_tx, command_rx) = mpsc::channel(config.request_queue_capacity);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (stopped_tx, stopped_rx) = watch::channel(None);
        let transport = Arc::new(Transport::new(
            config.node_id,
            config.cluster.clone(),
            config.advertise_addr.clone(),
            config.transport.clone(),
            config.snapshot_chunk_size.as_usize(),
            snapshot_dir.clone(),
            event_tx.clone(),
            metrics.clone(),
        ));
        transport.set_members(&recovered.members);
        let (first_index, last_index) = log.first_and_last();
        let initial = GroupStatus {
            id: config.node_id,
            cluster: config.cluster.clone(),
            role: Role::Follower,
            term: raw.raft.term,
            leader_id: 0,
            leader_addr: None,
            commit_index: raw.raft.raft_log.committed,
            applied_index: recovered.applied.index,
            first_index,
            last_index,
            members: Vec::new(),
        };
        let (status_tx, status_rx) = watch::channel(initial);
        let status_tx = Arc::new(status_tx);
        let driver = Driver::new(DriverParts {
            id: config.node_id,
            config: config.clone(),
            raw,
            log,
            state: state.clone(),
            snapshot_dir: snapshot_dir.clone(),
            transport: transport.clone(),
            metrics: metrics.clone(),
            commands: command_rx,
            events: event_rx,
            shutdown: shutdown_rx,
            status: status_tx.clone(),
            applied: recovered.applied,
            conf_state: recovered.conf_state,
            members: recovered.members,
        })?;
        let node_id = config.node_id;
        let driver_task = tokio::spawn(driver.run());
        let monitor = tokio::spawn(async move {
            let reason = match driver_task.await {
                Ok(Ok(())) => "shut down".to_string(),
                Ok(Err(error)) => {
                    tracing::error!(node = node_id, %error, "raft node failed");
                    format!("failed: {error}")
                }
                Err(panic) => {
                    tracing::error!(node = node_id, error = %panic, "raft loop panicked");
                    format!("raft loop panicked: {panic}")
                }
            };
            status_tx.send_modify(|status| status.role = Role::Stopped);
            let _ = stopped_tx.send(Some(reason));
        });
        let core = NodeCore {
            id: config.node_id,
            snapshot_dir,
            db: state.db().clone(),
            config,
            commands: command_tx,
            status: status_rx,
            sm,
            transport,
            events: event_tx,
            metrics,
            ids: RequestIds::new(),
            channels: Mutex::new(HashMap::new()),
            shutdown: shutdown_tx,
            stopped: stopped_rx,
            monitor: Mutex::new(Some(monitor)),
        };
        Ok(RaftNode {
            core: Arc::new(core),
            _machine: PhantomData,
        })
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.core.id
    }

    /// This node's current view of the group.
    pub fn status(&self) -> GroupStatus {
        self.core.status()
    }

    /// A receiver that sees every change of [`RaftNode::status`].
    pub fn subscribe(&self) -> watch::Receiver<GroupStatus> {
        self.core.status.clone()
    }

    /// Waits until some leader is known; returns its id.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64, RaftError> {
        self.core.wait_for_leader(timeout).await
    }

    /// `Ok` on the leader; elsewhere a not-leader status (with a hint to the leader when one is
    /// known), for requests only the leader of `service` answers.
    pub fn require_leader(&self, service: &str) -> Result<(), tonic::Status> {
        let current = self.status();
        if current.role == Role::Leader {
            return Ok(());
        }
        Err(ff_rpc::not_leader(
            format!("this {service} replica is not the leader"),
            current.leader_hint().as_ref(),
        ))
    }

    /// Proposes `command` and returns the state machine's response once it is applied. Called
    /// on a follower, the proposal is forwarded to the leader. Retries across leader changes
    /// reuse one request id, so the command is applied at most once.
    pub async fn propose(&self, command: S::Command) -> Result<S::Response, RaftError> {
        let ticket = self.core.ids.begin();
        let bytes = self
            .core
            .propose_bytes(ticket.id(), command.encode_to_vec(), true)
            .await?;
        S::Response::decode(bytes.as_slice()).map_err(|e| {
            RaftError::StateMachine(StateMachineError::Corrupt(format!(
                "response does not decode: {e}"
            )))
        })
    }

    /// Answers `query` from state that reflects every write acknowledged before the call.
    pub async fn read(&self, query: S::Query) -> Result<S::QueryResponse, RaftError> {
        self.read_with(query, Consistency::Linearizable).await
    }

    /// Answers `query` with the given consistency.
    pub async fn read_with(
        &self,
        query: S::Query,
        consistency: Consistency,
    ) -> Result<S::QueryResponse, RaftError> {
        let (bytes, _) = self
            .core
            .read_bytes(query.encode_to_vec(), consistency)
            .await?;
        S::QueryResponse::decode(bytes.as_slice()).map_err(|e| {
            RaftError::StateMachine(StateMachineError::Corrupt(format!(
                "query response does not decode: {e}"
            )))
        })
    }

    /// Adds node `id` at `addr`: as a learner first, promoted to voter once it has caught up.
    pub async fn add_member(&self, id: u64, addr: &str) -> Result<(), RaftError> {
        self.core.add_member(id, addr, false, true).await
    }

    /// Adds node `id` at `addr` as a learner (a non-voting member).
    pub async fn add_learner(&self, id: u64, addr: &str) -> Result<(), RaftError> {
        self.core.add_member(id, addr, true, true).await
    }

    /// Removes node `id` from the group (moving leadership away first if it is the leader).
    pub async fn remove_member(&self, id: u64) -> Result<(), RaftError> {
        self.core.remove_member(id, true).await
    }

    /// Moves leadership to voter `to`.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), RaftError> {
        self.core.transfer_leader(to, true).await
    }

    /// The node-to-node gRPC service; serve it at `advertise_addr`.
    pub fn peer_service(&self) -> RaftPeerServer<PeerService> {
        RaftPeerServer::new(PeerService::new(
            self.core.id,
            self.core.config.cluster.clone(),
            self.core.transport.clone(),
            self.core.events.clone(),
            self.core.snapshot_dir.clone(),
            self.core.metrics.clone(),
        ))
        .max_decoding_message_size(
            self.core.config.transport.max_batch_size.as_usize() * 2 + (1 << 20),
        )
    }

    /// The client and operator gRPC service (propose, read, status, membership).
    pub fn raft_service(&self) -> RaftServer<RaftApi> {
        RaftServer::new(RaftApi::new(self.core.clone()))
    }

    /// The database the state machine lives in (for inspection and tests).
    pub fn database(&self) -> &Arc<Database> {
        &self.core.db
    }

    /// Stops the raft loop and waits for it; pending requests fail with `Stopped`.
    pub async fn shutdown(&self) {
        let _ = self.core.shutdown.send(true);
        let monitor = self
            .core
            .monitor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(monitor) = monitor {
            let _ = monitor.await;
        }
    }

    /// Resolves when the raft loop has ended, with the reason.
    pub async fn stopped(&self) -> String {
        let mut stopped = self.core.stopped.clone();
        loop {
            if let Some(reason) = stopped.borrow_and_update().clone() {
                return reason;
            }
            if stopped.changed().await.is_err() {
                return "stopped".to_string();
            }
        }
    }
}

impl NodeCore {
    pub(crate) fn status(&self) -> GroupStatus {
        self.status.borrow().clone()
    }

    /// Request ids of proposals made through this node without one of their own.
    pub(crate) fn ids(&self) -> &RequestIds {
        &self.ids
    }

    async fn wait_for_leader(&self, timeout: Duration) -> Result<u64, RaftError> {
        let mut status = self.status.clone();
        let deadline = Instant::now() + timeout;
        loop {
            {
                let current = status.borrow_and_update();
                if current.role == Role::Stopped {
                    return Err(RaftError::Stopped("the node has stopped".to_string()));
                }
                if current.leader_id != 0 {
                    return Ok(current.leader_id);
                }
            }
            match tokio::time::timeout_at(deadline, status.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(RaftError::Stopped("the node has stopped".to_string())),
                Err(_) => return Err(RaftError::NoLeader(timeout)),
            }
        }
    }

    /// Where a leader-only operation must run: here, or at the leader's address.
    async fn route(&self, may_forward: bool, deadline: Instant) -> Result<Route, RaftError> {
        let mut status = self.status.clone();
        loop {
            {
                let current = status.borrow_and_update();
                match current.role {
                    Role::Stopped => {
                        return Err(RaftError::Stopped("the node has stopped".to_string()));
                    }
                    Role::Leader => return Ok(Route::Local),
                    _ => {}
                }
                if !may_forward {
                    return Err(RaftError::NotLeader {
                        leader: current.leader_hint(),
                    });
                }
                if let Some(hint) = current.leader_hint()
                    && hint.id != self.id
                {
                    return Ok(Route::Remote(hint.addr));
                }
            }
            match tokio::time::timeout_at(deadline, status.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(RaftError::Stopped("the node has stopped".to_string())),
                Err(_) => return Err(RaftError::NoLeader(self.config.propose_timeout.get())),
            }
        }
    }

    fn client(&self, addr: &str) -> Result<RaftClient<Channel>, RaftError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(addr) {
            Some(channel) => channel.clone(),
            None => {
                let options = ff_rpc::ClientOptions {
                    connect_timeout: self.config.transport.connect_timeout.get(),
                    request_timeout: self.config.propose_timeout.get()
                        + self.config.learner_catchup_timeout.get(),
                    ..ff_rpc::ClientOptions::default()
                };
                let channel = ff_rpc::channel(addr, &options).map_err(|e| RaftError::Forward {
                    addr: addr.to_string(),
                    message: e.to_string(),
                    retryable: false,
                })?;
                channels.insert(addr.to_string(), channel.clone());
                channel
            }
        };
        Ok(RaftClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }

    /// Wraps `message` as a request that the receiver must not forward again.
    fn forwarded<T>(message: T, deadline: Instant) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(deadline.saturating_duration_since(Instant::now()));
        request.metadata_mut().insert(
            FORWARDED_KEY,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        request
    }

    fn forward_error(addr: &str, status: &tonic::Status) -> RaftError {
        use tonic::Code;
        match status.code() {
            Code::InvalidArgument => RaftError::InvalidCommand(status.message().to_string()),
            Code::FailedPrecondition => RaftError::Membership(status.message().to_string()),
            code => RaftError::Forward {
                addr: addr.to_string(),
                message: format!("{code}: {}", status.message()),
                // Unavailable never took effect; a timeout may have, but every proposal carries
                // a request id, so a retry is applied at most once.
                retryable: matches!(
                    code,
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
                ),
            },
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or `deadline` passes. Retryable
    /// failures (no leader yet, leadership moved, a forward that did not get through) are tried
    /// again with a short backoff; a request that was forwarded to us is answered with
    /// `NotLeader` at once, so that the node that forwarded it retries, not us.
    async fn retrying<T, F, Fut>(
        &self,
        may_forward: bool,
        deadline: Instant,
        total: Duration,
        mut attempt: F,
    ) -> Result<T, RaftError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RaftError>>,
    {
        let mut backoff = Duration::from_millis(5);
        loop {
            let error = match attempt().await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            if !error.is_retryable()
                || (!may_forward && matches!(error, RaftError::NotLeader { .. }))
            {
                return Err(error);
            }
            if Instant::now() + backoff >= deadline {
                return Err(match error {
                    RaftError::NoLeader(_) => RaftError::NoLeader(total),
                    _ => RaftError::Timeout(total),
                });
            }
            tracing::debug!(node = self.id, %error, "retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    /// Proposes an encoded command; see [`RaftNode::propose`].
    pub(crate) async fn propose_bytes(
        &self,
        id: RequestId,
        command: Vec<u8>,
        may_forward: bool,
    ) -> Result<Vec<u8>, RaftError> {
        let timeout = self.config.propose_timeout.get();
        let deadline = Instant::now() + timeout;
        let data = Proposal {
            id: Some(id),
            command: command.clone(),
        }
        .encode_to_vec();
        let result = self
            .retrying(may_forward, deadline, timeout, || async {
                match self.route(may_forward, deadline).await? {
                    Route::Local => self.propose_local(data.clone(), deadline).await,
                    Route::Remote(addr) => {
                        let request = Self::forwarded(
                            ProposeRequest {
                                id: Some(id),
                                command: command.clone(),
                            },
                            deadline,
                        );
                        match self.client(&addr)?.propose(request).await {
                            Ok(reply) => Ok(reply.into_inner().response),
                            Err(status) => Err(Self::forward_error(&addr, &status)),
                        }
                    }
                }
            })
            .await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(RaftError::NotLeader { .. }) => "not_leader",
            Err(RaftError::InvalidCommand(_)) => "invalid",
            Err(RaftError::Timeout(_) | RaftError::NoLeader(_)) => "timeout",
            Err(_) => "failed",
        };
        self.metrics.proposals.with_label_values(&[outcome]).inc();
        result
    }

    async fn propose_local(&self, data: Vec<u8>, deadline: Instant) -> Result<Vec<u8>, RaftError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Command::Propose { data, reply }, deadline)
            .await?;
        self.await_reply(answer, deadline).await
    }

    async fn submit(&self, command: Command, deadline: Instant) -> Result<(), RaftError> {
        match tokio::time::timeout_at(deadline, self.commands.send(command)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(RaftError::Stopped("the node has stopped".to_string())),
            Err(_) => Err(RaftError::Timeout(self.config.propose_timeout.get())),
        }
    }

    async fn await_reply<T>(
        &self,
        answer: oneshot::Receiver<Result<T, RaftError>>,
        deadline: Instant,
    ) -> Result<T, RaftError> {
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RaftError::Stopped("the node has stopped".to_string())),
            Err(_) => Err(RaftError::Timeout(self.config.propose_timeout.get())),
        }
    }

    /// Runs an encoded query; returns the response and the applied index it was answered at.
    pub(crate) async fn read_bytes(
        &self,
        query: Vec<u8>,
        consistency: Consistency,
    ) -> Result<(Vec<u8>, u64), RaftError> {
        let label = match consistency {
            Consistency::Linearizable => {
                let timeout = self.config.read_timeout.get();
                let deadline = Instant::now() + timeout;
                let (reply, answer) = oneshot::channel();
                match tokio::time::timeout_at(deadline, self.commands.send(Command::Read { reply }))
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => {
                        return Err(RaftError::Stopped("the node has stopped".to_string()));
                    }
                    Err(_) => return Err(RaftError::Timeout(timeout)),
                }
                match tokio::time::timeout_at(deadline, answer).await {
                    Ok(Ok(result)) => {
                        result?;
                    }
                    Ok(Err(_)) => {
                        return Err(RaftError::Stopped("the node has stopped".to_string()));
                    }
                    Err(_) => return Err(RaftError::Timeout(timeout)),
                }
                "linearizable"
            }
            Consistency::Local => "local",
        };
        self.metrics.reads.with_label_values(&[label]).inc();
        let db = self.db.clone();
        let sm = self.sm.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db
                .begin_read()
                .map_err(|e| StorageError::db("begin read", e))?;
            let applied = crate::state_store::applied_in(&txn)?;
            match sm.query_bytes(&txn, &query)? {
                Ok(response) => Ok((response, applied)),
                Err(reason) => Err(RaftError::InvalidQuery(reason)),
            }
        })
        .await
        .map_err(|e| RaftError::Stopped(format!("query task failed: {e}")))?
    }

    /// Adds a member; see [`RaftNode::add_member`].
    pub(crate) async fn add_member(
        &self,
        id: u64,
        addr: &str,
        learner_only: bool,
        may_forward: bool,
    ) -> Result<(), RaftError> {
        if id == 0 {
            return Err(RaftError::Membership("node id 0 is invalid".to_string()));
        }
        if !addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        {
            return Err(RaftError::Membership(format!(
                "{addr:?} is not a host:port address"
            )));
        }
        let total =
            self.config.propose_timeout.get() * 3 + self.config.learner_catchup_timeout.get();
        let deadline = Instant::now() + total;
        self.retrying(may_forward, deadline, total, || async {
            match self.route(may_forward, deadline).await? {
                Route::Local => self.add_member_here(id, addr, learner_only, deadline).await,
                Route::Remote(leader) => {
                    let request = Self::forwarded(
                        AddMemberRequest {
                            id,
                            addr: addr.to_string(),
                            learner_only,
                        },
                        deadline,
                    );
                    self.client(&leader)?
                        .add_member(request)
                        .await
                        .map(|_| ())
                        .map_err(|status| Self::forward_error(&leader, &status))
                }
            }
        })
        .await
    }

    /// The leader's part of adding a member. Every step checks the current membership first,
    /// so a retry after any failure continues where the last attempt stopped.
    async fn add_member_here(
        &self,
        id: u64,
        addr: &str,
        learner_only: bool,
        deadline: Instant,
    ) -> Result<(), RaftError> {
        let status = self.status();
        match status.member(id) {
            Some(member) if !member.addr.is_empty() && member.addr != addr => {
                return Err(RaftError::Membership(format!(
                    "node {id} is already a member at {}",
                    member.addr
                )));
            }
            Some(member) if member.voter || learner_only => return Ok(()),
            Some(_) => {}
            None => {
                self.change_membership(ConfChangeType::AddLearnerNode, id, addr, deadline)
                    .await?;
                tracing::info!(node = self.id, learner = id, %addr, "learner added");
            }
        }
        if learner_only {
            return Ok(());
        }
        self.wait_caught_up(id).await?;
        self.change_membership(ConfChangeType::AddNode, id, addr, deadline)
            .await?;
        tracing::info!(node = self.id, voter = id, %addr, "learner promoted to voter");
        Ok(())
    }

    /// Waits until learner `id` holds everything committed when the wait began.
    async fn wait_caught_up(&self, id: u64) -> Result<(), RaftError> {
        let timeout = self.config.learner_catchup_timeout.get();
        let deadline = Instant::now() + timeout;
        let target = self.status().commit_index;
        loop {
            let status = self.status();
            if status.role != Role::Leader {
                return Err(RaftError::LeadershipLost);
            }
            if status.member(id).is_some_and(|m| m.matched >= target) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(RaftError::Membership(format!(
                    "learner {id} did not catch up to index {target} within {timeout:?}; it stays a learner"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Proposes one membership change and waits for it to apply.
    async fn change_membership(
        &self,
        kind: ConfChangeType,
        id: u64,
        addr: &str,
        deadline: Instant,
    ) -> Result<(), RaftError> {
        let mut change = ConfChange::default();
        change.set_change_type(kind);
        change.node_id = id;
        change.context = MemberContext {
            addr: addr.to_string(),
        }
        .encode_to_vec()
        .into();
        let (reply, answer) = oneshot::channel();
        self.submit(Command::ConfChange { change, reply }, deadline)
            .await?;
        self.await_reply(answer, deadline).await
    }

    /// Removes a member; see [`RaftNode::remove_member`].
    pub(crate) async fn remove_member(&self, id: u64, may_forward: bool) -> Result<(), RaftError> {
        let total = self.config.propose_timeout.get() * 3;
        let deadline = Instant::now() + total;
        self.retrying(may_forward, deadline, total, || async {
            match self.route(may_forward, deadline).await? {
                Route::Local => self.remove_member_here(id, deadline).await,
                Route::Remote(leader) => {
                    let request = Self::forwarded(RemoveMemberRequest { id }, deadline);
                    self.client(&leader)?
                        .remove_member(request)
                        .await
                        .map(|_| ())
                        .map_err(|status| Self::forward_error(&leader, &status))
                }
            }
        })
        .await
    }

    /// The leader's part of removing a member.
    async fn remove_member_here(&self, id: u64, deadline: Instant) -> Result<(), RaftError> {
        let status = self.status();
        let Some(member) = status.member(id) else {
            return Ok(());
        };
        let voters: Vec<&MemberStatus> = status.members.iter().filter(|m| m.voter).collect();
        if member.voter && voters.len() == 1 {
            return Err(RaftError::Membership(format!(
                "node {id} is the last voter; the group cannot remove it"
            )));
        }
        if id != self.id {
            self.change_membership(ConfChangeType::RemoveNode, id, "", deadline)
                .await?;
            tracing::info!(node = self.id, removed = id, "member removed");
            return Ok(());
        }
        // The leader removes itself by handing leadership to the most caught-up voter, which
        // then performs the removal when the caller retries there.
        let successor = voters
            .iter()
            .filter(|m| m.id != self.id)
            .max_by_key(|m| m.matched)
            .map(|m| m.id)
            .ok_or_else(|| {
                RaftError::Membership("no other voter to hand leadership to".to_string())
            })?;
        self.transfer_leader_here(successor, deadline).await?;
        Err(RaftError::NotLeader {
            leader: self.status().leader_hint(),
        })
    }

    /// Moves leadership; see [`RaftNode::transfer_leader`].
    pub(crate) async fn transfer_leader(
        &self,
        to: u64,
        may_forward: bool,
    ) -> Result<(), RaftError> {
        let total = self.config.propose_timeout.get() + self.config.election_timeout() * 3;
        let deadline = Instant::now() + total;
        self.retrying(may_forward, deadline, total, || async {
            match self.route(may_forward, deadline).await? {
                Route::Local => self.transfer_leader_here(to, deadline).await,
                Route::Remote(leader) => {
                    let request = Self::forwarded(TransferLeaderRequest { to }, deadline);
                    self.client(&leader)?
                        .transfer_leader(request)
                        .await
                        .map(|_| ())
                        .map_err(|status| Self::forward_error(&leader, &status))
                }
            }
        })
        .await
    }

    /// The leader's part of a leadership transfer: asks raft, then waits to see it happen.
    async fn transfer_leader_here(&self, to: u64, deadline: Instant) -> Result<(), RaftError> {
        if to == self.id {
            return Ok(());
        }
        if !self.status().member(to).is_some_and(|m| m.voter) {
            return Err(RaftError::Membership(format!("node {to} is not a voter")));
        }
        self.submit(Command::TransferLeader { to }, deadline)
            .await?;
        let timeout = self.config.election_timeout() * 3;
        let wait_until = Instant::now() + timeout;
        let mut status = self.status.clone();
        loop {
            if status.borrow_and_update().leader_id == to {
                return Ok(());
            }
            if tokio::time::timeout_at(wait_until, status.changed())
                .await
                .is_err()
            {
                return Err(RaftError::Membership(format!(
                    "leadership did not move to node {to} within {timeout:?}"
                )));
            }
        }
    }
}

/// Opens `state.redb` first (it knows the applied position), then `log.redb`, reconciled with it.
fn open_storage(
    config: &RaftConfig,
    sm: Arc<dyn ErasedStateMachine>,
    snapshot_dir: &std::path::Path,
) -> Result<(Arc<StateStore>, Arc<LogStore>, RecoveredState), RaftError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        StorageError::io(
            format!("create data directory {}", config.data_dir.display()),
            e,
        )
    })?;
    std::fs::create_dir_all(snapshot_dir).map_err(|e| {
        StorageError::io(
            format!("create snapshot directory {}", snapshot_dir.display()),
            e,
        )
    })?;
    crate::snapshot::remove_partial_files(snapshot_dir);
    let (state, recovered) = StateStore::open(config, sm)?;
    let log = LogStore::open(config, recovered.applied, recovered.conf_state.clone())?;
    Ok((Arc::new(state), Arc::new(log), recovered))
}
