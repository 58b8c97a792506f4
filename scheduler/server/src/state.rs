//! The replicated state and every change to it: jobs, nodes and users as protobuf records in
//! one redb table, and the transitions a committed command makes. Everything here is
//! deterministic (times come in the command), and every change checks before it writes, so a
//! refused command leaves no trace.
//!
//! Keys: `JOB_` + id (u64 BE), `NODE` + name, `USER` + SHA-256 of the token, `REQ_` + request
//! id (the job a submission made, so that a retried submission answers the same job), `NEXT`
//! (the next job id); and two indexes derived from the jobs, rebuilt whenever the state is
//! opened or restored: `ACTV` + id for every job not ended, `AFTR` + id + dependent id for
//! every job not ended that runs after job id.

use ff_raft::StateMachineError;
use ff_raft::redb::{ReadableTable, Table, TableDefinition};
use hai_proto::{
    EnvVar, Job, JobSpec, JobState, Node, NodeState, PlaceOp, PlacedNode, RankExit, RestartPolicy,
    StopKind, StopOp, User, UserRecord,
};
use prost::Message as _;

/// Every record (see the module documentation).
pub const HAI: TableDefinition<'static, &'static [u8], &'static [u8]> = TableDefinition::new("hai");

const JOB_PREFIX: &[u8] = b"JOB_";
const NODE_PREFIX: &[u8] = b"NODE";
const USER_PREFIX: &[u8] = b"USER";
const REQUEST_PREFIX: &[u8] = b"REQ_";
/// One empty record per job not ended (`ACTV` + id), so that the scheduler's view and the
/// agents' assignments cost the live jobs, not the whole history.
const ACTIVE_PREFIX: &[u8] = b"ACTV";
/// One empty record per (job, job not ended that runs after it): `AFTR` + id + dependent id,
/// so that ending a job finds the jobs after it without a scan.
const AFTER_PREFIX: &[u8] = b"AFTR";
const NEXT_JOB: &[u8] = b"NEXT";

/// Limits on what a job may ask for.
pub mod limits {
    /// Most nodes one job may span.
    pub const MAX_NODES: u32 = 4096;
    /// Most ranks per node.
    pub const MAX_RANKS_PER_NODE: u32 = 1024;
    /// Longest grace period (a day).
    pub const MAX_GRACE_MS: u64 = 24 * 3600 * 1000;
    /// Longest time limit: a year.
    pub const MAX_TIME_LIMIT_MS: u64 = 365 * 24 * 3600 * 1000;
    /// Priorities run from -1000 to 1000.
    pub const MAX_PRIORITY: i32 = 1000;
    /// Longest name, argument, variable and path.
    pub const MAX_TEXT: usize = 4096;
    /// Most arguments and environment variables.
    pub const MAX_ITEMS: usize = 1024;
    /// Most jobs one job may wait for.
    pub const MAX_AFTER: usize = 64;
    /// Most tasks in one job array.
    pub const MAX_ARRAY: u32 = 10_000;
    /// Most restarts after failures.
    pub const MAX_RESTARTS: u32 = 1000;
}

/// A refusal: a gRPC code (as `tonic::Code` numbers) and a message for the caller.
#[derive(Debug)]
pub enum Refusal {
    /// The command may not be applied; nothing changed.
    Refused {
        /// `tonic::Code` as a number.
        code: i32,
        /// Why.
        message: String,
    },
    /// Storage failed: the replica must stop.
    Storage(StateMachineError),
}

impl Refusal {
    /// For work that refuses nothing (queries, rebuilding indexes): storage errors pass, and
    /// a refusal would be a bug, reported as corruption.
    pub fn into_storage_error(self) -> StateMachineError {
        match self {
            Refusal::Storage(error) => error,
            Refusal::Refused { message, .. } => StateMachineError::Corrupt(message),
        }
    }
}

impl<E: Into<StateMachineError>> From<E> for Refusal {
    fn from(error: E) -> Self {
        Refusal::Storage(error.into())
    }
}

/// `tonic::Code` numbers used in refusals.
pub mod code {
    /// Malformed input.
    pub const INVALID_ARGUMENT: i32 = 3;
    /// No such job, node or user.
    pub const NOT_FOUND: i32 = 5;
    /// It exists already.
    pub const ALREADY_EXISTS: i32 = 6;
    /// The caller may not do this.
    pub const PERMISSION_DENIED: i32 = 7;
    /// Not in a state that allows it.
    pub const FAILED_PRECONDITION: i32 = 9;
}

/// A refusal with `code` and `message`.
pub fn refuse(code: i32, message: impl Into<String>) -> Refusal {
    Refusal::Refused {
        code,
        message: message.into(),
    }
}

type HaiTable<'t> = Table<'t, &'static [u8], &'static [u8]>;

fn key(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + rest.len());
    key.extend_from_slice(prefix);
    key.extend_from_slice(rest);
    key
}

fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

fn decode<M: prost::Message + Default>(bytes: &[u8], what: &str) -> Result<M, Refusal> {
    M::decode(bytes).map_err(|e| corrupt(format!("{what} does not decode: {e}")))
}

/// Every record under `prefix`, decoded.
fn scan<M: prost::Message + Default>(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
    what: &str,
) -> Result<Vec<M>, Refusal> {
    let end = prefix_end(prefix);
    let mut out = Vec::new();
    for item in table.range::<&[u8]>(prefix..end.as_slice())? {
        let (_, value) = item?;
        out.push(decode(value.value(), what)?);
    }
    Ok(out)
}

