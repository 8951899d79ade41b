//! Payloads of the tunnel's frame types (32..=39), encoded and decoded without I/O.
//!
//! Every integer is little-endian. Decoders require the exact length (or, for variable parts, a length
//! within the stated bound) and refuse anything else with [`FrameError::Malformed`], so bytes from the
//! network can never make a decoder panic or allocate more than the bound.

use dwcp_core::error::{Error, FrameError};
use dwcp_core::frame::FrameType;

/// Version of the tunnel protocol carried in [`TunnelInit`].
pub const TUNNEL_VERSION: u8 = 1;
/// Largest raw (decoded) size of one segment of a channel's byte stream.
pub const MAX_SEGMENT: usize = 256 * 1024;
/// Length of the fixed part of a ChannelData payload.
pub const DATA_HEADER_LEN: usize = 20;
/// Longest reason text in a ChannelReset.
pub const MAX_REASON: usize = 1024;
/// Highest channel id a peer may open (ids are assigned from 0 upwards, one per QEMU connection).
pub const MAX_CHANNEL_ID: u32 = 1 << 20;

/// How a segment's body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[repr(u8)]
pub enum Encoding {
    /// The body is the raw bytes.
    Raw = 0,
    /// The body is an LZ4 block (no size prefix) of the raw bytes.
    Lz4 = 1,
    /// The body is one zstd frame of the raw bytes.
    Zstd = 2,
    /// The raw bytes are all zero; the body is empty.
    Zero = 3,
}

impl Encoding {
    fn from_wire(b: u8) -> Result<Self, FrameError> {
        Ok(match b {
            0 => Self::Raw,
            1 => Self::Lz4,
            2 => Self::Zstd,
            3 => Self::Zero,
            other => {
                return Err(malformed(
                    "ChannelData",
                    format!("unknown encoding {other}"),
                ));
            }
        })
    }
}

/// TunnelInit (type 32, source → destination, stream 0, right after the handshake).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelInit {
    /// Tunnel protocol version ([`TUNNEL_VERSION`]).
    pub version: u8,
    /// Streams the source will open in this session (1..=64), stream 0 included.
    pub streams: u16,
    /// Per-channel, per-direction flow-control window the source proposes, in raw bytes.
    pub window: u32,
}

/// TunnelReady (type 33, destination → source, stream 0): the window both sides use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelReady {
    /// The accepted window: at most the proposal, at least [`MAX_SEGMENT`].
    pub window: u32,
}

/// One decoded tunnel message. `Data` borrows its body from the frame payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// TunnelInit.
    Init(TunnelInit),
    /// TunnelReady.
    Ready(TunnelReady),
    /// ChannelOpen: the source accepted QEMU connection `channel`.
    Open {
        /// Channel id.
        channel: u32,
    },
    /// ChannelData: segment `seq` of one direction of `channel`.
    Data {
        /// Channel id.
        channel: u32,
        /// Position of the segment in this direction of the channel, from 0.
        seq: u64,
        /// How `body` is encoded.
        encoding: Encoding,
        /// Bytes the segment decodes to (1..=[`MAX_SEGMENT`]).
        raw_len: u32,
        /// The encoded bytes.
        body: &'a [u8],
    },
    /// ChannelAck: raw bytes of `channel` the sender of the ack has written to its QEMU, cumulative.
    Ack {
        /// Channel id.
        channel: u32,
        /// Cumulative delivered bytes.
        delivered: u64,
    },
    /// ChannelEnd: the sender's QEMU closed its side; `segments` segments, `bytes` raw bytes in all.
    End {
        /// Channel id.
        channel: u32,
        /// Segments sent in this direction.
        segments: u64,
        /// Raw bytes sent in this direction.
        bytes: u64,
    },
    /// ChannelReset: the channel failed on the sender's side.
    Reset {
        /// Channel id.
        channel: u32,
        /// Why (UTF-8, at most [`MAX_REASON`] bytes).
        reason: String,
    },
    /// Keepalive: no content.
    Keepalive,
    /// Close (type 14): the sender will send nothing more on this stream.
    Close,
}

fn malformed(what: &'static str, why: impl Into<String>) -> FrameError {
    FrameError::Malformed {
        what,
        why: why.into(),
    }
}

fn exact<'a>(p: &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], FrameError> {
    if p.len() == n {
        Ok(p)
    } else {
        Err(malformed(what, format!("{} bytes, expected {n}", p.len())))
    }
}

