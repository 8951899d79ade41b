//! What the machines report as a migration runs: per-pass figures, progress, resilience counters.
//! The `dwcp` crate re-exports these in its own reports.

use serde::Serialize;

/// One pre-copy iteration (or the final stop-and-copy pass).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct IterationReport {
    /// Iteration number (0 sends every page).
    pub iteration: u32,
    /// Pages sent.
    pub pages: u64,
    /// Chunk bytes put on the wire (frame headers excluded).
    pub wire_bytes: u64,
    /// Wall time of the pass.
    pub duration_ms: f64,
    /// Pages the guest dirtied while the pass ran (what the next pass must send).
    pub dirtied_pages: u64,
    /// Predicted downtime if the guest were paused now.
    pub predicted_downtime_ms: f64,
    /// How long this pass was predicted to take when it began, from the previous pass's cost per
    /// page (0 for the first pass, which has no previous one).
    pub predicted_duration_ms: f64,
    /// PBA's forecast of the link's goodput over the next second when the pass ended, bytes per
    /// second (0 before PBA had enough samples); the predicted downtime uses it.
    pub link_forecast_bps: f64,
    /// The downtime limit in force when the pass ended, milliseconds (the configured one, or
    /// stepped up towards the ceiling after pre-copy stalled).
    pub downtime_limit_ms: f64,
    /// The vCPU throttle asked for when the pass ended, percent (0: none).
    pub throttle_percent: u8,
}

/// Stream failures survived during a migration and what they cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ResilienceReport {
    /// Streams that failed and were removed.
    pub streams_lost: u64,
    /// Times every stream was down and the source reconnected.
    pub reconnects: u64,
    /// Chunks sent again because the stream carrying them failed before they were acknowledged.
    pub resent_chunks: u64,
    /// Wire bytes of those chunks.
    pub resent_bytes: u64,
}

/// What a migration is doing, as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum MigrationPhase {
    /// Opening and authenticating the first stream, agreeing on the session.
    Connecting,
    /// Pre-copy: the guest runs while passes send its memory.
    Precopy,
    /// The guest is paused; the final pass and the digest run.
    StopAndCopy,
    /// The digests are compared and the destination takes the VM over.
    Handover,
    /// The destination runs the VM.
    Completed,
    /// The migration ended without a handover (see the failure's reason).
    Failed,
}

impl MigrationPhase {
    /// The name used in events, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::Connecting => "connecting",
            MigrationPhase::Precopy => "precopy",
            MigrationPhase::StopAndCopy => "stop_and_copy",
            MigrationPhase::Handover => "handover",
            MigrationPhase::Completed => "completed",
            MigrationPhase::Failed => "failed",
        }
    }
}

/// A progress event, emitted after every batch of chunks.
///
/// `done_bytes` never decreases; `remaining_bytes` may grow (a guest that dirties faster than the
/// link sends). `percent` is defined on the first alone: see [`Progress::percent`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Progress {
    /// What the migration is doing.
    pub phase: MigrationPhase,
    /// Current pass.
    pub iteration: u32,
    /// Whether the guest is paused (stop-and-copy).
    pub paused: bool,
    /// Pages of this pass sent so far.
    pub pass_pages_sent: u64,
    /// Pages this pass will send.
    pub pass_pages_total: u64,
    /// Guest bytes sent over all passes; never decreases.
    pub logical_bytes: u64,
    /// Chunk bytes sent over all passes; never decreases.
    pub wire_bytes: u64,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Logical send rate of the current pass, bytes per second.
    pub rate_bps: f64,
    /// Guest bytes still to send as far as the source knows now: the rest of this pass, plus (in
    /// pre-copy) what the guest is estimated to have dirtied since the pass began, at the dirty rate
    /// of the last pass; at most the guest's memory.
    pub remaining_bytes: u64,
    /// How fast the guest dirtied memory during the last pre-copy pass, bytes per second (0 before
    /// the first pass ended).
    pub dirty_rate_bps: f64,
    /// Predicted seconds to the end of the transfer: in pre-copy `remaining / (rate - dirty rate)`,
    /// in stop-and-copy `remaining / rate`. `None` while the guest dirties at least as fast as the
    /// pass sends: pre-copy does not converge on its own.
    pub eta_s: Option<f64>,
    /// The downtime a pause now is predicted to cost: the remaining bytes at the current rate, the
    /// digest and the handover's round trips, milliseconds.
    pub predicted_downtime_ms: f64,
    /// Completion in percent, never decreasing. `logical_bytes` is the only quantity of a
    /// migration that never decreases but its final value is unknown until the end, so the
    /// percentage is the largest `logical_bytes / (logical_bytes + remaining_bytes)` seen so far:
    /// it stands still while the guest dirties faster than the link sends, and stays below 100
    /// until the handover.
    pub percent: f64,
    /// Data streams taking chunks now (the adaptive stream count as it changes, minus failed ones).
    pub streams: usize,
}
