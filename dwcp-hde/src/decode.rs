//! The session decoder: decodes both chunk formats, resolves DUP and DELTA pages against the
//! receiver's memory after verifying that it holds the content the sender based them on, and decodes
//! batches in parallel.

use std::sync::Arc;

use dwcp_core::digest::page_hash;
use dwcp_core::error::{ChunkError, Error};
use dwcp_core::memory::{MemorySink, PAGE_SIZE};
use rayon::prelude::*;

use crate::chunk::{DecodedChunk, MAX_CHUNK_PAGES, PageData};
use crate::codec::decode_format0;
use crate::compress::{decompress, set_len_exact};
use crate::delta::apply_delta;
use crate::dictionary::Dictionary;
use crate::format::{
    DELTA_RECORD_HEADER_LEN, DUP_RECORD_LEN, MAX_DELTA_LEN, MAX_SECTION_LEN, PageKind, StoredCodec,
    is_extended, parse_extended,
};

/// The receiver's memory as DUP and DELTA decoding sees it: the current content of a page.
pub trait ReceiverPages {
    /// Copies the current content of `page` (below the layout's page count) into `out`
    /// (`PAGE_SIZE` bytes).
    fn read_page(&self, page: u64, out: &mut [u8]);
}

impl<T: MemorySink + ?Sized> ReceiverPages for T {
    fn read_page(&self, page: u64, out: &mut [u8]) {
        MemorySink::read_page(self, page, out);
    }
}

/// Why a chunk was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The chunk itself is malformed.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// The receiver's copy of `base_page` is not the content a DUP or DELTA page was encoded against:
    /// applying it would give a wrong page.
    #[error(
        "{kind:?} page {page}: receiver page {base_page} does not hold the content it is based on (hash {expected:#034x}, found {found:#034x})"
    )]
    BaseMismatch {
        /// The page being decoded.
        page: u64,
        /// The page whose content it refers to (the page itself for DELTA).
        base_page: u64,
        /// DUP or DELTA.
        kind: PageKind,
        /// The hash the sender announced.
        expected: u128,
        /// The hash of what the receiver holds.
        found: u128,
    },
    /// The chunk was compressed with a dictionary the receiver does not hold.
    #[error("chunk needs dictionary {wanted:#010x}, the receiver holds {held:?}")]
    DictionaryMismatch {
        /// The chunk's dictionary id.
        wanted: u32,
        /// The receiver's dictionary id, if it has one.
        held: Option<u32>,
    },
}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Chunk(c) => Error::Chunk(c),
            other => Error::Chunk(ChunkError::Invalid(other.to_string())),
        }
    }
}

/// Reusable buffers of one decoding thread. Never larger than [`DecodeScratch::MAX_BYTES`] in total.
#[derive(Debug, Default)]
pub struct DecodeScratch {
    section: Vec<u8>,
    pages: Vec<u8>,
}

impl DecodeScratch {
    /// Most bytes both buffers together ever hold: one decompressed section and one chunk of
    /// materialised DUP/DELTA pages.
    pub const MAX_BYTES: usize = MAX_SECTION_LEN + MAX_CHUNK_PAGES * PAGE_SIZE;

