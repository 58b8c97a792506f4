//! A bounded pool of receive buffers, so that a steady stream of frames does not allocate.
//! (An RDMA backend's pool of registered memory regions takes this place.)

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

/// Smallest pooled buffer; sizes are powers of two from here.
const MIN_CLASS: usize = 4096;

/// Buffers kept for reuse, by power-of-two size class, up to a byte budget.
#[derive(Debug)]
pub struct BufferPool {
    classes: Mutex<Vec<Vec<Vec<u8>>>>,
    budget: usize,
    kept: Mutex<usize>,
}

impl BufferPool {
    /// A pool that keeps at most `budget` bytes of idle buffers.
    pub fn new(budget: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            classes: Mutex::new(vec![Vec::new(); 40]),
            budget,
            kept: Mutex::new(0),
        })
    }

    fn class(len: usize) -> usize {
        len.max(MIN_CLASS).next_power_of_two().trailing_zeros() as usize
    }

    /// A buffer of exactly `len` bytes (contents unspecified).
    pub fn take(self: &Arc<Self>, len: usize) -> PooledBuf {
        let class = Self::class(len);
        let reused = self
            .classes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(class)
            .and_then(Vec::pop);
        let mut buf = match reused {
            Some(buf) => {
                *self.kept.lock().unwrap_or_else(|p| p.into_inner()) -= buf.capacity();
                buf
            }
            None => Vec::with_capacity(1 << class),
        };
        buf.resize(len, 0);
        PooledBuf {
            buf,
            pool: Some(self.clone()),
        }
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        let capacity = buf.capacity();
        if !capacity.is_power_of_two() || capacity < MIN_CLASS {
            return;
        }
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if *kept + capacity > self.budget {
            return;
        }
        *kept += capacity;
        buf.clear();
        let class = capacity.trailing_zeros() as usize;
        if let Some(list) = self
            .classes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(class)
        {
            list.push(buf);
        }
    }

    /// Bytes of idle buffers held.
    pub fn kept_bytes(&self) -> usize {
        *self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A buffer that returns to its pool when dropped.
#[derive(Debug)]
pub struct PooledBuf {
    buf: Vec<u8>,
    pool: Option<Arc<BufferPool>>,
}

impl PooledBuf {
    /// A buffer owning `bytes`, not tied to any pool.
    pub fn detached(bytes: Vec<u8>) -> PooledBuf {
        PooledBuf {
            buf: bytes,
            pool: None,
        }
    }

    /// Takes the bytes out (the buffer will not return to the pool).
    pub fn into_vec(mut self) -> Vec<u8> {
        self.pool = None;
        std::mem::take(&mut self.buf)
    }
}

impl Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give_back(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_within_the_budget() {
        let pool = BufferPool::new(64 * 1024);
        let a = pool.take(5000);
        assert_eq!(a.len(), 5000);
        drop(a);
        assert_eq!(pool.kept_bytes(), 8192);
        let b = pool.take(6000); // same class: reused
        assert_eq!(pool.kept_bytes(), 0);
        drop(b);
        let big = pool.take(1 << 20); // over budget: not kept
        drop(big);
        assert_eq!(pool.kept_bytes(), 8192);
        assert_eq!(pool.take(10).into_vec().len(), 10);
    }
}
