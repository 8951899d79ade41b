//! The session encoder: every page class (ZERO, LITERAL, DUP, DELTA), the adaptive codec choice and
//! the optional dictionary, over the whole life of one migration.
//!
//! # Passes and the invariants that make DUP and DELTA safe
//!
//! The engine drives the encoder pass by pass:
//!
//! 1. [`SessionEncoder::begin_pass`] announces every page the pass will send (all pages, or a list).
//! 2. [`SessionEncoder::encode_batch`] encodes chunks of announced pages, each page at most once per
//!    pass, in any number of batches.
//! 3. [`SessionEncoder::end_pass`] once **every chunk of the pass has been applied by the receiver**
//!    (the engine's per-pass acknowledgement barrier).
//!
//! Within a pass, chunks travel on several streams and are applied in any order. Hence:
//!
//! * a DELTA base is the version of the same page sent in an **earlier** pass (the cache records the
//!   pass of each version and refuses the current one);
//! * a DUP source is a page whose content was sent in an earlier pass **and that is not announced in
//!   the current pass** (so no chunk of this pass can change it while the DUP is in flight), or a page
//!   sent earlier **in the same chunk** (the decoder resolves it from the chunk itself).
//!
//! The receiver still verifies the content hash of every DUP source and DELTA base, and refuses the
//! chunk on a mismatch ([`crate::DecodeError::BaseMismatch`]): a broken invariant ends the migration
//! with an error, never with a silently wrong page.
//!
//! Kept whole (about 650 lines): the pass invariants below bind `begin_pass`, `encode_batch` and
//! `end_pass` to the dedup index and delta cache they update; the tests are in `session_tests.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use dwcp_core::digest::{PageHashes, ZERO_PAGE_HASH, page_hash};
use dwcp_core::error::Error;
use dwcp_core::memory::{MemorySource, PAGE_SIZE, is_zero_page};
use dwcp_core::pool::{BufferPool, PooledBuf};
use rayon::prelude::*;

use crate::adaptive::{Chooser, INCOMPRESSIBLE};
use crate::cache::DeltaCache;
use crate::chunk::{MAX_CHUNK_PAGES, begin_chunk, runs_of};
use crate::codec::{Codec, EncodeCounters, EncodeStats};
use crate::compress::{compress, probe_ratio};
use crate::dedup::DedupIndex;
use crate::delta::encode_delta;
use crate::dictionary::Dictionary;
use crate::format::{
    DELTA_RECORD_HEADER_LEN, EXTENDED_HEADER_LEN, HeaderFields, MAX_DELTA_LEN, PageKind,
    StoredCodec, max_extended_len,
};
use crate::hashers::BuildPrehashed;

/// Default byte budget of the delta cache.
pub const DEFAULT_DELTA_CACHE_BYTES: usize = 256 << 20;
/// Default number of entries of the dedup index (enough for 4 GiB of distinct pages).
pub const DEFAULT_DEDUP_ENTRIES: usize = 1 << 20;
/// Compression must save at least this fraction of the section to be kept.
const MIN_SAVING: f64 = 0.03;
/// Sections with fewer literal bytes than this are compressed without a probe first.
const PROBE_MIN_LEN: usize = 3 * PAGE_SIZE;
/// The compressibility assumed for a section that was not probed.
const UNPROBED_RATIO: f64 = 0.6;

/// How the codec of each chunk is chosen.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum CodecPolicy {
    /// Always this codec (incompressible sections still go raw).
    Fixed(Codec),
    /// Per chunk, the codec that minimises the predicted transfer time for the bandwidth hint
    /// ([`SessionEncoder::set_bandwidth_hint`]); `fallback` until a hint is given.
    Adaptive {
        /// The codec used while no bandwidth hint is set.
        fallback: Codec,
    },
}