/// Job `id`, if it exists.
pub fn job(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    id: u64,
) -> Result<Option<Job>, Refusal> {
    match table.get(key(JOB_PREFIX, &id.to_be_bytes()).as_slice())? {
        Some(bytes) => Ok(Some(decode(bytes.value(), "a job record")?)),
        None => Ok(None),
    }
}

fn need_job(table: &HaiTable<'_>, id: u64) -> Result<Job, Refusal> {
    job(table, id)?.ok_or_else(|| refuse(code::NOT_FOUND, format!("no job {id}")))
}

/// Writes `job`; when it has ended without completing, also cancels every waiting job that
/// was to run after it (and theirs, in turn), so that a waiting job's dependencies are only
/// ever waiting, running or completed.
fn put_job(table: &mut HaiTable<'_>, job: &Job) -> Result<(), Refusal> {
    write_job(table, job)?;
    let mut ended: Vec<(u64, JobState)> = Vec::new();
    if matches!(job.state(), JobState::Failed | JobState::Cancelled) {
        ended.push((job.id, job.state()));
    }
    while let Some((id, state)) = ended.pop() {
        for dependent in dependents(table, id)? {
            let Some(mut dependent) = self::job(table, dependent)? else {
                continue;
            };
            if is_waiting(dependent.state()) {
                dependent.state = JobState::Cancelled as i32;
                dependent.ended_ms = job.ended_ms;
                dependent.reason = format!("job {id}, which it runs after, {}", state_name(state));
                write_job(table, &dependent)?;
                ended.push((dependent.id, JobState::Cancelled));
            }
        }
    }
    Ok(())
}

fn write_job(table: &mut HaiTable<'_>, job: &Job) -> Result<(), Refusal> {
    table.insert(
        key(JOB_PREFIX, &job.id.to_be_bytes()).as_slice(),
        job.encode_to_vec().as_slice(),
    )?;
    index_job(table, job)
}

fn after_key(dependency: u64, dependent: u64) -> Vec<u8> {
    let mut pair = dependency.to_be_bytes().to_vec();
    pair.extend_from_slice(&dependent.to_be_bytes());
    key(AFTER_PREFIX, &pair)
}

/// Keeps `job`'s entries in the `ACTV` and `AFTR` indexes: present while it has not ended.
fn index_job(table: &mut HaiTable<'_>, job: &Job) -> Result<(), Refusal> {
    let mut keys = vec![key(ACTIVE_PREFIX, &job.id.to_be_bytes())];
    if let Some(spec) = &job.spec {
        keys.extend(spec.after.iter().map(|before| after_key(*before, job.id)));
    }
    for index_key in keys {
        if is_ended(job.state()) {
            table.remove(index_key.as_slice())?;
        } else {
            table.insert(index_key.as_slice(), [].as_slice())?;
        }
    }
    Ok(())
}

/// Ids of the jobs not ended that run after job `id`.
fn dependents(table: &HaiTable<'_>, id: u64) -> Result<Vec<u64>, Refusal> {
    let prefix = key(AFTER_PREFIX, &id.to_be_bytes());
    let end = prefix_end(&prefix);
    let mut out = Vec::new();
    for item in table.range::<&[u8]>(prefix.as_slice()..end.as_slice())? {
        let (pair, _) = item?;
        out.push(id_after(pair.value(), prefix.len())?);
    }
    Ok(out)
}

/// The job id in an index key after its first `at` bytes.
fn id_after(index_key: &[u8], at: usize) -> Result<u64, Refusal> {
    index_key
        .get(at..)
        .and_then(|rest| <[u8; 8]>::try_from(rest).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt("an index key does not end in a job id"))
}

/// Rebuilds the indexes derived from the jobs (at every open and after a restore, so that
/// no state, whichever version wrote it, is trusted to carry them).
pub fn rebuild_indexes(table: &mut HaiTable<'_>) -> Result<(), StateMachineError> {
    let mut rebuild = || -> Result<(), Refusal> {
        for prefix in [ACTIVE_PREFIX, AFTER_PREFIX] {
            let end = prefix_end(prefix);
            table.retain_in::<&[u8], _>(prefix..end.as_slice(), |_, _| false)?;
        }
        for job in jobs(table, true)? {
            index_job(table, &job)?;
        }
        Ok(())
    };
    rebuild().map_err(Refusal::into_storage_error)
}

/// Every job, in id order; ended ones only with `all` (without, only the index of jobs not
/// ended is walked).
pub fn jobs(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    all: bool,
) -> Result<Vec<Job>, Refusal> {
    if all {
        return scan(table, JOB_PREFIX, "a job record");
    }
    let end = prefix_end(ACTIVE_PREFIX);
    let mut out = Vec::new();
    for item in table.range::<&[u8]>(ACTIVE_PREFIX..end.as_slice())? {
        let (active, _) = item?;
        let id = id_after(active.value(), ACTIVE_PREFIX.len())?;
        out.push(job(table, id)?.ok_or_else(|| corrupt(format!("indexed job {id} is missing")))?);
    }
    Ok(out)
}

fn corrupt(message: impl Into<String>) -> Refusal {
    Refusal::Storage(StateMachineError::Corrupt(message.into()))
}

/// Every node, by name.
pub fn nodes(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
) -> Result<Vec<Node>, Refusal> {
    scan(table, NODE_PREFIX, "a node record")
}

fn node(table: &HaiTable<'_>, name: &str) -> Result<Option<Node>, Refusal> {
    match table.get(key(NODE_PREFIX, name.as_bytes()).as_slice())? {
        Some(bytes) => Ok(Some(decode(bytes.value(), "a node record")?)),
        None => Ok(None),
    }
}

