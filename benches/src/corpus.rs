//! The three corpora of the HDE benchmark (issue 3), generated deterministically from [`SEED`]:
//!
//! * **idle**: an idle guest, 90% zero pages, 2% duplicates of other pages, 6% text-like, 2% random;
//! * **busy**: 30% zero, 10% duplicates (copies of a non-zero page anywhere before them), 40%
//!   text-like, 20% random;
//! * **second**: second-iteration pages. A base memory of busy-mix non-zero pages (2/3 text-like, 1/3
//!   random, no zero or duplicate pages) and the same pages after a guest changed 5 to 10% of each
//!   page's bytes (uniformly per page) by scattered writes of 1 to 8 bytes at random offsets. The new
//!   bytes are random: the worst case for compressing the changes.
//!
//! Zero pages come in runs (as in real guests, where unused memory is contiguous); the other classes
//! are drawn per page.
//!
//! [`SEED`]: crate::SEED

use dwcp_core::GuestRam;
use dwcp_core::memory::{MemoryLayout, MemorySink, MemorySource, PAGE_SIZE};
use dwcp_core::sim::fill_text;
use rand::{Rng, RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::SEED;

/// Fractions of a page mix; the remainder is text-like.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    /// Zero pages.
    pub zero: f64,
    /// Copies of an earlier non-zero page.
    pub duplicate: f64,
    /// Random (incompressible) pages.
    pub random: f64,
}

/// The idle-guest mix: 90% zero, 2% duplicate, 2% random, 6% text.
pub const IDLE: Mix = Mix {
    zero: 0.90,
    duplicate: 0.02,
    random: 0.02,
};
/// The busy mix: 30% zero, 10% duplicate, 20% random, 40% text.
pub const BUSY: Mix = Mix {
    zero: 0.30,
    duplicate: 0.10,
    random: 0.20,
};

fn preallocated(bytes: u64) -> GuestRam {
    let layout = MemoryLayout::flat(bytes).expect("a valid layout");
    GuestRam::anonymous_preallocated(layout).expect("allocating benchmark memory")
}

/// Memory of `bytes` filled with `mix`.
pub fn mixed(bytes: u64, mix: Mix, seed: u64) -> GuestRam {
    let ram = preallocated(bytes);
    let pages = ram.layout().total_pages();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ SEED);
    let mut page = vec![0u8; PAGE_SIZE];
    let mut non_zero: Vec<u64> = Vec::new();
    // Zero pages come in runs of 1 to 32 (mean 16.5): a run starts with the probability that makes
    // the page fraction `mix.zero`.
    const MEAN_RUN: f64 = 16.5;
    let start_run = mix.zero / (MEAN_RUN * (1.0 - mix.zero) + mix.zero);
    let rest = 1.0 - mix.zero;
    let mut zero_left = 0u32;
    for p in 0..pages {
        if zero_left > 0 {
            zero_left -= 1;
            continue;
        }
        let x: f64 = rng.random();
        if x < start_run {
            zero_left = rng.random_range(0..32);
            continue;
        }
        let x = (x - start_run) / (1.0 - start_run);
        if x < mix.duplicate / rest && !non_zero.is_empty() {
            let from = non_zero[rng.random_range(0..non_zero.len())];
            MemorySource::read_page(&ram, from, &mut page);
        } else if x < (mix.duplicate + mix.random) / rest {
            rng.fill_bytes(&mut page);
        } else {
            fill_text(&mut rng, &mut page);
        }
        ram.write_page(p, &page);
        non_zero.push(p);
    }
    ram
}

/// The idle-guest corpus.
pub fn idle(bytes: u64) -> GuestRam {
    mixed(bytes, IDLE, 1)
}

/// The busy-mix corpus.
pub fn busy(bytes: u64) -> GuestRam {
    mixed(bytes, BUSY, 2)
}

/// Changes 5 to 10% of the bytes of `page` by scattered writes of 1 to 8 random bytes.
pub fn change_page(page: &mut [u8], rng: &mut impl RngCore) {
    let fraction = 0.05 + 0.05 * (rng.next_u32() as f64 / u32::MAX as f64);
    let mut changed = vec![false; page.len()];
    let target = (page.len() as f64 * fraction) as usize;
    let mut count = 0;
    while count < target {
        let len = 1 + (rng.next_u32() % 8) as usize;
        let at = (rng.next_u32() as usize) % (page.len() - len);
        for i in at..at + len {
            let mut b = rng.next_u32() as u8;
            if b == page[i] {
                b ^= 0x5a; // a write that changes nothing does not count
            }
            page[i] = b;
            if !changed[i] {
                changed[i] = true;
                count += 1;
            }
        }
    }
}

/// The second-iteration corpus: (base, changed), both of `bytes`.
pub fn second_iteration(bytes: u64) -> (GuestRam, GuestRam) {
    let base = preallocated(bytes);
    let changed = preallocated(bytes);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(3 ^ SEED);
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..base.layout().total_pages() {
        if rng.random_range(0..3) == 0 {
            rng.fill_bytes(&mut page);
        } else {
            fill_text(&mut rng, &mut page);
        }
        base.write_page(p, &page);
        change_page(&mut page, &mut rng);
        changed.write_page(p, &page);
    }
    (base, changed)
}

/// Writes the memory's bytes to `path` (the input of the command-line compressors).
pub fn write_file(ram: &GuestRam, path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..ram.layout().total_pages() {
        MemorySource::read_page(ram, p, &mut page);
        file.write_all(&page)?;
    }
    file.flush()
}
