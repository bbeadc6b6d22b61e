//! Plaintext buffers wiped when dropped, at memset speed.
//!
//! `zeroize` clears a `Vec<u8>` with one volatile store per byte, about a
//! byte per cycle: an export or a restore, which passes every byte of a
//! volume through megabyte buffers, spent more time wiping them than
//! sealing them. [`Wiped`] clears its whole allocation with the C
//! library's `explicit_bzero`: a memset that the compiler may not remove
//! as a dead store.

use std::ops::{Deref, DerefMut};

/// A `Vec<u8>` whose whole allocation (spare capacity included) is
/// overwritten with zeros when it is dropped. Like `Zeroizing<Vec<u8>>`,
/// it cannot wipe what a reallocation leaves behind: callers size it
/// first (the pool's buffers never grow).
#[derive(Default)]
pub struct Wiped(Vec<u8>);

impl Wiped {
    pub fn new(v: Vec<u8>) -> Wiped {
        Wiped(v)
    }

    pub fn with_capacity(n: usize) -> Wiped {
        Wiped(Vec::with_capacity(n))
    }

    /// Overwrites the whole allocation with zeros and empties the vector.
    pub fn wipe(&mut self) {
        let cap = self.0.capacity();
        self.0.clear();
        if cap > 0 {
            // SAFETY: writes `cap` bytes into the vector's own allocation
            // of `cap` bytes; u8 has no invalid values and no drop.
            unsafe { libc::explicit_bzero(self.0.as_mut_ptr().cast(), cap) };
        }
    }
}

impl Drop for Wiped {
    fn drop(&mut self) {
        self.wipe();
    }
}

impl Deref for Wiped {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl DerefMut for Wiped {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl std::fmt::Debug for Wiped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Wiped({} bytes)", self.0.len())
    }
}

/// Buffers handed back for reuse, so that a pipeline moving every byte of a
/// volume does not allocate (and fault in, and wipe) a megabyte per step.
/// What it holds is wiped when it is dropped.
pub struct WipedPool {
    free: crossbeam::channel::Sender<Wiped>,
    take: crossbeam::channel::Receiver<Wiped>,
    capacity: usize,
}

impl WipedPool {
    /// A pool keeping at most `keep` buffers of `capacity` bytes each.
    pub fn new(keep: usize, capacity: usize) -> WipedPool {
        let (free, take) = crossbeam::channel::bounded(keep.max(1));
        WipedPool {
            free,
            take,
            capacity,
        }
    }

    /// An empty buffer with room for the pool's capacity.
    pub fn get(&self) -> Wiped {
        self.take
            .try_recv()
            .unwrap_or_else(|_| Wiped::with_capacity(self.capacity))
    }

    /// `n` zero bytes in a buffer from the pool.
    pub fn zeroed(&self, n: usize) -> Wiped {
        let mut b = self.get();
        b.resize(n, 0);
        b
    }

    /// Hands a buffer back (its contents stay until it is reused or the
    /// pool is dropped, when it is wiped).
    pub fn put(&self, mut b: Wiped) {
        if b.capacity() >= self.capacity {
            b.clear();
            // A full pool drops the buffer, which wipes it.
            let _ = self.free.try_send(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wipe_clears_the_whole_allocation_spare_capacity_included() {
        let mut w = Wiped::with_capacity(1 << 20);
        w.extend(std::iter::repeat_n(0xa5u8, 1 << 20));
        w.truncate(100);
        let cap = w.capacity();
        w.wipe();
        assert!(w.is_empty());
        // SAFETY: wipe wrote all `cap` bytes, so they are initialized.
        unsafe { w.0.set_len(cap) };
        assert!(w.iter().all(|&b| b == 0));
        assert_eq!(format!("{w:?}"), format!("Wiped({cap} bytes)"));
    }

    #[test]
    fn a_pool_reuses_its_buffers_and_keeps_at_most_its_count() {
        let pool = WipedPool::new(2, 4096);
        let mut a = pool.zeroed(100);
        assert_eq!((a.len(), a.iter().all(|&b| b == 0)), (100, true));
        a.fill(7);
        let at = a.as_ptr();
        pool.put(a);
        let b = pool.zeroed(4096);
        assert_eq!(b.as_ptr(), at, "the same allocation again");
        assert!(b.iter().all(|&x| x == 0), "and zeros, not what it held");
        let (c, d, e) = (pool.get(), pool.get(), pool.get());
        for x in [b, c, d, e] {
            pool.put(x);
        }
        assert_eq!(pool.take.len(), 2);
        // Too small for the pool: not kept.
        pool.take.try_iter().for_each(drop);
        pool.put(Wiped::with_capacity(10));
        assert_eq!(pool.take.len(), 0);
    }
}