fn put_node(table: &mut HaiTable<'_>, node: &Node) -> Result<(), Refusal> {
    table.insert(
        key(NODE_PREFIX, node.name.as_bytes()).as_slice(),
        node.encode_to_vec().as_slice(),
    )?;
    Ok(())
}

/// The user whose token hashes to `sha`, if any.
pub fn user(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    sha: &[u8],
) -> Result<Option<User>, Refusal> {
    match table.get(key(USER_PREFIX, sha).as_slice())? {
        Some(bytes) => Ok(decode::<UserRecord>(bytes.value(), "a user record")?.user),
        None => Ok(None),
    }
}

/// Every user.
pub fn users(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
) -> Result<Vec<User>, Refusal> {
    let records: Vec<UserRecord> = scan(table, USER_PREFIX, "a user record")?;
    Ok(records.into_iter().filter_map(|r| r.user).collect())
}

/// Whether `state` is final (a job only ends once every rank of it has exited, so an ended job
/// holds nothing).
pub fn is_ended(state: JobState) -> bool {
    matches!(
        state,
        JobState::Completed | JobState::Failed | JobState::Cancelled
    )
}

/// Whether a job in `state` waits to be placed.
pub fn is_waiting(state: JobState) -> bool {
    matches!(state, JobState::Pending | JobState::Suspended)
}

/// Ranks a job starts on each node.
pub fn ranks_per_node(spec: &JobSpec) -> u32 {
    if spec.ranks_per_node > 0 {
        spec.ranks_per_node
    } else {
        spec.gpus_per_node.max(1)
    }
}

/// Checks a job spec; the message names the field.
pub fn validate_spec(spec: &JobSpec) -> Result<(), String> {
    use limits::*;
    if spec.command.is_empty() || spec.command[0].is_empty() {
        return Err("command: a job needs a command to run".to_string());
    }
    if spec.nodes == 0 || spec.nodes > MAX_NODES {
        return Err(format!("nodes: {} must be 1 to {MAX_NODES}", spec.nodes));
    }
    if spec.ranks_per_node > MAX_RANKS_PER_NODE {
        return Err(format!(
            "ranks_per_node: {} must be at most {MAX_RANKS_PER_NODE}",
            spec.ranks_per_node
        ));
    }
    if spec.gpus_per_node > MAX_RANKS_PER_NODE {
        return Err(format!(
            "gpus_per_node: {} must be at most {MAX_RANKS_PER_NODE}",
            spec.gpus_per_node
        ));
    }
    if spec.priority.abs() > MAX_PRIORITY {
        return Err(format!(
            "priority: {} must be -{MAX_PRIORITY} to {MAX_PRIORITY}",
            spec.priority
        ));
    }
    if spec.grace_ms > MAX_GRACE_MS {
        return Err(format!("grace: {} ms is more than a day", spec.grace_ms));
    }
    if spec.time_limit_ms > MAX_TIME_LIMIT_MS {
        return Err(format!(
            "time_limit: {} ms is more than a year",
            spec.time_limit_ms
        ));
    }
    if spec.max_restarts > MAX_RESTARTS {
        return Err(format!(
            "max_restarts: {} must be at most {MAX_RESTARTS}",
            spec.max_restarts
        ));
    }
    if spec.array_size > MAX_ARRAY {
        return Err(format!(
            "array: {} tasks; an array may have at most {MAX_ARRAY}",
            spec.array_size
        ));
    }
    if spec.after.len() > MAX_AFTER {
        return Err(format!(
            "after: {} jobs; a job may wait for at most {MAX_AFTER}",
            spec.after.len()
        ));
    }
    if spec.command.len() > MAX_ITEMS || spec.env.len() > MAX_ITEMS {
        return Err(format!(
            "command and env may have at most {MAX_ITEMS} items each"
        ));
    }
    let texts = spec
        .command
        .iter()
        .chain([&spec.name, &spec.checkpoint_dir, &spec.workdir])
        .chain(spec.env.iter().flat_map(|v| [&v.name, &v.value]));
    for text in texts {
        if text.len() > MAX_TEXT || text.contains('\0') {
            return Err(format!(
                "{:?}...: text fields must be under {MAX_TEXT} bytes without NUL",
                text.chars().take(20).collect::<String>()
            ));
        }
    }
    for var in &spec.env {
        let valid = !var.name.is_empty()
            && !var.name.contains('=')
            && !var.name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(format!("env: {:?} is not a variable name", var.name));
        }
    }
    if spec.name.contains(char::is_whitespace) {
        return Err(format!("name: {:?} must not contain spaces", spec.name));
    }
    Ok(())
}

/// Why a running `job` must stop at `now` (ms): its attempt has run longer than its spec's
/// time limit. `None` when it has no limit, is not running, or is within it.
pub fn past_time_limit(job: &Job, now: i64) -> Option<String> {
    let limit = job.spec.as_ref()?.time_limit_ms;
    let ran = now.saturating_sub(job.attempt_started_ms);
    (limit > 0 && job.state() == JobState::Running && ran > i64::try_from(limit).ok()?).then(|| {
        format!(
            "time limit of {} reached",
            ff_config::Duration(std::time::Duration::from_millis(limit))
        )
    })
}

/// Reads the next job id.
fn next_job_id(table: &HaiTable<'_>) -> Result<u64, Refusal> {
    Ok(match table.get(NEXT_JOB)? {
        Some(bytes) => <[u8; 8]>::try_from(bytes.value())
            .map(u64::from_be_bytes)
            .unwrap_or(1),
        None => 1,
    })
}