fn u16_at(p: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([p[at], p[at + 1]])
}
fn u32_at(p: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(p[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(p: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(p[at..at + 8].try_into().expect("8 bytes"))
}

fn channel_id(c: u32, what: &'static str) -> Result<u32, FrameError> {
    if c < MAX_CHANNEL_ID {
        Ok(c)
    } else {
        Err(malformed(
            what,
            format!("channel id {c} ≥ {MAX_CHANNEL_ID}"),
        ))
    }
}

impl Message<'_> {
    /// The frame type that carries this message.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Message::Init(_) => FrameType::TunnelInit,
            Message::Ready(_) => FrameType::TunnelReady,
            Message::Open { .. } => FrameType::ChannelOpen,
            Message::Data { .. } => FrameType::ChannelData,
            Message::Ack { .. } => FrameType::ChannelAck,
            Message::End { .. } => FrameType::ChannelEnd,
            Message::Reset { .. } => FrameType::ChannelReset,
            Message::Keepalive => FrameType::Keepalive,
            Message::Close => FrameType::Close,
        }
    }

    /// The payload bytes of this message.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Message::Init(i) => {
                out.push(i.version);
                out.extend_from_slice(&i.streams.to_le_bytes());
                out.push(0);
                out.extend_from_slice(&i.window.to_le_bytes());
            }
            Message::Ready(r) => out.extend_from_slice(&r.window.to_le_bytes()),
            Message::Open { channel } => out.extend_from_slice(&channel.to_le_bytes()),
            Message::Data {
                channel,
                seq,
                encoding,
                raw_len,
                body,
            } => {
                out.extend_from_slice(&data_header(*channel, *seq, *encoding, *raw_len));
                out.extend_from_slice(body);
            }
            Message::Ack { channel, delivered } => {
                out.extend_from_slice(&channel.to_le_bytes());
                out.extend_from_slice(&delivered.to_le_bytes());
            }
            Message::End {
                channel,
                segments,
                bytes,
            } => {
                out.extend_from_slice(&channel.to_le_bytes());
                out.extend_from_slice(&segments.to_le_bytes());
                out.extend_from_slice(&bytes.to_le_bytes());
            }
            Message::Reset { channel, reason } => {
                out.extend_from_slice(&channel.to_le_bytes());
                out.extend_from_slice(truncate_utf8(reason, MAX_REASON).as_bytes());
            }
            Message::Keepalive | Message::Close => {}
        }
        out
    }

    /// Decodes the payload of a frame of type `frame_type`. Frame types that are not part of the
    /// tunnel protocol (other than Close) are refused with [`Error::Protocol`]; an Error frame is
    /// returned as [`Error::Peer`].
    pub fn decode(frame_type: FrameType, p: &[u8]) -> Result<Message<'_>, Error> {
        Ok(match frame_type {
            FrameType::TunnelInit => {
                let p = exact(p, 8, "TunnelInit")?;
                if p[3] != 0 {
                    return Err(malformed("TunnelInit", "reserved byte set").into());
                }
                Message::Init(TunnelInit {
                    version: p[0],
                    streams: u16_at(p, 1),
                    window: u32_at(p, 4),
                })
            }
            FrameType::TunnelReady => {
                let p = exact(p, 4, "TunnelReady")?;
                Message::Ready(TunnelReady {
                    window: u32_at(p, 0),
                })
            }
            FrameType::ChannelOpen => {
                let p = exact(p, 4, "ChannelOpen")?;
                Message::Open {
                    channel: channel_id(u32_at(p, 0), "ChannelOpen")?,
                }
            }
            FrameType::ChannelData => {
                if p.len() < DATA_HEADER_LEN {
                    return Err(malformed("ChannelData", format!("{} bytes", p.len())).into());
                }
                let channel = channel_id(u32_at(p, 0), "ChannelData")?;
                let encoding = Encoding::from_wire(p[12])?;
                if p[13..16] != [0, 0, 0] {
                    return Err(malformed("ChannelData", "reserved bytes set").into());
                }
                let raw_len = u32_at(p, 16);
                if raw_len == 0 || raw_len as usize > MAX_SEGMENT {
                    return Err(malformed(
                        "ChannelData",
                        format!("segment of {raw_len} bytes (1..={MAX_SEGMENT})"),
                    )
                    .into());
                }
                let body = &p[DATA_HEADER_LEN..];
                let body_ok = match encoding {
                    Encoding::Raw => body.len() == raw_len as usize,
                    Encoding::Zero => body.is_empty(),
                    Encoding::Lz4 | Encoding::Zstd => !body.is_empty(),
                };
                if !body_ok {
                    return Err(malformed(
                        "ChannelData",
                        format!(
                            "{encoding:?} body of {} bytes for {raw_len} raw bytes",
                            body.len()
                        ),
                    )
                    .into());
                }
                Message::Data {
                    channel,
                    seq: u64_at(p, 4),
                    encoding,
                    raw_len,
                    body,
                }
            }
            FrameType::ChannelAck => {
                let p = exact(p, 12, "ChannelAck")?;
                Message::Ack {
                    channel: channel_id(u32_at(p, 0), "ChannelAck")?,
                    delivered: u64_at(p, 4),
                }
            }
            FrameType::ChannelEnd => {
                let p = exact(p, 20, "ChannelEnd")?;
                Message::End {
                    channel: channel_id(u32_at(p, 0), "ChannelEnd")?,
                    segments: u64_at(p, 4),
                    bytes: u64_at(p, 12),
                }
            }
            FrameType::ChannelReset => {
                if p.len() < 4 || p.len() > 4 + MAX_REASON {
                    return Err(malformed("ChannelReset", format!("{} bytes", p.len())).into());
                }
                Message::Reset {
                    channel: channel_id(u32_at(p, 0), "ChannelReset")?,
                    reason: std::str::from_utf8(&p[4..])
                        .map_err(|_| malformed("ChannelReset", "reason is not UTF-8"))?
                        .to_string(),
                }
            }
            FrameType::Keepalive => {
                exact(p, 0, "Keepalive")?;
                Message::Keepalive
            }
            FrameType::Close => Message::Close,
            FrameType::Error => {
                let m = dwcp_core::messages::ErrorMessage::decode(p)?;
                return Err(Error::Peer {
                    code: m.code,
                    message: m.message,
                });
            }
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected {} frame in a QEMU tunnel",
                    other.name()
                )));
            }
        })
    }
}

