//! Shared vocabulary of DWCP, the VM live-migration transport.
//!
//! Data flows through these pieces: a [`memory::MemorySource`] and its [`memory::DirtyLog`] on the source
//! yield pages; `dwcp-hde` encodes them into chunks; each chunk travels as a [`frame`] on one of several
//! streams authenticated by the [`handshake`]; on the destination, [`apply::PageVersions`] decides which
//! copy of a page wins before it reaches the [`memory::MemorySink`]; both sides finally compare a
//! [`digest::memory_digest`]. Buffers between stages come from a [`pool::BufferPool`], whose byte
//! budget bounds memory use. Nothing here opens a socket: transports live in `dwcp-tcp`.
#![deny(missing_docs)]

pub mod apply;
pub mod digest;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod hash;
pub mod latency;
pub mod ledger;
pub mod memory;
pub mod messages;
pub mod pool;
pub mod sim;
pub mod transport;

pub use error::{ChunkError, Error, ErrorCode, FailureReason, FrameError, HandshakeError, Result};
pub use memory::{
    DirtyLog, GuestRam, HandoverDecision, MemoryLayout, MemorySink, MemorySource, PAGE_SIZE,
    Region, VmControl,
};
