//! The payloads of the post-copy frames (`FrameType::Postcopy*`, `PageRequest`), little-endian.
//!
//! ```text
//! PostcopyMissing   u32 n ‖ n × (u64 first page ‖ u64 pages)           n <= MAX_RANGES_PER_FRAME
//! PostcopyStart     u64 total pages ‖ u64 pages in the set ‖ u64 ranges sent before it
//! PostcopyResume    (the same as PostcopyStart)
//! PageRequest       u32 n ‖ n × u64 page                               1 <= n <= MAX_REQUEST_PAGES
//! PostcopyPages     u32 n ‖ n × (u64 page ‖ u8 kind) ‖ 4096 bytes per kind-0 page, in order
//!                   kind 0: the page's bytes follow; kind 1: the page is all zeros
//!                                                                      1 <= n <= MAX_PAGES_PER_FRAME
//! PostcopyComplete  u128 digest of the pages placed ‖ u64 pages placed ‖ u64 faults served
//! ```
//!
//! Every decoder checks lengths and counts before it allocates, so a hostile peer gets an error, not
//! an allocation it chose.

use std::ops::Range;

use dwcp_core::error::{Error, FrameError};
use dwcp_core::memory::PAGE_SIZE;
use dwcp_core::messages::Cursor;

/// Most ranges in one PostcopyMissing frame (1 MiB of payload).
pub const MAX_RANGES_PER_FRAME: usize = 65_536;
/// Most pages one PageRequest may ask for.
pub const MAX_REQUEST_PAGES: usize = 1024;
/// Most pages in one PostcopyPages frame (256 KiB of page data).
pub const MAX_PAGES_PER_FRAME: usize = 64;

fn malformed(what: &'static str, why: impl Into<String>) -> Error {
    FrameError::Malformed {
        what,
        why: why.into(),
    }
    .into()
}

/// Reads an entry count of at most `max`, each entry `each` bytes, and checks that the payload
/// holds that many before anything is allocated for them.
fn count(c: &mut Cursor<'_>, what: &'static str, max: usize, each: usize) -> Result<usize, Error> {
    let n = c.u32()? as usize;
    if n > max {
        return Err(malformed(what, format!("{n} entries (at most {max})")));
    }
    if c.remaining() < n * each {
        return Err(malformed(
            what,
            format!("{n} entries announced, {} bytes left", c.remaining()),
        ));
    }
    Ok(n)
}

/// Encodes one PostcopyMissing frame's ranges (at most [`MAX_RANGES_PER_FRAME`]).
pub fn encode_missing(ranges: &[Range<u64>], out: &mut Vec<u8>) {
    assert!(ranges.len() <= MAX_RANGES_PER_FRAME);
    out.clear();
    out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for r in ranges {
        out.extend_from_slice(&r.start.to_le_bytes());
        out.extend_from_slice(&(r.end - r.start).to_le_bytes());
    }
}

/// Decodes a PostcopyMissing payload; every range is non-empty and ends at or below `total_pages`.
pub fn decode_missing(payload: &[u8], total_pages: u64) -> Result<Vec<Range<u64>>, Error> {
    let mut c = Cursor::new(payload, "PostcopyMissing");
    let n = count(&mut c, "PostcopyMissing", MAX_RANGES_PER_FRAME, 16)?;
    let mut ranges = Vec::with_capacity(n);
    for _ in 0..n {
        let first = c.u64()?;
        let pages = c.u64()?;
        let end = first
            .checked_add(pages)
            .filter(|&e| pages > 0 && e <= total_pages);
        let Some(end) = end else {
            return Err(malformed(
                "PostcopyMissing",
                format!("range of {pages} pages at {first} in a memory of {total_pages} pages"),
            ));
        };
        ranges.push(first..end);
    }
    c.finish()?;
    Ok(ranges)
}

/// The end of a set of pages: PostcopyStart (source) or PostcopyResume (destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetEnd {
    /// Pages in the memory (the layout's total).
    pub total_pages: u64,
    /// Pages in the set just sent.
    pub pages: u64,
    /// PostcopyMissing ranges sent before this frame.
    pub ranges: u64,
}

