//! When pre-copy ends: the downtime a pause would cost now, and the reasons to stop anyway.

use std::time::Duration;

/// Limits that end pre-copy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvergencePolicy {
    /// The pause the operator accepts.
    pub downtime_limit: Duration,
    /// Passes at most, the first included.
    pub max_iterations: u32,
    /// Passes in a row in which the dirty set did not shrink to at most 90 % of its smallest size
    /// (`PROGRESS`) before pre-copy is declared stalled.
    pub stall_passes: u32,
    /// What the pause costs besides sending pages: computing the digest.
    pub digest_estimate: Duration,
    /// The path's round trip; the handover takes three (Finish/Verdict, Commit/CommitAck, and the
    /// last acknowledgements).
    pub rtt: Duration,
}

/// vCPU throttle steps while pre-copy stalls, as QEMU's auto-converge takes them
/// (`cpu-throttle-initial`, `cpu-throttle-increment`, `max-cpu-throttle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleSteps {
    /// The first step, percent.
    pub initial: u8,
    /// Added at each further step, percent.
    pub increment: u8,
    /// The last step, percent (at most 99: the guest never stops entirely).
    pub max: u8,
}

impl ThrottleSteps {
    /// QEMU's defaults: 20 %, then 10 % more per step, up to 99 %.
    pub const QEMU: ThrottleSteps = ThrottleSteps {
        initial: 20,
        increment: 10,
        max: 99,
    };

    fn after(self, now: u8) -> u8 {
        let max = self.max.min(99);
        if now == 0 {
            self.initial.clamp(1, max)
        } else {
            now.saturating_add(self.increment.max(1)).min(max)
        }
    }
}

/// What pre-copy does when it stops converging on its own, in order: throttle the guest's vCPUs
/// step by step (when the hypervisor can), then step the downtime limit up to the operator's
/// ceiling, then fail with the figures. The codec and the stream count are not levers here: they
/// already follow the link continuously (PBA, the stream-count controller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConvergenceAids {
    /// Throttle steps; `None` never throttles.
    pub throttle: Option<ThrottleSteps>,
    /// The largest pause the operator accepts; the downtime limit doubles towards it once the
    /// throttle is exhausted. `None`: a pre-copy that stalls pauses the guest whatever the pause
    /// costs (the migration always completes, its downtime unbounded).
    pub downtime_ceiling: Option<Duration>,
    /// Pre-copy time after which a migration that has not converged fails (guest running).
    pub deadline: Option<Duration>,
}

/// What to do after a pass.
#[derive(Debug)]
pub enum PassDecision {
    /// Another pre-copy pass.
    Continue,
    /// Another pass, with the vCPUs throttled this many percent.
    Throttle(u8),
    /// Stop-and-copy, for this reason.
    Stop(StopReason),
    /// Give up: the guest keeps running ([`dwcp_core::Error::NotConverged`]).
    Fail(dwcp_core::Error),
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
    /// Pre-copy could not converge within the ceiling, and the memory still missing moves by
    /// post-copy.
    Postcopy,
}

impl StopReason {
    /// The name used in reports and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Converged => "converged",
            StopReason::Clean => "clean",
            StopReason::Stalled => "stalled",
            StopReason::IterationLimit => "iteration_limit",
            StopReason::Postcopy => "postcopy",
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
    aids: ConvergenceAids,
    /// The downtime limit in force: the policy's, stepped up towards the ceiling.
    limit: Duration,
    /// The throttle asked for last, percent.
    throttle: u8,
    /// The hypervisor refused to throttle.
    throttle_unavailable: bool,
    /// Pre-copy time so far (the passes' durations).
    precopy: Duration,
}

impl Convergence {
    /// A migration with `policy`, without aids.
    pub fn new(policy: ConvergencePolicy) -> Self {
        Self {
            policy,
            smallest_dirty: u64::MAX,
            passes_without_progress: 0,
            aids: ConvergenceAids::default(),
            limit: policy.downtime_limit,
            throttle: 0,
            throttle_unavailable: false,
            precopy: Duration::ZERO,
        }
    }

    /// Sets what pre-copy may do when it stops converging on its own.
    pub fn set_aids(&mut self, aids: ConvergenceAids) {
        self.aids = aids;
    }

