//! Write-behind for one file in this mount: a write is answered once it is queued, and runs
//! in the background with at most the mount's write budget in flight. Writes to overlapping
//! ranges run in the order they arrived; reads, truncates, fsync, flush and close wait for
//! what is pending. A failed write is reported, once, to every handle of the file open when it
//! failed — by that handle's next write, flush, fsync or close — as Linux reports write-back
//! errors (`errseq_t`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fs3_client::FsError;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};

/// A queued or running write of `[start, end)`.
struct Pending {
    start: u64,
    end: u64,
    finished: Arc<AtomicBool>,
    done: Shared<BoxFuture<'static, ()>>,
}

/// The writes of one file in flight from this mount.
#[derive(Default)]
pub struct InodeWrites {
    pending: Mutex<Vec<Pending>>,
    /// Failures so far, and the latest one.
    errors: Mutex<(u64, Option<FsError>)>,
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
    /// How many writes have failed so far: a handle opened now starts from here.
    pub fn error_generation(&self) -> u64 {
        lock(&self.errors).0
    }

    /// The latest failure if one happened since the handle whose mark is `seen` last looked.
    pub fn error_since(&self, seen: &AtomicU64) -> Option<FsError> {
        let errors = lock(&self.errors);
        let (generation, error) = (errors.0, errors.1.clone());
        drop(errors);
        if seen.fetch_max(generation, Ordering::AcqRel) < generation {
            error
        } else {
            None
        }
    }

    fn fail(&self, error: FsError) {
        let mut errors = lock(&self.errors);
        errors.0 += 1;
        errors.1 = Some(error);
    }

    fn waiting_for(&self, range: Option<(u64, u64)>) -> Vec<Shared<BoxFuture<'static, ()>>> {
        let mut pending = lock(&self.pending);
        pending.retain(|p| !p.finished.load(Ordering::Acquire));
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

    /// Runs `write` of `[start, end)` in the background; a failure is kept for the file's
    /// handles ([`InodeWrites::error_since`]).
    pub fn start(
        self: &Arc<Self>,
        start: u64,
        end: u64,
        write: impl std::future::Future<Output = Result<(), FsError>> + Send + 'static,
    ) {
        let writes = self.clone();
        let finished = Arc::new(AtomicBool::new(false));
        let mark = finished.clone();
        let task = tokio::spawn(async move {
            if let Err(error) = write.await {
                tracing::warn!(%error, "background write failed");
                writes.fail(error);
            }
            mark.store(true, Ordering::Release);
        });
        let done = task.map(|_| ()).boxed().shared();
        let mut pending = lock(&self.pending);
        // Finished writes leave the list as new ones come, so it stays as long as what is in
        // flight (bounded by the write budget).
        pending.retain(|p| !p.finished.load(Ordering::Acquire));
        pending.push(Pending {
            start,
            end,
            finished,
            done,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_reach_every_handle_once_and_finished_writes_leave() {
        let writes = Arc::new(InodeWrites::default());
        let first = AtomicU64::new(writes.error_generation());
        let second = AtomicU64::new(writes.error_generation());
        for i in 0..100 {
            writes.start(i, i + 1, async { Ok(()) });
        }
        writes.all().await;
        writes.start(5, 6, async { Err(FsError::new(libc::EIO, "disk on fire")) });
        writes.overlapping(0, 10).await;
        assert!(
            lock(&writes.pending).len() <= 1,
            "finished writes are dropped"
        );
        assert_eq!(writes.error_since(&first).map(|e| e.errno), Some(libc::EIO));
        assert!(
            writes.error_since(&first).is_none(),
            "reported once per handle"
        );
        assert!(writes.error_since(&second).is_some(), "and to every handle");
        let late = AtomicU64::new(writes.error_generation());
        assert!(
            writes.error_since(&late).is_none(),
            "not to handles opened after it"
        );
    }
}
