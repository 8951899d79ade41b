//! Post-copy: the destination runs the VM before it has all of its memory, and fetches each missing
//! page when the guest touches it, while the source pushes the rest in the background.
//!
//! Pre-copy that cannot converge ends here instead of failing: the source pauses the guest and sends
//! the set of pages the destination does not yet have right (the pages dirtied since they were last
//! sent); from then on the destination owns the VM. Two machines decide everything:
//!
//! - [`PostcopySource`] holds the set, serves the destination's page requests first (urgent
//!   stream), and otherwise walks the set in order (background stream). After a lost connection
//!   it takes the destination's word for what is still missing and starts again from there.
//! - [`PostcopyDest`] tracks what is missing. A guest fault on a missing page becomes one request
//!   (another fault on the same page waits for the same answer); a fault on a page outside the set
//!   is a page pre-copy never wrote because it was zero, filled locally. The first copy of a page
//!   to arrive is placed, any later one is dropped. After a reconnect it re-sends what is missing
//!   and re-requests the pages its guest still waits for.
//!
//! Both sides fold the pages moved into a [`SetDigest`], so the source can check, at the end, that
//! the destination placed exactly what it had.
//!
//! Like the rest of this crate, no sockets, threads or clocks: times come in as nanoseconds from the
//! caller. The I/O shell (userfaultfd, streams) is the `dwcp-postcopy` crate.

mod dest;
mod pages;
mod source;
pub mod wire;

pub use dest::{FaultDecision, Placement, PostcopyDest, PostcopyDestStats};
pub use pages::PageSet;
pub use source::PostcopySource;

use dwcp_core::hash::xxh3_128;

/// An order-independent digest of the contents of a set of pages: the wrapping sum, over the pages,
/// of xxh3-128(page number LE ‖ xxh3-128 of the page's bytes LE). Tied to each page's position, so
/// two pages swapped change it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SetDigest(u128);

impl SetDigest {
    /// Adds one page, given the xxh3-128 of its bytes (`dwcp_core::digest::page_hash`).
    pub fn add(&mut self, page: u64, page_hash: u128) {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&page.to_le_bytes());
        b[8..].copy_from_slice(&page_hash.to_le_bytes());
        self.0 = self.0.wrapping_add(xxh3_128(&b));
    }

    /// Adds another digest's pages (the two sets must not share a page).
    pub fn merge(&mut self, other: SetDigest) {
        self.0 = self.0.wrapping_add(other.0);
    }

    /// The value that travels in PostcopyComplete.
    pub fn value(self) -> u128 {
        self.0
    }
}

#[cfg(test)]
mod tests;
