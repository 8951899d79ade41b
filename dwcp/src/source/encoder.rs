//! The page encoder of a migration and the measurements taken before it starts.

use std::time::{Duration, Instant};

use dwcp_core::digest::PageHashes;
use dwcp_core::error::Error;
use dwcp_core::handshake::{CAP_LZ4, CAP_ZSTD};
use dwcp_core::memory::{MemorySource, PAGE_SIZE};
use dwcp_core::pool::{BufferPool, PooledBuf};
use dwcp_hde::{Codec, Encoder, Pass, SessionEncoder};

/// The page encoder of a migration: the complete one (DUP, DELTA, adaptive codecs), or the zero-and-
/// literal one, which costs half the CPU where the link is not the bottleneck.
pub(super) enum PageEncoder {
    Plain(Encoder),
    Session(Box<SessionEncoder>),
}

impl PageEncoder {
    pub(super) fn stats(&self) -> dwcp_hde::EncodeStats {
        match self {
            PageEncoder::Plain(e) => e.stats(),
            PageEncoder::Session(e) => e.stats(),
        }
    }

    pub(super) fn begin_pass(&mut self, pages: Pass<'_>) -> Result<(), Error> {
        match self {
            PageEncoder::Plain(_) => Ok(()),
            PageEncoder::Session(e) => e.begin_pass(pages),
        }
    }

    pub(super) fn end_pass(&mut self) {
        if let PageEncoder::Session(e) = self {
            e.end_pass();
        }
    }

    pub(super) fn set_bandwidth_hint(&self, bytes_per_sec: u64) {
        if let PageEncoder::Session(e) = self {
            e.set_bandwidth_hint(bytes_per_sec);
        }
    }

    pub(super) fn encode_batch(
        &self,
        iteration: u32,
        chunks: &[&[u64]],
        source: &dyn MemorySource,
        pool: &BufferPool,
        hashes: Option<&PageHashes>,
    ) -> Result<Vec<PooledBuf>, Error> {
        match self {
            PageEncoder::Plain(e) => e.encode_batch(iteration, chunks, source, pool, hashes),
            PageEncoder::Session(e) => e.encode_batch(iteration, chunks, source, pool, hashes),
        }
    }
}

/// Pages whose content went on the wire (literal, incompressible, duplicate and delta pages): what a
/// pass's time is charged to in the downtime prediction, since dirtied pages are almost never zero.
pub(super) fn sent_content_pages(s: &dwcp_hde::EncodeStats) -> u64 {
    s.literal_pages + s.dup_pages + s.delta_pages
}

/// The configured codec if the destination decodes it, else no compression (with a warning).
pub(super) fn usable_codec(wanted: Codec, capabilities: u32) -> Codec {
    let needed = match wanted {
        Codec::None => return wanted,
        Codec::Lz4 => CAP_LZ4,
        Codec::Zstd(_) => CAP_ZSTD,
    };
    if capabilities & needed != 0 {
        wanted
    } else {
        tracing::warn!(
            ?wanted,
            "the destination does not decode this codec; sending literal pages uncompressed"
        );
        Codec::None
    }
}

/// How long `f` takes.
pub(super) fn time_it<T>(f: impl FnOnce() -> T) -> Duration {
    let start = Instant::now();
    std::hint::black_box(f());
    start.elapsed()
}

/// Predicts a full pass over source memory from a sample of pages. Hashing memory is bound by memory
/// bandwidth, so more threads barely help: the estimate is per core.
pub(super) fn estimate_full_digest(source: &dyn MemorySource) -> Duration {
    // The guest is running: copy pages out (never hash them in place) to time a sample.
    let total = source.layout().total_pages();
    let sample = total.min(2048);
    let step = (total / sample.max(1)).max(1);
    let mut buf = vec![0u8; PAGE_SIZE];
    let start = Instant::now();
    let mut acc = 0u128;
    for i in 0..sample {
        source.read_page(i * step, &mut buf);
        acc ^= dwcp_core::digest::page_hash(&buf);
    }
    std::hint::black_box(acc);
    start.elapsed().mul_f64(total as f64 / sample.max(1) as f64)
}
