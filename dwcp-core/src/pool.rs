//! Size-stratified buffer pools under one global byte budget.
//!
//! Three classes (4 KiB, 64 KiB, 1 MiB) keep freed buffers for reuse. The budget bounds the bytes the
//! pool has allocated, in use or idle; when it is exhausted, idle buffers of other classes are released
//! and, failing that, [`BufferPool::acquire`] blocks until a buffer is returned. Every queue between
//! migration stages holds pooled buffers, so a slow link slows the encoder instead of growing the heap.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::Error;

/// A pool size class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeClass {
    /// 4 KiB: control frames, single pages.
    Small,
    /// 64 KiB: small chunks, compressed output of sparse chunks.
    Medium,
    /// 1 MiB: full chunks.
    Large,
}

impl SizeClass {
    /// All classes, smallest first.
    pub const ALL: [SizeClass; 3] = [SizeClass::Small, SizeClass::Medium, SizeClass::Large];

    /// Nominal size of the class.
    pub const fn nominal(self) -> usize {
        match self {
            SizeClass::Small => 4 << 10,
            SizeClass::Medium => 64 << 10,
            SizeClass::Large => 1 << 20,
        }
    }

    /// Capacity actually allocated: the nominal size plus headroom for a frame header and chunk descriptors,
    /// so that a full chunk of nominal size fits in one buffer of its class.
    pub const fn capacity(self) -> usize {
        self.nominal() + self.nominal() / 16
    }

    /// The smallest class holding `len` bytes.
    pub fn for_len(len: usize) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.capacity() >= len)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters describing pool behaviour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    /// Acquisitions served from an idle buffer.
    pub hits: u64,
    /// Acquisitions that allocated.
    pub misses: u64,
    /// Acquisitions that had to wait for the budget.
    pub waits: u64,
    /// Bytes allocated now (in use and idle).
    pub allocated_bytes: u64,
    /// Bytes handed out now.
    pub in_use_bytes: u64,
    /// Most bytes ever handed out at once.
    pub peak_in_use_bytes: u64,
    /// The budget.
    pub budget_bytes: u64,
}

#[derive(Debug)]
struct State {
    idle: [Vec<Vec<u8>>; 3],
    allocated: usize,
    in_use: usize,
    peak_in_use: usize,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    returned: Condvar,
    budget: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    waits: AtomicU64,
}

/// A shared pool of reusable buffers. Cloning shares the pool.
#[derive(Debug, Clone)]
pub struct BufferPool {
    inner: Arc<Inner>,
}

/// Smallest budget a pool accepts: enough for a few full chunks in flight.
pub const MIN_BUDGET: usize = 4 * SizeClass::Large.capacity();

