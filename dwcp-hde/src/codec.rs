//! Encoding and decoding of chunks.

use std::sync::atomic::{AtomicU64, Ordering};

use dwcp_core::digest::{PageHashes, ZERO_PAGE_HASH, page_hash};
use dwcp_core::error::{ChunkError, Error};
use dwcp_core::memory::{MemorySource, PAGE_SIZE, is_zero_page};

use crate::chunk::{
    CHUNK_HEADER_LEN, DecodedChunk, MAX_CHUNK_PAGES, PageClass, PageData, SectionCodec,
    begin_chunk, max_encoded_len, parse, runs_of,
};

/// Which compressor literal sections use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Codec {
    /// Never compress.
    None,
    /// LZ4 (lz4_flex): fast, modest ratio. The datacenter default.
    Lz4,
    /// Zstandard at a level from 1 to 19.
    Zstd(i32),
}

impl Codec {
    /// Parses `none`, `lz4`, `zstd` (level 1) or `zstd:N`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        match s {
            "none" => Ok(Self::None),
            "lz4" => Ok(Self::Lz4),
            "zstd" => Ok(Self::Zstd(1)),
            _ => {
                let level = s
                    .strip_prefix("zstd:")
                    .and_then(|l| l.parse::<i32>().ok())
                    .filter(|l| (1..=19).contains(l))
                    .ok_or_else(|| {
                        Error::Config(format!("unknown codec {s:?} (none, lz4, zstd, zstd:1..19)"))
                    })?;
                Ok(Self::Zstd(level))
            }
        }
    }
}

/// Byte counters of an encoder, shared by its threads.
#[derive(Debug, Default)]
pub struct EncodeCounters {
    /// Pages sent as ZERO.
    pub zero_pages: AtomicU64,
    /// Pages sent as LITERAL.
    pub literal_pages: AtomicU64,
    /// Literal bytes before compression.
    pub literal_bytes: AtomicU64,
    /// Chunk bytes produced (what goes into frames).
    pub encoded_bytes: AtomicU64,
    /// Chunks whose literal section was sent raw because compression did not pay.
    pub raw_chunks: AtomicU64,
    /// Chunks sent compressed.
    pub compressed_chunks: AtomicU64,
    /// Of the literal pages, those sent uncompressed as INCOMPRESSIBLE (session encoder only).
    pub incompressible_pages: AtomicU64,
    /// Pages sent as DUP (session encoder only).
    pub dup_pages: AtomicU64,
    /// Pages sent as DELTA (session encoder only).
    pub delta_pages: AtomicU64,
    /// Delta bytes of the DELTA pages before compression (the size QEMU's XBZRLE would send).
    pub delta_bytes: AtomicU64,
    /// Section bytes before compression (session encoder only).
    pub section_bytes: AtomicU64,
    /// Sections the adaptive policy assigned to each of [`ADAPTIVE_CANDIDATES`](crate::ADAPTIVE_CANDIDATES),
    /// by index (session encoder with an adaptive codec only).
    pub adaptive_choices: [AtomicU64; crate::adaptive::CANDIDATES.len()],
}

/// A snapshot of [`EncodeCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EncodeStats {
    /// Pages sent as ZERO.
    pub zero_pages: u64,
    /// Pages sent as LITERAL.
    pub literal_pages: u64,
    /// Literal bytes before compression.
    pub literal_bytes: u64,
    /// Chunk bytes produced.
    pub encoded_bytes: u64,
    /// Chunks sent raw.
    pub raw_chunks: u64,
    /// Chunks sent compressed.
    pub compressed_chunks: u64,
    /// Of the literal pages, those sent uncompressed as INCOMPRESSIBLE (session encoder only).
    pub incompressible_pages: u64,
    /// Pages sent as DUP (session encoder only).
    pub dup_pages: u64,
    /// Pages sent as DELTA (session encoder only).
    pub delta_pages: u64,
    /// Delta bytes of the DELTA pages before compression.
    pub delta_bytes: u64,
    /// Section bytes before compression (session encoder only).
    pub section_bytes: u64,
    /// Sections the adaptive policy assigned to each codec (none, lz4, zstd-1, -3, -6, -9, -13, -19),
    /// so that a report shows what it chose (session encoder with an adaptive codec only).
    #[serde(serialize_with = "by_codec_name")]
    pub adaptive_choices: [u64; crate::adaptive::CANDIDATES.len()],
}

