//! `dwcp send --trace FILE`: the streams' kernel telemetry over a migration, as CSV, for PBA's
//! predictors to be trained and measured on (`cargo xtask pba record`, `dwcp-pba/traces/`).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use dwcp::TelemetryFeed;
use dwcp_pba::trace::HEADER;

/// How often the recorder looks for a new sampling (the engine samples every 250 ms).
const POLL: Duration = Duration::from_millis(20);

/// Writes every sampling `feed` publishes until `done` is set, one row per stream, times counted
/// from `start`. Returns the samplings written.
pub fn record(
    feed: &TelemetryFeed,
    path: &Path,
    start: Instant,
    done: &AtomicBool,
) -> anyhow::Result<u64> {
    let file = std::fs::File::create(path)
        .with_context(|| format!("creating the trace file {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    writeln!(out, "{HEADER}")?;
    let mut seen = 0;
    let mut written = 0;
    loop {
        // Read `done` first: the sampling published with the final report is then not missed.
        let finished = done.load(Ordering::Acquire);
        let snap = feed.snapshot();
        if snap.sequence != seen {
            seen = snap.sequence;
            if let Some(taken) = snap.taken {
                let t = taken.saturating_duration_since(start).as_secs_f64();
                for s in &snap.streams {
                    writeln!(
                        out,
                        "{t:.4},{},{},{:.6},{:.0},{},{}",
                        s.stream,
                        s.tcp.bytes_acked,
                        s.tcp.rtt_s,
                        s.tcp.delivery_rate_bps,
                        u8::from(s.tcp.app_limited),
                        s.tcp.unsent_bytes
                    )?;
                }
                written += 1;
            }
        }
        if finished {
            break;
        }
        std::thread::sleep(POLL);
    }
    out.flush()
        .with_context(|| format!("writing the trace file {}", path.display()))?;
    Ok(written)
}
