//! The chunk: the unit of encoding and of transfer. One chunk holds up to [`MAX_CHUNK_PAGES`] pages of
//! one iteration, described as ascending runs of page numbers, each page with a class.
//!
//! ```text
//! offset size  field
//!  0     1     codec of the literal section (0 raw, 1 lz4, 2 zstd)
//!  1     1     reserved (0)
//!  2     2     page count n (1..=256)
//!  4     4     iteration
//!  8     2     run count r (1..=n)
//! 10     2     reserved (0)
//! 12     4     literal section length in bytes
//! 16     10*r  runs: first page (u64), length (u16); ascending, non-overlapping, lengths sum to n
//! ..     n     page classes in page order: 0 ZERO, 1 LITERAL
//! ..     len   literal section: the LITERAL pages' bytes in page order, raw or compressed as a whole
//! ```
//! Little-endian. Decoding checks every field against the layout and never allocates more than
//! `n * PAGE_SIZE` bytes.

use dwcp_core::error::ChunkError;
use dwcp_core::memory::PAGE_SIZE;
use dwcp_core::messages::Cursor;

/// Most pages in one chunk.
pub const MAX_CHUNK_PAGES: usize = 256;
/// Size of the fixed chunk header.
pub const CHUNK_HEADER_LEN: usize = 16;
const RUN_LEN: usize = 10;

/// How the literal section is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SectionCodec {
    /// Uncompressed.
    Raw = 0,
    /// LZ4 block.
    Lz4 = 1,
    /// Zstandard frame.
    Zstd = 2,
}

/// Class of a page in a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageClass {
    /// All zeros: no bytes on the wire.
    Zero = 0,
    /// Bytes carried in the literal section.
    Literal = 1,
}

/// Upper bound of an encoded chunk's size for `pages` pages in `runs` runs, before compression.
pub fn max_encoded_len(pages: usize, runs: usize) -> usize {
    CHUNK_HEADER_LEN + RUN_LEN * runs + pages + pages * PAGE_SIZE
}

/// Starts a chunk in `out` (cleared first, room reserved for `bound` bytes): `header_len` zero bytes
/// for the caller's header, the run table of `pages`, and one zeroed class byte per page. Returns the
/// offset of the class bytes; the chunk's section starts `pages.len()` bytes after it. Both chunk
/// formats share this layout.
pub(crate) fn begin_chunk(
    out: &mut Vec<u8>,
    header_len: usize,
    bound: usize,
    pages: &[u64],
) -> usize {
    out.clear();
    out.reserve(bound);
    out.resize(header_len, 0);
    for (start, len) in runs_of(pages) {
        out.extend_from_slice(&start.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
    let classes_at = out.len();
    out.resize(classes_at + pages.len(), 0);
    classes_at
}

/// Splits ascending page numbers into runs of consecutive pages.
pub fn runs_of(pages: &[u64]) -> impl Iterator<Item = (u64, u16)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let start = *pages.get(i)?;
        let mut len = 1usize;
        while i + len < pages.len() && pages[i + len] == start + len as u64 {
            len += 1;
        }
        i += len;
        Some((start, len as u16))
    })
}

/// A decoded chunk, borrowing literal bytes from the payload or the decompression buffer.
#[derive(Debug)]
pub struct DecodedChunk<'a> {
    /// Iteration the pages belong to.
    pub iteration: u32,
    /// Pages in order with their content.
    pub pages: Vec<(u64, PageData<'a>)>,
}

/// Content of one decoded page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageData<'a> {
    /// All zeros.
    Zero,
    /// The page's bytes (`PAGE_SIZE`).
    Literal(&'a [u8]),
}

pub(crate) struct ParsedHeader<'a> {
    pub codec: SectionCodec,
    pub iteration: u32,
    pub pages: Vec<(u64, PageClass)>,
    pub literal_count: usize,
    pub section: &'a [u8],
}

