//! The one error hierarchy of DWCP.
//!
//! Every fallible operation in every DWCP crate returns [`Error`]. Variants group by where the fault lies
//! (the bytes on the wire, the peer's identity, the local I/O, the migration's own checks) so that a
//! caller can decide what to do without parsing messages.

use std::io;

/// A frame on the wire was not acceptable. Raised before any payload is acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Fewer bytes were available than the frame needs.
    #[error("truncated frame: needed {needed} bytes, had {have}")]
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes that were available.
        have: usize,
    },
    /// The frame does not start with the DWCP magic.
    #[error("bad magic {0:#010x}: the peer does not speak DWCP")]
    BadMagic(u32),
    /// The frame's protocol version is not one this build speaks.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The frame type byte is unknown.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// The declared payload length exceeds the negotiated maximum.
    #[error("oversize frame: payload of {len} bytes exceeds the limit of {max}")]
    Oversize {
        /// Declared payload length.
        len: u64,
        /// Largest accepted payload length.
        max: u64,
    },
    /// The checksum over header and payload does not match.
    #[error("frame checksum mismatch: the frame was corrupted in transit")]
    ChecksumMismatch,
    /// A reserved header field is not zero.
    #[error("reserved header bits are set")]
    ReservedNonZero,
    /// The stream sequence number is not the next one expected (a frame was lost or replayed).
    #[error("unexpected stream sequence: expected {expected}, got {got}")]
    UnexpectedSequence {
        /// Sequence expected next.
        expected: u64,
        /// Sequence received.
        got: u64,
    },
    /// The frame belongs to another session.
    #[error("frame for session {got:#x} on a stream of session {expected:#x}")]
    WrongSession {
        /// Session of this stream.
        expected: u64,
        /// Session in the frame.
        got: u64,
    },
    /// A payload field is out of range or inconsistent.
    #[error("malformed {what} payload: {why}")]
    Malformed {
        /// Which payload.
        what: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

/// The connection handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peers have no protocol version in common.
    #[error(
        "no common protocol version: we speak {ours_min}..={ours_max}, the peer {theirs_min}..={theirs_max}"
    )]
    VersionMismatch {
        /// Our lowest version.
        ours_min: u8,
        /// Our highest version.
        ours_max: u8,
        /// The peer's lowest version.
        theirs_min: u8,
        /// The peer's highest version.
        theirs_max: u8,
    },
    /// The peer failed to prove knowledge of the pre-shared key (or we failed to prove ours to it).
    #[error(
        "peer authentication failed: the pre-shared keys differ or the peer is not a DWCP peer"
    )]
    AuthenticationFailed,
    /// The pre-shared key is too short to be safe.
    #[error("pre-shared key too short: {len} bytes, at least {min} required")]
    WeakKey {
        /// Length of the key given.
        len: usize,
        /// Minimum length.
        min: usize,
    },
    /// The peer sent a frame that does not belong at this point of the handshake.
    #[error("unexpected {got} frame during the handshake (expected {expected})")]
    UnexpectedFrame {
        /// What was expected.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// A stream tried to join a session that does not exist or is complete.
    #[error("unknown session {0:#x}")]
    UnknownSession(u64),
}

/// Why a stream's encryption or peer authentication failed (TLS layer, see `dwcp-tls`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecurityError {
    /// The TLS handshake failed: a certificate was refused (unknown CA, expired, wrong name), the
    /// peer sent no certificate, or the handshake was malformed.
    #[error("TLS handshake with {peer} failed: {reason}")]
    Handshake {
        /// The peer's address.
        peer: String,
        /// rustls' reason, e.g. "invalid peer certificate: Expired".
        reason: String,
    },
    /// The peer speaks plain-text DWCP to an encrypted endpoint (or TLS to a plain-text one).
    #[error(
        "{peer} speaks {theirs} but this endpoint requires {ours}: both sides must use the same security mode (plain text only with --insecure-plaintext on both)"
    )]
    ModeMismatch {
        /// The peer's address.
        peer: String,
        /// What the peer sent ("plain-text DWCP", "TLS").
        theirs: &'static str,
        /// What this endpoint expects.
        ours: &'static str,
    },
    /// A TLS record failed authentication after the handshake: the stream was tampered with or
    /// corrupted in transit. The session is abandoned rather than any page applied.
    #[error(
        "TLS record from {peer} failed authentication ({reason}): the stream was tampered with or corrupted"
    )]
    Integrity {
        /// The peer's address.
        peer: String,
        /// rustls' reason.
        reason: String,
    },
    /// Certificate or key files could not be used.
    #[error("TLS credentials: {0}")]
    Credentials(String),
}

