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

/// A progress event, emitted after every batch of chunks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Progress {
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
}
