//! The whole-memory digest compared by source and destination before the handover.
//!
//! digest = xxh3-128 over the segment digests in order; a segment digest is xxh3-128 over the
//! little-endian xxh3-128 hashes of its pages (65,536 pages per segment, the last one shorter). The value
//! depends only on the memory contents, never on how many threads computed it.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::hash::xxh3_128;

use crate::memory::ZERO_PAGE;

/// Hash of an all-zero page.
pub static ZERO_PAGE_HASH: LazyLock<u128> = LazyLock::new(|| xxh3_128(&ZERO_PAGE));

/// Hash of one page's bytes, as used by the digest.
pub fn page_hash(page: &[u8]) -> u128 {
    xxh3_128(page)
}

/// Per-page hashes recorded while pages are hot in cache (when encoded on the source, right after being
/// written on the destination), so that the digest at pause time only folds this table instead of
/// reading all of memory again. 16 bytes per page.
#[derive(Debug)]
pub struct PageHashes {
    words: Vec<AtomicU64>,
}

impl PageHashes {
    /// A table for `pages` pages, each initially the hash of a zero page.
    pub fn new(pages: u64) -> Self {
        let z = *ZERO_PAGE_HASH;
        let (lo, hi) = (z as u64, (z >> 64) as u64);
        Self {
            words: (0..pages * 2)
                .map(|i| AtomicU64::new(if i % 2 == 0 { lo } else { hi }))
                .collect(),
        }
    }

    /// Records the hash of `page`. Concurrent calls for the same page must not happen (the engine
    /// guarantees one writer per page at a time); concurrent calls for different pages are fine.
    pub fn set(&self, page: u64, hash: u128) {
        let i = page as usize * 2;
        self.words[i].store(hash as u64, Ordering::Relaxed);
        self.words[i + 1].store((hash >> 64) as u64, Ordering::Relaxed);
    }

    /// The recorded hash of `page`.
    pub fn get(&self, page: u64) -> u128 {
        let i = page as usize * 2;
        u128::from(self.words[i].load(Ordering::Relaxed))
            | u128::from(self.words[i + 1].load(Ordering::Relaxed)) << 64
    }

    /// Pages in the table.
    pub fn pages(&self) -> u64 {
        self.words.len() as u64 / 2
    }

    /// The whole-memory digest of the recorded hashes.
    pub fn digest(&self, threads: usize) -> u128 {
        memory_digest(self.pages(), threads, &|p| self.get(p))
    }
}

/// Pages per digest segment.
pub const SEGMENT_PAGES: u64 = 65_536;

/// Computes the digest of `total_pages` pages whose hashes `page_digest` returns, on `threads` threads.
pub fn memory_digest(
    total_pages: u64,
    threads: usize,
    page_digest: &(dyn Fn(u64) -> u128 + Sync),
) -> u128 {
    let segments = total_pages.div_ceil(SEGMENT_PAGES);
    let mut seg_digests = vec![0u128; segments as usize];
    let threads = threads.clamp(1, segments.max(1) as usize);
    let per_thread = (segments as usize).div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (t, out) in seg_digests.chunks_mut(per_thread).enumerate() {
            s.spawn(move || {
                let mut bytes = Vec::with_capacity(SEGMENT_PAGES as usize * 16);
                for (i, slot) in out.iter_mut().enumerate() {
                    let seg = (t * per_thread + i) as u64;
                    let first = seg * SEGMENT_PAGES;
                    let end = (first + SEGMENT_PAGES).min(total_pages);
                    bytes.clear();
                    for p in first..end {
                        bytes.extend_from_slice(&page_digest(p).to_le_bytes());
                    }
                    *slot = xxh3_128(&bytes);
                }
            });
        }
    });
    let bytes: Vec<u8> = seg_digests.iter().flat_map(|d| d.to_le_bytes()).collect();
    xxh3_128(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_hashes_fold_like_a_full_pass() {
        let t = PageHashes::new(5);
        assert_eq!(t.digest(1), memory_digest(5, 2, &|_| *ZERO_PAGE_HASH));
        t.set(3, page_hash(&[1u8; 4096]));
        assert_eq!(t.get(3), page_hash(&[1u8; 4096]));
        assert_eq!(
            t.digest(2),
            memory_digest(5, 1, &|p| if p == 3 {
                page_hash(&[1u8; 4096])
            } else {
                *ZERO_PAGE_HASH
            })
        );
    }

    #[test]
    fn digest_is_independent_of_threads_and_sensitive_to_content() {
        let pages = SEGMENT_PAGES * 2 + 17;
        let f = |p: u64| (p as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let d1 = memory_digest(pages, 1, &f);
        assert_eq!(d1, memory_digest(pages, 3, &f));
        assert_eq!(d1, memory_digest(pages, 64, &f));
        let g = |p: u64| if p == pages - 1 { 1 } else { f(p) };
        assert_ne!(d1, memory_digest(pages, 2, &g));
    }
}
