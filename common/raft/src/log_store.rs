//! The raft log and hard state in `log.redb`, and raft-rs's `Storage` view of them.
//!
//! Every write of new entries or of a changed term/vote commits with fsync
//! (`Durability::Immediate`); it is the only work on the path of an acknowledgement, so it holds
//! nothing but log pages (the state machine lives in `state.redb`, see `state_store`). A small
//! in-memory cache of recent entries serves raft-rs's reads for replication without touching
//! the database.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::config::RaftConfig;
use crate::db::{
    INIT, IndexTerm, META, check_identity, db_err, decode_pb, encode_pb, get_meta, open_database,
    require_meta,
};
use crate::error::StorageError;
use crate::proto::SnapshotDescriptor;

const LOG: TableDefinition<'static, u64, &'static [u8]> = TableDefinition::new("raft_log");
const KEY_HARD_STATE: &str = "hard_state";
const KEY_TRUNCATED: &str = "truncated";

/// In-memory mirror of the durable log state, updated after each committed write.
#[derive(Debug, Default)]
struct Core {
    hard_state: HardState,
    /// The configuration at start; raft-rs reads it once, then tracks changes itself.
    conf_state: ConfState,
    truncated: IndexTerm,
    last_index: u64,
    /// Highest index known to be on disk; entries above it live only in the cache.
    persisted_last: u64,
    /// (stage number, first index) of staged appends not yet on disk: a later append that
    /// replaced entries keeps them off disk even after an earlier batch is written.
    unpersisted: VecDeque<(u64, u64)>,
    /// Number of the last staged batch.
    stage_seq: u64,
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

/// One durable write to the log.
#[derive(Debug, Default)]
pub(crate) struct LogBatch {
    /// A snapshot was installed at this position: drop the whole log first.
    pub install: Option<IndexTerm>,
    /// New entries; they replace stored entries at the same or higher indexes.
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    /// A newer commit index to record with the hard state.
    pub commit: Option<u64>,
    /// Drop entries up to this index.
    pub compact_to: Option<u64>,
    /// Whether the commit must be durable before returning.
    pub sync: bool,
    /// Set by `stage`: the compaction point with its term, if the compaction applies.
    pub compacted: Option<IndexTerm>,
    /// Set by `stage`: the last index of the log once this batch is written.
    pub last_index_after: u64,
    /// Set by `stage`: the batch's place in staging order.
    pub stage_seq: u64,
}

impl LogBatch {
    /// Whether the batch asks for nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.install.is_none()
            && self.entries.is_empty()
            && self.hard_state.is_none()
            && self.commit.is_none()
            && self.compact_to.is_none()
    }
}

/// What one log write did.
#[derive(Debug, Default)]
pub(crate) struct LogOutcome {
    /// Time the durable commit took, when it was durable.
    pub sync_time: Option<Duration>,
    /// Entries written.
    pub appended: usize,
    /// Whether entries were compacted away.
    pub compacted: bool,
}

/// The durable raft log of one node.
pub(crate) struct LogStore {
    db: Database,
    path: PathBuf,
    core: RwLock<Core>,
    snapshot: Mutex<SnapshotSlot>,
    cache_limit: usize,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("path", &self.path)
            .finish()
    }
}

