//! A bounded pool of registered memory. Registering pins pages and talks to the device (tens of
//! microseconds to milliseconds), so buffers are registered once and reused. Sizes are powers of
//! two from 4 KiB; at most `limit` bytes are registered at a time: a taker then gets an idle
//! buffer of another size deregistered to make room, or waits until one comes back. A buffer
//! that is dropped instead of given back (a failed transfer) leaves the count when it is
//! deregistered, so the bound never leaks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::verbs::{ProtectionDomain, RdmaError, RegisteredMemory};

/// The smallest buffer the pool hands out.
const MIN_BUFFER: usize = 4096;

/// Bytes a pool has registered, and the signal that some came back or went away.
#[derive(Debug, Default)]
pub(super) struct Account {
    bytes: AtomicUsize,
    freed: Notify,
}

impl Account {
    /// A charged buffer of `len` bytes was deregistered.
    pub(super) fn release(&self, len: usize) {
        self.bytes.fetch_sub(len, Ordering::AcqRel);
        self.freed.notify_waiters();
    }
}

/// What a taker does next.
enum Next {
    /// Register a new buffer (its bytes are reserved).
    Register,
    /// Deregister an idle buffer of another size, then look again.
    Evict(RegisteredMemory),
    /// Wait for a buffer to come back or go away.
    Wait,
}

/// Registered buffers of one protection domain, bounded in total size.
pub struct RegisteredPool {
    pd: Arc<ProtectionDomain>,
    limit: usize,
    /// Idle buffers by size.
    idle: Mutex<BTreeMap<usize, Vec<RegisteredMemory>>>,
    account: Arc<Account>,
}

impl std::fmt::Debug for RegisteredPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredPool")
            .field("limit", &self.limit)
            .field("registered", &self.registered())
            .finish_non_exhaustive()
    }
}

/// The size of buffer that serves a request of `len` bytes.
fn class_of(len: usize) -> usize {
    len.max(MIN_BUFFER).next_power_of_two()
}

impl RegisteredPool {
    /// A pool registering at most `limit` bytes in `pd`.
    pub fn new(pd: &Arc<ProtectionDomain>, limit: usize) -> Arc<RegisteredPool> {
        Arc::new(RegisteredPool {
            pd: pd.clone(),
            limit,
            idle: Mutex::new(BTreeMap::new()),
            account: Arc::new(Account::default()),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, Vec<RegisteredMemory>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes registered now (idle and taken).
    pub fn registered(&self) -> usize {
        self.account.bytes.load(Ordering::Acquire)
    }

    /// A buffer of at least `len` bytes; waits while the pool is at its limit.
    pub async fn take(&self, len: usize) -> Result<RegisteredMemory, RdmaError> {
        let class = class_of(len);
        if class > self.limit {
            return Err(RdmaError::Verbs {
                op: "take a registered buffer",
                cause: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{len} bytes exceed the pool's {} byte limit", self.limit),
                ),
            });
        }
        loop {
            let freed = self.account.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let next = {
                let mut idle = self.idle();
                if let Some(memory) = idle.get_mut(&class).and_then(Vec::pop) {
                    return Ok(memory);
                }
                // Room is reserved under the lock, so two takers cannot both pass the limit.
                if self.reserve(class) {
                    Next::Register
                } else {
                    // Release an idle buffer of another size (deregistered outside the lock).
                    let size = idle.iter().find(|(_, v)| !v.is_empty()).map(|(s, _)| *s);
                    match size.and_then(|size| idle.get_mut(&size).and_then(Vec::pop)) {
                        Some(evicted) => Next::Evict(evicted),
                        None => Next::Wait,
                    }
                }
            };
            match next {
                Next::Register => {
                    let mut memory = RegisteredMemory::new(&self.pd, class).inspect_err(|_| {
                        self.account.release(class);
                    })?;
                    memory.charge(&self.account);
                    return Ok(memory);
                }
                Next::Evict(evicted) => drop(evicted),
                Next::Wait => freed.await,
            }
        }
    }

    /// Reserves `class` bytes if they fit under the limit.
    fn reserve(&self, class: usize) -> bool {
        self.account
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |bytes| {
                (bytes + class <= self.limit).then_some(bytes + class)
            })
            .is_ok()
    }

    /// Gives back a buffer `take` handed out, for reuse.
    pub fn give(&self, memory: RegisteredMemory) {
        self.idle().entry(memory.len()).or_default().push(memory);
        self.account.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_powers_of_two_from_a_page() {
        assert_eq!(class_of(0), 4096);
        assert_eq!(class_of(4097), 8192);
        assert_eq!(class_of(1 << 20), 1 << 20);
        assert_eq!(class_of((1 << 20) + 1), 2 << 20);
    }
}
