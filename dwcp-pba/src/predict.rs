//! The predictors, and one link's forecast.
//!
//! | predictor | what it contributes |
//! |---|---|
//! | last value | the baseline every other one must beat; best on a steady link |
//! | EWMA | smooths noise; follows a level shift within a few samples |
//! | harmonic mean (EWMA of reciprocals) | robust to spikes, quick to believe a drop: the safe choice on an oscillating link |
//! | Holt (level + trend) | follows ramps (a link filling up or a competing flow leaving); its trend is extrapolated at most 2 s |
//! | learned | a linear blend of the four, relative to the EWMA, fitted offline on recorded traces ([`crate::learned`]) |
//!
//! Each link scores every predictor by its smoothed error over one-second windows (the horizon the
//! engine asks about) and forecasts with the best; a challenger must beat the incumbent by 10 %.

use crate::batch::LinkTable;
use crate::sample::{Observation, RawSample, SampleFilter};

/// Which predictor a forecast came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Predictor {
    /// The last observation.
    LastValue = 0,
    /// Exponentially weighted moving average.
    Ewma = 1,
    /// Exponentially weighted harmonic mean.
    Harmonic = 2,
    /// Holt's linear trend.
    Holt = 3,
    /// The blend learned offline ([`crate::learned`]).
    Learned = 4,
}

impl Predictor {
    /// Every predictor, in score order.
    pub const ALL: [Predictor; 5] = [
        Predictor::LastValue,
        Predictor::Ewma,
        Predictor::Harmonic,
        Predictor::Holt,
        Predictor::Learned,
    ];

    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Predictor::LastValue => "last value",
            Predictor::Ewma => "EWMA",
            Predictor::Harmonic => "harmonic",
            Predictor::Holt => "Holt",
            Predictor::Learned => "learned",
        }
    }
}

/// A link's forecast.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    /// Goodput over the next second, bytes/s.
    pub goodput_1s: f64,
    /// Goodput over the next ten seconds, bytes/s.
    pub goodput_10s: f64,
    /// Smoothed round trip, seconds (0 before any sample carried one).
    pub rtt: f64,
    /// The predictor chosen for this link.
    pub predictor: Predictor,
    /// Observations so far.
    pub observations: u32,
}

/// One link: raw samples in, forecasts out.
#[derive(Debug, Clone)]
pub struct LinkPredictor {
    filter: SampleFilter,
    table: LinkTable,
}

impl Default for LinkPredictor {
    fn default() -> Self {
        Self::new()
    }
}

impl LinkPredictor {
    /// A link that has seen nothing.
    pub fn new() -> Self {
        Self {
            filter: SampleFilter::new(),
            table: LinkTable::new(1),
        }
    }

    /// Feeds a raw sample; returns the observation it made, if any.
    pub fn push(&mut self, sample: RawSample) -> Option<Observation> {
        let obs = self.filter.push(sample)?;
        self.table.observe(0, &obs);
        Some(obs)
    }

    /// Feeds an observation directly.
    pub fn observe(&mut self, obs: &Observation) {
        self.table.observe(0, obs);
    }

    /// The forecast now.
    pub fn forecast(&self) -> Forecast {
        self.table.forecast(0)
    }

    /// The goodput `horizon` seconds ahead (bytes/s).
    pub fn predict_at(&self, horizon: f64) -> f64 {
        self.table.predict_at(0, horizon)
    }

    /// Samples the filter dropped.
    pub fn dropped(&self) -> u64 {
        self.filter.dropped()
    }

    /// A link with other smoothing or learned weights.
    pub fn with_params(params: crate::batch::Params) -> Result<Self, crate::PbaError> {
        Ok(Self {
            filter: SampleFilter::new(),
            table: LinkTable::with_params(1, params)?,
        })
    }

    /// What `predictor` alone forecasts `horizon` seconds ahead (bytes/s).
    pub fn predict_with(&self, predictor: Predictor, horizon: f64) -> f64 {
        self.table.predict_with(0, predictor, horizon)
    }

