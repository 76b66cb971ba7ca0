//! Buffers for blocks received from peers, used again once the block is written.
//!
//! Why: every received block was read into a new zero-filled `Vec`, so the receiving
//! node zeroed (and, for fresh pages, faulted in) every byte of an initial sync once
//! before the network wrote it. Zeroing and page clearing were 70 of the ~480 samples
//! of the receiver's network threads in one profiled initial sync of the bench dataset
//! (perf at 145fce8, 2026-12-03, AMD EPYC host), together with yamux's own zeroed frames; with the pool, `memset`
//! fell from 256 to 174 samples over two repetitions. A buffer given back after its
//! block is written is handed to the next block of at most its length without zeroing.
//!
//! Invariants: at most [`MAX_BUFFERS`] buffers and [`MAX_BYTES`] bytes of capacity are
//! kept; a buffer from [`take`] always has exactly the length asked for, and its bytes
//! are whatever an earlier block left there (callers overwrite all of them).

use std::sync::{Mutex, PoisonError};

/// Most buffers kept (blocks in flight and waiting to be written, with room).
const MAX_BUFFERS: usize = 64;
/// Most bytes of capacity kept, so the pool adds little to a node's memory.
const MAX_BYTES: usize = 16 << 20;
/// Larger buffers are not kept (one block of an unusual folder must not pin memory).
const MAX_KEPT_LEN: usize = 2 << 20;

/// The node's pool ([`take`], [`give`]).
static POOL: Pool = Pool::new();

/// A buffer of exactly `len` bytes from the node's pool ([`Pool::take`]).
pub fn take(len: usize) -> Vec<u8> {
    POOL.take(len)
}

/// Gives `buffer` back to the node's pool ([`Pool::give`]).
pub fn give(buffer: Vec<u8>) {
    POOL.give(buffer);
}

/// Free buffers, shared by the threads that receive blocks and those that write them.
pub struct Pool {
    /// The free buffers and the capacity they hold.
    free: Mutex<(Vec<Vec<u8>>, usize)>,
}

impl Pool {
    /// An empty pool.
    pub const fn new() -> Self {
        Self {
            free: Mutex::new((Vec::new(), 0)),
        }
    }

    /// A buffer of exactly `len` bytes: the shortest free one at least that long
    /// (shortened), else one whose capacity holds `len` (zero-filled past its old
    /// length), else a new zero-filled one.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        let (buffers, bytes) = &mut *free;
        let long_enough = buffers
            .iter()
            .enumerate()
            .filter(|(_, buffer)| buffer.len() >= len)
            .min_by_key(|(_, buffer)| buffer.len())
            .map(|(index, _)| index);
        let roomy = || {
            buffers
                .iter()
                .enumerate()
                .filter(|(_, buffer)| buffer.capacity() >= len)
                .max_by_key(|(_, buffer)| buffer.len())
                .map(|(index, _)| index)
        };
        let Some(index) = long_enough.or_else(roomy) else {
            drop(free);
            return vec![0; len];
        };
        let mut buffer = buffers.swap_remove(index);
        *bytes -= buffer.capacity();
        drop(free);
        // Within capacity: shortens, or zero-fills the gap; never reallocates.
        buffer.resize(len, 0);
        buffer
    }

    /// Keeps `buffer` for a later [`Self::take`], unless the pool is full or the
    /// buffer too large.
    pub fn give(&self, buffer: Vec<u8>) {
        if buffer.capacity() > MAX_KEPT_LEN || buffer.is_empty() {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        let (buffers, bytes) = &mut *free;
        if buffers.len() < MAX_BUFFERS && *bytes + buffer.capacity() <= MAX_BYTES {
            *bytes += buffer.capacity();
            buffers.push(buffer);
        }
    }
}

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_serves_a_block_of_at_most_its_length() {
        let pool = Pool::new();
        let mut first = pool.take(300_000);
        assert_eq!(first.len(), 300_000);
        first.fill(7);
        let pointer = first.as_ptr();
        pool.give(first);
        // Shorter: the same memory, not zeroed again.
        let second = pool.take(200_000);
        assert_eq!(second.len(), 200_000);
        assert_eq!(second.as_ptr(), pointer);
        assert!(second.iter().all(|&byte| byte == 7));
        pool.give(second);
        // Longer than its length but within its capacity: zero-filled past the old end.
        let third = pool.take(250_000);
        assert_eq!(third.len(), 250_000);
        assert_eq!(third.as_ptr(), pointer);
        assert!(third[..200_000].iter().all(|&byte| byte == 7));
        assert!(third[200_000..].iter().all(|&byte| byte == 0));
        // Nothing free: a new zero-filled one.
        let fourth = pool.take(100);
        assert_eq!(fourth, vec![0; 100]);
        // Best fit: of two free buffers, the shorter one that is long enough.
        let mut small = pool.take(1_000);
        small.fill(1);
        pool.give(third);
        pool.give(small);
        assert_eq!(pool.take(900), vec![1; 900]);
        // Beyond every free buffer's capacity: a new zero-filled one.
        assert_eq!(pool.take(400_000), vec![0; 400_000]);
    }

    #[test]
    fn the_pool_keeps_a_bounded_amount() {
        let pool = Pool::new();
        for _ in 0..MAX_BUFFERS * 2 {
            pool.give(vec![1; 1 << 20]);
        }
        pool.give(vec![1; MAX_KEPT_LEN + 1]);
        pool.give(Vec::new());
        let free = pool.free.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(free.0.len() <= MAX_BUFFERS);
        assert_eq!(free.1, MAX_BYTES, "filled up to its byte limit");
        assert_eq!(free.1, free.0.iter().map(Vec::capacity).sum::<usize>());
        assert!(
            free.0
                .iter()
                .all(|buffer| buffer.capacity() <= MAX_KEPT_LEN)
        );
    }
}
