//! Properties of the frame decoders: `dwcp_core::frame::decode_frame` and `FrameReader::read_frame`.
//!
//! Input: byte 0 is a control byte, the rest is the byte stream of one direction of a stream.
//!
//! | control bits | meaning |
//! |---|---|
//! | 0-1 | payload limit: 4096 (`MAX_HANDSHAKE_PAYLOAD`), `MAX_PAYLOAD`, 64, 0 |
//! | 2 | recompute every frame's checksum first, so mutations get past the checksum |
//! | 3 | build the stream: the rest is records `type (u8) ‖ len (u16 LE) ‖ payload`, encoded as valid frames numbered from 0 with session id [`BUILD_SESSION`] (type byte `t` gives type `t % 14 + 1`; a short record takes what is left) |
//! | 4-5 | how many bytes one `read` of the underlying reader returns at most |
//! | 6 | bind the reader (session id from bytes 8..16 of the stream, the limit above) before reading |
//! | 7 | bind the reader after its first frame (to that frame's session id, the limit above) |
//!
//! Checked: no panic; `decode_frame` consumes exactly 40 + the header's length, never more than the
//! limit, and a decoded frame re-encodes to the same bytes; its errors describe the input truthfully;
//! `FrameReader` enforces sequence, session and limit, refuses an oversize payload after reading only
//! the header and without allocating, never grows its payload buffer beyond the limit, and agrees
//! with `decode_frame` on every frame it accepts.

use std::io::{self, Read};

use dwcp_core::error::{Error, FrameError};
use dwcp_core::frame::{
    FrameReader, FrameType, HEADER_LEN, MAX_HANDSHAKE_PAYLOAD, MAX_PAYLOAD, decode_frame,
    decode_header, encode_frame,
};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

const LIMITS: [u32; 4] = [MAX_HANDSHAKE_PAYLOAD, MAX_PAYLOAD, 64, 0];
const READ_STEPS: [usize; 4] = [usize::MAX, 1, 39, 4096];
/// Session id of the frames of a built stream (control bit 3).
pub const BUILD_SESSION: u64 = 0x5eed;

/// Runs every frame property on one fuzz input.
pub fn check(data: &[u8]) {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let limit = LIMITS[usize::from(ctl & 3)];
    let mut wire = if ctl & 8 != 0 {
        build(rest)
    } else {
        rest.to_vec()
    };
    if ctl & 4 != 0 {
        fix_checksums(&mut wire);
    }
    check_slice_decoder(&wire, limit);
    check_reader(&wire, ctl, limit);
}

/// Encodes the records of a built stream as frames.
pub fn build(mut records: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    let mut seq = 0;
    while let Some((t, payload, tail)) = crate::records::next_record(records) {
        let ty = FrameType::from_wire(t % 14 + 1).expect("1..=14 are frame types");
        encode_frame(ty, BUILD_SESSION, seq, payload, &mut wire);
        seq += 1;
        records = tail;
    }
    wire
}

/// Recomputes the checksum of each frame found by walking the length fields.
pub fn fix_checksums(buf: &mut [u8]) {
    let mut pos = 0usize;
    while buf.len() - pos >= HEADER_LEN {
        let len = u32::from_le_bytes(buf[pos + 24..pos + 28].try_into().unwrap()) as usize;
        let end = (pos + HEADER_LEN + len).min(buf.len());
        let seed = xxh3_64(&buf[pos..pos + 32]);
        let sum = xxh3_64_with_seed(&buf[pos + HEADER_LEN..end], seed);
        buf[pos + 32..pos + HEADER_LEN].copy_from_slice(&sum.to_le_bytes());
        pos = end;
    }
}

fn check_slice_decoder(buf: &[u8], limit: u32) {
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        match decode_frame(rest, limit) {
            Ok((h, payload, used)) => {
                assert_eq!(used, HEADER_LEN + h.len as usize, "consumed length");
                assert!(
                    h.len <= limit,
                    "payload of {} above the limit {limit}",
                    h.len
                );
                assert_eq!(h.flags, 0);
                assert_eq!(payload, &rest[HEADER_LEN..used]);
                let header: &[u8; HEADER_LEN] = rest[..HEADER_LEN].try_into().unwrap();
                assert_eq!(decode_header(header, limit), Ok(h));
                let mut again = Vec::new();
                encode_frame(h.frame_type, h.session_id, h.seq, payload, &mut again);
                assert_eq!(
                    again,
                    &rest[..used],
                    "a decoded frame re-encodes to its bytes"
                );
                // Trailing bytes do not matter, a missing byte does.
                assert_eq!(decode_frame(&rest[..used], limit), Ok((h, payload, used)));
                assert_eq!(
                    decode_frame(&rest[..used - 1], limit),
                    Err(FrameError::Truncated {
                        needed: used,
                        have: used - 1
                    })
                );
                pos += used;
            }
            Err(e) => {
                check_slice_error(rest, limit, &e);
                return;
            }
        }
    }
}