    /// The state the learned predictor reads: last value, EWMA, harmonic mean and Holt's forecast
    /// half a second ahead (bytes/s), for fitting its weights.
    pub fn features(&self) -> [f64; 4] {
        self.table.features(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(x: f64) -> Observation {
        Observation {
            goodput: x,
            rtt: Some(0.05),
            lower_bound: false,
            interval: 0.25,
        }
    }

    #[test]
    fn a_constant_rate_is_forecast_exactly() {
        let mut p = LinkPredictor::new();
        for _ in 0..20 {
            p.observe(&obs(100e6));
        }
        let f = p.forecast();
        assert!(
            (f.goodput_1s - 100e6).abs() < 1.0 && (f.goodput_10s - 100e6).abs() < 1.0,
            "{f:?}"
        );
        assert!((f.rtt - 0.05).abs() < 1e-9);
    }

    #[test]
    fn a_step_is_followed_within_a_few_samples() {
        let mut p = LinkPredictor::new();
        for _ in 0..20 {
            p.observe(&obs(100e6));
        }
        let mut reached = None;
        for k in 1..=10 {
            p.observe(&obs(50e6));
            let f = p.forecast().goodput_1s;
            if reached.is_none() && (f - 50e6).abs() <= 0.1 * 50e6 {
                reached = Some(k);
            }
        }
        let k = reached.expect("the forecast never came within 10 % of the new rate");
        assert!(k <= 6, "took {k} samples");
    }

    #[test]
    fn a_ramp_is_followed_by_the_trend() {
        let mut p = LinkPredictor::new();
        for k in 0..40 {
            p.observe(&obs(10e6 + 5e6 * k as f64));
        }
        let f = p.forecast();
        assert_eq!(f.predictor, Predictor::Holt, "{f:?}");
        // The next sample would be 210 MB/s: the trend forecast is close, an average would lag.
        assert!((p.predict_at(0.25) - 210e6).abs() < 2e6, "{f:?}");
    }

    #[test]
    fn a_starved_sender_never_lowers_the_forecast() {
        let mut p = LinkPredictor::new();
        for _ in 0..10 {
            p.observe(&obs(100e6));
        }
        let mut starved = obs(5e6);
        starved.lower_bound = true;
        p.observe(&starved);
        assert!(p.forecast().goodput_1s > 99e6);
        starved.goodput = 300e6;
        p.observe(&starved);
        assert!(
            p.forecast().goodput_1s > 100e6,
            "a higher lower bound raises it"
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn any_f64() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(0.0),
            Just(-1.0),
            -1e3f64..1e3,
            0.0f64..1e12,
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        /// No sample sequence (NaN, infinities, zero intervals, clocks and counters going
        /// backwards) makes a forecast NaN, infinite or negative, or panics.
        #[test]
        fn garbage_never_makes_a_bad_forecast(
            samples in prop::collection::vec((any_f64(), any_f64(), any_f64(), any::<bool>()), 0..64)
        ) {
            let mut p = LinkPredictor::new();
            for (at, acked_bytes, rtt, app_limited) in samples {
                p.push(RawSample { at, acked_bytes, rtt, app_limited });
                let f = p.forecast();
                for v in [f.goodput_1s, f.goodput_10s, f.rtt] {
                    prop_assert!(v.is_finite() && v >= 0.0, "{:?}", f);
                }
            }
        }
    }

    #[test]
    fn a_batch_forecast_equals_the_per_link_forecasts() {
        let mut t = LinkTable::new(3);
        for k in 0..30u32 {
            let x = [
                100e6,
                10e6 + 1e6 * k as f64,
                if k % 2 == 0 { 50e6 } else { 5e6 },
            ];
            t.observe_batch(&[0, 1, 2], &x, &[0.25; 3], &[false; 3])
                .unwrap();
        }
        let mut out = vec![0.0; 3];
        t.predict_batch(1.0, &mut out).unwrap();
        for (i, o) in out.iter().enumerate() {
            assert_eq!(*o, t.predict_at(i, 1.0));
        }
        assert!(t.predict_batch(1.0, &mut [0.0; 2]).is_err());
        assert!(t.observe_batch(&[3], &[1.0], &[1.0], &[false]).is_err());
        assert!(
            t.observe_batch(&[0], &[1.0, 2.0], &[1.0], &[false])
                .is_err()
        );
    }
}