impl BufferPool {
    /// A pool that never holds more than `budget_bytes` (at least [`MIN_BUDGET`]).
    pub fn new(budget_bytes: usize) -> Result<Self, Error> {
        if budget_bytes < MIN_BUDGET {
            return Err(Error::Config(format!(
                "buffer pool budget {budget_bytes} below the minimum {MIN_BUDGET}"
            )));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    idle: Default::default(),
                    allocated: 0,
                    in_use: 0,
                    peak_in_use: 0,
                }),
                returned: Condvar::new(),
                budget: budget_bytes,
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                waits: AtomicU64::new(0),
            }),
        })
    }

    /// A buffer of at least `min_len` bytes capacity (length zero), waiting while the budget is used up.
    pub fn acquire(&self, min_len: usize) -> Result<PooledBuf, Error> {
        self.acquire_inner(min_len, None)?
            .ok_or_else(|| Error::Timeout("buffer pool wait without deadline".into()))
    }

    /// Like [`acquire`](Self::acquire) but gives up after `timeout`, returning `None`.
    pub fn acquire_timeout(
        &self,
        min_len: usize,
        timeout: Duration,
    ) -> Result<Option<PooledBuf>, Error> {
        self.acquire_inner(min_len, Some(Instant::now() + timeout))
    }

    /// `count` buffers of at least `min_len` bytes each, taken together: waits until all of them
    /// fit in the budget at once. A caller that needs several buffers for one unit of work must not
    /// hold some while it waits for the rest: when many such callers share one pool, each can end
    /// up holding part of what it needs while the budget is spent, and none goes on.
    pub fn acquire_many(&self, count: usize, min_len: usize) -> Result<Vec<PooledBuf>, Error> {
        let class = class_for(min_len)?;
        let size = class.capacity();
        let inner = &*self.inner;
        if count.saturating_mul(size) > inner.budget {
            return Err(Error::Config(format!(
                "{count} buffers of {size} bytes exceed the pool budget of {} bytes",
                inner.budget
            )));
        }
        let mut out = Vec::with_capacity(count);
        self.take(class, count, None, |b| out.push(b));
        Ok(out)
    }

    fn acquire_inner(
        &self,
        min_len: usize,
        deadline: Option<Instant>,
    ) -> Result<Option<PooledBuf>, Error> {
        let class = class_for(min_len)?;
        let mut got = None;
        self.take(class, 1, deadline, |b| got = Some(b));
        Ok(got)
    }

    /// Hands `count` buffers of `class` to `put`, all at once: reusing idle ones first, then
    /// releasing idle buffers of other classes to make room in the budget for fresh ones, else
    /// waiting for buffers to come back. Returns false (having handed out none) if `deadline`
    /// passed first. `count` whole buffers must fit in the budget.
    fn take(
        &self,
        class: SizeClass,
        count: usize,
        deadline: Option<Instant>,
        mut put: impl FnMut(PooledBuf),
    ) -> bool {
        let size = class.capacity();
        let inner = &*self.inner;
        let mut st = inner.state.lock();
        let mut waited = false;
        loop {
            let reused = st.idle[class.index()].len().min(count);
            let fresh = (count - reused) * size;
            if st.allocated + fresh > inner.budget {
                for other in SizeClass::ALL.into_iter().filter(|c| *c != class) {
                    while st.allocated + fresh > inner.budget {
                        match st.idle[other.index()].pop() {
                            Some(_) => st.allocated -= other.capacity(),
                            None => break,
                        }
                    }
                }
            }
            if st.allocated + fresh <= inner.budget {
                for _ in 0..reused {
                    let buf = st.idle[class.index()].pop().expect("counted above");
                    put(self.hand_out(&mut st, buf, class));
                }
                inner.hits.fetch_add(reused as u64, Ordering::Relaxed);
                inner
                    .misses
                    .fetch_add((count - reused) as u64, Ordering::Relaxed);
                st.allocated += fresh;
                for _ in reused..count {
                    put(self.hand_out(&mut st, Vec::with_capacity(size), class));
                }
                return true;
            }
            if !waited {
                inner.waits.fetch_add(1, Ordering::Relaxed);
                waited = true;
            }
            match deadline {
                None => inner.returned.wait(&mut st),
                Some(d) => {
                    if inner.returned.wait_until(&mut st, d).timed_out() {
                        return false;
                    }
                }
            }
        }
    }

    fn hand_out(&self, st: &mut State, mut buf: Vec<u8>, class: SizeClass) -> PooledBuf {
        buf.clear();
        st.in_use += class.capacity();
        st.peak_in_use = st.peak_in_use.max(st.in_use);
        PooledBuf {
            buf,
            class,
            pool: self.clone(),
        }
    }

    fn give_back(&self, buf: Vec<u8>, class: SizeClass) {
        let mut st = self.inner.state.lock();
        st.in_use -= class.capacity();
        if buf.capacity() == class.capacity() {
            st.idle[class.index()].push(buf);
        } else {
            // The user grew the buffer past its class: do not keep an odd-sized allocation.
            st.allocated -= class.capacity();
        }
        drop(st);
        self.inner.returned.notify_all();
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> PoolStats {
        let st = self.inner.state.lock();
        PoolStats {
            hits: self.inner.hits.load(Ordering::Relaxed),
            misses: self.inner.misses.load(Ordering::Relaxed),
            waits: self.inner.waits.load(Ordering::Relaxed),
            allocated_bytes: st.allocated as u64,
            in_use_bytes: st.in_use as u64,
            peak_in_use_bytes: st.peak_in_use as u64,
            budget_bytes: self.inner.budget as u64,
        }
    }
}

