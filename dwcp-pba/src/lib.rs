//! PBA, the bandwidth predictor and allocator of DWCP: link samples in, forecasts and rates out.
//!
//! Sans-IO like the engine's machines: nothing here reads a clock or a socket; every input carries
//! its own time (seconds on any monotonic scale).
//!
//! Data flows in three steps. [`sample::SampleFilter`] turns raw per-link samples (delivered bytes,
//! round trip, the kernel's app-limited flag) into clean goodput observations: zero or backwards
//! intervals, NaN and negative values are dropped, and an app-limited sample only ever raises the
//! estimate (a starved sender measures itself, not the link). [`predict::LinkPredictor`] keeps
//! several predictors per link (last value, EWMA, harmonic mean, Holt's trend) and forecasts with
//! the one whose recent one-step error is smallest, over two horizons; [`batch::LinkTable`] does the
//! same for thousands of links at once in a structure of arrays, without allocating per call.
//! [`bucket::TokenBucket`] caps one migration or one host; [`alloc::allocate`] splits a capacity
//! among concurrent migrations, max-min fair with weights and deadlines.
//!
//! Status (issue 14): the core above is built and tested; the learned model, recorded traces,
//! `cargo xtask bench pba` and the engine's consumers (stream count, codec hint, downtime
//! prediction, `--max-bandwidth`) are not wired yet.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod alloc;
pub mod batch;
pub mod bucket;
pub mod predict;
pub mod sample;

/// What PBA refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PbaError {
    /// A rate that is zero, negative, not a number, or beyond any link (bytes per second).
    #[error("invalid rate {0} bytes/s: a cap must be positive, finite and at most {max} bytes/s", max = MAX_RATE)]
    InvalidRate(f64),
    /// A burst that is zero, negative, not a number or absurd (bytes).
    #[error("invalid burst {0} bytes: it must be positive, finite and at most {max} bytes", max = MAX_BURST)]
    InvalidBurst(f64),
    /// A parameter outside its range.
    #[error("invalid {what}: {value} (expected {expected})")]
    InvalidParameter {
        /// Which parameter.
        what: &'static str,
        /// The value given.
        value: f64,
        /// The accepted range.
        expected: &'static str,
    },
    /// Arrays of one batch call differ in length.
    #[error("batch arrays differ in length: {0}")]
    LengthMismatch(String),
}

/// The fastest rate PBA accepts as a cap: 10 Tbit/s, in bytes per second.
pub const MAX_RATE: f64 = 1.25e12;
/// The largest burst PBA accepts: 1 TiB.
pub const MAX_BURST: f64 = 1.099_511_627_776e12;

/// Checks a rate in bytes per second.
pub fn check_rate(rate: f64) -> Result<f64, PbaError> {
    if rate.is_finite() && rate > 0.0 && rate <= MAX_RATE {
        Ok(rate)
    } else {
        Err(PbaError::InvalidRate(rate))
    }
}
