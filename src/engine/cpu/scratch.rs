//! Scratch memory reused across calls: the im2col columns, Winograd's transformed tiles and
//! weights, partial weight gradients. Freshly allocated large buffers cost page faults and
//! the kernel's page clearing on every call (a few percent of a training step); a
//! [`PoolVec`] takes a buffer from a small process-wide pool and gives it back when dropped.
//! Contents are left as the last user wrote them: callers overwrite what they read.
//! Knows nothing about the ops.

use std::marker::PhantomData;
use std::sync::Mutex;

use crate::engine::Real;

/// Buffers kept for reuse, as 8-byte words (aligned for f32 and f64 alike).
static POOL: Mutex<Vec<Vec<u64>>> = Mutex::new(Vec::new());
/// At most this many buffers and this many bytes stay in the pool.
const MAX_BUFFERS: usize = 32;
const MAX_BYTES: usize = 256 << 20;

/// A growable scratch slice of `T` backed by pooled memory.
pub struct PoolVec<T: Real> {
    words: Vec<u64>,
    _t: PhantomData<T>,
}

impl<T: Real> Default for PoolVec<T> {
    fn default() -> Self {
        PoolVec {
            words: Vec::new(),
            _t: PhantomData,
        }
    }
}

impl<T: Real> PoolVec<T> {
    /// A buffer of at least `len` elements, contents unspecified (finite or not).
    pub fn with_len(len: usize) -> Self {
        let mut v = Self::default();
        v.sized(len);
        v
    }

    /// The first `len` elements, growing the buffer (from the pool when one is large
    /// enough) if needed. Contents are unspecified: whatever a previous user left.
    pub fn sized(&mut self, len: usize) -> &mut [T] {
        assert!(
            std::mem::size_of::<T>() <= 8 && 8 % std::mem::size_of::<T>() == 0,
            "PoolVec holds f32 or f64"
        );
        let words = (len * std::mem::size_of::<T>()).div_ceil(8);
        if self.words.len() < words {
            let mut fresh = take(words);
            std::mem::swap(&mut fresh, &mut self.words);
            give_back(fresh);
            if self.words.len() < words {
                self.words.resize(words, 0);
            }
        }
        // SAFETY: the words hold at least `len` elements of T (f32 or f64: size divides 8,
        // alignment at most 8), every bit pattern is a valid f32/f64, and the slice
        // borrows self mutably.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut T, len) }
    }

    /// The first `len` elements set to zero.
    pub fn zeroed(&mut self, len: usize) -> &mut [T] {
        let s = self.sized(len);
        s.fill(T::zero());
        s
    }
}

impl<T: Real> Drop for PoolVec<T> {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.words));
    }
}

/// The smallest pooled buffer of at least `words` words, or an empty one.
fn take(words: usize) -> Vec<u64> {
    let Ok(mut pool) = POOL.lock() else {
        return Vec::new();
    };
    let best = pool
        .iter()
        .enumerate()
        .filter(|(_, b)| b.len() >= words)
        .min_by_key(|(_, b)| b.len())
        .map(|(i, _)| i);
    match best {
        Some(i) => pool.swap_remove(i),
        None => Vec::new(),
    }
}

fn give_back(buf: Vec<u64>) {
    if buf.is_empty() {
        return;
    }
    let Ok(mut pool) = POOL.lock() else {
        return;
    };
    pool.push(buf);
    // Keep the largest buffers within the limits.
    pool.sort_by_key(|b| std::cmp::Reverse(b.len()));
    let mut bytes = 0;
    let mut keep = 0;
    for b in pool.iter() {
        if keep == MAX_BUFFERS || bytes + b.len() * 8 > MAX_BYTES {
            break;
        }
        bytes += b.len() * 8;
        keep += 1;
    }
    pool.truncate(keep);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_grow_and_are_reused() {
        let mut a = PoolVec::<f32>::with_len(1000);
        a.sized(1000).fill(3.0);
        let p = a.sized(10).as_ptr();
        assert_eq!(a.sized(1000)[999], 3.0);
        assert!(a.zeroed(500).iter().all(|&v| v == 0.0));
        drop(a);
        // A request that fits may get the same memory back (the pool is process-wide, so
        // another thread may have taken it: only check the contents are usable).
        let mut b = PoolVec::<f64>::with_len(400);
        let s = b.sized(400);
        s[399] = 1.5;
        assert_eq!(s.len(), 400);
        let _ = p;
    }
}
