//! The delta cache: the last version of each page the sender sent, for DELTA encoding in later passes.
//! A least-recently-used cache bounded in bytes, split into shards by page number so that the encoding
//! threads rarely wait for each other. Each shard is an exact LRU: a map from page to slot, and a
//! doubly linked list of slots in recency order (indices, no pointers). Page contents live in one
//! contiguous buffer per shard that grows up to the shard's share of the budget and is then reused.

use std::collections::HashMap;

use dwcp_core::memory::PAGE_SIZE;
use parking_lot::Mutex;

use crate::hashers::BuildPageNumber;

const SHARDS: usize = 64;
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Slot {
    page: u64,
    hash: u128,
    pass: u32,
    prev: u32,
    next: u32,
}

#[derive(Debug, Default)]
struct Shard {
    index: HashMap<u64, u32, BuildPageNumber>,
    slots: Vec<Slot>,
    data: Vec<u8>,
    /// Most recently used slot.
    head: u32,
    /// Least recently used slot: the next victim.
    tail: u32,
    capacity: usize,
}

impl Shard {
    fn new(capacity: usize) -> Self {
        Self {
            head: NIL,
            tail: NIL,
            capacity,
            ..Self::default()
        }
    }

    fn unlink(&mut self, s: u32) {
        let Slot { prev, next, .. } = self.slots[s as usize];
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, s: u32) {
        self.slots[s as usize].prev = NIL;
        self.slots[s as usize].next = self.head;
        if self.head != NIL {
            self.slots[self.head as usize].prev = s;
        }
        self.head = s;
        if self.tail == NIL {
            self.tail = s;
        }
    }

    fn bytes(&self, s: u32) -> &[u8] {
        let at = s as usize * PAGE_SIZE;
        &self.data[at..at + PAGE_SIZE]
    }
}

/// Bounded LRU of page versions, keyed by page number.
#[derive(Debug)]
pub(crate) struct DeltaCache {
    shards: Box<[Mutex<Shard>]>,
}

/// A cached version of a page.
pub(crate) struct Cached<'a> {
    pub bytes: &'a [u8],
    pub hash: u128,
    pub pass: u32,
}

impl DeltaCache {
    /// A cache holding at most `budget_bytes` of page contents (rounded down to whole pages per shard).
    pub fn new(budget_bytes: usize) -> Self {
        let pages = budget_bytes / PAGE_SIZE;
        let shards = (0..SHARDS)
            .map(|i| Mutex::new(Shard::new(pages / SHARDS + usize::from(i < pages % SHARDS))))
            .collect();
        Self { shards }
    }

    fn shard(&self, page: u64) -> &Mutex<Shard> {
        &self.shards[page as usize % SHARDS]
    }

    /// Runs `f` on the cached version of `page`, marking it most recently used; `None` if absent.
    pub fn with<R>(&self, page: u64, f: impl FnOnce(Cached<'_>) -> R) -> Option<R> {
        let mut shard = self.shard(page).lock();
        let s = *shard.index.get(&page)?;
        shard.unlink(s);
        shard.push_front(s);
        let slot = shard.slots[s as usize];
        Some(f(Cached {
            bytes: shard.bytes(s),
            hash: slot.hash,
            pass: slot.pass,
        }))
    }

    /// Stores `bytes` as the version of `page` sent in `pass`, evicting the least recently used page
    /// of the shard if it is full.
    pub fn insert(&self, page: u64, bytes: &[u8], hash: u128, pass: u32) {
        let mut shard = self.shard(page).lock();
        let s = if let Some(&s) = shard.index.get(&page) {
            shard.unlink(s);
            s
        } else if shard.slots.len() < shard.capacity {
            let s = shard.slots.len() as u32;
            shard.slots.push(Slot {
                page,
                hash,
                pass,
                prev: NIL,
                next: NIL,
            });
            let len = shard.data.len();
            shard.data.resize(len + PAGE_SIZE, 0);
            shard.index.insert(page, s);
            s
        } else if shard.tail != NIL {
            let s = shard.tail;
            shard.unlink(s);
            let victim = shard.slots[s as usize].page;
            shard.index.remove(&victim);
            shard.index.insert(page, s);
            s
        } else {
            return; // A shard with no capacity: caching is off.
        };
        let slot = &mut shard.slots[s as usize];
        slot.page = page;
        slot.hash = hash;
        slot.pass = pass;
        let at = s as usize * PAGE_SIZE;
        shard.data[at..at + PAGE_SIZE].copy_from_slice(bytes);
        shard.push_front(s);
    }

    /// Forgets `page` (its receiver copy no longer matches anything cached).
    pub fn remove(&self, page: u64) {
        let mut shard = self.shard(page).lock();
        if let Some(s) = shard.index.remove(&page) {
            // The slot moves to the tail without a page, so it is the next one reused.
            shard.unlink(s);
            let tail = shard.tail;
            shard.slots[s as usize].prev = tail;
            shard.slots[s as usize].next = NIL;
            match tail {
                NIL => shard.head = s,
                t => shard.slots[t as usize].next = s,
            }
            shard.tail = s;
            shard.slots[s as usize].page = u64::MAX;
        }
    }

    /// Pages currently cached.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().index.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(v: u8) -> Vec<u8> {
        vec![v; PAGE_SIZE]
    }

    #[test]
    fn least_recently_used_is_evicted_and_budget_holds() {
        // 2 pages per shard; pages 0, 64, 128 share shard 0.
        let cache = DeltaCache::new(2 * SHARDS * PAGE_SIZE);
        cache.insert(0, &page(1), 1, 1);
        cache.insert(64, &page(2), 2, 1);
        assert_eq!(cache.with(0, |c| c.bytes[0]), Some(1)); // 0 is now most recent
        cache.insert(128, &page(3), 3, 2);
        assert!(
            cache.with(64, |_| ()).is_none(),
            "64 was the least recently used"
        );
        assert_eq!(cache.with(0, |c| (c.hash, c.pass)), Some((1, 1)));
        assert_eq!(cache.with(128, |c| c.bytes[4095]), Some(3));
        cache.insert(0, &page(9), 9, 3);
        assert_eq!(
            cache.with(0, |c| (c.bytes[7], c.hash, c.pass)),
            Some((9, 9, 3))
        );
        assert_eq!(cache.len(), 2);
        cache.remove(0);
        assert!(cache.with(0, |_| ()).is_none());
        cache.insert(192, &page(4), 4, 3);
        cache.insert(256, &page(5), 5, 3);
        assert!(
            cache.with(128, |_| ()).is_none(),
            "the freed slot was used first, then 128"
        );
        assert_eq!(cache.len(), 2);
        assert!(cache.shards[0].lock().data.len() <= 2 * PAGE_SIZE);
    }

    #[test]
    fn a_zero_budget_caches_nothing() {
        let cache = DeltaCache::new(0);
        cache.insert(5, &page(1), 1, 1);
        assert!(cache.with(5, |_| ()).is_none());
    }
}
