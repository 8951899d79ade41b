//! The source side of a migration as a state machine: pre-copy passes, the in-flight budget, stream
//! count and recovery, convergence, stop-and-copy and the handover.
//!
//! ```text
//!  Precopy(pass n) ──all acked──▶ AwaitingDirty ──converged?──no──▶ Precopy(pass n+1)
//!                                       │ yes
//!                                       ▼
//!  Pausing ──Paused──▶ FinalDirty ──▶ FinalPass ──all acked──▶ FinishSending ──▶ AwaitingVerdict
//!                                                                                    │ digests equal
//!                                                                                    ▼
//!                                                           Done ◀──CommitAck── AwaitingCommitAck
//! ```
//!
//! Any failure before the commit is sent ends in `Done` with the guest running (a [`SourceAction::ResumeGuest`]
//! first if it was paused); a failure after it is [`dwcp_core::Error::HandoverUnconfirmed`], and the guest stays
//! paused, since the destination may already run it. Stream losses and reconnections happen inside
//! the sending phases without leaving them.

mod cap;
mod convergence;
mod datapath;
mod events;
mod machine;
mod progress;
mod recovery;
mod streams;

pub use convergence::{
    Convergence, ConvergenceAids, ConvergencePolicy, LinkEstimate, LinkSample, PassDecision,
    PassMeasurement, StopReason, ThrottleSteps,
};
pub use events::{
    BatchPages, Completed, Failure, Flow, Outcome, PassPages, PostcopyHandoff, SourceAction,
    SourceEvent, SourceParams,
};
pub use machine::SourceMachine;
pub use streams::{Backoff, MAX_BACKOFF, StreamChange, StreamCount, StreamRange, stream_range};
