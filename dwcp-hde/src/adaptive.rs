//! Per-chunk choice of codec and level: the one that minimises the predicted time to move a section,
//! given the link bandwidth hint and the measured speed and ratio of each codec.
//!
//! Encoding and sending overlap (the lanes queue encoded chunks while the next batch encodes), so a
//! section of `U` bytes costs `max(cpu, wire)` with `cpu = U / (speed × threads)` and
//! `wire = U × ratio / bandwidth`. Among the codecs within 3% of the best prediction, the one with the
//! least CPU wins: compressing harder than the link can use only burns CPU.
//!
//! Speeds (bytes of input per second on one thread) and ratios start from figures measured on the
//! reference machine and follow exponentially weighted moving averages of what each chunk measures.
//! Ratios are kept relative to a cheap LZ4 probe of the same chunk, so a chunk of random pages predicts
//! "incompressible" for every codec at once. Every 32nd chunk tries a neighbour of the current best
//! (one level up or down, alternating), so that the estimates of codecs not in use stay current.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::codec::Codec;

/// The codecs the adaptive policy chooses from, cheapest first.
pub const CANDIDATES: [Codec; 8] = [
    Codec::None,
    Codec::Lz4,
    Codec::Zstd(1),
    Codec::Zstd(3),
    Codec::Zstd(6),
    Codec::Zstd(9),
    Codec::Zstd(13),
    Codec::Zstd(19),
];

/// Starting estimates per candidate: (input bytes per second on one core, ratio relative to the LZ4
/// probe). Measured on the reference machine on the busy-mix corpus.
const PRIORS: [(f64, f64); 8] = [
    (f64::INFINITY, 1.0),
    (900e6, 1.0),
    (450e6, 0.80),
    (300e6, 0.74),
    (110e6, 0.70),
    (60e6, 0.68),
    (20e6, 0.66),
    (4e6, 0.62),
];
/// A probe ratio at or above this means the section is incompressible: it goes raw, whatever the link.
pub(crate) const INCOMPRESSIBLE: f64 = 0.97;
/// Weight of a new measurement in the moving averages.
const EWMA_WEIGHT: f64 = 0.2;
/// Every this many chunks, a neighbour of the best codec is tried instead.
const EXPLORE_EVERY: u64 = 32;
/// Predictions within this factor of the best count as equal; the cheapest of them wins.
const TIE: f64 = 1.03;

#[derive(Debug, Clone, Copy)]
struct Estimate {
    speed: f64,
    relative_ratio: f64,
}

/// The measured state of every candidate and the bandwidth hint; shared by the encoding threads.
#[derive(Debug)]
pub(crate) struct Chooser {
    estimates: Mutex<[Estimate; 8]>,
    bandwidth: AtomicU64,
    chunks: AtomicU64,
    threads: f64,
}

/// What the chooser decided for one chunk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Decision {
    pub codec: Codec,
    pub index: usize,
}

impl Chooser {
    pub fn new(threads: usize) -> Self {
        Self {
            estimates: Mutex::new(PRIORS.map(|(speed, relative_ratio)| Estimate {
                speed,
                relative_ratio,
            })),
            bandwidth: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            threads: threads.max(1) as f64,
        }
    }

    pub fn set_bandwidth(&self, bytes_per_sec: u64) {
        self.bandwidth.store(bytes_per_sec, Ordering::Relaxed);
    }

    pub fn bandwidth(&self) -> Option<u64> {
        Some(self.bandwidth.load(Ordering::Relaxed)).filter(|&b| b > 0)
    }

