//! Wire protocol v1 frames: a fixed 40-byte header followed by a payload.
//!
//! ```text
//! offset size field
//!  0     4    magic "DWCP"
//!  4     1    version (1)
//!  5     1    frame type
//!  6     2    flags (zero in v1)
//!  8     8    session id (0 until the server assigns one)
//! 16     8    stream sequence (per stream and direction, from 0, +1 per frame)
//! 24     4    payload length
//! 28     4    reserved (zero)
//! 32     8    checksum: xxh3-64 of the payload, seeded with xxh3-64 of bytes 0..32
//! ```
//! All integers are little-endian. The codec is pure (slices in, slices out); [`FrameReader`] and
//! [`FrameWriter`] add sequence and session checks over any `Read`/`Write`.
//!
//! Over 600 lines because of its unit tests (from `mod tests` on); the codec itself is under 480.

use std::io::{self, Read, Write};

use crate::hash::{Xxh3Stream, xxh3_64, xxh3_64_with_seed};

use crate::error::{Error, FrameError};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"DWCP";
/// The frame header's version byte. It stays 1 across session versions (see
/// `handshake::MIN_VERSION`..`MAX_VERSION`): a version 1 peer drops a frame with any other value
/// before it could read the version offer.
pub const PROTOCOL_VERSION: u8 = 1;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 40;
/// Largest payload any v1 frame may carry (a chunk of up to 256 literal pages plus its descriptors).
pub const MAX_PAYLOAD: u32 = 1024 * 1024 + 64 * 1024;
/// Largest payload accepted before authentication completes.
pub const MAX_HANDSHAKE_PAYLOAD: u32 = 4096;

/// Kinds of frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FrameType {
    /// Client opens a stream: versions, capabilities, nonce.
    ClientHello = 1,
    /// Server answers: chosen version, nonce, its proof of the key.
    ServerHello = 2,
    /// Client's proof of the key.
    ClientAuth = 3,
    /// Server accepted the client's proof.
    AuthOk = 4,
    /// Source announces the memory layout and migration parameters.
    SessionInit = 5,
    /// Destination accepts the layout.
    SessionReady = 6,
    /// A chunk of encoded pages.
    Data = 7,
    /// Cumulative acknowledgement of applied data frames on this stream.
    Ack = 8,
    /// Source is paused and every data frame is acknowledged.
    Finish = 9,
    /// Destination's whole-memory digest.
    Verdict = 10,
    /// Source's digest, equal to the destination's: the destination takes over the VM.
    Commit = 11,
    /// Destination took ownership of the VM.
    CommitAck = 12,
    /// The sender ends the session with an error.
    Error = 13,
    /// Orderly end of a stream.
    Close = 14,
    /// After a completed session: keep this authenticated stream for a later session (connection
    /// pool). The destination answers with Park when it has parked the stream.
    Park = 15,
    /// Health check of a parked stream (8-byte nonce).
    Ping = 16,
    /// Answer to Ping (the same nonce).
    Pong = 17,
    /// A parked stream joins a running session (session id and stream index).
    Join = 18,
    /// The session's zstd dictionary (HDE), sent once on stream 0 before SessionInit.
    Dictionary = 19,
    /// QEMU tunnel (`dwcp-qemu`): the source proposes the tunnel's parameters (stream 0).
    TunnelInit = 32,
    /// QEMU tunnel: the destination accepts them (stream 0).
    TunnelReady = 33,
    /// QEMU tunnel: a new QEMU connection was accepted; open the matching one.
    ChannelOpen = 34,
    /// QEMU tunnel: one segment of a QEMU connection's byte stream.
    ChannelData = 35,
    /// QEMU tunnel: bytes of a channel delivered to the local QEMU (flow-control credit).
    ChannelAck = 36,
    /// QEMU tunnel: one direction of a channel ended in order (half-close).
    ChannelEnd = 37,
    /// QEMU tunnel: a channel failed; both its connections are to be torn down.
    ChannelReset = 38,
    /// QEMU tunnel: nothing else to send; keeps an idle stream alive.
    Keepalive = 39,
    /// Post-copy (`dwcp-postcopy`): part of a set of pages, as ranges: the pages the destination
    /// still lacks (from the source when post-copy starts, from the destination when it resumes).
    PostcopyMissing = 48,
    /// Post-copy: the source ends the set it sent; the destination may run the VM.
    PostcopyStart = 49,
    /// Post-copy: the destination ends the set it sent after a reconnect; the source resumes.
    PostcopyResume = 50,
    /// Post-copy: the destination faulted on these pages and waits for them (urgent stream).
    PageRequest = 51,
    /// Post-copy: whole pages, each with its number (urgent and background streams).
    PostcopyPages = 52,
    /// Post-copy: the destination placed every page; its digest of them.
    PostcopyComplete = 53,
    /// Pre-copy could not converge: every data frame is acknowledged and the session ends here,
    /// its memory left for post-copy (payload as Finish; stream 0 of the migration session, S→D).
    PostcopySwitch = 54,
}

