//! The destination's record of which chunks it has applied, so that a chunk re-sent after a stream
//! failure (its first copy may have been applied even though the acknowledgement was lost) is applied
//! at most once. Chunk ids are dense (0, 1, 2, ...) per session; the ledger keeps a watermark below
//! which every id is done plus the few ids above it that arrived early, so its memory stays small
//! however long the session runs. Pure bookkeeping, no I/O.

use std::collections::{BTreeSet, HashSet};

use parking_lot::Mutex;

use crate::error::FrameError;

/// Ids that may be recorded above the watermark before the peer is considered hostile: a sender has
/// at most a few in-flight windows of chunks outstanding, far fewer than this.
pub const MAX_OUT_OF_ORDER: usize = 1 << 20;

/// What [`ChunkLedger::claim`] decided about a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First copy: apply it.
    New,
    /// Already claimed by an earlier copy: acknowledge it, do not apply it again.
    Duplicate,
}

#[derive(Debug, Default)]
struct State {
    /// Every id below this has been claimed.
    watermark: u64,
    /// Claimed ids above the watermark.
    above: BTreeSet<u64>,
    /// Claimed ids whose copy is being applied right now.
    in_progress: HashSet<u64>,
}

/// Which chunk ids have been claimed (and finished applying).
#[derive(Debug, Default)]
pub struct ChunkLedger {
    state: Mutex<State>,
}

impl ChunkLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims chunk `id` for applying. A [`Claim::New`] must be followed by [`complete`](Self::complete)
    /// once the chunk's pages are applied (or the session is ending).
    pub fn claim(&self, id: u64) -> Result<Claim, FrameError> {
        let mut st = self.state.lock();
        if id < st.watermark || st.above.contains(&id) {
            return Ok(Claim::Duplicate);
        }
        if id == st.watermark {
            st.watermark += 1;
            while st.above.first() == Some(&st.watermark) {
                st.above.pop_first();
                st.watermark += 1;
            }
        } else {
            if st.above.len() >= MAX_OUT_OF_ORDER {
                return Err(FrameError::Malformed {
                    what: "Data",
                    why: format!(
                        "chunk {id} arrived while {} chunks above {} are still missing",
                        MAX_OUT_OF_ORDER, st.watermark
                    ),
                });
            }
            st.above.insert(id);
        }
        st.in_progress.insert(id);
        Ok(Claim::New)
    }

    /// Marks claimed chunk `id` as fully applied.
    pub fn complete(&self, id: u64) {
        self.state.lock().in_progress.remove(&id);
    }

    /// Whether the copy of `id` that claimed it is still being applied.
    pub fn is_applying(&self, id: u64) -> bool {
        self.state.lock().in_progress.contains(&id)
    }

    /// Whether exactly the ids `0..count` have been claimed and every claimed chunk is applied.
    pub fn is_complete(&self, count: u64) -> bool {
        let st = self.state.lock();
        st.watermark == count && st.above.is_empty() && st.in_progress.is_empty()
    }

    /// Distinct chunks claimed so far.
    pub fn claimed(&self) -> u64 {
        let st = self.state.lock();
        st.watermark + st.above.len() as u64
    }

    /// Chunks claimed but not yet completed.
    pub fn in_progress(&self) -> u64 {
        self.state.lock().in_progress.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any arrival order with any duplicates: each id is `New` exactly once, and the ledger is
        /// complete exactly when every id has arrived and been completed.
        #[test]
        fn each_chunk_is_new_exactly_once(order in Just((0u64..200).collect::<Vec<_>>()).prop_shuffle(), dups in proptest::collection::vec(0u64..200, 0..100)) {
            let ledger = ChunkLedger::new();
            let mut news = vec![0u32; 200];
            let arrivals: Vec<u64> = order.iter().copied().chain(dups.iter().copied()).collect();
            for (i, id) in arrivals.iter().enumerate() {
                if ledger.claim(*id).unwrap() == Claim::New {
                    news[*id as usize] += 1;
                    ledger.complete(*id);
                }
                prop_assert_eq!(ledger.is_complete(200), i + 1 >= order.len());
            }
            prop_assert!(news.iter().all(|&n| n == 1));
            prop_assert_eq!(ledger.claimed(), 200);
            prop_assert!(!ledger.is_complete(199));
            prop_assert!(!ledger.is_complete(201));
        }
    }

    #[test]
    fn incomplete_while_a_claimed_chunk_is_being_applied() {
        let ledger = ChunkLedger::new();
        assert_eq!(ledger.claim(0).unwrap(), Claim::New);
        assert!(!ledger.is_complete(1));
        assert!(ledger.is_applying(0));
        assert_eq!(ledger.claim(0).unwrap(), Claim::Duplicate);
        ledger.complete(0);
        assert!(!ledger.is_applying(0));
        assert!(ledger.is_complete(1));
    }

    #[test]
    fn a_flood_of_far_ids_is_refused_without_unbounded_memory() {
        let ledger = ChunkLedger::new();
        for id in 1..=MAX_OUT_OF_ORDER as u64 {
            assert_eq!(ledger.claim(id).unwrap(), Claim::New);
        }
        assert!(ledger.claim(u64::MAX).is_err());
        // The missing first chunk closes the gap at once.
        assert_eq!(ledger.claim(0).unwrap(), Claim::New);
        assert_eq!(ledger.claimed(), MAX_OUT_OF_ORDER as u64 + 1);
        assert_eq!(ledger.claim(u64::MAX).unwrap(), Claim::New);
    }
}
