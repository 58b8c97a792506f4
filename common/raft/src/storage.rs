//! Durable raft state in redb, and the raft-rs `Storage` view of it.
//!
//! One redb database per node holds everything: the log (`raft_log`), hard state, conf state,
//! applied and truncated positions (`raft_meta`), member addresses (`raft_members`), the
//! deduplication records of applied requests (`raft_requests*`) and the state machine's own
//! tables. Each batch of work from a raft `Ready` — append entries, set hard state, apply
//! committed entries, restore a snapshot, compact — is one redb write transaction, so after a
//! crash every part is consistent with every other. Transactions that carry new log entries or
//! votes commit with fsync (`Durability::Immediate`); apply-only ones do not, since a crash can
//! only roll them back to a point the durable log replays from.
//!
//! A small in-memory cache of recent entries serves raft-rs's reads for replication without
//! touching the database.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};

use crate::config::RaftConfig;
use crate::error::{RaftError, StorageError};
use crate::proto::{ApplyOutcome, Proposal, SnapshotDescriptor, apply_outcome};
use crate::snapshot;
use crate::state_machine::{ApplyContext, ErasedStateMachine};

pub(crate) const LOG: TableDefinition<'static, u64, &'static [u8]> =
    TableDefinition::new("raft_log");
pub(crate) const META: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("raft_meta");
pub(crate) const MEMBERS: TableDefinition<'static, u64, &'static str> =
    TableDefinition::new("raft_members");
/// (client, seq) -> (index applied at, encoded `ApplyOutcome`).
pub(crate) const REQUESTS: TableDefinition<'static, (u64, u64), (u64, &'static [u8])> =
    TableDefinition::new("raft_requests");
/// index -> (client, seq), to expire `REQUESTS` in index order.
pub(crate) const REQUESTS_BY_INDEX: TableDefinition<'static, u64, (u64, u64)> =
    TableDefinition::new("raft_requests_by_index");

const KEY_HARD_STATE: &str = "hard_state";
const KEY_CONF_STATE: &str = "conf_state";
const KEY_APPLIED: &str = "applied";
const KEY_TRUNCATED: &str = "truncated";
const KEY_CLUSTER: &str = "cluster";
const KEY_NODE_ID: &str = "node_id";

/// Index and term every founding member starts from (TiKV's `RAFT_INIT_LOG_INDEX`). A member
/// added later starts with an empty log below this index, so the leader must send it a snapshot
/// — which carries the founding membership — before any entry.
pub(crate) const INIT_INDEX: u64 = 5;
const INIT_TERM: u64 = 5;

/// Most expired deduplication records removed per write, to keep every write short.
const MAX_EXPIRED_PER_WRITE: usize = 4096;

/// A log position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct IndexTerm {
    pub index: u64,
    pub term: u64,
}

impl IndexTerm {
    fn encode(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.index.to_le_bytes());
        out[8..].copy_from_slice(&self.term.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8], what: &str) -> Result<Self, StorageError> {
        let array: [u8; 16] = bytes.try_into().map_err(|_| {
            StorageError::Corrupt(format!("{what} has {} bytes, not 16", bytes.len()))
        })?;
        let (index, term) = array.split_at(8);
        Ok(IndexTerm {
            index: u64::from_le_bytes(index.try_into().unwrap_or_default()),
            term: u64::from_le_bytes(term.try_into().unwrap_or_default()),
        })
    }
}

/// In-memory mirror of the durable raft state, updated after each committed write.
#[derive(Debug, Default)]
struct Core {
    hard_state: HardState,
    conf_state: ConfState,
    truncated: IndexTerm,
    applied: IndexTerm,
    last_index: u64,
    /// Contiguous most recent entries; when not empty, the back is `last_index`.
    cache: VecDeque<Entry>,
    cache_bytes: usize,
}

/// The latest generated snapshot, and whether raft asked for a newer one.
#[derive(Debug, Default)]
struct SnapshotSlot {
    latest: Option<(SnapshotMetadata, SnapshotDescriptor)>,
    requested: bool,
}

/// What a node finds in its data directory at start.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub applied: u64,
    pub members: BTreeMap<u64, String>,
}

/// The durable raft state of one node.
pub(crate) struct LogStore {
    db: Arc<Database>,
    path: PathBuf,
    snapshot_dir: PathBuf,
    core: RwLock<Core>,
    snapshot: Mutex<SnapshotSlot>,
    cache_limit: usize,
}

/// How a committed membership change turned out, worked out by raft-rs before the write.
#[derive(Debug, Clone)]
pub(crate) enum ConfOutcome {
    /// The configuration changed to `conf_state`; `member` is the address-book change.
    Applied {
        conf_state: ConfState,
        member: MemberUpdate,
    },
    /// raft-rs refused the change (e.g. it would remove the last voter).
    Rejected(String),
}

