//! Stream handshake: version and capability negotiation, then mutual authentication by a pre-shared key.
//!
//! ```text
//! client                                   server
//! ClientHello(versions, caps, Nc, sid, i) ─►
//!                                          ◄─ ServerHello(v, caps, Ns, sid, MACs)
//! ClientAuth(MACc)                        ─►
//!                                          ◄─ AuthOk
//! MACs = HMAC-SHA256(psk, "DWCP server" ‖ transcript)
//! MACc = HMAC-SHA256(psk, "DWCP client" ‖ transcript)
//! transcript = min_v ‖ max_v ‖ offered caps ‖ Nc ‖ Ns ‖ sid ‖ i ‖ v ‖ caps
//! ```
//! Both nonces are fresh per stream, so a recorded exchange cannot be replayed, and the distinct labels
//! stop a server's proof from being reflected as a client's. The state machines here do no I/O;
//! [`client_handshake`] and [`server_handshake`] drive them over a [`FrameReader`]/[`FrameWriter`] pair.
//!
//! **Versions.** This build speaks session versions [`MIN_VERSION`]..=[`MAX_VERSION`]: version N
//! talks to N−1. The server picks the highest version both speak. Version 2 adds the VM's identity
//! to SessionInit ([`crate::messages::VmIdentity`]); nothing else differs. The version byte of
//! every frame *header* stays [`crate::frame::PROTOCOL_VERSION`] (1) whatever the session speaks:
//! a version 1 peer refuses any other header byte before it has read a ClientHello, so a bumped
//! header could never negotiate down.

use std::io::{Read, Write};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, FrameError, HandshakeError};
use crate::frame::{FrameReader, FrameType, FrameWriter, MAX_HANDSHAKE_PAYLOAD, MAX_PAYLOAD};
use crate::messages::{ClientHello, ErrorMessage, MAC_LEN, NONCE_LEN, ServerHello};

/// The first session version: SessionInit carries the memory layout only.
pub const VERSION_1: u8 = 1;
/// The session version from which SessionInit also carries the VM's identity (its UUID and the
/// fingerprint of its memory layout).
pub const IDENTITY_VERSION: u8 = 2;
/// Oldest session version this build speaks: the previous one, so that a build talks to the one
/// before it (a rolling upgrade migrates between them in both directions).
pub const MIN_VERSION: u8 = VERSION_1;
/// Newest session version this build speaks. A literal on purpose: `cargo xtask compat` finds the
/// previous build (the commit before the bump) by this very line.
pub const MAX_VERSION: u8 = 2;

/// Shortest pre-shared key accepted.
pub const MIN_PSK_LEN: usize = 16;

/// Capability: the peer decodes zstd-compressed chunks.
pub const CAP_ZSTD: u32 = 1 << 0;
/// Capability: the peer decodes lz4-compressed chunks.
pub const CAP_LZ4: u32 = 1 << 1;
/// Capabilities this build offers.
pub const SUPPORTED_CAPABILITIES: u32 = CAP_ZSTD | CAP_LZ4;

/// A pre-shared key both peers hold.
#[derive(Clone)]
pub struct Psk(Vec<u8>);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Psk({} bytes)", self.0.len())
    }
}

impl Psk {
    /// Wraps key material of at least [`MIN_PSK_LEN`] bytes.
    pub fn new(key: impl Into<Vec<u8>>) -> Result<Self, Error> {
        let key = key.into();
        if key.len() < MIN_PSK_LEN {
            return Err(HandshakeError::WeakKey {
                len: key.len(),
                min: MIN_PSK_LEN,
            }
            .into());
        }
        Ok(Self(key))
    }