/// The class that holds `min_len` bytes, or why none does.
fn class_for(min_len: usize) -> Result<SizeClass, Error> {
    SizeClass::for_len(min_len).ok_or_else(|| {
        Error::Config(format!(
            "buffer of {min_len} bytes exceeds the largest pool class"
        ))
    })
}

/// A buffer borrowed from a [`BufferPool`]; returns itself on drop.
#[derive(Debug)]
pub struct PooledBuf {
    buf: Vec<u8>,
    class: SizeClass,
    pool: BufferPool,
}

impl PooledBuf {
    /// The size class the buffer came from.
    pub fn class(&self) -> SizeClass {
        self.class
    }
}

impl std::ops::Deref for PooledBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.buf
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        self.pool
            .give_back(std::mem::take(&mut self.buf), self.class);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_buffers_and_counts_hits() {
        let pool = BufferPool::new(MIN_BUDGET).unwrap();
        drop(pool.acquire(100).unwrap());
        let b = pool.acquire(4096).unwrap();
        assert_eq!(b.class(), SizeClass::Small);
        assert!(b.capacity() >= 4096);
        let s = pool.stats();
        assert_eq!((s.hits, s.misses), (1, 1));
    }

    #[test]
    fn acquire_many_takes_all_or_waits_holding_none() {
        let pool = BufferPool::new(MIN_BUDGET).unwrap();
        let large = SizeClass::Large.capacity();
        assert!(pool.acquire_many(5, large).is_err(), "more than the budget");
        let one = pool.acquire(large).unwrap();
        let waiter = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.acquire_many(4, large).map(|v| v.len()))
        };
        std::thread::sleep(Duration::from_millis(50));
        // Three would fit, but the waiter takes none of them while it cannot have all four.
        let s = pool.stats();
        assert_eq!(s.in_use_bytes, large as u64);
        assert!(!waiter.is_finished());
        drop(one);
        assert_eq!(waiter.join().unwrap().unwrap(), 4);
        let s = pool.stats();
        assert_eq!(s.in_use_bytes, 0);
        assert!(s.allocated_bytes <= s.budget_bytes);
        // The four are idle now: taking them again reuses them.
        let again = pool.acquire_many(4, large).unwrap();
        assert_eq!(again.len(), 4);
        assert!(pool.stats().hits >= 4);
    }

    #[test]
    fn budget_blocks_then_releases() {
        let pool = BufferPool::new(MIN_BUDGET).unwrap();
        let held: Vec<_> = (0..4).map(|_| pool.acquire(1 << 20).unwrap()).collect();
        assert!(
            pool.acquire_timeout(1 << 20, Duration::from_millis(20))
                .unwrap()
                .is_none()
        );
        let p2 = pool.clone();
        let t = std::thread::spawn(move || p2.acquire(1 << 20).map(|b| b.capacity()));
        std::thread::sleep(Duration::from_millis(20));
        drop(held);
        assert!(t.join().unwrap().unwrap() >= 1 << 20);
        let s = pool.stats();
        assert!(s.waits >= 1);
        assert!(s.allocated_bytes <= s.budget_bytes);
        assert_eq!(s.in_use_bytes, 0);
    }

    #[test]
    fn idle_buffers_of_other_classes_are_released_for_room() {
        let pool = BufferPool::new(MIN_BUDGET).unwrap();
        let smalls: Vec<_> = (0..(MIN_BUDGET / SizeClass::Small.capacity()))
            .map(|_| pool.acquire(1).unwrap())
            .collect();
        drop(smalls);
        let big = pool.acquire(1 << 20).unwrap();
        assert_eq!(big.class(), SizeClass::Large);
        assert!(pool.stats().allocated_bytes <= MIN_BUDGET as u64);
    }

    #[test]
    fn oversize_requests_are_refused() {
        let pool = BufferPool::new(MIN_BUDGET).unwrap();
        assert!(matches!(pool.acquire(8 << 20), Err(Error::Config(_))));
    }
}