impl FrameType {
    /// Parses the type byte.
    pub fn from_wire(byte: u8) -> Result<Self, FrameError> {
        Ok(match byte {
            1 => Self::ClientHello,
            2 => Self::ServerHello,
            3 => Self::ClientAuth,
            4 => Self::AuthOk,
            5 => Self::SessionInit,
            6 => Self::SessionReady,
            7 => Self::Data,
            8 => Self::Ack,
            9 => Self::Finish,
            10 => Self::Verdict,
            11 => Self::Commit,
            12 => Self::CommitAck,
            13 => Self::Error,
            14 => Self::Close,
            15 => Self::Park,
            16 => Self::Ping,
            17 => Self::Pong,
            18 => Self::Join,
            19 => Self::Dictionary,
            32 => Self::TunnelInit,
            33 => Self::TunnelReady,
            34 => Self::ChannelOpen,
            35 => Self::ChannelData,
            36 => Self::ChannelAck,
            37 => Self::ChannelEnd,
            38 => Self::ChannelReset,
            39 => Self::Keepalive,
            48 => Self::PostcopyMissing,
            49 => Self::PostcopyStart,
            50 => Self::PostcopyResume,
            51 => Self::PageRequest,
            52 => Self::PostcopyPages,
            53 => Self::PostcopyComplete,
            54 => Self::PostcopySwitch,
            other => return Err(FrameError::UnknownType(other)),
        })
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::ClientHello => "ClientHello",
            Self::ServerHello => "ServerHello",
            Self::ClientAuth => "ClientAuth",
            Self::AuthOk => "AuthOk",
            Self::SessionInit => "SessionInit",
            Self::SessionReady => "SessionReady",
            Self::Data => "Data",
            Self::Ack => "Ack",
            Self::Finish => "Finish",
            Self::Verdict => "Verdict",
            Self::Commit => "Commit",
            Self::CommitAck => "CommitAck",
            Self::Error => "Error",
            Self::Close => "Close",
            Self::Park => "Park",
            Self::Ping => "Ping",
            Self::Pong => "Pong",
            Self::Join => "Join",
            Self::Dictionary => "Dictionary",
            Self::TunnelInit => "TunnelInit",
            Self::TunnelReady => "TunnelReady",
            Self::ChannelOpen => "ChannelOpen",
            Self::ChannelData => "ChannelData",
            Self::ChannelAck => "ChannelAck",
            Self::ChannelEnd => "ChannelEnd",
            Self::ChannelReset => "ChannelReset",
            Self::Keepalive => "Keepalive",
            Self::PostcopyMissing => "PostcopyMissing",
            Self::PostcopyStart => "PostcopyStart",
            Self::PostcopyResume => "PostcopyResume",
            Self::PageRequest => "PageRequest",
            Self::PostcopyPages => "PostcopyPages",
            Self::PostcopyComplete => "PostcopyComplete",
            Self::PostcopySwitch => "PostcopySwitch",
        }
    }
}

/// The decoded fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Kind of frame.
    pub frame_type: FrameType,
    /// Flags (zero in v1).
    pub flags: u16,
    /// Session the frame belongs to.
    pub session_id: u64,
    /// Position of the frame on its stream.
    pub seq: u64,
    /// Payload length in bytes.
    pub len: u32,
}

/// Serialises a header for `payload`, computing the checksum.
pub fn encode_header(
    frame_type: FrameType,
    session_id: u64,
    seq: u64,
    payload: &[u8],
) -> [u8; HEADER_LEN] {
    encode_header_prefixed(frame_type, session_id, seq, &[], payload)
}

