//! What flows between a [`SourceMachine`](super::SourceMachine) and its shell: the parameters it
//! starts with, the events it is fed and the actions it asks for.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use dwcp_core::error::Error;
use dwcp_tcp::Mode;

use super::convergence::{ConvergencePolicy, LinkSample, StopReason};
use super::streams::StreamRange;
use crate::report::{IterationReport, Progress, ResilienceReport};

/// What a source machine is set up with.
#[derive(Debug, Clone)]
pub struct SourceParams {
    /// Guest pages.
    pub total_pages: u64,
    /// Pages per chunk (one data frame).
    pub pages_per_chunk: u64,
    /// Chunks encoded together in one batch.
    pub chunks_per_batch: u64,
    /// Pool bytes one encoded chunk may take until it is acknowledged.
    pub chunk_buffer_bytes: u64,
    /// When pre-copy ends.
    pub convergence: ConvergencePolicy,
    /// Streams at the start and at most.
    pub streams: StreamRange,
    /// The transport mode at the start.
    pub mode: Mode,
    /// The mode was configured, not detected (no bandwidth probe).
    pub mode_configured: bool,
    /// How long the destination may leave us waiting: for acknowledgements, the digest, the commit.
    pub io_timeout: Duration,
    /// Reconnection attempts when every stream is down.
    pub reconnect_attempts: u32,
    /// First wait between reconnection attempts.
    pub reconnect_backoff: Duration,
    /// How often the streams' kernel telemetry is sampled while data flows.
    pub telemetry_interval: Duration,
    /// Seed of the reconnection jitter.
    pub seed: u64,
    /// A cap on the bytes this migration puts on the wire per second (None: as fast as it goes).
    pub max_bandwidth: Option<f64>,
    /// Ask the shell to record the new owner ([`SourceAction::RecordHandover`]) once the digests
    /// match, and commit only if it was recorded.
    pub record_handover: bool,
    /// When pre-copy cannot converge within the ceiling, end it in post-copy instead of failing:
    /// the guest stays paused, both sides agree on a digest of what was sent, the VM changes
    /// owner, and the pages the destination does not have right are handed back
    /// ([`Completed::postcopy`]) for `dwcp-postcopy` to move.
    pub postcopy: bool,
}

/// The pages of a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassPages {
    /// Every page, `0..n`.
    All(u64),
    /// These pages, sorted and distinct.
    List(Arc<[u64]>),
}

impl PassPages {
    /// How many pages.
    pub fn len(&self) -> u64 {
        match self {
            PassPages::All(n) => *n,
            PassPages::List(l) => l.len() as u64,
        }
    }

    /// Whether the pass sends nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pass's pages `at..at+n` as a batch.
    pub(super) fn slice(&self, at: u64, n: u64) -> BatchPages {
        match self {
            PassPages::All(_) => BatchPages::Range(at..at + n),
            PassPages::List(l) => BatchPages::List(l[at as usize..(at + n) as usize].to_vec()),
        }
    }
}

/// The pages of one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchPages {
    /// Consecutive pages.
    Range(Range<u64>),
    /// These pages.
    List(Vec<u64>),
}

impl BatchPages {
    /// How many pages.
    pub fn len(&self) -> u64 {
        match self {
            BatchPages::Range(r) => r.end - r.start,
            BatchPages::List(l) => l.len() as u64,
        }
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the batch's page numbers to `out`.
    pub fn extend_into(&self, out: &mut Vec<u64>) {
        match self {
            BatchPages::Range(r) => out.extend(r.clone()),
            BatchPages::List(l) => out.extend_from_slice(l),
        }
    }
}

/// The shell's view of the data in flight, fed after anything that may change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flow {
    /// Chunks sent (or queued, or orphaned by a lost stream) and not yet acknowledged.
    pub outstanding_chunks: u64,
    /// Chunk bytes acknowledged over the session.
    pub acked_bytes: u64,
    /// Bytes the buffer pool can still hand out.
    pub pool_free_bytes: u64,
}

