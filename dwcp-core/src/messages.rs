//! Payloads of the control frames, with strict decoding (exact lengths, bounded counts), and the
//! VM identity a protocol version 2 source announces in its SessionInit.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, ErrorCode, FrameError};
use crate::handshake::{IDENTITY_VERSION, VERSION_1};
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

    /// Bytes not taken yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
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

/// A VM's UUID (RFC 9562), its 16 bytes in the order of the text form. Never the nil UUID (all
/// zero): hypervisors report that for a VM that was given none, and two such VMs must not pass for
/// one another.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VmUuid([u8; 16]);

impl VmUuid {
    /// The UUID with these bytes; `None` for the nil UUID.
    pub fn new(bytes: [u8; 16]) -> Option<Self> {
        (bytes != [0; 16]).then_some(Self(bytes))
    }

    /// The 16 bytes, in the order of the text form.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for VmUuid {
    /// The hyphenated lower-case form, `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for VmUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VmUuid({self})")
    }
}

impl FromStr for VmUuid {
    type Err = Error;

    /// Parses the hyphenated form (`67e55044-10b1-426f-9247-bb680e5fe0c8`) or the same 32 hex
    /// digits without hyphens, in either case.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Config(format!("invalid VM UUID {s:?}: {why}"));
        let digits: Vec<u8> = if s.len() == 36 {
            let b = s.as_bytes();
            if [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
                return Err(bad("expected hyphens at 8-4-4-4-12"));
            }
            b.iter().copied().filter(|&c| c != b'-').collect()
        } else {
            s.as_bytes().to_vec()
        };
        if digits.len() != 32 {
            return Err(bad(
                "expected 32 hex digits, with or without the four hyphens",
            ));
        }
        let mut bytes = [0u8; 16];
        for (i, pair) in digits.chunks_exact(2).enumerate() {
            let hex = |c: u8| (c as char).to_digit(16);
            let (Some(hi), Some(lo)) = (hex(pair[0]), hex(pair[1])) else {
                return Err(bad("not a hex digit"));
            };
            bytes[i] = (hi * 16 + lo) as u8;
        }
        Self::new(bytes).ok_or_else(|| bad("the nil UUID names no VM"))
    }
}

/// What a source speaking protocol version 2 or later says about the VM it migrates, in its
/// SessionInit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmIdentity {
    /// The VM's UUID, when the source knows it.
    pub vm_uuid: Option<VmUuid>,
    /// [`MemoryLayout::fingerprint`] of the source's memory layout.
    pub layout_fingerprint: u64,
}

impl VmIdentity {
    /// The identity of a VM with `layout` and, if known, `vm_uuid`.
    pub fn of(layout: &MemoryLayout, vm_uuid: Option<VmUuid>) -> Self {
        Self {
            vm_uuid,
            layout_fingerprint: layout.fingerprint(),
        }
    }
}

/// What a destination requires of the VM a source announces. The default requires nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpectedIdentity {
    /// The UUID the source must announce. A source speaking protocol version 1 cannot announce one
    /// and is refused.
    pub vm_uuid: Option<VmUuid>,
    /// The [`MemoryLayout::fingerprint`] the announced layout must have. Checked against the layout
    /// itself, so it works with version 1 sources too.
    pub layout_fingerprint: Option<u64>,
}

/// How far a destination could check the VM identity of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityCheck {
    /// The source speaks protocol version 1 and announced no identity: nothing about it could be
    /// checked (an expected layout fingerprint still was, against the announced layout).
    NotAnnounced,
    /// The source announced its identity and its fingerprint matched its layout; the destination
    /// required nothing more.
    Announced,
    /// The source announced its identity and it matched everything the destination required.
    Verified,
}

fn hex64(v: u64) -> String {
    format!("{v:016x}")
}

impl ExpectedIdentity {
    /// Whether nothing is required.
    pub fn is_empty(&self) -> bool {
        self.vm_uuid.is_none() && self.layout_fingerprint.is_none()
    }

