//! Recycled buffers for copy-mode sends.
//!
//! A copy send fills a buffer that lives until the receiver has consumed it. Allocating a fresh
//! one per send costs a page fault per page for large sends (glibc hands big blocks back to the
//! kernel); the pool keeps recently freed buffers, up to a byte budget, and reuses them.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

/// Buffers kept for reuse, per endpoint, at most.
const POOL_BUDGET: usize = 64 << 20;

#[derive(Debug, Default)]
pub(crate) struct BufferPool {
    free: Mutex<Free>,
}

#[derive(Debug, Default)]
struct Free {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

struct Pooled {
    buffer: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buffer
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buffer));
    }
}

impl BufferPool {
    /// An empty buffer with room for `len` bytes, filled by `fill`, shared as `Bytes`.
    pub(crate) fn filled(self: &Arc<Self>, len: usize, fill: impl FnOnce(&mut Vec<u8>)) -> Bytes {
        let mut buffer = self.take(len);
        fill(&mut buffer);
        Bytes::from_owner(Pooled { buffer, pool: self.clone() })
    }

    fn take(&self, len: usize) -> Vec<u8> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        // A buffer that fits without wasting more than it holds.
        let found = free
            .buffers
            .iter()
            .rposition(|b| b.capacity() >= len && b.capacity() <= 2 * len.max(4096));
        match found {
            Some(index) => {
                let buffer = free.buffers.swap_remove(index);
                free.bytes -= buffer.capacity();
                buffer
            }
            None => Vec::with_capacity(len),
        }
    }

    fn put(&self, mut buffer: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.bytes + buffer.capacity() <= POOL_BUDGET {
            buffer.clear();
            free.bytes += buffer.capacity();
            free.buffers.push(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_buffers_are_reused() {
        let pool = Arc::new(BufferPool::default());
        let first = pool.filled(100_000, |b| b.extend_from_slice(&[1u8; 100_000]));
        let address = first.as_ptr();
        drop(first);
        let second = pool.filled(90_000, |b| b.extend_from_slice(&[2u8; 90_000]));
        assert_eq!(second.as_ptr(), address);
        assert_eq!(second.len(), 90_000);
        assert!(second.iter().all(|b| *b == 2));
    }

    #[test]
    fn tiny_requests_do_not_take_huge_buffers() {
        let pool = Arc::new(BufferPool::default());
        drop(pool.filled(1 << 20, |b| b.resize(1 << 20, 0)));
        let small = pool.filled(16, |b| b.extend_from_slice(&[0u8; 16]));
        assert!(pool.free.lock().unwrap().buffers.len() == 1, "the big buffer stays pooled");
        drop(small);
    }
}
