//! From raw stream samples to goodput observations a predictor may trust.

/// One raw sample of a link: cumulative bytes the peer acknowledged, at a time, with the round trip
/// and whether the sender was starved (the kernel's `tcpi_delivery_rate_app_limited`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RawSample {
    /// Seconds on any monotonic scale.
    pub at: f64,
    /// Bytes acknowledged since the link opened.
    pub acked_bytes: f64,
    /// Smoothed round trip, seconds (0 if unknown).
    pub rtt: f64,
    /// The sender had less to send than the link could take.
    pub app_limited: bool,
}

/// A goodput observation over one interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Bytes per second over the interval.
    pub goodput: f64,
    /// Round trip, seconds, if known.
    pub rtt: Option<f64>,
    /// The observation is a lower bound of the capacity (the sender was starved).
    pub lower_bound: bool,
    /// The interval's length, seconds.
    pub interval: f64,
}

/// Turns consecutive raw samples into observations. Garbage never gets through: a sample with a
/// non-finite or negative field, a time that does not move forward, or an acknowledged count that
/// goes backwards is dropped (and the next good sample is measured from the last good one).
#[derive(Debug, Clone, Default)]
pub struct SampleFilter {
    last: Option<RawSample>,
    dropped: u64,
}

/// Intervals shorter than this say nothing about a rate (a burst of acknowledgements).
pub const MIN_INTERVAL: f64 = 1e-3;

impl SampleFilter {
    /// A filter that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Samples dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Feeds one sample; returns the observation since the previous good one, if any.
    pub fn push(&mut self, s: RawSample) -> Option<Observation> {
        let sane = s.at.is_finite()
            && s.acked_bytes.is_finite()
            && s.acked_bytes >= 0.0
            && s.rtt.is_finite()
            && s.rtt >= 0.0;
        if !sane {
            self.dropped += 1;
            return None;
        }
        let Some(last) = self.last else {
            self.last = Some(s);
            return None;
        };
        let interval = s.at - last.at;
        if interval < MIN_INTERVAL || s.acked_bytes < last.acked_bytes {
            // Too close to say anything, or the clock or the counter went backwards: keep the
            // older reference (a counter reset would restart from the new one).
            if s.acked_bytes < last.acked_bytes || interval < 0.0 {
                self.dropped += 1;
                if s.acked_bytes < last.acked_bytes && interval > 0.0 {
                    self.last = Some(s);
                }
            }
            return None;
        }
        self.last = Some(s);
        Some(Observation {
            goodput: (s.acked_bytes - last.acked_bytes) / interval,
            rtt: (s.rtt > 0.0).then_some(s.rtt),
            lower_bound: s.app_limited,
            interval,
        })
    }
}

/// One stream's cumulative counters at a sampling.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StreamSample {
    /// Stream index.
    pub stream: u16,
    /// Bytes the peer acknowledged over the stream's life.
    pub acked_bytes: u64,
    /// Smoothed round trip, seconds.
    pub rtt: f64,
    /// The kernel's delivery-rate sample was app-limited.
    pub app_limited: bool,
    /// Bytes written but not yet sent.
    pub unsent_bytes: u64,
}

/// Sums a link's streams into one raw sample per sampling. A stream's progress is its counter's
/// growth since the previous sampling; a stream whose counter falls (re-opened after a failure)
/// counts from zero again, and a stream that disappears (retired) simply stops adding. The link is
/// app-limited when the sender starved it: every stream says so, or no stream had a byte waiting.
#[derive(Debug, Clone, Default)]
pub struct LinkAggregator {
    last: Vec<Option<u64>>,
    total: u64,
}

/// Stream indices beyond this are ignored (the wire format allows far fewer streams).
pub const MAX_STREAM_INDEX: u16 = 1024;

impl LinkAggregator {
    /// A link that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Streams seen so far.
    pub fn streams(&self) -> usize {
        self.last.iter().filter(|s| s.is_some()).count()
    }

