//! The replicated state in `state.redb`: the state machine's tables and, in the same
//! transactions, ff-raft's own applied state — applied position, configuration, member
//! addresses and the records that make retried requests apply once.
//!
//! Applying never waits for fsync (`Durability::None`) except every `DURABLE_EVERY` entries and
//! when a snapshot is installed: after a crash the state rolls back to its last durable commit
//! and the log, which is always durable and never compacted past that commit, replays the rest.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message as _;
use raft::prelude::{ConfState, Entry, EntryType, Snapshot};
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};

use crate::config::RaftConfig;
use crate::db::{
    INIT, IndexTerm, META, check_identity, db_err, decode_pb, encode_pb, get_meta, open_database,
    require_meta,
};
use crate::error::{RaftError, StorageError};
use crate::proto::{
    ApplyOutcome, DedupRecord, Member, Proposal, RequestId, SnapshotDescriptor, SnapshotMeta,
    apply_outcome,
};
use crate::snapshot;
use crate::state_machine::{ApplyContext, ErasedStateMachine};

const MEMBERS: TableDefinition<'static, u64, &'static str> = TableDefinition::new("raft_members");
/// (client, seq) -> (index applied at, encoded `ApplyOutcome`).
const REQUESTS: TableDefinition<'static, (u64, u64), (u64, &'static [u8])> =
    TableDefinition::new("raft_requests");
/// index -> (client, seq), to expire `REQUESTS` in index order.
const REQUESTS_BY_INDEX: TableDefinition<'static, u64, (u64, u64)> =
    TableDefinition::new("raft_requests_by_index");

const KEY_APPLIED: &str = "applied";
const KEY_CONF_STATE: &str = "conf_state";
/// The deduplication window is replicated state: set when the group is founded, carried by
/// snapshots, so every replica decides alike.
const KEY_DEDUP_WINDOW: &str = "dedup_window";

/// Most settled request records of one client forgotten per applied entry.
const MAX_SETTLED_PER_ENTRY: usize = 1024;

/// Most expired deduplication records removed per write, to keep every write short.
const MAX_EXPIRED_PER_WRITE: usize = 4096;

/// How a committed membership change turned out, worked out by raft-rs before the apply.
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