impl LogStore {
    /// Opens (or creates) `log.redb` and reconciles it with the state machine's applied
    /// position: a log that does not hold `applied` with the same term (a snapshot was installed
    /// in the state machine but the crash came before the log was reset) is reset to it.
    pub(crate) fn open(
        config: &RaftConfig,
        applied: IndexTerm,
        conf_state: ConfState,
    ) -> Result<LogStore, StorageError> {
        let path = config.data_dir.join("log.redb");
        let db = open_database(&path, config.verify_on_open)?;
        let txn = db.begin_write().map_err(db_err("begin log open"))?;
        {
            let mut meta = txn.open_table(META).map_err(db_err("open raft_meta"))?;
            txn.open_table(LOG).map_err(db_err("open raft_log"))?;
            check_identity(&mut meta, config, &config.data_dir)?;
            if get_meta(&meta, KEY_HARD_STATE)?.is_none() {
                // A fresh log next to a state that has moved on means the log was lost: this
                // node's votes and acknowledged entries are gone, and raft's safety with them.
                if applied.index > INIT.index {
                    return Err(StorageError::Corrupt(format!(
                        "{} is missing or empty, but state.redb has applied up to index {}; \
                         restore the file, or move the node's data_dir aside and re-add the \
                         node to the group",
                        path.display(),
                        applied.index
                    )));
                }
                let founding = config
                    .initial_members
                    .iter()
                    .any(|m| m.id == config.node_id);
                let (hard_state, truncated) = if founding {
                    let hs = HardState {
                        term: INIT.term,
                        commit: INIT.index,
                        ..HardState::default()
                    };
                    (hs, INIT)
                } else {
                    (HardState::default(), IndexTerm::default())
                };
                meta.insert(
                    KEY_HARD_STATE,
                    encode_pb(&hard_state, "hard state")?.as_slice(),
                )
                .map_err(db_err("write hard state"))?;
                meta.insert(KEY_TRUNCATED, truncated.encode().as_slice())
                    .map_err(db_err("write truncated index"))?;
            }
        }
        txn.commit().map_err(db_err("commit log open"))?;

        let store = LogStore {
            db,
            path,
            core: RwLock::new(Core::default()),
            snapshot: Mutex::new(SnapshotSlot::default()),
            cache_limit: config.entry_cache_size.as_usize(),
        };
        store.load(conf_state)?;
        let truncated = store.truncated();
        if applied.index < truncated.index {
            return Err(StorageError::Corrupt(format!(
                "{}: the log was compacted to {} but the state machine has only applied {}",
                store.path.display(),
                truncated.index,
                applied.index
            )));
        }
        if store.term_of(applied.index)? != Some(applied.term) {
            tracing::info!(
                index = applied.index,
                term = applied.term,
                "log does not hold the applied position; resetting it there"
            );
            store.write(LogBatch {
                install: Some(applied),
                sync: true,
                ..LogBatch::default()
            })?;
        }
        // raft-rs refuses an applied index above the commit index.
        if store.core().hard_state.commit < applied.index {
            store.write(LogBatch {
                commit: Some(applied.index),
                sync: true,
                ..LogBatch::default()
            })?;
        }
        Ok(store)
    }

    fn load(&self, conf_state: ConfState) -> Result<(), StorageError> {
        let txn = self.db.begin_read().map_err(db_err("begin read"))?;
        let meta = txn.open_table(META).map_err(db_err("open raft_meta"))?;
        let log = txn.open_table(LOG).map_err(db_err("open raft_log"))?;
        let hard_state = decode_pb(&require_meta(&meta, KEY_HARD_STATE)?, "hard state")?;
        let truncated = IndexTerm::decode(&require_meta(&meta, KEY_TRUNCATED)?, "truncated index")?;
        let last_index = match log.last().map_err(db_err("read last log entry"))? {
            Some((index, _)) => index.value(),
            None => truncated.index,
        };
        if last_index < truncated.index {
            return Err(StorageError::Corrupt(format!(
                "{}: last log entry {last_index} is below the compaction point {}",
                self.path.display(),
                truncated.index
            )));
        }
        *self.core_mut() = Core {
            hard_state,
            conf_state,
            truncated,
            last_index,
            persisted_last: last_index,
            unpersisted: VecDeque::new(),
            stage_seq: 0,
            cache: VecDeque::new(),
            cache_bytes: 0,
        };
        Ok(())
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

    /// First and last index held.
    pub(crate) fn first_and_last(&self) -> (u64, u64) {
        let core = self.core();
        (core.truncated.index + 1, core.last_index)
    }

    /// The compaction point.
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
        dir: &Path,
        metadata: SnapshotMetadata,
        descriptor: SnapshotDescriptor,
    ) {
        let mut slot = self.slot();
        if let Some((_, old)) = slot.latest.take() {
            // A transfer still streaming the old file keeps its open handle.
            if old.file != descriptor.file {
                let _ = std::fs::remove_file(dir.join(&old.file));
            }
        }
        slot.latest = Some((metadata, descriptor));
    }

