//! HDE, the page encoder of DWCP: turns pages of guest memory into compact chunks and back.
//!
//! Data flow: the engine hands a batch of page lists (one per chunk) to [`Encoder::encode_batch`], which
//! encodes the chunks in parallel on its rayon pool; each page is copied once out of guest memory into
//! the chunk, zero pages are dropped to a one-byte class, and the remaining literal bytes are compressed
//! as a whole (LZ4 or zstd) unless a quick probe shows they will not shrink. The receiver calls
//! [`decode_chunk`], which validates every field against the memory layout before yielding pages.
//! The chunk format is specified in [`chunk`] and in docs/wire-protocol.md.
//!
//! The complete pipeline (issue 3) lives beside it, behind its own API, so that the engine switches in
//! one step: [`SessionEncoder`] adds the DUP and DELTA classes (with a dedup index and a bounded LRU
//! delta cache scoped to the session), the adaptive per-chunk codec choice and zstd dictionaries, and
//! emits the extended chunk format of [`format`]; [`ChunkDecoder`] decodes both formats and resolves
//! DUP/DELTA pages against the receiver's memory through [`ReceiverPages`], after verifying their
//! base hashes. See docs/hde.md.
#![deny(missing_docs)]

mod adaptive;
mod cache;
pub mod chunk;
mod codec;
mod compress;
mod decode;
mod dedup;
pub mod delta;
pub mod dictionary;
pub mod format;
mod hashers;
mod session;

use std::sync::Arc;

use dwcp_core::digest::PageHashes;
use dwcp_core::error::Error;
use dwcp_core::memory::MemorySource;
use dwcp_core::pool::{BufferPool, PooledBuf};
use rayon::prelude::*;

pub use adaptive::CANDIDATES as ADAPTIVE_CANDIDATES;
pub use chunk::{DecodedChunk, MAX_CHUNK_PAGES, PageData};
pub use codec::{Codec, EncodeCounters, EncodeStats, decode_chunk, encode_chunk};
pub use decode::{ChunkDecoder, DecodeError, DecodeScratch, ReceiverPages};
pub use dictionary::Dictionary;
pub use format::{ClassCounts, PageKind, StoredCodec};
pub use session::{
    CodecPolicy, DEFAULT_DEDUP_ENTRIES, DEFAULT_DELTA_CACHE_BYTES, Pass, SessionConfig,
    SessionEncoder,
};

/// A parallel chunk encoder with its own thread pool.
#[derive(Debug)]
pub struct Encoder {
    codec: Codec,
    pool: rayon::ThreadPool,
    counters: Arc<EncodeCounters>,
}

impl Encoder {
    /// An encoder using `codec` on `threads` threads (0: one per core).
    pub fn new(codec: Codec, threads: usize) -> Result<Self, Error> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("hde-encode-{i}"))
            .build()
            .map_err(|e| Error::Config(format!("building the encoder thread pool: {e}")))?;
        Ok(Self {
            codec,
            pool,
            counters: Arc::default(),
        })
    }

    /// The codec in use.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Counters of everything encoded so far.
    pub fn stats(&self) -> EncodeStats {
        self.counters.snapshot()
    }

    /// Encodes one chunk per entry of `chunks` in parallel, into buffers from `buffers`; the output keeps
    /// the input order. Blocks while the pool budget is exhausted. Records page hashes in `hashes` if given.
    pub fn encode_batch(
        &self,
        iteration: u32,
        chunks: &[&[u64]],
        source: &dyn MemorySource,
        buffers: &BufferPool,
        hashes: Option<&PageHashes>,
    ) -> Result<Vec<PooledBuf>, Error> {
        let counters = &*self.counters;
        let codec = self.codec;
        // All the batch's buffers at once: see `BufferPool::acquire_many`.
        let longest = chunks.iter().map(|c| c.len()).max().unwrap_or(0);
        let bound = chunk::max_encoded_len(longest, longest);
        let outs = buffers.acquire_many(chunks.len(), bound)?;
        self.pool.install(|| {
            chunks
                .par_iter()
                .zip(outs)
                .map_init(Vec::new, |scratch, (pages, mut out)| {
                    encode_chunk(
                        codec, iteration, pages, source, &mut out, scratch, counters, hashes,
                    )?;
                    Ok(out)
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod session_tests;
#[cfg(test)]
mod tests;
