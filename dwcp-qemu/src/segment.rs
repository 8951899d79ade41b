//! Encoding of one segment of a channel's byte stream: all-zero segments are elided, the rest is
//! compressed with LZ4 or zstd when that pays, and sent raw otherwise. Decoding is bounded by the
//! segment's announced raw size, itself bounded by [`MAX_SEGMENT`].

use dwcp_core::error::{ChunkError, Error};
use dwcp_hde::Codec;

use crate::wire::{Encoding, MAX_SEGMENT};

/// Compression must save at least this fraction of the raw bytes to be used (otherwise the receiver
/// would pay for decompression for nothing).
const MIN_SAVING: f64 = 0.03;
/// Bytes sampled with LZ4 to judge whether a segment compresses at all.
const PROBE_BYTES: usize = 8 * 1024;

/// The raw bytes of one segment, in a buffer that may hold other bytes before them: a segment sent
/// raw is passed on in the very buffer its frame was read into, behind the frame's data header,
/// instead of being copied out of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawSegment {
    buffer: Vec<u8>,
    start: usize,
}

impl RawSegment {
    /// The bytes of `buffer` from `start` on (`start` is clamped to the buffer's length).
    pub fn new(buffer: Vec<u8>, start: usize) -> Self {
        let start = start.min(buffer.len());
        Self { buffer, start }
    }

    /// The whole buffer back, for reuse.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buffer
    }
}

impl From<Vec<u8>> for RawSegment {
    fn from(buffer: Vec<u8>) -> Self {
        Self { buffer, start: 0 }
    }
}

impl std::ops::Deref for RawSegment {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buffer[self.start..]
    }
}

fn all_zero(raw: &[u8]) -> bool {
    // Blocks of 256 bytes, each ORed eight bytes at a time (which the compiler vectorises), so that
    // a segment of guest data, rarely all zero, is given up on at its first non-zero block instead
    // of read whole.
    raw.chunks(256).all(|block| {
        let words = block.chunks_exact(8);
        let tail = words.remainder();
        words.fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().expect("8 bytes"))
        }) == 0
            && tail.iter().all(|&b| b == 0)
    })
}

/// Cheap test whether `raw` compresses: LZ4 on up to [`PROBE_BYTES`] from its middle. Random data
/// (compressed or encrypted guest memory) is thus skipped without a full compression pass.
fn probably_compressible(raw: &[u8], scratch: &mut Vec<u8>) -> bool {
    if raw.len() <= PROBE_BYTES {
        return true;
    }
    let at = (raw.len() - PROBE_BYTES) / 2;
    let sample = &raw[at..at + PROBE_BYTES];
    scratch.clear();
    scratch.resize(lz4_flex::block::get_maximum_output_size(PROBE_BYTES), 0);
    let n = lz4_flex::block::compress_into(sample, scratch).unwrap_or(PROBE_BYTES);
    (n as f64) < PROBE_BYTES as f64 * (1.0 - MIN_SAVING)
}

/// Encodes `raw` (1..=[`MAX_SEGMENT`] bytes) with `codec`, appending the compressed body to `out`.
/// Returns the encoding used. For [`Encoding::Raw`] and [`Encoding::Zero`] nothing is appended: the
/// body is `raw` itself, or empty.
pub fn encode(codec: Codec, raw: &[u8], out: &mut Vec<u8>, scratch: &mut Vec<u8>) -> Encoding {
    debug_assert!(!raw.is_empty() && raw.len() <= MAX_SEGMENT);
    let start = out.len();
    if all_zero(raw) {
        return Encoding::Zero;
    }
    if codec == Codec::None || !probably_compressible(raw, scratch) {
        return Encoding::Raw;
    }
    let limit = raw.len() as f64 * (1.0 - MIN_SAVING);
    match codec {
        Codec::Lz4 => {
            out.resize(
                start + lz4_flex::block::get_maximum_output_size(raw.len()),
                0,
            );
            match lz4_flex::block::compress_into(raw, &mut out[start..]) {
                Ok(n) if (n as f64) < limit => {
                    out.truncate(start + n);
                    Encoding::Lz4
                }
                _ => {
                    out.truncate(start);
                    Encoding::Raw
                }
            }
        }
        Codec::Zstd(level) => {
            out.resize(start + zstd::zstd_safe::compress_bound(raw.len()), 0);
            match zstd::bulk::compress_to_buffer(raw, &mut out[start..], level) {
                Ok(n) if (n as f64) < limit => {
                    out.truncate(start + n);
                    Encoding::Zstd
                }
                _ => {
                    out.truncate(start);
                    Encoding::Raw
                }
            }
        }
        Codec::None => Encoding::Raw,
    }
}