/// A change to the member address book.
#[derive(Debug, Clone)]
pub(crate) enum MemberUpdate {
    Add(u64, String),
    Remove(u64),
    Unchanged,
}

/// One unit of durable work: everything from one `Ready` (or `LightReady`).
#[derive(Debug, Default)]
pub(crate) struct WriteBatch {
    /// A snapshot from the leader to install first.
    pub restore: Option<Snapshot>,
    /// New log entries; they replace any stored entries at the same or higher indexes.
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    /// A newer commit index (from a `LightReady`).
    pub commit: Option<u64>,
    /// Committed entries to apply, in order.
    pub committed: Vec<Entry>,
    /// Outcomes of the membership changes among `committed`, by index.
    pub conf_changes: BTreeMap<u64, ConfOutcome>,
    /// Drop log entries up to this index (bounded by the applied index).
    pub compact_to: Option<u64>,
    /// Whether the commit must be durable before returning.
    pub sync: bool,
}

/// What applying one entry produced.
#[derive(Debug)]
pub(crate) enum AppliedResult {
    /// An empty entry (a new leader's first) or one nobody waits for.
    Noop,
    /// A proposal: the state machine's response, or why the command was invalid.
    Proposal(Result<Vec<u8>, String>),
    /// A membership change, or why it was refused.
    ConfChange(Result<(), String>),
}

#[derive(Debug)]
pub(crate) struct AppliedEntry {
    pub index: u64,
    pub term: u64,
    pub result: AppliedResult,
}

/// What one write did.
#[derive(Debug, Default)]
pub(crate) struct WriteOutcome {
    pub applied: Vec<AppliedEntry>,
    /// The member address book after the write, when it changed.
    pub members: Option<BTreeMap<u64, String>>,
    /// Time the durable commit took, when it was durable.
    pub sync_time: Option<Duration>,
    /// Entries made durable.
    pub appended: usize,
    pub compacted: bool,
    pub restored: bool,
}

fn db_err<E: Into<redb::Error>>(context: &'static str) -> impl FnOnce(E) -> StorageError {
    move |e| StorageError::db(context, e)
}

fn decode_pb<M: protobuf::Message>(bytes: &[u8], what: &str) -> Result<M, StorageError> {
    M::parse_from_bytes(bytes).map_err(|e| StorageError::Corrupt(format!("{what}: {e}")))
}

fn encode_pb<M: protobuf::Message>(message: &M, what: &str) -> Result<Vec<u8>, StorageError> {
    message
        .write_to_bytes()
        .map_err(|e| StorageError::Corrupt(format!("cannot encode {what}: {e}")))
}

impl LogStore {
    /// Opens (or creates and initialises) the node's database under `config.data_dir`.
    pub(crate) fn open(
        config: &RaftConfig,
        sm: &dyn ErasedStateMachine,
    ) -> Result<(Arc<LogStore>, Recovered), RaftError> {
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| StorageError::io(format!("create data directory {}", dir.display()), e))?;
        let snapshot_dir = dir.join("snapshots");
        std::fs::create_dir_all(&snapshot_dir).map_err(|e| {
            StorageError::io(
                format!("create snapshot directory {}", snapshot_dir.display()),
                e,
            )
        })?;
        snapshot::remove_partial_files(&snapshot_dir);
        let path = dir.join("raft.redb");
        let db = open_database(&path, config.verify_on_open)?;

        let txn = db
            .begin_write()
            .map_err(db_err("begin initial transaction"))?;
        let recovered_core;
        {
            let mut meta = txn.open_table(META).map_err(db_err("open raft_meta"))?;
            txn.open_table(LOG).map_err(db_err("open raft_log"))?;
            txn.open_table(REQUESTS)
                .map_err(db_err("open raft_requests"))?;
            txn.open_table(REQUESTS_BY_INDEX)
                .map_err(db_err("open raft_requests_by_index"))?;
            let mut members = txn
                .open_table(MEMBERS)
                .map_err(db_err("open raft_members"))?;
            check_identity(&mut meta, config, dir)?;
            let fresh = meta
                .get(KEY_HARD_STATE)
                .map_err(db_err("read hard state"))?
                .is_none();
            if fresh {
                initialise(&mut meta, &mut members, config)?;
            }
            recovered_core = load_core(&meta)?;
        }
        sm.init(&txn)?;
        txn.commit().map_err(db_err("commit initial transaction"))?;