impl SetEnd {
    /// The payload.
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.total_pages.to_le_bytes());
        b[8..16].copy_from_slice(&self.pages.to_le_bytes());
        b[16..].copy_from_slice(&self.ranges.to_le_bytes());
        b
    }

    /// Parses the payload of `what` ("PostcopyStart" or "PostcopyResume").
    pub fn decode(what: &'static str, payload: &[u8]) -> Result<Self, Error> {
        let mut c = Cursor::new(payload, what);
        let end = Self {
            total_pages: c.u64()?,
            pages: c.u64()?,
            ranges: c.u64()?,
        };
        c.finish()?;
        Ok(end)
    }
}

/// Encodes a PageRequest for 1 to [`MAX_REQUEST_PAGES`] pages.
pub fn encode_request(pages: &[u64], out: &mut Vec<u8>) {
    assert!(!pages.is_empty() && pages.len() <= MAX_REQUEST_PAGES);
    out.clear();
    out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    for p in pages {
        out.extend_from_slice(&p.to_le_bytes());
    }
}

/// Decodes a PageRequest; every page is below `total_pages`.
pub fn decode_request(payload: &[u8], total_pages: u64) -> Result<Vec<u64>, Error> {
    let mut c = Cursor::new(payload, "PageRequest");
    let n = count(&mut c, "PageRequest", MAX_REQUEST_PAGES, 8)?;
    if n == 0 {
        return Err(malformed("PageRequest", "no pages"));
    }
    let mut pages = Vec::with_capacity(n);
    for _ in 0..n {
        let page = c.u64()?;
        if page >= total_pages {
            return Err(malformed(
                "PageRequest",
                format!("page {page} in a memory of {total_pages} pages"),
            ));
        }
        pages.push(page);
    }
    c.finish()?;
    Ok(pages)
}

/// What one page of a PostcopyPages frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageBody<'a> {
    /// The page's 4096 bytes.
    Bytes(&'a [u8]),
    /// The page is all zeros.
    Zero,
}

/// Builds a PostcopyPages payload page by page.
#[derive(Debug, Default)]
pub struct PagesFrame {
    index: Vec<u8>,
    data: Vec<u8>,
    count: usize,
}

impl PagesFrame {
    /// An empty frame.
    pub fn new() -> Self {
        Self::default()
    }

    /// Pages added so far.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no page was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether the frame holds [`MAX_PAGES_PER_FRAME`] pages.
    pub fn is_full(&self) -> bool {
        self.count == MAX_PAGES_PER_FRAME
    }

    /// Adds a page (`bytes` is `PAGE_SIZE` long); a zero page travels as its number alone.
    pub fn push(&mut self, page: u64, bytes: &[u8]) {
        assert!(!self.is_full() && bytes.len() == PAGE_SIZE);
        self.index.extend_from_slice(&page.to_le_bytes());
        if dwcp_core::memory::is_zero_page(bytes) {
            self.index.push(1);
        } else {
            self.index.push(0);
            self.data.extend_from_slice(bytes);
        }
        self.count += 1;
    }

    /// Writes the payload into `out` and empties the frame.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&(self.count as u32).to_le_bytes());
        out.append(&mut self.index);
        out.append(&mut self.data);
        self.count = 0;
    }
}

/// Decodes a PostcopyPages payload, calling `each(page, body)` in order; every page is below
/// `total_pages`. Nothing is called unless the whole payload is well formed.
pub fn decode_pages<'a>(
    payload: &'a [u8],
    total_pages: u64,
    mut each: impl FnMut(u64, PageBody<'a>) -> Result<(), Error>,
) -> Result<usize, Error> {
    let mut c = Cursor::new(payload, "PostcopyPages");
    let n = count(&mut c, "PostcopyPages", MAX_PAGES_PER_FRAME, 9)?;
    if n == 0 {
        return Err(malformed("PostcopyPages", "no pages"));
    }
    let index = c.take(n * 9)?;
    let mut literal = 0usize;
    for entry in index.chunks_exact(9) {
        let page = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
        if page >= total_pages {
            return Err(malformed(
                "PostcopyPages",
                format!("page {page} in a memory of {total_pages} pages"),
            ));
        }
        match entry[8] {
            0 => literal += 1,
            1 => {}
            kind => return Err(malformed("PostcopyPages", format!("page kind {kind}"))),
        }
    }
    let data = c.take(literal * PAGE_SIZE)?;
    c.finish()?;
    let mut pages = data.chunks_exact(PAGE_SIZE);
    for entry in index.chunks_exact(9) {
        let page = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
        let body = if entry[8] == 0 {
            PageBody::Bytes(pages.next().expect("counted above"))
        } else {
            PageBody::Zero
        };
        each(page, body)?;
    }
    Ok(n)
}

