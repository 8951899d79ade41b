//! The destination's rule for applying pages that arrive over several streams: a page is written only if
//! its iteration is at least the iteration already applied, so an old copy overtaken by a newer one on
//! another stream is dropped instead of overwriting it. Pure bookkeeping, no I/O.

use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::Mutex;

const STRIPES: usize = 1024;

/// What [`PageVersions::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The page was written.
    Written,
    /// A newer version was already applied; this one was dropped.
    Stale,
}

/// Per-page record of the newest iteration applied.
#[derive(Debug)]
pub struct PageVersions {
    // 0: never written; k + 1: iteration k applied.
    versions: Vec<AtomicU32>,
    stripes: Vec<Mutex<()>>,
}

impl PageVersions {
    /// Tracking for `pages` pages, none applied yet.
    pub fn new(pages: u64) -> Self {
        Self {
            versions: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Runs `write` if `iteration` is not older than what page `page` holds, and records it. `write` is
    /// told the iteration applied before (`None`: the page was never written). Two calls for the same page
    /// never run `write` concurrently.
    pub fn apply(&self, page: u64, iteration: u32, write: impl FnOnce(Option<u32>)) -> Applied {
        let slot = &self.versions[page as usize];
        let _guard = self.stripes[page as usize % STRIPES].lock();
        let tagged = iteration.saturating_add(1);
        let previous = slot.load(Ordering::Relaxed);
        if previous > tagged {
            return Applied::Stale;
        }
        write(previous.checked_sub(1));
        slot.store(tagged, Ordering::Relaxed);
        Applied::Written
    }

    /// Pages never written.
    pub fn missing(&self) -> u64 {
        self.versions
            .iter()
            .filter(|v| v.load(Ordering::Relaxed) == 0)
            .count() as u64
    }

    /// The newest iteration applied to `page`, if any.
    pub fn version(&self, page: u64) -> Option<u32> {
        match self.versions[page as usize].load(Ordering::Relaxed) {
            0 => None,
            v => Some(v - 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn newer_wins_regardless_of_arrival_order() {
        let v = PageVersions::new(4);
        let mut page = 0u32;
        assert_eq!(
            v.apply(1, 2, |prev| {
                assert_eq!(prev, None);
                page = 2
            }),
            Applied::Written
        );
        assert_eq!(v.apply(1, 1, |_| page = 1), Applied::Stale);
        assert_eq!(page, 2);
        assert_eq!(
            v.apply(1, 2, |prev| {
                assert_eq!(prev, Some(2));
                page = 22
            }),
            Applied::Written,
            "a resend of the same iteration is idempotent"
        );
        assert_eq!(v.version(1), Some(2));
        assert_eq!(v.missing(), 3);
    }

    proptest! {
        /// Any arrival order of (page, iteration) copies leaves each page at its newest iteration.
        #[test]
        fn final_state_is_the_newest_copy(mut sends in proptest::collection::vec((0u64..16, 0u32..8), 1..200), seed: u64) {
            let v = PageVersions::new(16);
            let mut memory = [None::<u32>; 16];
            // Shuffle deterministically from the seed.
            let mut s = seed | 1;
            for i in (1..sends.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                sends.swap(i, (s % (i as u64 + 1)) as usize);
            }
            for &(p, it) in &sends {
                v.apply(p, it, |_| memory[p as usize] = Some(it));
            }
            for p in 0..16u64 {
                let newest = sends.iter().filter(|s| s.0 == p).map(|s| s.1).max();
                prop_assert_eq!(memory[p as usize], newest);
            }
        }
    }
}