        let mut core = recovered_core;
        let read = db.begin_read().map_err(db_err("begin read"))?;
        let log = read.open_table(LOG).map_err(db_err("open raft_log"))?;
        core.last_index = match log.last().map_err(db_err("read last log entry"))? {
            Some((index, _)) => index.value(),
            None => core.truncated.index,
        };
        if core.last_index < core.truncated.index
            || core.applied.index < core.truncated.index
            || core.applied.index > core.last_index.max(core.truncated.index)
        {
            return Err(StorageError::Corrupt(format!(
                "inconsistent positions in {}: truncated {}, applied {}, last {}",
                path.display(),
                core.truncated.index,
                core.applied.index,
                core.last_index
            ))
            .into());
        }
        let members = read_members(
            &read
                .open_table(MEMBERS)
                .map_err(db_err("open raft_members"))?,
        )?;
        drop(log);
        drop(read);
        let recovered = Recovered {
            applied: core.applied.index,
            members,
        };
        let store = LogStore {
            db: Arc::new(db),
            path,
            snapshot_dir,
            core: RwLock::new(core),
            snapshot: Mutex::new(SnapshotSlot::default()),
            cache_limit: config.entry_cache_size.as_usize(),
        };
        Ok((Arc::new(store), recovered))
    }

    pub(crate) fn db(&self) -> &Arc<Database> {
        &self.db
    }

    pub(crate) fn snapshot_dir(&self) -> &Path {
        &self.snapshot_dir
    }

    fn core(&self) -> std::sync::RwLockReadGuard<'_, Core> {
        // Core is replaced field by field under the write lock with no fallible step in between,
        // so a poisoned lock still holds a consistent value.
        self.core.read().unwrap_or_else(|p| p.into_inner())
    }

    fn core_mut(&self) -> std::sync::RwLockWriteGuard<'_, Core> {
        self.core.write().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, SnapshotSlot> {
        self.snapshot.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn applied(&self) -> IndexTerm {
        self.core().applied
    }

    pub(crate) fn first_and_last(&self) -> (u64, u64) {
        let core = self.core();
        (core.truncated.index + 1, core.last_index)
    }

    pub(crate) fn conf_state(&self) -> ConfState {
        self.core().conf_state.clone()
    }

    pub(crate) fn truncated(&self) -> IndexTerm {
        self.core().truncated
    }

    /// Whether raft asked for a snapshot that is not generated yet; clears the request.
    pub(crate) fn take_snapshot_request(&self) -> bool {
        std::mem::take(&mut self.slot().requested)
    }

    /// Publishes a newly generated snapshot and deletes the file of the one it replaces.
    pub(crate) fn set_latest_snapshot(
        &self,
        metadata: SnapshotMetadata,
        descriptor: SnapshotDescriptor,
    ) {
        let mut slot = self.slot();
        if let Some((_, old)) = slot.latest.take() {
            if old.file != descriptor.file {
                // A transfer still streaming the old file keeps its open handle.
                let _ = std::fs::remove_file(self.snapshot_dir.join(&old.file));
            }
        }
        slot.latest = Some((metadata, descriptor));
    }

    /// Performs one batch of durable work in a single transaction.
    pub(crate) fn write(
        &self,
        batch: WriteBatch,
        sm: &dyn ErasedStateMachine,
        dedup_window: u64,
    ) -> Result<WriteOutcome, RaftError> {
        let mut outcome = WriteOutcome::default();
        let (mut hard_state, mut conf_state, mut truncated, mut applied, mut last_index) = {
            let core = self.core();
            (
                core.hard_state.clone(),
                core.conf_state.clone(),
                core.truncated,
                core.applied,
                core.last_index,
            )
        };
        let mut cache_reset = false;
        let mut truncate_cache_from: Option<u64> = None;
        let hard_state_before = hard_state.clone();
        let conf_state_before = conf_state.clone();

        let mut txn = self.db.begin_write().map_err(db_err("begin write"))?;
        let durability = if batch.sync {
            Durability::Immediate
        } else {
            Durability::None
        };
        txn.set_durability(durability)
            .map_err(|e| StorageError::Corrupt(format!("cannot set durability: {e}")))?;
        let mut members_changed = false;

        if let Some(snap) = &batch.restore {
            let metadata = snap.get_metadata();
            let descriptor = SnapshotDescriptor::decode(snap.get_data()).map_err(|e| {
                StorageError::Corrupt(format!("snapshot descriptor does not decode: {e}"))
            })?;
            let file = self.snapshot_dir.join(&descriptor.file);
            snapshot::restore(&txn, &file, metadata, sm)?;
            conf_state = metadata.get_conf_state().clone();
            let position = IndexTerm {
                index: metadata.index,
                term: metadata.term,
            };
            applied = position;
            truncated = position;
            last_index = position.index;
            hard_state.commit = hard_state.commit.max(position.index);
            cache_reset = true;
            members_changed = true;
            outcome.restored = true;
            // The file has served its purpose.
            let _ = std::fs::remove_file(&file);
        }

        if let Some(first) = batch.entries.first() {
            let first_index = first.index;
            if first_index > last_index + 1 || first_index <= truncated.index {
                return Err(StorageError::Corrupt(format!(
                    "appending entries from {first_index} to a log holding {}..={last_index}",
                    truncated.index + 1
                ))
                .into());
            }
            let mut log = txn.open_table(LOG).map_err(db_err("open raft_log"))?;
            if first_index <= last_index {
                log.retain_in(first_index.., |_, _| false)
                    .map_err(db_err("truncate conflicting log entries"))?;
                truncate_cache_from = Some(first_index);
            }
            for entry in &batch.entries {
                let bytes = encode_pb(entry, "log entry")?;
                log.insert(entry.index, bytes.as_slice())
                    .map_err(db_err("append log entry"))?;
            }
            last_index = batch.entries.last().map_or(last_index, |e| e.index);
            outcome.appended = batch.entries.len();
        }

        if let Some(hs) = &batch.hard_state {
            hard_state = hs.clone();
        }
        if let Some(commit) = batch.commit {
            hard_state.commit = hard_state.commit.max(commit);
        }

        if !batch.committed.is_empty() {
            let mut requests = txn
                .open_table(REQUESTS)
                .map_err(db_err("open raft_requests"))?;
            let mut by_index = txn
                .open_table(REQUESTS_BY_INDEX)
                .map_err(db_err("open raft_requests_by_index"))?;
            let mut members = txn
                .open_table(MEMBERS)
                .map_err(db_err("open raft_members"))?;
            for entry in &batch.committed {
                if entry.index <= applied.index {
                    // Already applied before a restart; raft-rs may hand it over again.
                    continue;
                }
                let result = match entry.get_entry_type() {
                    EntryType::EntryNormal if entry.data.is_empty() => AppliedResult::Noop,
                    EntryType::EntryNormal => AppliedResult::Proposal(apply_proposal(
                        &txn,
                        &mut requests,
                        &mut by_index,
                        sm,
                        entry,
                        dedup_window,
                    )?),
                    EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                        match batch.conf_changes.get(&entry.index) {
                            Some(ConfOutcome::Applied {
                                conf_state: new,
                                member,
                            }) => {
                                conf_state = new.clone();
                                match member {
                                    MemberUpdate::Add(id, addr) => {
                                        members
                                            .insert(*id, addr.as_str())
                                            .map_err(db_err("record member"))?;
                                        members_changed = true;
                                    }
                                    MemberUpdate::Remove(id) => {
                                        members.remove(*id).map_err(db_err("remove member"))?;
                                        members_changed = true;
                                    }
                                    MemberUpdate::Unchanged => {}
                                }
                                AppliedResult::ConfChange(Ok(()))
                            }
                            Some(ConfOutcome::Rejected(reason)) => {
                                AppliedResult::ConfChange(Err(reason.clone()))
                            }
                            None => {
                                return Err(StorageError::Corrupt(format!(
                                    "membership change at index {} was not prepared",
                                    entry.index
                                ))
                                .into());
                            }
                        }
                    }
                };
                applied = IndexTerm {
                    index: entry.index,
                    term: entry.term,
                };
                outcome.applied.push(AppliedEntry {
                    index: entry.index,
                    term: entry.term,
                    result,
                });
            }
            expire_requests(&mut requests, &mut by_index, applied.index, dedup_window)?;
        }
        // raft-rs refuses to start with an applied index above the commit index.
        hard_state.commit = hard_state.commit.max(applied.index);

        if let Some(target) = batch.compact_to {
            let target = target.min(applied.index);
            if target > truncated.index {
                let mut log = txn.open_table(LOG).map_err(db_err("open raft_log"))?;
                let term = match log.get(target).map_err(db_err("read compaction point"))? {
                    Some(bytes) => decode_pb::<Entry>(bytes.value(), "log entry")?.term,
                    None => {
                        return Err(StorageError::Corrupt(format!(
                            "log entry {target} missing at compaction"
                        ))
                        .into());
                    }
                };
                log.retain_in(..=target, |_, _| false)
                    .map_err(db_err("compact log"))?;
                truncated = IndexTerm {
                    index: target,
                    term,
                };
                outcome.compacted = true;
            }
        }

        {
            let mut meta = txn.open_table(META).map_err(db_err("open raft_meta"))?;
            if hard_state != hard_state_before || outcome.restored {
                let bytes = encode_pb(&hard_state, "hard state")?;
                meta.insert(KEY_HARD_STATE, bytes.as_slice())
                    .map_err(db_err("write hard state"))?;
            }
            if conf_state != conf_state_before || outcome.restored {
                let bytes = encode_pb(&conf_state, "conf state")?;
                meta.insert(KEY_CONF_STATE, bytes.as_slice())
                    .map_err(db_err("write conf state"))?;
            }
            if !outcome.applied.is_empty() || outcome.restored {
                meta.insert(KEY_APPLIED, applied.encode().as_slice())
                    .map_err(db_err("write applied index"))?;
            }
            if outcome.compacted || outcome.restored {
                meta.insert(KEY_TRUNCATED, truncated.encode().as_slice())
                    .map_err(db_err("write truncated index"))?;
            }
        }

        let members_after = if members_changed {
            let members = txn
                .open_table(MEMBERS)
                .map_err(db_err("open raft_members"))?;
            Some(read_members(&members)?)
        } else {
            None
        };

        let started = Instant::now();
        txn.commit().map_err(db_err("commit raft write"))?;
        if batch.sync {
            outcome.sync_time = Some(started.elapsed());
        }
        outcome.members = members_after;

        let mut core = self.core_mut();
        if cache_reset {
            core.cache.clear();
            core.cache_bytes = 0;
        }
        if let Some(from) = truncate_cache_from {
            while core.cache.back().is_some_and(|e| e.index >= from) {
                if let Some(e) = core.cache.pop_back() {
                    core.cache_bytes -= e.compute_size() as usize;
                }
            }
        }
        if let Some(first) = batch.entries.first() {
            if core
                .cache
                .back()
                .is_some_and(|e| e.index + 1 != first.index)
            {
                core.cache.clear();
                core.cache_bytes = 0;
            }
        }
        for entry in batch.entries {
            core.cache_bytes += entry.compute_size() as usize;
            core.cache.push_back(entry);
        }
        while core.cache_bytes > self.cache_limit
            || core
                .cache
                .front()
                .is_some_and(|e| e.index <= truncated.index)
        {
            match core.cache.pop_front() {
                Some(e) => core.cache_bytes -= e.compute_size() as usize,
                None => break,
            }
        }
        core.hard_state = hard_state;
        core.conf_state = conf_state;
        core.truncated = truncated;
        core.applied = applied;
        core.last_index = last_index;
        Ok(outcome)
    }

    fn read_entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> Result<Vec<Entry>, StorageError> {
        let txn = self.db.begin_read().map_err(db_err("begin read"))?;
        let log = txn.open_table(LOG).map_err(db_err("open raft_log"))?;
        let mut entries = Vec::new();
        let mut size = 0u64;
        let mut cut = false;
        for item in log.range(low..high).map_err(db_err("read log range"))? {
            let (index, bytes) = item.map_err(db_err("read log entry"))?;
            let entry: Entry = decode_pb(bytes.value(), "log entry")?;
            let expected = low + entries.len() as u64;
            if index.value() != expected || entry.index != expected {
                return Err(StorageError::Corrupt(format!(
                    "log has a gap: expected entry {expected}, found key {} holding entry {}",
                    index.value(),
                    entry.index
                )));
            }
            size += u64::from(entry.compute_size());
            if !entries.is_empty() && max_size.is_some_and(|max| size > max) {
                cut = true;
                break;
            }
            entries.push(entry);
        }
        if !cut && entries.len() as u64 != high - low {
            return Err(StorageError::Corrupt(format!(
                "log entries {low}..{high} are missing from {}",
                low + entries.len() as u64
            )));
        }
        Ok(entries)
    }
}

