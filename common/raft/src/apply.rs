//! The apply worker: one thread per node that applies committed entries to `state.redb`, so
//! that applying overlaps with persisting and replicating the next entries.
//!
//! The raft loop hands over committed entries in log order through a bounded queue and gets
//! results back through another; the worker merges whatever is queued into one transaction.
//! Installing a snapshot goes through the same queue, so it lands after every entry handed over
//! before it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use raft::prelude::{Entry, Snapshot};
use tokio::sync::{mpsc, oneshot};

use crate::db::IndexTerm;
use crate::error::RaftError;
use crate::state_store::{AppliedEntry, ConfOutcome, RecoveredState, StateStore};

/// Capacity of the queue into the worker (batches, not entries).
pub(crate) const APPLY_QUEUE_CAPACITY: usize = 64;

/// Most entries merged into one apply transaction, so that early entries are answered soon.
const MAX_BATCH_ENTRIES: usize = 4096;

/// Work for the apply worker.
pub(crate) enum ApplyTask {
    /// Apply these committed entries.
    Entries {
        entries: Vec<Entry>,
        conf_changes: BTreeMap<u64, ConfOutcome>,
    },
    /// Replace the state with a snapshot; answered when durable.
    Restore {
        snapshot: Snapshot,
        done: oneshot::Sender<Result<RecoveredState, RaftError>>,
    },
}

/// What the worker reports after each transaction.
#[derive(Debug)]
pub(crate) struct Applied {
    pub entries: Vec<AppliedEntry>,
    /// Position after the transaction.
    pub applied: IndexTerm,
    /// Highest index whose application is durable.
    pub durable: u64,
    pub members: Option<BTreeMap<u64, String>>,
    /// Time the transaction took.
    pub elapsed: std::time::Duration,
}

/// Starts the worker thread. It stops when `tasks` closes, after a final durable commit. An
/// apply commit is made durable at least once per `durable_every` entries, which bounds how far
/// the durable state trails and so how far the log can be compacted.
pub(crate) fn spawn(
    node: u64,
    durable_every: u64,
    state: Arc<StateStore>,
    snapshot_dir: PathBuf,
    mut applied: IndexTerm,
    mut tasks: mpsc::Receiver<ApplyTask>,
    results: mpsc::Sender<Result<Applied, RaftError>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("raft-apply-{node}"))
        .spawn(move || {
            let mut durable = applied.index;
            let restore = |snapshot: Snapshot,
                           done: oneshot::Sender<Result<RecoveredState, RaftError>>,
                           applied: &mut IndexTerm,
                           durable: &mut u64| {
                let result = state.restore(&snapshot, &snapshot_dir);
                if let Ok(recovered) = &result {
                    *applied = recovered.applied;
                    *durable = applied.index;
                }
                let _ = done.send(result);
            };
            while let Some(task) = tasks.blocking_recv() {
                let (entries, conf_changes) = match task {
                    ApplyTask::Restore { snapshot, done } => {
                        restore(snapshot, done, &mut applied, &mut durable);
                        continue;
                    }
                    ApplyTask::Entries {
                        entries,
                        conf_changes,
                    } => (entries, conf_changes),
                };
                // Merge what else is waiting into the same transaction, up to the next restore.
                let mut entries = entries;
                let mut conf_changes = conf_changes;
                let mut deferred = None;
                while let Ok(next) = tasks.try_recv() {
                    match next {
                        ApplyTask::Entries {
                            entries: mut more,
                            conf_changes: mut more_conf,
                        } => {
                            entries.append(&mut more);
                            conf_changes.append(&mut more_conf);
                        }
                        restore @ ApplyTask::Restore { .. } => {
                            deferred = Some(restore);
                            break;
                        }
                    }
                    if entries.len() >= MAX_BATCH_ENTRIES {
                        break;
                    }
                }
                let started = std::time::Instant::now();
                let result = state
                    .apply(&entries, &conf_changes, &mut applied, false)
                    .map(|outcome| Applied {
                        entries: outcome.entries,
                        applied,
                        durable,
                        members: outcome.members,
                        elapsed: started.elapsed(),
                    });
                let failed = result.is_err();
                if results.blocking_send(result).is_err() || failed {
                    return;
                }
                // The durable commit that lets the log be compacted runs after the answers went
                // out, so no waiter pays for flushing the pages of a thousand earlier entries.
                if applied.index.saturating_sub(durable) >= durable_every {
                    let flushed = state.flush(applied).map(|()| {
                        durable = applied.index;
                        Applied {
                            entries: Vec::new(),
                            applied,
                            durable,
                            members: None,
                            elapsed: std::time::Duration::ZERO,
                        }
                    });
                    let failed = flushed.is_err();
                    if results.blocking_send(flushed).is_err() || failed {
                        return;
                    }
                }
                if let Some(ApplyTask::Restore { snapshot, done }) = deferred {
                    restore(snapshot, done, &mut applied, &mut durable);
                }
            }
            // Make the last applied state durable so that a restart replays nothing.
            if durable < applied.index {
                let _ = state.flush(applied);
            }
        })
}
