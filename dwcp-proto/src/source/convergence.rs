//! When pre-copy ends: the downtime a pause would cost now, and the reasons to stop anyway.

use std::time::Duration;

/// Limits that end pre-copy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvergencePolicy {
    /// The pause the operator accepts.
    pub downtime_limit: Duration,
    /// Passes at most, the first included.
    pub max_iterations: u32,
    /// Passes in a row in which the dirty set did not shrink below its smallest size before pre-copy
    /// is declared stalled.
    pub stall_passes: u32,
    /// What the pause costs besides sending pages: computing the digest.
    pub digest_estimate: Duration,
    /// The path's round trip; the handover takes three (Finish/Verdict, Commit/CommitAck, and the
    /// last acknowledgements).
    pub rtt: Duration,
}

/// Why pre-copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub enum StopReason {
    /// The predicted downtime fits the limit.
    Converged,
    /// Nothing is left to send, but the fixed cost of a pause alone exceeds the limit.
    Clean,
    /// The dirty set stopped shrinking.
    Stalled,
    /// The iteration limit was reached.
    IterationLimit,
}

impl StopReason {
    /// The name used in reports and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Converged => "converged",
            StopReason::Clean => "clean",
            StopReason::Stalled => "stalled",
            StopReason::IterationLimit => "iteration_limit",
        }
    }
}

/// What one finished pass measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassMeasurement {
    /// Pass number.
    pub iteration: u32,
    /// Pages the pass sent.
    pub pages: u64,
    /// Of those, pages whose content went on the wire (literal, duplicate, delta: not zero pages).
    pub content_pages: u64,
    /// From the pass's first batch to its last acknowledgement.
    pub elapsed: Duration,
    /// Pages the guest dirtied meanwhile.
    pub dirtied: u64,
    /// Chunk bytes the pass put on the wire.
    pub wire_bytes: u64,
    /// PBA's forecast of the link's goodput over the next second, bytes per second, if it has one.
    pub link_forecast: Option<f64>,
}

/// The convergence decision, pass by pass.
#[derive(Debug, Clone)]
pub struct Convergence {
    policy: ConvergencePolicy,
    smallest_dirty: u64,
    passes_without_progress: u32,
}

impl Convergence {
    /// A migration with `policy`.
    pub fn new(policy: ConvergencePolicy) -> Self {
        Self {
            policy,
            smallest_dirty: u64::MAX,
            passes_without_progress: 0,
        }
    }

    /// The downtime a pause after `pass` is predicted to cost: its dirty pages at its cost per page,
    /// the digest and the handover's round trips: the final pass's acknowledgements (when it has
    /// pages to send), the digest's verdict and the commit.
    pub fn predicted_downtime(&self, pass: &PassMeasurement) -> Duration {
        let secs = pass.dirtied as f64 * per_page(pass)
            + self.pause_overhead(pass.dirtied > 0).as_secs_f64();
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    }

    /// What a pause costs besides sending pages: the digest and the handover's round trips (three
    /// when the final pass has pages to send, whose acknowledgements are one of them).
    pub fn pause_overhead(&self, pages_to_send: bool) -> Duration {
        let round_trips = if pages_to_send { 3 } else { 2 };
        self.policy.digest_estimate + self.policy.rtt * round_trips
    }

    /// How long sending the pages `pass` dirtied is predicted to take (the next pass, or the final
    /// one), at the pass's cost per page.
    pub fn predicted_next_pass(&self, pass: &PassMeasurement) -> Duration {
        Duration::try_from_secs_f64(pass.dirtied as f64 * per_page(pass)).unwrap_or(Duration::MAX)
    }

    /// Records `pass` and says whether pre-copy ends now, with its predicted downtime.
    pub fn observe(&mut self, pass: &PassMeasurement) -> (Option<StopReason>, Duration) {
        let predicted = self.predicted_downtime(pass);
        let p = &self.policy;
        let reason = if predicted <= p.downtime_limit {
            Some(StopReason::Converged)
        } else if pass.dirtied == 0 {
            Some(StopReason::Clean)
        } else if pass.iteration + 1 >= p.max_iterations {
            Some(StopReason::IterationLimit)
        } else if pass.dirtied >= self.smallest_dirty
            && self.passes_without_progress + 1 >= p.stall_passes
        {
            Some(StopReason::Stalled)
        } else {
            None
        };
        if pass.dirtied < self.smallest_dirty {
            self.smallest_dirty = pass.dirtied;
            self.passes_without_progress = 0;
        } else {
            self.passes_without_progress += 1;
        }
        (reason, predicted)
    }
}

