//! The dedup index: content hash → the page that held that content when it was last sent, and the
//! pass it was sent in. An entry is usable as a DUP source only while the session encoder's per-page
//! record says the page has not been announced for any pass since (see `SessionEncoder`), so stale
//! entries are harmless; they are swept out when a shard fills up. Bounded by a number of entries
//! (about 40 bytes each).

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::hashers::BuildPrehashed;

const SHARDS: usize = 16;

/// Content hash → (page, pass), sharded by hash.
#[derive(Debug)]
pub(crate) struct DedupIndex {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<u128, (u64, u32), BuildPrehashed>,
    /// Inserts refused since the last sweep: a sweep costs a pass over the shard, so it runs only
    /// after an eighth of the shard's capacity was refused (amortised O(8) per insert).
    refused: usize,
}

impl DedupIndex {
    /// An index of at most `max_entries` entries (0 disables it).
    pub fn new(max_entries: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: max_entries.div_ceil(SHARDS),
        }
    }

    fn shard(&self, hash: u128) -> &Mutex<Shard> {
        &self.shards[(hash >> 64) as usize % SHARDS]
    }

    /// The page and pass recorded for `hash`.
    pub fn get(&self, hash: u128) -> Option<(u64, u32)> {
        self.shard(hash).lock().map.get(&hash).copied()
    }

    /// Records that `page` was sent with content `hash` in `pass`. When the shard is full, entries that
    /// `still_valid` rejects are swept first; if that frees too little, the entry is not recorded.
    pub fn insert(&self, hash: u128, page: u64, pass: u32, still_valid: impl Fn(u64, u32) -> bool) {
        if self.per_shard == 0 {
            return;
        }
        let mut shard = self.shard(hash).lock();
        if shard.map.len() >= self.per_shard && !shard.map.contains_key(&hash) {
            if shard.refused < self.per_shard / 8 {
                shard.refused += 1;
                return;
            }
            shard.refused = 0;
            shard.map.retain(|_, &mut (p, s)| still_valid(p, s));
            if shard.map.len() >= self.per_shard {
                return;
            }
        }
        shard.map.insert(hash, (page, pass));
    }

    /// Entries currently held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_shards_sweep_stale_entries_and_stay_bounded() {
        let index = DedupIndex::new(SHARDS * 8);
        // Hashes whose high half is 0 all land in shard 0.
        for h in 0..8u128 {
            index.insert(h, h as u64, 1, |_, _| true);
        }
        assert_eq!(index.len(), 8);
        index.insert(100, 100, 2, |_, _| true);
        assert!(
            index.get(100).is_none(),
            "a full shard of valid entries refuses more"
        );
        index.insert(100, 100, 2, |page, _| page >= 4);
        assert_eq!(index.get(100), Some((100, 2)));
        assert!(index.get(0).is_none());
        assert!(index.len() <= 8);
        let off = DedupIndex::new(0);
        off.insert(1, 1, 1, |_, _| true);
        assert!(off.get(1).is_none());
    }
}
