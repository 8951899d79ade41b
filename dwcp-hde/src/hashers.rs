//! Hashers for maps whose keys need no SipHash: keys that are already content hashes (xxh3-128),
//! and page numbers. The maps are filled by our own encoder, never by peer input, so flooding
//! resistance buys nothing here and SipHash would cost more than the map operation itself.

use std::hash::{BuildHasherDefault, Hasher};

/// Hasher of `u128` keys that are already uniformly distributed hashes: keeps their low 64 bits.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PrehashedKey(u64);

impl Hasher for PrehashedKey {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not used by u128 keys; fold anything else in case a caller hashes other types.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u128(&mut self, key: u128) {
        self.0 = key as u64;
    }
}

/// Hasher of page numbers: one multiplication by the golden ratio (Fibonacci hashing), so that
/// consecutive pages spread over the table.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PageNumber(u64);

impl Hasher for PageNumber {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, page: u64) {
        self.0 = page.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Build hasher for content-hash keys.
pub(crate) type BuildPrehashed = BuildHasherDefault<PrehashedKey>;
/// Build hasher for page-number keys.
pub(crate) type BuildPageNumber = BuildHasherDefault<PageNumber>;