/// A pass's cost per page, seconds. Pages the guest wrote are almost never zero, so the whole pass
/// is charged to its content pages: a conservative cost that zero pages cannot make look cheap.
///
/// The pass's own figure averages over its whole length; when the link has become slower since
/// (a competing flow arrived: PBA's forecast is below the pass's rate), the pages cost what the
/// forecast link takes to carry them. A forecast above the pass's rate changes nothing: the pass
/// may have been limited by the encoder, which the link cannot speed up.
fn per_page(pass: &PassMeasurement) -> f64 {
    let elapsed = pass.elapsed.as_secs_f64();
    let pages = if pass.content_pages > 0 {
        pass.content_pages
    } else {
        pass.pages.max(1)
    } as f64;
    let measured = elapsed / pages;
    match pass.link_forecast {
        Some(rate) if rate.is_finite() && rate > 0.0 => {
            measured.max(pass.wire_bytes as f64 / pages / rate)
        }
        _ => measured,
    }
}

/// One stream's kernel view of its delivery rate.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkSample {
    /// Stream index.
    pub stream: u16,
    /// The kernel's delivery-rate estimate, bytes per second.
    pub delivery_rate_bps: f64,
    /// The sample was taken while the stream was starved of data.
    pub app_limited: bool,
    /// Bytes the peer acknowledged over the stream's life.
    pub bytes_acked: u64,
    /// Smoothed round trip, seconds.
    pub rtt_s: f64,
    /// Bytes written to the stream and not yet sent.
    pub unsent_bytes: u64,
}

/// The link rate the encoder's codec choice is based on, from the streams' `TCP_INFO` samples.
///
/// The summed delivery rate is the link's rate once the congestion controllers have filled the pipe,
/// or, when every stream is starved of data (the kernel's app-limited flag), the rate the encoder
/// produces. During the start-up (BBR's, or slow start) it is neither. Taken as the link's, a
/// start-up sample of a few MB/s points the encoder at its slowest codecs, which then produce so
/// little that the streams never leave start-up: an idle image that takes 1.2 s across the emulated
/// WAN once took 11.5 s, every chunk compressed. So no hint is given (the encoder uses its
/// configured codec) until the rate stops growing by more than a quarter per sample, or the streams
/// are starved.
///
/// Pushing the hint up while starved, to pull the encoder towards cheaper codecs, was tried and
/// measured worse: the same idle image took 1.36-1.49 s (hint capped at 2x the delivered rate) and
/// 1.5-2.3 s (8x), against 1.21-1.27 s without.
#[derive(Debug, Default, Clone)]
pub struct LinkEstimate {
    last: f64,
    settled: bool,
}

/// Growth per sample above which the streams are taken to be still starting up.
const START_UP_GROWTH: f64 = 1.25;

impl LinkEstimate {
    /// The hint after a telemetry sample of every stream, if there is one yet.
    pub fn update(&mut self, samples: &[LinkSample]) -> Option<f64> {
        let measured: f64 = samples
            .iter()
            .map(|t| t.delivery_rate_bps)
            .filter(|r| r.is_finite() && *r > 0.0)
            .sum();
        if measured <= 0.0 {
            return self.settled.then_some(self.last);
        }
        let starved = samples.iter().all(|t| t.app_limited);
        if !self.settled && (starved || (self.last > 0.0 && measured < START_UP_GROWTH * self.last))
        {
            self.settled = true;
        }
        self.last = measured;
        self.settled.then_some(measured)
    }