/// Which side of a migration refused, when the peer reports an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Protocol violation.
    Protocol = 1,
    /// Authentication failed.
    Authentication = 2,
    /// No common version.
    Version = 3,
    /// The destination cannot hold the announced memory layout.
    Layout = 4,
    /// The migration was cancelled.
    Cancelled = 5,
    /// An internal failure on the peer.
    Internal = 6,
    /// The digests differ.
    DigestMismatch = 7,
    /// The destination is at a limit (sessions running, sessions from this peer); try later.
    Busy = 8,
    /// The destination refused the VM's identity (UUID or memory layout fingerprint) before any page
    /// was written. Peers older than protocol version 2 read it as [`ErrorCode::Internal`].
    Identity = 9,
}

impl ErrorCode {
    /// Parses a wire code; unknown codes map to [`ErrorCode::Internal`].
    pub fn from_wire(code: u16) -> Self {
        match code {
            1 => Self::Protocol,
            2 => Self::Authentication,
            3 => Self::Version,
            4 => Self::Layout,
            5 => Self::Cancelled,
            7 => Self::DigestMismatch,
            8 => Self::Busy,
            9 => Self::Identity,
            _ => Self::Internal,
        }
    }
}

/// A chunk payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// The chunk is shorter than its own fields say.
    #[error("truncated chunk: {0}")]
    Truncated(&'static str),
    /// A field is out of range.
    #[error("invalid chunk: {0}")]
    Invalid(String),
    /// The compressed section does not decompress to the declared size.
    #[error("chunk decompression failed: {0}")]
    Decompress(String),
    /// A page lies outside the negotiated memory layout.
    #[error("page {page} outside the memory layout of {total_pages} pages")]
    PageOutOfRange {
        /// The offending page number.
        page: u64,
        /// Pages in the layout.
        total_pages: u64,
    },
}

/// Any DWCP failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A frame from the network was refused.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// A chunk payload was refused.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// Local or socket I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The peer reported an error and closed the session.
    #[error("peer reported {code:?}: {message}")]
    Peer {
        /// Category.
        code: ErrorCode,
        /// The peer's explanation.
        message: String,
    },
    /// The peer broke the protocol in a way not covered by a frame error.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The memory layouts of source and destination are incompatible.
    #[error("memory layout mismatch: {0}")]
    Layout(String),
    /// The whole-memory digests differ: the destination is not a bit-exact copy.
    #[error(
        "memory digest mismatch: source {source_digest:032x}, destination {destination_digest:032x}"
    )]
    DigestMismatch {
        /// Source digest.
        source_digest: u128,
        /// Destination digest.
        destination_digest: u128,
    },
    /// An operation did not complete in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The migration was cancelled by the caller.
    #[error("migration cancelled")]
    Cancelled,
    /// Configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The source sent the handover decision but the destination did not confirm it: either side may own
    /// the VM now, so the source was *not* resumed. The operator (or the cluster layer) must decide.
    #[error("handover unconfirmed: {0}")]
    HandoverUnconfirmed(String),
    /// The cluster refused to record the new owner; the source guest was resumed.
    #[error("handover refused by the cluster: {0}")]
    HandoverRefused(String),
    /// The hypervisor callback (pause, resume, handover) failed.
    #[error("VM control failed: {0}")]
    VmControl(String),
    /// Encryption or peer authentication failed.
    #[error(transparent)]
    Security(#[from] SecurityError),
    /// The destination refused the VM the source announced: another UUID than the one expected, a
    /// layout fingerprint that does not match the layout announced or the one expected, or no
    /// identity at all from a source speaking protocol version 1 when one is required. Raised before
    /// any page is written.
    #[error(
        "VM identity refused: the destination expects {what} {expected}, the source announced {announced}"
    )]
    Identity {
        /// What was compared: "VM UUID" or "layout fingerprint".
        what: &'static str,
        /// What the destination expects.
        expected: String,
        /// What the source announced.
        announced: String,
    },
    /// A listener limit refused the peer (too many sessions running, or from this address);
    /// nothing was written. The source may try again later.
    #[error("destination busy: {0}")]
    Busy(String),
    /// Pre-copy could not bring the pause within the operator's ceiling (every aid tried), or its
    /// deadline passed: the guest keeps running on the source, unthrottled.
    #[error(
        "pre-copy did not converge ({why}) after {passes} passes: a pause now would take {predicted_downtime_ms} ms \
         against a ceiling of {ceiling_ms} ms; the guest dirtied {dirty_mb_s:.1} MB/s while the last pass sent \
         {send_mb_s:.1} MB/s, with the vCPUs throttled {throttle_percent} %"
    )]
    NotConverged {
        /// What ended it: every aid exhausted, or the deadline.
        why: &'static str,
        /// Passes made.
        passes: u32,
        /// The pause the last pass predicted, milliseconds.
        predicted_downtime_ms: u64,
        /// The largest pause the operator accepts, milliseconds.
        ceiling_ms: u64,
        /// How fast the guest dirtied memory during the last pass, MB/s.
        dirty_mb_s: f64,
        /// How fast the last pass sent, MB/s.
        send_mb_s: f64,
        /// The vCPU throttle in force, percent.
        throttle_percent: u8,
    },
    /// Every stream to the peer failed and reconnecting did not succeed within the allowed attempts.
    #[error(
        "every stream to the peer failed and {attempts} reconnection attempts did not succeed (last error: {last})"
    )]
    StreamsLost {
        /// Reconnection attempts made.
        attempts: u32,
        /// Why the last attempt (or the last stream) failed.
        last: String,
    },
}

