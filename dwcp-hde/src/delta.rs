//! XBZRLE-style delta of a page against its previously sent version (as in QEMU's XBZRLE).
//!
//! The delta is a sequence of records `unchanged (ULEB128) ‖ changed (ULEB128) ‖ changed bytes`:
//! skip `unchanged` bytes of the base, then replace the next `changed` bytes. The bytes after the
//! last record are unchanged. The encoder compares eight bytes at a time and gives up as soon as the
//! delta would exceed a caller's limit (typically what the page would cost as a literal), so a page
//! that changed a lot costs little CPU to reject. The decoder checks every length against the page
//! and never writes outside it. Pure functions, no I/O.

use dwcp_core::error::ChunkError;

/// Runs of equal bytes shorter than this inside a changed region are sent as changed bytes: a new
/// record costs at least two bytes of lengths, so splitting on a short equal run does not pay.
const MIN_UNCHANGED_RUN: usize = 3;

fn put_uleb(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn get_uleb(input: &[u8], at: &mut usize) -> Result<usize, ChunkError> {
    let mut v = 0usize;
    for shift in (0..21).step_by(7) {
        let byte = *input
            .get(*at)
            .ok_or(ChunkError::Truncated("delta length"))?;
        *at += 1;
        v |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    // Three ULEB bytes cover every length within a page; a fourth continuation is malformed.
    Err(ChunkError::Invalid("delta length too long".into()))
}

/// Index of the first byte at or after `from` where `a` and `b` differ (or `a.len()`).
fn first_difference(a: &[u8], b: &[u8], mut from: usize) -> usize {
    while from + 8 <= a.len() {
        let x = u64::from_ne_bytes(a[from..from + 8].try_into().expect("8"));
        let y = u64::from_ne_bytes(b[from..from + 8].try_into().expect("8"));
        if x != y {
            // Little- or big-endian, the differing byte is found by a byte scan within the word.
            return from
                + (0..8)
                    .find(|&i| a[from + i] != b[from + i])
                    .expect("words differ");
        }
        from += 8;
    }
    (from..a.len()).find(|&i| a[i] != b[i]).unwrap_or(a.len())
}

/// Appends the delta turning `base` into `page` to `out`, unless it would exceed `limit` bytes; returns
/// its length, or `None` (and `out` unchanged) when it does not fit. `base` and `page` have equal length.
pub fn encode_delta(base: &[u8], page: &[u8], limit: usize, out: &mut Vec<u8>) -> Option<usize> {
    assert_eq!(base.len(), page.len(), "delta of pages of different sizes");
    let start = out.len();
    let n = page.len();
    let mut pos = 0;
    loop {
        let changed_at = first_difference(base, page, pos);
        if changed_at == n {
            return Some(out.len() - start);
        }
        // Extend the changed run until an equal run long enough to be worth a new record.
        let mut end = changed_at + 1;
        loop {
            while end < n && base[end] != page[end] {
                end += 1;
            }
            let equal_until = (end..n.min(end + MIN_UNCHANGED_RUN)).find(|&i| base[i] != page[i]);
            match equal_until {
                Some(i) => end = i,
                None => break,
            }
        }
        put_uleb(out, changed_at - pos);
        put_uleb(out, end - changed_at);
        out.extend_from_slice(&page[changed_at..end]);
        if out.len() - start > limit {
            out.truncate(start);
            return None;
        }
        pos = end;
    }
}

/// Applies `delta` to `page`, which holds the base on entry and the new version on success. On error
/// `page` may be partly updated; the caller must then discard it.
pub fn apply_delta(page: &mut [u8], delta: &[u8]) -> Result<(), ChunkError> {
    let mut at = 0;
    let mut pos = 0usize;
    while at < delta.len() {
        let unchanged = get_uleb(delta, &mut at)?;
        let changed = get_uleb(delta, &mut at)?;
        if changed == 0 {
            return Err(ChunkError::Invalid("empty changed run in a delta".into()));
        }
        let from = pos
            .checked_add(unchanged)
            .filter(|&f| f < page.len())
            .ok_or_else(|| ChunkError::Invalid("delta skips past the end of the page".into()))?;
        let to = from
            .checked_add(changed)
            .filter(|&t| t <= page.len())
            .ok_or_else(|| ChunkError::Invalid("delta writes past the end of the page".into()))?;
        let bytes = delta
            .get(at..at + changed)
            .ok_or(ChunkError::Truncated("delta bytes"))?;
        page[from..to].copy_from_slice(bytes);
        at += changed;
        pos = to;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PAGE: usize = 4096;

    #[test]
    fn identical_pages_cost_nothing_and_one_byte_costs_three() {
        let base = vec![7u8; PAGE];
        let mut out = Vec::new();
        assert_eq!(encode_delta(&base, &base, 16, &mut out), Some(0));
        let mut page = base.clone();
        page[100] = 8;
        assert_eq!(encode_delta(&base, &page, 16, &mut out), Some(3));
        let mut applied = base.clone();
        apply_delta(&mut applied, &out).unwrap();
        assert_eq!(applied, page);
    }

    #[test]
    fn a_delta_over_the_limit_is_abandoned_without_output() {
        let base = vec![0u8; PAGE];
        let page: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8 | 1).collect();
        let mut out = vec![42];
        assert_eq!(encode_delta(&base, &page, PAGE / 2, &mut out), None);
        assert_eq!(out, [42]);
    }

    #[test]
    fn malformed_deltas_are_refused() {
        let mut page = vec![0u8; PAGE];
        for bad in [
            &[0u8, 0][..],                 // empty changed run
            &[0x80, 0x20, 1, 0][..],       // skips to 4096: past the end
            &[0, 5, 1, 2][..],             // fewer bytes than announced
            &[0xff, 0xff, 0xff, 0x7f][..], // length too long
            &[0][..],                      // missing changed length
        ] {
            assert!(apply_delta(&mut page, bad).is_err(), "{bad:?}");
        }
    }

    fn sparse_change() -> impl Strategy<Value = (Vec<u8>, Vec<(usize, Vec<u8>)>)> {
        (
            proptest::collection::vec(any::<u8>(), PAGE),
            proptest::collection::vec(
                (0..PAGE, proptest::collection::vec(any::<u8>(), 1..64)),
                0..40,
            ),
        )
    }

    proptest! {
        #[test]
        fn roundtrip((base, edits) in sparse_change()) {
            let mut page = base.clone();
            for (at, bytes) in edits {
                let end = (at + bytes.len()).min(PAGE);
                page[at..end].copy_from_slice(&bytes[..end - at]);
            }
            let mut out = Vec::new();
            let n = encode_delta(&base, &page, PAGE, &mut out).expect("a sparse change fits a page");
            prop_assert_eq!(n, out.len());
            let mut applied = base.clone();
            apply_delta(&mut applied, &out).unwrap();
            prop_assert_eq!(applied, page);
        }

        #[test]
        fn arbitrary_deltas_never_panic_or_write_outside(delta in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut page = vec![0u8; PAGE];
            let _ = apply_delta(&mut page, &delta);
            prop_assert_eq!(page.len(), PAGE);
        }
    }
}