    /// A public fingerprint of the key (HMAC of a fixed label): tells pooled connections authenticated
    /// with different keys apart without keeping or revealing the key.
    pub fn fingerprint(&self) -> u64 {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"dwcp connection pool fingerprint");
        let out = mac.finalize().into_bytes();
        u64::from_le_bytes(out[..8].try_into().expect("8 bytes"))
    }

    /// The key the DWCP handshake of one TLS session uses: HMAC of the session's exporter value
    /// (RFC 8446 §7.5) under this key. A proof made with it is valid only inside that TLS session, so
    /// a man in the middle who terminates TLS on both sides (two sessions, two exporter values)
    /// cannot relay it, and only holders of this key can make it.
    pub fn bound_to_channel(&self, exporter: &[u8]) -> Psk {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"dwcp tls channel binding");
        mac.update(exporter);
        Psk(mac.finalize().into_bytes().to_vec())
    }

    /// A handshake key that is just the TLS session's exporter value, for sessions whose peers were
    /// authenticated by certificates: the DWCP handshake then only binds its transcript to the
    /// session. `None` if the value is shorter than [`MIN_PSK_LEN`].
    pub fn from_channel_binding(exporter: &[u8]) -> Option<Psk> {
        (exporter.len() >= MIN_PSK_LEN).then(|| Psk(exporter.to_vec()))
    }

    /// Reads a key file; surrounding whitespace (a trailing newline) is not part of the key.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::io(
                format!("reading the pre-shared key file {}", path.display()),
                e,
            )
        })?;
        let text = bytes.trim_ascii();
        Self::new(text.to_vec())
    }

    /// A fresh random 32-byte key.
    pub fn generate() -> Self {
        Self(random_bytes::<32>().to_vec())
    }

    /// The key as lowercase hex (for writing a key file).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn mac(&self, label: &[u8], transcript: &[u8]) -> Hmac<Sha256> {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(transcript);
        m
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the OS random source is available");
    b
}

/// A fresh random non-zero session id.
pub fn new_session_id() -> u64 {
    loop {
        let id = u64::from_le_bytes(random_bytes());
        if id != 0 {
            return id;
        }
    }
}

/// What a completed handshake agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Protocol version in use.
    pub version: u8,
    /// Capabilities both sides have.
    pub capabilities: u32,
    /// Session this stream belongs to.
    pub session_id: u64,
    /// Index of the stream in the session.
    pub stream_index: u16,
}

/// Versions and capabilities one side offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// Lowest version spoken.
    pub min_version: u8,
    /// Highest version spoken.
    pub max_version: u8,
    /// Capabilities offered.
    pub capabilities: u32,
}

impl Default for Offer {
    /// Every version this build speaks, and every capability.
    fn default() -> Self {
        Self {
            min_version: MIN_VERSION,
            max_version: MAX_VERSION,
            capabilities: SUPPORTED_CAPABILITIES,
        }
    }
}

/// The bytes both proofs cover. It includes the client's whole offer, so an on-path change of the
/// offered versions or capabilities (a downgrade) makes the proofs disagree.
fn transcript(
    hello: &ClientHello,
    ns: &[u8; NONCE_LEN],
    sid: u64,
    version: u8,
    caps: u32,
) -> Vec<u8> {
    let mut t = Vec::with_capacity(2 * NONCE_LEN + 21);
    t.push(hello.min_version);
    t.push(hello.max_version);
    t.extend_from_slice(&hello.capabilities.to_le_bytes());
    t.extend_from_slice(&hello.nonce);
    t.extend_from_slice(ns);
    t.extend_from_slice(&sid.to_le_bytes());
    t.extend_from_slice(&hello.stream_index.to_le_bytes());
    t.push(version);
    t.extend_from_slice(&caps.to_le_bytes());
    t
}

const SERVER_LABEL: &[u8] = b"DWCP server";
const CLIENT_LABEL: &[u8] = b"DWCP client";

/// Client side of the handshake, waiting for the [`ServerHello`].
#[derive(Debug)]
pub struct ClientHandshake {
    psk: Psk,
    hello: ClientHello,
}

impl ClientHandshake {
    /// Starts a handshake; `session_id` is zero to open a session, or the id of the session to join.
    pub fn start(
        psk: Psk,
        offer: Offer,
        session_id: u64,
        stream_index: u16,
    ) -> (Self, ClientHello) {
        let hello = ClientHello {
            min_version: offer.min_version,
            max_version: offer.max_version,
            capabilities: offer.capabilities,
            nonce: random_bytes(),
            session_id,
            stream_index,
        };
        (
            Self {
                psk,
                hello: hello.clone(),
            },
            hello,
        )
    }