/// Decodes a segment body into `out` (cleared first), which ends up exactly `raw_len` bytes long.
/// `raw_len` must already be checked against [`MAX_SEGMENT`] (the wire decoder does).
pub fn decode(
    encoding: Encoding,
    raw_len: u32,
    body: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    let raw_len = raw_len as usize;
    if raw_len > MAX_SEGMENT {
        return Err(ChunkError::Invalid(format!("segment of {raw_len} bytes")).into());
    }
    match encoding {
        Encoding::Raw => {
            out.clear();
            if body.len() != raw_len {
                return Err(ChunkError::Invalid(format!(
                    "raw body of {} bytes for {raw_len}",
                    body.len()
                ))
                .into());
            }
            out.extend_from_slice(body);
        }
        Encoding::Zero => {
            out.clear();
            out.resize(raw_len, 0);
        }
        // No clear before these: the decompressor overwrites all `raw_len` bytes it reports, so a
        // reused buffer needs no zero-filling.
        Encoding::Lz4 => {
            out.resize(raw_len, 0);
            let n = lz4_flex::block::decompress_into(body, out)
                .map_err(|e| ChunkError::Decompress(format!("lz4: {e}")))?;
            if n != raw_len {
                return Err(ChunkError::Decompress(format!(
                    "lz4 gave {n} bytes, expected {raw_len}"
                ))
                .into());
            }
        }
        Encoding::Zstd => {
            out.resize(raw_len, 0);
            let n = zstd::bulk::decompress_to_buffer(body, &mut out[..])
                .map_err(|e| ChunkError::Decompress(format!("zstd: {e}")))?;
            if n != raw_len {
                return Err(ChunkError::Decompress(format!(
                    "zstd gave {n} bytes, expected {raw_len}"
                ))
                .into());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| format!("log line {i} with some text\n").into_bytes())
            .take(n)
            .collect()
    }

    fn pseudo_random(n: usize, mut x: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn check(codec: Codec, raw: &[u8]) -> Encoding {
        let (mut body, mut scratch, mut back) = (vec![7u8; 3], Vec::new(), Vec::new());
        let enc = encode(codec, raw, &mut body, &mut scratch);
        assert_eq!(&body[..3], &[7, 7, 7], "what was in the buffer stays");
        let body = if enc == Encoding::Raw {
            raw
        } else {
            &body[3..]
        };
        decode(enc, raw.len() as u32, body, &mut back).unwrap();
        assert_eq!(back, raw);
        enc
    }

    #[test]
    fn chooses_the_encoding_by_content() {
        assert_eq!(check(Codec::Lz4, &vec![0; MAX_SEGMENT]), Encoding::Zero);
        assert_eq!(check(Codec::None, &[0; 5]), Encoding::Zero);
        assert_eq!(check(Codec::Lz4, &text(MAX_SEGMENT)), Encoding::Lz4);
        assert_eq!(check(Codec::Zstd(1), &text(100_000)), Encoding::Zstd);
        assert_eq!(check(Codec::None, &text(100_000)), Encoding::Raw);
        assert_eq!(
            check(Codec::Zstd(3), &pseudo_random(MAX_SEGMENT, 7)),
            Encoding::Raw
        );
        let mut one_byte = vec![0; 4096];
        one_byte[4095] = 1;
        assert_eq!(check(Codec::Lz4, &one_byte), Encoding::Lz4);
    }

    #[test]
    fn finds_a_single_non_zero_byte_anywhere() {
        for len in [1, 7, 8, 255, 256, 257, 4096, MAX_SEGMENT] {
            assert!(all_zero(&vec![0; len]));
            for at in [0, len / 2, len - 1] {
                let mut raw = vec![0; len];
                raw[at] = 0x80;
                assert!(!all_zero(&raw), "byte {at} of {len}");
            }
        }
    }

    #[test]
    fn a_raw_segment_is_the_bytes_after_its_start() {
        let seg = RawSegment::new(b"headerbody".to_vec(), 6);
        assert_eq!(&*seg, b"body");
        assert_eq!(seg.into_buffer(), b"headerbody");
        assert!(RawSegment::new(vec![1, 2], 5).is_empty());
        assert_eq!(&*RawSegment::from(vec![3, 4]), &[3, 4]);
    }

    #[test]
    fn refuses_bodies_that_do_not_match_their_size() {
        let raw = text(50_000);
        let lz4 = lz4_flex::block::compress(&raw);
        let zstd = zstd::bulk::compress(&raw, 1).unwrap();
        let mut out = Vec::new();
        assert!(decode(Encoding::Lz4, 49_999, &lz4, &mut out).is_err());
        assert!(decode(Encoding::Zstd, 50_001, &zstd, &mut out).is_err());
        assert!(decode(Encoding::Zstd, 50_000, &lz4, &mut out).is_err());
        assert!(decode(Encoding::Raw, 3, b"ab", &mut out).is_err());
        assert!(decode(Encoding::Zero, MAX_SEGMENT as u32 + 1, b"", &mut out).is_err());
        decode(Encoding::Lz4, 50_000, &lz4, &mut out).unwrap();
        assert_eq!(out, raw);
        assert!(out.capacity() <= MAX_SEGMENT);
    }

    proptest! {
        #[test]
        fn any_bytes_roundtrip(raw in proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 1..20_000), codec in prop_oneof![Just(Codec::None), Just(Codec::Lz4), Just(Codec::Zstd(1))]) {
            check(codec, &raw);
        }

        #[test]
        fn garbage_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 1..512), raw_len in 1u32..=(MAX_SEGMENT as u32)) {
            let mut out = Vec::new();
            let _ = decode(Encoding::Lz4, raw_len, &body, &mut out);
            let _ = decode(Encoding::Zstd, raw_len, &body, &mut out);
            prop_assert!(out.capacity() <= MAX_SEGMENT);
        }
    }
}