/// Validates one run record (first page u64, length u16) of a chunk whose runs so far covered
/// `covered` of `n` pages and ended before `next_allowed`: non-empty, ascending, inside the layout,
/// not beyond the page count. Returns the run's pages as `start..end`. Shared by both chunk formats.
pub(crate) fn checked_run(
    run: &[u8],
    next_allowed: u64,
    total_pages: u64,
    covered: usize,
    n: usize,
) -> Result<(u64, u64), ChunkError> {
    let invalid = |s: &str| ChunkError::Invalid(s.into());
    let start = u64::from_le_bytes(run[..8].try_into().expect("8 bytes"));
    let len = u64::from(u16::from_le_bytes(run[8..10].try_into().expect("2 bytes")));
    if len == 0 {
        return Err(invalid("empty run"));
    }
    if start < next_allowed {
        return Err(invalid("runs not ascending"));
    }
    let end = start
        .checked_add(len)
        .ok_or_else(|| invalid("run overflows"))?;
    if end > total_pages {
        return Err(ChunkError::PageOutOfRange {
            page: end - 1,
            total_pages,
        });
    }
    if covered + len as usize > n {
        return Err(invalid("runs cover more pages than the page count"));
    }
    Ok((start, end))
}

pub(crate) fn parse(payload: &[u8], total_pages: u64) -> Result<ParsedHeader<'_>, ChunkError> {
    let invalid = |s: String| ChunkError::Invalid(s);
    if payload.len() < CHUNK_HEADER_LEN {
        return Err(ChunkError::Truncated("header"));
    }
    let mut c = Cursor::new(payload, "chunk");
    let codec = match c.u8().map_err(|_| ChunkError::Truncated("codec"))? {
        0 => SectionCodec::Raw,
        1 => SectionCodec::Lz4,
        2 => SectionCodec::Zstd,
        other => return Err(invalid(format!("unknown codec {other}"))),
    };
    let reserved_a = c.u8().map_err(|_| ChunkError::Truncated("header"))?;
    let n = c.u16().map_err(|_| ChunkError::Truncated("header"))? as usize;
    let iteration = c.u32().map_err(|_| ChunkError::Truncated("header"))?;
    let r = c.u16().map_err(|_| ChunkError::Truncated("header"))? as usize;
    let reserved_b = c.u16().map_err(|_| ChunkError::Truncated("header"))?;
    let section_len = c.u32().map_err(|_| ChunkError::Truncated("header"))? as usize;
    if reserved_a != 0 || reserved_b != 0 {
        return Err(invalid("reserved fields set".into()));
    }
    if n == 0 || n > MAX_CHUNK_PAGES {
        return Err(invalid(format!("{n} pages (1..={MAX_CHUNK_PAGES})")));
    }
    if r == 0 || r > n {
        return Err(invalid(format!("{r} runs for {n} pages")));
    }
    let runs_bytes = c
        .take(RUN_LEN * r)
        .map_err(|_| ChunkError::Truncated("runs"))?;
    let classes = c.take(n).map_err(|_| ChunkError::Truncated("classes"))?;
    let section = c
        .take(section_len)
        .map_err(|_| ChunkError::Truncated("literal section"))?;
    c.finish()
        .map_err(|_| invalid("trailing bytes after the literal section".into()))?;

    let mut pages = Vec::with_capacity(n);
    let mut next_allowed = 0u64;
    let mut ci = 0;
    for run in runs_bytes.chunks_exact(RUN_LEN) {
        let (start, end) = checked_run(run, next_allowed, total_pages, pages.len(), n)?;
        for page in start..end {
            let class = match classes[ci] {
                0 => PageClass::Zero,
                1 => PageClass::Literal,
                other => return Err(invalid(format!("unknown page class {other}"))),
            };
            pages.push((page, class));
            ci += 1;
        }
        next_allowed = end;
    }
    if pages.len() != n {
        return Err(invalid(format!(
            "runs cover {} pages, header says {n}",
            pages.len()
        )));
    }
    let literal_count = pages.iter().filter(|p| p.1 == PageClass::Literal).count();
    if codec == SectionCodec::Raw && section.len() != literal_count * PAGE_SIZE {
        return Err(invalid(format!(
            "raw section of {} bytes for {literal_count} literal pages",
            section.len()
        )));
    }
    if literal_count == 0 && !section.is_empty() {
        return Err(invalid("literal section without literal pages".into()));
    }
    Ok(ParsedHeader {
        codec,
        iteration,
        pages,
        literal_count,
        section,
    })
}
