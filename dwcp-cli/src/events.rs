//! `--events FILE`: every [`MigrationEvent`] as one JSON object per line (NDJSON), with the
//! milliseconds since the command started in `t_ms`, flushed line by line so that a supervisor
//! tailing the file sees each event as it happens.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use dwcp::MigrationEvent;

use crate::progress::ProgressView;

/// Where events go: a file, or standard output for `-`.
pub struct EventLog {
    out: Mutex<Box<dyn Write + Send>>,
    start: Instant,
}

impl EventLog {
    /// Opens `path` (`-`: standard output, refused when the report goes there too).
    pub fn open(path: &Path, report_on_stdout: bool) -> anyhow::Result<Self> {
        let out: Box<dyn Write + Send> = if path == Path::new("-") {
            anyhow::ensure!(
                !report_on_stdout,
                "--events - and --json both write to standard output: give --events a file"
            );
            Box::new(std::io::stdout())
        } else {
            let file = File::create(path)
                .with_context(|| format!("creating the event log {}", path.display()))?;
            Box::new(BufWriter::new(file))
        };
        Ok(Self {
            out: Mutex::new(out),
            start: Instant::now(),
        })
    }

    /// The log `--events` asked for, if any.
    pub fn open_if_asked(
        path: Option<&Path>,
        report_on_stdout: bool,
    ) -> anyhow::Result<Option<Self>> {
        path.map(|p| Self::open(p, report_on_stdout)).transpose()
    }

    /// Writes one event. A failed write is logged, never fatal: the migration matters more than
    /// its log.
    pub fn record(&self, event: &MigrationEvent) {
        let line = match serde_json::to_value(event) {
            Ok(serde_json::Value::Object(mut fields)) => {
                let t_ms = self.start.elapsed().as_secs_f64() * 1e3;
                fields.insert("t_ms".into(), serde_json::json!((t_ms * 1e3).round() / 1e3));
                serde_json::Value::Object(fields).to_string()
            }
            Ok(other) => other.to_string(),
            Err(e) => {
                tracing::warn!(error = %e, "an event could not be serialised");
                return;
            }
        };
        let mut out = self
            .out
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            tracing::warn!(error = %e, "writing the event log failed");
        }
    }
}

/// What a migrating command does with each event: the progress bar, and the event log if any.
pub fn observe(event: &MigrationEvent, progress: &ProgressView, log: Option<&EventLog>) {
    if let MigrationEvent::Progress(p) = event {
        progress.update(p);
    }
    if let Some(log) = log {
        log.record(event);
    }
}

/// Cancels the migration behind `cancel` on the first SIGINT or SIGTERM (the guest keeps running
/// on the source); a second one ends the process at once.
pub fn cancel_on_signals(cancel: &Arc<AtomicBool>) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for signal in [SIGINT, SIGTERM] {
        // Registered first, so it sees the flag as the first signal left it.
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(cancel))
            .context("installing a signal handler")?;
        signal_hook::flag::register(signal, Arc::clone(cancel))
            .context("installing a signal handler")?;
    }
    Ok(())
}
