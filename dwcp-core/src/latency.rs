//! Latency of each step of a migration, per operation: HDR histograms (microsecond resolution,
//! three significant digits) that threads record into concurrently, summarised as P50 / P95 / P99
//! / max in the reports and exported as Prometheus histograms by the `dwcp` crate.
//!
//! One recorder per migration (source) or session (destination). A record is one lock of that
//! operation's histogram and an increment: made per chunk or per batch, never per page.

use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;

/// A step of a migration whose latency is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LatencyOp {
    /// Opening one stream: connect, TLS, the DWCP handshake (source).
    StreamSetup,
    /// Encoding one batch of chunks (source, the parallel encoder).
    Encode,
    /// Writing one chunk's frame to its stream (source lane writer).
    Send,
    /// From a chunk's frame written to its acknowledgement arriving (source).
    Ack,
    /// Decoding one chunk (destination).
    Decode,
    /// Writing one decoded chunk's pages into memory (destination).
    Apply,
    /// Computing the whole-memory digest (source: with the guest paused).
    Digest,
}

impl LatencyOp {
    /// Every operation, in report order.
    pub const ALL: [LatencyOp; 7] = [
        LatencyOp::StreamSetup,
        LatencyOp::Encode,
        LatencyOp::Send,
        LatencyOp::Ack,
        LatencyOp::Decode,
        LatencyOp::Apply,
        LatencyOp::Digest,
    ];

    /// The name in reports and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            LatencyOp::StreamSetup => "stream_setup",
            LatencyOp::Encode => "encode",
            LatencyOp::Send => "send",
            LatencyOp::Ack => "ack",
            LatencyOp::Decode => "decode",
            LatencyOp::Apply => "apply",
            LatencyOp::Digest => "digest",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Longest latency a histogram holds; longer ones count as this (an hour, in microseconds).
const MAX_MICROS: u64 = 3_600_000_000;

/// Latency histograms of one migration, one per [`LatencyOp`].
#[derive(Debug)]
pub struct LatencyRecorder {
    ops: [Mutex<Histogram<u64>>; LatencyOp::ALL.len()],
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyRecorder {
    /// Empty histograms.
    pub fn new() -> Self {
        Self {
            ops: std::array::from_fn(|_| {
                Mutex::new(
                    Histogram::new_with_bounds(1, MAX_MICROS, 3)
                        .expect("valid histogram bounds (1 us .. 1 h, 3 digits)"),
                )
            }),
        }
    }

    /// Records one `op` that took `took` (below a microsecond counts as one).
    pub fn record(&self, op: LatencyOp, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(MAX_MICROS);
        self.ops[op.index()]
            .lock()
            .saturating_record(micros.clamp(1, MAX_MICROS));
    }

    /// The summary of every operation recorded at least once.
    pub fn report(&self) -> LatencyReport {
        LatencyReport(
            LatencyOp::ALL
                .iter()
                .filter_map(|&op| {
                    let h = self.ops[op.index()].lock();
                    (!h.is_empty()).then(|| OpLatency {
                        op,
                        count: h.len(),
                        p50_us: h.value_at_quantile(0.50),
                        p95_us: h.value_at_quantile(0.95),
                        p99_us: h.value_at_quantile(0.99),
                        max_us: h.max(),
                    })
                })
                .collect(),
        )
    }

    /// Calls `f(seconds, count)` for every distinct recorded value of `op` (for exporting to other
    /// histogram formats).
    pub fn for_each_value(&self, op: LatencyOp, mut f: impl FnMut(f64, u64)) {
        let h = self.ops[op.index()].lock();
        for v in h.iter_recorded() {
            f(
                h.median_equivalent(v.value_iterated_to()) as f64 / 1e6,
                v.count_at_value(),
            );
        }
    }
}

/// Latency of every recorded operation of a migration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct LatencyReport(pub Vec<OpLatency>);

impl LatencyReport {
    /// The summary of `op`, if it was recorded.
    pub fn get(&self, op: LatencyOp) -> Option<&OpLatency> {
        self.0.iter().find(|o| o.op == op)
    }
}

/// One operation's latency distribution, microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OpLatency {
    /// The operation.
    pub op: LatencyOp,
    /// How many were recorded.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 95th percentile.
    pub p95_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Largest.
    pub max_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_recorded_values() {
        let r = LatencyRecorder::new();
        for us in 1..=1000u64 {
            r.record(LatencyOp::Ack, Duration::from_micros(us));
        }
        r.record(LatencyOp::Digest, Duration::from_secs(2));
        r.record(LatencyOp::Send, Duration::from_nanos(10));
        let report = r.report();
        let ack = report.get(LatencyOp::Ack).unwrap();
        assert_eq!(ack.count, 1000);
        // Three significant digits: within 0.1 %.
        assert!((499..=501).contains(&ack.p50_us), "{ack:?}");
        assert!((949..=951).contains(&ack.p95_us), "{ack:?}");
        assert!((989..=991).contains(&ack.p99_us), "{ack:?}");
        assert!((999..=1001).contains(&ack.max_us), "{ack:?}");
        assert!(report.get(LatencyOp::Digest).unwrap().p50_us >= 1_999_000);
        assert_eq!(
            report.get(LatencyOp::Send).unwrap().max_us,
            1,
            "sub-microsecond is 1 us"
        );
        assert!(report.get(LatencyOp::Encode).is_none(), "never recorded");
        let mut total = 0;
        r.for_each_value(LatencyOp::Ack, |secs, n| {
            assert!(secs > 0.0 && secs < 0.002);
            total += n;
        });
        assert_eq!(total, 1000);
        assert!(serde_json::to_string(&report).is_ok_and(|j| j.contains("\"op\":\"ack\"")));
    }
}
