//! The `Hai` API (users and administrators) and the `Agent` API (node agents), with the
//! leader's two background duties: node liveness (heartbeats are kept in the leader's memory,
//! not in the log; a node silent for the lease is marked down through raft) and the scheduling
//! loop (a [`plan`] of the current state, turned into commands).
//!
//! Identity: every request carries a token. The administrator's token (shared by the
//! replicas, used by agents) acts as `admin`; a user's token, made by `AddUser`, acts as that
//! user. Jobs belong to whoever submitted them; only the owner or an administrator may cancel
//! or suspend one.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ff_raft::{Consistency, RaftError, RaftNode, Role};
use hai_proto::agent_server::Agent;
use hai_proto::hai_server::Hai;
use hai_proto::{
    Action, AddUserOp, AddUserReply, AddUserRequest, Assignment, Assignments, Command,
    CommandResult, Empty, ExitedOp, ForgetOp, HeartbeatReply, HeartbeatRequest, Job, JobRequest,
    JobState, ListJobsReply, ListJobsRequest, ListNodesReply, ListUsersReply, Node, NodeDownOp,
    NodeState, NodeUse, Query, QueryResult, SetDrainOp, SetDrainRequest, StopKind, StopOp,
    SubmitOp, SubmitReply, SubmitRequest, User, WatchRequest, command, query,
};
use tokio::sync::{Notify, watch};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use crate::machine::HaiMachine;
use crate::metrics::HaiMetrics;
use crate::plan::plan;
use crate::state::{
    self, Demand, held_nodes, is_waiting, past_time_limit, ranks_per_node, validate_spec,
};

/// How long a token's identity is cached.
const IDENTITY_TTL: Duration = Duration::from_secs(10);
/// Most tokens cached.
const IDENTITY_CAPACITY: usize = 4096;
/// A watch stream sends its assignments at least this often, changed or not.
const WATCH_KEEPALIVE: Duration = Duration::from_secs(5);
/// Least time between two scheduling rounds (a storm of submissions costs a round per gap,
/// not one per submission).
const ROUND_GAP: Duration = Duration::from_millis(10);
/// Longest time between two rounds of forgetting old ended jobs.
const FORGET_EVERY: Duration = Duration::from_secs(600);
/// Assignment messages queued per watch stream.
const WATCH_QUEUE: usize = 4;

/// Who a request comes from.
#[derive(Debug, Clone)]
enum Identity {
    Admin,
    User(User),
}

impl Identity {
    fn name(&self) -> &str {
        match self {
            Identity::Admin => "admin",
            Identity::User(user) => &user.name,
        }
    }

    fn is_admin(&self) -> bool {
        match self {
            Identity::Admin => true,
            Identity::User(user) => user.admin,
        }
    }
}

/// The leader's view of agents' heartbeats.
#[derive(Debug, Default)]
struct Liveness {
    /// When this replica last became leader (every node gets a full lease from then).
    leader_since: Option<Instant>,
    last_heartbeat: HashMap<String, Instant>,
    /// When this leader last had old ended jobs forgotten.
    last_forget: Option<Instant>,
}

struct Inner {
    node: RaftNode<HaiMachine>,
    admin_token: String,
    identities: Mutex<HashMap<String, (Instant, Option<Identity>)>>,
    live: Mutex<Liveness>,
    /// Bumped after every command this replica commits (wakes watch streams).
    changed: watch::Sender<u64>,
    /// Wakes the scheduling loop.
    wake: Notify,
    lease: Duration,
    /// How long ended jobs are kept; zero: forever.
    job_retention: Duration,
    metrics: HaiMetrics,
}

/// Both services over one raft node (cheap to clone).
#[derive(Clone)]
pub struct HaiApi {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HaiApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaiApi").finish_non_exhaustive()
    }
}

/// Milliseconds since the epoch, the clock commands carry.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The one place raft errors become statuses.
fn status(error: RaftError) -> Status {
    error.into()
}

