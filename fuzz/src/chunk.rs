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