fn checksum(header: &[u8; HEADER_LEN], payload: &[u8]) -> u64 {
    xxh3_64_with_seed(payload, xxh3_64(&header[..32]))
}

/// Serialises a header for a payload made of `prefix` followed by `body` (the checksum covers both, as
/// if they were one payload).
pub fn encode_header_prefixed(
    frame_type: FrameType,
    session_id: u64,
    seq: u64,
    prefix: &[u8],
    body: &[u8],
) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = PROTOCOL_VERSION;
    h[5] = frame_type as u8;
    h[8..16].copy_from_slice(&session_id.to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    let len =
        u32::try_from(prefix.len() + body.len()).expect("payload length is bounded by MAX_PAYLOAD");
    h[24..28].copy_from_slice(&len.to_le_bytes());
    let sum = if prefix.is_empty() {
        // One pass over one slice: the one-shot hash is faster than the streaming one (27 against
        // 21 GB/s here), and most frames (all of the QEMU tunnel's) have no prefix.
        checksum(&h, body)
    } else {
        let mut hasher = Xxh3Stream::with_seed(xxh3_64(&h[..32]));
        hasher.update(prefix);
        hasher.update(body);
        hasher.digest()
    };
    h[32..40].copy_from_slice(&sum.to_le_bytes());
    h
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

/// Validates a header's fixed fields and length bound. The checksum is checked by [`verify_payload`]
/// once the payload has been read.
pub fn decode_header(h: &[u8; HEADER_LEN], max_payload: u32) -> Result<FrameHeader, FrameError> {
    if h[0..4] != MAGIC {
        return Err(FrameError::BadMagic(u32::from_be_bytes(
            h[0..4].try_into().expect("4"),
        )));
    }
    if h[4] != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion(h[4]));
    }
    let frame_type = FrameType::from_wire(h[5])?;
    let flags = u16::from_le_bytes([h[6], h[7]]);
    if flags != 0 || le_u32(&h[28..32]) != 0 {
        return Err(FrameError::ReservedNonZero);
    }
    let len = le_u32(&h[24..28]);
    if len > max_payload {
        return Err(FrameError::Oversize {
            len: len.into(),
            max: max_payload.into(),
        });
    }
    Ok(FrameHeader {
        frame_type,
        flags,
        session_id: le_u64(&h[8..16]),
        seq: le_u64(&h[16..24]),
        len,
    })
}

/// Checks the checksum of a header and its payload.
pub fn verify_payload(h: &[u8; HEADER_LEN], payload: &[u8]) -> Result<(), FrameError> {
    if checksum(h, payload) == le_u64(&h[32..40]) {
        Ok(())
    } else {
        Err(FrameError::ChecksumMismatch)
    }
}

/// Decodes one whole frame from the front of `buf`; returns the header, the payload and the bytes used.
pub fn decode_frame(
    buf: &[u8],
    max_payload: u32,
) -> Result<(FrameHeader, &[u8], usize), FrameError> {
    let header: &[u8; HEADER_LEN] = buf
        .get(..HEADER_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or(FrameError::Truncated {
            needed: HEADER_LEN,
            have: buf.len(),
        })?;
    let fh = decode_header(header, max_payload)?;
    let total = HEADER_LEN + fh.len as usize;
    let payload = buf.get(HEADER_LEN..total).ok_or(FrameError::Truncated {
        needed: total,
        have: buf.len(),
    })?;
    verify_payload(header, payload)?;
    Ok((fh, payload, total))
}

/// Appends a whole frame (header and payload) to `out`.
pub fn encode_frame(
    frame_type: FrameType,
    session_id: u64,
    seq: u64,
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(&encode_header(frame_type, session_id, seq, payload));
    out.extend_from_slice(payload);
}

/// Reads frames from one direction of a stream, enforcing sequence, session and size limits.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    next_seq: u64,
    session_id: Option<u64>,
    max_payload: u32,
}