/// What applying one entry produced.
#[derive(Debug)]
pub(crate) enum AppliedResult {
    /// An empty entry (a new leader's first).
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

/// What one apply transaction did.
#[derive(Debug, Default)]
pub(crate) struct ApplyOutcomeBatch {
    pub entries: Vec<AppliedEntry>,
    /// Member addresses after the batch, when they changed.
    pub members: Option<BTreeMap<u64, String>>,
}

/// What a node finds in `state.redb` at start.
#[derive(Debug)]
pub(crate) struct RecoveredState {
    pub applied: IndexTerm,
    pub conf_state: ConfState,
    pub members: BTreeMap<u64, String>,
}

/// The replicated state of one node.
pub(crate) struct StateStore {
    db: Arc<Database>,
    sm: Arc<dyn ErasedStateMachine>,
    /// The group's deduplication window (see `KEY_DEDUP_WINDOW`); only the apply thread
    /// changes it, when it installs a snapshot.
    dedup_window: AtomicU64,
}

impl StateStore {
    /// Opens (or creates and initialises) `state.redb` and the state machine's tables.
    pub(crate) fn open(
        config: &RaftConfig,
        sm: Arc<dyn ErasedStateMachine>,
    ) -> Result<(StateStore, RecoveredState), RaftError> {
        let path = config.data_dir.join("state.redb");
        let db = open_database(&path, config.verify_on_open)?;
        let txn = db.begin_write().map_err(db_err("begin state open"))?;
        {
            let mut meta = txn.open_table(META).map_err(db_err("open raft_meta"))?;
            let mut members = txn
                .open_table(MEMBERS)
                .map_err(db_err("open raft_members"))?;
            txn.open_table(REQUESTS)
                .map_err(db_err("open raft_requests"))?;
            txn.open_table(REQUESTS_BY_INDEX)
                .map_err(db_err("open raft_requests_by_index"))?;
            check_identity(&mut meta, config, &config.data_dir)?;
            if get_meta(&meta, KEY_APPLIED)?.is_none() {
                // Founding members start from the founding configuration at INIT; any other
                // node starts empty and waits for a snapshot.
                let founding = config
                    .initial_members
                    .iter()
                    .any(|m| m.id == config.node_id);
                let mut conf_state = ConfState::default();
                let mut applied = IndexTerm::default();
                if founding {
                    conf_state.set_voters(config.initial_members.iter().map(|m| m.id).collect());
                    applied = INIT;
                    for member in &config.initial_members {
                        members
                            .insert(member.id, member.addr.as_str())
                            .map_err(db_err("record founding member"))?;
                    }
                }
                meta.insert(
                    KEY_CONF_STATE,
                    encode_pb(&conf_state, "conf state")?.as_slice(),
                )
                .map_err(db_err("write conf state"))?;
                meta.insert(KEY_APPLIED, applied.encode().as_slice())
                    .map_err(db_err("write applied index"))?;
                meta.insert(
                    KEY_DEDUP_WINDOW,
                    config.dedup_window.to_le_bytes().as_slice(),
                )
                .map_err(db_err("write dedup window"))?;
            }
        }
        sm.init(&txn)?;
        txn.commit().map_err(db_err("commit state open"))?;

        let read = db.begin_read().map_err(db_err("begin read"))?;
        let meta = read.open_table(META).map_err(db_err("open raft_meta"))?;
        let dedup_window = decode_u64(&require_meta(&meta, KEY_DEDUP_WINDOW)?, "dedup window")?;
        let recovered = RecoveredState {
            applied: IndexTerm::decode(&require_meta(&meta, KEY_APPLIED)?, "applied index")?,
            conf_state: decode_pb(&require_meta(&meta, KEY_CONF_STATE)?, "conf state")?,
            members: read_members(
                &read
                    .open_table(MEMBERS)
                    .map_err(db_err("open raft_members"))?,
            )?,
        };
        drop(meta);
        drop(read);
        let store = StateStore {
            db: Arc::new(db),
            sm,
            dedup_window: AtomicU64::new(dedup_window),
        };
        Ok((store, recovered))
    }

    pub(crate) fn db(&self) -> &Arc<Database> {
        &self.db
    }

    pub(crate) fn machine(&self) -> &Arc<dyn ErasedStateMachine> {
        &self.sm
    }

    /// Makes everything applied so far durable.
    pub(crate) fn flush(&self, applied: IndexTerm) -> Result<(), RaftError> {
        let txn = self.db.begin_write().map_err(db_err("begin flush"))?;
        {
            let mut meta = txn.open_table(META).map_err(db_err("open raft_meta"))?;
            meta.insert(KEY_APPLIED, applied.encode().as_slice())
                .map_err(db_err("write applied index"))?;
        }
        txn.commit().map_err(db_err("commit flush"))?;
        Ok(())
    }

