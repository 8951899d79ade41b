//! Transport mode: datacenter, internet or hybrid, detected from the handshake round trip and a short
//! bandwidth probe (or fixed by configuration), and what each mode changes.
//!
//! | mode | detected when | sockets | streams (start / max) |
//! |---|---|---|---|
//! | datacenter | RTT < 2 ms and probe ≥ 1 Gbit/s (or no probe) | 4 MiB buffers, no unsent limit | 2 / cores × 2 |
//! | hybrid | anything between | BDP buffers, 256 KiB unsent limit, user timeout | 2 / 8 |
//! | internet | RTT ≥ 10 ms, or probe < 200 Mbit/s | BDP buffers, 256 KiB unsent limit, user timeout | 4 / 16 |

use std::time::Duration;

use crate::profile::SocketProfile;

/// Round trips below this may be datacenter paths.
pub const DATACENTER_MAX_RTT: Duration = Duration::from_millis(2);
/// Round trips at or above this are internet paths.
pub const INTERNET_MIN_RTT: Duration = Duration::from_millis(10);
/// A probe below this rate (bytes/s; 200 Mbit/s) makes any path an internet path.
pub const INTERNET_MAX_RATE: f64 = 200e6 / 8.0;
/// A datacenter path carries at least this (bytes/s; 1 Gbit/s).
pub const DATACENTER_MIN_RATE: f64 = 1e9 / 8.0;

/// How the path between the hosts is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Mode {
    /// Short, fast path: few streams, lz4, big buffers.
    Datacenter,
    /// Long or slow path: BBR with BDP-sized buffers, more streams, stronger compression.
    Internet,
    /// Neither clearly: internet sockets with a datacenter-sized stream count.
    Hybrid,
}

/// What a session's configuration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum ModeSetting {
    /// Detect from the handshake round trip (and the probe, when there is one).
    #[default]
    Auto,
    /// Use this mode whatever the path looks like.
    Fixed(Mode),
}

/// The mode of a path with round trip `rtt` and, if measured, probe goodput `probe_bps` (bytes/s).
pub fn classify(rtt: Duration, probe_bps: Option<f64>) -> Mode {
    let slow = probe_bps.is_some_and(|r| r < INTERNET_MAX_RATE);
    if rtt >= INTERNET_MIN_RTT || slow {
        Mode::Internet
    } else if rtt < DATACENTER_MAX_RTT && probe_bps.is_none_or(|r| r >= DATACENTER_MIN_RATE) {
        Mode::Datacenter
    } else {
        Mode::Hybrid
    }
}

impl Mode {
    /// Socket options for this mode on a path of `rtt` carrying about `bandwidth_bps` (bytes/s).
    pub fn profile(self, bandwidth_bps: f64, rtt: Duration, io_timeout: Duration) -> SocketProfile {
        match self {
            Mode::Datacenter => SocketProfile::datacenter(),
            Mode::Internet | Mode::Hybrid => {
                SocketProfile::internet(bandwidth_bps, rtt, io_timeout)
            }
        }
    }

    /// Streams to start with and the most the controller may open, on a host with `cores` cores.
    pub fn stream_range(self, cores: usize) -> (usize, usize) {
        match self {
            Mode::Datacenter => (2, (2 * cores).clamp(2, 16)),
            Mode::Hybrid => (2, 8),
            Mode::Internet => (4, 16),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        let ms = Duration::from_millis;
        let us = Duration::from_micros;
        assert_eq!(classify(us(50), None), Mode::Datacenter);
        assert_eq!(classify(us(50), Some(3e9)), Mode::Datacenter);
        assert_eq!(classify(us(50), Some(50e6)), Mode::Hybrid);
        assert_eq!(classify(us(50), Some(10e6)), Mode::Internet);
        assert_eq!(classify(ms(5), None), Mode::Hybrid);
        assert_eq!(classify(ms(10), Some(3e9)), Mode::Internet);
        assert_eq!(classify(ms(50), None), Mode::Internet);
    }

    #[test]
    fn internet_buffers_follow_the_bandwidth_delay_product() {
        let p = Mode::Internet.profile(125e6, Duration::from_millis(50), Duration::from_secs(30));
        // 1 Gbit/s x 50 ms = 6.25 MB; twice that.
        assert_eq!(p.buffer_bytes, Some(12_500_000));
        let tiny = Mode::Internet.profile(1e6, Duration::from_millis(1), Duration::from_secs(30));
        assert_eq!(tiny.buffer_bytes, Some(4 << 20));
        let huge = Mode::Internet.profile(10e9, Duration::from_secs(1), Duration::from_secs(30));
        assert_eq!(huge.buffer_bytes, Some(crate::profile::MAX_BUFFER_BYTES));
    }
}
