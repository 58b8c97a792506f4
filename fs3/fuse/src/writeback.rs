//! Write-behind for one file in this mount: a write is answered once it is queued, and runs
//! in the background with at most the mount's write budget in flight. Writes to overlapping
//! ranges run in the order they arrived; reads, truncates, fsync, flush and close wait for
//! what is pending; a failed write is reported by the next write, flush, fsync or close of
//! the file, as local file systems report write-back errors.

use std::sync::{Arc, Mutex};

use fs3_client::FsError;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};

/// A queued or running write of `[start, end)`.
struct Pending {
    start: u64,
    end: u64,
    done: Shared<BoxFuture<'static, ()>>,
}

/// The writes of one file in flight from this mount.
#[derive(Default)]
pub struct InodeWrites {
    pending: Mutex<Vec<Pending>>,
    error: Mutex<Option<FsError>>,
}

impl std::fmt::Debug for InodeWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InodeWrites").finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain lists; a panic elsewhere cannot leave them half-changed.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl InodeWrites {
    /// The first failure of a background write since the last call, if any.
    pub fn take_error(&self) -> Option<FsError> {
        lock(&self.error).take()
    }

    /// Records a background write's failure.
    pub fn fail(&self, error: FsError) {
        lock(&self.error).get_or_insert(error);
    }

    fn waiting_for(&self, range: Option<(u64, u64)>) -> Vec<Shared<BoxFuture<'static, ()>>> {
        let mut pending = lock(&self.pending);
        pending.retain(|p| p.done.peek().is_none());
        pending
            .iter()
            .filter(|p| range.is_none_or(|(start, end)| p.start < end && start < p.end))
            .map(|p| p.done.clone())
            .collect()
    }

    /// Waits for the pending writes that overlap `[start, end)`.
    pub async fn overlapping(&self, start: u64, end: u64) {
        for done in self.waiting_for(Some((start, end))) {
            done.await;
        }
    }

    /// Waits for every pending write.
    pub async fn all(&self) {
        for done in self.waiting_for(None) {
            done.await;
        }
    }

    /// Runs `write` of `[start, end)` in the background; a failure is kept for
    /// [`InodeWrites::take_error`].
    pub fn start(
        self: &Arc<Self>,
        start: u64,
        end: u64,
        write: impl std::future::Future<Output = Result<(), FsError>> + Send + 'static,
    ) {
        let writes = self.clone();
        let task = tokio::spawn(async move {
            if let Err(error) = write.await {
                tracing::warn!(%error, "background write failed");
                writes.fail(error);
            }
        });
        let done = task.map(|_| ()).boxed().shared();
        lock(&self.pending).push(Pending { start, end, done });
    }
}
