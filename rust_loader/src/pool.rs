//! Recycled batch buffers.
//!
//! A batch of padded f32 images is tens of MB. Allocated fresh each time, the allocator hands
//! large blocks back to the kernel and gets them again as new pages, which the kernel zeroes on
//! first touch: page faults and a memset of the whole buffer on top of the real work. A
//! [`BufferPool`] keeps the buffers of consumed batches instead; a [`PooledVec`] goes back to
//! its pool when dropped (for Python: when the NumPy array over it is garbage), so a batch that
//! is kept alive simply stays out of the pool.
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

/// At most `max_free` idle buffers, reused for any request they are large enough for.
pub struct BufferPool<T> {
    free: Mutex<Vec<Vec<T>>>,
    max_free: usize,
}

impl<T> BufferPool<T> {
    pub fn new(max_free: usize) -> Arc<Self> {
        Arc::new(Self::new_static(max_free))
    }

    /// A pool that can live in a `static` (its users hand buffers back with [`BufferPool::put`]).
    pub const fn new_static(max_free: usize) -> Self {
        BufferPool {
            free: Mutex::new(Vec::new()),
            max_free,
        }
    }

    /// An empty vector with room for `len` elements, recycled when an idle buffer is large
    /// enough (see [`BufferPool::take_idle`]); a new buffer gets 1/2 headroom so that larger
    /// batches later still fit (pages the batches never reach are never touched, so the headroom
    /// costs address space, not memory).
    pub fn take(self: &Arc<Self>, len: usize) -> PooledVec<T> {
        let mut vec = self
            .take_idle(len)
            .unwrap_or_else(|| Vec::with_capacity(len + len / 2));
        vec.clear();
        PooledVec {
            vec,
            home: Some(Arc::clone(self)),
        }
    }

    /// The smallest idle buffer with room for `len` elements, its contents as they were put
    /// back. When none fits, the smallest idle buffer is dropped in exchange for the new one the
    /// caller will make, so idle memory does not grow with the number of sizes seen.
    pub fn take_idle(&self, len: usize) -> Option<Vec<T>> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let best = (0..free.len())
            .filter(|&i| free[i].capacity() >= len)
            .min_by_key(|&i| free[i].capacity());
        match best {
            Some(i) => Some(free.swap_remove(i)),
            None => {
                if let Some(i) = (0..free.len()).min_by_key(|&i| free[i].capacity()) {
                    free.swap_remove(i);
                }
                None
            }
        }
    }

    /// Returns a buffer (its contents kept); it is kept if there is room, or if it is larger
    /// than the smallest idle one (which it then replaces).
    pub fn put(&self, vec: Vec<T>) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.max_free {
            free.push(vec);
        } else if let Some(i) = (0..free.len()).min_by_key(|&i| free[i].capacity()) {
            if free[i].capacity() < vec.capacity() {
                free[i] = vec;
            }
        }
    }

    /// Idle buffers (for tests and diagnostics).
    pub fn idle(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A `Vec` that returns to its pool when dropped (or a plain one, without a pool).
pub struct PooledVec<T> {
    vec: Vec<T>,
    home: Option<Arc<BufferPool<T>>>,
}

impl<T> PooledVec<T> {
    /// Detaches the vector from its pool.
    pub fn into_vec(mut self) -> Vec<T> {
        self.home = None;
        std::mem::take(&mut self.vec)
    }
}

impl<T> From<Vec<T>> for PooledVec<T> {
    fn from(vec: Vec<T>) -> Self {
        PooledVec { vec, home: None }
    }
}

impl<T> Default for PooledVec<T> {
    fn default() -> Self {
        Vec::new().into()
    }
}

impl<T> Deref for PooledVec<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.vec
    }
}

impl<T> DerefMut for PooledVec<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.vec
    }
}

impl<T: fmt::Debug> fmt::Debug for PooledVec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.vec.fmt(f)
    }
}

impl<T> Drop for PooledVec<T> {
    fn drop(&mut self) {
        if let Some(pool) = self.home.take() {
            pool.put(std::mem::take(&mut self.vec));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_buffers_are_reused_without_reallocation() {
        let pool = BufferPool::<f32>::new(2);
        let mut a = pool.take(1000);
        a.extend((0..1000).map(|i| i as f32));
        let address = a.as_ptr();
        drop(a);
        assert_eq!(pool.idle(), 1);
        let b = pool.take(900);
        assert_eq!(b.as_ptr(), address, "the idle buffer is handed out again");
        assert!(b.is_empty() && b.capacity() >= 1000);
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn idle_buffers_are_bounded_and_the_largest_are_kept() {
        let pool = BufferPool::<u8>::new(2);
        let held: Vec<_> = [10, 100, 1000, 50]
            .map(|n| pool.take(n))
            .into_iter()
            .collect();
        drop(held);
        assert_eq!(pool.idle(), 2);
        // The two kept are the largest (1000 and 100, with headroom).
        let big = pool.take(1000);
        let mid = pool.take(100);
        assert!(big.capacity() >= 1000 && (100..1000).contains(&mid.capacity()));
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn too_small_idle_buffers_are_exchanged_for_a_new_one() {
        let pool = BufferPool::<u8>::new(4);
        drop([pool.take(10), pool.take(20)]);
        assert_eq!(pool.idle(), 2);
        let big = pool.take(1000);
        assert!(big.capacity() >= 1000);
        assert_eq!(pool.idle(), 1, "the smallest idle buffer was dropped");
        drop(big);
        assert_eq!(pool.idle(), 2);
    }

    #[test]
    fn detached_and_plain_vectors_never_enter_the_pool() {
        let pool = BufferPool::<u8>::new(2);
        let v = pool.take(10).into_vec();
        assert!(v.capacity() >= 10);
        drop(PooledVec::from(vec![1u8, 2]));
        assert_eq!(pool.idle(), 0);
    }
}
