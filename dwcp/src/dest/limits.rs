//! What peers may hold at a listener: handshake slots (before a peer has proven anything) and
//! running sessions (after), in total and per peer address.
//!
//! A stranger costs a sleeping thread and a socket for at most `connect_timeout` while it
//! handshakes, so the total can be generous (256): 200 slow strangers fit and a real source still
//! finds a slot at once. The total bounds that cost; the per-address bound keeps one address (a slowloris, a peer that opens
//! connections in a loop) from taking every slot, so a real source at another address still finds
//! one. Connections over the per-address bound are closed as soon as they are accepted; over the
//! total they wait in the kernel's listen backlog.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Limits a [`Listener`](super::Listener) puts on its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections handshaking (TLS, then DWCP) at once, all peers together; more wait in the
    /// listen backlog until a slot frees up.
    pub max_handshakes: usize,
    /// Connections one peer address may have handshaking at once; more from it are closed at once.
    /// Above the streams a source opens at once (a closed one would cost it a reconnect).
    pub max_handshakes_per_peer: usize,
    /// Sessions receiving at once on the listener; a source over it is refused with
    /// [`Error::Busy`](dwcp_core::error::Error::Busy) before anything is written.
    pub max_sessions: usize,
    /// Sessions from one peer address receiving at once.
    pub max_sessions_per_peer: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_handshakes: 256,
            max_handshakes_per_peer: 32,
            max_sessions: 16,
            max_sessions_per_peer: 4,
        }
    }
}

/// How often a refusal of the same kind is logged at most: a peer that opens thousands of
/// connections must not turn the log into its amplifier.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// The handshakes in progress at one listener. Cheap to clone; every clone counts the same slots.
#[derive(Debug, Clone, Default)]
pub(super) struct HandshakeSlots(Arc<Mutex<SlotState>>);

#[derive(Debug, Default)]
struct SlotState {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
    refused: u64,
    refused_logged: Option<Instant>,
}

/// One handshake's slot, given back when dropped.
#[derive(Debug)]
pub(super) struct HandshakeSlot {
    slots: HandshakeSlots,
    peer: Option<IpAddr>,
}

impl HandshakeSlots {
    /// Every slot is taken: leave new connections in the backlog.
    pub(super) fn full(&self, limits: &ListenerLimits) -> bool {
        self.0.lock().total >= limits.max_handshakes.max(1)
    }

    /// Handshakes in progress.
    pub(super) fn in_use(&self) -> usize {
        self.0.lock().total
    }

    /// Takes a slot for a connection from `peer`, or `None` when that address already has its
    /// share (the refusal is counted, and logged at most once a second).
    pub(super) fn acquire(
        &self,
        peer: Option<IpAddr>,
        limits: &ListenerLimits,
    ) -> Option<HandshakeSlot> {
        let mut s = self.0.lock();
        if let Some(ip) = peer {
            let held = s.per_peer.get(&ip).copied().unwrap_or(0);
            if held >= limits.max_handshakes_per_peer.max(1) {
                s.refused += 1;
                let now = Instant::now();
                if s.refused_logged
                    .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_INTERVAL)
                {
                    tracing::warn!(
                        peer = %ip,
                        limit = limits.max_handshakes_per_peer,
                        refused_so_far = s.refused,
                        "closed a connection: this address already has as many handshakes in progress as it may"
                    );
                    s.refused_logged = Some(now);
                }
                return None;
            }
            *s.per_peer.entry(ip).or_default() += 1;
        }
        s.total += 1;
        drop(s);
        Some(HandshakeSlot {
            slots: self.clone(),
            peer,
        })
    }

    /// Connections closed so far because their address had all its slots.
    pub(super) fn refused(&self) -> u64 {
        self.0.lock().refused
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut s = self.slots.0.lock();
        s.total = s.total.saturating_sub(1);
        if let Some(ip) = self.peer {
            if let Some(n) = s.per_peer.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    s.per_peer.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_peer: usize) -> ListenerLimits {
        ListenerLimits {
            max_handshakes: total,
            max_handshakes_per_peer: per_peer,
            ..ListenerLimits::default()
        }
    }

    #[test]
    fn one_address_cannot_take_every_slot() {
        let slots = HandshakeSlots::default();
        let l = limits(4, 2);
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 3].into();
        let a1 = slots.acquire(Some(a), &l).unwrap();
        let _a2 = slots.acquire(Some(a), &l).unwrap();
        assert!(slots.acquire(Some(a), &l).is_none());
        assert_eq!(slots.refused(), 1);
        let _b1 = slots.acquire(Some(b), &l).unwrap();
        assert!(!slots.full(&l));
        drop(a1);
        let again = slots.acquire(Some(a), &l);
        assert!(again.is_some(), "a freed slot is reusable");
        assert_eq!(slots.in_use(), 3);
    }

    #[test]
    fn the_total_is_shared_by_all_addresses() {
        let slots = HandshakeSlots::default();
        let l = limits(3, 8);
        let held: Vec<_> = (1..=3u8)
            .map(|i| slots.acquire(Some([127, 0, 0, i].into()), &l).unwrap())
            .collect();
        assert!(slots.full(&l));
        drop(held);
        assert!(!slots.full(&l));
        assert_eq!(slots.in_use(), 0);
        assert!(slots.0.lock().per_peer.is_empty(), "no entry left behind");
    }
}
