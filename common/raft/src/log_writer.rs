//! The log writer: one thread per node that makes staged log batches durable, so that the raft
//! loop keeps stepping messages and accepting proposals while an fsync is in flight.
//!
//! The loop stages a batch in `LogStore` (raft-rs reads it from there at once), calls
//! `advance_append_async`, and queues the batch here. The writer merges whatever is queued into
//! one transaction — one fsync for several `Ready`s — and reports the highest `Ready` number it
//! covered, for which the loop calls `on_persist_ready` and releases the messages that had to
//! wait for persistence.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::error::RaftError;
use crate::log_store::{LogBatch, LogOutcome, LogStore};

/// Capacity of the queue into the writer (batches).
pub(crate) const LOG_QUEUE_CAPACITY: usize = 256;

/// Most batches merged into one transaction.
const MAX_MERGED_BATCHES: usize = 256;

/// Work for the log writer.
pub(crate) enum LogTask {
    /// Persist a staged batch; `ready` is the number of the `Ready` it came from, if any.
    Write { batch: LogBatch, ready: Option<u64> },
    /// Answered once every batch queued before it is durable and reported.
    Barrier(oneshot::Sender<()>),
}

/// What the writer reports after each transaction.
#[derive(Debug)]
pub(crate) struct Persisted {
    /// How many batches the transaction held.
    pub batches: usize,
    /// Highest `Ready` number among them.
    pub ready: Option<u64>,
    pub outcome: LogOutcome,
}

/// Starts the writer thread; it stops when `tasks` closes, after writing what is queued.
pub(crate) fn spawn(
    node: u64,
    log: Arc<LogStore>,
    mut tasks: mpsc::Receiver<LogTask>,
    results: mpsc::Sender<Result<Persisted, RaftError>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("raft-log-{node}"))
        .spawn(move || {
            let mut next = tasks.blocking_recv();
            while let Some(task) = next.take() {
                let mut batches = Vec::new();
                let mut ready = None;
                let mut barrier = None;
                let mut task = Some(task);
                while let Some(current) = task.take() {
                    match current {
                        LogTask::Write {
                            batch,
                            ready: number,
                        } => {
                            batches.push(batch);
                            ready = number.or(ready);
                        }
                        LogTask::Barrier(done) => {
                            barrier = Some(done);
                            break;
                        }
                    }
                    if batches.len() < MAX_MERGED_BATCHES {
                        task = tasks.try_recv().ok();
                    }
                }
                if !batches.is_empty() {
                    // Tests slow the disk down here.
                    fail::fail_point!("log_writer::before_persist");
                    let result = log
                        .persist(&batches)
                        .map_err(RaftError::from)
                        .map(|outcome| Persisted {
                            batches: batches.len(),
                            ready,
                            outcome,
                        });
                    let failed = result.is_err();
                    if results.blocking_send(result).is_err() || failed {
                        return;
                    }
                }
                if let Some(done) = barrier {
                    let _ = done.send(());
                }
                next = tasks.blocking_recv();
            }
        })
}