    /// Applies committed entries after `applied` in one transaction; returns their results.
    pub(crate) fn apply(
        &self,
        entries: &[Entry],
        conf_changes: &BTreeMap<u64, ConfOutcome>,
        applied: &mut IndexTerm,
        durable: bool,
    ) -> Result<ApplyOutcomeBatch, RaftError> {
        let mut outcome = ApplyOutcomeBatch::default();
        let mut txn = self.db.begin_write().map_err(db_err("begin apply"))?;
        let durability = if durable {
            Durability::Immediate
        } else {
            Durability::None
        };
        txn.set_durability(durability)
            .map_err(|e| StorageError::Corrupt(format!("cannot set durability: {e}")))?;
        let mut members_changed = false;
        let mut conf_state = None;
        {
            let mut requests = txn
                .open_table(REQUESTS)
                .map_err(db_err("open raft_requests"))?;
            let mut by_index = txn
                .open_table(REQUESTS_BY_INDEX)
                .map_err(db_err("open raft_requests_by_index"))?;
            let mut members = txn
                .open_table(MEMBERS)
                .map_err(db_err("open raft_members"))?;
            for entry in entries {
                if entry.index <= applied.index {
                    // Already applied before a restart; raft-rs may hand it over again.
                    continue;
                }
                let result = match entry.get_entry_type() {
                    EntryType::EntryNormal if entry.data.is_empty() => AppliedResult::Noop,
                    EntryType::EntryNormal => AppliedResult::Proposal(self.apply_proposal(
                        &txn,
                        &mut requests,
                        &mut by_index,
                        entry,
                    )?),
                    EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                        match conf_changes.get(&entry.index) {
                            Some(ConfOutcome::Applied {
                                conf_state: new,
                                member,
                            }) => {
                                conf_state = Some(new.clone());
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
                *applied = IndexTerm {
                    index: entry.index,
                    term: entry.term,
                };
                outcome.entries.push(AppliedEntry {
                    index: entry.index,
                    term: entry.term,
                    result,
                });
            }
            let window = self.dedup_window.load(Ordering::Relaxed);
            expire_requests(&mut requests, &mut by_index, applied.index, window)?;
            if members_changed {
                outcome.members = Some(read_members(&members)?);
            }
        }
        {
            let mut meta = txn.open_table(META).map_err(db_err("open raft_meta"))?;
            meta.insert(KEY_APPLIED, applied.encode().as_slice())
                .map_err(db_err("write applied index"))?;
            if let Some(conf_state) = &conf_state {
                meta.insert(
                    KEY_CONF_STATE,
                    encode_pb(conf_state, "conf state")?.as_slice(),
                )
                .map_err(db_err("write conf state"))?;
            }
        }
        txn.commit().map_err(db_err("commit apply"))?;
        Ok(outcome)
    }

    /// Applies one normal entry, answering a retried request from its record instead of
    /// applying it again.
    fn apply_proposal(
        &self,
        txn: &WriteTransaction,
        requests: &mut redb::Table<'_, (u64, u64), (u64, &[u8])>,
        by_index: &mut redb::Table<'_, u64, (u64, u64)>,
        entry: &Entry,
    ) -> Result<Result<Vec<u8>, String>, RaftError> {
        let proposal = match Proposal::decode(entry.data.as_ref()) {
            Ok(proposal) => proposal,
            Err(error) => return Ok(Err(format!("log entry is not a proposal: {error}"))),
        };
        let request = proposal.id.filter(|id| id.client != 0);
        if let Some(request) = request {
            forget_settled(requests, by_index, request)?;
        }
        let id = request.map(|id| (id.client, id.seq));
        let window = self.dedup_window.load(Ordering::Relaxed);
        if let Some(key) = id
            && let Some(record) = requests.get(key).map_err(db_err("read request record"))?
        {
            let (index, bytes) = record.value();
            // The window is measured from this entry, so every replica decides alike
            // however its writes were batched.
            if index.saturating_add(window) >= entry.index {
                let outcome = ApplyOutcome::decode(bytes).map_err(|e| {
                    StorageError::Corrupt(format!("request record does not decode: {e}"))
                })?;
                return Ok(outcome_result(outcome));
            }
        }
        let ctx = ApplyContext {
            index: entry.index,
            term: entry.term,
        };
        let result = self.sm.apply_bytes(txn, ctx, &proposal.command)?;
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

    /// Replaces the whole state with the snapshot `snap` describes (durably); returns the new
    /// applied position, configuration and members.
    pub(crate) fn restore(&self, snap: &Snapshot, dir: &Path) -> Result<RecoveredState, RaftError> {
        let metadata = snap.get_metadata();
        let descriptor = SnapshotDescriptor::decode(snap.get_data()).map_err(|e| {
            StorageError::Corrupt(format!("snapshot descriptor does not decode: {e}"))
        })?;
        let file = dir.join(&descriptor.file);
        let txn = self.db.begin_write().map_err(db_err("begin restore"))?;
        let meta = snapshot::restore(&txn, &file, metadata, self.sm.as_ref())?;
        let applied = IndexTerm {
            index: meta.index,
            term: meta.term,
        };
        let conf_state: ConfState = decode_pb(&meta.conf_state, "snapshot conf state")?;
        {
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
            let mut meta_table = txn.open_table(META).map_err(db_err("open raft_meta"))?;
            meta_table
                .insert(KEY_APPLIED, applied.encode().as_slice())
                .map_err(db_err("write applied index"))?;
            meta_table
                .insert(
                    KEY_CONF_STATE,
                    encode_pb(&conf_state, "conf state")?.as_slice(),
                )
                .map_err(db_err("write conf state"))?;
        }
        txn.commit().map_err(db_err("commit restore"))?;
        // The file has served its purpose.
        let _ = std::fs::remove_file(&file);
        Ok(RecoveredState {
            applied,
            conf_state,
            members: meta.members.into_iter().map(|m| (m.id, m.addr)).collect(),
        })
    }
}

/// ff-raft's part of a snapshot, read in the snapshot's read transaction.
pub(crate) fn snapshot_meta(
    txn: &ReadTransaction,
    cluster: &str,
) -> Result<SnapshotMeta, StorageError> {
    let meta = txn.open_table(META).map_err(db_err("open raft_meta"))?;
    let applied = IndexTerm::decode(&require_meta(&meta, KEY_APPLIED)?, "applied index")?;
    let conf_state = require_meta(&meta, KEY_CONF_STATE)?;
    let dedup_window = decode_u64(&require_meta(&meta, KEY_DEDUP_WINDOW)?, "dedup window")?;
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
            id: Some(RequestId {
                client,
                seq,
                acked_below: 0,
            }),
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
        dedup_window,
    })
}

fn decode_u64(bytes: &[u8], what: &str) -> Result<u64, StorageError> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StorageError::Corrupt(format!("{what} has {} bytes, not 8", bytes.len())))?;
    Ok(u64::from_le_bytes(array))
}

/// Forgets the records of `request`'s client below its `acked_below`: the client will not
/// retry them. Deterministic, since the mark travels in the log entry.
fn forget_settled(
    requests: &mut redb::Table<'_, (u64, u64), (u64, &[u8])>,
    by_index: &mut redb::Table<'_, u64, (u64, u64)>,
    request: RequestId,
) -> Result<(), StorageError> {
    if request.acked_below == 0 {
        return Ok(());
    }
    let mut settled = Vec::new();
    let range = (request.client, 0)..(request.client, request.acked_below);
    for item in requests
        .range(range)
        .map_err(db_err("scan request records"))?
    {
        let (key, value) = item.map_err(db_err("read request record"))?;
        settled.push((key.value(), value.value().0));
        if settled.len() >= MAX_SETTLED_PER_ENTRY {
            break;
        }
    }
    for (key, index) in settled {
        requests
            .remove(key)
            .map_err(db_err("forget request record"))?;
        by_index
            .remove(index)
            .map_err(db_err("forget request index"))?;
    }
    Ok(())
}

/// The applied index as of a read transaction.
pub(crate) fn applied_in(txn: &ReadTransaction) -> Result<u64, StorageError> {
    let meta = txn.open_table(META).map_err(db_err("open raft_meta"))?;
    Ok(IndexTerm::decode(&require_meta(&meta, KEY_APPLIED)?, "applied index")?.index)
}

fn read_members(
    table: &impl ReadableTable<u64, &'static str>,
) -> Result<BTreeMap<u64, String>, StorageError> {
    let mut members = BTreeMap::new();
    for item in table.iter().map_err(db_err("read members"))? {
        let (id, addr) = item.map_err(db_err("read member"))?;
        members.insert(id.value(), addr.value().to_string());
    }
    Ok(members)
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