impl<R: Read> FrameReader<R> {
    /// A reader for a fresh stream; before authentication only small payloads are accepted.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            next_seq: 0,
            session_id: None,
            max_payload: MAX_HANDSHAKE_PAYLOAD,
        }
    }

    /// Binds the reader to a session (frames of other sessions are refused from now on) and raises the
    /// payload limit to `max_payload`.
    pub fn bind_session(&mut self, session_id: u64, max_payload: u32) {
        self.session_id = Some(session_id);
        self.max_payload = max_payload.min(MAX_PAYLOAD);
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Reads the next frame, placing its payload in `payload` (made exactly the payload's length;
    /// grows to at most the payload limit). On error the stream must be abandoned, and `payload`
    /// holds unspecified bytes.
    pub fn read_frame(&mut self, payload: &mut Vec<u8>) -> Result<FrameHeader, Error> {
        let mut h = [0u8; HEADER_LEN];
        self.inner
            .read_exact(&mut h)
            .map_err(|e| read_error(e, "frame header"))?;
        let fh = decode_header(&h, self.max_payload)?;
        if fh.seq != self.next_seq {
            return Err(FrameError::UnexpectedSequence {
                expected: self.next_seq,
                got: fh.seq,
            }
            .into());
        }
        if let Some(expected) = self.session_id {
            if fh.session_id != expected {
                return Err(FrameError::WrongSession {
                    expected,
                    got: fh.session_id,
                }
                .into());
            }
        }
        // Not cleared first: `read_exact` overwrites every byte, so only bytes the buffer never held
        // need zero-filling (a memset of every 1 MiB payload cost as much as the copy out of it).
        let len = fh.len as usize;
        if payload.len() >= len {
            payload.truncate(len);
        } else {
            // Exact: `resize` alone grows the reused buffer by doubling, past the payload limit.
            payload.reserve_exact(len - payload.len());
            payload.resize(len, 0);
        }
        self.inner
            .read_exact(payload)
            .map_err(|e| read_error(e, "frame payload"))?;
        verify_payload(&h, payload)?;
        self.next_seq += 1;
        Ok(fh)
    }
}

fn read_error(e: io::Error, what: &str) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Error::io(format!("peer closed the stream while we read a {what}"), e)
    } else {
        Error::io(format!("reading {what}"), e)
    }
}

/// Writes frames on one direction of a stream, numbering them.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    next_seq: u64,
    session_id: u64,
}