/// Queues a job (or answers the job an earlier copy of this request made).
pub fn submit(
    table: &mut HaiTable<'_>,
    now: i64,
    spec: &JobSpec,
    owner: &str,
    request_id: &str,
) -> Result<u64, Refusal> {
    if !request_id.is_empty()
        && let Some(bytes) = table.get(key(REQUEST_PREFIX, request_id.as_bytes()).as_slice())?
    {
        return Ok(<[u8; 8]>::try_from(bytes.value())
            .map(u64::from_be_bytes)
            .unwrap_or(0));
    }
    validate_spec(spec).map_err(|m| refuse(code::INVALID_ARGUMENT, m))?;
    if request_id.len() > 128 {
        return Err(refuse(code::INVALID_ARGUMENT, "request id over 128 bytes"));
    }
    for dependency in &spec.after {
        let Some(before) = job(table, *dependency)? else {
            return Err(refuse(
                code::INVALID_ARGUMENT,
                format!("after: there is no job {dependency}"),
            ));
        };
        if matches!(before.state(), JobState::Failed | JobState::Cancelled) {
            return Err(refuse(
                code::FAILED_PRECONDITION,
                format!(
                    "after: job {dependency} {}, so a job after it could never run",
                    state_name(before.state())
                ),
            ));
        }
    }
    let id = next_job_id(table)?;
    let tasks = spec.array_size.max(1);
    for task in 0..tasks {
        let job = Job {
            id: id + u64::from(task),
            spec: Some(if spec.array_size > 1 {
                array_task(spec, id, task)
            } else {
                spec.clone()
            }),
            owner: owner.to_string(),
            state: JobState::Pending as i32,
            submitted_ms: now,
            reason: "queued".to_string(),
            // The first task answers for an array's submission (see `forget`).
            request_id: if task == 0 {
                request_id.to_string()
            } else {
                String::new()
            },
            ..Job::default()
        };
        put_job(table, &job)?;
    }
    table.insert(NEXT_JOB, (id + u64::from(tasks)).to_be_bytes().as_slice())?;
    if !request_id.is_empty() {
        table.insert(
            key(REQUEST_PREFIX, request_id.as_bytes()).as_slice(),
            id.to_be_bytes().as_slice(),
        )?;
    }
    Ok(id)
}

/// Task `task` of the array whose first job is `first`: its own name and array variables.
fn array_task(spec: &JobSpec, first: u64, task: u32) -> JobSpec {
    let mut own = spec.clone();
    own.name = format!("{}[{task}]", spec.name);
    own.env.retain(|v| !v.name.starts_with("HAI_ARRAY_"));
    for (name, value) in [
        ("HAI_ARRAY_INDEX", task.to_string()),
        ("HAI_ARRAY_SIZE", spec.array_size.to_string()),
        ("HAI_ARRAY_FIRST_JOB", first.to_string()),
    ] {
        own.env.push(EnvVar {
            name: name.to_string(),
            value,
        });
    }
    own
}

/// Forgets the jobs that ended before `ended_before_ms`, with their request ids; returns how
/// many. Jobs not ended are never touched, and a waiting job's dependencies that are forgotten
/// had completed (the jobs after a failed or cancelled one are cancelled when it ends).
pub fn forget(table: &mut HaiTable<'_>, ended_before_ms: i64) -> Result<u64, Refusal> {
    let mut forgotten = 0;
    for job in jobs(table, true)? {
        if is_ended(job.state()) && job.ended_ms < ended_before_ms {
            table.remove(key(JOB_PREFIX, &job.id.to_be_bytes()).as_slice())?;
            // Only if it still names this job (a retry after a retention could have reused it).
            let request = key(REQUEST_PREFIX, job.request_id.as_bytes());
            let names_this = !job.request_id.is_empty()
                && table
                    .get(request.as_slice())?
                    .is_some_and(|id| id.value() == job.id.to_be_bytes().as_slice());
            if names_this {
                table.remove(request.as_slice())?;
            }
            forgotten += 1;
        }
    }
    Ok(forgotten)
}

/// Registers (or re-registers) a node: it is up again; its drain flag is kept.
pub fn register(table: &mut HaiTable<'_>, now: i64, mut new: Node) -> Result<(), Refusal> {
    if new.name.is_empty() || new.name.len() > 255 || new.name.contains(char::is_whitespace) {
        return Err(refuse(
            code::INVALID_ARGUMENT,
            format!(
                "node name {:?} must be 1-255 bytes without spaces",
                new.name
            ),
        ));
    }
    if new.port_min == 0 || new.port_min > new.port_max || new.port_max > 65535 {
        return Err(refuse(
            code::INVALID_ARGUMENT,
            format!(
                "node {}: port range {}-{} is not valid",
                new.name, new.port_min, new.port_max
            ),
        ));
    }
    let old = node(table, &new.name)?;
    new.drain = old.as_ref().is_some_and(|o| o.drain);
    new.state = NodeState::Up as i32;
    new.down_reason = String::new();
    new.registered_ms = now;
    new.heartbeat_age_ms = 0;
    put_node(table, &new)
}

/// What a node has free, given every job holding part of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    /// GPUs.
    pub gpus: u32,
    /// CPUs.
    pub cpus: u32,
    /// Memory in MB.
    pub memory_mb: u64,
}

impl Resources {
    /// A node's capacity.
    pub fn of_node(node: &Node) -> Resources {
        Resources {
            gpus: node.gpus,
            cpus: node.cpus,
            memory_mb: node.memory_mb,
        }
    }

    /// What a job takes on each of its nodes.
    pub fn of_job(spec: &JobSpec) -> Resources {
        Resources {
            gpus: spec.gpus_per_node,
            cpus: spec.cpus_per_node,
            memory_mb: spec.memory_mb_per_node,
        }
    }

