//! PBA, the bandwidth predictor and allocator of DWCP: link samples in, forecasts and rates out.
//!
//! Sans-IO like the engine's machines: nothing here reads a clock or a socket; every input carries
//! its own time (seconds on any monotonic scale).
//!
//! Data flows in three steps. [`sample::LinkAggregator`] sums a link's streams (cumulative
//! acknowledged bytes, the round trip, the kernel's app-limited flag) into one raw sample, and
//! [`sample::SampleFilter`] turns raw samples into clean goodput observations: zero or backwards
//! intervals, NaN and negative values are dropped, and an app-limited sample only ever raises the
//! estimate (a starved sender measures itself, not the link). [`predict::LinkPredictor`] keeps
//! five predictors per link (last value, EWMA, harmonic mean, Holt's trend, and a small linear
//! model trained offline on the recorded traces in `traces/`, its weights shipped in
//! `src/learned.txt`) and forecasts, over two horizons, with the one whose recent error over
//! one-second windows is smallest; [`batch::LinkTable`] does the same for thousands of links at
//! once in a structure of arrays, without allocating per call. [`bucket::TokenBucket`] caps one
//! migration or one host; [`alloc::allocate`] splits a capacity among concurrent migrations,
//! max-min fair with weights and deadlines. [`trace`] reads recorded traces and [`eval`] scores
//! every predictor on them and fits the learned model (`cargo xtask pba eval|train`).
//! [`fleet::simulate`] plays a host evacuating many guests at once through the allocator, in a
//! fluid model, for capacity planning beyond what a real test can run.
//!
//! The engine (`dwcp-proto`'s source machine) feeds every telemetry sample in and prices its passes
//! and its predicted downtime with the forecast; `dwcp::HostUplink` splits a host's cap among its
//! migrations with the allocator. docs/pba.md says what is measured and what is not built yet.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod alloc;
pub mod batch;
pub mod bucket;
pub mod eval;
pub mod fleet;
pub mod learned;
pub mod predict;
pub mod sample;
pub mod trace;

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
    /// A trace or weights file that does not parse.
    #[error("line {line}: {reason}")]
    Trace {
        /// The line (1 is the first; 0 when unknown).
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
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