/// Opens the database file, turning every failure (including a panic inside redb on a damaged
/// file) into a clear error.
fn open_database(path: &Path, verify: bool) -> Result<Database, StorageError> {
    let display = path.display().to_string();
    let opened = std::panic::catch_unwind(|| {
        let mut builder = Database::builder();
        builder.set_check_integrity_on_open(verify);
        builder.create(path)
    });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(StorageError::Corrupt(format!(
            "{display} is already open in another process; is another node using this data_dir?"
        ))),
        Ok(Err(error)) => Err(StorageError::Corrupt(format!(
            "cannot open {display}: {error}. If the file is damaged, move the node's data_dir \
             aside and re-add the node to the group so that it receives a snapshot"
        ))),
        Err(_) => Err(StorageError::Corrupt(format!(
            "cannot open {display}: the file is damaged. Move the node's data_dir aside and \
             re-add the node to the group so that it receives a snapshot"
        ))),
    }
}

fn check_identity(
    meta: &mut redb::Table<'_, &str, &[u8]>,
    config: &RaftConfig,
    dir: &Path,
) -> Result<(), StorageError> {
    let cluster = meta
        .get(KEY_CLUSTER)
        .map_err(db_err("read identity"))?
        .map(|v| v.value().to_vec());
    let node = meta
        .get(KEY_NODE_ID)
        .map_err(db_err("read identity"))?
        .map(|v| v.value().to_vec());
    match (cluster, node) {
        (Some(cluster), Some(node)) => {
            let node =
                u64::from_le_bytes(node.as_slice().try_into().map_err(|_| {
                    StorageError::Corrupt("stored node id is not 8 bytes".to_string())
                })?);
            let cluster = String::from_utf8_lossy(&cluster).into_owned();
            if cluster != config.cluster || node != config.node_id {
                return Err(StorageError::WrongIdentity {
                    dir: dir.display().to_string(),
                    found: format!("node {node} of cluster {cluster:?}"),
                    expected: format!("node {} of cluster {:?}", config.node_id, config.cluster),
                });
            }
        }
        _ => {
            meta.insert(KEY_CLUSTER, config.cluster.as_bytes())
                .map_err(db_err("write identity"))?;
            meta.insert(KEY_NODE_ID, config.node_id.to_le_bytes().as_slice())
                .map_err(db_err("write identity"))?;
        }
    }
    Ok(())
}

