//! AMST over TCP: the multi-stream transport of DWCP.
//!
//! A session runs over several TCP streams to the same peer. [`profile`] opens and tunes each socket
//! (Nagle off, large buffers, BBR where the kernel has it); [`lanes::Lanes`] gives each stream a writer
//! thread fed by a bounded queue and sends every data frame to the stream with the fewest queued
//! bytes, so one slow stream does not hold the others back and a slow link bounds the sender's memory.
//! Frames and the handshake come from `dwcp-core`; the engine in `dwcp` reads acknowledgements.
#![deny(missing_docs)]

pub mod lanes;
pub mod profile;

pub use lanes::{Lanes, Outgoing, Payload};
pub use profile::{AppliedProfile, SocketProfile, apply, connect, listen};
