//! Forecasts for many links at once: one structure of arrays, one pass per call, no allocation.
//!
//! Every link runs five predictors side by side and forecasts with the one whose recent error over
//! one-second windows is smallest (see [`crate::predict`] for what each contributes). A batch update scores and
//! updates the links it names; a batch forecast writes one value per link into the caller's slice.

use crate::PbaError;
use crate::learned::LearnedWeights;
use crate::predict::{Forecast, Predictor};
use crate::sample::Observation;

/// Smoothing of the robust predictors and of their error scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Weight of a new observation in the EWMA.
    pub ewma_alpha: f64,
    /// Weight of a new observation in the harmonic mean (an EWMA of reciprocals).
    pub harmonic_alpha: f64,
    /// Holt's level weight.
    pub holt_alpha: f64,
    /// Holt's trend weight.
    pub holt_beta: f64,
    /// Weight of a new error in each predictor's score.
    pub error_alpha: f64,
    /// Predictors are scored on what they forecast for windows this long (seconds): the horizon
    /// the engine asks about, so that a predictor good at the next 250 ms but poor at the next
    /// second is not chosen.
    pub score_window: f64,
    /// Holt extrapolates its trend at most this far (seconds): a trend seen over a few samples says
    /// nothing about ten seconds ahead.
    pub trend_horizon: f64,
    /// The learned predictor's weights (by default the ones shipped in the crate, trained by
    /// `cargo xtask pba train`).
    pub learned: LearnedWeights,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            // At the engine's 250 ms samples, a memory of about one second: the horizon the
            // engine asks about (1 - e^(-0.25/1) = 0.22).
            ewma_alpha: 0.25,
            harmonic_alpha: 0.25,
            holt_alpha: 0.5,
            holt_beta: 0.3,
            error_alpha: 0.1,
            score_window: 1.0,
            trend_horizon: 2.0,
            learned: LearnedWeights::shipped(),
        }
    }
}

impl Params {
    fn check(&self) -> Result<(), PbaError> {
        for (what, v) in [
            ("ewma_alpha", self.ewma_alpha),
            ("harmonic_alpha", self.harmonic_alpha),
            ("holt_alpha", self.holt_alpha),
            ("holt_beta", self.holt_beta),
            ("error_alpha", self.error_alpha),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return Err(PbaError::InvalidParameter {
                    what,
                    value: v,
                    expected: "0 < x <= 1",
                });
            }
        }
        if !(self.score_window.is_finite() && self.score_window > 0.0 && self.score_window <= 60.0)
        {
            return Err(PbaError::InvalidParameter {
                what: "score_window",
                value: self.score_window,
                expected: "0 < seconds <= 60",
            });
        }
        if !(self.trend_horizon.is_finite() && self.trend_horizon >= 0.0) {
            return Err(PbaError::InvalidParameter {
                what: "trend_horizon",
                value: self.trend_horizon,
                expected: "a finite number of seconds >= 0",
            });
        }
        self.learned.check()
    }
}

/// A predictor replaces the chosen one when its error is below this fraction of the chosen one's.
const SWITCH_MARGIN: f64 = 0.9;

/// How many predictors every link runs.
const PREDICTORS: usize = Predictor::ALL.len();

/// The state of many links, one array per field.
#[derive(Debug, Clone)]
pub struct LinkTable {
    params: Params,
    last: Vec<f64>,
    ewma: Vec<f64>,
    harmonic: Vec<f64>,
    level: Vec<f64>,
    trend: Vec<f64>,
    /// Score (smoothed absolute error over a scoring window) of each predictor, in
    /// [`Predictor::ALL`] order.
    error: [Vec<f64>; PREDICTORS],
    /// What each predictor forecast for the current scoring window when it began.
    window_forecast: [Vec<f64>; PREDICTORS],
    /// Bytes and seconds observed in the current scoring window.
    window_bytes: Vec<f64>,
    window_time: Vec<f64>,
    rtt: Vec<f64>,
    observations: Vec<u32>,
    chosen: Vec<u8>,
}

impl LinkTable {
    /// `links` links that have seen nothing, with the default smoothing.
    pub fn new(links: usize) -> Self {
        Self::with_params(links, Params::default()).expect("the default parameters are valid")
    }

