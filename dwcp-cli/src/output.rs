//! Reports on stdout: human-readable text, or one JSON object.

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::Context;
use dwcp::{MigrationReport, ReceiveReport};
use serde_json::{Map, Value};

/// A JSON object built from a serializable report plus extra fields.
#[derive(Debug)]
pub struct JsonReport(Map<String, Value>);

impl JsonReport {
    /// A source-side report: every field of the [`MigrationReport`].
    pub fn migration(r: &MigrationReport) -> anyhow::Result<Self> {
        Self::from_serializable(r)
    }

    /// A destination-side report: every field of the [`ReceiveReport`], plus `downtime_ms` (0: the
    /// destination does not see the pause) and `iterations` (the source's passes) so that both sides
    /// share the keys of a migration report.
    pub fn receive(r: &ReceiveReport) -> anyhow::Result<Self> {
        let mut j = Self::from_serializable(r)?;
        j.set("downtime_ms", 0.0);
        j.set("iterations", r.final_iteration + 1);
        Ok(j)
    }

    fn from_serializable(r: &impl serde::Serialize) -> anyhow::Result<Self> {
        match serde_json::to_value(r).context("serializing the report")? {
            Value::Object(m) => Ok(Self(m)),
            other => anyhow::bail!("a report serialized to {other} instead of an object"),
        }
    }

    /// Adds or replaces a field.
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.0.insert(key.to_string(), value.into());
    }

    /// Adds or replaces a field holding another report.
    pub fn set_serialized(
        &mut self,
        key: &str,
        value: &impl serde::Serialize,
    ) -> anyhow::Result<()> {
        self.0.insert(
            key.to_string(),
            serde_json::to_value(value).context("serializing the report")?,
        );
        Ok(())
    }

    /// Prints the object as one line on stdout.
    pub fn print(self) -> anyhow::Result<()> {
        let mut text =
            serde_json::to_string(&Value::Object(self.0)).context("serializing the report")?;
        text.push('\n');
        emit(&text)
    }
}

/// Writes `text` to stdout. A closed stdout (`dwcp ... | head`) is not an error.
pub fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing the report to stdout")
        }
        _ => Ok(()),
    }
}

/// `1.50 GiB`-style rendering of a byte count.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// `logical / wire`, or 0 when nothing went on the wire.
/// The security line of a report; plain text is said out loud.
fn security_line(mode: dwcp::SecurityMode) -> String {
    if mode.is_encrypted() {
        format!("{mode} (TLS 1.3, encrypted)")
    } else {
        format!("{mode}: NOT ENCRYPTED, memory crossed the network in clear text")
    }
}

fn ratio(logical: u64, wire: u64) -> f64 {
    if wire == 0 {
        0.0
    } else {
        logical as f64 / wire as f64
    }
}

/// Why pre-copy ended, from [`MigrationReport::converged`] and [`MigrationReport::stop_reason`]:
/// the reason's name as the JSON report has it, and for a stop that did not converge its cause.
fn stop_text(converged: bool, reason: &str) -> String {
    if converged {
        return format!("stop reason {reason}: the predicted downtime fit the downtime limit");
    }
    let cause = match reason {
        "stalled" => {
            "the dirty set stopped shrinking, stop-and-copy forced above the downtime limit"
        }
        "iteration_limit" => "stop-and-copy forced by the iteration limit",
        "postcopy" => {
            "pre-copy could not pause within the ceiling; the pages still missing move by post-copy"
        }
        "clean" => {
            "nothing was left to send, but the fixed cost of a pause (digest, handover round \
             trips) alone exceeded the downtime limit"
        }
        _ => "stop-and-copy without meeting the downtime limit",
    };
    format!("did not converge, stop reason {reason}: {cause}")
}