/// The fixed part of a ChannelData payload; the encoded body follows it.
pub fn data_header(
    channel: u32,
    seq: u64,
    encoding: Encoding,
    raw_len: u32,
) -> [u8; DATA_HEADER_LEN] {
    let mut h = [0u8; DATA_HEADER_LEN];
    h[0..4].copy_from_slice(&channel.to_le_bytes());
    h[4..12].copy_from_slice(&seq.to_le_bytes());
    h[12] = encoding as u8;
    h[16..20].copy_from_slice(&raw_len.to_le_bytes());
    h
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(m: Message<'_>) {
        let bytes = m.encode();
        assert_eq!(Message::decode(m.frame_type(), &bytes).unwrap(), m);
    }

    #[test]
    fn every_message_roundtrips() {
        roundtrip(Message::Init(TunnelInit {
            version: 1,
            streams: 4,
            window: 32 << 20,
        }));
        roundtrip(Message::Ready(TunnelReady { window: 1 << 20 }));
        roundtrip(Message::Open { channel: 3 });
        roundtrip(Message::Data {
            channel: 2,
            seq: 99,
            encoding: Encoding::Raw,
            raw_len: 5,
            body: b"hello",
        });
        roundtrip(Message::Data {
            channel: 2,
            seq: 100,
            encoding: Encoding::Zero,
            raw_len: 4096,
            body: b"",
        });
        roundtrip(Message::Ack {
            channel: 1,
            delivered: 1 << 40,
        });
        roundtrip(Message::End {
            channel: 0,
            segments: 7,
            bytes: 12345,
        });
        roundtrip(Message::Reset {
            channel: 0,
            reason: "QEMU closed the connection: ünïcode".into(),
        });
        roundtrip(Message::Keepalive);
    }

    #[test]
    fn refuses_bad_fields() {
        let data = |enc: u8, raw: u32, body: &[u8]| {
            let mut p = data_header(1, 0, Encoding::Raw, raw).to_vec();
            p[12] = enc;
            p.extend_from_slice(body);
            p
        };
        for (p, why) in [
            (data(0, 4, b"abc"), "raw body shorter than raw_len"),
            (data(0, 0, b""), "empty segment"),
            (data(0, MAX_SEGMENT as u32 + 1, b"x"), "oversized segment"),
            (data(3, 10, b"x"), "zero segment with a body"),
            (data(1, 10, b""), "empty lz4 body"),
            (data(9, 10, b"x"), "unknown encoding"),
            (vec![0; 19], "short header"),
        ] {
            assert!(
                Message::decode(FrameType::ChannelData, &p).is_err(),
                "{why} accepted"
            );
        }
        let mut reserved = data(0, 1, b"x");
        reserved[14] = 1;
        assert!(Message::decode(FrameType::ChannelData, &reserved).is_err());
        assert!(Message::decode(FrameType::ChannelOpen, &MAX_CHANNEL_ID.to_le_bytes()).is_err());
        assert!(Message::decode(FrameType::ChannelAck, &[0; 11]).is_err());
        assert!(Message::decode(FrameType::ChannelReset, &[0, 0, 0, 0, 0xff]).is_err());
        assert!(Message::decode(FrameType::ChannelReset, &vec![b'a'; 4 + MAX_REASON + 1]).is_err());
        assert!(Message::decode(FrameType::Keepalive, &[1]).is_err());
        assert!(matches!(
            Message::decode(FrameType::Data, &[]),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn long_reasons_are_cut_at_a_character_boundary() {
        let reason = "é".repeat(MAX_REASON);
        let bytes = Message::Reset { channel: 1, reason }.encode();
        assert!(bytes.len() <= 4 + MAX_REASON);
        assert!(Message::decode(FrameType::ChannelReset, &bytes).is_ok());
    }

    proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(ty in 32u8..=39, bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Message::decode(FrameType::from_wire(ty).unwrap(), &bytes);
        }
    }
}