    /// The hypervisor cannot throttle: the next stall goes to the next aid.
    pub fn throttle_unavailable(&mut self) {
        self.throttle_unavailable = true;
        self.throttle = 0;
    }

    /// The downtime limit in force now, and the throttle asked for (percent).
    pub fn aids_in_force(&self) -> (Duration, u8) {
        (self.limit, self.throttle)
    }

    /// Records `pass` and decides what follows it, with the aids.
    pub fn decide(&mut self, pass: &PassMeasurement) -> (PassDecision, Duration) {
        self.precopy += pass.elapsed;
        let (reason, predicted) = self.observe(pass);
        let decision = match reason {
            // `observe` never says Postcopy: the machine picks it when it would give up.
            Some(r @ (StopReason::Converged | StopReason::Clean | StopReason::Postcopy)) => {
                PassDecision::Stop(r)
            }
            None => match self.aids.deadline {
                Some(d) if self.precopy >= d => self.give_up(pass, predicted, "deadline passed"),
                _ => PassDecision::Continue,
            },
            Some(r @ StopReason::IterationLimit) => match self.aids.downtime_ceiling {
                Some(ceiling) if predicted > ceiling => {
                    self.give_up(pass, predicted, "iteration limit")
                }
                _ => PassDecision::Stop(r),
            },
            Some(r @ StopReason::Stalled) => self.aid(pass, predicted, r),
        };
        (decision, predicted)
    }

    fn aid(&mut self, pass: &PassMeasurement, predicted: Duration, r: StopReason) -> PassDecision {
        if let Some(steps) = self.aids.throttle.filter(|_| !self.throttle_unavailable) {
            let next = steps.after(self.throttle);
            if next > self.throttle {
                self.throttle = next;
                self.judge_next_pass_alone(pass);
                return PassDecision::Throttle(next);
            }
        }
        let Some(ceiling) = self.aids.downtime_ceiling else {
            return PassDecision::Stop(r);
        };
        if self.limit < ceiling {
            self.limit = (self.limit.max(Duration::from_millis(1)) * 2).min(ceiling);
            if predicted <= self.limit {
                return PassDecision::Stop(StopReason::Converged);
            }
            self.judge_next_pass_alone(pass);
            return PassDecision::Continue;
        }
        self.give_up(pass, predicted, "every aid exhausted")
    }

    /// After an aid, the next pass alone shows whether it helped: one that does not shrink the
    /// dirty set below this one's stalls again.
    fn judge_next_pass_alone(&mut self, pass: &PassMeasurement) {
        self.smallest_dirty = pass.dirtied;
        self.passes_without_progress = self.policy.stall_passes.saturating_sub(1);
    }

    fn give_up(
        &self,
        pass: &PassMeasurement,
        predicted: Duration,
        why: &'static str,
    ) -> PassDecision {
        let secs = pass.elapsed.as_secs_f64().max(1e-9);
        let mb_s = |pages: u64| pages as f64 * dwcp_core::memory::PAGE_SIZE as f64 / secs / 1e6;
        PassDecision::Fail(dwcp_core::Error::NotConverged {
            why,
            passes: pass.iteration + 1,
            predicted_downtime_ms: predicted.as_millis() as u64,
            ceiling_ms: self.aids.downtime_ceiling.unwrap_or(self.limit).as_millis() as u64,
            dirty_mb_s: mb_s(pass.dirtied),
            send_mb_s: mb_s(pass.pages),
            throttle_percent: self.throttle,
        })
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
        let reason = if predicted <= self.limit {
            Some(StopReason::Converged)
        } else if pass.dirtied == 0 {
            Some(StopReason::Clean)
        } else if pass.iteration + 1 >= p.max_iterations {
            Some(StopReason::IterationLimit)
        } else if pass.dirtied as f64 >= self.smallest_dirty as f64 * PROGRESS
            && self.passes_without_progress + 1 >= p.stall_passes
        {
            Some(StopReason::Stalled)
        } else {
            None
        };
        if (pass.dirtied as f64) < self.smallest_dirty as f64 * PROGRESS {
            self.passes_without_progress = 0;
        } else {
            self.passes_without_progress += 1;
        }
        self.smallest_dirty = self.smallest_dirty.min(pass.dirtied);
        (reason, predicted)
    }
}