    /// Whether `want` fits in this.
    pub fn fits(&self, want: &Resources) -> bool {
        self.gpus >= want.gpus && self.cpus >= want.cpus && self.memory_mb >= want.memory_mb
    }

    /// This minus `used` (never below zero).
    pub fn minus(&self, used: &Resources) -> Resources {
        Resources {
            gpus: self.gpus.saturating_sub(used.gpus),
            cpus: self.cpus.saturating_sub(used.cpus),
            memory_mb: self.memory_mb.saturating_sub(used.memory_mb),
        }
    }

    /// This plus `freed`.
    pub fn plus(&self, freed: &Resources) -> Resources {
        Resources {
            gpus: self.gpus.saturating_add(freed.gpus),
            cpus: self.cpus.saturating_add(freed.cpus),
            memory_mb: self.memory_mb.saturating_add(freed.memory_mb),
        }
    }
}

/// What a job takes on one node: what its spec asks, or — asking for nothing — the whole node
/// (node-exclusive jobs, HAI's unit of allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand(Resources);

impl Demand {
    /// The demand of `spec`.
    pub fn of(spec: &JobSpec) -> Demand {
        Demand(Resources::of_job(spec))
    }

    /// Whether it takes whole nodes.
    pub fn exclusive(&self) -> bool {
        self.0 == Resources::default()
    }

    /// What it takes on `node`.
    pub fn on(&self, node: &Node) -> Resources {
        if self.exclusive() {
            Resources::of_node(node)
        } else {
            self.0
        }
    }

    /// Whether it fits in `free` on `node`.
    pub fn fits(&self, node: &Node, free: &Resources) -> bool {
        free.fits(&self.on(node))
    }

    /// As words, for `nodes` nodes.
    pub fn describe(&self, nodes: u32) -> String {
        if self.exclusive() {
            format!("{nodes} whole node(s)")
        } else {
            format!(
                "{nodes} node(s) with {} GPU, {} CPU, {} MB free",
                self.0.gpus, self.0.cpus, self.0.memory_mb
            )
        }
    }
}

/// Nodes of `job` that still hold its resources.
pub fn held_nodes(job: &Job) -> impl Iterator<Item = &PlacedNode> {
    job.placement
        .iter()
        .flat_map(|p| p.nodes.iter())
        .filter(|n| !n.exited)
}

/// Places a waiting job on nodes; checked against the current state (the leader planned it
/// from a view that may be a few entries old).
pub fn place(table: &mut HaiTable<'_>, now: i64, op: PlaceOp) -> Result<(), Refusal> {
    let mut job = need_job(table, op.job_id)?;
    if !is_waiting(job.state()) || job.attempt != op.attempt {
        return Err(refuse(
            code::FAILED_PRECONDITION,
            format!("job {} attempt {} is not waiting", job.id, op.attempt),
        ));
    }
    let placement = op
        .placement
        .ok_or_else(|| refuse(code::INVALID_ARGUMENT, "no placement"))?;
    let spec = job.spec.clone().unwrap_or_default();
    for dependency in &spec.after {
        // Forgotten (None): ended long ago, and completed, or this job would be cancelled.
        let done = self::job(table, *dependency)?.is_none_or(|j| j.state() == JobState::Completed);
        if !done {
            return Err(refuse(
                code::FAILED_PRECONDITION,
                format!("job {} runs after job {dependency}, not completed", job.id),
            ));
        }
    }
    if placement.nodes.len() != spec.nodes as usize {
        return Err(refuse(
            code::INVALID_ARGUMENT,
            format!(
                "job {} needs {} nodes, not {}",
                job.id,
                spec.nodes,
                placement.nodes.len()
            ),
        ));
    }
    let want = Demand::of(&spec);
    let active = jobs(table, false)?;
    for (index, placed) in placement.nodes.iter().enumerate() {
        if placement.nodes[..index]
            .iter()
            .any(|p| p.node == placed.node)
        {
            return Err(refuse(
                code::INVALID_ARGUMENT,
                format!("node {} twice", placed.node),
            ));
        }
        let Some(record) = node(table, &placed.node)? else {
            return Err(refuse(code::NOT_FOUND, format!("no node {}", placed.node)));
        };
        if record.state() != NodeState::Up || record.drain {
            return Err(refuse(
                code::FAILED_PRECONDITION,
                format!("node {} takes no jobs now", placed.node),
            ));
        }
        let mut free = Resources::of_node(&record);
        for other in &active {
            let theirs = Demand::of(&other.spec.clone().unwrap_or_default());
            if held_nodes(other).any(|h| h.node == placed.node) {
                free = free.minus(&theirs.on(&record));
            }
        }
        if !want.fits(&record, &free) {
            return Err(refuse(
                code::FAILED_PRECONDITION,
                format!(
                    "node {} has not enough free for job {}",
                    placed.node, job.id
                ),
            ));
        }
        if index == 0 {
            let port = placement.master_port;
            let in_use = active.iter().any(|other| {
                other.placement.as_ref().is_some_and(|p| {
                    p.master_port == port
                        && p.nodes
                            .first()
                            .is_some_and(|n| n.node == placed.node && !n.exited)
                })
            });
            if port < record.port_min || port > record.port_max || in_use {
                return Err(refuse(
                    code::FAILED_PRECONDITION,
                    format!("port {port} on {} is not free", placed.node),
                ));
            }
        }
    }
    job.placement = Some(placement);
    job.state = JobState::Running as i32;
    if job.started_ms == 0 {
        job.started_ms = now;
    }
    job.attempt_started_ms = now;
    job.stop_ms = 0;
    job.requeue = false;
    job.reason = String::new();
    put_job(table, &job)
}