/// Writes the starting state of an empty database: founding members get the founding
/// configuration at `INIT_INDEX`; any other node starts empty and waits for a snapshot.
fn initialise(
    meta: &mut redb::Table<'_, &str, &[u8]>,
    members: &mut redb::Table<'_, u64, &str>,
    config: &RaftConfig,
) -> Result<(), StorageError> {
    let founding = config
        .initial_members
        .iter()
        .any(|m| m.id == config.node_id);
    let mut hard_state = HardState::default();
    let mut conf_state = ConfState::default();
    let mut position = IndexTerm::default();
    if founding {
        hard_state.term = INIT_TERM;
        hard_state.commit = INIT_INDEX;
        conf_state.set_voters(config.initial_members.iter().map(|m| m.id).collect());
        position = IndexTerm {
            index: INIT_INDEX,
            term: INIT_TERM,
        };
        for member in &config.initial_members {
            members
                .insert(member.id, member.addr.as_str())
                .map_err(db_err("record founding member"))?;
        }
    }
    meta.insert(
        KEY_HARD_STATE,
        encode_pb(&hard_state, "hard state")?.as_slice(),
    )
    .map_err(db_err("write hard state"))?;
    meta.insert(
        KEY_CONF_STATE,
        encode_pb(&conf_state, "conf state")?.as_slice(),
    )
    .map_err(db_err("write conf state"))?;
    meta.insert(KEY_APPLIED, position.encode().as_slice())
        .map_err(db_err("write applied index"))?;
    meta.insert(KEY_TRUNCATED, position.encode().as_slice())
        .map_err(db_err("write truncated index"))?;
    Ok(())
}