/// Configuration of a [`SessionEncoder`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SessionConfig {
    /// Codec policy.
    pub codec: CodecPolicy,
    /// Encoder threads (0: one per core).
    pub threads: usize,
    /// Byte budget of the delta cache (0 disables DELTA).
    pub delta_cache_bytes: usize,
    /// Entries of the dedup index (0 disables DUP across chunks; DUP within a chunk stays on).
    pub dedup_entries: usize,
    /// Whether the pages of the first pass enter the delta cache. Off by default, as in QEMU's
    /// XBZRLE: a guest larger than the cache would fill it with whatever pages the first pass sent
    /// last, at the cost of copying (and first touching) up to the whole budget. Worth turning on
    /// for guests smaller than the cache.
    pub cache_first_pass: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            codec: CodecPolicy::Adaptive {
                fallback: Codec::Lz4,
            },
            threads: 0,
            delta_cache_bytes: DEFAULT_DELTA_CACHE_BYTES,
            dedup_entries: DEFAULT_DEDUP_ENTRIES,
            cache_first_pass: false,
        }
    }
}

/// The pages a pass will send.
#[derive(Debug, Clone, Copy)]
pub enum Pass<'a> {
    /// Every page of the layout (the first pass).
    All,
    /// These pages (any order; duplicates are harmless).
    Pages(&'a [u64]),
}

/// Working space of one encoding task.
#[derive(Debug, Default)]
struct ChunkScratch {
    compressed: Vec<u8>,
    probe: Vec<u8>,
    dups: Vec<u8>,
    deltas: Vec<u8>,
    raw_area: Vec<u8>,
    in_chunk: HashMap<u128, u64, BuildPrehashed>,
}

thread_local! {
    /// Working space of the encoding threads, kept warm across batches (about 1.2 MiB per thread:
    /// the compressor output and the record areas of one chunk).
    static SCRATCH: std::cell::RefCell<ChunkScratch> = std::cell::RefCell::default();
}

/// Encoder of one migration session: owns the delta cache, the dedup index, the codec estimates and
/// the encoding thread pool. See the module documentation for the pass protocol.
pub struct SessionEncoder {
    config: SessionConfig,
    /// Built on the first batch, so that a session (or a test) that encodes single chunks spawns no
    /// threads.
    pool: OnceLock<rayon::ThreadPool>,
    threads: usize,
    total_pages: u64,
    /// For each page, the pass that last announced it (0: never).
    announced: Vec<AtomicU32>,
    /// The current pass (1 for the first), or the last one when between passes.
    pass: u32,
    in_pass: bool,
    cache: DeltaCache,
    index: DedupIndex,
    chooser: Chooser,
    dictionary: Option<Arc<Dictionary>>,
    counters: Arc<EncodeCounters>,
    /// Moving average of what compression leaves of sections made mostly of literal pages (bits of
    /// an f64); predicts what a compressible literal page will cost, to decide whether a delta is
    /// worth it.
    section_ratio: AtomicU64,
}

impl std::fmt::Debug for SessionEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionEncoder")
            .field("config", &self.config)
            .field("total_pages", &self.total_pages)
            .field("pass", &self.pass)
            .field("in_pass", &self.in_pass)
            .field("dictionary", &self.dictionary)
            .finish_non_exhaustive()
    }
}

