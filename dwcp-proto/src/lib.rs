//! The DWCP migration protocol as sans-IO state machines, in the manner of `quinn-proto`.
//!
//! A migration's decisions live here; its I/O does not. [`source::SourceMachine`] decides which pages
//! each pass sends, when the in-flight budget allows another batch, how many streams run, how a lost
//! stream is recovered, when pre-copy has converged, and the stop-and-copy and handover sequence.
//! [`dest::DestMachine`] decides which joining streams a session takes, when a session without
//! streams has waited long enough, and the Finish → Verdict → Commit → CommitAck sequence;
//! [`dest::AckPolicy`] decides when a stream's applied frames are acknowledged.
//!
//! Data flows through them as events in and actions out. The shell (the `dwcp` crate, or a test's
//! in-memory pair) feeds each event with the time it happened — `handle(now, event)` — then drains
//! [`source::SourceMachine::poll_action`] and carries every action out: encode and send a batch,
//! open or retire a stream, pause or resume the guest, send a control frame, report progress. It
//! waits no longer than [`source::SourceMachine::poll_timeout`] before feeding [`source::SourceEvent::Tick`].
//! Nothing here opens a socket, starts a thread or reads a clock, so every schedule of events —
//! reordered, lost, late — can be replayed deterministically in a test with virtual time.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod dest;
pub mod postcopy;
pub mod report;
pub mod source;

pub use report::{IterationReport, MigrationPhase, Progress, ResilienceReport};
