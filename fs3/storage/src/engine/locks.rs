//! Per-key locks (per chunk, or per target and chunk): holders of one key take turns; different
//! keys proceed in parallel. Entries exist only while a key is locked or waited for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

use std::hash::Hash;

#[derive(Debug)]
pub struct KeyLocks<K> {
    map: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K> Default for KeyLocks<K> {
    fn default() -> Self {
        KeyLocks {
            map: Mutex::new(HashMap::new()),
        }
    }
}

/// Holds one key's lock; releases it (and forgets the entry if nobody waits) when dropped.
pub struct KeyGuard<'a, K: Hash + Eq + Copy> {
    locks: &'a KeyLocks<K>,
    id: K,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Hash + Eq + Copy> KeyLocks<K> {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<K, Arc<tokio::sync::Mutex<()>>>> {
        // Inserts and removals only; a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for and takes the lock of `id`.
    pub async fn lock(&self, id: K) -> KeyGuard<'_, K> {
        let mutex = self.map().entry(id).or_default().clone();
        let guard = mutex.lock_owned().await;
        KeyGuard {
            locks: self,
            id,
            guard: Some(guard),
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }
}

impl<K: Hash + Eq + Copy> Drop for KeyGuard<'_, K> {
    fn drop(&mut self) {
        let mut map = self.locks.map();
        // Clones are only taken under the map lock, so this count cannot grow meanwhile:
        // two references (the map's and this guard's) mean nobody else waits.
        if map.get(&self.id).is_some_and(|m| Arc::strong_count(m) == 2) {
            map.remove(&self.id);
        }
        self.guard.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ChunkId;

    #[tokio::test]
    async fn a_chunk_is_locked_by_one_writer_at_a_time_and_forgotten_after() {
        let locks = KeyLocks::<ChunkId>::default();
        let a = ChunkId { inode: 1, index: 0 };
        let b = ChunkId { inode: 1, index: 1 };
        let guard = locks.lock(a).await;
        let _other = locks.lock(b).await; // a different chunk is not blocked
        let second =
            tokio::time::timeout(std::time::Duration::from_millis(50), locks.lock(a)).await;
        assert!(second.is_err(), "a second writer must wait");
        drop(guard);
        drop(_other);
        assert_eq!(locks.len(), 0);
        let _again = locks.lock(a).await;
        assert_eq!(locks.len(), 1);
    }
}