    /// `links` links with `params`.
    pub fn with_params(links: usize, params: Params) -> Result<Self, PbaError> {
        params.check()?;
        let zeros = || vec![0.0; links];
        Ok(Self {
            params,
            last: zeros(),
            ewma: zeros(),
            harmonic: zeros(),
            level: zeros(),
            trend: zeros(),
            error: std::array::from_fn(|_| zeros()),
            window_forecast: std::array::from_fn(|_| zeros()),
            window_bytes: zeros(),
            window_time: zeros(),
            rtt: zeros(),
            observations: vec![0; links],
            chosen: vec![Predictor::Ewma as u8; links],
        })
    }

    /// Links in the table.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// Whether the table has no link.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    /// Feeds one observation of `link`. Non-finite, negative or zero-interval observations are
    /// ignored; a lower bound (a starved sender) only raises the forecasts and is not scored.
    pub fn observe(&mut self, link: usize, obs: &Observation) {
        let (x, dt) = (obs.goodput, obs.interval);
        if !(x.is_finite() && x >= 0.0 && dt.is_finite() && dt > 0.0) {
            return;
        }
        if let Some(r) = obs.rtt.filter(|r| r.is_finite() && *r > 0.0) {
            self.rtt[link] = if self.rtt[link] > 0.0 {
                0.8 * self.rtt[link] + 0.2 * r
            } else {
                r
            };
        }
        if obs.lower_bound {
            // A starved sender measured itself, not the link: a higher figure shows the link
            // carries at least that, a lower one shows nothing.
            if x > self.predict_one(link, 0.0) || self.observations[link] == 0 {
                self.update(link, x, dt, false);
            } else {
                // It still confirms the forecast, as far as it goes; the window it falls in
                // cannot be scored.
                self.observations[link] = self.observations[link].saturating_add(1);
                self.start_window(link);
            }
            return;
        }
        self.update(link, x, dt, true);
    }

    fn update(&mut self, i: usize, x: f64, dt: f64, score: bool) {
        let p = self.params;
        if self.observations[i] == 0 {
            self.last[i] = x;
            self.ewma[i] = x;
            self.harmonic[i] = x;
            self.level[i] = x;
            self.trend[i] = 0.0;
            self.observations[i] = 1;
            self.start_window(i);
            return;
        }
        if score {
            self.window_bytes[i] += x * dt;
            self.window_time[i] += dt;
        }
        self.last[i] = x;
        self.ewma[i] = (1.0 - p.ewma_alpha) * self.ewma[i] + p.ewma_alpha * x;
        // An EWMA of reciprocals: one low sample pulls it down, a spike barely moves it up, as a
        // harmonic mean does (video players size bitrates this way).
        self.harmonic[i] = if x > 0.0 && self.harmonic[i] > 0.0 {
            1.0 / ((1.0 - p.harmonic_alpha) / self.harmonic[i] + p.harmonic_alpha / x)
        } else {
            x
        };
        let predicted = self.level[i] + self.trend[i] * dt;
        let level = p.holt_alpha * x + (1.0 - p.holt_alpha) * predicted;
        self.trend[i] =
            p.holt_beta * (level - self.level[i]) / dt + (1.0 - p.holt_beta) * self.trend[i];
        self.level[i] = level.max(0.0);
        self.observations[i] = self.observations[i].saturating_add(1);
        if !score {
            self.start_window(i);
        } else if self.window_time[i] >= p.score_window {
            // Each predictor against what the window delivered, as forecast when it began.
            let truth = self.window_bytes[i] / self.window_time[i];
            for k in 0..PREDICTORS {
                let e = &mut self.error[k][i];
                *e = (1.0 - p.error_alpha) * *e
                    + p.error_alpha * (self.window_forecast[k][i] - truth).abs();
            }
            let current = usize::from(self.chosen[i]);
            let mut best = current;
            for k in 0..PREDICTORS {
                if self.error[k][i] < self.error[best][i] {
                    best = k;
                }
            }
            // Hysteresis: a predictor takes over only when clearly better, so that two about as
            // good do not alternate window by window (each switch costs a jump in the forecast).
            if self.error[best][i] < SWITCH_MARGIN * self.error[current][i] {
                self.chosen[i] = best as u8;
            }
            self.start_window(i);
        }
    }

    fn start_window(&mut self, i: usize) {
        self.window_bytes[i] = 0.0;
        self.window_time[i] = 0.0;
        let h = self.params.score_window / 2.0;
        for k in 0..PREDICTORS {
            self.window_forecast[k][i] = self.predict_by(i, k as u8, h);
        }
    }