/// The human-readable report of a completed migration (source side).
pub fn migration_text(r: &MigrationReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "migrated {} in {:.1} ms (session {})",
        bytes(r.memory_bytes),
        r.total_ms,
        r.session_id
    );
    let _ = writeln!(
        s,
        "  downtime          {:.2} ms (digest {:.2} ms; predicted {:.2} ms)",
        r.downtime_ms, r.digest_ms, r.predicted_downtime_ms
    );
    let _ = writeln!(
        s,
        "  iterations        {} ({})",
        r.iterations,
        stop_text(r.converged, &r.stop_reason)
    );
    let _ = writeln!(
        s,
        "  logical bytes     {} ({})",
        r.logical_bytes,
        bytes(r.logical_bytes)
    );
    let _ = writeln!(
        s,
        "  wire bytes        {} ({}), ratio {:.2}",
        r.wire_bytes,
        bytes(r.wire_bytes),
        ratio(r.logical_bytes, r.wire_bytes)
    );
    let _ = writeln!(
        s,
        "  throughput        {:.3} GB/s logical",
        r.logical_throughput_bps / 1e9
    );
    let _ = writeln!(s, "  streams           {} ({})", r.streams, r.congestion);
    let _ = writeln!(s, "  security          {}", security_line(r.security));
    let _ = writeln!(
        s,
        "  digest            {} ({})",
        if r.digest_match { "match" } else { "MISMATCH" },
        r.digest
    );
    let _ = writeln!(
        s,
        "  pages             {} zero, {} literal; chunks {} compressed, {} raw",
        r.encode.zero_pages,
        r.encode.literal_pages,
        r.encode.compressed_chunks,
        r.encode.raw_chunks
    );
    for l in &r.latency.0 {
        let _ = writeln!(
            s,
            "  latency {:<12} p50 {} us, p95 {} us, p99 {} us, max {} us ({} samples)",
            l.op.as_str(),
            l.p50_us,
            l.p95_us,
            l.p99_us,
            l.max_us,
            l.count
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "  {:>4}  {:>10}  {:>12}  {:>10}  {:>10}  {:>10}  {:>14}",
        "pass", "pages", "wire", "ms", "pred. ms", "dirtied", "pred. down ms"
    );
    let last = r.passes.len().saturating_sub(1);
    for (i, p) in r.passes.iter().enumerate() {
        let label = if i == last {
            format!("{}*", p.iteration)
        } else {
            p.iteration.to_string()
        };
        let _ = writeln!(
            s,
            "  {:>4}  {:>10}  {:>12}  {:>10.1}  {:>10.1}  {:>10}  {:>14.2}",
            label,
            p.pages,
            bytes(p.wire_bytes),
            p.duration_ms,
            p.predicted_duration_ms,
            p.dirtied_pages,
            p.predicted_downtime_ms
        );
    }
    let _ = writeln!(s, "  (* stop-and-copy, guest paused)");
    s
}

