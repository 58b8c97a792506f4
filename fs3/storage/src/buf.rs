//! Buffers for Direct I/O: 4 KiB-aligned address and length, as `O_DIRECT` requires, and a
//! bounded pool that recycles them. Chunk-sized buffers are large enough that the allocator
//! maps fresh pages for each and unmaps them on free; every new page then costs a fault and
//! zeroing. A pooled buffer goes back to its pool when dropped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aligned_vec::{AVec, ConstAlign};

/// The alignment and size granule of Direct I/O.
pub const BLOCK: usize = 4096;

/// Rounds `n` up to a multiple of [`BLOCK`].
pub const fn round_up(n: usize) -> usize {
    n.div_ceil(BLOCK) * BLOCK
}

type Bytes = AVec<u8, ConstAlign<BLOCK>>;

/// A zero-initialised byte buffer whose address is [`BLOCK`]-aligned.
#[derive(Debug, Clone)]
pub struct AlignedBuf {
    bytes: Bytes,
    /// Where the buffer goes when dropped.
    pool: Option<AlignedPool>,
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give_back(std::mem::replace(&mut self.bytes, AVec::new(BLOCK)));
        }
    }
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes (`len` need not be a multiple of [`BLOCK`], but Direct I/O
    /// transfers must be).
    pub fn zeroed(len: usize) -> Self {
        let mut bytes = AVec::with_capacity(BLOCK, len.max(1));
        bytes.resize(len, 0);
        AlignedBuf { bytes, pool: None }
    }

    /// A buffer holding a copy of `data`, padded with zeros to a multiple of [`BLOCK`].
    pub fn padded_copy(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(round_up(data.len()));
        buf.as_mut_slice()[..data.len()].copy_from_slice(data);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.bytes.as_mut_slice()
    }

    /// Changes the length, zero-filling any growth.
    pub fn resize(&mut self, len: usize) {
        self.bytes.resize(len, 0);
    }
}

/// A bounded pool of aligned buffers, by capacity (powers of two from [`BLOCK`]). Cloning gives
/// another handle to the same pool.
#[derive(Debug, Clone)]
pub struct AlignedPool {
    shared: Arc<PoolShared>,
}

#[derive(Debug)]
struct PoolShared {
    /// Idle buffers by capacity, and their total capacity.
    idle: Mutex<(BTreeMap<usize, Vec<Bytes>>, usize)>,
    /// Most bytes kept idle; buffers beyond it are freed.
    limit: usize,
}

impl AlignedPool {
    /// A pool keeping at most `limit` bytes of idle buffers.
    pub fn new(limit: usize) -> Self {
        AlignedPool {
            shared: Arc::new(PoolShared {
                idle: Mutex::new((BTreeMap::new(), 0)),
                limit,
            }),
        }
    }

    /// An empty buffer with room for `len` bytes, recycled if one is idle.
    fn take(&self, len: usize) -> AlignedBuf {
        let capacity = len.max(BLOCK).next_power_of_two();
        let recycled = {
            let mut idle = self.shared.idle.lock().unwrap_or_else(|p| p.into_inner());
            let (buffers, held) = &mut *idle;
            let buffer = buffers.get_mut(&capacity).and_then(Vec::pop);
            if buffer.is_some() {
                *held -= capacity;
            }
            buffer
        };
        let mut bytes = recycled.unwrap_or_else(|| AVec::with_capacity(BLOCK, capacity));
        bytes.clear();
        AlignedBuf {
            bytes,
            pool: Some(self.clone()),
        }
    }

    /// A buffer of `len` zero bytes, recycled if one is idle.
    pub fn zeroed(&self, len: usize) -> AlignedBuf {
        let mut buf = self.take(len);
        buf.bytes.resize(len, 0);
        buf
    }

    /// A pooled copy of `data`, padded with zeros to a multiple of [`BLOCK`] (only the padding
    /// is zeroed).
    pub fn padded_copy(&self, data: &[u8]) -> AlignedBuf {
        let padded = round_up(data.len());
        let mut buf = self.take(padded);
        buf.bytes.extend_from_slice(data);
        buf.bytes.resize(padded, 0);
        buf
    }

    fn give_back(&self, bytes: Bytes) {
        let capacity = bytes.capacity();
        // Only the capacities this pool hands out are worth keeping.
        if !capacity.is_power_of_two() || capacity < BLOCK {
            return;
        }
        let mut idle = self.shared.idle.lock().unwrap_or_else(|p| p.into_inner());
        let (buffers, held) = &mut *idle;
        if *held + capacity <= self.shared.limit {
            buffers.entry(capacity).or_default().push(bytes);
            *held += capacity;
        }
    }

    /// Bytes of idle buffers held.
    pub fn idle_bytes(&self) -> usize {
        self.shared.idle.lock().unwrap_or_else(|p| p.into_inner()).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_padded() {
        let buf = AlignedBuf::padded_copy(b"hello");
        assert_eq!(buf.len(), BLOCK);
        assert_eq!(buf.as_slice().as_ptr() as usize % BLOCK, 0);
        assert_eq!(&buf.as_slice()[..5], b"hello");
        assert!(buf.as_slice()[5..].iter().all(|b| *b == 0));
        assert_eq!(round_up(0), 0);
        assert_eq!(round_up(1), BLOCK);
        assert_eq!(round_up(BLOCK + 1), 2 * BLOCK);
    }

    #[test]
    fn the_pool_recycles_within_its_limit() {
        let pool = AlignedPool::new(3 * BLOCK * 64);
        let mut first = pool.zeroed(100_000);
        first.as_mut_slice()[0] = 7;
        let address = first.as_slice().as_ptr();
        drop(first);
        assert_eq!(pool.idle_bytes(), 131_072);
        // The same memory comes back, zeroed, aligned.
        let second = pool.zeroed(90_000);
        assert_eq!(second.as_slice().as_ptr(), address);
        assert_eq!(second.len(), 90_000);
        assert!(second.as_slice().iter().all(|b| *b == 0));
        assert_eq!(pool.idle_bytes(), 0);
        // Beyond the limit, buffers are freed rather than kept.
        let many: Vec<_> = (0..4).map(|_| pool.zeroed(BLOCK * 64)).collect();
        drop(many);
        drop(second);
        assert!(pool.idle_bytes() <= 3 * BLOCK * 64);
    }
}
