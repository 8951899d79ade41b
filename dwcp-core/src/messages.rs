//! Payloads of the control frames, with strict decoding (exact lengths, bounded counts).

use crate::error::{ErrorCode, FrameError};
use crate::memory::{MemoryLayout, Region};

/// Length of handshake nonces.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;
/// Most regions a memory layout may announce.
pub const MAX_REGIONS: usize = 1024;
/// Most streams one session may use.
pub const MAX_STREAMS: u16 = 64;
/// Longest error message carried in an Error frame.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// A little-endian cursor that fails with [`FrameError::Malformed`] instead of panicking.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    /// A cursor over the payload of a `what` frame.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    fn malformed(&self, why: impl Into<String>) -> FrameError {
        FrameError::Malformed {
            what: self.what,
            why: why.into(),
        }
    }

    /// Takes `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(self.malformed(format!("needs {n} more bytes, has {}", self.buf.len())));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Takes a fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }

    /// Takes a byte.
    pub fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }

    /// Takes a u16.
    pub fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    /// Takes a u32.
    pub fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// Takes a u64.
    pub fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Takes a u128.
    pub fn u128(&mut self) -> Result<u128, FrameError> {
        Ok(u128::from_le_bytes(self.array()?))
    }

    /// Fails unless every byte was consumed.
    pub fn finish(self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.malformed(format!("{} trailing bytes", self.buf.len())))
        }
    }
}

/// First frame of every stream, client to server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// Lowest protocol version the client speaks.
    pub min_version: u8,
    /// Highest protocol version the client speaks.
    pub max_version: u8,
    /// Capability bits the client offers.
    pub capabilities: u32,
    /// Fresh random nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Zero to open a session; otherwise the session this stream joins.
    pub session_id: u64,
    /// Index of this stream within the session.
    pub stream_index: u16,
}

impl ClientHello {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(48);
        b.extend_from_slice(&[self.min_version, self.max_version]);
        b.extend_from_slice(&self.capabilities.to_le_bytes());
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.session_id.to_le_bytes());
        b.extend_from_slice(&self.stream_index.to_le_bytes());
        b
    }

    /// Decodes the payload.
    pub fn decode(p: &[u8]) -> Result<Self, FrameError> {
        let mut c = Cursor::new(p, "ClientHello");
        let v = Self {
            min_version: c.u8()?,
            max_version: c.u8()?,
            capabilities: c.u32()?,
            nonce: c.array()?,
            session_id: c.u64()?,
            stream_index: c.u16()?,
        };
        c.finish()?;
        Ok(v)
    }
}

/// Server's answer to [`ClientHello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    /// The version both will speak.
    pub version: u8,
    /// Capabilities both have.
    pub capabilities: u32,
    /// Fresh random nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The session this stream belongs to.
    pub session_id: u64,
    /// HMAC proving the server holds the key.
    pub mac: [u8; MAC_LEN],
}

impl ServerHello {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(80);
        b.push(self.version);
        b.extend_from_slice(&self.capabilities.to_le_bytes());
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.session_id.to_le_bytes());
        b.extend_from_slice(&self.mac);
        b
    }

    /// Decodes the payload.
    pub fn decode(p: &[u8]) -> Result<Self, FrameError> {
        let mut c = Cursor::new(p, "ServerHello");
        let v = Self {
            version: c.u8()?,
            capabilities: c.u32()?,
            nonce: c.array()?,
            session_id: c.u64()?,
            mac: c.array()?,
        };
        c.finish()?;
        Ok(v)
    }
}

/// The source's announcement of what it will send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInit {
    /// The memory layout to migrate.
    pub layout: MemoryLayout,
    /// Streams the source will open (including the first).
    pub stream_count: u16,
}

