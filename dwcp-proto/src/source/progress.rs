//! Progress as an operator reads it: what is done, what remains, how fast the guest dirties, when
//! the transfer ends, what a pause would cost now, and a percentage that never runs backwards.

use std::time::{Duration, Instant};

use dwcp_core::memory::PAGE_SIZE;

use super::convergence::PassMeasurement;
use super::machine::{Phase, SourceMachine};
use crate::report::{MigrationPhase, Progress};

/// Below 100 % until the handover: a migration that has sent everything may still fail.
const MAX_PERCENT_BEFORE_HANDOVER: f64 = 99.9;

/// What progress reports carry from one pass to the next.
#[derive(Debug, Clone, Default)]
pub(super) struct ProgressMeter {
    /// Pages per second the guest dirtied during the last pre-copy pass.
    dirty_pages_per_sec: f64,
    /// The largest percentage reported so far.
    percent: f64,
}

impl ProgressMeter {
    /// Takes the dirty rate of a finished pre-copy pass.
    pub(super) fn pass_measured(&mut self, pass: &PassMeasurement) {
        let secs = pass.elapsed.max(Duration::from_millis(1)).as_secs_f64();
        self.dirty_pages_per_sec = pass.dirtied as f64 / secs;
    }

    /// The percentage for `done` bytes sent and `remaining` known to be left: never below one
    /// reported before.
    fn percent(&mut self, done: u64, remaining: u64) -> f64 {
        let total = done.saturating_add(remaining);
        let now = if total == 0 {
            0.0
        } else {
            100.0 * done as f64 / total as f64
        };
        self.percent = self.percent.max(now.min(MAX_PERCENT_BEFORE_HANDOVER));
        self.percent
    }
}

impl SourceMachine {
    /// Sets what pre-copy may do when it stops converging on its own (none by default); call it
    /// before the first event.
    pub fn set_convergence_aids(&mut self, aids: super::ConvergenceAids) {
        self.convergence.set_aids(aids);
    }

    /// The phase as operators see it; `None` once the machine has finished (its
    /// [`super::Outcome`] says how).
    pub fn migration_phase(&self) -> Option<MigrationPhase> {
        Some(match self.phase {
            Phase::Precopy | Phase::AwaitingDirty => MigrationPhase::Precopy,
            Phase::Pausing | Phase::FinalDirty | Phase::FinalPass | Phase::FinishSending => {
                MigrationPhase::StopAndCopy
            }
            Phase::AwaitingVerdict | Phase::RecordingHandover | Phase::AwaitingCommitAck => {
                MigrationPhase::Handover
            }
            Phase::Done => return None,
        })
    }

    /// Progress at `now`, after a batch was handed to the shell.
    pub(super) fn progress(&mut self, now: Instant) -> Progress {
        let page = PAGE_SIZE as u64;
        let memory_bytes = self.p.total_pages * page;
        let total = self.pass.pages.len();
        let elapsed = now.saturating_duration_since(self.pass.started);
        let secs = elapsed.as_secs_f64().max(1e-9);
        let rate_bps = (self.pass.requested * page) as f64 / secs;
        let paused = self.paused_at.is_some();
        let rest_of_pass = total.saturating_sub(self.pass.requested) * page;
        // While the guest runs, what it dirtied since this pass began is to be sent too; the dirty
        // log says how much only at the pass's end, so estimate it from the last pass's rate.
        let dirty_rate_bps = self.meter.dirty_pages_per_sec * page as f64;
        let dirtied_since = if paused {
            0
        } else {
            (dirty_rate_bps * secs).min(memory_bytes as f64) as u64
        };
        let remaining_bytes = rest_of_pass.saturating_add(dirtied_since).min(memory_bytes);
        let eta_s = if paused {
            (rate_bps > 0.0).then(|| remaining_bytes as f64 / rate_bps)
        } else {
            (rate_bps > dirty_rate_bps)
                .then(|| remaining_bytes as f64 / (rate_bps - dirty_rate_bps))
        };
        let sending = if rate_bps > 0.0 {
            remaining_bytes as f64 / rate_bps
        } else {
            0.0
        };
        let predicted_downtime_ms = (sending
            + self
                .convergence
                .pause_overhead(remaining_bytes > 0)
                .as_secs_f64())
            * 1e3;
        Progress {
            phase: self.migration_phase().unwrap_or(MigrationPhase::Precopy),
            iteration: self.pass.iteration,
            paused,
            pass_pages_sent: self.pass.requested,
            pass_pages_total: total,
            logical_bytes: self.logical_bytes,
            wire_bytes: self.chunk_bytes,
            memory_bytes,
            rate_bps,
            remaining_bytes,
            dirty_rate_bps,
            eta_s,
            predicted_downtime_ms,
            percent: self.meter.percent(self.logical_bytes, remaining_bytes),
            streams: self.live.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_percentage_never_falls_and_stays_below_100() {
        let mut m = ProgressMeter::default();
        assert_eq!(m.percent(0, 0), 0.0);
        assert_eq!(m.percent(50, 50), 50.0);
        // The guest dirtied more than the pass sent: the ratio falls, the percentage does not.
        assert_eq!(m.percent(60, 140), 50.0);
        assert_eq!(m.percent(150, 50), 75.0);
        assert_eq!(m.percent(1000, 0), MAX_PERCENT_BEFORE_HANDOVER);
    }

    #[test]
    fn the_dirty_rate_is_per_second_of_the_pass() {
        let mut m = ProgressMeter::default();
        m.pass_measured(&PassMeasurement {
            iteration: 0,
            pages: 1000,
            content_pages: 1000,
            elapsed: Duration::from_millis(500),
            dirtied: 300,
            wire_bytes: 0,
            link_forecast: None,
        });
        assert_eq!(m.dirty_pages_per_sec, 600.0);
    }
}
