//! Link traces: what `dwcp send --trace` records (one CSV row per stream per sampling), turned into
//! one raw sample of the whole link per sampling.
//!
//! The streams of each sampling are summed by [`LinkAggregator`], as the engine does live.

use crate::PbaError;
use crate::sample::{LinkAggregator, RawSample, StreamSample};

/// The header `dwcp send --trace` writes.
pub const HEADER: &str = "t_s,stream,bytes_acked,rtt_s,delivery_rate_bps,app_limited,unsent_bytes";

/// Most rows a trace may have: a day of samplings of 64 streams every 250 ms is far less.
pub const MAX_ROWS: usize = 25_000_000;

/// A link trace: one raw sample per sampling.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    samples: Vec<RawSample>,
    streams: usize,
}

#[derive(Debug, Clone, Copy)]
struct Row {
    t: f64,
    stream: u16,
    acked: u64,
    rtt: f64,
    app_limited: bool,
    unsent: u64,
}

fn parse_row(line: &str, n: usize) -> Result<Row, PbaError> {
    let err = |reason: String| PbaError::Trace { line: n, reason };
    let f: Vec<&str> = line.split(',').map(str::trim).collect();
    if f.len() != 7 {
        return Err(err(format!("{} fields, expected 7 ({HEADER})", f.len())));
    }
    let num = |i: usize, what: &str| -> Result<f64, PbaError> {
        f[i].parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| err(format!("{what} {:?} is not a number >= 0", f[i])))
    };
    let int = |i: usize, what: &str| -> Result<u64, PbaError> {
        f[i].parse::<u64>()
            .map_err(|_| err(format!("{what} {:?} is not a whole number", f[i])))
    };
    Ok(Row {
        t: num(0, "t_s")?,
        stream: f[1]
            .parse()
            .map_err(|_| err(format!("stream {:?} is not a stream index", f[1])))?,
        acked: int(2, "bytes_acked")?,
        rtt: num(3, "rtt_s")?,
        app_limited: match f[5] {
            "0" => false,
            "1" => true,
            other => return Err(err(format!("app_limited {other:?} is not 0 or 1"))),
        },
        unsent: int(6, "unsent_bytes")?,
    })
}

impl Trace {
    /// Parses a trace; a malformed line is an error naming it.
    pub fn parse(text: &str) -> Result<Self, PbaError> {
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, h)) if h.trim() == HEADER => {}
            _ => {
                return Err(PbaError::Trace {
                    line: 1,
                    reason: format!("the header must be {HEADER:?}"),
                });
            }
        }
        let mut rows = Vec::new();
        for (i, line) in lines {
            if line.trim().is_empty() {
                continue;
            }
            if rows.len() == MAX_ROWS {
                return Err(PbaError::Trace {
                    line: i + 1,
                    reason: format!("more than {MAX_ROWS} rows"),
                });
            }
            rows.push(parse_row(line, i + 1)?);
        }
        Ok(Self::from_rows(&rows))
    }

    fn from_rows(rows: &[Row]) -> Self {
        let mut link = LinkAggregator::new();
        let mut samples = Vec::new();
        let mut streams = Vec::new();
        let mut k = 0;
        while k < rows.len() {
            let t = rows[k].t;
            streams.clear();
            while k < rows.len() && rows[k].t == t {
                let r = rows[k];
                streams.push(StreamSample {
                    stream: r.stream,
                    acked_bytes: r.acked,
                    rtt: r.rtt,
                    app_limited: r.app_limited,
                    unsent_bytes: r.unsent,
                });
                k += 1;
            }
            samples.push(link.push(t, &streams));
        }
        Self {
            samples,
            streams: link.streams(),
        }
    }

    /// A synthetic trace: `rates[k]` bytes/s over the `k`-th interval of `interval` seconds.
    pub fn from_rates(rates: &[f64], interval: f64) -> Self {
        let mut acked = 0.0;
        let mut samples = vec![RawSample {
            at: 0.0,
            acked_bytes: 0.0,
            rtt: 0.05,
            app_limited: false,
        }];
        for (k, r) in rates.iter().enumerate() {
            acked += r.max(0.0) * interval;
            samples.push(RawSample {
                at: (k + 1) as f64 * interval,
                acked_bytes: acked,
                rtt: 0.05,
                app_limited: false,
            });
        }
        Self {
            samples,
            streams: 1,
        }
    }

    /// The link's samples, one per sampling.
    pub fn samples(&self) -> &[RawSample] {
        &self.samples
    }

    /// The samples, owned.
    pub fn series(&self) -> Vec<RawSample> {
        self.samples.clone()
    }

    /// Streams seen.
    pub fn streams(&self) -> usize {
        self.streams
    }

    /// Seconds from the first sampling to the last.
    pub fn duration(&self) -> f64 {
        match (self.samples.first(), self.samples.last()) {
            (Some(a), Some(b)) => b.at - a.at,
            _ => 0.0,
        }
    }

    /// Mean goodput over the trace, bytes/s.
    pub fn mean_goodput(&self) -> f64 {
        match (self.samples.first(), self.samples.last()) {
            (Some(a), Some(b)) if b.at > a.at => (b.acked_bytes - a.acked_bytes) / (b.at - a.at),
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_add_up_and_a_reopened_stream_counts_from_zero() {
        let text = format!(
            "{HEADER}\n\
             0.25,0,1000,0.05,0,0,10\n0.25,1,500,0.05,0,0,10\n\
             0.50,0,3000,0.05,0,0,10\n0.50,1,100,0.05,0,1,0\n\
             0.75,0,3000,0.05,0,1,0\n0.75,1,100,0.05,0,1,0\n"
        );
        let t = Trace::parse(&text).unwrap();
        let s = t.samples();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].acked_bytes, 1500.0);
        // Stream 0 +2000, stream 1 re-opened with 100.
        assert_eq!(s[1].acked_bytes, 3600.0);
        assert!(!s[1].app_limited, "one stream still had bytes waiting");
        assert!(s[2].app_limited);
        assert_eq!(t.streams(), 2);
        assert!((t.mean_goodput() - 2100.0 / 0.5).abs() < 1e-9);
    }

    #[test]
    fn malformed_traces_name_the_line() {
        for (text, line) in [
            ("t,stream\n".to_string(), 1),
            (
                format!("{HEADER}\n0.1,0,1,0.05,0,0,0\n0.2,0,x,0.05,0,0,0\n"),
                3,
            ),
            (format!("{HEADER}\n0.1,0,1,NaN,0,0,0\n"), 2),
            (format!("{HEADER}\n0.1,0,1,0.05,0,2,0\n"), 2),
            (format!("{HEADER}\n0.1,70000,1,0.05,0,0,0\n"), 2),
            (format!("{HEADER}\n0.1,0,1,0.05\n"), 2),
        ] {
            match Trace::parse(&text) {
                Err(PbaError::Trace { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn every_committed_trace_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("traces");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("dwcp-pba/traces exists") {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "csv") {
                let t = Trace::parse(&std::fs::read_to_string(&p).unwrap())
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                assert!(t.samples().len() >= 8, "{}: too short", p.display());
                assert!(t.mean_goodput() > 0.0, "{}", p.display());
                n += 1;
            }
        }
        assert!(n >= 5, "only {n} traces in {}", dir.display());
    }
}
