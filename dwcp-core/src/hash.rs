//! The XXH3 hashes of the wire protocol (frame checksums) and of the memory digest (page hashes),
//! in one place.
//!
//! They come from `twox-hash`, which picks its AVX2 or SSE2 loop at run time: the data path hashes
//! every byte about four times (a page hash and a frame checksum on each side), and on the
//! x86-64 baseline build `xxhash-rust` only has its SSE2 loop (measured here: 23 against 27-29 GB/s
//! one-shot, 14 against 21 GB/s streaming). The values are XXH3's, whichever crate computes them; the
//! tests below pin them against `xxhash-rust`.

use std::hash::Hasher;

use twox_hash::{XxHash3_64, XxHash3_128};

/// XXH3-64 of `data`.
pub fn xxh3_64(data: &[u8]) -> u64 {
    XxHash3_64::oneshot(data)
}

/// XXH3-64 of `data` with `seed`.
pub fn xxh3_64_with_seed(data: &[u8], seed: u64) -> u64 {
    XxHash3_64::oneshot_with_seed(seed, data)
}

/// XXH3-128 of `data`.
pub fn xxh3_128(data: &[u8]) -> u128 {
    XxHash3_128::oneshot(data)
}

/// XXH3-64 over several slices, as if they were one.
pub struct Xxh3Stream(XxHash3_64);

impl Xxh3Stream {
    /// A hasher with `seed`.
    pub fn with_seed(seed: u64) -> Self {
        Self(XxHash3_64::with_seed(seed))
    }

    /// Hashes `data` after what came before.
    pub fn update(&mut self, data: &[u8]) {
        self.0.write(data);
    }

    /// The hash of everything so far.
    pub fn digest(&self) -> u64 {
        self.0.finish()
    }
}

impl std::fmt::Debug for Xxh3Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Xxh3Stream")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The values are XXH3's: the same as the reference implementation's, on every length class
        /// (0, 1-3, 4-8, 9-16, 17-128, 129-240, longer, and across stripe and block boundaries).
        #[test]
        fn equal_to_the_reference_implementation(
            data in proptest::collection::vec(any::<u8>(), 0..5000),
            split in any::<prop::sample::Index>(),
            seed: u64,
        ) {
            use xxhash_rust::xxh3 as reference;
            prop_assert_eq!(xxh3_64(&data), reference::xxh3_64(&data));
            prop_assert_eq!(xxh3_64_with_seed(&data, seed), reference::xxh3_64_with_seed(&data, seed));
            prop_assert_eq!(xxh3_128(&data), reference::xxh3_128(&data));
            let at = split.index(data.len() + 1);
            let mut s = Xxh3Stream::with_seed(seed);
            s.update(&data[..at]);
            s.update(&data[at..]);
            prop_assert_eq!(s.digest(), reference::xxh3_64_with_seed(&data, seed));
        }
    }

    #[test]
    fn long_inputs_match_too() {
        let data: Vec<u8> = (0..(1usize << 20) + 77)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        use xxhash_rust::xxh3 as reference;
        assert_eq!(
            xxh3_64_with_seed(&data, 9),
            reference::xxh3_64_with_seed(&data, 9)
        );
        assert_eq!(xxh3_128(&data[..4096]), reference::xxh3_128(&data[..4096]));
        let mut s = Xxh3Stream::with_seed(9);
        s.update(&data[..8]);
        s.update(&data[8..]);
        assert_eq!(s.digest(), reference::xxh3_64_with_seed(&data, 9));
    }
}