    /// The last summed delivery rate, bytes per second (0 before any sample).
    pub fn last(&self) -> f64 {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streams(rates: &[(f64, bool)]) -> Vec<LinkSample> {
        rates
            .iter()
            .enumerate()
            .map(|(i, &(rate, app_limited))| LinkSample {
                stream: i as u16,
                delivery_rate_bps: rate,
                app_limited,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn no_hint_while_the_streams_start_up() {
        let mut link = LinkEstimate::default();
        // BBR's start-up: the rate doubles per sample, every stream has a backlog.
        for rate in [2e6, 5e6, 11e6, 30e6, 70e6] {
            assert_eq!(
                link.update(&streams(&[(rate / 2.0, false), (rate / 2.0, false)])),
                None
            );
        }
        // The pipe is full: the rate stops growing, and from then on every sample is the hint.
        assert_eq!(
            link.update(&streams(&[(60e6, false), (20e6, false)])),
            Some(80e6)
        );
        assert_eq!(link.update(&streams(&[(40e6, false)])), Some(40e6));
        // Nothing delivered says nothing new.
        assert_eq!(link.update(&streams(&[(0.0, true)])), Some(40e6));
        // Nor does garbage.
        assert_eq!(link.update(&streams(&[(f64::NAN, false)])), Some(40e6));
    }

    #[test]
    fn starved_streams_end_the_start_up_at_once() {
        let mut link = LinkEstimate::default();
        assert_eq!(link.update(&streams(&[(3e6, false)])), None);
        assert_eq!(
            link.update(&streams(&[(9e6, true), (8e6, true)])),
            Some(17e6)
        );
        // One stream with a backlog among starved ones is not "starved".
        let mut link = LinkEstimate::default();
        assert_eq!(link.update(&streams(&[(3e6, false)])), None);
        assert_eq!(link.update(&streams(&[(9e6, true), (8e6, false)])), None);
        assert_eq!(link.update(&[]), None);
    }

    fn policy() -> ConvergencePolicy {
        ConvergencePolicy {
            downtime_limit: Duration::from_millis(50),
            max_iterations: 10,
            stall_passes: 3,
            digest_estimate: Duration::from_millis(5),
            rtt: Duration::from_millis(1),
        }
    }

    fn pass(iteration: u32, dirtied: u64) -> PassMeasurement {
        // 1000 content pages in 100 ms: 0.1 ms a page.
        PassMeasurement {
            iteration,
            pages: 1000,
            content_pages: 1000,
            elapsed: Duration::from_millis(100),
            dirtied,
            wire_bytes: 4_096_000,
            link_forecast: None,
        }
    }

    #[test]
    fn the_handover_costs_three_round_trips_with_a_final_pass_and_two_without() {
        let c = Convergence::new(ConvergencePolicy {
            rtt: Duration::from_millis(50),
            ..policy()
        });
        // Nothing dirty: digest 5 ms, the verdict's and the commit's round trips.
        assert_eq!(
            c.predicted_downtime(&pass(0, 0)),
            Duration::from_millis(105)
        );
        // 10 pages at 0.1 ms, and the final pass's acknowledgements.
        assert_eq!(
            c.predicted_downtime(&pass(0, 10)),
            Duration::from_millis(156)
        );
    }

    #[test]
    fn converges_when_the_dirty_set_fits_the_limit() {
        let mut c = Convergence::new(policy());
        // 1000 dirty pages: 100 ms + 5 + 3 > 50.
        assert_eq!(c.observe(&pass(0, 1000)).0, None);
        // 400: 40 + 8 = 48 ms ≤ 50.
        let (reason, predicted) = c.observe(&pass(1, 400));
        assert_eq!(reason, Some(StopReason::Converged));
        assert!((predicted.as_secs_f64() - 0.048).abs() < 1e-9);
    }

    #[test]
    fn a_dirty_set_that_stops_shrinking_stalls() {
        let mut c = Convergence::new(policy());
        assert_eq!(c.observe(&pass(0, 900)).0, None);
        assert_eq!(c.observe(&pass(1, 950)).0, None);
        assert_eq!(c.observe(&pass(2, 920)).0, None);
        assert_eq!(c.observe(&pass(3, 990)).0, Some(StopReason::Stalled));
    }

    #[test]
    fn the_iteration_limit_ends_a_shrinking_dirty_set() {
        let mut c = Convergence::new(ConvergencePolicy {
            max_iterations: 3,
            ..policy()
        });
        assert_eq!(c.observe(&pass(0, 3000)).0, None);
        assert_eq!(c.observe(&pass(1, 2000)).0, None);
        assert_eq!(
            c.observe(&pass(2, 1000)).0,
            Some(StopReason::IterationLimit)
        );
    }

    #[test]
    fn nothing_dirty_but_a_costly_pause_is_clean() {
        let mut c = Convergence::new(ConvergencePolicy {
            digest_estimate: Duration::from_millis(80),
            ..policy()
        });
        assert_eq!(c.observe(&pass(0, 0)).0, Some(StopReason::Clean));
    }

    #[test]
    fn a_pass_of_zero_pages_is_charged_per_page_sent() {
        let c = Convergence::new(policy());
        let p = PassMeasurement {
            content_pages: 0,
            dirtied: 100,
            ..pass(0, 0)
        };
        // 100 × 0.1 ms + 5 + 3.
        assert!((c.predicted_downtime(&p).as_secs_f64() - 0.018).abs() < 1e-9);
    }

    #[test]
    fn a_link_forecast_below_the_pass_rate_raises_the_predicted_downtime() {
        let c = Convergence::new(policy());
        // The pass carried 4096 B a page at 0.1 ms a page: 40.96 MB/s.
        let faster = PassMeasurement {
            link_forecast: Some(100e6),
            ..pass(0, 400)
        };
        assert_eq!(
            c.predicted_downtime(&faster),
            c.predicted_downtime(&pass(0, 400))
        );
        // The link now carries 20.48 MB/s: 0.2 ms a page, 400 pages 80 ms, + 8.
        let slower = PassMeasurement {
            link_forecast: Some(20.48e6),
            ..pass(0, 400)
        };
        assert!((c.predicted_downtime(&slower).as_secs_f64() - 0.088).abs() < 1e-9);
        for junk in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let p = PassMeasurement {
                link_forecast: Some(junk),
                ..pass(0, 400)
            };
            assert_eq!(
                c.predicted_downtime(&p),
                c.predicted_downtime(&pass(0, 400))
            );
        }
    }
}