/// What happened, as the shell tells the machine.
#[derive(Debug)]
#[non_exhaustive]
pub enum SourceEvent {
    /// Time passed (a timer the machine asked for, or just a wake-up).
    Tick,
    /// The in-flight data changed.
    Flow(Flow),
    /// The batch asked for was encoded and queued on the streams.
    BatchSent {
        /// Data chunks (frames) it made.
        chunks: u64,
        /// Chunk bytes.
        wire_bytes: u64,
        /// Pages whose content went on the wire (not zero pages).
        content_pages: u64,
    },
    /// The streams' kernel telemetry, asked for by [`SourceAction::SampleTelemetry`].
    Telemetry(Vec<LinkSample>),
    /// A stream opened by [`SourceAction::OpenStream`] is authenticated and carries data.
    StreamJoined {
        /// Its index.
        index: u16,
    },
    /// A stream could not be opened.
    JoinFailed {
        /// Its index.
        index: u16,
        /// Why.
        error: Error,
    },
    /// Streams failed and were removed; their unacknowledged chunks wait to be re-sent.
    StreamsLost {
        /// The failed streams.
        lost: Vec<u16>,
    },
    /// The orphaned chunks asked for by [`SourceAction::ResendOrphans`] were queued again.
    Resent {
        /// Chunks queued again.
        chunks: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// A reconnection attempt succeeded: stream `index` belongs to the session.
    Reconnected {
        /// The new stream.
        index: u16,
    },
    /// A reconnection attempt failed.
    ReconnectFailed(Error),
    /// The pages the guest dirtied since the last [`SourceAction::TakeDirty`] (in any order).
    Dirty(Vec<u64>),
    /// The guest is paused.
    Paused,
    /// Finish went out on stream `lane`, which carries the rest of the handover.
    FinishSent {
        /// The stream.
        lane: u16,
    },
    /// The source's digest.
    DigestComputed {
        /// The digest.
        digest: u128,
        /// How long it took.
        elapsed: Duration,
    },
    /// The destination's digest.
    Verdict(u128),
    /// What recording the change of owner decided.
    HandoverRecorded(dwcp_core::HandoverDecision),
    /// The destination took over the VM.
    CommitAck,
    /// The destination reported an error or broke the protocol.
    PeerFailed(Error),
    /// Something the shell did for the machine failed here (a socket, the encoder, the hypervisor).
    LocalFailed(Error),
    /// The operator cancelled the migration: it fails with [`Error::Cancelled`], the guest running
    /// (resumed if it was paused, or the pause withdrawn if it was not carried out yet), and
    /// nothing queued before the cancel that would start new work is carried out. A cancel after
    /// the point of no return (the commit sent, or the new owner recorded while the cancel waited
    /// for the record's answer) is refused: the destination may run the VM already, so the
    /// migration goes on to its end. After the end it does nothing.
    Cancel,
    /// The hypervisor cannot throttle the guest: pre-copy turns to its next aid.
    ThrottleRefused,
    /// The operator changed the bandwidth cap (bytes/s; None lifts it). An invalid rate is ignored
    /// with a warning: the shell validates what it is given.
    SetMaxBandwidth(Option<f64>),
}

/// What the shell must do.
#[derive(Debug)]
#[non_exhaustive]
pub enum SourceAction {
    /// Start the dirty log (before the first pass).
    StartDirtyLog,
    /// Open and authenticate stream `index` in the background; answer with
    /// [`SourceEvent::StreamJoined`] or [`SourceEvent::JoinFailed`].
    OpenStream {
        /// The new stream's index.
        index: u16,
    },
    /// Stop scheduling chunks on stream `index`; close it once its chunks are acknowledged.
    RetireStream {
        /// The stream.
        index: u16,
    },
    /// Sample the streams' kernel telemetry; answer with [`SourceEvent::Telemetry`].
    SampleTelemetry,
    /// Tell the encoder the link's rate (its codec choice depends on it).
    SetCodecHint {
        /// Bytes per second.
        bytes_per_sec: u64,
    },
    /// A pass begins (the encoder may refer only to pages of earlier, acknowledged passes).
    BeginPass {
        /// Pass number.
        iteration: u32,
        /// Its pages.
        pages: PassPages,
    },
    /// Encode these pages into chunks and queue them on the streams; answer with
    /// [`SourceEvent::BatchSent`] and a fresh [`SourceEvent::Flow`].
    SendBatch {
        /// Pass number.
        iteration: u32,
        /// The pages.
        pages: BatchPages,
        /// First chunk id of the batch (ids are session-wide and consecutive).
        first_chunk: u64,
    },
    /// Every chunk of the pass is acknowledged: later passes may encode against it.
    EndPass {
        /// Pass number.
        iteration: u32,
    },
    /// A pre-copy pass ended.
    PassDone(IterationReport),
    /// How far the migration got.
    Progress(Progress),
    /// Hand over the dirty pages; answer with [`SourceEvent::Dirty`].
    TakeDirty,
    /// Re-send the chunks of lost streams on the live ones; answer with [`SourceEvent::Resent`].
    ResendOrphans,
    /// Every stream is down: connect stream `index` to the session now; answer with
    /// [`SourceEvent::Reconnected`] or [`SourceEvent::ReconnectFailed`].
    Reconnect {
        /// The new stream's index.
        index: u16,
        /// Attempt number, from 1.
        attempt: u32,
    },
    /// Throttle the guest's vCPUs `percent` % (pre-copy stalled); answer with
    /// [`SourceEvent::ThrottleRefused`] if the hypervisor cannot. The shell lifts the throttle if
    /// the migration fails.
    ThrottleGuest {
        /// Percent of the time the vCPUs are held back.
        percent: u8,
    },
    /// Pause the guest; answer with [`SourceEvent::Paused`].
    PauseGuest,
    /// Send Finish on one stream; answer with [`SourceEvent::FinishSent`].
    SendFinish {
        /// The stop-and-copy pass's number.
        final_iteration: u32,
        /// Data frames sent in the session.
        data_frames: u64,
    },
    /// Compute the source digest; answer with [`SourceEvent::DigestComputed`].
    ComputeDigest,
    /// Record the change of owner (the guest is paused, the digests match); answer with
    /// [`SourceEvent::HandoverRecorded`].
    RecordHandover,
    /// Send Commit with `digest` on the stream that carried Finish.
    SendCommit {
        /// The agreed digest.
        digest: u128,
    },
    /// Resume the paused guest: the migration failed before the commit.
    ResumeGuest,
    /// Pre-copy ends in post-copy: send PostcopySwitch (Finish's payload) on the control stream;
    /// answer with [`SourceEvent::FinishSent`]. The handover goes on as after Finish (digest with
    /// the pages as last sent, Verdict, the record, Commit, CommitAck), and the pages left to
    /// post-copy are in [`Completed::postcopy`].
    SwitchToPostcopy {
        /// The last pass.
        final_iteration: u32,
        /// Data frames sent in the whole migration.
        data_frames: u64,
    },
    /// The migration ended; no action follows.
    Finished(Outcome),
}

/// How a migration ended.
pub type Outcome = Result<Completed, Failure>;

/// A migration that handed the VM over.
#[derive(Debug, Clone)]
pub struct Completed {
    /// Why pre-copy ended.
    pub stop_reason: StopReason,
    /// Every pass, the stop-and-copy pass last.
    pub passes: Vec<IterationReport>,
    /// From the pause to the destination's confirmation.
    pub downtime: Duration,
    /// What the downtime was predicted to be when pre-copy ended.
    pub predicted_downtime: Duration,
    /// The agreed digest.
    pub digest: u128,
    /// Time the source digest took.
    pub digest_elapsed: Duration,
    /// Stream failures survived.
    pub resilience: ResilienceReport,
    /// Most streams at once.
    pub peak_streams: usize,
    /// The transport mode at the end.
    pub mode: Mode,
    /// Guest bytes covered by all passes.
    pub logical_bytes: u64,
    /// Chunk bytes sent.
    pub chunk_bytes: u64,
    /// Data frames sent.
    pub data_frames: u64,
    /// Set when pre-copy ended in post-copy: the guest is paused, the destination owns the VM,
    /// and these pages are still to be moved before the source may let its memory go.
    pub postcopy: Option<PostcopyHandoff>,
}

/// What pre-copy leaves to post-copy.
#[derive(Debug, Clone)]
pub struct PostcopyHandoff {
    /// The pages the destination does not have right: dirtied since they were last sent, in
    /// ascending order.
    pub pages: Arc<[u64]>,
    /// Why pre-copy could not converge (the error it would have failed with).
    pub why: String,
}

/// A migration that failed; the guest runs on the source unless the error is
/// [`Error::HandoverUnconfirmed`].
#[derive(Debug)]
pub struct Failure {
    /// Why.
    pub error: Error,
    /// The destination should be told why (it did not cause the failure, and can still hear us).
    pub tell_peer: bool,
}
