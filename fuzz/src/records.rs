//! The record format the structured fuzz harnesses read their input as (shared with the corpus replay
//! tests through `#[path]`, like the harnesses).

/// Splits the next record off `records`: a type byte, a little-endian `u16` length, then that many
/// payload bytes (fewer if the input ends first). Returns the type byte, the payload and the rest;
/// `None` when `records` is empty.
pub fn next_record(records: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&t, rest) = records.split_first()?;
    let len = match rest {
        [a, b, ..] => usize::from(u16::from_le_bytes([*a, *b])),
        _ => 0,
    };
    let rest = rest.get(2..).unwrap_or_default();
    let (payload, tail) = rest.split_at(len.min(rest.len()));
    Some((t, payload, tail))
}
