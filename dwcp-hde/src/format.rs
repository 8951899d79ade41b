//! The extended chunk (format 1): the four page classes ZERO, LITERAL, DUP and DELTA, one section that
//! holds the literal pages, the DUP references and the DELTA records, compressed as a whole.
//!
//! ```text
//! offset size  field
//!  0     1     section codec: 0 raw, 1 lz4, 2 zstd, 3 zstd with the session dictionary
//!  1     1     format: 1 (format 0 is the chunk of `crate::chunk`)
//!  2     2     page count n (1..=256)
//!  4     4     iteration
//!  8     2     run count r (1..=n)
//! 10     2     reserved (0)
//! 12     4     stored section length L
//! 16     4     section length U before compression (raw: U = L)
//! 20     4     dictionary id (codec 3), otherwise 0
//! 24     10*r  runs: first page (u64), length (u16); ascending, non-overlapping, lengths sum to n
//! ..     n     page classes in page order: 0 ZERO, 1 LITERAL, 2 DUP, 3 DELTA, 4 INCOMPRESSIBLE
//! ..     L     section
//! ..     4096*i  raw area: the INCOMPRESSIBLE pages' bytes in page order, never compressed
//! ```
//!
//! The section, once decompressed, is exactly U bytes:
//!
//! ```text
//! literal area   4096 bytes per LITERAL page, in page order
//! DUP records    per DUP page, in page order: source page (u64), content hash (u128)        24 bytes
//! DELTA records  per DELTA page, in page order: base hash (u128), delta length d (u16, < 4096),
//!                d bytes of XBZRLE-style delta (see `crate::delta`)
//! ```
//! Little-endian. Parsing checks every field against the layout before anything is decompressed, and
//! bounds U by what the page classes can need, so a decoder never allocates more than
//! [`MAX_SECTION_LEN`] bytes for the section.

use dwcp_core::error::ChunkError;
use dwcp_core::memory::PAGE_SIZE;

use crate::chunk::MAX_CHUNK_PAGES;

/// The value of byte 1 that marks an extended chunk.
pub const FORMAT_EXTENDED: u8 = 1;
/// Size of the extended chunk header.
pub const EXTENDED_HEADER_LEN: usize = 24;
const RUN_LEN: usize = 10;
/// Bytes of one DUP record: source page and content hash.
pub const DUP_RECORD_LEN: usize = 24;
/// Bytes of a DELTA record before its delta bytes: base hash and delta length.
pub const DELTA_RECORD_HEADER_LEN: usize = 18;
/// Longest delta a DELTA record may carry: anything longer costs more than the literal page.
pub const MAX_DELTA_LEN: usize = PAGE_SIZE - 1;
/// Most bytes one page can add to the section (a DELTA page with the longest delta).
pub const MAX_SECTION_BYTES_PER_PAGE: usize = DELTA_RECORD_HEADER_LEN + MAX_DELTA_LEN;
/// Most bytes the decompressed section of any chunk can have.
pub const MAX_SECTION_LEN: usize = MAX_CHUNK_PAGES * MAX_SECTION_BYTES_PER_PAGE;

/// How an extended chunk's section is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum StoredCodec {
    /// Uncompressed.
    Raw = 0,
    /// One LZ4 block (no frame header, no size prefix).
    Lz4 = 1,
    /// One Zstandard frame, no dictionary.
    Zstd = 2,
    /// One Zstandard frame compressed with the session dictionary named in the header.
    ZstdDictionary = 3,
}

/// Class of a page in an extended chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageKind {
    /// All zeros.
    Zero = 0,
    /// The page's bytes are in the literal area.
    Literal = 1,
    /// The receiver already holds this content at another page.
    Dup = 2,
    /// A delta against the version of this page the receiver holds.
    Delta = 3,
    /// The page's bytes are in the raw area after the section: they looked random, so the
    /// compressor never sees them.
    Incompressible = 4,
}

