//! What a migration reports: per-iteration figures, totals, downtime and the digest verdict.

use serde::Serialize;

use dwcp_core::pool::PoolStats;
use dwcp_hde::EncodeStats;

pub use dwcp_core::error::FailureReason;
pub use dwcp_core::latency::{LatencyOp, LatencyReport, OpLatency};
pub use dwcp_proto::report::{IterationReport, MigrationPhase, Progress, ResilienceReport};

/// What a running migration tells its observer ([`crate::Migration::on_event`]), in order: the
/// phase it enters, progress after every batch, each finished pass, and how it ended. Serialised
/// (`serde`) with an `event` field naming the variant: one line each of `dwcp send --events`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum MigrationEvent {
    /// The migration entered `phase`.
    Phase {
        /// The phase entered.
        phase: MigrationPhase,
    },
    /// A batch was sent.
    Progress(Progress),
    /// A pre-copy pass ended (the final pass is in the report).
    Pass(IterationReport),
    /// The destination runs the VM.
    Completed {
        /// Wall time from connecting to the confirmed handover, milliseconds.
        total_ms: f64,
        /// Guest pause, milliseconds.
        downtime_ms: f64,
        /// Guest bytes sent over all passes.
        logical_bytes: u64,
        /// Bytes written to the sockets.
        wire_bytes: u64,
        /// Passes made, the final one included.
        iterations: u32,
        /// Always 100: the percentage of the last progress event, completed.
        percent: f64,
    },
    /// The migration ended without a handover.
    Failed {
        /// The failure's category.
        reason: FailureReason,
        /// The phase it failed in.
        phase: MigrationPhase,
        /// What went wrong, for a person.
        message: String,
        /// Whether the guest runs on the source again (false only if the handover may have
        /// happened: [`FailureReason::HandoverUnconfirmed`]).
        source_running: bool,
    },
}

/// Result of a completed migration, as seen by the source.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    /// Session id (shared with the destination's logs).
    pub session_id: String,
    /// Wall time from connecting to the confirmed handover.
    pub total_ms: f64,
    /// Guest pause, from pause to the destination's confirmation.
    pub downtime_ms: f64,
    /// The downtime predicted when pre-copy ended (each pass also carries its predicted and measured
    /// duration).
    pub predicted_downtime_ms: f64,
    /// Part of the downtime spent computing the source digest.
    pub digest_ms: f64,
    /// Passes made, the stop-and-copy pass included.
    pub iterations: u32,
    /// Whether stop-and-copy started because the predicted downtime was within the limit.
    pub converged: bool,
    /// Why pre-copy ended: `converged`, `clean` (nothing left to send, the fixed pause cost alone is above
    /// the limit), `stalled` (the dirty set stopped shrinking) or `iteration_limit`.
    pub stop_reason: String,
    /// How the source digest was computed.
    pub verification: crate::config::Verification,
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    /// Guest bytes covered by all passes (pages sent times page size).
    pub logical_bytes: u64,
    /// Bytes written to the sockets, frame headers included.
    pub wire_bytes: u64,
    /// memory_bytes / total time, in bytes per second.
    pub logical_throughput_bps: f64,
    /// Whether the destination's digest equals the source's.
    pub digest_match: bool,
    /// The whole-memory digest, hex.
    pub digest: String,
    /// Streams open at the end.
    pub streams: usize,
    /// Most streams open at once.
    pub peak_streams: usize,
    /// Transport mode the session ran in.
    pub mode: dwcp_tcp::Mode,
    /// Round trip of the path when the session opened, milliseconds (the kernel's minimum RTT of the
    /// first stream for TCP, else half the handshake's two round trips).
    pub rtt_ms: f64,
    /// Congestion control the streams got.
    pub congestion: String,
    /// How the streams were protected: `tls-certificates`, `tls-psk` or `insecure-plaintext`.
    pub security: crate::SecurityMode,
    /// Whether the VM's identity (UUID if configured, layout fingerprint) went to the destination:
    /// false when it speaks protocol version 1, which cannot check it.
    pub identity_announced: bool,
    /// What stream failures cost.
    pub resilience: ResilienceReport,
    /// The kernel's last view of each stream still open at the end (TCP only).
    pub stream_telemetry: Vec<StreamTelemetry>,
    /// Encoder counters.
    pub encode: EncodeStats,
    /// Buffer pool counters.
    pub pool: PoolStats,
    /// Each pass.
    pub passes: Vec<IterationReport>,
    /// Latency of each step: stream setup, encode (per batch), send (per chunk write), ack (chunk
    /// written to acknowledged), digest; P50/P95/P99/max in microseconds.
    pub latency: LatencyReport,
    /// Set when pre-copy ended in post-copy ([`crate::MigrationConfig::postcopy`]): the guest is
    /// paused, the destination owns the VM (recorded and committed as after any handover), and
    /// these pages are still to be moved by post-copy from this memory.
    pub postcopy: Option<PostcopyPages>,
}

/// What pre-copy left to post-copy.
#[derive(Debug, Clone, Serialize)]
pub struct PostcopyPages {
    /// How many pages.
    pub count: u64,
    /// Why pre-copy could not converge.
    pub why: String,
    /// The pages, ascending (not serialised: there may be millions).
    #[serde(skip)]
    pub pages: std::sync::Arc<[u64]>,
}

/// One `TCP_INFO` sample of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StreamTelemetry {
    /// Stream index.
    pub stream: u16,
    /// The sample.
    pub tcp: dwcp_tcp::TcpSample,
}

/// Result of a completed migration, as seen by the destination.
#[derive(Debug, Clone, Serialize)]
pub struct ReceiveReport {
    /// Session id.
    pub session_id: String,
    /// How the streams were protected.
    pub security: crate::SecurityMode,
    /// How far the source's VM identity was checked before any page was applied: `not_announced`
    /// (the source speaks protocol version 1), `announced` (nothing was required of it) or
    /// `verified` (it matched what this destination required).
    pub identity: dwcp_core::messages::IdentityCheck,
    /// Wall time from accepting the session to the handover.
    pub total_ms: f64,
    /// Streams the source opened over the whole session (re-connections included).
    pub streams: usize,
    /// Data frames that carried a chunk already applied (re-sent after a stream failure).
    pub duplicate_chunks: u64,
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    /// Pages written to the sink.
    pub pages_applied: u64,
    /// Older copies of pages dropped because a newer one was already applied.
    pub stale_pages_dropped: u64,
    /// Guest bytes covered by all received pages.
    pub logical_bytes: u64,
    /// Bytes read from the sockets, frame headers included.
    pub wire_bytes: u64,
    /// Last iteration of the source.
    pub final_iteration: u32,
    /// Whether the digests matched (always true in a returned report: a mismatch is an error).
    /// After a switch to post-copy they cover the pages as last sent.
    pub digest_match: bool,
    /// The whole-memory digest, hex.
    pub digest: String,
    /// Latency of decoding and of applying each chunk, P50/P95/P99/max in microseconds.
    pub latency: LatencyReport,
    /// The source ended pre-copy in post-copy ([`crate::MigrationConfig::postcopy`]): every page
    /// it sent is applied and verified, the VM is ours, and the pages dirtied since are to come
    /// through a `dwcp_postcopy::PostcopyListener` into the same memory before it may run.
    pub postcopy: bool,
}