fn by_codec_name<S: serde::Serializer>(
    counts: &[u64; crate::adaptive::CANDIDATES.len()],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(counts.len()))?;
    for (codec, n) in crate::adaptive::CANDIDATES.iter().zip(counts) {
        let name = match codec {
            Codec::None => "none".to_string(),
            Codec::Lz4 => "lz4".to_string(),
            Codec::Zstd(level) => format!("zstd-{level}"),
        };
        map.serialize_entry(&name, n)?;
    }
    map.end()
}

impl EncodeCounters {
    /// A snapshot.
    pub fn snapshot(&self) -> EncodeStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EncodeStats {
            zero_pages: l(&self.zero_pages),
            literal_pages: l(&self.literal_pages),
            literal_bytes: l(&self.literal_bytes),
            encoded_bytes: l(&self.encoded_bytes),
            raw_chunks: l(&self.raw_chunks),
            compressed_chunks: l(&self.compressed_chunks),
            incompressible_pages: l(&self.incompressible_pages),
            dup_pages: l(&self.dup_pages),
            delta_pages: l(&self.delta_pages),
            delta_bytes: l(&self.delta_bytes),
            section_bytes: l(&self.section_bytes),
            adaptive_choices: std::array::from_fn(|i| l(&self.adaptive_choices[i])),
        }
    }
}

/// Compression must save at least this fraction of the literal bytes to be used.
const MIN_SAVING: f64 = 0.03;
/// Pages sampled to judge whether a chunk's literals compress at all.
const PROBE_PAGES: usize = 3;