    /// The link's raw sample for one sampling of its streams at `at` seconds.
    pub fn push(&mut self, at: f64, streams: &[StreamSample]) -> RawSample {
        let (mut rtt, mut rtt_n, mut all_limited, mut unsent) = (0.0, 0.0, true, 0u64);
        for s in streams.iter().filter(|s| s.stream <= MAX_STREAM_INDEX) {
            let i = usize::from(s.stream);
            if self.last.len() <= i {
                self.last.resize(i + 1, None);
            }
            let delta = match self.last[i] {
                Some(prev) if s.acked_bytes >= prev => s.acked_bytes - prev,
                _ => s.acked_bytes,
            };
            self.last[i] = Some(s.acked_bytes);
            self.total = self.total.saturating_add(delta);
            if s.rtt.is_finite() && s.rtt > 0.0 {
                rtt += s.rtt;
                rtt_n += 1.0;
            }
            all_limited &= s.app_limited;
            unsent = unsent.saturating_add(s.unsent_bytes);
        }
        RawSample {
            at,
            acked_bytes: self.total as f64,
            rtt: if rtt_n > 0.0 { rtt / rtt_n } else { 0.0 },
            app_limited: all_limited || unsent == 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: f64, bytes: f64) -> RawSample {
        RawSample {
            at: t,
            acked_bytes: bytes,
            rtt: 0.05,
            app_limited: false,
        }
    }

    #[test]
    fn rates_come_from_consecutive_good_samples() {
        let mut f = SampleFilter::new();
        assert_eq!(f.push(at(0.0, 0.0)), None);
        let o = f.push(at(0.5, 50e6)).unwrap();
        assert!((o.goodput - 100e6).abs() < 1e-6 && o.rtt == Some(0.05));
        // NaN, a clock going backwards and a counter going backwards are dropped.
        assert_eq!(f.push(at(f64::NAN, 60e6)), None);
        assert_eq!(f.push(at(0.4, 60e6)), None);
        assert_eq!(f.push(at(0.6, 10e6)), None);
        assert_eq!(f.dropped(), 3);
        // Measured from the counter's restart.
        let o = f.push(at(1.6, 110e6)).unwrap();
        assert!((o.goodput - 100e6).abs() < 1e-3, "{o:?}");
    }

    #[test]
    fn streams_add_up_and_a_reopened_stream_counts_from_zero() {
        let st = |stream, acked_bytes, app_limited, unsent_bytes| StreamSample {
            stream,
            acked_bytes,
            rtt: 0.05,
            app_limited,
            unsent_bytes,
        };
        let mut a = LinkAggregator::new();
        assert_eq!(
            a.push(0.25, &[st(0, 1000, false, 9), st(1, 500, false, 9)])
                .acked_bytes,
            1500.0
        );
        let s = a.push(0.5, &[st(0, 3000, false, 9), st(1, 100, true, 0)]);
        assert_eq!(s.acked_bytes, 3600.0);
        assert!(!s.app_limited, "one stream still had bytes waiting");
        let s = a.push(0.75, &[st(0, 3000, true, 0)]);
        assert!(s.app_limited && s.acked_bytes == 3600.0);
        assert_eq!(
            a.push(1.0, &[st(u16::MAX, 1 << 40, false, 1)]).acked_bytes,
            3600.0
        );
        assert_eq!(a.streams(), 2);
    }

    #[test]
    fn too_short_intervals_wait_for_more_time() {
        let mut f = SampleFilter::new();
        f.push(at(1.0, 0.0));
        assert_eq!(f.push(at(1.0, 1e6)), None);
        assert_eq!(f.push(at(1.0005, 2e6)), None);
        let o = f.push(at(1.01, 3e6)).unwrap();
        assert!((o.goodput - 3e8).abs() < 1.0, "{o:?}");
    }
}
