//! How many streams a migration runs, and how it gets them back after failures.
//!
//! [`StreamCount`] wraps the goodput controller of `dwcp-tcp` with its measurement window: it measures
//! only while every stream of the current target carries data, skips the window after a change (the
//! congestion controllers settle), and uses the first window as the bandwidth probe of mode
//! detection. PBA's observations of the link ([`StreamCount::observe_link`]) say whether a window
//! was sender-limited: when the streams were starved of data for most of it, the encoder and not the
//! link set the goodput, more streams cannot help, and the window is not judged.
//! [`Backoff`] spaces reconnection attempts when every stream is down.

use std::time::{Duration, Instant};

use dwcp_pba::sample::Observation;
use dwcp_tcp::{Mode, StreamCountController};

/// Share of a window's observed time with the streams starved of data above which the window is
/// taken as sender-limited and not judged.
pub const SENDER_LIMITED_SHARE: f64 = 0.5;

/// The streams a session starts with and may grow to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamRange {
    /// Streams opened at the start.
    pub initial: usize,
    /// Most streams at once (what the destination is told to expect).
    pub max: usize,
}

/// The stream range for `mode` on a host with `cores`, given the configured `streams` and
/// `max_streams` (0: automatic).
pub fn stream_range(mode: Mode, cores: usize, streams: usize, max_streams: usize) -> StreamRange {
    let (mode_initial, mode_max) = mode.stream_range(cores);
    let initial = if streams > 0 { streams } else { mode_initial };
    let max = if max_streams > 0 {
        max_streams
    } else if streams > 0 {
        mode_max.max(streams)
    } else {
        mode_max
    }
    .max(initial);
    StreamRange { initial, max }
}

/// What the stream-count window decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamChange {
    /// Keep the streams as they are.
    Keep,
    /// Open this many more.
    Open(usize),
    /// Retire this many (the newest first; stream 0 stays).
    Retire(usize),
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    acked_bytes: u64,
    /// The streams changed (or the session just started): this window lets congestion control settle
    /// and is not measured, or start-up growth would be credited to the new stream count.
    settling: bool,
    /// Seconds of PBA observations that ended in this window, and of those, the sender-limited ones.
    observed_secs: f64,
    starved_secs: f64,
}

impl Window {
    fn new(started: Instant, acked_bytes: u64, settling: bool) -> Self {
        Self {
            started,
            acked_bytes,
            settling,
            observed_secs: 0.0,
            starved_secs: 0.0,
        }
    }

    fn sender_limited(&self) -> bool {
        self.observed_secs > 0.0 && self.starved_secs > SENDER_LIMITED_SHARE * self.observed_secs
    }
}

/// The stream-count controller with its measurement window and the mode probe.
#[derive(Debug, Clone)]
pub struct StreamCount {
    controller: Option<StreamCountController>,
    window: Window,
    rtt: Duration,
    mode: Mode,
    mode_probed: bool,
    range: StreamRange,
    sender_limited_windows: u64,
}

impl StreamCount {
    /// Starts measuring at `now`. `mode_probed`: the mode was configured, not detected, so the first
    /// window is no probe.
    pub fn new(
        range: StreamRange,
        mode: Mode,
        mode_probed: bool,
        rtt: Duration,
        now: Instant,
    ) -> Self {
        Self {
            controller: (range.max > range.initial)
                .then(|| StreamCountController::new(range.initial, 1, range.max)),
            window: Window::new(now, 0, true),
            sender_limited_windows: 0,
            rtt,
            mode,
            mode_probed,
            range,
        }
    }

    /// The transport mode, possibly changed by the probe.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether the mode probe has yet to run (the shell then keeps the link rate coming).
    pub fn wants_probe(&self) -> bool {
        self.controller.is_some() && !self.mode_probed
    }

    /// Streams the session should have now.
    pub fn target(&self) -> usize {
        self.controller
            .as_ref()
            .map_or(self.range.initial, |c| c.target())
    }

    /// The range this session runs in.
    pub fn range(&self) -> StreamRange {
        self.range
    }

    /// Takes one of PBA's observations of the link (from the telemetry the shell samples).
    pub fn observe_link(&mut self, observation: &Observation) {
        let secs = observation.interval;
        if secs.is_finite() && secs > 0.0 {
            self.window.observed_secs += secs;
            if observation.lower_bound {
                self.window.starved_secs += secs;
            }
        }
    }