/// Encodes one chunk of `pages` (ascending, at most [`MAX_CHUNK_PAGES`]) of `source` into `out`
/// (cleared first). `scratch` is working space for compression. When `hashes` is given, the hash of each
/// page as sent is recorded there (the bytes are in cache at that moment). Returns the bytes written.
#[allow(clippy::too_many_arguments)]
pub fn encode_chunk(
    codec: Codec,
    iteration: u32,
    pages: &[u64],
    source: &dyn MemorySource,
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    counters: &EncodeCounters,
    hashes: Option<&PageHashes>,
) -> Result<usize, Error> {
    if pages.is_empty() || pages.len() > MAX_CHUNK_PAGES {
        return Err(Error::Config(format!(
            "chunk of {} pages (1..={MAX_CHUNK_PAGES})",
            pages.len()
        )));
    }
    let run_count = runs_of(pages).count();
    let bound = max_encoded_len(pages.len(), run_count);
    let classes_at = begin_chunk(out, CHUNK_HEADER_LEN, bound, pages);
    let section_at = out.len();

    // Copy every page straight into the literal section; a zero page is dropped again at once.
    let mut literal_count = 0usize;
    for (i, &page) in pages.iter().enumerate() {
        let at = out.len();
        source.append_page(page, out);
        if is_zero_page(&out[at..]) {
            out.truncate(at);
            out[classes_at + i] = PageClass::Zero as u8;
            if let Some(h) = hashes {
                h.set(page, *ZERO_PAGE_HASH);
            }
        } else {
            out[classes_at + i] = PageClass::Literal as u8;
            literal_count += 1;
            if let Some(h) = hashes {
                h.set(page, page_hash(&out[at..]));
            }
        }
    }
    let literal_len = literal_count * PAGE_SIZE;
    let mut section_codec = SectionCodec::Raw;
    if literal_count > 0 && codec != Codec::None && probe_compressible(&out[section_at..], scratch)
    {
        let raw = &out[section_at..];
        scratch.clear();
        let compressed_len = match codec {
            Codec::Lz4 => {
                scratch.resize(lz4_flex::block::get_maximum_output_size(raw.len()), 0);
                lz4_flex::block::compress_into(raw, scratch).ok()
            }
            Codec::Zstd(level) => {
                scratch.resize(zstd::zstd_safe::compress_bound(raw.len()), 0);
                zstd::bulk::compress_to_buffer(raw, scratch, level).ok()
            }
            Codec::None => None,
        };
        if let Some(n) = compressed_len {
            if (n as f64) < literal_len as f64 * (1.0 - MIN_SAVING) {
                out.truncate(section_at);
                out.extend_from_slice(&scratch[..n]);
                section_codec = if matches!(codec, Codec::Lz4) {
                    SectionCodec::Lz4
                } else {
                    SectionCodec::Zstd
                };
            }
        }
    }
    let section_len = out.len() - section_at;
    out[0] = section_codec as u8;
    out[2..4].copy_from_slice(&(pages.len() as u16).to_le_bytes());
    out[4..8].copy_from_slice(&iteration.to_le_bytes());
    out[8..10].copy_from_slice(&(run_count as u16).to_le_bytes());
    out[12..16].copy_from_slice(&(section_len as u32).to_le_bytes());

    counters
        .zero_pages
        .fetch_add((pages.len() - literal_count) as u64, Ordering::Relaxed);
    counters
        .literal_pages
        .fetch_add(literal_count as u64, Ordering::Relaxed);
    counters
        .literal_bytes
        .fetch_add(literal_len as u64, Ordering::Relaxed);
    counters
        .encoded_bytes
        .fetch_add(out.len() as u64, Ordering::Relaxed);
    if literal_count > 0 {
        let c = if section_codec == SectionCodec::Raw {
            &counters.raw_chunks
        } else {
            &counters.compressed_chunks
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
    Ok(out.len())
}

/// Cheap test whether literals compress: LZ4 on a few sampled pages. Random data (encrypted memory,
/// compressed files) is skipped without paying for a full compression pass.
fn probe_compressible(literals: &[u8], scratch: &mut Vec<u8>) -> bool {
    let count = literals.len() / PAGE_SIZE;
    if count <= PROBE_PAGES {
        return true;
    }
    scratch.clear();
    scratch.resize(lz4_flex::block::get_maximum_output_size(PAGE_SIZE), 0);
    let mut sampled = 0usize;
    let mut compressed = 0usize;
    for k in 0..PROBE_PAGES {
        let i = k * (count - 1) / (PROBE_PAGES - 1);
        let page = &literals[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
        compressed += lz4_flex::block::compress_into(page, scratch).unwrap_or(PAGE_SIZE);
        sampled += PAGE_SIZE;
    }
    (compressed as f64) < sampled as f64 * (1.0 - MIN_SAVING)
}

/// Decodes a chunk whose pages must lie below `total_pages`. Literal bytes borrow from `payload` (raw)
/// or from `scratch` (decompressed; grown to exactly the literal size, at most 256 pages).
pub fn decode_chunk<'a>(
    payload: &'a [u8],
    total_pages: u64,
    scratch: &'a mut Vec<u8>,
) -> Result<DecodedChunk<'a>, Error> {
    Ok(decode_format0(payload, total_pages, scratch)?)
}

/// [`decode_chunk`] with the chunk error itself.
pub(crate) fn decode_format0<'a>(
    payload: &'a [u8],
    total_pages: u64,
    scratch: &'a mut Vec<u8>,
) -> Result<DecodedChunk<'a>, ChunkError> {
    let parsed = parse(payload, total_pages)?;
    let literal_len = parsed.literal_count * PAGE_SIZE;
    // `reserve_exact` below: `resize` alone grows a reused scratch by doubling, past 256 pages.
    let literals: &[u8] = match parsed.codec {
        SectionCodec::Raw => parsed.section,
        SectionCodec::Lz4 => {
            scratch.clear();
            scratch.reserve_exact(literal_len);
            scratch.resize(literal_len, 0);
            let n = lz4_flex::block::decompress_into(parsed.section, scratch)
                .map_err(|e| ChunkError::Decompress(format!("lz4: {e}")))?;
            if n != literal_len {
                return Err(ChunkError::Decompress(format!(
                    "lz4 gave {n} bytes, expected {literal_len}"
                )));
            }
            scratch
        }
        SectionCodec::Zstd => {
            scratch.clear();
            scratch.reserve_exact(literal_len);
            scratch.resize(literal_len, 0);
            let n = zstd::bulk::decompress_to_buffer(parsed.section, &mut scratch[..])
                .map_err(|e| ChunkError::Decompress(format!("zstd: {e}")))?;
            if n != literal_len {
                return Err(ChunkError::Decompress(format!(
                    "zstd gave {n} bytes, expected {literal_len}"
                )));
            }
            scratch
        }
    };
    let mut next = 0usize;
    let pages = parsed
        .pages
        .into_iter()
        .map(|(page, class)| match class {
            PageClass::Zero => (page, PageData::Zero),
            PageClass::Literal => {
                let data = &literals[next..next + PAGE_SIZE];
                next += PAGE_SIZE;
                (page, PageData::Literal(data))
            }
        })
        .collect();
    Ok(DecodedChunk {
        iteration: parsed.iteration,
        pages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk of `n` literal pages (one run from page 0) whose section is `section` under `codec`.
    fn literal_chunk(codec: SectionCodec, n: usize, section: &[u8]) -> Vec<u8> {
        let mut c = vec![codec as u8, 0];
        c.extend_from_slice(&(n as u16).to_le_bytes());
        c.extend_from_slice(&1u32.to_le_bytes());
        c.extend_from_slice(&1u16.to_le_bytes());
        c.extend_from_slice(&[0, 0]);
        c.extend_from_slice(&(section.len() as u32).to_le_bytes());
        c.extend_from_slice(&0u64.to_le_bytes());
        c.extend_from_slice(&(n as u16).to_le_bytes());
        c.extend(std::iter::repeat_n(PageClass::Literal as u8, n));
        c.extend_from_slice(section);
        c
    }

    /// Found by the `chunk` fuzz target: a scratch reused from a chunk of 255 literal pages grew by
    /// doubling to 510 pages (2 MiB) when the next chunk announced 256 compressed literal pages, even
    /// though that chunk was then refused. The decoder must stay within one chunk (1 MiB).
    #[test]
    fn reused_scratch_never_grows_beyond_one_chunk() {
        let pages: Vec<u8> = (0..MAX_CHUNK_PAGES * PAGE_SIZE)
            .map(|i| (i / 4096 + i % 7) as u8)
            .collect();
        let lz4 = lz4_flex::block::compress(&pages);
        let zstd = zstd::bulk::compress(&pages, 1).unwrap();
        let cases = [
            (
                literal_chunk(SectionCodec::Lz4, MAX_CHUNK_PAGES, &lz4),
                true,
            ),
            (
                literal_chunk(SectionCodec::Zstd, MAX_CHUNK_PAGES, &zstd),
                true,
            ),
            (
                literal_chunk(SectionCodec::Lz4, MAX_CHUNK_PAGES, &[0xff]),
                false,
            ),
            (
                literal_chunk(SectionCodec::Zstd, MAX_CHUNK_PAGES, &[0xff]),
                false,
            ),
        ];
        for (payload, valid) in cases {
            let mut scratch = Vec::with_capacity(255 * PAGE_SIZE);
            let decoded = decode_chunk(&payload, 1024, &mut scratch);
            assert_eq!(decoded.is_ok(), valid, "{:?}", decoded.err());
            if let Ok(chunk) = decoded {
                assert_eq!(chunk.pages.len(), MAX_CHUNK_PAGES);
                assert_eq!(
                    chunk.pages[9].1,
                    PageData::Literal(&pages[9 * 4096..10 * 4096])
                );
            }
            assert!(
                scratch.capacity() <= MAX_CHUNK_PAGES * PAGE_SIZE,
                "scratch grew to {} bytes",
                scratch.capacity()
            );
        }
    }
}
