//! The crate's one error type.

use std::net::SocketAddr;

/// What can go wrong starting, feeding or stopping the gossip.
///
/// A peer's bad value is not an error here: it is logged and ignored (see the crate docs), because
/// one misbehaving peer must not make a healthy node's calls fail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AssError {
    /// The configuration cannot work (zero interval, empty cluster id, unroutable advertise
    /// address, ...).
    #[error("invalid gossip config: {0}")]
    InvalidConfig(String),
    /// The gossip server could not be started, usually because the UDP address is taken.
    #[error("could not start gossip on {addr}: {reason}")]
    Start {
        /// The address the server tried to listen on.
        addr: SocketAddr,
        /// chitchat's or the OS's explanation.
        reason: String,
    },
    /// The state handed to [`crate::Gossip::publish`] breaks a bound (non-finite load, too many
    /// link forecasts, an address string too long).
    #[error("invalid node state: {0}")]
    InvalidState(String),
    /// An encoded value would exceed its key's size bound; peers would drop it, so it is refused
    /// here instead.
    #[error("encoded value of key {key} is {len} bytes, over its {max}-byte bound")]
    TooLarge {
        /// The chitchat key.
        key: &'static str,
        /// The encoded length.
        len: usize,
        /// The bound ([`crate::keys`]).
        max: usize,
    },
    /// The gossip task ended with an error or panicked.
    #[error("gossip task failed: {0}")]
    Task(String),
}
