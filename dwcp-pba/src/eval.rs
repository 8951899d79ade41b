//! Replaying traces through the predictors: the error of each one's forecast of the next second's
//! goodput, against what the link then delivered; and the fit of the learned predictor's weights.
//!
//! At every sampling of a trace, each predictor forecasts the mean goodput over the next second
//! (from what it saw up to then); the truth is the acknowledged bytes over the next second
//! (the first sampling at least 0.95 s later). A second in which the sender starved the link
//! (an app-limited sampling) is not scored: its goodput says nothing about the link.

use crate::PbaError;
use crate::batch::Params;
use crate::learned::LearnedWeights;
use crate::predict::{LinkPredictor, Predictor};
use crate::sample::RawSample;
use crate::trace::Trace;

/// The forecast horizon scored, seconds.
pub const HORIZON: f64 = 1.0;

/// Column names of [`Scores::columns`].
pub const COLUMNS: [&str; 8] = [
    "last value",
    "EWMA",
    "harmonic",
    "Holt",
    "learned",
    "chosen",
    "learned held out",
    "chosen held out",
];

/// One predictor's error over a trace, bytes/s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Column {
    /// Mean absolute error.
    pub mae: f64,
    /// 95th percentile of the absolute error.
    pub p95: f64,
}

/// Every predictor's error over one trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// Forecasts scored.
    pub points: usize,
    /// In [`COLUMNS`] order; the held-out columns are NaN when no held-out weights were given.
    pub columns: Vec<Column>,
    /// Mean goodput over the scored seconds, bytes/s.
    pub mean_truth: f64,
}

impl Scores {
    /// The chosen predictor's MAE over last value's: with the learned predictor fitted without
    /// this trace when held-out weights were given (the honest figure), with the shipped ones
    /// otherwise.
    pub fn chosen_over_last(&self) -> f64 {
        let chosen = if self.columns[7].mae.is_nan() {
            self.columns[5].mae
        } else {
            self.columns[7].mae
        };
        chosen / self.columns[0].mae
    }
}

/// One scored sampling.
struct Point {
    features: [f64; 4],
    forecasts: [f64; 8],
    truth: f64,
}

fn replay(series: &[RawSample], held_out: Option<&LearnedWeights>) -> Vec<Point> {
    let mut p = LinkPredictor::new();
    let mut q = held_out.map(|w| {
        LinkPredictor::with_params(Params {
            learned: *w,
            ..Params::default()
        })
        .unwrap_or_default()
    });
    let mut points = Vec::new();
    for (i, s) in series.iter().enumerate() {
        p.push(*s);
        if let Some(q) = q.as_mut() {
            q.push(*s);
        }
        if p.forecast().observations < 2 {
            continue;
        }
        let Some(j) = (i + 1..series.len()).find(|&j| series[j].at - s.at >= HORIZON * 0.95) else {
            break;
        };
        if series[i + 1..=j].iter().any(|x| x.app_limited) {
            continue;
        }
        let truth = (series[j].acked_bytes - s.acked_bytes) / (series[j].at - s.at);
        if !truth.is_finite() {
            continue;
        }
        let mut forecasts = [f64::NAN; 8];
        for (k, pred) in Predictor::ALL.into_iter().enumerate() {
            forecasts[k] = p.predict_with(pred, HORIZON / 2.0);
        }
        forecasts[5] = p.forecast().goodput_1s;
        if let Some(q) = &q {
            forecasts[6] = q.predict_with(Predictor::Learned, HORIZON / 2.0);
            forecasts[7] = q.forecast().goodput_1s;
        }
        points.push(Point {
            features: p.features(),
            forecasts,
            truth,
        });
    }
    points
}

/// Every predictor's error on `series` (the learned one with the shipped weights, and with
/// `held_out` weights if given: fitted without this trace).
pub fn score(series: &[RawSample], held_out: Option<&LearnedWeights>) -> Scores {
    let points = replay(series, held_out);
    let n = points.len();
    let columns = (0..COLUMNS.len())
        .map(|k| {
            let mut e: Vec<f64> = points
                .iter()
                .map(|p| (p.forecasts[k] - p.truth).abs())
                .collect();
            if e.is_empty() || e.iter().any(|x| x.is_nan()) {
                return Column {
                    mae: f64::NAN,
                    p95: f64::NAN,
                };
            }
            e.sort_by(f64::total_cmp);
            Column {
                mae: e.iter().sum::<f64>() / n as f64,
                p95: e[((n as f64 * 0.95).ceil() as usize).clamp(1, n) - 1],
            }
        })
        .collect();
    Scores {
        points: n,
        columns,
        mean_truth: points.iter().map(|p| p.truth).sum::<f64>() / n.max(1) as f64,
    }
}

/// Fits the learned predictor's weights on `series`: least absolute error (iteratively reweighted
/// least squares) on rows divided by the EWMA, so every trace counts by its samplings, not by its
/// rate. The weights are constrained to sum to 1, so that a constant link is forecast exactly.
pub fn fit(series: &[Vec<RawSample>]) -> Result<LearnedWeights, PbaError> {
    // With w_ewma = 1 - (w_last + w_harmonic + w_holt), and every feature relative to the EWMA:
    // truth - 1 = w_last (last - 1) + w_harmonic (harmonic - 1) + w_holt (holt - 1).
    let mut rows: Vec<([f64; 3], f64)> = Vec::new();
    for s in series {
        for p in replay(s, None) {
            let e = p.features[1];
            if e > 0.0 {
                let f = p.features.map(|x| x / e - 1.0);
                rows.push(([f[0], f[2], f[3]], p.truth / e - 1.0));
            }
        }
    }
    if rows.len() < 16 {
        return Err(PbaError::Trace {
            line: 0,
            reason: format!(
                "{} scored samplings are too few to fit the weights",
                rows.len()
            ),
        });
    }
    let mut w = [0.0; 3];
    let mut weights = vec![1.0; rows.len()];
    for _ in 0..30 {
        w = weighted_least_squares(&rows, &weights)?;
        for (r, wt) in rows.iter().zip(weights.iter_mut()) {
            let residual = (dot(&w, &r.0) - r.1).abs();
            *wt = 1.0 / residual.max(1e-3);
        }
    }
    let w = LearnedWeights::from_array([w[0], 1.0 - w[0] - w[1] - w[2], w[1], w[2]]);
    w.check()?;
    Ok(w)
}