impl SessionEncoder {
    /// An encoder for a memory of `total_pages` pages.
    pub fn new(config: SessionConfig, total_pages: u64) -> Result<Self, Error> {
        let pages = usize::try_from(total_pages)
            .map_err(|_| Error::Config(format!("{total_pages} pages")))?;
        let threads = match config.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Ok(Self {
            chooser: Chooser::new(threads),
            pool: OnceLock::new(),
            threads,
            total_pages,
            announced: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            pass: 0,
            in_pass: false,
            cache: DeltaCache::new(config.delta_cache_bytes),
            index: DedupIndex::new(config.dedup_entries),
            dictionary: None,
            counters: Arc::default(),
            section_ratio: AtomicU64::new(0.5f64.to_bits()),
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Threads of the encoding pool.
    pub fn threads(&self) -> usize {
        self.threads
    }

    fn pool(&self) -> Result<&rayon::ThreadPool, Error> {
        if let Some(pool) = self.pool.get() {
            return Ok(pool);
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.threads)
            .thread_name(|i| format!("hde-encode-{i}"))
            .build()
            .map_err(|e| Error::Config(format!("building the encoder thread pool: {e}")))?;
        Ok(self.pool.get_or_init(|| pool))
    }

    /// Sets the link bandwidth the adaptive policy plans for (bytes per second; 0 clears the hint).
    pub fn set_bandwidth_hint(&self, bytes_per_sec: u64) {
        self.chooser.set_bandwidth(bytes_per_sec);
    }

    /// Uses `dictionary` for zstd from now on (or no dictionary). The receiver must hold the same
    /// dictionary before it decodes the first chunk compressed with it.
    pub fn set_dictionary(&mut self, dictionary: Option<Arc<Dictionary>>) {
        self.dictionary = dictionary;
    }

    /// The dictionary in use.
    pub fn dictionary(&self) -> Option<&Arc<Dictionary>> {
        self.dictionary.as_ref()
    }

    /// Counters of everything encoded so far.
    pub fn stats(&self) -> EncodeStats {
        self.counters.snapshot()
    }

    /// The adaptive policy's current estimates: (codec, input bytes/s on one thread, ratio relative
    /// to the LZ4 probe).
    pub fn codec_estimates(&self) -> Vec<(Codec, f64, f64)> {
        self.chooser.estimates()
    }

    /// Pages held by the delta cache and entries of the dedup index (for memory reports).
    pub fn cache_usage(&self) -> (usize, usize) {
        (self.cache.len(), self.index.len())
    }

    /// The number of the current pass (1 for the first; 0 before any).
    pub fn pass(&self) -> u32 {
        self.pass
    }

    /// Starts a pass that will send `pages`. Fails if a pass is still open or a page is outside the
    /// layout.
    pub fn begin_pass(&mut self, pages: Pass<'_>) -> Result<(), Error> {
        if self.in_pass {
            return Err(Error::Config(
                "begin_pass while a pass is open (end_pass first)".into(),
            ));
        }
        if let Pass::Pages(list) = pages {
            if let Some(&bad) = list.iter().find(|&&p| p >= self.total_pages) {
                return Err(Error::Config(format!(
                    "page {bad} outside a layout of {} pages",
                    self.total_pages
                )));
            }
        }
        let pass = self
            .pass
            .checked_add(1)
            .ok_or_else(|| Error::Config("too many passes".into()))?;
        match pages {
            Pass::All => self
                .announced
                .iter()
                .for_each(|a| a.store(pass, Ordering::Relaxed)),
            Pass::Pages(list) => list
                .iter()
                .for_each(|&p| self.announced[p as usize].store(pass, Ordering::Relaxed)),
        }
        self.pass = pass;
        self.in_pass = true;
        Ok(())
    }

    /// Ends the current pass. Call it only once every chunk of the pass has been applied by the
    /// receiver: from then on, the pass's pages are DUP sources and DELTA bases.
    pub fn end_pass(&mut self) {
        self.in_pass = false;
    }

    /// Encodes one chunk per entry of `chunks` (ascending page numbers, each announced for the current
    /// pass) in parallel, into buffers from `buffers`; the output keeps the input order. Blocks while
    /// the pool budget is exhausted. Records the hash of every page as sent in `hashes` if given.
    pub fn encode_batch(
        &self,
        iteration: u32,
        chunks: &[&[u64]],
        source: &dyn MemorySource,
        buffers: &BufferPool,
        hashes: Option<&PageHashes>,
    ) -> Result<Vec<PooledBuf>, Error> {
        if !self.in_pass {
            return Err(Error::Config("encode_batch outside a pass".into()));
        }
        if source.layout().total_pages() != self.total_pages {
            return Err(Error::Config(format!(
                "a source of {} pages for an encoder of {}",
                source.layout().total_pages(),
                self.total_pages
            )));
        }
        // All the batch's buffers at once: see `BufferPool::acquire_many`.
        let longest = chunks.iter().map(|c| c.len()).max().unwrap_or(0);
        let outs = buffers.acquire_many(chunks.len(), max_extended_len(longest, longest))?;
        self.pool()?.install(|| {
            chunks
                .par_iter()
                .zip(outs)
                .map(|(pages, mut out)| {
                    SCRATCH.with_borrow_mut(|scratch| {
                        self.encode_chunk(iteration, pages, source, &mut out, scratch, hashes)
                    })?;
                    Ok(out)
                })
                .collect()
        })
    }

    /// Encodes one chunk into `out` (cleared first). Single-threaded; [`encode_batch`] runs it in
    /// parallel. Returns the chunk's length.
    ///
    /// [`encode_batch`]: Self::encode_batch
    pub fn encode_one(
        &self,
        iteration: u32,
        pages: &[u64],
        source: &dyn MemorySource,
        out: &mut Vec<u8>,
        hashes: Option<&PageHashes>,
    ) -> Result<usize, Error> {
        if !self.in_pass {
            return Err(Error::Config("encode_one outside a pass".into()));
        }
        SCRATCH.with_borrow_mut(|scratch| {
            self.encode_chunk(iteration, pages, source, out, scratch, hashes)
        })
    }

    fn check_pages(&self, pages: &[u64]) -> Result<(), Error> {
        if pages.is_empty() || pages.len() > MAX_CHUNK_PAGES {
            return Err(Error::Config(format!(
                "chunk of {} pages (1..={MAX_CHUNK_PAGES})",
                pages.len()
            )));
        }
        if pages.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::Config("chunk pages not strictly ascending".into()));
        }
        for &p in pages {
            let announced = self
                .announced
                .get(p as usize)
                .map(|a| a.load(Ordering::Relaxed));
            if announced != Some(self.pass) {
                return Err(Error::Config(format!(
                    "page {p} was not announced for pass {}",
                    self.pass
                )));
            }
        }
        Ok(())
    }

    /// Whether page `page`, sent with some content in `pass`, still holds that content at the receiver
    /// for the whole current pass.
    fn stable_since(&self, page: u64, pass: u32) -> bool {
        pass < self.pass
            && self
                .announced
                .get(page as usize)
                .is_some_and(|a| a.load(Ordering::Relaxed) == pass)
    }

    fn encode_chunk(
        &self,
        iteration: u32,
        pages: &[u64],
        source: &dyn MemorySource,
        out: &mut Vec<u8>,
        scratch: &mut ChunkScratch,
        hashes: Option<&PageHashes>,
    ) -> Result<usize, Error> {
        self.check_pages(pages)?;
        let run_count = runs_of(pages).count();
        let bound = max_extended_len(pages.len(), run_count);
        let classes_at = begin_chunk(out, EXTENDED_HEADER_LEN, bound, pages);
        let section_at = out.len();
        scratch.dups.clear();
        scratch.deltas.clear();
        scratch.raw_area.clear();
        scratch.in_chunk.clear();

        let pass = self.pass;
        let delta_on = self.config.delta_cache_bytes > 0;
        let cache_now = delta_on && (pass > 1 || self.config.cache_first_pass);
        let literal_estimate = f64::from_bits(self.section_ratio.load(Ordering::Relaxed));
        // A delta must beat what the literal page is predicted to cost: once compressed for a
        // compressible page, 4,096 bytes for one that would go to the raw area.
        let compressible_limit = ((PAGE_SIZE as f64 * literal_estimate) as usize).clamp(
            DELTA_RECORD_HEADER_LEN,
            MAX_DELTA_LEN + DELTA_RECORD_HEADER_LEN,
        ) - DELTA_RECORD_HEADER_LEN;
        let (mut zero, mut literal, mut dup, mut delta, mut delta_bytes) = (0u64, 0u64, 0, 0, 0);
        let mut incompressible = 0u64;

        // Each page is copied out of guest memory into a buffer that stays in L1 cache while it is
        // classified and hashed; only literal pages are then copied on into the chunk.
        let mut staged = [0u8; PAGE_SIZE];
        for (i, &page) in pages.iter().enumerate() {
            source.read_page(page, &mut staged);
            let bytes = &staged[..];
            if is_zero_page(bytes) {
                out[classes_at + i] = PageKind::Zero as u8;
                if let Some(h) = hashes {
                    h.set(page, *ZERO_PAGE_HASH);
                }
                if delta_on {
                    self.cache.remove(page);
                }
                zero += 1;
                continue;
            }
            let hash = page_hash(bytes);
            if let Some(h) = hashes {
                h.set(page, hash);
            }
            let dup_source = scratch.in_chunk.get(&hash).copied().or_else(|| {
                self.index
                    .get(hash)
                    .filter(|&(q, sent)| self.stable_since(q, sent))
                    .map(|(q, _)| q)
            });
            let mut kind = PageKind::Literal;
            let random = dup_source.is_none() && looks_incompressible(bytes, &mut scratch.probe);
            let delta_limit = if random {
                // The whole record must stay below the 4,096 raw bytes.
                PAGE_SIZE - 1 - DELTA_RECORD_HEADER_LEN
            } else {
                compressible_limit
            };
            if let Some(q) = dup_source {
                scratch.dups.extend_from_slice(&q.to_le_bytes());
                scratch.dups.extend_from_slice(&hash.to_le_bytes());
                kind = PageKind::Dup;
            } else if delta_on {
                let deltas = &mut scratch.deltas;
                let encoded = self.cache.with(page, |base| {
                    if base.pass >= pass {
                        return false;
                    }
                    let record_at = deltas.len();
                    deltas.extend_from_slice(&base.hash.to_le_bytes());
                    deltas.extend_from_slice(&[0, 0]);
                    match encode_delta(base.bytes, bytes, delta_limit, deltas) {
                        Some(n) => {
                            deltas[record_at + 16..record_at + 18]
                                .copy_from_slice(&(n as u16).to_le_bytes());
                            true
                        }
                        None => {
                            deltas.truncate(record_at);
                            false
                        }
                    }
                });
                if encoded == Some(true) {
                    kind = PageKind::Delta;
                }
            }
            if kind == PageKind::Literal && random {
                kind = PageKind::Incompressible;
                scratch.raw_area.extend_from_slice(bytes);
            }
            if cache_now {
                self.cache.insert(page, bytes, hash, pass);
            } else if delta_on {
                self.cache.remove(page);
            }
            self.index
                .insert(hash, page, pass, |q, sent| self.stable_since(q, sent));
            scratch.in_chunk.insert(hash, page);
            out[classes_at + i] = kind as u8;
            match kind {
                PageKind::Literal => {
                    literal += 1;
                    out.extend_from_slice(bytes);
                }
                PageKind::Dup => dup += 1,
                PageKind::Delta => delta += 1,
                PageKind::Incompressible => incompressible += 1,
                PageKind::Zero => unreachable!("zero pages continue above"),
            }
        }
        if delta > 0 {
            delta_bytes = scratch.deltas.len() - delta * DELTA_RECORD_HEADER_LEN;
        }
        out.extend_from_slice(&scratch.dups);
        out.extend_from_slice(&scratch.deltas);
        let section_len = out.len() - section_at;

        let literal_len = literal as usize * PAGE_SIZE;
        let (stored_codec, stored_len) =
            self.compress_section(out, section_at, literal_len, scratch);
        out.extend_from_slice(&scratch.raw_area);
        HeaderFields {
            codec: stored_codec,
            pages: pages.len(),
            iteration,
            runs: run_count,
            stored_len,
            section_len,
            dictionary_id: match stored_codec {
                StoredCodec::ZstdDictionary => self.dictionary.as_ref().map_or(0, |d| d.id()),
                _ => 0,
            },
        }
        .write(&mut out[..EXTENDED_HEADER_LEN]);

        let c = &self.counters;
        let add = |a: &AtomicU64, v: u64| {
            a.fetch_add(v, Ordering::Relaxed);
        };
        add(&c.zero_pages, zero);
        add(&c.literal_pages, literal + incompressible);
        add(&c.incompressible_pages, incompressible);
        add(&c.dup_pages, dup as u64);
        add(&c.delta_pages, delta as u64);
        add(&c.delta_bytes, delta_bytes as u64);
        add(
            &c.literal_bytes,
            (literal + incompressible) * PAGE_SIZE as u64,
        );
        add(&c.section_bytes, section_len as u64);
        add(&c.encoded_bytes, out.len() as u64);
        if section_len + scratch.raw_area.len() > 0 {
            add(
                if stored_codec == StoredCodec::Raw {
                    &c.raw_chunks
                } else {
                    &c.compressed_chunks
                },
                1,
            );
        }
        Ok(out.len())
    }

    /// Compresses `out[section_at..]` in place if that pays, with the codec the policy picks. The
    /// section starts with `literal_len` bytes of literal pages.
    fn compress_section(
        &self,
        out: &mut Vec<u8>,
        section_at: usize,
        literal_len: usize,
        scratch: &mut ChunkScratch,
    ) -> (StoredCodec, usize) {
        let section = &out[section_at..];
        let len = section.len();
        if len == 0 {
            return (StoredCodec::Raw, 0);
        }
        // The LZ4 probe samples literal pages only: DUP and DELTA records (hashes, random changed
        // bytes next to small lengths) defeat LZ4 but still shrink under zstd's entropy coding.
        let probe = if literal_len >= PROBE_MIN_LEN {
            probe_ratio(&section[..literal_len], &mut scratch.probe)
        } else {
            UNPROBED_RATIO
        };
        let decision = match self.config.codec {
            CodecPolicy::Fixed(codec) => Chooser::decision_for(codec),
            CodecPolicy::Adaptive { fallback } => {
                let decision = self
                    .chooser
                    .choose(len, probe)
                    .unwrap_or_else(|| Chooser::decision_for(fallback));
                self.counters.adaptive_choices[decision.index].fetch_add(1, Ordering::Relaxed);
                decision
            }
        };
        if decision.codec == Codec::None || probe >= INCOMPRESSIBLE {
            // A section sent raw by choice says nothing about what its literals would cost.
            if probe >= INCOMPRESSIBLE && literal_len * 2 >= len {
                self.note_ratio(1.0);
            }
            return (StoredCodec::Raw, len);
        }
        let started = Instant::now();
        let result = compress(
            decision.codec,
            self.dictionary.as_deref(),
            section,
            &mut scratch.compressed,
        );
        let secs = started.elapsed().as_secs_f64();
        match result {
            Some((codec, n)) if (n as f64) < len as f64 * (1.0 - MIN_SAVING) => {
                self.chooser.record(decision, len, n, probe, secs);
                if literal_len * 2 >= len {
                    self.note_ratio(n as f64 / len as f64);
                }
                out.truncate(section_at);
                out.extend_from_slice(&scratch.compressed[..n]);
                (codec, n)
            }
            other => {
                if let Some((_, n)) = other {
                    self.chooser.record(decision, len, n.min(len), probe, secs);
                }
                if literal_len * 2 >= len {
                    self.note_ratio(1.0);
                }
                (StoredCodec::Raw, len)
            }
        }
    }

    fn note_ratio(&self, ratio: f64) {
        let old = f64::from_bits(self.section_ratio.load(Ordering::Relaxed));
        let new = old + 0.1 * (ratio - old);
        self.section_ratio.store(new.to_bits(), Ordering::Relaxed);
    }
}

/// Bytes sampled (every 16th) to judge whether a page looks random.
const ENTROPY_SAMPLES: usize = PAGE_SIZE / 16;
/// Distinct values among the samples from which a page is suspected random: 256 random samples show
/// about 162 distinct values, text about 40, typical binary data fewer than 120.
const SUSPECT_DISTINCT: u32 = 140;

/// Whether `page` looks incompressible (random, encrypted or already compressed data): a cheap count
/// of distinct byte values among 256 samples, confirmed by LZ4 on the page when it is suspect. Such
/// pages skip the compressor (class INCOMPRESSIBLE), which saves its time and keeps their bytes out
/// of the entropy statistics of the compressible ones.
fn looks_incompressible(page: &[u8], scratch: &mut Vec<u8>) -> bool {
    let mut seen = [0u64; 4];
    for i in 0..ENTROPY_SAMPLES {
        let b = page[i * 16 + (i % 16)];
        seen[usize::from(b >> 6)] |= 1 << (b & 63);
    }
    if seen.iter().map(|w| w.count_ones()).sum::<u32>() < SUSPECT_DISTINCT {
        return false;
    }
    crate::compress::ensure_len(scratch, lz4_flex::block::get_maximum_output_size(PAGE_SIZE));
    let compressed = lz4_flex::block::compress_into(page, scratch).unwrap_or(PAGE_SIZE);
    compressed as f64 >= PAGE_SIZE as f64 * (1.0 - MIN_SAVING)
}