/// The destination's last word: it placed every page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Complete {
    /// [`super::SetDigest`] of the pages placed during post-copy.
    pub digest: u128,
    /// Pages placed.
    pub pages: u64,
    /// Faults the destination's guest took on missing pages.
    pub faults: u64,
}

impl Complete {
    /// The payload.
    pub fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..16].copy_from_slice(&self.digest.to_le_bytes());
        b[16..24].copy_from_slice(&self.pages.to_le_bytes());
        b[24..].copy_from_slice(&self.faults.to_le_bytes());
        b
    }

    /// Parses the payload.
    pub fn decode(payload: &[u8]) -> Result<Self, Error> {
        let mut c = Cursor::new(payload, "PostcopyComplete");
        let complete = Self {
            digest: c.u128()?,
            pages: c.u64()?,
            faults: c.u64()?,
        };
        c.finish()?;
        Ok(complete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pages_round_trip_with_zero_pages_as_numbers_alone() {
        let mut frame = PagesFrame::new();
        let data = [7u8; PAGE_SIZE];
        frame.push(3, &data);
        frame.push(9, &[0u8; PAGE_SIZE]);
        let mut payload = Vec::new();
        frame.finish(&mut payload);
        assert_eq!(payload.len(), 4 + 2 * 9 + PAGE_SIZE);
        let mut seen = Vec::new();
        decode_pages(&payload, 10, |p, body| {
            seen.push((
                p,
                body == PageBody::Zero,
                matches!(body, PageBody::Bytes(b) if b == data),
            ));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(3, false, true), (9, true, false)]);
        assert!(
            decode_pages(&payload, 9, |_, _| Ok(())).is_err(),
            "page 9 of 9"
        );
        assert!(frame.is_empty());
        assert_eq!(payload[..4], 2u32.to_le_bytes());
    }

    #[test]
    fn a_hostile_count_is_refused_before_anything_is_allocated() {
        let mut p = u32::MAX.to_le_bytes().to_vec();
        p.extend_from_slice(&[0; 16]);
        assert!(decode_missing(&p, 100).is_err());
        assert!(decode_request(&p, 100).is_err());
        assert!(decode_pages(&p, 100, |_, _| Ok(())).is_err());
        let mut one = 1u32.to_le_bytes().to_vec();
        one.extend_from_slice(&[0; 8]);
        one.push(5);
        assert!(
            decode_pages(&one, 100, |_, _| Ok(())).is_err(),
            "unknown kind"
        );
    }

    proptest! {
        #[test]
        fn every_decoder_survives_any_input(payload in proptest::collection::vec(any::<u8>(), 0..600), total in 0u64..1000) {
            let _ = decode_missing(&payload, total);
            let _ = decode_request(&payload, total);
            let _ = decode_pages(&payload, total, |_, _| Ok(()));
            let _ = SetEnd::decode("PostcopyStart", &payload);
            let _ = Complete::decode(&payload);
        }

        #[test]
        fn ranges_and_requests_round_trip(
            ranges in proptest::collection::vec((0u64..500, 1u64..50), 0..20),
            pages in proptest::collection::vec(0u64..1000, 1..50),
        ) {
            let ranges: Vec<_> = ranges.into_iter().map(|(s, n)| s..s + n).collect();
            let mut b = Vec::new();
            encode_missing(&ranges, &mut b);
            prop_assert_eq!(decode_missing(&b, 1000).unwrap(), ranges);
            encode_request(&pages, &mut b);
            prop_assert_eq!(decode_request(&b, 1000).unwrap(), pages);
            let end = SetEnd { total_pages: 5, pages: 6, ranges: 7 };
            prop_assert_eq!(SetEnd::decode("PostcopyResume", &end.encode()).unwrap(), end);
            let c = Complete { digest: 1 << 100, pages: 2, faults: 3 };
            prop_assert_eq!(Complete::decode(&c.encode()).unwrap(), c);
        }
    }
}