    /// Checks what a source announced (`None`: it speaks protocol version 1) for a session whose
    /// SessionInit announced `layout`. An announced fingerprint must be that of `layout` even when
    /// nothing is required: a source that disagrees with itself about its memory is refused.
    pub fn check(
        &self,
        announced: Option<&VmIdentity>,
        layout: &MemoryLayout,
    ) -> Result<IdentityCheck, Error> {
        let actual = layout.fingerprint();
        if let Some(id) = announced {
            if id.layout_fingerprint != actual {
                return Err(Error::Identity {
                    what: "layout fingerprint",
                    expected: format!("{} (that of the layout it announced)", hex64(actual)),
                    announced: hex64(id.layout_fingerprint),
                });
            }
        }
        if let Some(want) = self.vm_uuid {
            let announced_uuid = announced.and_then(|id| id.vm_uuid);
            if announced_uuid != Some(want) {
                return Err(Error::Identity {
                    what: "VM UUID",
                    expected: want.to_string(),
                    announced: match (announced, announced_uuid) {
                        (_, Some(other)) => other.to_string(),
                        (Some(_), None) => "no UUID".into(),
                        (None, _) => "nothing: it speaks protocol version 1, which cannot \
                                      announce a VM's identity"
                            .into(),
                    },
                });
            }
        }
        if let Some(want) = self.layout_fingerprint {
            if want != actual {
                return Err(Error::Identity {
                    what: "layout fingerprint",
                    expected: hex64(want),
                    announced: format!(
                        "{} ({} pages in {} regions)",
                        hex64(actual),
                        layout.total_pages(),
                        layout.regions().len()
                    ),
                });
            }
        }
        Ok(match announced {
            None => IdentityCheck::NotAnnounced,
            Some(_) if self.is_empty() => IdentityCheck::Announced,
            Some(_) => IdentityCheck::Verified,
        })
    }
}

/// Identity flag of a version 2 SessionInit: the VM UUID field holds a UUID.
const IDENTITY_HAS_UUID: u8 = 1;
/// Bytes a version 2 SessionInit adds after the regions: fingerprint, flags, UUID.
const IDENTITY_LEN: usize = 8 + 1 + 16;

/// The source's announcement of what it will send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInit {
    /// The memory layout to migrate.
    pub layout: MemoryLayout,
    /// Streams the source will open (including the first).
    pub stream_count: u16,
    /// The VM's identity: `Some` in protocol version 2 and later, `None` in version 1, whose
    /// SessionInit has no room for it. It decides the encoding (see [`encode`](Self::encode)).
    pub identity: Option<VmIdentity>,
}

impl SessionInit {
    /// What a source speaking `version` announces for a VM with `layout` (and `vm_uuid`, which
    /// version 1 cannot carry).
    pub fn new(
        layout: MemoryLayout,
        stream_count: u16,
        version: u8,
        vm_uuid: Option<VmUuid>,
    ) -> Self {
        let identity = (version >= IDENTITY_VERSION).then(|| VmIdentity::of(&layout, vm_uuid));
        Self {
            layout,
            stream_count,
            identity,
        }
    }