impl Error {
    /// The security failure behind this error, including one carried inside an I/O error (a TLS
    /// stream reports a tampered record to its reader as an `io::Error` wrapping [`SecurityError`]).
    pub fn security(&self) -> Option<&SecurityError> {
        match self {
            Error::Security(s) => Some(s),
            Error::Io { source, .. } => source
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<SecurityError>()),
            _ => None,
        }
    }

    /// Wraps an I/O error with what was being attempted.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The code to send to the peer when this error ends a session.
    pub fn wire_code(&self) -> ErrorCode {
        match self {
            Error::Frame(_) | Error::Chunk(_) | Error::Protocol(_) => ErrorCode::Protocol,
            Error::Handshake(HandshakeError::VersionMismatch { .. }) => ErrorCode::Version,
            Error::Handshake(
                HandshakeError::AuthenticationFailed | HandshakeError::WeakKey { .. },
            ) => ErrorCode::Authentication,
            Error::Handshake(_) => ErrorCode::Protocol,
            Error::Security(_) => ErrorCode::Authentication,
            Error::Layout(_) => ErrorCode::Layout,
            Error::Cancelled => ErrorCode::Cancelled,
            Error::DigestMismatch { .. } => ErrorCode::DigestMismatch,
            Error::Busy(_) => ErrorCode::Busy,
            Error::Identity { .. } => ErrorCode::Identity,
            _ => ErrorCode::Internal,
        }
    }
}

/// Why a migration ended without a handover, in a few words a person (and a metric label) can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureReason {
    /// An operation did not complete in time (the peer went silent, a deadline passed).
    Timeout,
    /// The peer refused or ended the session (its reason is in the error).
    PeerRefused,
    /// Authentication or encryption failed: wrong key, certificate, tampered data.
    Authentication,
    /// Cancelled on this side (the caller, the CLI, the control socket).
    Cancelled,
    /// The peer cancelled.
    CancelledByPeer,
    /// Every stream failed and reconnecting did not succeed.
    LinkLost,
    /// The destination's copy is not bit-exact.
    DigestMismatch,
    /// The destination cannot hold this guest's memory layout.
    Layout,
    /// The destination is at a limit; try later.
    Busy,
    /// The destination refused the VM's identity (another VM, another memory layout).
    Identity,
    /// Pre-copy did not converge within the ceiling or the deadline.
    NotConverged,
    /// The cluster refused to record the new owner.
    HandoverRefused,
    /// The handover decision was sent but not confirmed: either side may own the VM.
    HandoverUnconfirmed,
    /// The hypervisor callback failed.
    VmControl,
    /// The configuration is invalid.
    Config,
    /// The peer broke the protocol (or a version mismatch).
    Protocol,
    /// Local or socket I/O failed.
    Io,
}

impl FailureReason {
    /// The name used in events, reports and the `reason` label of metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Timeout => "timeout",
            FailureReason::PeerRefused => "peer_refused",
            FailureReason::Authentication => "authentication",
            FailureReason::Cancelled => "cancelled",
            FailureReason::CancelledByPeer => "cancelled_by_peer",
            FailureReason::LinkLost => "link_lost",
            FailureReason::DigestMismatch => "digest_mismatch",
            FailureReason::Layout => "layout",
            FailureReason::Busy => "busy",
            FailureReason::Identity => "identity",
            FailureReason::NotConverged => "not_converged",
            FailureReason::HandoverRefused => "handover_refused",
            FailureReason::HandoverUnconfirmed => "handover_unconfirmed",
            FailureReason::VmControl => "vm_control",
            FailureReason::Config => "config",
            FailureReason::Protocol => "protocol",
            FailureReason::Io => "io",
        }
    }
}

