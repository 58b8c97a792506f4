//! Group commit of a target's chunk metadata.
//!
//! One thread per target owns every write transaction on `meta.redb`. Callers send changes and
//! wait; the thread takes all changes queued while the previous commit ran (up to
//! [`MAX_BATCH`]), makes the data files they point into durable (`fdatasync`, once per file),
//! then applies them in one transaction and commits it durably. A burst of concurrent chunk
//! writes thus pays for one data sync and one metadata commit instead of one each — and the
//! blocking syscalls stay off the async runtime's threads.
//!
//! Changes to one chunk never share a batch in a conflicting order: callers hold the chunk's
//! lock until their change is committed.

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use prost::Message as _;
use redb::Database;
use tokio::sync::{mpsc, oneshot};

use super::{CAPACITY, CHUNKS, ChunkId, ChunkMeta, EngineError, FREE, io_err, meta_err};

/// Most changes committed in one transaction.
const MAX_BATCH: usize = 256;
/// Changes waiting for the writer thread; senders wait beyond this.
const QUEUE: usize = 1024;

/// One durable change to a target's metadata.
#[derive(Debug)]
pub(super) enum MetaChange {
    /// Set a chunk's metadata; `claimed` slots leave the free set, `freed` ones join it.
    Put {
        id: ChunkId,
        meta: ChunkMeta,
        claimed: Option<(u32, u64)>,
        freed: Vec<(u32, u64)>,
    },
    /// Forget a chunk; its slots join the free set.
    Remove { id: ChunkId, freed: Vec<(u32, u64)> },
    /// A class file grew to `capacity` slots; `new_slots` are free.
    Grow {
        class: u32,
        capacity: u64,
        new_slots: Range<u64>,
    },
}

struct Job {
    change: MetaChange,
    /// A data file that must be durable before the change is.
    sync: Option<Arc<File>>,
    reply: oneshot::Sender<Result<(), EngineError>>,
}

/// The sending side; dropping it stops and joins the thread (so the database is closed when
/// the engine is).
pub(super) struct MetaWriter {
    sender: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetaWriter {
    /// Starts the writer thread of the target called `name`.
    pub(super) fn start(db: Arc<Database>, name: &str) -> std::io::Result<MetaWriter> {
        let (sender, receiver) = mpsc::channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name(format!("meta-{name}"))
            .spawn(move || run(&db, receiver))?;
        Ok(MetaWriter {
            sender: Some(sender),
            thread: Some(thread),
        })
    }

    /// Commits `change` durably, after `sync` (if any) is durable.
    pub(super) async fn commit(
        &self,
        change: MetaChange,
        sync: Option<Arc<File>>,
    ) -> Result<(), EngineError> {
        let stopped = || EngineError::Meta("the metadata writer has stopped".to_string());
        let sender = self.sender.as_ref().ok_or_else(stopped)?;
        let (reply, result) = oneshot::channel();
        sender
            .send(Job {
                change,
                sync,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        result.await.map_err(|_| stopped())?
    }
}

impl Drop for MetaWriter {
    fn drop(&mut self) {
        self.sender = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(db: &Database, mut receiver: mpsc::Receiver<Job>) {
    while let Some(first) = receiver.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let result = commit_batch(db, &jobs);
        for job in jobs {
            let _ = job.reply.send(match &result {
                Ok(()) => Ok(()),
                Err(error) => Err(duplicate(error)),
            });
        }
    }
}

fn commit_batch(db: &Database, jobs: &[Job]) -> Result<(), EngineError> {
    let mut synced: Vec<*const File> = Vec::new();
    for file in jobs.iter().filter_map(|j| j.sync.as_ref()) {
        if !synced.contains(&Arc::as_ptr(file)) {
            file.sync_data().map_err(io_err("sync chunk data"))?;
            synced.push(Arc::as_ptr(file));
        }
    }
    let txn = db.begin_write().map_err(meta_err("begin"))?;
    {
        let mut chunks = txn.open_table(CHUNKS).map_err(meta_err("open chunks"))?;
        let mut free = txn.open_table(FREE).map_err(meta_err("open free slots"))?;
        let mut capacity = txn
            .open_table(CAPACITY)
            .map_err(meta_err("open class capacity"))?;
        for job in jobs {
            match &job.change {
                MetaChange::Put {
                    id,
                    meta,
                    claimed,
                    freed,
                } => {
                    chunks
                        .insert(id.key().as_slice(), meta.encode_to_vec().as_slice())
                        .map_err(meta_err("write chunk"))?;
                    if let Some(claimed) = claimed {
                        free.remove(*claimed).map_err(meta_err("claim slot"))?;
                    }
                    for slot in freed {
                        free.insert(*slot, ()).map_err(meta_err("free slot"))?;
                    }
                }
                MetaChange::Remove { id, freed } => {
                    chunks
                        .remove(id.key().as_slice())
                        .map_err(meta_err("remove chunk"))?;
                    for slot in freed {
                        free.insert(*slot, ()).map_err(meta_err("free slot"))?;
                    }
                }
                MetaChange::Grow {
                    class,
                    capacity: slots,
                    new_slots,
                } => {
                    capacity
                        .insert(*class, *slots)
                        .map_err(meta_err("write class capacity"))?;
                    for slot in new_slots.clone() {
                        free.insert((*class, slot), ())
                            .map_err(meta_err("free slot"))?;
                    }
                }
            }
        }
    }
    txn.commit().map_err(meta_err("commit"))
}

/// The batch's error, for each of its callers.
fn duplicate(error: &EngineError) -> EngineError {
    match error {
        EngineError::NoSpace(message) => EngineError::NoSpace(message.clone()),
        EngineError::Io { context, cause } => EngineError::Io {
            context: context.clone(),
            cause: std::io::Error::new(cause.kind(), cause.to_string()),
        },
        other => EngineError::Meta(other.to_string()),
    }
}