    /// Encodes the payload: the version 1 form (10 + 16·regions bytes) without an identity, the
    /// version 2 form (25 bytes more: fingerprint, flags, UUID) with one.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(10 + 16 * self.layout.regions().len() + IDENTITY_LEN);
        b.extend_from_slice(&self.layout.page_size().to_le_bytes());
        b.extend_from_slice(&self.stream_count.to_le_bytes());
        b.extend_from_slice(&(self.layout.regions().len() as u32).to_le_bytes());
        for r in self.layout.regions() {
            b.extend_from_slice(&r.guest_addr.to_le_bytes());
            b.extend_from_slice(&r.pages.to_le_bytes());
        }
        if let Some(id) = &self.identity {
            b.extend_from_slice(&id.layout_fingerprint.to_le_bytes());
            match id.vm_uuid {
                Some(uuid) => {
                    b.push(IDENTITY_HAS_UUID);
                    b.extend_from_slice(uuid.as_bytes());
                }
                None => {
                    b.push(0);
                    b.extend_from_slice(&[0; 16]);
                }
            }
        }
        b
    }

    /// Decodes a version 1 payload (no identity); the layout is validated (page size, region
    /// count, overflow).
    pub fn decode(p: &[u8]) -> Result<Self, FrameError> {
        Self::decode_version(p, VERSION_1)
    }

    /// Decodes the payload of a session that negotiated `version`: from version 2 on it must carry
    /// the identity, before that it must not.
    pub fn decode_version(p: &[u8], version: u8) -> Result<Self, FrameError> {
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
        let identity = if version >= IDENTITY_VERSION {
            let layout_fingerprint = c.u64()?;
            let flags = c.u8()?;
            let uuid: [u8; 16] = c.array()?;
            let malformed = |why: &str| FrameError::Malformed {
                what: "SessionInit",
                why: why.into(),
            };
            let vm_uuid = match flags {
                0 if uuid == [0; 16] => None,
                0 => return Err(malformed("a VM UUID without its flag")),
                IDENTITY_HAS_UUID => {
                    Some(VmUuid::new(uuid).ok_or_else(|| malformed("the nil VM UUID"))?)
                }
                _ => return Err(malformed("unknown identity flags")),
            };
            Some(VmIdentity {
                vm_uuid,
                layout_fingerprint,
            })
        } else {
            None
        };
        c.finish()?;
        let layout =
            MemoryLayout::new(page_size, regions).map_err(|why| FrameError::Malformed {
                what: "SessionInit",
                why,
            })?;
        Ok(Self {
            layout,
            stream_count,
            identity,
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
            let _ = SessionInit::decode_version(&bytes, IDENTITY_VERSION);
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
            identity: None,
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
        let layout = two_regions();
        let init = SessionInit {
            layout,
            stream_count: 4,
            identity: None,
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

    fn two_regions() -> MemoryLayout {
        MemoryLayout::new(
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
        .unwrap()
    }

    const UUID: &str = "67e55044-10b1-426f-9247-bb680e5fe0c8";

    fn uuid() -> VmUuid {
        UUID.parse().unwrap()
    }

    /// Version 2 appends fingerprint, flags and UUID after the regions; version 1 is byte for byte
    /// what it was, and each decoder refuses the other version's form.
    #[test]
    fn session_init_of_both_versions() {
        let layout = two_regions();
        let v1 = SessionInit::new(layout.clone(), 4, 1, Some(uuid()));
        assert_eq!(v1.identity, None, "version 1 cannot carry the UUID");
        let v1_bytes = v1.encode();
        assert_eq!(v1_bytes.len(), 10 + 16 * 2);
        assert_eq!(SessionInit::decode(&v1_bytes).unwrap(), v1);

        for vm_uuid in [Some(uuid()), None] {
            let v2 = SessionInit::new(layout.clone(), 4, IDENTITY_VERSION, vm_uuid);
            let id = v2.identity.expect("version 2 carries an identity");
            assert_eq!(id.layout_fingerprint, layout.fingerprint());
            assert_eq!(id.vm_uuid, vm_uuid);
            let bytes = v2.encode();
            assert_eq!(bytes.len(), 10 + 16 * 2 + 25);
            assert_eq!(&bytes[..v1_bytes.len()], &v1_bytes[..], "v1 fields first");
            assert_eq!(&bytes[42..50], &layout.fingerprint().to_le_bytes());
            assert_eq!(bytes[50], u8::from(vm_uuid.is_some()));
            assert_eq!(
                &bytes[51..],
                vm_uuid.as_ref().map_or(&[0u8; 16], VmUuid::as_bytes)
            );
            assert_eq!(
                SessionInit::decode_version(&bytes, IDENTITY_VERSION).unwrap(),
                v2
            );
            assert!(matches!(
                SessionInit::decode(&bytes),
                Err(FrameError::Malformed { .. })
            ));
        }
        assert!(matches!(
            SessionInit::decode_version(&v1_bytes, IDENTITY_VERSION),
            Err(FrameError::Malformed { .. })
        ));
    }

    #[test]
    fn session_init_v2_refuses_bad_identity_fields() {
        let good = SessionInit::new(two_regions(), 1, IDENTITY_VERSION, Some(uuid())).encode();
        let with = |at: usize, byte: u8| {
            let mut b = good.clone();
            b[at] = byte;
            SessionInit::decode_version(&b, IDENTITY_VERSION)
        };
        // Unknown flag bits; a UUID without its flag; the nil UUID with the flag.
        assert!(matches!(with(50, 3), Err(FrameError::Malformed { .. })));
        assert!(matches!(with(50, 0), Err(FrameError::Malformed { .. })));
        let mut nil = good.clone();
        nil[51..].fill(0);
        assert!(matches!(
            SessionInit::decode_version(&nil, IDENTITY_VERSION),
            Err(FrameError::Malformed { .. })
        ));
        // Short or long by one byte.
        assert!(SessionInit::decode_version(&good[..good.len() - 1], IDENTITY_VERSION).is_err());
        let mut long = good.clone();
        long.push(0);
        assert!(SessionInit::decode_version(&long, IDENTITY_VERSION).is_err());
    }

    proptest! {
        #[test]
        fn session_init_v2_roundtrip(
            regions in proptest::collection::vec((0u64..1 << 20, 1u64..1 << 20), 1..8),
            streams in 1u16..=MAX_STREAMS,
            uuid: Option<[u8; 16]>,
        ) {
            let mut at = 0u64;
            let regions: Vec<Region> = regions
                .into_iter()
                .map(|(gap, pages)| {
                    let r = Region { guest_addr: (at + gap) * 4096, pages };
                    at += gap + pages;
                    r
                })
                .collect();
            let layout = MemoryLayout::new(4096, regions).unwrap();
            let init = SessionInit::new(layout, streams, IDENTITY_VERSION, uuid.and_then(VmUuid::new));
            prop_assert_eq!(SessionInit::decode_version(&init.encode(), IDENTITY_VERSION).unwrap(), init);
        }
    }

    #[test]
    fn vm_uuid_text_forms() {
        let u = uuid();
        assert_eq!(u.to_string(), UUID);
        assert_eq!(u.as_bytes()[0], 0x67);
        assert_eq!(u.as_bytes()[15], 0xc8);
        assert_eq!(UUID.to_uppercase().parse::<VmUuid>().unwrap(), u);
        assert_eq!(UUID.replace('-', "").parse::<VmUuid>().unwrap(), u);
        for bad in [
            "",
            "67e55044-10b1-426f-9247-bb680e5fe0c",
            "67e55044-10b1-426f-9247_bb680e5fe0c8",
            "67e5504410b1426f9247bb680e5fe0cg",
            "00000000-0000-0000-0000-000000000000",
            "67e55044-10b1-426f-9247-bb680e5fe0c8x",
            "é7e55044-10b1-426f-9247-bb680e5fe0c",
        ] {
            assert!(
                matches!(bad.parse::<VmUuid>(), Err(Error::Config(_))),
                "{bad:?}"
            );
        }
        assert_eq!(VmUuid::new([0; 16]), None);
    }

    #[test]
    fn expected_identity_checks() {
        let layout = two_regions();
        let other: VmUuid = "00000000-0000-0000-0000-000000000001".parse().unwrap();
        let v2 = VmIdentity::of(&layout, Some(uuid()));
        let nothing = ExpectedIdentity::default();
        let by_uuid = ExpectedIdentity {
            vm_uuid: Some(uuid()),
            layout_fingerprint: None,
        };
        let by_layout = ExpectedIdentity {
            vm_uuid: None,
            layout_fingerprint: Some(layout.fingerprint()),
        };
        assert_eq!(
            nothing.check(Some(&v2), &layout).unwrap(),
            IdentityCheck::Announced
        );
        assert_eq!(
            nothing.check(None, &layout).unwrap(),
            IdentityCheck::NotAnnounced
        );
        assert_eq!(
            by_uuid.check(Some(&v2), &layout).unwrap(),
            IdentityCheck::Verified
        );
        assert_eq!(
            by_layout.check(Some(&v2), &layout).unwrap(),
            IdentityCheck::Verified
        );
        // A layout expectation holds against a version 1 source's announced layout.
        assert_eq!(
            by_layout.check(None, &layout).unwrap(),
            IdentityCheck::NotAnnounced
        );

        let refused = |e: Result<IdentityCheck, Error>| match e {
            Err(Error::Identity {
                what,
                expected,
                announced,
            }) => (what, expected, announced),
            other => panic!("not refused: {other:?}"),
        };
        let wrong = VmIdentity::of(&layout, Some(other));
        let (what, expected, announced) = refused(by_uuid.check(Some(&wrong), &layout));
        assert_eq!(
            (what, expected.as_str(), announced.as_str()),
            ("VM UUID", UUID, "00000000-0000-0000-0000-000000000001")
        );
        let (_, _, announced) = refused(by_uuid.check(None, &layout));
        assert!(announced.contains("protocol version 1"), "{announced}");
        let (_, _, announced) =
            refused(by_uuid.check(Some(&VmIdentity::of(&layout, None)), &layout));
        assert_eq!(announced, "no UUID");

        // A fingerprint that is not that of the announced layout is refused whatever is expected.
        let lying = VmIdentity {
            vm_uuid: Some(uuid()),
            layout_fingerprint: layout.fingerprint() ^ 1,
        };
        for expectation in [nothing, by_uuid, by_layout] {
            let (what, expected, announced) = refused(expectation.check(Some(&lying), &layout));
            assert_eq!(what, "layout fingerprint");
            assert!(expected.starts_with(&format!("{:016x}", layout.fingerprint())));
            assert_eq!(announced, format!("{:016x}", layout.fingerprint() ^ 1));
        }
        let smaller = MemoryLayout::flat(4096).unwrap();
        let (what, expected, announced) = refused(by_layout.check(None, &smaller));
        assert_eq!(what, "layout fingerprint");
        assert_eq!(expected, format!("{:016x}", layout.fingerprint()));
        assert!(announced.starts_with(&format!("{:016x} (1 pages", smaller.fingerprint())));
    }
}
