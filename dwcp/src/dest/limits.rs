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
    /// New connections per second one peer address may open (a burst of twice as many is
    /// allowed); more are closed at accept, before a thread or a TLS session is spent on them.
    /// A source opens at most `max_streams` streams at once, plus reconnects.
    pub connection_rate_per_peer: u32,
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
            connection_rate_per_peer: 64,
            max_sessions: 64,
            max_sessions_per_peer: 16,
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
    /// Token buckets of new connections, by address.
    rate: HashMap<IpAddr, Bucket>,
    refused: u64,
    refused_logged: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Addresses whose connection rate is remembered before full buckets are forgotten.
const RATE_TABLE_PRUNE: usize = 4096;

impl SlotState {
    /// Takes a token of `ip`'s bucket (refilled at `rate` per second up to twice that), or says
    /// the address is over its rate.
    fn admit_rate(&mut self, ip: IpAddr, rate: u32, now: Instant) -> bool {
        let rate = f64::from(rate.max(1));
        let burst = 2.0 * rate;
        if self.rate.len() >= RATE_TABLE_PRUNE {
            self.rate
                .retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = self.rate.entry(ip).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn refuse(&mut self, ip: IpAddr, why: &'static str, now: Instant) {
        self.refused += 1;
        if self
            .refused_logged
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_INTERVAL)
        {
            tracing::warn!(peer = %ip, refused_so_far = self.refused, "closed a connection: {why}");
            self.refused_logged = Some(now);
        }
    }
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

    /// Takes a slot for a connection from `peer`, or `None` when that address opens connections
    /// faster than `connection_rate_per_peer` or already has its share of slots (the refusal is
    /// counted, and logged at most once a second).
    pub(super) fn acquire(
        &self,
        peer: Option<IpAddr>,
        limits: &ListenerLimits,
    ) -> Option<HandshakeSlot> {
        let mut s = self.0.lock();
        if let Some(ip) = peer {
            let now = Instant::now();
            if !s.admit_rate(ip, limits.connection_rate_per_peer, now) {
                s.refuse(ip, "this address opens connections faster than it may", now);
                return None;
            }
            let held = s.per_peer.get(&ip).copied().unwrap_or(0);
            if held >= limits.max_handshakes_per_peer.max(1) {
                s.refuse(
                    ip,
                    "this address already has as many handshakes in progress as it may",
                    now,
                );
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

    /// Connections closed so far because their address was over its rate or had all its slots.
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
    fn an_address_opening_connections_too_fast_is_refused_and_others_are_not() {
        let slots = HandshakeSlots::default();
        let l = ListenerLimits {
            connection_rate_per_peer: 10,
            ..ListenerLimits::default()
        };
        let a: IpAddr = [127, 0, 0, 2].into();
        // A burst of twice the rate passes (each slot given back at once), the next is refused.
        for i in 0..20 {
            assert!(slots.acquire(Some(a), &l).is_some(), "connection {i}");
        }
        assert!(slots.acquire(Some(a), &l).is_none());
        assert_eq!(slots.refused(), 1);
        assert!(slots.acquire(Some([127, 0, 0, 3].into()), &l).is_some());
        // The bucket refills at the rate: 10 per second.
        std::thread::sleep(std::time::Duration::from_millis(250));
        assert!(slots.acquire(Some(a), &l).is_some());
    }

    #[test]
    fn one_address_cannot_take_every_slot() {
        let slots = HandshakeSlots::default();
        let l = limits(4, 2);
        // Not about the rate here.
        let l = ListenerLimits {
            connection_rate_per_peer: 1000,
            ..l
        };
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