    /// Checks the server's proof; on success returns the client's proof and the agreed parameters, which
    /// hold once the server answers `AuthOk`.
    pub fn on_server_hello(self, sh: &ServerHello) -> Result<([u8; MAC_LEN], Negotiated), Error> {
        if sh.version < self.hello.min_version || sh.version > self.hello.max_version {
            return Err(Error::Protocol(format!(
                "server chose version {} outside our offer",
                sh.version
            )));
        }
        if sh.capabilities & !self.hello.capabilities != 0 {
            return Err(Error::Protocol(
                "server chose capabilities we did not offer".into(),
            ));
        }
        if self.hello.session_id != 0 && sh.session_id != self.hello.session_id {
            return Err(Error::Protocol(
                "server moved a joining stream to another session".into(),
            ));
        }
        if sh.session_id == 0 {
            return Err(Error::Protocol("server assigned session id 0".into()));
        }
        let t = transcript(
            &self.hello,
            &sh.nonce,
            sh.session_id,
            sh.version,
            sh.capabilities,
        );
        self.psk
            .mac(SERVER_LABEL, &t)
            .verify_slice(&sh.mac)
            .map_err(|_| HandshakeError::AuthenticationFailed)?;
        let client_mac: [u8; MAC_LEN] = self
            .psk
            .mac(CLIENT_LABEL, &t)
            .finalize()
            .into_bytes()
            .into();
        let negotiated = Negotiated {
            version: sh.version,
            capabilities: sh.capabilities,
            session_id: sh.session_id,
            stream_index: self.hello.stream_index,
        };
        Ok((client_mac, negotiated))
    }
}

/// Server side of the handshake, waiting for the client's proof.
#[derive(Debug)]
pub struct ServerHandshake {
    psk: Psk,
    transcript: Vec<u8>,
    negotiated: Negotiated,
}

impl ServerHandshake {
    /// Answers a [`ClientHello`]. `session_id` is the session the stream will belong to (a new id when the
    /// client asked for zero, the existing one when it joins).
    pub fn on_client_hello(
        psk: Psk,
        offer: Offer,
        hello: &ClientHello,
        session_id: u64,
    ) -> Result<(Self, ServerHello), Error> {
        let version = hello.max_version.min(offer.max_version);
        if version < hello.min_version.max(offer.min_version) {
            return Err(HandshakeError::VersionMismatch {
                ours_min: offer.min_version,
                ours_max: offer.max_version,
                theirs_min: hello.min_version,
                theirs_max: hello.max_version,
            }
            .into());
        }
        let capabilities = hello.capabilities & offer.capabilities;
        let nonce = random_bytes();
        let t = transcript(hello, &nonce, session_id, version, capabilities);
        let mac = psk.mac(SERVER_LABEL, &t).finalize().into_bytes().into();
        let negotiated = Negotiated {
            version,
            capabilities,
            session_id,
            stream_index: hello.stream_index,
        };
        Ok((
            Self {
                psk,
                transcript: t,
                negotiated,
            },
            ServerHello {
                version,
                capabilities,
                nonce,
                session_id,
                mac,
            },
        ))
    }

    /// Checks the client's proof.
    pub fn on_client_auth(self, mac: &[u8]) -> Result<Negotiated, Error> {
        self.psk
            .mac(CLIENT_LABEL, &self.transcript)
            .verify_slice(mac)
            .map_err(|_| HandshakeError::AuthenticationFailed)?;
        Ok(self.negotiated)
    }
}

fn expect(got: FrameType, want: FrameType, payload: &[u8]) -> Result<(), Error> {
    if got == want {
        return Ok(());
    }
    if got == FrameType::Error {
        let m = ErrorMessage::decode(payload)?;
        return Err(Error::Peer {
            code: m.code,
            message: m.message,
        });
    }
    Err(HandshakeError::UnexpectedFrame {
        expected: want.name(),
        got: got.name(),
    }
    .into())
}

/// Runs the client handshake over a stream. On success both halves are bound to the session.
pub fn client_handshake<R: Read, W: Write>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    psk: &Psk,
    offer: Offer,
    session_id: u64,
    stream_index: u16,
) -> Result<Negotiated, Error> {
    let (hs, hello) = ClientHandshake::start(psk.clone(), offer, session_id, stream_index);
    writer.write_frame(FrameType::ClientHello, &hello.encode())?;
    writer.flush()?;
    let mut p = Vec::new();
    let h = reader.read_frame(&mut p)?;
    expect(h.frame_type, FrameType::ServerHello, &p)?;
    let sh = ServerHello::decode(&p)?;
    let (mac, negotiated) = match hs.on_server_hello(&sh) {
        Ok(v) => v,
        Err(e) => {
            // The server already bound its reader to the session it announced; report in that session.
            writer.bind_session(sh.session_id);
            send_error(writer, &e);
            return Err(e);
        }
    };
    writer.bind_session(negotiated.session_id);
    reader.bind_session(negotiated.session_id, MAX_PAYLOAD);
    writer.write_frame(FrameType::ClientAuth, &mac)?;
    writer.flush()?;
    let h = reader.read_frame(&mut p)?;
    expect(h.frame_type, FrameType::AuthOk, &p)?;
    Ok(negotiated)
}