impl PageKind {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Zero,
            1 => Self::Literal,
            2 => Self::Dup,
            3 => Self::Delta,
            4 => Self::Incompressible,
            _ => return None,
        })
    }
}

/// Pages of each class in one chunk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClassCounts {
    /// ZERO pages.
    pub zero: usize,
    /// LITERAL pages.
    pub literal: usize,
    /// DUP pages.
    pub dup: usize,
    /// DELTA pages.
    pub delta: usize,
    /// INCOMPRESSIBLE pages.
    pub incompressible: usize,
}

impl ClassCounts {
    fn add(&mut self, kind: PageKind) {
        match kind {
            PageKind::Zero => self.zero += 1,
            PageKind::Literal => self.literal += 1,
            PageKind::Dup => self.dup += 1,
            PageKind::Delta => self.delta += 1,
            PageKind::Incompressible => self.incompressible += 1,
        }
    }

    /// The shortest section these pages can have (every delta empty).
    pub fn min_section_len(&self) -> usize {
        self.literal * PAGE_SIZE + self.dup * DUP_RECORD_LEN + self.delta * DELTA_RECORD_HEADER_LEN
    }

    /// The longest section these pages can have (every delta as long as allowed).
    pub fn max_section_len(&self) -> usize {
        self.literal * PAGE_SIZE
            + self.dup * DUP_RECORD_LEN
            + self.delta * MAX_SECTION_BYTES_PER_PAGE
    }
}

/// Upper bound of an extended chunk's size for `pages` pages in `runs` runs, stored raw. (An
/// INCOMPRESSIBLE page costs 4,096 bytes, less than the longest DELTA page.)
pub fn max_extended_len(pages: usize, runs: usize) -> usize {
    EXTENDED_HEADER_LEN + RUN_LEN * runs + pages + pages * MAX_SECTION_BYTES_PER_PAGE
}

/// A validated extended chunk header, its pages and its still stored section.
#[derive(Debug)]
pub(crate) struct ParsedExtended<'a> {
    pub codec: StoredCodec,
    pub iteration: u32,
    pub dictionary_id: u32,
    pub pages: Vec<(u64, PageKind)>,
    pub counts: ClassCounts,
    pub section: &'a [u8],
    pub section_len: usize,
    pub raw_area: &'a [u8],
}

