//! The learned predictor: a linear blend of the other four, fitted offline.
//!
//! It forecasts the goodput of the next second as `w_last·last + w_ewma·ewma + w_harmonic·harmonic
//! + w_holt·holt`, with no intercept, so the model is the same at 10 Mbit/s and at 10 Gbit/s.
//! `cargo xtask pba train` fits the weights by least squares on the recorded traces (each row
//! divided by the EWMA, so a fast trace does not outweigh a slow one; [`crate::eval::fit`]) and
//! writes them to `learned.txt`, which is compiled into the crate and parsed on first use.

use std::sync::OnceLock;

use crate::PbaError;

/// The shipped weights, as `cargo xtask pba train` wrote them.
const SHIPPED: &str = include_str!("learned.txt");

/// The four weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearnedWeights {
    /// Weight of the last observation.
    pub last: f64,
    /// Weight of the EWMA.
    pub ewma: f64,
    /// Weight of the harmonic mean.
    pub harmonic: f64,
    /// Weight of Holt's forecast half a second ahead.
    pub holt: f64,
}

impl LearnedWeights {
    /// The weights shipped in the crate (`src/learned.txt`). A file that does not parse is caught
    /// by this crate's tests; at run time it would fall back to the plain EWMA.
    pub fn shipped() -> Self {
        static PARSED: OnceLock<LearnedWeights> = OnceLock::new();
        *PARSED.get_or_init(|| Self::from_text(SHIPPED).unwrap_or(Self::EWMA))
    }

    /// Weights that make the learned predictor the EWMA.
    pub const EWMA: Self = Self {
        last: 0.0,
        ewma: 1.0,
        harmonic: 0.0,
        holt: 0.0,
    };

    /// The forecast (bytes/s, never negative or NaN) from the four predictors' values.
    #[inline]
    pub fn predict(&self, last: f64, ewma: f64, harmonic: f64, holt: f64) -> f64 {
        let y = self.last * last + self.ewma * ewma + self.harmonic * harmonic + self.holt * holt;
        if y.is_finite() { y.max(0.0) } else { 0.0 }
    }

    /// The weights as an array in `last, ewma, harmonic, holt` order.
    pub fn to_array(&self) -> [f64; 4] {
        [self.last, self.ewma, self.harmonic, self.holt]
    }

    /// Weights from an array in `last, ewma, harmonic, holt` order.
    pub fn from_array(w: [f64; 4]) -> Self {
        Self {
            last: w[0],
            ewma: w[1],
            harmonic: w[2],
            holt: w[3],
        }
    }

    pub(crate) fn check(&self) -> Result<(), PbaError> {
        for (what, v) in [
            ("learned.last", self.last),
            ("learned.ewma", self.ewma),
            ("learned.harmonic", self.harmonic),
            ("learned.holt", self.holt),
        ] {
            if !(v.is_finite() && v.abs() <= 100.0) {
                return Err(PbaError::InvalidParameter {
                    what,
                    value: v,
                    expected: "a finite weight within +-100",
                });
            }
        }
        Ok(())
    }

    /// Parses the text `to_text` writes: `# comments`, then one `name value` line per weight.
    pub fn from_text(text: &str) -> Result<Self, PbaError> {
        let mut w = [f64::NAN; 4];
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || PbaError::Trace {
                line: 0,
                reason: format!("learned weights: {line:?} is not `NAME VALUE`"),
            };
            let (name, value) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
            let value: f64 = value.trim().parse().map_err(|_| bad())?;
            let slot = match name {
                "last" => 0,
                "ewma" => 1,
                "harmonic" => 2,
                "holt" => 3,
                _ => return Err(bad()),
            };
            w[slot] = value;
        }
        let weights = Self::from_array(w);
        weights.check()?;
        Ok(weights)
    }

    /// The weights as text, with where they came from.
    pub fn to_text(&self, trained_on: &str) -> String {
        format!(
            "# dwcp-pba learned predictor: goodput over the next second =\n\
             #   last*last_value + ewma*EWMA + harmonic*harmonic_mean + holt*Holt(0.5 s)\n\
             # written by `cargo xtask pba train`, fitted on the traces: {trained_on}\n\
             last {:.9}\newma {:.9}\nharmonic {:.9}\nholt {:.9}\n",
            self.last, self.ewma, self.harmonic, self.holt
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_weights_parse_and_round_trip() {
        let w = LearnedWeights::from_text(SHIPPED).expect("src/learned.txt parses");
        assert_eq!(LearnedWeights::shipped(), w);
        let back = LearnedWeights::from_text(&w.to_text("test")).unwrap();
        for (a, b) in w.to_array().into_iter().zip(back.to_array()) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn bad_weights_are_refused() {
        for bad in [
            "last 1\newma 0\nharmonic 0",
            "last x\newma 0\nharmonic 0\nholt 0",
            "last 1e9\newma 0\nharmonic 0\nholt 0",
            "speed 1",
        ] {
            assert!(LearnedWeights::from_text(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            LearnedWeights::EWMA.predict(1.0, f64::MAX, f64::MAX, 3.0),
            f64::MAX
        );
        let w = LearnedWeights::from_array([1.0, 1.0, 0.0, 0.0]);
        assert_eq!(
            w.predict(f64::MAX, f64::MAX, 0.0, 0.0),
            0.0,
            "an overflow is no forecast"
        );
    }
}