/// Every rank of `exit.job_id` on `node_name` has exited.
pub fn exited(
    table: &mut HaiTable<'_>,
    now: i64,
    node_name: &str,
    exit: &RankExit,
) -> Result<(), Refusal> {
    let Some(mut job) = job(table, exit.job_id)? else {
        return Ok(()); // Nothing to settle: an agent reporting a job this group never had.
    };
    if job.attempt != exit.attempt {
        return Ok(()); // An earlier attempt, settled already.
    }
    let Some(placed) = job
        .placement
        .as_mut()
        .and_then(|p| p.nodes.iter_mut().find(|n| n.node == node_name))
    else {
        return Ok(());
    };
    if placed.exited {
        return Ok(()); // A repeated report.
    }
    placed.exited = true;
    placed.exit_code = exit.exit_code;
    placed.exit_detail = exit.detail.clone();
    if job.state() == JobState::Running && exit.exit_code != 0 {
        let spec = job.spec.clone().unwrap_or_default();
        let requeue =
            spec.restart() == RestartPolicy::OnFailure && job.restarts < spec.max_restarts;
        begin_failing(
            &mut job,
            now,
            requeue,
            format!(
                "ranks on node {node_name} exited with code {}{}",
                exit.exit_code,
                if exit.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", exit.detail)
                }
            ),
        );
    }
    settle(&mut job, now);
    put_job(table, &job)
}

fn begin_failing(job: &mut Job, now: i64, requeue: bool, reason: String) {
    job.state = JobState::Failing as i32;
    job.requeue = requeue;
    job.stop_ms = now;
    job.reason = reason;
}

/// Moves a job whose ranks have all exited to where it goes next: completed, requeued
/// (suspended or pending with attempt + 1), failed or cancelled.
fn settle(job: &mut Job, now: i64) {
    let all_exited = job
        .placement
        .as_ref()
        .is_some_and(|p| p.nodes.iter().all(|n| n.exited));
    if !all_exited {
        return;
    }
    let worst = job
        .placement
        .as_ref()
        .and_then(|p| p.nodes.iter().map(|n| n.exit_code).find(|c| *c != 0))
        .unwrap_or(0);
    let requeue = |job: &mut Job, state: JobState, reason: String| {
        job.earlier_run_ms += (now - job.attempt_started_ms).max(0);
        job.state = state as i32;
        job.attempt += 1;
        job.placement = None;
        job.stop_ms = 0;
        job.last_stop = reason.clone();
        job.reason = reason;
    };
    match job.state() {
        JobState::Running => {
            job.state = JobState::Completed as i32;
            job.ended_ms = now;
            job.reason = String::new();
        }
        JobState::Suspending => {
            let how = if worst == 0 {
                "checkpointed and exited".to_string()
            } else {
                format!("stopped with code {worst}")
            };
            let reason = format!("suspended ({}): {how}", job.reason);
            requeue(job, JobState::Suspended, reason);
        }
        JobState::Cancelling => {
            job.state = JobState::Cancelled as i32;
            job.ended_ms = now;
        }
        JobState::Failing if job.requeue => {
            job.restarts += 1;
            let reason = format!("requeued after failure: {}", job.reason);
            requeue(job, JobState::Pending, reason);
        }
        JobState::Failing => {
            job.state = JobState::Failed as i32;
            job.ended_ms = now;
        }
        _ => {}
    }
}

/// Suspends or cancels a job (`by_admin` or its owner `caller`).
pub fn stop(table: &mut HaiTable<'_>, now: i64, op: StopOp) -> Result<(), Refusal> {
    let mut job = need_job(table, op.job_id)?;
    let state = job.state();
    match (op.kind(), state) {
        (_, JobState::Completed | JobState::Failed | JobState::Cancelled) => {
            return Err(refuse(
                code::FAILED_PRECONDITION,
                format!("job {} has ended ({})", job.id, state_name(state)),
            ));
        }
        (StopKind::StopSuspend, JobState::Running) => {
            job.state = JobState::Suspending as i32;
            job.stop_ms = now;
            job.reason = op.reason;
        }
        (StopKind::StopSuspend, _) => {
            return Err(refuse(
                code::FAILED_PRECONDITION,
                format!("job {} is {}, not running", job.id, state_name(state)),
            ));
        }
        // Checked again here: the leader decided from a view that may be a few entries old
        // (the attempt it saw may have been replaced since).
        (StopKind::StopTimeLimit, JobState::Running) if past_time_limit(&job, now).is_some() => {
            begin_failing(&mut job, now, false, op.reason);
        }
        (StopKind::StopTimeLimit, _) => {
            return Err(refuse(
                code::FAILED_PRECONDITION,
                format!(
                    "job {} is {}, not running past its time limit",
                    job.id,
                    state_name(state)
                ),
            ));
        }
        (StopKind::StopCancel, JobState::Pending | JobState::Suspended) => {
            job.state = JobState::Cancelled as i32;
            job.ended_ms = now;
            job.reason = op.reason;
        }
        (StopKind::StopCancel, _) => {
            job.state = JobState::Cancelling as i32;
            job.stop_ms = now;
            job.reason = op.reason;
        }
    }
    put_job(table, &job)
}

