//! A token bucket: the cap of one migration, or of one host's uplink (QEMU's `max-bandwidth` works
//! the same way).

use crate::{MAX_BURST, PbaError, check_rate};

/// Tokens are bytes; they accrue at `rate` up to `burst`. Sending a chunk takes its bytes, possibly
/// into debt (a chunk larger than the burst still goes), and the sender waits until the debt is paid.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<f64>,
}

fn check_burst(burst: f64) -> Result<f64, PbaError> {
    if burst.is_finite() && burst > 0.0 && burst <= MAX_BURST {
        Ok(burst)
    } else {
        Err(PbaError::InvalidBurst(burst))
    }
}

impl TokenBucket {
    /// A full bucket of `burst` bytes filling at `rate` bytes/s.
    pub fn new(rate: f64, burst: f64) -> Result<Self, PbaError> {
        let burst = check_burst(burst)?;
        Ok(Self {
            rate: check_rate(rate)?,
            burst,
            tokens: burst,
            last: None,
        })
    }

    /// The rate, bytes/s.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    fn refill(&mut self, now: f64) {
        if !now.is_finite() {
            return;
        }
        if let Some(last) = self.last {
            // A clock that goes backwards adds nothing (and does not move the reference back).
            if now > last {
                self.tokens = (self.tokens + (now - last) * self.rate).min(self.burst);
                self.last = Some(now);
            }
        } else {
            self.last = Some(now);
        }
    }

    /// Changes the rate from `now` on (what accrued so far at the old rate stays).
    pub fn set_rate(&mut self, now: f64, rate: f64) -> Result<(), PbaError> {
        let rate = check_rate(rate)?;
        self.refill(now);
        self.rate = rate;
        Ok(())
    }

    /// Takes `bytes` at `now` and returns how long the sender must wait before sending them
    /// (seconds, 0 when the bucket held enough).
    pub fn take(&mut self, now: f64, bytes: f64) -> f64 {
        self.refill(now);
        if bytes.is_finite() && bytes > 0.0 {
            self.tokens -= bytes;
        }
        if self.tokens >= 0.0 {
            0.0
        } else {
            -self.tokens / self.rate
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_caps_are_refused() {
        for r in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e15] {
            assert!(TokenBucket::new(r, 1e6).is_err(), "rate {r}");
        }
        for b in [0.0, -5.0, f64::NAN, 1e20] {
            assert!(TokenBucket::new(1e6, b).is_err(), "burst {b}");
        }
        let mut t = TokenBucket::new(1e6, 1e6).unwrap();
        assert!(t.set_rate(0.0, 0.0).is_err());
        assert_eq!(t.rate(), 1e6);
    }

    #[test]
    fn a_capped_sender_averages_the_rate() {
        // 100 MB/s, 1 MiB chunks, sending as fast as the bucket lets it for 10 s of virtual time.
        let mut t = TokenBucket::new(100e6, 4e6).unwrap();
        let (mut now, mut sent) = (0.0, 0.0);
        while now < 10.0 {
            now += t.take(now, 1048576.0);
            sent += 1048576.0;
        }
        let rate = (sent - 4e6) / now;
        assert!((rate - 100e6).abs() / 100e6 < 0.01, "{rate}");
    }

    #[test]
    fn a_new_rate_applies_from_now_and_time_never_runs_backwards() {
        let mut t = TokenBucket::new(1e6, 1e6).unwrap();
        assert_eq!(t.take(0.0, 1e6), 0.0);
        assert!(
            (t.take(0.0, 1e6) - 1.0).abs() < 1e-9,
            "a second MB waits one second"
        );
        t.set_rate(0.5, 2e6).unwrap();
        // 0.5 s at 1 MB/s paid half the debt; the rest at 2 MB/s.
        assert!((t.take(0.5, 0.0) - 0.25).abs() < 1e-9);
        assert!(
            (t.take(0.1, 0.0) - 0.25).abs() < 1e-9,
            "the clock went backwards: nothing accrues"
        );
        assert!(t.take(f64::NAN, f64::NAN).is_finite());
    }
}