fn load_core(meta: &redb::Table<'_, &str, &[u8]>) -> Result<Core, StorageError> {
    let get = |key: &str| -> Result<Vec<u8>, StorageError> {
        meta.get(key)
            .map_err(db_err("read raft meta"))?
            .map(|v| v.value().to_vec())
            .ok_or_else(|| StorageError::Corrupt(format!("raft meta has no {key}")))
    };
    Ok(Core {
        hard_state: decode_pb(&get(KEY_HARD_STATE)?, "hard state")?,
        conf_state: decode_pb(&get(KEY_CONF_STATE)?, "conf state")?,
        applied: IndexTerm::decode(&get(KEY_APPLIED)?, "applied index")?,
        truncated: IndexTerm::decode(&get(KEY_TRUNCATED)?, "truncated index")?,
        ..Core::default()
    })
}

pub(crate) fn read_members(
    table: &impl ReadableTable<u64, &'static str>,
) -> Result<BTreeMap<u64, String>, StorageError> {
    let mut members = BTreeMap::new();
    for item in table.iter().map_err(db_err("read members"))? {
        let (id, addr) = item.map_err(db_err("read member"))?;
        members.insert(id.value(), addr.value().to_string());
    }
    Ok(members)
}

/// Applies one normal entry, answering a retried request from its record instead of applying
/// it again.
fn apply_proposal(
    txn: &WriteTransaction,
    requests: &mut redb::Table<'_, (u64, u64), (u64, &[u8])>,
    by_index: &mut redb::Table<'_, u64, (u64, u64)>,
    sm: &dyn ErasedStateMachine,
    entry: &Entry,
    dedup_window: u64,
) -> Result<Result<Vec<u8>, String>, RaftError> {
    let proposal = match Proposal::decode(entry.data.as_ref()) {
        Ok(proposal) => proposal,
        Err(error) => return Ok(Err(format!("log entry is not a proposal: {error}"))),
    };
    let id = proposal
        .id
        .filter(|id| id.client != 0)
        .map(|id| (id.client, id.seq));
    if let Some(key) = id {
        if let Some(record) = requests.get(key).map_err(db_err("read request record"))? {
            let (index, bytes) = record.value();
            // The window is measured from this entry, so every replica decides alike however
            // its writes were batched.
            if index.saturating_add(dedup_window) >= entry.index {
                let outcome = ApplyOutcome::decode(bytes).map_err(|e| {
                    StorageError::Corrupt(format!("request record does not decode: {e}"))
                })?;
                return Ok(outcome_result(outcome));
            }
        }
    }
    let ctx = ApplyContext {
        index: entry.index,
        term: entry.term,
    };
    let result = sm.apply_bytes(txn, ctx, &proposal.command)?;
    if let Some(key) = id {
        let outcome = ApplyOutcome {
            outcome: Some(match &result {
                Ok(response) => apply_outcome::Outcome::Response(response.clone()),
                Err(reason) => apply_outcome::Outcome::InvalidCommand(reason.clone()),
            }),
        };
        let bytes = outcome.encode_to_vec();
        requests
            .insert(key, (entry.index, bytes.as_slice()))
            .map_err(db_err("write request record"))?;
        by_index
            .insert(entry.index, key)
            .map_err(db_err("write request index"))?;
    }
    Ok(result)
}