/// Whether `payload` is an extended chunk (format byte 1); anything else is left to the format-0 parser.
pub fn is_extended(payload: &[u8]) -> bool {
    payload.get(1) == Some(&FORMAT_EXTENDED)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Parses and validates an extended chunk against a layout of `total_pages` pages (docs/hde.md §2.4).
pub(crate) fn parse_extended(
    payload: &[u8],
    total_pages: u64,
) -> Result<ParsedExtended<'_>, ChunkError> {
    let invalid = |s: String| ChunkError::Invalid(s);
    if payload.len() < EXTENDED_HEADER_LEN {
        return Err(ChunkError::Truncated("header"));
    }
    let codec = match payload[0] {
        0 => StoredCodec::Raw,
        1 => StoredCodec::Lz4,
        2 => StoredCodec::Zstd,
        3 => StoredCodec::ZstdDictionary,
        other => return Err(invalid(format!("unknown codec {other}"))),
    };
    if payload[1] != FORMAT_EXTENDED {
        return Err(invalid(format!("chunk format {} (expected 1)", payload[1])));
    }
    let n = usize::from(le_u16(payload, 2));
    let iteration = le_u32(payload, 4);
    let r = usize::from(le_u16(payload, 8));
    let reserved = le_u16(payload, 10);
    let stored_len = le_u32(payload, 12) as usize;
    let section_len = le_u32(payload, 16) as usize;
    let dictionary_id = le_u32(payload, 20);
    if reserved != 0 {
        return Err(invalid("reserved fields set".into()));
    }
    if (codec == StoredCodec::ZstdDictionary) != (dictionary_id != 0) {
        return Err(invalid(format!(
            "dictionary id {dictionary_id} with codec {}",
            codec as u8
        )));
    }
    if n == 0 || n > MAX_CHUNK_PAGES {
        return Err(invalid(format!("{n} pages (1..={MAX_CHUNK_PAGES})")));
    }
    if r == 0 || r > n {
        return Err(invalid(format!("{r} runs for {n} pages")));
    }
    let mut at = EXTENDED_HEADER_LEN;
    let runs = payload
        .get(at..at + RUN_LEN * r)
        .ok_or(ChunkError::Truncated("runs"))?;
    at += RUN_LEN * r;
    let classes = payload
        .get(at..at + n)
        .ok_or(ChunkError::Truncated("classes"))?;
    at += n;
    let section = payload
        .get(at..at + stored_len)
        .ok_or(ChunkError::Truncated("section"))?;
    let raw_at = at + stored_len;

    let mut pages = Vec::with_capacity(n);
    let mut counts = ClassCounts::default();
    let mut next_allowed = 0u64;
    for run in runs.chunks_exact(RUN_LEN) {
        let (start, end) =
            crate::chunk::checked_run(run, next_allowed, total_pages, pages.len(), n)?;
        for page in start..end {
            let byte = classes[pages.len()];
            let kind = PageKind::from_byte(byte)
                .ok_or_else(|| invalid(format!("unknown page class {byte}")))?;
            counts.add(kind);
            pages.push((page, kind));
        }
        next_allowed = end;
    }
    if pages.len() != n {
        return Err(invalid(format!(
            "runs cover {} pages, header says {n}",
            pages.len()
        )));
    }
    let raw_len = counts.incompressible * PAGE_SIZE;
    let raw_area = payload
        .get(raw_at..raw_at + raw_len)
        .ok_or(ChunkError::Truncated("raw area"))?;
    if payload.len() != raw_at + raw_len {
        return Err(invalid("trailing bytes after the raw area".into()));
    }
    if section_len < counts.min_section_len() || section_len > counts.max_section_len() {
        return Err(invalid(format!(
            "section of {section_len} bytes for {} literal, {} DUP and {} DELTA pages",
            counts.literal, counts.dup, counts.delta
        )));
    }
    if codec == StoredCodec::Raw && stored_len != section_len {
        return Err(invalid(format!(
            "raw section stored in {stored_len} bytes, header says {section_len}"
        )));
    }
    if section_len == 0 && codec != StoredCodec::Raw {
        return Err(invalid("compressed codec for an empty section".into()));
    }
    Ok(ParsedExtended {
        codec,
        iteration,
        dictionary_id,
        pages,
        counts,
        section,
        section_len,
        raw_area,
    })
}

/// Writes the fixed header of an extended chunk at `out[..EXTENDED_HEADER_LEN]`.
pub(crate) struct HeaderFields {
    pub codec: StoredCodec,
    pub pages: usize,
    pub iteration: u32,
    pub runs: usize,
    pub stored_len: usize,
    pub section_len: usize,
    pub dictionary_id: u32,
}

impl HeaderFields {
    pub fn write(&self, out: &mut [u8]) {
        out[0] = self.codec as u8;
        out[1] = FORMAT_EXTENDED;
        out[2..4].copy_from_slice(&(self.pages as u16).to_le_bytes());
        out[4..8].copy_from_slice(&self.iteration.to_le_bytes());
        out[8..10].copy_from_slice(&(self.runs as u16).to_le_bytes());
        out[10..12].fill(0);
        out[12..16].copy_from_slice(&(self.stored_len as u32).to_le_bytes());
        out[16..20].copy_from_slice(&(self.section_len as u32).to_le_bytes());
        out[20..24].copy_from_slice(&self.dictionary_id.to_le_bytes());
    }
}