    /// The term of the entry at `index`, `None` if the log does not hold it.
    fn term_of(&self, index: u64) -> Result<Option<u64>, StorageError> {
        let core = self.core();
        if index == core.truncated.index {
            return Ok(Some(core.truncated.term));
        }
        if index < core.truncated.index || index > core.last_index {
            return Ok(None);
        }
        if let Some(front) = core.cache.front().filter(|f| f.index <= index) {
            return Ok(core
                .cache
                .get((index - front.index) as usize)
                .map(|e| e.term));
        }
        drop(core);
        Ok(self
            .read_entries(index, index + 1, None)?
            .first()
            .map(|e| e.term))
    }

    /// Writes one batch now: [`LogStore::stage`] then [`LogStore::persist`].
    pub(crate) fn write(&self, mut batch: LogBatch) -> Result<LogOutcome, StorageError> {
        self.stage(&mut batch)?;
        self.persist(std::slice::from_ref(&batch))
    }

    /// Makes a batch visible to raft-rs (entries, last index, hard state, compaction point)
    /// before it is on disk, as `advance_append_async` requires, and resolves what the disk
    /// write needs (the merged hard state, the term at the compaction point). Batches must be
    /// persisted in the order they were staged.
    pub(crate) fn stage(&self, batch: &mut LogBatch) -> Result<(), StorageError> {
        let compaction = match batch.compact_to {
            Some(target) => match self.term_of(target)? {
                Some(term) if target > self.truncated().index => Some(IndexTerm {
                    index: target,
                    term,
                }),
                _ => None,
            },
            None => None,
        };
        let mut core = self.core_mut();
        let mut hard_state = core.hard_state.clone();
        if let Some(position) = batch.install {
            core.cache.clear();
            core.cache_bytes = 0;
            core.truncated = position;
            core.last_index = position.index;
            hard_state.commit = hard_state.commit.max(position.index);
        }
        if let Some(first) = batch.entries.first().map(|e| e.index) {
            if first > core.last_index + 1 || first <= core.truncated.index {
                return Err(StorageError::Corrupt(format!(
                    "appending entries from {first} to a log holding {}..={}",
                    core.truncated.index + 1,
                    core.last_index
                )));
            }
            while core.cache.back().is_some_and(|e| e.index >= first) {
                if let Some(e) = core.cache.pop_back() {
                    core.cache_bytes -= e.compute_size() as usize;
                }
            }
            // Anything below `first` that the cache does not hold is already on disk.
            if core
                .cache
                .back()
                .is_some_and(|back| back.index + 1 != first)
            {
                core.cache.clear();
                core.cache_bytes = 0;
            }
            for entry in &batch.entries {
                core.cache_bytes += entry.compute_size() as usize;
                core.cache.push_back(entry.clone());
            }
            core.last_index = batch.entries.last().map_or(core.last_index, |e| e.index);
            core.persisted_last = core.persisted_last.min(first - 1);
        }
        core.stage_seq += 1;
        batch.stage_seq = core.stage_seq;
        if let Some(first) = batch.entries.first().map(|e| e.index) {
            let seq = core.stage_seq;
            core.unpersisted.push_back((seq, first));
        }
        if let Some(position) = compaction {
            core.truncated = position;
            while core
                .cache
                .front()
                .is_some_and(|e| e.index <= position.index)
            {
                if let Some(e) = core.cache.pop_front() {
                    core.cache_bytes -= e.compute_size() as usize;
                }
            }
        }
        batch.compacted = compaction;
        if let Some(hs) = &batch.hard_state {
            // The commit index only moves forward, whatever order updates arrive in.
            let commit = hard_state.commit.max(hs.commit);
            hard_state = hs.clone();
            hard_state.commit = commit;
        }
        if let Some(commit) = batch.commit {
            hard_state.commit = hard_state.commit.max(commit);
        }
        batch.hard_state =
            (hard_state != core.hard_state || batch.install.is_some()).then(|| hard_state.clone());
        core.hard_state = hard_state;
        batch.last_index_after = core.last_index;
        Ok(())
    }