impl SessionInit {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + 16 * self.layout.regions().len());
        b.extend_from_slice(&self.layout.page_size().to_le_bytes());
        b.extend_from_slice(&self.stream_count.to_le_bytes());
        b.extend_from_slice(&(self.layout.regions().len() as u32).to_le_bytes());
        for r in self.layout.regions() {
            b.extend_from_slice(&r.guest_addr.to_le_bytes());
            b.extend_from_slice(&r.pages.to_le_bytes());
        }
        b
    }

    /// Decodes the payload; the layout is validated (page size, region count, overflow).
    pub fn decode(p: &[u8]) -> Result<Self, FrameError> {
        let mut c = Cursor::new(p, "SessionInit");
        let page_size = c.u32()?;
        let stream_count = c.u16()?;
        let count = c.u32()? as usize;
        if count == 0 || count > MAX_REGIONS {
            return Err(FrameError::Malformed {
                what: "SessionInit",
                why: format!("{count} regions"),
            });
        }
        if stream_count == 0 || stream_count > MAX_STREAMS {
            return Err(FrameError::Malformed {
                what: "SessionInit",
                why: format!("{stream_count} streams (1..={MAX_STREAMS})"),
            });
        }
        let mut regions = Vec::with_capacity(count);
        for _ in 0..count {
            regions.push(Region {
                guest_addr: c.u64()?,
                pages: c.u64()?,
            });
        }
        c.finish()?;
        let layout =
            MemoryLayout::new(page_size, regions).map_err(|why| FrameError::Malformed {
                what: "SessionInit",
                why,
            })?;
        Ok(Self {
            layout,
            stream_count,
        })
    }
}

/// Source's end-of-data message: the guest is paused and every data frame has been acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finish {
    /// The last iteration sent.
    pub final_iteration: u32,
    /// Data frames sent over all streams; the destination must have applied exactly this many.
    pub data_frames: u64,
}

impl Finish {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(12);
        b.extend_from_slice(&self.final_iteration.to_le_bytes());
        b.extend_from_slice(&self.data_frames.to_le_bytes());
        b
    }

    /// Decodes the payload.
    pub fn decode(p: &[u8]) -> Result<Self, FrameError> {
        let mut c = Cursor::new(p, "Finish");
        let v = Self {
            final_iteration: c.u32()?,
            data_frames: c.u64()?,
        };
        c.finish()?;
        Ok(v)
    }
}

/// A whole-memory digest: the destination's in a Verdict frame, the source's in a Commit frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestMessage {
    /// xxh3-128 whole-memory digest (see `digest`).
    pub digest: u128,
}

impl DigestMessage {
    /// Encodes the payload.
    pub fn encode(&self) -> [u8; 16] {
        self.digest.to_le_bytes()
    }

    /// Decodes the payload.
    pub fn decode(p: &[u8]) -> Result<Self, FrameError> {
        let mut c = Cursor::new(p, "digest");
        let v = Self { digest: c.u128()? };
        c.finish()?;
        Ok(v)
    }
}

/// Join (type 18): a parked stream joins session `session_id` as stream `stream_index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinMessage {
    /// Session to join.
    pub session_id: u64,
    /// Index of the stream in that session.
    pub stream_index: u16,
}

impl JoinMessage {
    /// Serialises the message (10 bytes).
    pub fn encode(&self) -> [u8; 10] {
        let mut b = [0u8; 10];
        b[..8].copy_from_slice(&self.session_id.to_le_bytes());
        b[8..].copy_from_slice(&self.stream_index.to_le_bytes());
        b
    }

    /// Parses the message.
    pub fn decode(p: &[u8]) -> Result<Self, FrameError> {
        let mut c = Cursor::new(p, "Join");
        let m = Self {
            session_id: c.u64()?,
            stream_index: c.u16()?,
        };
        c.finish()?;
        Ok(m)
    }
}

/// A session id as an 8-byte payload: SessionReady on a pooled stream (the new session's id), and the
/// nonce of Ping and Pong.
pub fn encode_u64(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

/// Parses an 8-byte payload (see [`encode_u64`]).
pub fn decode_u64(p: &[u8], what: &'static str) -> Result<u64, FrameError> {
    let mut c = Cursor::new(p, what);
    let v = c.u64()?;
    c.finish()?;
    Ok(v)
}

/// Cumulative acknowledgement: every data frame up to and including `through_seq` was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Stream sequence number of the last applied data frame.
    pub through_seq: u64,
}

impl Ack {
    /// Encodes the payload.
    pub fn encode(&self) -> [u8; 8] {
        self.through_seq.to_le_bytes()
    }