/// Runs the server handshake over a stream. `assign_session` maps the client's requested session id
/// (zero for a new one) to the session the stream joins, or refuses it. Failures are reported to the
/// client with an Error frame before they are returned.
pub fn server_handshake<R: Read, W: Write>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    psk: &Psk,
    offer: Offer,
    assign_session: impl FnOnce(u64) -> Result<u64, Error>,
) -> Result<Negotiated, Error> {
    let result = (|| {
        let mut p = Vec::new();
        let h = reader.read_frame(&mut p)?;
        expect(h.frame_type, FrameType::ClientHello, &p)?;
        let hello = ClientHello::decode(&p)?;
        let session_id = assign_session(hello.session_id)?;
        let (hs, sh) = ServerHandshake::on_client_hello(psk.clone(), offer, &hello, session_id)?;
        writer.bind_session(session_id);
        writer.write_frame(FrameType::ServerHello, &sh.encode())?;
        writer.flush()?;
        // Until the client has proven the key, frames stay small.
        reader.bind_session(session_id, MAX_HANDSHAKE_PAYLOAD);
        let h = reader.read_frame(&mut p)?;
        expect(h.frame_type, FrameType::ClientAuth, &p)?;
        if p.len() != MAC_LEN {
            return Err(FrameError::Malformed {
                what: "ClientAuth",
                why: format!("{} bytes", p.len()),
            }
            .into());
        }
        let negotiated = hs.on_client_auth(&p)?;
        reader.bind_session(session_id, MAX_PAYLOAD);
        writer.write_frame(FrameType::AuthOk, &[])?;
        writer.flush()?;
        Ok(negotiated)
    })();
    if let Err(e) = &result {
        send_error(writer, e);
    }
    result
}