    /// Writes staged batches, in order, in one transaction: fsync'd if any of them must be.
    pub(crate) fn persist(&self, batches: &[LogBatch]) -> Result<LogOutcome, StorageError> {
        let mut outcome = LogOutcome::default();
        let Some(last) = batches.last() else {
            return Ok(outcome);
        };
        let sync = batches.iter().any(|b| b.sync);
        let mut txn = self.db.begin_write().map_err(db_err("begin log write"))?;
        let durability = if sync {
            Durability::Immediate
        } else {
            Durability::None
        };
        txn.set_durability(durability)
            .map_err(|e| StorageError::Corrupt(format!("cannot set durability: {e}")))?;
        {
            let mut log = txn.open_table(LOG).map_err(db_err("open raft_log"))?;
            let mut meta = txn.open_table(META).map_err(db_err("open raft_meta"))?;
            for batch in batches {
                if let Some(position) = batch.install {
                    log.retain(|_, _| false).map_err(db_err("clear log"))?;
                    meta.insert(KEY_TRUNCATED, position.encode().as_slice())
                        .map_err(db_err("write truncated index"))?;
                }
                if let Some(first) = batch.entries.first().map(|e| e.index) {
                    log.retain_in(first.., |_, _| false)
                        .map_err(db_err("truncate conflicting log entries"))?;
                    for entry in &batch.entries {
                        let bytes = encode_pb(entry, "log entry")?;
                        log.insert(entry.index, bytes.as_slice())
                            .map_err(db_err("append log entry"))?;
                    }
                    outcome.appended += batch.entries.len();
                }
                if let Some(position) = batch.compacted {
                    log.retain_in(..=position.index, |_, _| false)
                        .map_err(db_err("compact log"))?;
                    meta.insert(KEY_TRUNCATED, position.encode().as_slice())
                        .map_err(db_err("write truncated index"))?;
                    outcome.compacted = true;
                }
                if let Some(hard_state) = &batch.hard_state {
                    meta.insert(
                        KEY_HARD_STATE,
                        encode_pb(hard_state, "hard state")?.as_slice(),
                    )
                    .map_err(db_err("write hard state"))?;
                }
            }
        }
        let started = Instant::now();
        txn.commit().map_err(db_err("commit log write"))?;
        if sync {
            outcome.sync_time = Some(started.elapsed());
        }
        let mut core = self.core_mut();
        while core
            .unpersisted
            .front()
            .is_some_and(|(seq, _)| *seq <= last.stage_seq)
        {
            core.unpersisted.pop_front();
        }
        // Entries replaced by a batch staged after this one are not on disk yet.
        let floor = core
            .unpersisted
            .iter()
            .map(|(_, first)| first - 1)
            .min()
            .unwrap_or(u64::MAX);
        core.persisted_last = last.last_index_after.min(floor).min(core.last_index);
        // Only entries already on disk may leave the cache: raft-rs reads the others from it.
        while core.cache_bytes > self.cache_limit
            && core
                .cache
                .front()
                .is_some_and(|e| e.index <= core.persisted_last)
        {
            match core.cache.pop_front() {
                Some(e) => core.cache_bytes -= e.compute_size() as usize,
                None => break,
            }
        }
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

/// raft-rs's view of the log. raft-rs treats any error but `Compacted`, `Unavailable` and
/// `SnapshotTemporarilyUnavailable` as fatal, so database failures stop the node.
pub(crate) struct RaftStorage(pub(crate) std::sync::Arc<LogStore>);

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
        }
        // The cache holds every entry not yet on disk and maybe some below; what lies under the
        // cache's front is on disk. The front only moves up, over entries already written, so
        // each turn either finishes from the cache or reads a further stretch from disk.
        let mut entries = Vec::new();
        let mut next = low;
        loop {
            let disk_high = {
                let core = self.0.core();
                match core.cache.front() {
                    Some(front) if front.index <= next => {
                        let start = (next - front.index) as usize;
                        let end = (high - front.index) as usize;
                        entries.extend(core.cache.range(start..end).cloned());
                        raft::util::limit_size(&mut entries, max_size);
                        return Ok(entries);
                    }
                    Some(front) => front.index.min(high),
                    None => high,
                }
            };
            let part = self
                .0
                .read_entries(next, disk_high, max_size)
                .map_err(other)?;
            let complete = part.len() as u64 == disk_high - next;
            entries.extend(part);
            next = disk_high;
            if !complete || next == high {
                raft::util::limit_size(&mut entries, max_size);
                return Ok(entries);
            }
        }
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let truncated = self.0.truncated().index;
        match self.0.term_of(index).map_err(other)? {
            Some(term) => Ok(term),
            None if index < truncated => Err(raft::Error::Store(RaftStorageError::Compacted)),
            None => Err(raft::Error::Store(RaftStorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.0.core().truncated.index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.0.core().last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let truncated = self.0.truncated().index;
        let mut slot = self.0.slot();
        if let Some((metadata, descriptor)) = &slot.latest
            && metadata.index >= request_index
            && metadata.index >= truncated
        {
            let mut snapshot = Snapshot::default();
            snapshot.set_metadata(metadata.clone());
            snapshot.data = descriptor.encode_to_vec().into();
            return Ok(snapshot);
        }
        slot.requested = true;
        Err(raft::Error::Store(
            RaftStorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

#[cfg(test)]
mod tests {
    use raft::Storage as _;

    use super::*;
    use crate::config::MemberConfig;

    fn config(dir: &Path) -> RaftConfig {
        RaftConfig {
            data_dir: dir.to_path_buf(),
            initial_members: vec![MemberConfig {
                id: 1,
                addr: "127.0.0.1:7100".to_string(),
            }],
            ..RaftConfig::default()
        }
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; 10].into(),
            ..Entry::default()
        }
    }

    fn append(log: &LogStore, range: std::ops::RangeInclusive<u64>, term: u64) {
        log.write(LogBatch {
            entries: range.map(|i| entry(i, term)).collect(),
            sync: true,
            ..LogBatch::default()
        })
        .unwrap();
    }

    #[test]
    fn entries_survive_reopen_and_conflicts_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(&config(dir.path()), INIT, ConfState::default()).unwrap();
        append(&log, 6..=20, 6);
        // A new leader overwrites 15.. with its own term.
        append(&log, 15..=17, 7);
        drop(log);
        let log = LogStore::open(&config(dir.path()), INIT, ConfState::default()).unwrap();
        let storage = RaftStorage(std::sync::Arc::new(log));
        assert_eq!(storage.last_index().unwrap(), 17);
        assert_eq!(storage.term(14).unwrap(), 6);
        assert_eq!(storage.term(15).unwrap(), 7);
        let entries = storage
            .entries(6, 18, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(entries.len(), 12);
        assert!(
            entries
                .iter()
                .enumerate()
                .all(|(i, e)| e.index == 6 + i as u64)
        );
    }

    /// A log holding entries 6..=100 of term 6, compacted to 60.
    fn compacted_log(dir: &Path) -> LogStore {
        let log = LogStore::open(&config(dir), INIT, ConfState::default()).unwrap();
        append(&log, 6..=100, 6);
        log.write(LogBatch {
            compact_to: Some(60),
            ..LogBatch::default()
        })
        .unwrap();
        log
    }

    #[test]
    fn compaction_moves_the_first_index_and_keeps_the_boundary_term() {
        let dir = tempfile::tempdir().unwrap();
        let log = compacted_log(dir.path());
        let storage = RaftStorage(std::sync::Arc::new(log));
        assert_eq!(storage.first_index().unwrap(), 61);
        assert_eq!(storage.term(60).unwrap(), 6);
        assert!(storage.term(59).is_err());
        assert!(
            storage
                .entries(50, 70, None, GetEntriesContext::empty(false))
                .is_err()
        );
    }

    #[test]
    fn a_log_behind_or_diverging_from_the_applied_state_is_reset_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(&config(dir.path()), INIT, ConfState::default()).unwrap();
        append(&log, 6..=20, 6);
        drop(log);

        // The state holds index 18 with the same term: the log is kept.
        let log = LogStore::open(
            &config(dir.path()),
            IndexTerm { index: 18, term: 6 },
            ConfState::default(),
        )
        .unwrap();
        assert_eq!(log.first_and_last(), (6, 20));
        drop(log);

        // A snapshot at 18 of term 9 went into the state, then the crash: the log is reset.
        let log = LogStore::open(
            &config(dir.path()),
            IndexTerm { index: 18, term: 9 },
            ConfState::default(),
        )
        .unwrap();
        assert_eq!(log.first_and_last(), (19, 18));
        assert_eq!(log.truncated(), IndexTerm { index: 18, term: 9 });
        drop(log);

        // A snapshot beyond the end of the log.
        let log = LogStore::open(
            &config(dir.path()),
            IndexTerm { index: 40, term: 9 },
            ConfState::default(),
        )
        .unwrap();
        assert_eq!(log.first_and_last(), (41, 40));
        let storage = RaftStorage(std::sync::Arc::new(log));
        assert!(storage.initial_state().unwrap().hard_state.commit >= 40);
    }

    #[test]
    fn a_state_behind_the_compaction_point_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = compacted_log(dir.path());
        drop(log);
        let error = LogStore::open(&config(dir.path()), INIT, ConfState::default()).unwrap_err();
        assert!(error.to_string().contains("compacted to 60"), "{error}");
    }

    fn staged(log: &LogStore, range: std::ops::RangeInclusive<u64>, term: u64) -> LogBatch {
        let mut batch = LogBatch {
            entries: range.map(|i| entry(i, term)).collect(),
            sync: true,
            ..LogBatch::default()
        };
        log.stage(&mut batch).unwrap();
        batch
    }

    fn no_cache(dir: &Path) -> RaftConfig {
        RaftConfig {
            entry_cache_size: ff_config::ByteSize(0),
            ..config(dir)
        }
    }

    #[test]
    fn a_read_spanning_disk_and_the_unwritten_tail_returns_both() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(&no_cache(dir.path()), INIT, ConfState::default()).unwrap();
        append(&log, 6..=20, 6); // on disk, evicted from the cache
        let _queued = staged(&log, 21..=30, 6); // staged for the writer, not on disk yet
        let storage = RaftStorage(std::sync::Arc::new(log));
        let entries = storage
            .entries(16, 31, Some(1 << 20), GetEntriesContext::empty(false))
            .unwrap();
        let indexes: Vec<u64> = entries.iter().map(|e| e.index).collect();
        assert_eq!(indexes, (16..=30).collect::<Vec<_>>());
    }

    #[test]
    fn entries_replaced_by_a_later_batch_stay_cached_until_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(&no_cache(dir.path()), INIT, ConfState::default()).unwrap();
        append(&log, 6..=100, 6);
        let first = staged(&log, 101..=110, 6);
        let replacing = staged(&log, 105..=108, 7); // a new leader overwrites 105..
        log.persist(std::slice::from_ref(&first)).unwrap(); // the writer took only the first
        let storage = RaftStorage(std::sync::Arc::new(log));
        assert_eq!(storage.term(106).unwrap(), 7);
        assert_eq!(storage.last_index().unwrap(), 108);
        storage.0.persist(std::slice::from_ref(&replacing)).unwrap();
        assert_eq!(storage.term(106).unwrap(), 7);
        drop(storage);
        let log = LogStore::open(&config(dir.path()), INIT, ConfState::default()).unwrap();
        assert_eq!(log.first_and_last(), (6, 108));
        assert_eq!(log.term_of(106).unwrap(), Some(7));
    }

    #[test]
    fn a_lost_log_next_to_an_advanced_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let error = LogStore::open(
            &config(dir.path()),
            IndexTerm { index: 50, term: 6 },
            ConfState::default(),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("applied up to index 50"),
            "{error}"
        );
    }
}