/// A pass makes progress when it leaves fewer than this share of the smallest dirty set before
/// it. A guest that outruns the link still shrinks its dirty set by a page or two per pass (fewer
/// distinct pages are hit in a shorter pass); at less than 10 % a pass, the 2000 pages of a
/// measured 8 MiB guest would take 20 more passes to fit 50 ms, which is no convergence.
const PROGRESS: f64 = 0.9;

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

    fn stalled_pass(iteration: u32) -> PassMeasurement {
        // 1000 dirty pages each pass: 100 ms + 8 ms, far above 50.
        pass(iteration, 1000)
    }

    fn decisions(c: &mut Convergence, passes: std::ops::Range<u32>) -> Vec<String> {
        passes
            .map(|i| match c.decide(&stalled_pass(i)).0 {
                PassDecision::Continue => "continue".to_string(),
                PassDecision::Throttle(p) => format!("throttle {p}"),
                PassDecision::Stop(r) => r.as_str().to_string(),
                PassDecision::Fail(e) => format!("fail: {e}"),
            })
            .collect()
    }

    #[test]
    fn a_stall_throttles_step_by_step_then_raises_the_limit_then_fails_with_the_figures() {
        let mut c = Convergence::new(ConvergencePolicy {
            max_iterations: 100,
            ..policy()
        });
        c.set_aids(ConvergenceAids {
            throttle: Some(ThrottleSteps::QEMU),
            downtime_ceiling: Some(Duration::from_millis(100)),
            deadline: None,
        });
        let d = decisions(&mut c, 0..16);
        // Three passes to see the stall, then one pass per aid: 20, 30, ... 90, 99 %.
        assert_eq!(d[..3], ["continue", "continue", "continue"]);
        let steps: Vec<String> = [20, 30, 40, 50, 60, 70, 80, 90, 99]
            .iter()
            .map(|p| format!("throttle {p}"))
            .collect();
        assert_eq!(d[3..12], steps[..]);
        // The limit doubles to the ceiling: 50 -> 100 ms; 108 ms still does not fit.
        assert_eq!(d[12], "continue");
        assert_eq!(c.aids_in_force(), (Duration::from_millis(100), 99));
        assert!(
            d[13].starts_with("fail: pre-copy did not converge (every aid exhausted)"),
            "{}",
            d[13]
        );
        assert!(
            d[13].contains("108 ms against a ceiling of 100 ms"),
            "{}",
            d[13]
        );
        assert!(d[13].contains("throttled 99 %"), "{}", d[13]);
    }

    #[test]
    fn a_raised_limit_that_fits_the_pause_converges() {
        let mut c = Convergence::new(policy());
        c.set_aids(ConvergenceAids {
            throttle: Some(ThrottleSteps::QEMU),
            downtime_ceiling: Some(Duration::from_millis(200)),
            deadline: None,
        });
        // The hypervisor cannot throttle: the limit is the first aid.
        c.throttle_unavailable();
        let d = decisions(&mut c, 0..5);
        // 50 -> 100 (108 ms does not fit) -> 200 ms (it does).
        assert_eq!(
            d,
            ["continue", "continue", "continue", "continue", "converged"]
        );
    }

    #[test]
    fn without_a_ceiling_a_stall_pauses_anyway_and_a_deadline_fails() {
        let mut c = Convergence::new(policy());
        c.set_aids(ConvergenceAids::default());
        assert_eq!(decisions(&mut c, 0..4)[3], "stalled");

        let mut c = Convergence::new(policy());
        c.set_aids(ConvergenceAids {
            deadline: Some(Duration::from_millis(250)),
            ..ConvergenceAids::default()
        });
        // 100 ms a pass: the third pass ends past the deadline.
        let d = decisions(&mut c, 0..3);
        assert_eq!(d[..2], ["continue", "continue"]);
        assert!(
            d[2].starts_with("fail: pre-copy did not converge (deadline passed)"),
            "{}",
            d[2]
        );
    }

    #[test]
    fn throttle_steps_never_reach_100_percent() {
        let steps = ThrottleSteps {
            initial: 90,
            increment: 50,
            max: 100,
        };
        assert_eq!(steps.after(0), 90);
        assert_eq!(steps.after(90), 99);
        assert_eq!(steps.after(99), 99);
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