/// A node stops answering: it takes no jobs, and its jobs stop everywhere and go by their
/// restart policy.
pub fn node_down(
    table: &mut HaiTable<'_>,
    now: i64,
    name: &str,
    reason: &str,
) -> Result<(), Refusal> {
    let Some(mut record) = node(table, name)? else {
        return Err(refuse(code::NOT_FOUND, format!("no node {name}")));
    };
    record.state = NodeState::Down as i32;
    record.down_reason = reason.to_string();
    put_node(table, &record)?;
    for mut job in jobs(table, false)? {
        let Some(placed) = job
            .placement
            .as_mut()
            .and_then(|p| p.nodes.iter_mut().find(|n| n.node == name && !n.exited))
        else {
            continue;
        };
        placed.exited = true;
        placed.exit_code = -1;
        placed.exit_detail = format!("node {name} lost: {reason}");
        if job.state() == JobState::Running {
            let spec = job.spec.clone().unwrap_or_default();
            let requeue =
                spec.restart() != RestartPolicy::Never && job.restarts < spec.max_restarts;
            begin_failing(
                &mut job,
                now,
                requeue,
                format!("node {name} lost: {reason}"),
            );
        }
        settle(&mut job, now);
        put_job(table, &job)?;
    }
    Ok(())
}

/// Drains or resumes a node.
pub fn set_drain(table: &mut HaiTable<'_>, name: &str, drain: bool) -> Result<(), Refusal> {
    let Some(mut record) = node(table, name)? else {
        return Err(refuse(code::NOT_FOUND, format!("no node {name}")));
    };
    record.drain = drain;
    put_node(table, &record)
}

/// Adds a user under the SHA-256 of their token.
pub fn add_user(table: &mut HaiTable<'_>, user: User, sha: &[u8]) -> Result<(), Refusal> {
    let valid_name = !user.name.is_empty()
        && user.name.len() <= 64
        && user
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !valid_name || sha.len() != 32 {
        return Err(refuse(
            code::INVALID_ARGUMENT,
            format!(
                "user name {:?}: use 1-64 letters, digits, '-', '_' or '.'",
                user.name
            ),
        ));
    }
    if users(table)?.iter().any(|u| u.name == user.name) || user.name == "admin" {
        return Err(refuse(
            code::ALREADY_EXISTS,
            format!("user {} exists", user.name),
        ));
    }
    let record = UserRecord {
        user: Some(user),
        token_sha256: sha.to_vec(),
    };
    table.insert(
        key(USER_PREFIX, sha).as_slice(),
        record.encode_to_vec().as_slice(),
    )?;
    Ok(())
}