    /// Bytes currently allocated.
    pub fn capacity(&self) -> usize {
        self.section.capacity() + self.pages.capacity()
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<DecodeScratch> = std::cell::RefCell::default();
}

/// Decoder of one session: both chunk formats, the session dictionary, parallel batches.
#[derive(Debug)]
pub struct ChunkDecoder {
    dictionary: Option<Arc<Dictionary>>,
    pool: rayon::ThreadPool,
}

impl ChunkDecoder {
    /// A decoder whose [`decode_batch`](Self::decode_batch) runs on `threads` threads (0: one per
    /// core).
    pub fn new(threads: usize) -> Result<Self, Error> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("hde-decode-{i}"))
            .build()
            .map_err(|e| Error::Config(format!("building the decoder thread pool: {e}")))?;
        Ok(Self {
            dictionary: None,
            pool,
        })
    }

    /// Uses `dictionary` for chunks compressed with codec 3 (zstd with a dictionary).
    pub fn set_dictionary(&mut self, dictionary: Option<Arc<Dictionary>>) {
        self.dictionary = dictionary;
    }

    /// Decodes one chunk of either format whose pages lie below `total_pages`. DUP and DELTA pages
    /// are resolved against `memory` (the receiver's current pages) and come out as
    /// [`PageData::Literal`], like literal pages. Literal bytes borrow from `payload` or `scratch`.
    pub fn decode<'a, M: ReceiverPages + ?Sized>(
        &self,
        payload: &'a [u8],
        total_pages: u64,
        memory: &M,
        scratch: &'a mut DecodeScratch,
    ) -> Result<DecodedChunk<'a>, DecodeError> {
        if !is_extended(payload) {
            return Ok(decode_format0(payload, total_pages, &mut scratch.section)?);
        }
        let parsed = parse_extended(payload, total_pages)?;
        let DecodeScratch {
            section: section_buf,
            pages: page_buf,
        } = scratch;
        if parsed.codec == StoredCodec::ZstdDictionary {
            let held = self.dictionary.as_ref().map(|d| d.id());
            if held != Some(parsed.dictionary_id) {
                return Err(DecodeError::DictionaryMismatch {
                    wanted: parsed.dictionary_id,
                    held,
                });
            }
        }
        let section: &'a [u8] = if parsed.codec == StoredCodec::Raw {
            parsed.section
        } else {
            set_len_exact(section_buf, parsed.section_len);
            decompress(
                parsed.codec,
                self.dictionary.as_deref(),
                parsed.section,
                &mut section_buf[..],
            )?;
            section_buf
        };

        // Split the section into its areas; every length was bounded by the parser.
        let counts = parsed.counts;
        let literal_len = counts.literal * PAGE_SIZE;
        let dups_len = counts.dup * DUP_RECORD_LEN;
        let literals = &section[..literal_len];
        let dup_records = &section[literal_len..literal_len + dups_len];
        let mut deltas: Vec<(u128, &[u8])> = Vec::with_capacity(counts.delta);
        let mut at = literal_len + dups_len;
        for _ in 0..counts.delta {
            let header = section
                .get(at..at + DELTA_RECORD_HEADER_LEN)
                .ok_or(ChunkError::Truncated("delta record"))?;
            let base_hash = u128::from_le_bytes(header[..16].try_into().expect("16 bytes"));
            let len = usize::from(u16::from_le_bytes([header[16], header[17]]));
            if len > MAX_DELTA_LEN {
                return Err(ChunkError::Invalid(format!("delta of {len} bytes")).into());
            }
            at += DELTA_RECORD_HEADER_LEN;
            let bytes = section
                .get(at..at + len)
                .ok_or(ChunkError::Truncated("delta bytes"))?;
            deltas.push((base_hash, bytes));
            at += len;
        }
        if at != section.len() {
            return Err(ChunkError::Invalid(format!(
                "section of {} bytes, its records end at {at}",
                section.len()
            ))
            .into());
        }

        // Materialise DUP and DELTA pages, in page order, into `page_buf`.
        let materialised = counts.dup + counts.delta;
        set_len_exact(page_buf, materialised * PAGE_SIZE);
        let raw_area = parsed.raw_area;
        // Where each page's content is: 0 zero, 1 literal slot k, 2 materialised slot k, 3 raw slot k.
        let mut located: Vec<(u8, usize)> = Vec::with_capacity(parsed.pages.len());
        let (mut lit, mut mat, mut dup_i, mut delta_i) = (0usize, 0usize, 0usize, 0usize);
        let mut raw = 0usize;
        for (i, &(page, kind)) in parsed.pages.iter().enumerate() {
            match kind {
                PageKind::Zero => located.push((0, 0)),
                PageKind::Literal => {
                    located.push((1, lit));
                    lit += 1;
                }
                PageKind::Incompressible => {
                    located.push((3, raw));
                    raw += 1;
                }
                PageKind::Dup => {
                    let record = &dup_records[dup_i * DUP_RECORD_LEN..(dup_i + 1) * DUP_RECORD_LEN];
                    dup_i += 1;
                    let source = u64::from_le_bytes(record[..8].try_into().expect("8 bytes"));
                    let hash = u128::from_le_bytes(record[8..].try_into().expect("16 bytes"));
                    if source >= total_pages {
                        return Err(ChunkError::PageOutOfRange {
                            page: source,
                            total_pages,
                        }
                        .into());
                    }
                    let (done, rest) = page_buf.split_at_mut(mat * PAGE_SIZE);
                    let slot = &mut rest[..PAGE_SIZE];
                    match parsed.pages.binary_search_by_key(&source, |p| p.0) {
                        Ok(j) if j < i => match located[j] {
                            (0, _) => slot.fill(0),
                            (1, k) => slot.copy_from_slice(&literals[k * PAGE_SIZE..][..PAGE_SIZE]),
                            (2, k) => slot.copy_from_slice(&done[k * PAGE_SIZE..][..PAGE_SIZE]),
                            (_, k) => slot.copy_from_slice(&raw_area[k * PAGE_SIZE..][..PAGE_SIZE]),
                        },
                        Ok(_) => {
                            return Err(ChunkError::Invalid(format!(
                                "DUP page {page} refers to page {source}, which this chunk sends later"
                            ))
                            .into());
                        }
                        Err(_) => memory.read_page(source, slot),
                    }
                    let found = page_hash(slot);
                    if found != hash {
                        return Err(DecodeError::BaseMismatch {
                            page,
                            base_page: source,
                            kind,
                            expected: hash,
                            found,
                        });
                    }
                    located.push((2, mat));
                    mat += 1;
                }
                PageKind::Delta => {
                    let (base_hash, delta) = deltas[delta_i];
                    delta_i += 1;
                    let slot = &mut page_buf[mat * PAGE_SIZE..(mat + 1) * PAGE_SIZE];
                    memory.read_page(page, slot);
                    let found = page_hash(slot);
                    if found != base_hash {
                        return Err(DecodeError::BaseMismatch {
                            page,
                            base_page: page,
                            kind,
                            expected: base_hash,
                            found,
                        });
                    }
                    apply_delta(slot, delta)?;
                    located.push((2, mat));
                    mat += 1;
                }
            }
        }
        let page_buf: &'a [u8] = page_buf;
        let pages = parsed
            .pages
            .iter()
            .zip(&located)
            .map(|(&(page, _), &(area, k))| {
                let data = match area {
                    0 => PageData::Zero,
                    1 => PageData::Literal(&literals[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]),
                    2 => PageData::Literal(&page_buf[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]),
                    _ => PageData::Literal(&raw_area[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]),
                };
                (page, data)
            })
            .collect();
        Ok(DecodedChunk {
            iteration: parsed.iteration,
            pages,
        })
    }

    /// Decodes `payloads` in parallel on the decoder's pool and hands each decoded chunk to `apply`
    /// (with its index in `payloads`), on the thread that decoded it. Returns one result per payload,
    /// in input order. Each pool thread keeps one [`DecodeScratch`] across calls, so memory stays within
    /// `threads × DecodeScratch::MAX_BYTES` whatever the batch size.
    ///
    /// `apply` may write the receiver's memory while other chunks of the batch are decoded: the
    /// session invariants (docs/hde.md §3) guarantee that no chunk of a pass changes a page that
    /// another chunk of the same pass reads as a DUP source or DELTA base.
    pub fn decode_batch<M, F, R>(
        &self,
        payloads: &[&[u8]],
        total_pages: u64,
        memory: &M,
        apply: F,
    ) -> Vec<Result<R, DecodeError>>
    where
        M: ReceiverPages + Sync + ?Sized,
        F: Fn(usize, DecodedChunk<'_>) -> R + Sync,
        R: Send,
    {
        self.pool.install(|| {
            payloads
                .par_iter()
                .enumerate()
                .map(|(i, payload)| {
                    SCRATCH.with_borrow_mut(|scratch| {
                        let chunk = self.decode(payload, total_pages, memory, scratch)?;
                        Ok(apply(i, chunk))
                    })
                })
                .collect()
        })
    }
}