/// The human-readable report of a received migration (destination side).
pub fn receive_text(r: &ReceiveReport, peer: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "received {} from {peer} in {:.1} ms (session {})",
        bytes(r.memory_bytes),
        r.total_ms,
        r.session_id
    );
    let _ = writeln!(s, "  streams           {}", r.streams);
    let _ = writeln!(s, "  security          {}", security_line(r.security));
    let _ = writeln!(s, "  iterations        {}", r.final_iteration + 1);
    let _ = writeln!(
        s,
        "  pages applied     {} ({} stale copies dropped)",
        r.pages_applied, r.stale_pages_dropped
    );
    let _ = writeln!(
        s,
        "  logical bytes     {} ({})",
        r.logical_bytes,
        bytes(r.logical_bytes)
    );
    let _ = writeln!(
        s,
        "  wire bytes        {} ({}), ratio {:.2}",
        r.wire_bytes,
        bytes(r.wire_bytes),
        ratio(r.logical_bytes, r.wire_bytes)
    );
    let _ = writeln!(
        s,
        "  digest            {} ({})",
        if r.digest_match { "match" } else { "MISMATCH" },
        r.digest
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_rendering() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(32 << 20), "32.00 MiB");
        assert_eq!(bytes(1 << 30), "1.00 GiB");
    }

    fn migration_report(converged: bool, stop_reason: &str) -> MigrationReport {
        MigrationReport {
            session_id: "00000000000000ab".into(),
            total_ms: 100.0,
            downtime_ms: 20.0,
            predicted_downtime_ms: 18.0,
            digest_ms: 0.5,
            iterations: 4,
            converged,
            stop_reason: stop_reason.into(),
            verification: dwcp::Verification::SentPages,
            memory_bytes: 8 << 20,
            logical_bytes: 16 << 20,
            wire_bytes: 1 << 20,
            logical_throughput_bps: 1e8,
            digest_match: true,
            digest: "00".repeat(16),
            streams: 4,
            peak_streams: 4,
            mode: dwcp_tcp::Mode::Datacenter,
            rtt_ms: 0.1,
            congestion: "cubic".into(),
            security: dwcp::SecurityMode::PreSharedKey,
            identity_announced: true,
            resilience: Default::default(),
            stream_telemetry: Vec::new(),
            encode: Default::default(),
            pool: Default::default(),
            passes: Vec::new(),
            latency: Default::default(),
            postcopy: None,
        }
    }

    /// The iterations line of a report: its stop reason and, when it did not converge, the cause.
    fn iterations_line(converged: bool, stop_reason: &str) -> String {
        migration_text(&migration_report(converged, stop_reason))
            .lines()
            .find(|l| l.trim_start().starts_with("iterations"))
            .expect("an iterations line")
            .to_string()
    }

    #[test]
    fn text_report_states_the_stop_reason() {
        let line = iterations_line(true, "converged");
        assert!(
            line.contains("4 (stop reason converged: the predicted downtime fit"),
            "{line}"
        );

        let line = iterations_line(false, "stalled");
        assert!(
            line.contains("did not converge, stop reason stalled: the dirty set stopped shrinking"),
            "{line}"
        );
        let line = iterations_line(false, "clean");
        assert!(
            line.contains("did not converge, stop reason clean: nothing was left to send"),
            "{line}"
        );
        let line = iterations_line(false, "iteration_limit");
        assert!(
            line.contains("did not converge, stop reason iteration_limit: stop-and-copy forced by the iteration limit"),
            "{line}"
        );
        // Only a real iteration limit blames it.
        for reason in ["stalled", "clean", "something_new"] {
            let line = iterations_line(false, reason);
            assert!(!line.contains("iteration limit"), "{line}");
            assert!(line.contains(&format!("stop reason {reason}")), "{line}");
        }
    }

    #[test]
    fn receive_json_has_migration_keys() {
        let r = ReceiveReport {
            session_id: "00000000000000ab".into(),
            security: dwcp::SecurityMode::PreSharedKey,
            identity: dwcp_core::messages::IdentityCheck::Announced,
            total_ms: 12.5,
            streams: 4,
            duplicate_chunks: 0,
            memory_bytes: 8 << 20,
            pages_applied: 2048,
            stale_pages_dropped: 0,
            logical_bytes: 8 << 20,
            wire_bytes: 1000,
            final_iteration: 1,
            digest_match: true,
            digest: "00".repeat(16),
            latency: Default::default(),
            postcopy: false,
        };
        let j = JsonReport::receive(&r).unwrap();
        for key in [
            "total_ms",
            "downtime_ms",
            "iterations",
            "logical_bytes",
            "wire_bytes",
            "digest_match",
        ] {
            assert!(j.0.contains_key(key), "{key} missing");
        }
        assert_eq!(j.0["iterations"], 2);
        assert_eq!(j.0["downtime_ms"], 0.0);
        assert!(receive_text(&r, "127.0.0.1:1").contains("8.00 MiB"));
    }
}