/// A state's name as users see it.
pub fn state_name(state: JobState) -> &'static str {
    match state {
        JobState::Pending => "pending",
        JobState::Running => "running",
        JobState::Suspending => "suspending",
        JobState::Suspended => "suspended",
        JobState::Cancelling => "cancelling",
        JobState::Failing => "failing",
        JobState::Completed => "completed",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(limit_ms: u64, started: i64) -> Job {
        Job {
            state: JobState::Running as i32,
            attempt_started_ms: started,
            spec: Some(JobSpec {
                time_limit_ms: limit_ms,
                ..JobSpec::default()
            }),
            ..Job::default()
        }
    }

    /// Runs `f` on the hai table of a fresh in-memory database.
    fn with_table(f: impl FnOnce(&mut HaiTable<'_>)) {
        let db = ff_raft::redb::Database::builder()
            .create_with_backend(ff_raft::redb::backends::InMemoryBackend::new())
            .unwrap();
        let txn = db.begin_write().unwrap();
        f(&mut txn.open_table(HAI).unwrap());
        txn.commit().unwrap();
    }

    fn submit_after(table: &mut HaiTable<'_>, after: &[u64]) -> Result<u64, Refusal> {
        let spec = JobSpec {
            command: vec!["true".to_string()],
            nodes: 1,
            after: after.to_vec(),
            ..JobSpec::default()
        };
        submit(table, 0, &spec, "u", "")
    }

    fn cancel(table: &mut HaiTable<'_>, id: u64) {
        let op = StopOp {
            job_id: id,
            kind: StopKind::StopCancel as i32,
            reason: "cancelled by u".to_string(),
        };
        stop(table, 5, op).unwrap();
    }

    fn not_ended(table: &HaiTable<'_>) -> Vec<u64> {
        jobs(table, false).unwrap().iter().map(|j| j.id).collect()
    }

    #[test]
    fn the_indexes_hold_the_jobs_not_ended_and_are_rebuilt_whatever_the_state_held() {
        with_table(|table| {
            rebuild_indexes(table).unwrap();
            let ids: Vec<u64> = (0..3).map(|_| submit_after(table, &[]).unwrap()).collect();
            let after = submit_after(table, &[ids[0], ids[2]]).unwrap();
            cancel(table, ids[1]);
            assert_eq!(not_ended(table), [ids[0], ids[2], after]);
            assert_eq!(jobs(table, true).unwrap().len(), 4);
            assert_eq!(dependents(table, ids[2]).unwrap(), [after]);
            // A state without the indexes (written before them), and one whose index lies (an
            // ended job listed): both rebuilt from the jobs.
            for id in &ids {
                table
                    .remove(key(ACTIVE_PREFIX, &id.to_be_bytes()).as_slice())
                    .unwrap();
            }
            table.remove(after_key(ids[0], after).as_slice()).unwrap();
            table
                .insert(
                    key(ACTIVE_PREFIX, &ids[1].to_be_bytes()).as_slice(),
                    [].as_slice(),
                )
                .unwrap();
            assert_eq!(not_ended(table).len(), 2);
            rebuild_indexes(table).unwrap();
            assert_eq!(not_ended(table), [ids[0], ids[2], after]);
            assert_eq!(dependents(table, ids[0]).unwrap(), [after]);
            cancel(table, after);
            assert!(
                dependents(table, ids[0]).unwrap().is_empty(),
                "ended: unlisted"
            );
        });
    }

    #[test]
    fn the_jobs_after_a_cancelled_one_are_cancelled_in_a_chain() {
        with_table(|table| {
            rebuild_indexes(table).unwrap();
            let first = submit_after(table, &[]).unwrap();
            let second = submit_after(table, &[first]).unwrap();
            let third = submit_after(table, &[second]).unwrap();
            let other = submit_after(table, &[]).unwrap();
            cancel(table, first);
            assert_eq!(not_ended(table), [other]);
            let third = job(table, third).unwrap().unwrap();
            assert_eq!(third.state(), JobState::Cancelled);
            assert_eq!(
                third.reason,
                format!("job {second}, which it runs after, cancelled")
            );
            let refused = submit_after(table, &[first]).unwrap_err();
            assert!(
                matches!(&refused, Refusal::Refused { message, .. } if message.contains("could never run")),
                "{refused:?}"
            );
            assert!(submit_after(table, &[999]).is_err(), "no such job");
        });
    }

    #[test]
    fn an_array_is_one_submission_of_consecutive_tasks_each_with_its_index() {
        with_table(|table| {
            rebuild_indexes(table).unwrap();
            let lone = submit_after(table, &[]).unwrap();
            let spec = JobSpec {
                name: "sweep".to_string(),
                command: vec!["train".to_string()],
                nodes: 1,
                array_size: 3,
                env: vec![EnvVar {
                    name: "HAI_ARRAY_INDEX".to_string(),
                    value: "forged".to_string(),
                }],
                ..JobSpec::default()
            };
            let first = submit(table, 0, &spec, "u", "r1").unwrap();
            assert_eq!(first, lone + 1);
            // Retried with the same request id: the same array, not another.
            assert_eq!(submit(table, 0, &spec, "u", "r1").unwrap(), first);
            assert_eq!(not_ended(table), [lone, first, first + 1, first + 2]);
            let last = job(table, first + 2).unwrap().unwrap().spec.unwrap();
            assert_eq!(last.name, "sweep[2]");
            let env: Vec<(&str, &str)> = last
                .env
                .iter()
                .map(|v| (v.name.as_str(), v.value.as_str()))
                .collect();
            let first_text = first.to_string();
            assert_eq!(
                env,
                [
                    ("HAI_ARRAY_INDEX", "2"),
                    ("HAI_ARRAY_SIZE", "3"),
                    ("HAI_ARRAY_FIRST_JOB", first_text.as_str())
                ]
            );
            assert_eq!(submit_after(table, &[]).unwrap(), first + 3);
        });
    }

    #[test]
    fn forgetting_takes_only_jobs_ended_before_the_cutoff_with_their_request_ids() {
        with_table(|table| {
            rebuild_indexes(table).unwrap();
            let spec = JobSpec {
                command: vec!["true".to_string()],
                nodes: 1,
                ..JobSpec::default()
            };
            let old = submit(table, 0, &spec, "u", "old").unwrap();
            let recent = submit(table, 0, &spec, "u", "recent").unwrap();
            let waiting = submit_after(table, &[]).unwrap();
            for (id, at) in [(old, 100), (recent, 900)] {
                let op = StopOp {
                    job_id: id,
                    kind: StopKind::StopCancel as i32,
                    reason: "cancelled by u".to_string(),
                };
                stop(table, at, op).unwrap();
            }
            assert_eq!(forget(table, 500).unwrap(), 1);
            let left: Vec<u64> = jobs(table, true).unwrap().iter().map(|j| j.id).collect();
            assert_eq!(left, [recent, waiting]);
            // The forgotten submission's request id is free again; the kept one still answers.
            assert_eq!(submit(table, 0, &spec, "u", "recent").unwrap(), recent);
            assert!(submit(table, 0, &spec, "u", "old").unwrap() > waiting);
            assert_eq!(forget(table, 500).unwrap(), 0, "nothing more that old");
        });
    }

    #[test]
    fn a_time_limit_stop_is_checked_again_when_applied() {
        with_table(|table| {
            rebuild_indexes(table).unwrap();
            let id = submit_after(table, &[]).unwrap();
            let mut job = job(table, id).unwrap().unwrap();
            // A fresh attempt (placed at 1,000) of a job with a 60 s limit.
            job.state = JobState::Running as i32;
            job.attempt_started_ms = 1_000;
            job.spec.as_mut().unwrap().time_limit_ms = 60_000;
            put_job(table, &job).unwrap();
            let op = StopOp {
                job_id: id,
                kind: StopKind::StopTimeLimit as i32,
                reason: "time limit of 1m reached".to_string(),
            };
            let early = stop(table, 30_000, op.clone()).unwrap_err();
            assert!(
                matches!(&early, Refusal::Refused { message, .. } if message.contains("not running past its time limit")),
                "{early:?}"
            );
            stop(table, 61_001, op).unwrap();
            assert_eq!(
                self::job(table, id).unwrap().unwrap().state(),
                JobState::Failing
            );
        });
    }

    #[test]
    fn only_running_attempts_past_their_limit_are_stopped() {
        let job = running(90_000, 1_000);
        assert_eq!(past_time_limit(&job, 91_000), None, "exactly at the limit");
        assert_eq!(
            past_time_limit(&job, 91_001).as_deref(),
            Some("time limit of 1m 30s reached")
        );
        assert_eq!(past_time_limit(&running(0, 0), i64::MAX), None, "no limit");
        let mut suspending = running(10, 0);
        suspending.state = JobState::Suspending as i32;
        assert_eq!(past_time_limit(&suspending, 1_000), None);
        assert_eq!(past_time_limit(&Job::default(), 1_000), None, "no spec");
    }
}
