//! Properties of the chunk decoder `dwcp_hde::decode_chunk`.
//!
//! Input: bytes 0..4 give the layout size, `total_pages = (u32 LE & 0xF_FFFF) + 1` (1..=2^20); byte
//! 4 is the number of pages of capacity the reused `scratch` buffer already has (as after earlier
//! chunks on the same stream); the rest is the chunk payload.
//!
//! Checked: no panic; `scratch` never grows beyond 256 × 4096 bytes, whether the chunk is accepted or
//! not; an accepted chunk has as many pages as its header says (1..=256), strictly ascending, each
//! below `total_pages`, each literal exactly 4096 bytes; the decoded pages encode again (raw and
//! lz4) to chunks that decode to the same content, and a canonical raw chunk (maximal runs, no
//! all-zero literal page) re-encodes to exactly its own bytes.

use std::collections::HashMap;

use dwcp_core::memory::{MemoryLayout, MemorySource, PAGE_SIZE, is_zero_page};
use dwcp_hde::{Codec, EncodeCounters, MAX_CHUNK_PAGES, PageData, decode_chunk, encode_chunk};

/// Most bytes the decompression scratch may ever hold: one chunk of literal pages.
pub const MAX_SCRATCH: usize = MAX_CHUNK_PAGES * PAGE_SIZE;
/// Bytes of the input before the chunk payload.
pub const PREFIX_LEN: usize = 5;

/// Runs every chunk property on one fuzz input.
pub fn check(data: &[u8]) {
    let Some(prefix) = data.get(..PREFIX_LEN) else {
        return;
    };
    let total_pages = u64::from(u32::from_le_bytes(prefix[..4].try_into().unwrap()) & 0xF_FFFF) + 1;
    let payload = &data[PREFIX_LEN..];
    let mut scratch = Vec::with_capacity(usize::from(prefix[4]) * PAGE_SIZE);
    let (iteration, pages) = match decode_chunk(payload, total_pages, &mut scratch) {
        Ok(chunk) => {
            let n = usize::from(u16::from_le_bytes([payload[2], payload[3]]));
            assert_eq!(chunk.pages.len(), n, "pages decoded vs the header's count");
            assert!((1..=MAX_CHUNK_PAGES).contains(&n));
            let iteration = u32::from_le_bytes(payload[4..8].try_into().unwrap());
            assert_eq!(chunk.iteration, iteration);
            let mut previous = None;
            let mut pages = Vec::with_capacity(n);
            for &(page, data) in &chunk.pages {
                assert!(page < total_pages, "page {page} of {total_pages}");
                assert!(previous < Some(page), "pages strictly ascending");
                previous = Some(page);
                pages.push(match data {
                    PageData::Zero => (page, None),
                    PageData::Literal(bytes) => {
                        assert_eq!(bytes.len(), PAGE_SIZE, "literal of {} bytes", bytes.len());
                        (page, Some(bytes.to_vec()))
                    }
                });
            }
            (iteration, pages)
        }
        Err(_) => {
            assert_scratch(scratch.capacity());
            return;
        }
    };
    assert_scratch(scratch.capacity());
    roundtrip(payload, total_pages, iteration, pages);
}

fn assert_scratch(capacity: usize) {
    assert!(
        capacity <= MAX_SCRATCH,
        "scratch grew to {capacity} bytes (at most {MAX_SCRATCH})"
    );
}

/// Guest memory holding only the pages of one chunk; every other page reads as zeros.
#[derive(Debug)]
pub struct PageMap {
    layout: MemoryLayout,
    pages: HashMap<u64, Vec<u8>>,
}

impl PageMap {
    /// A layout of `total_pages` pages whose listed pages hold the given bytes.
    pub fn new(total_pages: u64, pages: impl IntoIterator<Item = (u64, Vec<u8>)>) -> Self {
        Self {
            layout: MemoryLayout::flat(total_pages * PAGE_SIZE as u64).expect("valid layout"),
            pages: pages.into_iter().collect(),
        }
    }
}

impl MemorySource for PageMap {
    fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    fn read_page(&self, page: u64, out: &mut [u8]) {
        match self.pages.get(&page) {
            Some(bytes) => out.copy_from_slice(bytes),
            None => out.fill(0),
        }
    }
}

