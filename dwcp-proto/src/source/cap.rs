//! A bandwidth cap on one migration: the machine releases batches no faster than a token bucket
//! allows, and small enough that the rate holds over short windows.

use std::time::{Duration, Instant};

use dwcp_pba::PbaError;
use dwcp_pba::bucket::TokenBucket;

/// How much of the cap one batch may take at most: with whole 16 MiB batches a 100 Mbit/s cap would
/// be met only on average over seconds.
const BATCH_SPAN: f64 = 0.05;
/// The bucket's burst, in seconds of the rate. A chunk larger than the burst still goes (the bucket
/// takes it into debt and the next batch waits), so the burst needs no floor.
const BURST_SPAN: f64 = 0.02;

#[derive(Debug, Clone)]
pub(super) struct Cap {
    bucket: TokenBucket,
    epoch: Instant,
    not_before: Option<Instant>,
}

impl Cap {
    pub(super) fn new(rate: f64, now: Instant) -> Result<Self, PbaError> {
        Ok(Self {
            bucket: TokenBucket::new(rate, rate * BURST_SPAN)?,
            epoch: now,
            not_before: None,
        })
    }

    fn secs(&self, now: Instant) -> f64 {
        now.saturating_duration_since(self.epoch).as_secs_f64()
    }

    pub(super) fn rate(&self) -> f64 {
        self.bucket.rate()
    }

    pub(super) fn set_rate(&mut self, now: Instant, rate: f64) -> Result<(), PbaError> {
        let s = self.secs(now);
        self.bucket.set_rate(s, rate)?;
        // The wait already owed is recomputed at the new rate.
        let wait = self.bucket.take(s, 0.0);
        self.not_before = (wait > 0.0).then(|| now + Duration::from_secs_f64(wait));
        Ok(())
    }

    /// Whether a batch may go out at `now`.
    pub(super) fn ready(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|t| now >= t)
    }

    /// When the next batch may go out, if it must wait.
    pub(super) fn not_before(&self) -> Option<Instant> {
        self.not_before
    }

    /// `bytes` went on the wire at `now`.
    pub(super) fn charge(&mut self, now: Instant, bytes: u64) {
        let wait = self.bucket.take(self.secs(now), bytes as f64);
        self.not_before = (wait > 0.0).then(|| now + Duration::from_secs_f64(wait));
    }

    /// The chunks one batch may hold, given a chunk's largest size on the wire.
    pub(super) fn batch_chunks(&self, chunk_bytes: u64, most: u64) -> u64 {
        ((self.rate() * BATCH_SPAN) as u64 / chunk_bytes.max(1)).clamp(1, most.max(1))
    }
}