/// A refused command as a status.
fn refused(result: CommandResult) -> Result<CommandResult, Status> {
    if result.error.is_empty() {
        return Ok(result);
    }
    Err(Status::new(Code::from_i32(result.code), result.error))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps and timestamps: a panic elsewhere cannot leave them inconsistent.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl HaiApi {
    /// The API over `node`, with agents' heartbeat `lease`, keeping ended jobs for
    /// `job_retention` (zero: forever).
    pub fn new(
        node: RaftNode<HaiMachine>,
        admin_token: String,
        lease: Duration,
        job_retention: Duration,
        metrics: HaiMetrics,
    ) -> HaiApi {
        HaiApi {
            inner: Arc::new(Inner {
                node,
                admin_token,
                identities: Mutex::new(HashMap::new()),
                live: Mutex::new(Liveness::default()),
                changed: watch::Sender::new(0),
                wake: Notify::new(),
                lease,
                job_retention,
                metrics,
            }),
        }
    }

    async fn identity<T>(&self, request: &Request<T>) -> Result<Identity, Status> {
        let Some(token) = ff_rpc::token_of(request) else {
            return Err(Status::unauthenticated(
                "no token: set HAI_TOKEN (or pass --token); `hai admin user add` makes one",
            ));
        };
        if token == self.inner.admin_token {
            return Ok(Identity::Admin);
        }
        if let Some((at, known)) = lock(&self.inner.identities).get(token)
            && at.elapsed() < IDENTITY_TTL
        {
            return known
                .clone()
                .ok_or_else(|| Status::unauthenticated("unknown token"));
        }
        let result = self
            .read(Query {
                op: Some(query::Op::User(ff_rpc::tokens::token_hash(token))),
            })
            .await?;
        let known = result.users.into_iter().next().map(Identity::User);
        let mut cache = lock(&self.inner.identities);
        if cache.len() >= IDENTITY_CAPACITY {
            cache.clear();
        }
        cache.insert(token.to_string(), (Instant::now(), known.clone()));
        known.ok_or_else(|| Status::unauthenticated("unknown token"))
    }

    async fn admin<T>(&self, request: &Request<T>) -> Result<Identity, Status> {
        let identity = self.identity(request).await?;
        if !identity.is_admin() {
            return Err(Status::permission_denied(format!(
                "{} is not an administrator",
                identity.name()
            )));
        }
        Ok(identity)
    }

    async fn read(&self, query: Query) -> Result<QueryResult, Status> {
        self.inner.node.read(query).await.map_err(status)
    }

    async fn read_local(&self, query: Query) -> Result<QueryResult, Status> {
        self.inner
            .node
            .read_with(query, Consistency::Local)
            .await
            .map_err(status)
    }

    /// Proposes `op` (stamped with this replica's clock); refusals become statuses.
    async fn propose(&self, op: command::Op) -> Result<CommandResult, Status> {
        let result = self
            .inner
            .node
            .propose(Command {
                now_ms: now_ms(),
                op: Some(op),
            })
            .await
            .map_err(status)?;
        self.inner.changed.send_modify(|v| *v += 1);
        self.inner.wake.notify_one();
        refused(result)
    }

    async fn job(&self, id: u64) -> Result<Job, Status> {
        let jobs = self
            .read(Query {
                op: Some(query::Op::Job(JobRequest { job_id: id })),
            })
            .await?
            .jobs;
        self.explained(jobs)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Status::not_found(format!("no job {id}")))
    }

    async fn stop(
        &self,
        request: Request<JobRequest>,
        kind: StopKind,
    ) -> Result<Response<Empty>, Status> {
        let identity = self.identity(&request).await?;
        let id = request.get_ref().job_id;
        let job = self.job(id).await?;
        if !identity.is_admin() && identity.name() != job.owner {
            return Err(Status::permission_denied(format!(
                "job {id} belongs to {}; only its owner or an administrator may stop it",
                job.owner
            )));
        }
        let verb = if kind == StopKind::StopSuspend {
            "suspended"
        } else {
            "cancelled"
        };
        self.propose(command::Op::Stop(StopOp {
            job_id: id,
            kind: kind as i32,
            reason: format!("{verb} by {}", identity.name()),
        }))
        .await?;
        Ok(Response::new(Empty {}))
    }

    /// What the policy plans from, as this replica has applied it: nodes with the jobs not
    /// ended, and users.
    async fn scheduling_view(&self) -> Result<(QueryResult, Vec<User>), Status> {
        let view = self
            .read_local(Query {
                op: Some(query::Op::Nodes(Empty {})),
            })
            .await?;
        let users = self
            .read_local(Query {
                op: Some(query::Op::User(Vec::new())),
            })
            .await?
            .users;
        Ok((view, users))
    }

    /// `jobs` with the reason each waiting one waits: the scheduling policy run over this
    /// replica's state (reasons are derived, never written to the log).
    async fn explained(&self, mut jobs: Vec<Job>) -> Result<Vec<Job>, Status> {
        if !jobs.iter().any(|j| is_waiting(j.state())) {
            return Ok(jobs);
        }
        let (view, users) = self.scheduling_view().await?;
        let plan = plan(&view.nodes, &view.jobs, &users);
        let reasons: HashMap<u64, String> = plan.reasons.into_iter().collect();
        for job in jobs.iter_mut().filter(|j| is_waiting(j.state())) {
            job.reason = reasons
                .get(&job.id)
                .cloned()
                .unwrap_or_else(|| "starting: its nodes are free".to_string());
        }
        Ok(jobs)
    }

    /// The assignments of node `name` in the state `jobs`.
    fn assignments(jobs: &[Job], name: &str) -> Assignments {
        let mut out = Vec::new();
        for job in jobs {
            let Some(placement) = &job.placement else {
                continue;
            };
            let Some(placed) = placement.nodes.iter().find(|n| n.node == name && !n.exited) else {
                continue;
            };
            let action = match job.state() {
                JobState::Running => Action::Run,
                JobState::Suspending => Action::Suspend,
                _ => Action::Stop,
            };
            let spec = job.spec.clone().unwrap_or_default();
            out.push(Assignment {
                job_id: job.id,
                attempt: job.attempt,
                action: action as i32,
                first_rank: placed.first_rank,
                ranks: placed.ranks,
                world_size: spec.nodes * ranks_per_node(&spec),
                master_addr: placement.master_addr.clone(),
                master_port: placement.master_port,
                owner: job.owner.clone(),
                spec: Some(spec),
            });
        }
        Assignments { assignments: out }
    }

    /// One round of the leader's duties: nodes whose agents went silent are marked down,
    /// attempts past their job's time limit are stopped (to fail), then the plan is carried
    /// out. Does nothing on a follower.
    pub async fn schedule_once(&self) -> Result<(), Status> {
        let status = self.inner.node.status();
        if status.role != Role::Leader {
            lock(&self.inner.live).leader_since = None;
            return Ok(());
        }
        let (since, beats) = {
            let mut live = lock(&self.inner.live);
            let since = *live.leader_since.get_or_insert_with(Instant::now);
            (since, live.last_heartbeat.clone())
        };
        let lease = self.inner.lease;
        let silent = |name: &str| {
            let last = beats.get(name).copied().unwrap_or(since).max(since);
            (last.elapsed() > lease).then(|| last.elapsed())
        };
        let (view, users) = self.scheduling_view().await?;
        self.inner.metrics.set_state(&view.jobs, &view.nodes);
        for node in view.nodes.iter().filter(|n| n.state() == NodeState::Up) {
            if let Some(quiet) = silent(&node.name) {
                tracing::warn!(node = %node.name, "no heartbeat; marking the node down");
                self.propose(command::Op::NodeDown(NodeDownOp {
                    node: node.name.clone(),
                    reason: format!("no heartbeat for {:.1}s", quiet.as_secs_f64()),
                }))
                .await?;
                return Ok(()); // Plan again from the new state.
            }
        }
        let now = now_ms();
        let mut stopped = 0;
        for (job, reason) in view
            .jobs
            .iter()
            .filter_map(|j| Some((j.id, past_time_limit(j, now)?)))
        {
            tracing::info!(job, %reason, "stopping");
            let stop = command::Op::Stop(StopOp {
                job_id: job,
                kind: StopKind::StopTimeLimit as i32,
                reason,
            });
            if self.propose_from_view(stop).await? {
                stopped += 1;
            }
        }
        if stopped > 0 {
            self.inner.metrics.time_limit_stops.inc_by(stopped);
            return Ok(()); // Plan again from the new state.
        }
        self.forget_old_jobs(now).await?;
        let plan = plan(&view.nodes, &view.jobs, &users);
        for (victim, reason) in plan.preempt {
            tracing::info!(job = victim, %reason, "preempting");
            let suspend = command::Op::Stop(StopOp {
                job_id: victim,
                kind: StopKind::StopSuspend as i32,
                reason,
            });
            if self.propose_from_view(suspend).await? {
                self.inner.metrics.preemptions.inc();
            }
        }
        for place in plan.place {
            let waited = view
                .jobs
                .iter()
                .find(|j| j.id == place.job_id)
                .map_or(0, |j| now_ms() - j.submitted_ms.max(j.ended_ms));
            tracing::info!(job = place.job_id, attempt = place.attempt, "placing");
            if self.propose_from_view(command::Op::Place(place)).await? {
                self.inner
                    .metrics
                    .queue_wait
                    .observe(waited.max(0) as f64 / 1000.0);
            }
        }
        Ok(())
    }

    /// Proposes `op`, decided from a view that may be a few entries old: whether it applied.
    /// A refusal because the state moved on meanwhile (FAILED_PRECONDITION) is not an error;
    /// the next round decides again.
    async fn propose_from_view(&self, op: command::Op) -> Result<bool, Status> {
        match self.propose(op).await {
            Ok(_) => Ok(true),
            Err(error) if error.code() == Code::FailedPrecondition => {
                tracing::debug!(%error, "the state moved on since the round's view");
                Ok(false)
            }
            Err(error) => Err(error),
        }
    }

    /// Has the jobs that ended more than `job_retention` before `now` (ms) forgotten, at most
    /// once per retention period or ten minutes, whichever is shorter.
    async fn forget_old_jobs(&self, now: i64) -> Result<(), Status> {
        let retention = self.inner.job_retention;
        if retention.is_zero() {
            return Ok(());
        }
        let due = {
            let mut live = lock(&self.inner.live);
            let every = retention.min(FORGET_EVERY);
            let due = live.last_forget.is_none_or(|t| t.elapsed() >= every);
            if due {
                live.last_forget = Some(Instant::now());
            }
            due
        };
        if !due {
            return Ok(());
        }
        let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let result = self
            .propose(command::Op::Forget(ForgetOp {
                ended_before_ms: now.saturating_sub(retention_ms),
            }))
            .await?;
        if result.forgotten > 0 {
            tracing::info!(
                jobs = result.forgotten,
                "forgot jobs ended before the retention"
            );
            self.inner.metrics.jobs_forgotten.inc_by(result.forgotten);
        }
        Ok(())
    }

    /// The leader's loop: [`HaiApi::schedule_once`] every `interval`, or sooner when a command
    /// wakes it. Runs until the task is aborted.
    pub async fn run_scheduler(self, interval: Duration) {
        loop {
            if let Err(error) = self.schedule_once().await {
                tracing::debug!(%error, "scheduling round failed; trying again");
            }
            // Wakes that come during a round are served by one more round, not one each.
            tokio::time::sleep(ROUND_GAP).await;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.inner.wake.notified() => {}
            }
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<Assignments, Status>> + Send>>;

#[tonic::async_trait]
impl Hai for HaiApi {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitReply>, Status> {
        let started = Instant::now();
        let result = async {
            let identity = self.identity(&request).await?;
            let request = request.into_inner();
            let spec = request
                .spec
                .ok_or_else(|| Status::invalid_argument("no job spec"))?;
            validate_spec(&spec).map_err(Status::invalid_argument)?;
            let result = self
                .propose(command::Op::Submit(SubmitOp {
                    spec: Some(spec),
                    owner: identity.name().to_string(),
                    request_id: request.request_id,
                }))
                .await?;
            Ok(Response::new(SubmitReply {
                job_id: result.job_id,
            }))
        }
        .await;
        self.inner
            .metrics
            .requests
            .observe("submit", started, result.is_ok());
        result
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsReply>, Status> {
        self.identity(&request).await?;
        let all = request.get_ref().all;
        let result = self
            .read(Query {
                op: Some(query::Op::Jobs(ListJobsRequest { all })),
            })
            .await?;
        Ok(Response::new(ListJobsReply {
            jobs: self.explained(result.jobs).await?,
        }))
    }

    async fn get_job(&self, request: Request<JobRequest>) -> Result<Response<Job>, Status> {
        self.identity(&request).await?;
        Ok(Response::new(self.job(request.get_ref().job_id).await?))
    }

    async fn cancel(&self, request: Request<JobRequest>) -> Result<Response<Empty>, Status> {
        self.stop(request, StopKind::StopCancel).await
    }

    async fn suspend(&self, request: Request<JobRequest>) -> Result<Response<Empty>, Status> {
        self.stop(request, StopKind::StopSuspend).await
    }

    async fn list_nodes(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<ListNodesReply>, Status> {
        self.identity(&request).await?;
        let result = self
            .read(Query {
                op: Some(query::Op::Nodes(Empty {})),
            })
            .await?;
        let leader = self.inner.node.status().role == Role::Leader;
        let live = lock(&self.inner.live);
        let mut reply = ListNodesReply::default();
        for mut node in result.nodes {
            let mut usage = NodeUse::default();
            for job in &result.jobs {
                if held_nodes(job).any(|h| h.node == node.name) {
                    let used = Demand::of(&job.spec.clone().unwrap_or_default()).on(&node);
                    usage.gpus += used.gpus;
                    usage.cpus += used.cpus;
                    usage.memory_mb += used.memory_mb;
                    usage.jobs.push(job.id);
                }
            }
            node.heartbeat_age_ms = match (leader, live.last_heartbeat.get(&node.name)) {
                (true, Some(at)) => at.elapsed().as_millis() as i64,
                _ => -1,
            };
            reply.nodes.push(node);
            reply.usage.push(usage);
        }
        Ok(Response::new(reply))
    }

    async fn set_drain(
        &self,
        request: Request<SetDrainRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.admin(&request).await?;
        let request = request.into_inner();
        self.propose(command::Op::SetDrain(SetDrainOp {
            node: request.node,
            drain: request.drain,
        }))
        .await?;
        Ok(Response::new(Empty {}))
    }

    async fn add_user(
        &self,
        request: Request<AddUserRequest>,
    ) -> Result<Response<AddUserReply>, Status> {
        self.admin(&request).await?;
        let request = request.into_inner();
        for quota in &request.quotas {
            if quota.priority.abs() > state::limits::MAX_PRIORITY {
                return Err(Status::invalid_argument(format!(
                    "quota priority {} is out of range",
                    quota.priority
                )));
            }
        }
        let token = ff_rpc::tokens::new_token();
        self.propose(command::Op::AddUser(AddUserOp {
            user: Some(User {
                name: request.name,
                admin: request.admin,
                quotas: request.quotas,
            }),
            token_sha256: ff_rpc::tokens::token_hash(&token),
        }))
        .await?;
        Ok(Response::new(AddUserReply { token }))
    }

    async fn list_users(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<ListUsersReply>, Status> {
        self.admin(&request).await?;
        let result = self
            .read(Query {
                op: Some(query::Op::User(Vec::new())),
            })
            .await?;
        Ok(Response::new(ListUsersReply {
            users: result.users,
        }))
    }

    async fn who_am_i(&self, request: Request<Empty>) -> Result<Response<User>, Status> {
        Ok(Response::new(match self.identity(&request).await? {
            Identity::Admin => User {
                name: "admin".to_string(),
                admin: true,
                quotas: Vec::new(),
            },
            Identity::User(user) => user,
        }))
    }
}

/// Whether a registered node record differs from what its agent reports now.
fn differs(stored: &Node, reported: &Node) -> bool {
    stored.state() == NodeState::Down
        || (
            &stored.host,
            stored.gpus,
            stored.cpus,
            stored.memory_mb,
            stored.port_min,
            stored.port_max,
            &stored.log_dir,
        ) != (
            &reported.host,
            reported.gpus,
            reported.cpus,
            reported.memory_mb,
            reported.port_min,
            reported.port_max,
            &reported.log_dir,
        )
}

#[tonic::async_trait]
impl Agent for HaiApi {
    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        self.inner.node.require_leader("hai server")?;
        self.admin(&request).await?;
        let started = Instant::now();
        let request = request.into_inner();
        let reported = request
            .node
            .ok_or_else(|| Status::invalid_argument("no node in the heartbeat"))?;
        let stored = self
            .read_local(Query {
                op: Some(query::Op::Nodes(Empty {})),
            })
            .await?
            .nodes
            .into_iter()
            .find(|n| n.name == reported.name);
        if stored.as_ref().is_none_or(|s| differs(s, &reported)) {
            tracing::info!(node = %reported.name, "registering node");
            self.propose(command::Op::Register(reported.clone()))
                .await?;
        }
        lock(&self.inner.live)
            .last_heartbeat
            .insert(reported.name.clone(), Instant::now());
        for exit in request.exited {
            self.propose(command::Op::Exited(ExitedOp {
                node: reported.name.clone(),
                exit: Some(exit),
            }))
            .await?;
        }
        self.inner
            .metrics
            .requests
            .observe("heartbeat", started, true);
        Ok(Response::new(HeartbeatReply {
            lease_ms: self.inner.lease.as_millis() as u64,
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.inner.node.require_leader("hai server")?;
        self.admin(&request).await?;
        let name = request.into_inner().node;
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_QUEUE);
        let api = self.clone();
        tokio::spawn(async move {
            let mut changed = api.inner.changed.subscribe();
            let mut last: Option<Assignments> = None;
            let mut sent_at = Instant::now();
            loop {
                if let Err(status) = api.inner.node.require_leader("hai server") {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                let jobs = match api
                    .read_local(Query {
                        op: Some(query::Op::Jobs(ListJobsRequest { all: false })),
                    })
                    .await
                {
                    Ok(result) => result.jobs,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let now = HaiApi::assignments(&jobs, &name);
                if last.as_ref() != Some(&now) || sent_at.elapsed() >= WATCH_KEEPALIVE {
                    if tx.send(Ok(now.clone())).await.is_err() {
                        return; // The agent hung up.
                    }
                    last = Some(now);
                    sent_at = Instant::now();
                }
                tokio::select! {
                    _ = changed.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