impl Error {
    /// The category of this failure, for reports, events and metric labels.
    pub fn reason(&self) -> FailureReason {
        if self.security().is_some() {
            return FailureReason::Authentication;
        }
        match self {
            Error::Timeout(_) => FailureReason::Timeout,
            Error::Cancelled => FailureReason::Cancelled,
            Error::Peer { code, .. } => match code {
                ErrorCode::Cancelled => FailureReason::CancelledByPeer,
                ErrorCode::Authentication => FailureReason::Authentication,
                ErrorCode::Layout => FailureReason::Layout,
                ErrorCode::DigestMismatch => FailureReason::DigestMismatch,
                ErrorCode::Busy => FailureReason::Busy,
                ErrorCode::Identity => FailureReason::Identity,
                ErrorCode::Version | ErrorCode::Protocol => FailureReason::Protocol,
                _ => FailureReason::PeerRefused,
            },
            Error::Handshake(
                HandshakeError::AuthenticationFailed | HandshakeError::WeakKey { .. },
            ) => FailureReason::Authentication,
            Error::Frame(_) | Error::Chunk(_) | Error::Protocol(_) | Error::Handshake(_) => {
                FailureReason::Protocol
            }
            Error::Layout(_) => FailureReason::Layout,
            Error::DigestMismatch { .. } => FailureReason::DigestMismatch,
            Error::Busy(_) => FailureReason::Busy,
            Error::Identity { .. } => FailureReason::Identity,
            Error::StreamsLost { .. } => FailureReason::LinkLost,
            Error::NotConverged { .. } => FailureReason::NotConverged,
            Error::HandoverRefused(_) => FailureReason::HandoverRefused,
            Error::HandoverUnconfirmed(_) => FailureReason::HandoverUnconfirmed,
            Error::VmControl(_) => FailureReason::VmControl,
            Error::Config(_) => FailureReason::Config,
            Error::Security(_) => FailureReason::Authentication,
            Error::Io { .. } => FailureReason::Io,
        }
    }
}

/// Result alias used throughout DWCP.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_has_the_reason_a_person_would_give() {
        let tampered = Error::io(
            "reading a stream",
            io::Error::new(
                io::ErrorKind::InvalidData,
                SecurityError::Integrity {
                    peer: "p".into(),
                    reason: "bad record mac".into(),
                },
            ),
        );
        let peer = |code| Error::Peer {
            code,
            message: String::new(),
        };
        for (error, reason) in [
            (Error::Cancelled, FailureReason::Cancelled),
            (peer(ErrorCode::Cancelled), FailureReason::CancelledByPeer),
            (peer(ErrorCode::Internal), FailureReason::PeerRefused),
            (peer(ErrorCode::Busy), FailureReason::Busy),
            (peer(ErrorCode::Identity), FailureReason::Identity),
            (
                Error::Identity {
                    what: "VM UUID",
                    expected: "a".into(),
                    announced: "b".into(),
                },
                FailureReason::Identity,
            ),
            (tampered, FailureReason::Authentication),
            (
                Error::io("connecting", io::Error::other("refused")),
                FailureReason::Io,
            ),
            (
                Error::StreamsLost {
                    attempts: 3,
                    last: "reset".into(),
                },
                FailureReason::LinkLost,
            ),
            (Error::Timeout("acks".into()), FailureReason::Timeout),
            (
                Error::Handshake(HandshakeError::AuthenticationFailed),
                FailureReason::Authentication,
            ),
        ] {
            assert_eq!(error.reason(), reason, "{error}");
        }
        assert_eq!(FailureReason::CancelledByPeer.as_str(), "cancelled_by_peer");
        assert_eq!(FailureReason::Identity.as_str(), "identity");
    }

    /// A v2 destination's identity refusal travels as code 9; a v1 peer, which does not know it,
    /// reads Internal (and still shows the message).
    #[test]
    fn identity_refusals_have_their_own_wire_code() {
        let e = Error::Identity {
            what: "VM UUID",
            expected: "x".into(),
            announced: "y".into(),
        };
        assert_eq!(e.wire_code(), ErrorCode::Identity);
        assert_eq!(ErrorCode::from_wire(9), ErrorCode::Identity);
        assert_eq!(ErrorCode::from_wire(10), ErrorCode::Internal);
        let text = e.to_string();
        assert!(
            text.contains("expects VM UUID x") && text.contains("announced y"),
            "{text}"
        );
    }
}