    /// Decodes the payload.
    pub fn decode(p: &[u8]) -> Result<Self, FrameError> {
        let mut c = Cursor::new(p, "Ack");
        let v = Self {
            through_seq: c.u64()?,
        };
        c.finish()?;
        Ok(v)
    }
}

/// An error that ends the session, with a reason for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMessage {
    /// Category.
    pub code: ErrorCode,
    /// Human-readable reason (at most [`MAX_ERROR_MESSAGE`] bytes).
    pub message: String,
}

impl ErrorMessage {
    /// Encodes the payload, truncating the message on a character boundary.
    pub fn encode(&self) -> Vec<u8> {
        let mut end = self.message.len().min(MAX_ERROR_MESSAGE);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        let mut b = (self.code as u16).to_le_bytes().to_vec();
        b.extend_from_slice(&self.message.as_bytes()[..end]);
        b
    }

    /// Decodes the payload; invalid UTF-8 is replaced, never refused.
    pub fn decode(p: &[u8]) -> Result<Self, FrameError> {
        let mut c = Cursor::new(p, "Error");
        let code = ErrorCode::from_wire(c.u16()?);
        let rest = c.take(p.len() - 2)?;
        if rest.len() > MAX_ERROR_MESSAGE {
            return Err(FrameError::Malformed {
                what: "Error",
                why: "message too long".into(),
            });
        }
        Ok(Self {
            code,
            message: String::from_utf8_lossy(rest).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn hello_roundtrip(min: u8, max: u8, caps: u32, nonce: [u8; 32], sid: u64, idx: u16) {
            let h = ClientHello { min_version: min, max_version: max, capabilities: caps, nonce, session_id: sid, stream_index: idx };
            prop_assert_eq!(ClientHello::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ClientHello::decode(&bytes);
            let _ = ServerHello::decode(&bytes);
            let _ = SessionInit::decode(&bytes);
            let _ = Finish::decode(&bytes);
            let _ = DigestMessage::decode(&bytes);
            let _ = Ack::decode(&bytes);
            let _ = ErrorMessage::decode(&bytes);
        }
    }

    /// Found by the `messages` fuzz target: a SessionInit announcing 257 streams was accepted although
    /// a session has at most `MAX_STREAMS` (64); the destination then waited for 257 streams.
    #[test]
    fn session_init_refuses_more_than_max_streams() {
        let init = |stream_count| SessionInit {
            layout: MemoryLayout::flat(1 << 20).unwrap(),
            stream_count,
        };
        assert!(SessionInit::decode(&init(1).encode()).is_ok());
        assert!(SessionInit::decode(&init(MAX_STREAMS).encode()).is_ok());
        for streams in [0, MAX_STREAMS + 1, 257, u16::MAX] {
            assert!(
                matches!(
                    SessionInit::decode(&init(streams).encode()),
                    Err(FrameError::Malformed {
                        what: "SessionInit",
                        ..
                    })
                ),
                "{streams} streams"
            );
        }
    }

    #[test]
    fn session_init_roundtrip_and_limits() {
        let layout = MemoryLayout::new(
            4096,
            vec![
                Region {
                    guest_addr: 0,
                    pages: 10,
                },
                Region {
                    guest_addr: 1 << 32,
                    pages: 5,
                },
            ],
        )
        .unwrap();
        let init = SessionInit {
            layout,
            stream_count: 4,
        };
        assert_eq!(SessionInit::decode(&init.encode()).unwrap(), init);

        let mut huge = Vec::new();
        huge.extend_from_slice(&4096u32.to_le_bytes());
        huge.extend_from_slice(&1u16.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            SessionInit::decode(&huge),
            Err(FrameError::Malformed { .. })
        ));

        let mut overflow = Vec::new();
        overflow.extend_from_slice(&4096u32.to_le_bytes());
        overflow.extend_from_slice(&1u16.to_le_bytes());
        overflow.extend_from_slice(&2u32.to_le_bytes());
        for _ in 0..2 {
            overflow.extend_from_slice(&0u64.to_le_bytes());
            overflow.extend_from_slice(&u64::MAX.to_le_bytes());
        }
        assert!(matches!(
            SessionInit::decode(&overflow),
            Err(FrameError::Malformed { .. })
        ));
    }
}