impl<W: Write> FrameWriter<W> {
    /// A writer for a fresh stream.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            next_seq: 0,
            session_id: 0,
        }
    }

    /// Stamps every following frame with `session_id`.
    pub fn bind_session(&mut self, session_id: u64) {
        self.session_id = session_id;
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Writes one frame (header and payload in one vectored write where the OS allows).
    pub fn write_frame(&mut self, frame_type: FrameType, payload: &[u8]) -> Result<u64, Error> {
        let seq = self.next_seq;
        let h = encode_header(frame_type, self.session_id, seq, payload);
        write_all_vectored(&mut self.inner, &h, payload)
            .map_err(|e| Error::io(format!("writing a {} frame", frame_type.name()), e))?;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Writes one frame whose payload is `prefix` (at most 64 bytes, e.g. a data frame's chunk id)
    /// followed by `body`, without copying `body`.
    pub fn write_frame_prefixed(
        &mut self,
        frame_type: FrameType,
        prefix: &[u8],
        body: &[u8],
    ) -> Result<u64, Error> {
        const MAX_PREFIX: usize = 64;
        assert!(prefix.len() <= MAX_PREFIX, "frame prefix too long");
        let seq = self.next_seq;
        let h = encode_header_prefixed(frame_type, self.session_id, seq, prefix, body);
        let mut head = [0u8; HEADER_LEN + MAX_PREFIX];
        head[..HEADER_LEN].copy_from_slice(&h);
        head[HEADER_LEN..HEADER_LEN + prefix.len()].copy_from_slice(prefix);
        write_all_vectored(&mut self.inner, &head[..HEADER_LEN + prefix.len()], body)
            .map_err(|e| Error::io(format!("writing a {} frame", frame_type.name()), e))?;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Flushes buffered bytes.
    pub fn flush(&mut self) -> Result<(), Error> {
        self.inner
            .flush()
            .map_err(|e| Error::io("flushing stream", e))
    }
}

fn write_all_vectored<W: Write>(w: &mut W, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = if a.is_empty() {
            w.write(b)?
        } else {
            w.write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refuses_corruption_truncation_and_oversize() {
        let mut buf = Vec::new();
        encode_frame(FrameType::Data, 7, 3, b"hello pages", &mut buf);
        assert!(decode_frame(&buf, MAX_PAYLOAD).is_ok());

        for cut in 0..buf.len() {
            assert!(matches!(
                decode_frame(&buf[..cut], MAX_PAYLOAD),
                Err(FrameError::Truncated { .. })
            ));
        }
        let mut corrupt = buf.clone();
        *corrupt.last_mut().unwrap() ^= 1;
        assert_eq!(
            decode_frame(&corrupt, MAX_PAYLOAD).unwrap_err(),
            FrameError::ChecksumMismatch
        );
        let mut wrong_session = buf.clone();
        wrong_session[8] ^= 1;
        assert_eq!(
            decode_frame(&wrong_session, MAX_PAYLOAD).unwrap_err(),
            FrameError::ChecksumMismatch
        );
        assert!(matches!(
            decode_frame(&buf, 4),
            Err(FrameError::Oversize { len: 11, max: 4 })
        ));
        let mut v2 = buf.clone();
        v2[4] = 2;
        assert_eq!(
            decode_frame(&v2, MAX_PAYLOAD).unwrap_err(),
            FrameError::UnsupportedVersion(2)
        );
        let mut magic = buf.clone();
        magic[0] = b'X';
        assert!(matches!(
            decode_frame(&magic, MAX_PAYLOAD),
            Err(FrameError::BadMagic(_))
        ));
        let mut ty = buf;
        ty[5] = 200;
        assert_eq!(
            decode_frame(&ty, MAX_PAYLOAD).unwrap_err(),
            FrameError::UnknownType(200)
        );
    }

    #[test]
    fn reader_enforces_sequence_and_session() {
        let mut wire = Vec::new();
        let mut w = FrameWriter::new(&mut wire);
        w.bind_session(5);
        w.write_frame(FrameType::Ack, b"a").unwrap();
        w.write_frame(FrameType::Ack, b"b").unwrap();
        let mut skipped = Vec::new();
        encode_frame(FrameType::Ack, 5, 0, b"a", &mut skipped);
        encode_frame(FrameType::Ack, 5, 2, b"c", &mut skipped);

        let mut r = FrameReader::new(&wire[..]);
        r.bind_session(5, MAX_PAYLOAD);
        let mut p = Vec::new();
        assert_eq!(r.read_frame(&mut p).unwrap().seq, 0);
        assert_eq!(r.read_frame(&mut p).unwrap().seq, 1);
        assert_eq!(p, b"b");

        let mut r = FrameReader::new(&skipped[..]);
        r.bind_session(5, MAX_PAYLOAD);
        r.read_frame(&mut p).unwrap();
        let err = r.read_frame(&mut p).unwrap_err();
        assert!(matches!(
            err,
            Error::Frame(FrameError::UnexpectedSequence {
                expected: 1,
                got: 2
            })
        ));

        let mut r = FrameReader::new(&wire[..]);
        r.bind_session(6, MAX_PAYLOAD);
        assert!(matches!(
            r.read_frame(&mut p).unwrap_err(),
            Error::Frame(FrameError::WrongSession { .. })
        ));
    }

    #[test]
    fn unauthenticated_reader_refuses_large_payloads() {
        let mut wire = Vec::new();
        encode_frame(
            FrameType::ClientHello,
            0,
            0,
            &vec![0u8; 64 * 1024],
            &mut wire,
        );
        let mut r = FrameReader::new(&wire[..]);
        let mut p = Vec::new();
        assert!(matches!(
            r.read_frame(&mut p).unwrap_err(),
            Error::Frame(FrameError::Oversize { .. })
        ));
        assert!(
            p.capacity() < 64 * 1024,
            "no allocation for a refused frame"
        );
    }

    /// Found by the `frame` fuzz target: a reused payload buffer grew by doubling to 78 bytes under a
    /// 64-byte limit (a 39-byte frame, then a 40-byte one); after a 600 KiB frame, a full chunk made
    /// it 1.2 MiB, above `MAX_PAYLOAD`.
    #[test]
    fn reused_payload_buffer_never_grows_beyond_the_limit() {
        for (limit, sizes) in [
            (64, vec![39usize, 40, 64]),
            (MAX_HANDSHAKE_PAYLOAD, vec![48, 2100, 4096]),
            (MAX_PAYLOAD, vec![600 * 1024, MAX_PAYLOAD as usize]),
        ] {
            let mut wire = Vec::new();
            let mut w = FrameWriter::new(&mut wire);
            w.bind_session(9);
            for &n in &sizes {
                w.write_frame(FrameType::Data, &vec![1u8; n]).unwrap();
            }
            let mut r = FrameReader::new(&wire[..]);
            r.bind_session(9, limit);
            let mut p = Vec::new();
            for &n in &sizes {
                r.read_frame(&mut p).unwrap();
                assert_eq!(p.len(), n);
                assert!(
                    p.capacity() <= limit as usize,
                    "{} bytes of capacity under a limit of {limit}",
                    p.capacity()
                );
            }
        }
    }

    #[test]
    fn a_reused_payload_buffer_holds_exactly_each_payload() {
        // Long, short, empty, long again: the buffer is not cleared between frames, so each read
        // must still end up exactly its own payload.
        let payloads: Vec<Vec<u8>> = [5000usize, 7, 0, 6000]
            .iter()
            .enumerate()
            .map(|(k, &n)| (0..n).map(|i| (i * 31 + k) as u8).collect())
            .collect();
        let mut wire = Vec::new();
        let mut w = FrameWriter::new(&mut wire);
        w.bind_session(3);
        for p in &payloads {
            w.write_frame(FrameType::Data, p).unwrap();
        }
        let mut r = FrameReader::new(&wire[..]);
        r.bind_session(3, MAX_PAYLOAD);
        let mut got = Vec::new();
        for p in &payloads {
            r.read_frame(&mut got).unwrap();
            assert_eq!(&got, p);
        }
    }

    #[test]
    fn type_bytes_outside_the_assigned_ranges_are_unknown() {
        for byte in (0u8..=255)
            .filter(|b| !(1..=19).contains(b) && !(32..=39).contains(b) && !(48..=54).contains(b))
        {
            assert_eq!(
                FrameType::from_wire(byte),
                Err(FrameError::UnknownType(byte))
            );
        }
        for byte in (1u8..=19).chain(32..=39).chain(48..=54) {
            assert_eq!(FrameType::from_wire(byte).unwrap() as u8, byte);
        }
    }

    proptest! {
        #[test]
        fn roundtrip(ty in prop_oneof![1u8..=19, 32u8..=39, 48u8..=54], session: u64, seq: u64, payload in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let ty = FrameType::from_wire(ty).unwrap();
            let mut buf = Vec::new();
            encode_frame(ty, session, seq, &payload, &mut buf);
            buf.extend_from_slice(b"trailing");
            let (h, p, used) = decode_frame(&buf, MAX_PAYLOAD).unwrap();
            prop_assert_eq!(h, FrameHeader { frame_type: ty, flags: 0, session_id: session, seq, len: payload.len() as u32 });
            prop_assert_eq!(p, &payload[..]);
            prop_assert_eq!(used, HEADER_LEN + payload.len());
        }

        #[test]
        fn prefixed_frames_equal_the_concatenated_payload(prefix in proptest::collection::vec(any::<u8>(), 0..=64), body in proptest::collection::vec(any::<u8>(), 0..2048), seq in 0u64..4) {
            let mut split = FrameWriter::new(Vec::new());
            let mut whole = FrameWriter::new(Vec::new());
            for _ in 0..seq {
                split.write_frame(FrameType::Ack, &[]).unwrap();
                whole.write_frame(FrameType::Ack, &[]).unwrap();
            }
            split.bind_session(9);
            whole.bind_session(9);
            split.write_frame_prefixed(FrameType::Data, &prefix, &body).unwrap();
            let joined: Vec<u8> = prefix.iter().chain(&body).copied().collect();
            whole.write_frame(FrameType::Data, &joined).unwrap();
            prop_assert_eq!(split.get_ref(), whole.get_ref());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame(&bytes, MAX_PAYLOAD);
        }

        #[test]
        fn any_single_bit_flip_is_detected(payload in proptest::collection::vec(any::<u8>(), 1..512), bit in 0usize..(40 * 8)) {
            let mut buf = Vec::new();
            encode_frame(FrameType::Data, 1, 1, &payload, &mut buf);
            let bit = bit % (buf.len() * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode_frame(&buf, MAX_PAYLOAD).is_err());
        }
    }
}
