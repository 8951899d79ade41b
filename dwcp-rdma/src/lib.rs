//! AMST over RDMA verbs: the datacenter transport of DWCP.
//!
//! The migration engine speaks frames over [`dwcp_core::transport::Conn`]s. This crate provides
//! them over RDMA reliable-connected queue pairs ([`RdmaConn`], with the `rdma` feature), and the
//! *datacenter mode* connector and acceptor ([`DatacenterConnector`], [`DatacenterAcceptor`]) that
//! use RDMA when both sides have a device and fall back to plain TCP, with a logged reason,
//! otherwise. The engine above does not change: it opens N connections and stripes chunks over
//! them, whether they are TCP streams or queue pairs.
//!
//! Without the `rdma` feature the crate builds without libibverbs, and datacenter mode is TCP.
//! See `docs/rdma.md` for the design, the flow control and how to run it on real hardware.
#![deny(missing_docs)]

use std::io;
use std::time::Duration;

use dwcp_core::pool::BufferPool;

#[cfg(feature = "rdma")]
mod conn;
mod datacenter;
#[cfg(feature = "rdma")]
mod verbs;
// Without the feature only the accepting half of the setup exchange is used.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
mod wire;

#[cfg(feature = "rdma")]
pub use conn::RdmaConn;
pub use datacenter::{DatacenterAcceptor, DatacenterConnector};
#[cfg(feature = "rdma")]
pub use verbs::device_names;

/// Why an RDMA operation or setup failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RdmaError {
    /// There is no usable RDMA device (or this build has no RDMA support).
    #[error("no usable RDMA device: {0}")]
    NoDevice(String),
    /// A verbs call failed.
    #[error("{call} failed: {source}")]
    Verbs {
        /// The call, with its arguments where they help.
        call: String,
        /// The error libibverbs reported.
        #[source]
        source: io::Error,
    },
    /// The configuration is invalid or exceeds what the device supports.
    #[error("invalid RDMA configuration: {0}")]
    Config(String),
    /// The two sides could not agree on a connection.
    #[error("RDMA connection setup failed: {0}")]
    Setup(String),
    /// The peer refused RDMA (and offered TCP on the same connection).
    #[error("the peer refused RDMA: {0}")]
    Refused(String),
    /// The peer sent a malformed setup message.
    #[error("malformed RDMA setup message from the peer: {0}")]
    Protocol(String),
    /// I/O on the TCP side channel failed.
    #[error("RDMA side channel: {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl From<RdmaError> for dwcp_core::Error {
    fn from(e: RdmaError) -> Self {
        match e {
            RdmaError::Config(m) => dwcp_core::Error::Config(m),
            RdmaError::Io { context, source } => {
                dwcp_core::Error::io(format!("RDMA side channel: {context}"), source)
            }
            other => dwcp_core::Error::io("RDMA transport", io::Error::other(other)),
        }
    }
}

/// Parameters of the RDMA transport. The defaults suit a single 100 Gbit/s port and Soft-RoCE.
#[derive(Debug, Clone)]
pub struct RdmaConfig {
    /// The device to use (`ibv_devices` lists them); `None`: the first one.
    pub device: Option<String>,
    /// The device port (1-based).
    pub port: u8,
    /// GID table index for RoCE; `None`: an IPv4-mapped GID if the port has one, else the first.
    pub gid_index: Option<u8>,
    /// Work requests per queue pair and direction (send queue, receive queue). At least
    /// `2 × ring_slots + 2`.
    pub queue_depth: u32,
    /// Scatter-gather entries per work request the queue pairs are created with.
    pub max_sge: u32,
    /// Messages up to this many bytes are posted inline (copied into the work request) instead of
    /// through a registered staging buffer (at most 1024).
    pub max_inline: u32,
    /// Receive-ring slots per connection (1..=256), each a registered 1 MiB pool buffer the peer
    /// writes into; as many staging buffers are registered for sending. This is the flow-control
    /// window: `ring_slots` messages in flight per connection.
    pub ring_slots: u32,
    /// How long a blocked read or write polls the completion queue before it sleeps on the
    /// completion channel. Polling costs a CPU while it lasts; sleeping costs a wake-up (micro-
    /// seconds on bare metal, far more for a descheduled virtual CPU).
    pub poll_spin: Duration,
    /// Time allowed to open a connection: TCP connect, exchanging queue-pair addresses, buffers.
    pub setup_timeout: Duration,
    /// Datacenter mode only: use TCP when RDMA cannot be set up (`false`: fail instead).
    pub fallback_to_tcp: bool,
    /// The pool the ring and staging buffers come from (shared with other users of the process);
    /// `None`: a pool of `buffer_budget` bytes per connector or acceptor.
    pub buffer_pool: Option<BufferPool>,
    /// Budget of the pool created when `buffer_pool` is `None`. Each connection holds
    /// `2 × ring_slots` buffers of 1,114,112 bytes.
    pub buffer_budget: usize,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        Self {
            device: None,
            port: 1,
            gid_index: None,
            queue_depth: 1024,
            max_sge: 16,
            max_inline: 256,
            ring_slots: 8,
            poll_spin: Duration::from_micros(50),
            setup_timeout: Duration::from_secs(10),
            fallback_to_tcp: true,
            buffer_pool: None,
            // Eight connections of 16 buffers each.
            buffer_budget: 8 * 16 * dwcp_core::pool::SizeClass::Large.capacity(),
        }
    }
}

impl RdmaConfig {
    /// Checks the parameters that do not depend on the device.
    pub fn validate(&self) -> Result<(), RdmaError> {
        let bad = |m: String| Err(RdmaError::Config(m));
        if self.port == 0 {
            return bad("port 0 (ports are numbered from 1)".into());
        }
        if !(1..=wire::MAX_RING_SLOTS as u32).contains(&self.ring_slots) {
            return bad(format!(
                "ring_slots = {} (1..={})",
                self.ring_slots,
                wire::MAX_RING_SLOTS
            ));
        }
        let needed = 2 * self.ring_slots + 2;
        if self.queue_depth < needed || self.queue_depth > 1 << 16 {
            return bad(format!(
                "queue_depth = {} (at least 2 × ring_slots + 2 = {needed}, at most 65536)",
                self.queue_depth
            ));
        }
        if !(1..=64).contains(&self.max_sge) {
            return bad(format!("max_sge = {} (1..=64)", self.max_sge));
        }
        if self.max_inline > 1024 {
            return bad(format!("max_inline = {} (at most 1024)", self.max_inline));
        }
        if self.setup_timeout.is_zero() {
            return bad("setup_timeout = 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        RdmaConfig::default().validate().unwrap();
        let e = RdmaConfig {
            ring_slots: 600,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("ring_slots = 600"), "{e}");
        let e = RdmaConfig {
            queue_depth: 8,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("queue_depth = 8"), "{e}");
        assert!(
            RdmaConfig {
                max_inline: 4096,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn errors_convert_with_their_context() {
        let e: dwcp_core::Error = RdmaError::NoDevice("none here".into()).into();
        assert!(e.to_string().contains("none here"), "{e}");
        let e: dwcp_core::Error = RdmaError::Config("x".into()).into();
        assert!(matches!(e, dwcp_core::Error::Config(_)));
    }
}