/// Best-effort report of `error` to the peer (the stream is being abandoned anyway).
pub fn send_error<W: Write>(writer: &mut FrameWriter<W>, error: &Error) {
    let code = match error {
        Error::Peer { .. } => return,
        e => e.wire_code(),
    };
    let msg = ErrorMessage {
        code,
        message: error.to_string(),
    };
    let _ = writer.write_frame(FrameType::Error, &msg.encode());
    let _ = writer.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Psk {
        Psk::new(vec![b; 32]).unwrap()
    }

    #[test]
    fn mutual_authentication_succeeds_with_equal_keys() {
        let (c, hello) = ClientHandshake::start(key(1), Offer::default(), 0, 0);
        let (s, sh) =
            ServerHandshake::on_client_hello(key(1), Offer::default(), &hello, 42).unwrap();
        let (mac, cn) = c.on_server_hello(&sh).unwrap();
        let sn = s.on_client_auth(&mac).unwrap();
        assert_eq!(cn, sn);
        assert_eq!(sn.session_id, 42);
        assert_eq!(sn.version, MAX_VERSION);
    }

    /// The offer of the build before this one (it spoke version 1 only).
    const PREVIOUS: Offer = Offer {
        min_version: 1,
        max_version: 1,
        capabilities: SUPPORTED_CAPABILITIES,
    };

    /// Both ends agree on the version, and so does the proof that covers it.
    fn negotiate(client: Offer, server: Offer) -> Result<u8, Error> {
        let (c, hello) = ClientHandshake::start(key(1), client, 0, 0);
        let (s, sh) = ServerHandshake::on_client_hello(key(1), server, &hello, 42)?;
        let (mac, cn) = c.on_server_hello(&sh)?;
        let sn = s.on_client_auth(&mac)?;
        assert_eq!(cn, sn);
        Ok(sn.version)
    }

    #[test]
    fn version_n_talks_to_n_minus_one_in_both_directions() {
        assert_eq!(MAX_VERSION, IDENTITY_VERSION);
        assert_eq!(MIN_VERSION, MAX_VERSION - 1);
        let now = Offer::default();
        assert_eq!(negotiate(now, now).unwrap(), 2);
        assert_eq!(
            negotiate(PREVIOUS, now).unwrap(),
            1,
            "old source, new destination"
        );
        assert_eq!(
            negotiate(now, PREVIOUS).unwrap(),
            1,
            "new source, old destination"
        );
        assert_eq!(negotiate(PREVIOUS, PREVIOUS).unwrap(), 1);
        // The header keeps version 1 (a version 1 peer refuses any other before the negotiation).
        assert_eq!(crate::frame::PROTOCOL_VERSION, 1);
    }

    #[test]
    fn a_server_choosing_beyond_the_offer_is_refused() {
        let (c, hello) = ClientHandshake::start(key(1), PREVIOUS, 0, 0);
        let (_, mut sh) =
            ServerHandshake::on_client_hello(key(1), Offer::default(), &hello, 42).unwrap();
        assert_eq!(sh.version, 1);
        // An on-path upgrade of the chosen version is refused before the proof is even checked.
        sh.version = 2;
        assert!(matches!(c.on_server_hello(&sh), Err(Error::Protocol(_))));
        // And a downgrade within the offer breaks the proof, which covers the chosen version.
        let (c, hello) = ClientHandshake::start(key(1), Offer::default(), 0, 0);
        let (_, mut sh) =
            ServerHandshake::on_client_hello(key(1), Offer::default(), &hello, 42).unwrap();
        assert_eq!(sh.version, 2);
        sh.version = 1;
        assert!(matches!(
            c.on_server_hello(&sh),
            Err(Error::Handshake(HandshakeError::AuthenticationFailed))
        ));
    }

    #[test]
    fn client_refuses_server_without_key() {
        let (c, hello) = ClientHandshake::start(key(1), Offer::default(), 0, 0);
        let (_, sh) =
            ServerHandshake::on_client_hello(key(2), Offer::default(), &hello, 42).unwrap();
        assert!(matches!(
            c.on_server_hello(&sh),
            Err(Error::Handshake(HandshakeError::AuthenticationFailed))
        ));
    }

    #[test]
    fn server_refuses_client_without_key_and_replayed_proofs() {
        let (_, hello) = ClientHandshake::start(key(1), Offer::default(), 0, 0);
        let (s, sh) =
            ServerHandshake::on_client_hello(key(1), Offer::default(), &hello, 42).unwrap();
        // A proof made with the server's label (reflection) or another key is refused.
        assert!(s.on_client_auth(&sh.mac).is_err());
        // A proof recorded from an earlier exchange does not fit a fresh server nonce.
        let (c, hello) = ClientHandshake::start(key(1), Offer::default(), 0, 0);
        let (_, sh1) =
            ServerHandshake::on_client_hello(key(1), Offer::default(), &hello, 42).unwrap();
        let (old_mac, _) = c.on_server_hello(&sh1).unwrap();
        let (s2, _) =
            ServerHandshake::on_client_hello(key(1), Offer::default(), &hello, 42).unwrap();
        assert!(matches!(
            s2.on_client_auth(&old_mac),
            Err(Error::Handshake(HandshakeError::AuthenticationFailed))
        ));
    }

    #[test]
    fn a_tampered_offer_is_detected() {
        let (c, hello) = ClientHandshake::start(key(1), Offer::default(), 0, 0);
        let mut downgraded = hello.clone();
        downgraded.capabilities = 0;
        let (_, sh) =
            ServerHandshake::on_client_hello(key(1), Offer::default(), &downgraded, 42).unwrap();
        assert!(matches!(
            c.on_server_hello(&sh),
            Err(Error::Handshake(HandshakeError::AuthenticationFailed))
        ));
    }

    #[test]
    fn version_mismatch_is_typed() {
        let future = Offer {
            min_version: MAX_VERSION + 1,
            max_version: MAX_VERSION + 2,
            capabilities: 0,
        };
        let (_, hello) = ClientHandshake::start(key(1), future, 0, 0);
        let err =
            ServerHandshake::on_client_hello(key(1), Offer::default(), &hello, 1).unwrap_err();
        assert!(matches!(
            err,
            Error::Handshake(HandshakeError::VersionMismatch { theirs_min: 3, .. })
        ));
        // A peer that moved on past this build's versions is refused the same way by a client.
        let err = negotiate(Offer::default(), future).unwrap_err();
        assert!(matches!(
            err,
            Error::Handshake(HandshakeError::VersionMismatch { ours_min: 3, .. })
        ));
    }

    #[test]
    fn weak_keys_are_refused() {
        assert!(matches!(
            Psk::new(b"short".to_vec()),
            Err(Error::Handshake(HandshakeError::WeakKey { len: 5, .. }))
        ));
    }
}