fn check_slice_error(rest: &[u8], limit: u32, e: &FrameError) {
    match *e {
        FrameError::Truncated { needed, have } => {
            assert_eq!(have, rest.len());
            assert!(needed > have, "{e:?}");
            if have >= HEADER_LEN {
                let len = u32::from_le_bytes(rest[24..28].try_into().unwrap());
                assert_eq!(needed, HEADER_LEN + len as usize);
            } else {
                assert_eq!(needed, HEADER_LEN);
            }
        }
        FrameError::Oversize { len, max } => {
            assert_eq!(max, u64::from(limit));
            assert!(len > max);
        }
        FrameError::BadMagic(_)
        | FrameError::UnsupportedVersion(_)
        | FrameError::UnknownType(_)
        | FrameError::ReservedNonZero
        | FrameError::ChecksumMismatch => {}
        ref other => panic!("decode_frame returned {other:?}"),
    }
}

/// A reader that hands out at most `step` bytes per call and remembers how far it got.
#[derive(Debug)]
struct Trickle<'a> {
    data: &'a [u8],
    pos: usize,
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = out.len().min(self.step).min(self.data.len() - self.pos);
        out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn check_reader(buf: &[u8], ctl: u8, limit: u32) {
    let step = READ_STEPS[usize::from((ctl >> 4) & 3)];
    let mut reader = FrameReader::new(Trickle {
        data: buf,
        pos: 0,
        step,
    });
    let bound_limit = limit.min(MAX_PAYLOAD);
    let mut cur_limit = MAX_HANDSHAKE_PAYLOAD;
    let mut bound = None;
    if ctl & 0x40 != 0 {
        let sid = buf
            .get(8..16)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
        reader.bind_session(sid, limit);
        bound = Some(sid);
        cur_limit = bound_limit;
    }
    let mut payload = Vec::new();
    let mut expected_seq = 0u64;
    loop {
        let start = reader.get_ref().pos;
        let cap_before = payload.capacity();
        let result = reader.read_frame(&mut payload);
        let consumed = reader.get_ref().pos - start;
        let rest = &buf[start..];
        match result {
            Ok(h) => {
                assert_eq!(consumed, HEADER_LEN + h.len as usize, "reader consumed");
                assert!(h.len <= cur_limit);
                assert_eq!(payload.len(), h.len as usize);
                assert_eq!(h.seq, expected_seq);
                if let Some(sid) = bound {
                    assert_eq!(h.session_id, sid);
                }
                assert!(
                    payload.capacity() <= cap_before.max(cur_limit as usize),
                    "payload buffer grew to {} bytes (was {cap_before}, limit {cur_limit})",
                    payload.capacity()
                );
                let (h2, p2, used) = decode_frame(rest, cur_limit)
                    .expect("the slice decoder accepts what the reader accepted");
                assert_eq!((h2, p2, used), (h, &payload[..], consumed));
                expected_seq += 1;
                if ctl & 0x80 != 0 && bound.is_none() {
                    reader.bind_session(h.session_id, limit);
                    bound = Some(h.session_id);
                    cur_limit = bound_limit;
                }
            }
            Err(Error::Frame(e)) => {
                let header_only = |what: &str| {
                    assert_eq!(consumed, HEADER_LEN, "{what}: only the header is read");
                    assert_eq!(payload.capacity(), cap_before, "{what}: nothing allocated");
                };
                match e {
                    FrameError::Oversize { len, max } => {
                        assert_eq!(max, u64::from(cur_limit));
                        assert!(len > max);
                        header_only("oversize");
                        assert_eq!(decode_frame(rest, cur_limit), Err(e));
                    }
                    FrameError::UnexpectedSequence { expected, got } => {
                        assert_eq!(expected, expected_seq);
                        assert_ne!(got, expected);
                        header_only("sequence");
                    }
                    FrameError::WrongSession { expected, got } => {
                        assert_eq!(bound, Some(expected));
                        assert_ne!(got, expected);
                        header_only("session");
                    }
                    FrameError::BadMagic(_)
                    | FrameError::UnsupportedVersion(_)
                    | FrameError::UnknownType(_)
                    | FrameError::ReservedNonZero => {
                        header_only("header");
                        assert_eq!(decode_frame(rest, cur_limit), Err(e));
                    }
                    FrameError::ChecksumMismatch => {
                        assert_eq!(consumed, HEADER_LEN + payload.len());
                        assert!(payload.len() <= cur_limit as usize);
                        assert_eq!(decode_frame(rest, cur_limit), Err(e));
                    }
                    other => panic!("read_frame returned {other:?}"),
                }
                return;
            }
            Err(Error::Io { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
                assert_eq!(consumed, rest.len(), "EOF only at the end of the input");
                assert!(payload.capacity() <= cap_before.max(cur_limit as usize));
                assert!(matches!(
                    decode_frame(rest, cur_limit),
                    Err(FrameError::Truncated { .. })
                ));
                return;
            }
            Err(other) => panic!("read_frame returned {other:?}"),
        }
    }
}
