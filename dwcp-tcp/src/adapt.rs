//! How many streams a session should use: start small, double while the aggregate goodput improves,
//! fall back to the last count that paid, and probe again if goodput collapses. Sans-IO: the engine
//! feeds it one goodput measurement per window and applies the target it returns.

/// Relative improvement a doubling must bring to be kept.
pub const GROW_GAIN: f64 = 0.10;
/// Relative drop (against the settled goodput) that, seen in two windows in a row, starts a new probe.
pub const COLLAPSE: f64 = 0.30;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// No measurement yet at the current target.
    Warmup,
    /// Trying `target` after `from` streams gave `base`.
    Probing { from: usize, base: f64 },
    /// Holding `target`, which gave `goodput`.
    Settled { goodput: f64, low_windows: u32 },
}

/// The stream-count controller.
#[derive(Debug, Clone)]
pub struct StreamCountController {
    min: usize,
    max: usize,
    target: usize,
    state: State,
}

impl StreamCountController {
    /// Starts at `initial` streams, never leaves `min..=max`.
    pub fn new(initial: usize, min: usize, max: usize) -> Self {
        let min = min.max(1);
        let max = max.max(min);
        Self {
            min,
            max,
            target: initial.clamp(min, max),
            state: State::Warmup,
        }
    }

    /// Streams the session should have now.
    pub fn target(&self) -> usize {
        self.target
    }

    /// Whether the controller has stopped probing (it may start again if goodput collapses).
    pub fn is_settled(&self) -> bool {
        matches!(self.state, State::Settled { .. })
    }

    /// Doubles the target (up to the maximum) and measures whether that pays against `base`.
    fn probe_more(&mut self, base: f64) -> State {
        let from = self.target;
        self.target = (self.target * 2).min(self.max);
        State::Probing { from, base }
    }

    /// Takes the aggregate goodput (bytes/s) measured over the last window, run with
    /// [`target`](Self::target) streams, and returns the target for the next window.
    pub fn observe(&mut self, goodput: f64) -> usize {
        self.state = match self.state {
            State::Warmup if self.target < self.max => self.probe_more(goodput),
            State::Warmup => State::Settled {
                goodput,
                low_windows: 0,
            },
            State::Probing { from, base } => {
                if goodput >= base * (1.0 + GROW_GAIN) {
                    if self.target < self.max {
                        self.probe_more(goodput)
                    } else {
                        State::Settled {
                            goodput,
                            low_windows: 0,
                        }
                    }
                } else {
                    // More streams did not pay: go back to the count that did.
                    self.target = from.max(self.min);
                    State::Settled {
                        goodput: base,
                        low_windows: 0,
                    }
                }
            }
            State::Settled {
                goodput: settled,
                low_windows,
            } => {
                if goodput < settled * (1.0 - COLLAPSE) {
                    if low_windows + 1 >= 2 && self.target < self.max {
                        self.probe_more(goodput)
                    } else {
                        State::Settled {
                            goodput: settled,
                            low_windows: low_windows + 1,
                        }
                    }
                } else {
                    // Follow slow drifts so one good window long ago does not trigger probes forever.
                    State::Settled {
                        goodput: 0.8 * settled + 0.2 * goodput,
                        low_windows: 0,
                    }
                }
            }
        };
        self.target
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Goodput of a path where each stream gets `per_stream` until the link (`link`) is full.
    fn path(per_stream: f64, link: f64) -> impl Fn(usize) -> f64 {
        move |n| (n as f64 * per_stream).min(link)
    }

    fn run(c: &mut StreamCountController, goodput: impl Fn(usize) -> f64, windows: usize) {
        for _ in 0..windows {
            let g = goodput(c.target());
            c.observe(g);
        }
    }

    #[test]
    fn grows_until_the_link_is_full_then_stops() {
        // A long fat pipe: each stream is window-limited to 100, the link carries 850.
        let mut c = StreamCountController::new(1, 1, 16);
        run(&mut c, path(100.0, 850.0), 20);
        assert!(c.is_settled());
        assert_eq!(c.target(), 8, "8 streams carry 800, 16 only 6% more: {c:?}");
    }

    #[test]
    fn a_cpu_bound_path_stays_small() {
        // Loopback on two cores: more streams add nothing.
        let mut c = StreamCountController::new(2, 1, 16);
        run(&mut c, |_| 2.0e9, 10);
        assert!(c.is_settled());
        assert_eq!(c.target(), 2);
    }

    #[test]
    fn probes_again_when_goodput_collapses() {
        let mut c = StreamCountController::new(4, 1, 16);
        run(&mut c, path(1000.0, 4000.0), 5);
        assert_eq!(c.target(), 4);
        // The path changes: every stream now gets a quarter of what it had.
        run(&mut c, path(250.0, 4000.0), 10);
        assert_eq!(c.target(), 16);
    }

    proptest! {
        #[test]
        fn the_target_stays_in_bounds(initial in 0usize..40, min in 0usize..8, max in 0usize..40, samples in proptest::collection::vec(0.0f64..1e10, 1..60)) {
            let mut c = StreamCountController::new(initial, min, max);
            let (lo, hi) = (min.max(1), max.max(min.max(1)));
            prop_assert!((lo..=hi).contains(&c.target()));
            for g in samples {
                let t = c.observe(g);
                prop_assert!((lo..=hi).contains(&t));
            }
        }
    }
}