    /// Windows left unjudged so far because the sender, not the link, limited them.
    pub fn sender_limited_windows(&self) -> u64 {
        self.sender_limited_windows
    }

    /// When the current window ends, if a controller runs.
    pub fn window_end(&self) -> Option<Instant> {
        self.controller
            .as_ref()
            .map(|_| self.window.started + self.window_length())
    }

    /// Long paths need several round trips per window for the congestion controller to settle.
    fn window_length(&self) -> Duration {
        Duration::from_secs_f64((20.0 * self.rtt.as_secs_f64()).clamp(0.1, 2.0))
    }

    /// One step at `now`: `acked_bytes` acknowledged so far in the session, `live` streams carrying
    /// data, `pending` joining, `link_rate` the streams' summed delivery rate (bytes/s, 0 unknown).
    pub fn step(
        &mut self,
        now: Instant,
        acked_bytes: u64,
        live: usize,
        pending: usize,
        link_rate: f64,
    ) -> StreamChange {
        let length = self.window_length();
        let Some(controller) = self.controller.as_mut() else {
            return StreamChange::Keep;
        };
        if pending > 0 || live < controller.target() {
            // Measure only once the streams of the current target are all carrying data.
            self.window = Window::new(now, acked_bytes, self.window.settling);
            return StreamChange::Keep;
        }
        let elapsed = now.saturating_duration_since(self.window.started);
        if elapsed < length {
            return StreamChange::Keep;
        }
        let goodput =
            acked_bytes.saturating_sub(self.window.acked_bytes) as f64 / elapsed.as_secs_f64();
        let settled = !self.window.settling;
        let sender_limited = self.window.sender_limited();
        self.window = Window::new(now, acked_bytes, false);
        if !self.mode_probed {
            // The first window doubles as the bandwidth probe of mode detection. The probe is the
            // kernel's delivery rate, not our goodput: compressed data or a busy encoder make goodput
            // say nothing about the link.
            self.mode_probed = true;
            let probe = (link_rate.is_finite() && link_rate > 0.0).then_some(link_rate);
            let probed = dwcp_tcp::mode::classify(self.rtt, probe);
            if probed != self.mode {
                tracing::info!(from = ?self.mode, to = ?probed, link_mbit = link_rate * 8e-6, "mode changed by the bandwidth probe");
                self.mode = probed;
            }
        }
        if !settled {
            return StreamChange::Keep;
        }
        if sender_limited {
            // Starved streams measure the encoder: judging the count by them would retire streams
            // the link needs, or open ones that cannot help.
            self.sender_limited_windows += 1;
            tracing::debug!(
                goodput_mbit = goodput * 8e-6,
                streams = controller.target(),
                "stream-count window was sender-limited, not judged"
            );
            return StreamChange::Keep;
        }
        let before = controller.target();
        let target = controller.observe(goodput);
        if target != before {
            self.window.settling = true;
        }
        tracing::debug!(
            goodput_mbit = goodput * 8e-6,
            streams = before,
            target,
            "stream-count window"
        );
        match target.cmp(&live) {
            std::cmp::Ordering::Greater => StreamChange::Open(target - live),
            std::cmp::Ordering::Less => StreamChange::Retire(live - target),
            std::cmp::Ordering::Equal => StreamChange::Keep,
        }
    }
}

/// Exponential backoff with jitter for reconnection attempts, bounded in count.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempts: u32,
    max_attempts: u32,
    delay: Duration,
    rng: u64,
}