fn dot<const N: usize>(a: &[f64; N], b: &[f64; N]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn weighted_least_squares<const N: usize>(
    rows: &[([f64; N], f64)],
    weights: &[f64],
) -> Result<[f64; N], PbaError> {
    // Normal equations with a small ridge (it keeps a feature that never varies at weight 0),
    // solved by Gauss-Jordan elimination with partial pivoting.
    let mut a = vec![vec![0.0f64; N + 1]; N];
    for ((x, y), wt) in rows.iter().zip(weights) {
        for r in 0..N {
            for c in 0..N {
                a[r][c] += wt * x[r] * x[c];
            }
            a[r][N] += wt * x[r] * y;
        }
    }
    let total: f64 = weights.iter().sum();
    for (i, row) in a.iter_mut().enumerate() {
        row[i] += 1e-4 * total;
    }
    for col in 0..N {
        let pivot = (col..N)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        let diagonal = a[col][col].abs();
        if diagonal.is_nan() || diagonal <= 1e-300 {
            return Err(PbaError::Trace {
                line: 0,
                reason: "the traces do not determine the weights (singular system)".into(),
            });
        }
        let pivot_row = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot_row[col];
                for (cell, pivot_cell) in row.iter_mut().zip(pivot_row.iter()).skip(col) {
                    *cell -= f * pivot_cell;
                }
            }
        }
    }
    Ok(std::array::from_fn(|i| a[i][N] / a[i][i]))
}

/// A deterministic noise source in -1..1 (a SplitMix64 finaliser of `k`): the synthetic traces'
/// noise, also used by the tests and the fleet simulation's example fleet.
pub fn noise(k: u64) -> f64 {
    let mut x = k.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    (x % 2_000_001) as f64 / 1e6 - 1.0
}

/// The synthetic traces: steady with noise, a step down and back up, a ramp, an oscillation; 100 s
/// each, sampled every 250 ms.
pub fn synthetic() -> Vec<(&'static str, Vec<RawSample>)> {
    let n = 400u64;
    let build = |f: &dyn Fn(u64) -> f64| {
        Trace::from_rates(&(0..n).map(f).collect::<Vec<_>>(), 0.25).series()
    };
    vec![
        (
            "synthetic steady +-20 %",
            build(&|k| 100e6 * (1.0 + 0.2 * noise(k))),
        ),
        (
            "synthetic step 100/40/100",
            build(&|k| {
                (if (150..250).contains(&k) { 40e6 } else { 100e6 }) * (1.0 + 0.05 * noise(k))
            }),
        ),
        (
            "synthetic ramp 10->210 MB/s",
            build(&|k| (10e6 + 0.5e6 * k as f64) * (1.0 + 0.05 * noise(k))),
        ),
        (
            "synthetic oscillation 4 s",
            build(&|k| {
                (60e6 + 30e6 * (k as f64 * std::f64::consts::TAU / 16.0).sin())
                    * (1.0 + 0.1 * noise(k))
            }),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_constant_link_is_scored_with_no_error() {
        let s = Trace::from_rates(&[50e6; 40], 0.25).series();
        let scores = score(&s, None);
        assert!(scores.points > 20);
        for c in &scores.columns[..6] {
            assert!(c.mae < 1.0 && c.p95 < 1.0, "{scores:?}");
        }
        assert!(scores.columns[6].mae.is_nan(), "no held-out weights given");
        assert!(scores.columns[7].mae.is_nan());
        assert!((scores.mean_truth - 50e6).abs() < 1.0);
    }

    #[test]
    fn starved_seconds_are_not_scored() {
        let mut s = Trace::from_rates(&[50e6; 40], 0.25).series();
        for x in &mut s[10..20] {
            x.app_limited = true;
        }
        let all = score(&Trace::from_rates(&[50e6; 40], 0.25).series(), None).points;
        assert!(score(&s, None).points < all - 10);
    }

    #[test]
    fn fitting_finds_what_pays_on_each_kind_of_link() {
        let series: Vec<_> = synthetic().into_iter().map(|(_, s)| s).collect();
        // A noisy steady link: the best 1-s forecast is a smoothed one, far from the last sample.
        let w = fit(&series[..1]).unwrap();
        let steady = score(&series[0], Some(&w));
        assert!(
            steady.columns[6].mae < 0.6 * steady.columns[0].mae,
            "{w:?}: {steady:?}"
        );
        assert!(w.last.abs() < 0.3, "{w:?}");
        // A ramp: an average lags, the fit must lean on the trend.
        let w = fit(&series[2..3]).unwrap();
        let ramp = score(&series[2], Some(&w));
        assert!(
            ramp.columns[6].mae < 0.9 * ramp.columns[1].mae
                && ramp.columns[6].mae < 0.9 * ramp.columns[0].mae,
            "{w:?}: {ramp:?}"
        );
        assert!(w.holt > w.ewma && w.holt > w.last, "{w:?}");
        assert!(fit(&[series[0][..5].to_vec()]).is_err(), "too few points");
    }
}