    /// The codec for a section of `len` bytes whose LZ4 probe gave `probe` (output/input), or `None`
    /// when no bandwidth hint is set (the caller then uses its fallback).
    pub fn choose(&self, len: usize, probe: f64) -> Option<Decision> {
        let bandwidth = self.bandwidth()? as f64;
        if probe >= INCOMPRESSIBLE {
            return Some(Decision {
                codec: Codec::None,
                index: 0,
            });
        }
        let estimates = *self.estimates.lock();
        let len = len as f64;
        let predict = |i: usize| {
            let e = estimates[i];
            let ratio = if i == 0 {
                1.0
            } else {
                (probe * e.relative_ratio).min(1.0)
            };
            let cpu = len / (e.speed * self.threads);
            let wire = len * ratio / bandwidth;
            (cpu.max(wire), cpu)
        };
        let predictions: Vec<(f64, f64)> = (0..CANDIDATES.len()).map(predict).collect();
        let best_time = predictions
            .iter()
            .map(|p| p.0)
            .fold(f64::INFINITY, f64::min);
        let mut best = (0..CANDIDATES.len())
            .filter(|&i| predictions[i].0 <= best_time * TIE)
            .min_by(|&a, &b| predictions[a].1.total_cmp(&predictions[b].1))
            .unwrap_or(0);
        let n = self.chunks.fetch_add(1, Ordering::Relaxed);
        if n % EXPLORE_EVERY == EXPLORE_EVERY - 1 && best > 0 {
            // Alternate between the next cheaper and the next stronger codec; never explore "none"
            // (it has nothing to measure) or beyond the list.
            let up = (n / EXPLORE_EVERY) % 2 == 0;
            let neighbour = if up { best + 1 } else { best - 1 };
            if (1..CANDIDATES.len()).contains(&neighbour)
                && predictions[neighbour].0 < 2.0 * best_time
            {
                best = neighbour;
            }
        }
        Some(Decision {
            codec: CANDIDATES[best],
            index: best,
        })
    }

    /// Records what compressing `len` bytes with the decided codec gave.
    pub fn record(&self, decision: Decision, len: usize, compressed: usize, probe: f64, secs: f64) {
        if decision.index == 0 || len < 4096 || secs <= 0.0 {
            return;
        }
        let speed = len as f64 / secs;
        let relative = (compressed as f64 / len as f64) / probe.max(0.01);
        let mut estimates = self.estimates.lock();
        let e = &mut estimates[decision.index];
        e.speed += EWMA_WEIGHT * (speed - e.speed);
        e.relative_ratio += EWMA_WEIGHT * (relative.clamp(0.05, 2.0) - e.relative_ratio);
    }

    /// Index of a fixed codec in the candidate list, so its measurements update the estimates too.
    pub fn decision_for(codec: Codec) -> Decision {
        let index = CANDIDATES.iter().position(|&c| c == codec).unwrap_or(0);
        Decision { codec, index }
    }

    /// The current estimates, for reports: (codec, bytes/s on one core, ratio relative to LZ4).
    pub fn estimates(&self) -> Vec<(Codec, f64, f64)> {
        let estimates = *self.estimates.lock();
        CANDIDATES
            .iter()
            .zip(estimates)
            .map(|(&c, e)| (c, e.speed, e.relative_ratio))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_links_get_cheap_codecs_and_slow_links_strong_ones() {
        let chooser = Chooser::new(2);
        assert!(chooser.choose(1 << 20, 0.4).is_none(), "no hint, no choice");
        chooser.set_bandwidth(100_000_000_000);
        assert_eq!(chooser.choose(1 << 20, 0.4).unwrap().codec, Codec::None);
        chooser.set_bandwidth(1_000_000);
        let slow = chooser.choose(1 << 20, 0.4).unwrap().codec;
        assert!(matches!(slow, Codec::Zstd(l) if l >= 9), "{slow:?}");
        chooser.set_bandwidth(400_000_000);
        let mid = chooser.choose(1 << 20, 0.4).unwrap().codec;
        assert!(matches!(mid, Codec::Lz4 | Codec::Zstd(1..=3)), "{mid:?}");
    }

    #[test]
    fn incompressible_chunks_go_raw_on_any_link() {
        let chooser = Chooser::new(2);
        chooser.set_bandwidth(1_000_000);
        assert_eq!(chooser.choose(1 << 20, 1.0).unwrap().codec, Codec::None);
    }

    #[test]
    fn measurements_move_the_estimates() {
        let chooser = Chooser::new(1);
        chooser.set_bandwidth(50_000_000);
        let d = Chooser::decision_for(Codec::Zstd(3));
        for _ in 0..50 {
            // zstd-3 turns out a hundred times slower than assumed.
            chooser.record(d, 1 << 20, 300_000, 0.5, (1 << 20) as f64 / 3e6);
        }
        let e = chooser.estimates()[3];
        assert!(e.1 < 10e6, "speed {}", e.1);
        assert!((e.2 - 0.6).abs() < 0.05, "relative ratio {}", e.2);
    }
}