fn roundtrip(payload: &[u8], total_pages: u64, iteration: u32, pages: Vec<(u64, Option<Vec<u8>>)>) {
    let numbers: Vec<u64> = pages.iter().map(|p| p.0).collect();
    let expected: Vec<(u64, bool, Option<&[u8]>)> = pages
        .iter()
        .map(|(p, d)| {
            let zero = d.as_deref().is_none_or(is_zero_page);
            (*p, zero, d.as_deref().filter(|_| !zero))
        })
        .collect();
    let canonical_raw = payload[0] == 0
        && expected
            .iter()
            .zip(&pages)
            .all(|(e, p)| e.1 == p.1.is_none())
        && usize::from(u16::from_le_bytes([payload[8], payload[9]]))
            == dwcp_hde::chunk::runs_of(&numbers).count();
    let source = PageMap::new(
        total_pages,
        pages.iter().filter_map(|(p, d)| Some((*p, d.clone()?))),
    );
    let counters = EncodeCounters::default();
    for codec in [Codec::None, Codec::Lz4] {
        let (mut out, mut enc_scratch, mut dec_scratch) = (Vec::new(), Vec::new(), Vec::new());
        encode_chunk(
            codec,
            iteration,
            &numbers,
            &source,
            &mut out,
            &mut enc_scratch,
            &counters,
            None,
        )
        .expect("decoded pages encode again");
        if codec == Codec::None && canonical_raw {
            assert_eq!(
                out, payload,
                "a canonical raw chunk re-encodes to its bytes"
            );
        }
        let again = decode_chunk(&out, total_pages, &mut dec_scratch).expect("re-encoded decodes");
        assert_eq!(again.iteration, iteration);
        let got: Vec<(u64, bool, Option<&[u8]>)> = again
            .pages
            .iter()
            .map(|&(p, d)| match d {
                PageData::Zero => (p, true, None),
                PageData::Literal(b) => (p, false, Some(b)),
            })
            .collect();
        assert_eq!(
            got, expected,
            "content survives decode, encode ({codec:?}), decode"
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// Targets `session_chunk` (ChunkDecoder::decode) and `dictionary` (Dictionary::from_bytes).
// ---------------------------------------------------------------------------------------------------

use std::sync::{Arc, OnceLock};

use dwcp_hde::{
    ChunkDecoder, CodecPolicy, DecodeError, DecodeScratch, Dictionary, Pass, ReceiverPages,
    SessionConfig, SessionEncoder,
};

/// Bytes of a `session_chunk` input before the chunk payload.
pub const SESSION_PREFIX_LEN: usize = 3;

/// The receiver's memory in the `session_chunk` target: page `p` holds [`receiver_page`]`(p)`.
#[derive(Debug, Clone, Copy)]
pub struct PatternedMemory;

/// The content of page `page` of the fuzz receiver (and of the seeds' first pass): zero for every
/// seventh page, otherwise a page-specific, moderately compressible pattern.
// `is_multiple_of` is newer than the workspace's MSRV (1.85), which this file also builds under.
#[allow(clippy::manual_is_multiple_of)]
pub fn receiver_page(page: u64, out: &mut [u8]) {
    if page % 7 == 0 {
        out.fill(0);
        return;
    }
    let seed = page.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for (i, b) in out.iter_mut().enumerate() {
        *b = if i % 64 < 8 {
            (seed >> ((i % 8) * 8)) as u8
        } else {
            (i / 256) as u8 ^ (page as u8)
        };
    }
}

impl ReceiverPages for PatternedMemory {
    fn read_page(&self, page: u64, out: &mut [u8]) {
        receiver_page(page, out);
    }
}

/// The session dictionary of the fuzz targets and seeds: raw content made of receiver pages.
pub fn fuzz_dictionary() -> Arc<Dictionary> {
    static DICTIONARY: OnceLock<Arc<Dictionary>> = OnceLock::new();
    DICTIONARY
        .get_or_init(|| {
            let mut content = vec![0u8; 4 * PAGE_SIZE];
            for (i, page) in content.chunks_mut(PAGE_SIZE).enumerate() {
                receiver_page(i as u64 + 1, page);
            }
            Arc::new(Dictionary::from_content(content).expect("a valid dictionary"))
        })
        .clone()
}

fn decoder_with(dictionary: Option<Arc<Dictionary>>) -> ChunkDecoder {
    let mut decoder = ChunkDecoder::new(1).expect("a decoder");
    decoder.set_dictionary(dictionary);
    decoder
}

fn assert_decode_scratch(scratch: &DecodeScratch) {
    assert!(
        scratch.capacity() <= DecodeScratch::MAX_BYTES,
        "decode scratch grew to {} bytes (at most {})",
        scratch.capacity(),
        DecodeScratch::MAX_BYTES
    );
}

type Pages = Vec<(u64, Option<Vec<u8>>)>;

/// Runs every property of the session decoder on one fuzz input.
///
/// Input: bytes 0..2 give `total_pages = u16 LE + 1` (1..=65,536); byte 2 picks the decoder's
/// dictionary (bit 0: the fuzz dictionary, bit 1: another one); the rest is the chunk payload (either
/// format). The receiver's memory is [`PatternedMemory`].
///
/// Checked: no panic; the scratch never exceeds `DecodeScratch::MAX_BYTES`, accepted or not; an
/// accepted chunk has the header's page count, pages strictly ascending below `total_pages`, every
/// literal 4096 bytes; decoding again with the warm scratch gives the same pages; the pages encode
/// again (session encoder, lz4 or zstd with the same dictionary) into a chunk that decodes to the same
/// content. A refused dictionary chunk names the dictionaries involved.
pub fn check_session(data: &[u8]) {
    let Some(prefix) = data.get(..SESSION_PREFIX_LEN) else {
        return;
    };
    let total_pages = u64::from(u16::from_le_bytes([prefix[0], prefix[1]])) + 1;
    let dictionary = match prefix[2] & 3 {
        1 | 3 => Some(fuzz_dictionary()),
        2 => Some(Arc::new(
            Dictionary::from_content(b"some other dictionary".to_vec()).expect("valid"),
        )),
        _ => None,
    };
    let payload = &data[SESSION_PREFIX_LEN..];
    let decoder = decoder_with(dictionary.clone());
    let mut scratch = DecodeScratch::default();
    let first = match decoder.decode(payload, total_pages, &PatternedMemory, &mut scratch) {
        Ok(chunk) => {
            let n = usize::from(u16::from_le_bytes([payload[2], payload[3]]));
            assert_eq!(chunk.pages.len(), n, "pages decoded vs the header's count");
            let iteration = u32::from_le_bytes(payload[4..8].try_into().unwrap());
            assert_eq!(chunk.iteration, iteration);
            let mut previous = None;
            let pages: Pages = chunk
                .pages
                .iter()
                .map(|&(page, data)| {
                    assert!(page < total_pages, "page {page} of {total_pages}");
                    assert!(previous < Some(page), "pages strictly ascending");
                    previous = Some(page);
                    match data {
                        PageData::Zero => (page, None),
                        PageData::Literal(bytes) => {
                            assert_eq!(bytes.len(), PAGE_SIZE);
                            (page, Some(bytes.to_vec()))
                        }
                    }
                })
                .collect();
            (iteration, pages)
        }
        Err(e) => {
            assert_decode_scratch(&scratch);
            if let DecodeError::DictionaryMismatch { held, .. } = e {
                assert_eq!(held, dictionary.map(|d| d.id()));
            }
            return;
        }
    };
    assert_decode_scratch(&scratch);
    let again = decoder
        .decode(payload, total_pages, &PatternedMemory, &mut scratch)
        .expect("a chunk accepted once is accepted again");
    let again: Pages = again
        .pages
        .iter()
        .map(|&(p, d)| match d {
            PageData::Zero => (p, None),
            PageData::Literal(b) => (p, Some(b.to_vec())),
        })
        .collect();
    assert_eq!(again, first.1, "decoding is deterministic");
    assert_decode_scratch(&scratch);
    session_roundtrip(total_pages, first.0, &first.1, dictionary);
}

fn session_roundtrip(
    total_pages: u64,
    iteration: u32,
    pages: &Pages,
    dictionary: Option<Arc<Dictionary>>,
) {
    let numbers: Vec<u64> = pages.iter().map(|p| p.0).collect();
    let source = PageMap::new(
        total_pages,
        pages.iter().filter_map(|(p, d)| Some((*p, d.clone()?))),
    );
    let codec = if dictionary.is_some() {
        Codec::Zstd(1)
    } else {
        Codec::Lz4
    };
    let config = SessionConfig {
        codec: CodecPolicy::Fixed(codec),
        threads: 1,
        delta_cache_bytes: 0,
        dedup_entries: 0,
        cache_first_pass: false,
    };
    let mut encoder = SessionEncoder::new(config, total_pages).expect("an encoder");
    encoder.set_dictionary(dictionary.clone());
    encoder
        .begin_pass(Pass::Pages(&numbers))
        .expect("decoded pages lie in the layout");
    let mut out = Vec::new();
    encoder
        .encode_one(iteration, &numbers, &source, &mut out, None)
        .expect("decoded pages encode again");
    let mut scratch = DecodeScratch::default();
    let again = decoder_with(dictionary)
        .decode(&out, total_pages, &PatternedMemory, &mut scratch)
        .expect("a re-encoded chunk decodes");
    assert_eq!(again.iteration, iteration);
    for ((p, want), (q, got)) in pages.iter().zip(&again.pages) {
        assert_eq!(p, q);
        let want_zero = want.as_deref().is_none_or(is_zero_page);
        match got {
            PageData::Zero => assert!(want_zero, "page {p} came back zero"),
            PageData::Literal(b) => assert_eq!(Some(*b), want.as_deref(), "page {p}"),
        }
    }
}

/// Runs every property of `Dictionary::from_bytes` on one fuzz input.
///
/// Input: byte 0 is a mode; the rest is the serialised dictionary. With bit 0 of the mode set, the
/// length and id fields are first made to match the content, so that mutated content gets past the
/// id check (which a fuzzer cannot satisfy by chance) to zstd's own dictionary loading.
///
/// Checked: no panic; an accepted dictionary has 8..=131,072 bytes of content and a non-zero id,
/// serialises back to exactly its bytes, and compresses a chunk (zstd level 3) that a decoder holding
/// the same dictionary decodes to the same pages.
pub fn check_dictionary(data: &[u8]) {
    let Some((&mode, serialised)) = data.split_first() else {
        return;
    };
    let mut bytes = serialised.to_vec();
    if mode & 1 == 1 && bytes.len() >= 12 {
        let content_len = (bytes.len() - 12) as u32;
        bytes[8..12].copy_from_slice(&content_len.to_le_bytes());
        let id = (dwcp_core::digest::page_hash(&bytes[12..]) as u32).max(1);
        bytes[4..8].copy_from_slice(&id.to_le_bytes());
    }
    let data = &bytes[..];
    let Ok(dictionary) = Dictionary::from_bytes(data) else {
        return;
    };
    assert!(
        (dwcp_hde::dictionary::MIN_DICTIONARY_LEN..=dwcp_hde::dictionary::MAX_DICTIONARY_LEN)
            .contains(&dictionary.content().len())
    );
    assert_ne!(dictionary.id(), 0);
    assert_eq!(dictionary.to_bytes(), data, "re-serialises to its bytes");
    let dictionary = Arc::new(dictionary);
    let pages: Vec<u64> = (1..=6).collect();
    let source = PageMap::new(
        8,
        pages.iter().map(|&p| {
            let mut page = vec![0u8; PAGE_SIZE];
            receiver_page(p, &mut page);
            (p, page)
        }),
    );
    let config = SessionConfig {
        codec: CodecPolicy::Fixed(Codec::Zstd(3)),
        threads: 1,
        ..SessionConfig::default()
    };
    let mut encoder = SessionEncoder::new(config, 8).expect("an encoder");
    encoder.set_dictionary(Some(dictionary.clone()));
    encoder.begin_pass(Pass::All).expect("a pass");
    let mut out = Vec::new();
    encoder
        .encode_one(1, &pages, &source, &mut out, None)
        .expect("encoding with the dictionary");
    let mut scratch = DecodeScratch::default();
    let chunk = decoder_with(Some(dictionary))
        .decode(&out, 8, &PatternedMemory, &mut scratch)
        .expect("decoding with the dictionary");
    let mut want = vec![0u8; PAGE_SIZE];
    for (page, data) in &chunk.pages {
        receiver_page(*page, &mut want);
        match data {
            PageData::Zero => assert!(is_zero_page(&want)),
            PageData::Literal(b) => assert_eq!(*b, &want[..]),
        }
    }
}