/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Backoff {
    /// At most `max_attempts` attempts, the first at once, then `first_delay` apart, doubling.
    /// `seed` makes the jitter (a factor in 0.5..1.5) reproducible.
    pub fn new(max_attempts: u32, first_delay: Duration, seed: u64) -> Self {
        Self {
            attempts: 0,
            max_attempts,
            delay: first_delay,
            rng: seed | 1,
        }
    }

    /// Attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Records an attempt; false when none is left.
    pub fn try_attempt(&mut self) -> bool {
        if self.attempts >= self.max_attempts {
            return false;
        }
        self.attempts += 1;
        true
    }

    /// The wait before the next attempt, after a failed one.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift64: jitter needs no cryptographic randomness, only spread between sources.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let jitter = 0.5 + (self.rng % 1_000_000) as f64 / 1e6;
        let wait = self.delay.mul_f64(jitter);
        self.delay = (self.delay * 2).min(MAX_BACKOFF);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_follows_the_configuration() {
        let auto = stream_range(Mode::Internet, 2, 0, 0);
        assert_eq!(
            auto,
            StreamRange {
                initial: 4,
                max: 16
            }
        );
        assert_eq!(stream_range(Mode::Internet, 2, 3, 0).initial, 3);
        assert_eq!(
            stream_range(Mode::Internet, 2, 3, 2),
            StreamRange { initial: 3, max: 3 }
        );
    }

    #[test]
    fn windows_skip_the_settling_one_and_grow_while_it_pays() {
        let t0 = Instant::now();
        let range = StreamRange { initial: 1, max: 4 };
        let mut s = StreamCount::new(range, Mode::Datacenter, true, Duration::from_millis(1), t0);
        let ms = |n| t0 + Duration::from_millis(n);
        // First window (settling) is not measured.
        assert_eq!(s.step(ms(100), 10_000_000, 1, 0, 0.0), StreamChange::Keep);
        // 100 MB/s with one stream: warm-up doubles the target.
        assert_eq!(
            s.step(ms(200), 20_000_000, 1, 0, 0.0),
            StreamChange::Open(1)
        );
        // Joining: no measurement; then the settling window.
        assert_eq!(s.step(ms(250), 25_000_000, 1, 1, 0.0), StreamChange::Keep);
        assert_eq!(s.step(ms(400), 40_000_000, 2, 0, 0.0), StreamChange::Keep);
        // Two streams gave no more: back to one.
        assert_eq!(
            s.step(ms(500), 50_000_000, 2, 0, 0.0),
            StreamChange::Retire(1)
        );
        assert_eq!(s.target(), 1);
    }

    fn observation(interval: f64, lower_bound: bool) -> Observation {
        Observation {
            goodput: 1e8,
            rtt: None,
            lower_bound,
            interval,
        }
    }

    #[test]
    fn sender_limited_windows_are_not_judged() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let range = StreamRange { initial: 2, max: 8 };
        let mut s = StreamCount::new(range, Mode::Datacenter, true, Duration::from_millis(1), t0);
        assert_eq!(s.step(ms(100), 10_000_000, 2, 0, 0.0), StreamChange::Keep);
        // Starved for 80 ms of the 100: the encoder set the goodput, so no probe.
        s.observe_link(&observation(0.02, false));
        s.observe_link(&observation(0.08, true));
        assert_eq!(s.step(ms(200), 20_000_000, 2, 0, 0.0), StreamChange::Keep);
        assert_eq!(s.sender_limited_windows(), 1);
        assert_eq!(s.target(), 2);
        // Garbage intervals count for nothing.
        s.observe_link(&observation(f64::NAN, true));
        s.observe_link(&observation(-1.0, true));
        // Mostly backlogged (or nothing observed): judged as before, and the warm-up doubles.
        s.observe_link(&observation(0.06, false));
        s.observe_link(&observation(0.04, true));
        assert_eq!(
            s.step(ms(300), 30_000_000, 2, 0, 0.0),
            StreamChange::Open(2)
        );
        assert_eq!(s.sender_limited_windows(), 1);
    }

    #[test]
    fn the_first_window_is_the_mode_probe() {
        let t0 = Instant::now();
        let range = StreamRange { initial: 2, max: 4 };
        let mut s = StreamCount::new(
            range,
            Mode::Datacenter,
            false,
            Duration::from_micros(100),
            t0,
        );
        assert!(s.wants_probe());
        s.step(t0 + Duration::from_millis(100), 1, 2, 0, 10e6);
        assert_eq!(s.mode(), Mode::Internet, "10 MB/s is an internet link");
        assert!(!s.wants_probe());
    }

    #[test]
    fn backoff_is_bounded_and_grows() {
        let mut b = Backoff::new(3, Duration::from_millis(100), 7);
        let mut waits = Vec::new();
        while b.try_attempt() {
            waits.push(b.next_delay());
        }
        assert_eq!(waits.len(), 3);
        assert!(waits.iter().all(|w| *w <= MAX_BACKOFF.mul_f64(1.5)));
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] < Duration::from_millis(150));
        assert!(waits[2] >= Duration::from_millis(200));
    }
}