    /// `link`'s goodput `horizon` seconds ahead (bytes/s).
    pub fn predict_at(&self, link: usize, horizon: f64) -> f64 {
        let h = if horizon.is_finite() {
            horizon.max(0.0)
        } else {
            0.0
        };
        self.predict_one(link, h)
    }

    fn predict_one(&self, i: usize, horizon: f64) -> f64 {
        self.predict_by(i, self.chosen[i], horizon)
    }

    #[inline]
    fn predict_by(&self, i: usize, predictor: u8, horizon: f64) -> f64 {
        match predictor {
            0 => self.last[i],
            1 => self.ewma[i],
            2 => self.harmonic[i],
            3 => (self.level[i] + self.trend[i] * horizon.min(self.params.trend_horizon)).max(0.0),
            _ => {
                let [last, ewma, harmonic, holt] = self.features(i);
                self.params.learned.predict(last, ewma, harmonic, holt)
            }
        }
    }

    /// What the learned predictor reads, as it was trained on (`eval::fit`): last value, EWMA,
    /// harmonic mean and Holt's forecast half a second ahead (bytes/s).
    pub(crate) fn features(&self, i: usize) -> [f64; 4] {
        [
            self.last[i],
            self.ewma[i],
            self.harmonic[i],
            self.predict_by(i, Predictor::Holt as u8, 0.5),
        ]
    }

    /// What `predictor` alone forecasts for `link`, `horizon` seconds ahead (bytes/s): for
    /// comparing predictors (`cargo xtask bench pba`).
    pub fn predict_with(&self, link: usize, predictor: Predictor, horizon: f64) -> f64 {
        let h = if horizon.is_finite() {
            horizon.max(0.0)
        } else {
            0.0
        };
        self.predict_by(link, predictor as u8, h)
    }

    /// Feeds observations of several links: `links[k]` saw `goodput[k]` bytes/s over `interval[k]`
    /// seconds, a lower bound where `lower_bound[k]`.
    pub fn observe_batch(
        &mut self,
        links: &[u32],
        goodput: &[f64],
        interval: &[f64],
        lower_bound: &[bool],
    ) -> Result<(), PbaError> {
        let n = links.len();
        if goodput.len() != n || interval.len() != n || lower_bound.len() != n {
            return Err(PbaError::LengthMismatch(format!(
                "{n} links, {} goodputs, {} intervals, {} flags",
                goodput.len(),
                interval.len(),
                lower_bound.len()
            )));
        }
        if let Some(&bad) = links.iter().find(|&&l| l as usize >= self.len()) {
            return Err(PbaError::LengthMismatch(format!(
                "link {bad} in a table of {}",
                self.len()
            )));
        }
        for k in 0..n {
            self.observe(
                links[k] as usize,
                &Observation {
                    goodput: goodput[k],
                    rtt: None,
                    lower_bound: lower_bound[k],
                    interval: interval[k],
                },
            );
        }
        Ok(())
    }

    /// Writes every link's goodput `horizon` seconds ahead (bytes/s; 0 for a link that has seen
    /// nothing) into `out`, which must hold one value per link.
    pub fn predict_batch(&self, horizon: f64, out: &mut [f64]) -> Result<(), PbaError> {
        if out.len() != self.len() {
            return Err(PbaError::LengthMismatch(format!(
                "{} outputs for {} links",
                out.len(),
                self.len()
            )));
        }
        let h = if horizon.is_finite() {
            horizon.max(0.0)
        } else {
            0.0
        }
        .min(self.params.trend_horizon);
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.predict_by(i, self.chosen[i], h);
        }
        Ok(())
    }

    /// One link's forecast over the next second and the next ten (the mean over each horizon, so a
    /// trend counts at the horizon's middle).
    pub fn forecast(&self, link: usize) -> Forecast {
        Forecast {
            goodput_1s: self.predict_one(link, 0.5),
            goodput_10s: self.predict_one(link, 5.0),
            rtt: self.rtt[link],
            predictor: Predictor::ALL[self.chosen[link] as usize],
            observations: self.observations[link],
        }
    }

    /// The smoothed one-step error of `predictor` on `link` (bytes/s).
    pub fn error(&self, link: usize, predictor: Predictor) -> f64 {
        self.error[predictor as usize][link]
    }
}