pub(crate) fn outcome_result(outcome: ApplyOutcome) -> Result<Vec<u8>, String> {
    match outcome.outcome {
        Some(apply_outcome::Outcome::Response(response)) => Ok(response),
        Some(apply_outcome::Outcome::InvalidCommand(reason)) => Err(reason),
        None => Ok(Vec::new()),
    }
}

/// Deletes request records that fell out of the deduplication window.
fn expire_requests(
    requests: &mut redb::Table<'_, (u64, u64), (u64, &[u8])>,
    by_index: &mut redb::Table<'_, u64, (u64, u64)>,
    applied: u64,
    dedup_window: u64,
) -> Result<(), StorageError> {
    let Some(cutoff) = applied.checked_sub(dedup_window) else {
        return Ok(());
    };
    let mut expired = Vec::new();
    for item in by_index
        .range(..cutoff)
        .map_err(db_err("scan request index"))?
    {
        let (index, key) = item.map_err(db_err("read request index"))?;
        expired.push((index.value(), key.value()));
        if expired.len() >= MAX_EXPIRED_PER_WRITE {
            break;
        }
    }
    for (index, key) in expired {
        by_index
            .remove(index)
            .map_err(db_err("expire request index"))?;
        // The same request id may have been recorded again later; keep the newer record.
        let same = requests
            .get(key)
            .map_err(db_err("read request record"))?
            .is_some_and(|record| record.value().0 == index);
        if same {
            requests
                .remove(key)
                .map_err(db_err("expire request record"))?;
        }
    }
    Ok(())
}

/// raft-rs's view of the store. raft-rs treats any error but `Compacted`, `Unavailable` and
/// `SnapshotTemporarilyUnavailable` as fatal, so database failures stop the node.
pub(crate) struct RaftStorage(pub(crate) Arc<LogStore>);

fn other(error: StorageError) -> raft::Error {
    raft::Error::Store(RaftStorageError::Other(Box::new(error)))
}

