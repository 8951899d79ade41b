//! QEMU proxy mode: carries QEMU's own live migration through DWCP.
//!
//! ```text
//! source QEMU ──migrate tcp:A──▶ SourceProxy(A) ══ DWCP tunnel: N authenticated streams ══▶
//!     DestinationProxy(P) ──one connection per channel──▶ destination QEMU (-incoming tcp:Q)
//! ```
//!
//! Every TCP connection QEMU opens (one for a plain migration, 1 + N with multifd) becomes a
//! *channel* of the tunnel. Its bytes are cut into segments, compressed when that pays (all-zero
//! segments are elided), striped over the tunnel's streams and put back in order on the other side,
//! so each connection's byte stream arrives exactly as sent. Per-channel windows bound the memory of
//! both proxies, and a channel that QEMU closes or breaks on one side is closed or reset on the other.
//!
//! Every stream of the tunnel is TLS 1.3 by default ([`Security`], from `dwcp-tls`): a pre-shared
//! key alone keys TLS, certificates authenticate both proxies mutually, and plain text takes an
//! explicit [`Security::insecure_plaintext`], which the reports say.
//!
//! The pieces: [`wire`] (message payloads), [`segment`] (segment encoding) and [`state`] (the
//! channel state machine) do no I/O; `endpoint` is the thread-per-socket shell around them; `secure`
//! opens and accepts the streams (TCP, TLS, then the DWCP handshake inside it); [`SourceProxy`] and
//! [`DestinationProxy`] set the tunnel up and serve one migration. The protocol is specified in
//! `docs/qemu.md`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod endpoint;
mod proxy;
mod secure;
pub mod segment;
pub mod state;
pub mod wire;

use std::time::Duration;

use dwcp_core::error::Error;
use dwcp_hde::Codec;
use dwcp_tcp::SocketProfile;

pub use dwcp_tls::{Security, SecurityMode};
pub use proxy::{DestinationProxy, SourceProxy};

/// Settings of a tunnel. The source's `streams` and `window` are proposals the destination may
/// lower (the window) and must accept (the streams, 1..=64).
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// DWCP streams of the tunnel (source only).
    pub streams: u16,
    /// Most streams on a path whose round trip is under 1 ms (source only; default 1): there more
    /// streams only take CPU from the QEMUs.
    pub local_streams: u16,
    /// Compressor of the segments this side sends.
    pub codec: Codec,
    /// Compressor of the segments the source sends when the tunnel's round trip is under 1 ms
    /// (loopback, one switch): there the CPU limits QEMU, not the link, and compressing takes CPU
    /// from the QEMUs. Default: none.
    pub local_codec: Codec,
    /// Raw bytes one direction of one channel may have in flight before the receiver acknowledges
    /// them; each proxy buffers at most this much per channel and direction.
    pub window: u32,
    /// QEMU connections open at once (1 + multifd channels).
    pub max_channels: usize,
    /// Limit of connecting, securing (TLS) and authenticating each tunnel stream, and of connecting to
    /// the destination QEMU.
    pub connect_timeout: Duration,
    /// Limit of any blocked read or write on the tunnel, of a wait for credit, and of a channel
    /// half-closed on one side only.
    pub io_timeout: Duration,
    /// Limit of the wait for the first QEMU connection (source) or for the tunnel (destination).
    pub accept_timeout: Duration,
    /// An idle stream sends a Keepalive this often.
    pub keepalive: Duration,
    /// Socket options of the tunnel's streams.
    pub socket: SocketProfile,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            streams: 4,
            local_streams: 1,
            codec: Codec::Lz4,
            local_codec: Codec::None,
            window: 32 << 20,
            max_channels: 32,
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            accept_timeout: Duration::from_secs(600),
            keepalive: Duration::from_secs(1),
            socket: SocketProfile::datacenter(),
        }
    }
}

impl TunnelConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), Error> {
        if !(1..=64).contains(&self.streams) {
            return Err(Error::Config(format!("{} streams (1..=64)", self.streams)));
        }
        if (self.window as usize) < wire::MAX_SEGMENT || self.window > 1 << 30 {
            return Err(Error::Config(format!(
                "window of {} bytes ({}..=1 GiB)",
                self.window,
                wire::MAX_SEGMENT
            )));
        }
        if !(1..=256).contains(&self.max_channels) {
            return Err(Error::Config(format!(
                "{} channels (1..=256)",
                self.max_channels
            )));
        }
        if self.keepalive.is_zero() || self.keepalive >= self.io_timeout {
            return Err(Error::Config(
                "the keepalive interval must be positive and below the I/O timeout".into(),
            ));
        }
        Ok(())
    }
}

/// What one proxy did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TunnelReport {
    /// `source` or `destination`.
    pub role: &'static str,
    /// Streams of the tunnel.
    pub streams: usize,
    /// Compressor of the segments this side sent.
    pub codec: String,
    /// How the tunnel's streams were protected (`tls-certificates`, `tls-psk`, or
    /// `insecure-plaintext`: QEMU's memory crossed the network in clear text).
    pub security: SecurityMode,
    /// The negotiated TLS protocol, cipher suite and key exchange (of the first stream; all streams
    /// negotiate alike), e.g. `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519MLKEM768`; `None` in plain text.
    pub tls_session: Option<String>,
    /// QEMU connections carried.
    pub channels: u64,
    /// Channels reset by either side.
    pub resets: u64,
    /// QEMU bytes read on this side and sent.
    pub raw_bytes_sent: u64,
    /// QEMU bytes received and written on this side.
    pub raw_bytes_received: u64,
    /// Tunnel bytes written (frame headers included; not the TLS records' 22 bytes per 16 KiB).
    pub wire_bytes_sent: u64,
    /// Tunnel bytes read (counted as written).
    pub wire_bytes_received: u64,
    /// From the start of the tunnel (source: before connecting; destination: after the handshake)
    /// to its orderly close.
    pub duration_ms: f64,
}