impl raft::Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let core = self.0.core();
        Ok(RaftState::new(
            core.hard_state.clone(),
            core.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        {
            let core = self.0.core();
            if low <= core.truncated.index {
                return Err(raft::Error::Store(RaftStorageError::Compacted));
            }
            if high > core.last_index + 1 {
                return Err(raft::Error::Store(RaftStorageError::Unavailable));
            }
            if let Some(front) = core.cache.front() {
                if front.index <= low {
                    let start = (low - front.index) as usize;
                    let end = (high - front.index) as usize;
                    let mut entries: Vec<Entry> = core.cache.range(start..end).cloned().collect();
                    raft::util::limit_size(&mut entries, max_size);
                    return Ok(entries);
                }
            }
        }
        self.0.read_entries(low, high, max_size).map_err(other)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let core = self.0.core();
        if index == core.truncated.index {
            return Ok(core.truncated.term);
        }
        if index < core.truncated.index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if index > core.last_index {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        if let Some(front) = core.cache.front() {
            if front.index <= index {
                return core
                    .cache
                    .get((index - front.index) as usize)
                    .map(|e| e.term)
                    .ok_or(raft::Error::Store(RaftStorageError::Unavailable));
            }
        }
        drop(core);
        let entries = self.0.read_entries(index, index + 1, None).map_err(other)?;
        entries
            .first()
            .map(|e| e.term)
            .ok_or(raft::Error::Store(RaftStorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.0.core().truncated.index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.0.core().last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let truncated = self.0.core().truncated.index;
        let mut slot = self.0.slot();
        if let Some((metadata, descriptor)) = &slot.latest {
            if metadata.index >= request_index && metadata.index >= truncated {
                let mut snapshot = Snapshot::default();
                snapshot.set_metadata(metadata.clone());
                snapshot.data = descriptor.encode_to_vec().into();
                return Ok(snapshot);
            }
        }
        slot.requested = true;
        Err(raft::Error::Store(
            RaftStorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("path", &self.path)
            .finish()
    }
}

/// ff-raft's part of a snapshot, read in the snapshot's read transaction.
pub(crate) fn snapshot_meta(
    txn: &redb::ReadTransaction,
    cluster: &str,
) -> Result<crate::proto::SnapshotMeta, StorageError> {
    use crate::proto::{DedupRecord, Member, RequestId, SnapshotMeta};
    let meta = txn.open_table(META).map_err(db_err("open raft_meta"))?;
    let get = |key: &str| -> Result<Vec<u8>, StorageError> {
        meta.get(key)
            .map_err(db_err("read raft meta"))?
            .map(|v| v.value().to_vec())
            .ok_or_else(|| StorageError::Corrupt(format!("raft meta has no {key}")))
    };
    let applied = IndexTerm::decode(&get(KEY_APPLIED)?, "applied index")?;
    let conf_state = get(KEY_CONF_STATE)?;
    let members = read_members(
        &txn.open_table(MEMBERS)
            .map_err(db_err("open raft_members"))?,
    )?
    .into_iter()
    .map(|(id, addr)| Member { id, addr })
    .collect();
    let mut requests = Vec::new();
    let table = txn
        .open_table(REQUESTS)
        .map_err(db_err("open raft_requests"))?;
    for item in table.iter().map_err(db_err("scan request records"))? {
        let (key, value) = item.map_err(db_err("read request record"))?;
        let (client, seq) = key.value();
        let (index, bytes) = value.value();
        let outcome = ApplyOutcome::decode(bytes)
            .map_err(|e| StorageError::Corrupt(format!("request record does not decode: {e}")))?;
        requests.push(DedupRecord {
            id: Some(RequestId { client, seq }),
            index,
            outcome: Some(outcome),
        });
    }
    Ok(SnapshotMeta {
        index: applied.index,
        term: applied.term,
        conf_state,
        members,
        requests,
        cluster: cluster.to_string(),
    })
}

/// Replaces ff-raft's tables with a snapshot's content; the caller sets positions and hard
/// state afterwards.
pub(crate) fn restore_meta(
    txn: &WriteTransaction,
    meta: &crate::proto::SnapshotMeta,
) -> Result<(), StorageError> {
    let mut log = txn.open_table(LOG).map_err(db_err("open raft_log"))?;
    log.retain(|_, _| false).map_err(db_err("clear log"))?;
    let mut members = txn
        .open_table(MEMBERS)
        .map_err(db_err("open raft_members"))?;
    members
        .retain(|_, _| false)
        .map_err(db_err("clear members"))?;
    for member in &meta.members {
        members
            .insert(member.id, member.addr.as_str())
            .map_err(db_err("restore member"))?;
    }
    let mut requests = txn
        .open_table(REQUESTS)
        .map_err(db_err("open raft_requests"))?;
    requests
        .retain(|_, _| false)
        .map_err(db_err("clear request records"))?;
    let mut by_index = txn
        .open_table(REQUESTS_BY_INDEX)
        .map_err(db_err("open raft_requests_by_index"))?;
    by_index
        .retain(|_, _| false)
        .map_err(db_err("clear request index"))?;
    for record in &meta.requests {
        let Some(id) = &record.id else { continue };
        let outcome = record.outcome.clone().unwrap_or_default().encode_to_vec();
        requests
            .insert((id.client, id.seq), (record.index, outcome.as_slice()))
            .map_err(db_err("restore request record"))?;
        by_index
            .insert(record.index, (id.client, id.seq))
            .map_err(db_err("restore request index"))?;
    }
    let conf_state: ConfState = decode_pb(&meta.conf_state, "snapshot conf state")?;
    let mut meta_table = txn.open_table(META).map_err(db_err("open raft_meta"))?;
    meta_table
        .insert(
            KEY_CONF_STATE,
            encode_pb(&conf_state, "conf state")?.as_slice(),
        )
        .map_err(db_err("write conf state"))?;
    Ok(())
}

/// The applied index as of a read transaction.
pub(crate) fn applied_in(txn: &redb::ReadTransaction) -> Result<u64, StorageError> {
    let meta = txn.open_table(META).map_err(db_err("open raft_meta"))?;
    let bytes = meta
        .get(KEY_APPLIED)
        .map_err(db_err("read applied index"))?
        .ok_or_else(|| StorageError::Corrupt("raft meta has no applied index".to_string()))?;
    Ok(IndexTerm::decode(bytes.value(), "applied index")?.index)
}
