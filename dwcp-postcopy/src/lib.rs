//! Post-copy for DWCP: the destination runs the VM before all of its memory has arrived, and each
//! page the guest touches that is still missing is fetched from the source on demand.
//!
//! Data flow. The source pauses the guest and calls [`send`] with the set of pages the destination
//! does not have right (after pre-copy: the pages dirtied since they were last sent; without
//! pre-copy: every page). The destination's [`PostcopyListener::accept`] receives that set, drops
//! those pages from its [`PostcopyMemory`] and arms the memory with userfaultfd; from then on the
//! destination may run the VM. A touch of a missing page blocks the touching thread and becomes a
//! fault event: this crate's fault thread asks the source for the page on the urgent stream, the
//! source answers at once from its paused memory, and the page is placed with `UFFDIO_COPY`, which
//! wakes the thread. Meanwhile the source pushes the rest of the set in page order on a second
//! stream, so that the pages nobody touches arrive too. The first copy of a page to arrive is
//! placed; a later one is dropped. When every page is there the destination reports a digest of
//! what it placed, the source compares it with its own, and both ends finish.
//!
//! A lost connection does not lose the VM: the guest's touches of missing pages wait, the source
//! reconnects to the same session, the destination tells it which pages it still lacks and asks
//! again for the ones its guest waits for, and post-copy goes on (QEMU's post-copy recovery).
//! Only when the source cannot come back within [`PostcopyConfig::recovery_timeout`] does the
//! migration fail; the destination's memory then stays armed, so a touch of a missing page keeps
//! blocking instead of reading zeros.
//!
//! The decisions are the sans-IO machines of `dwcp_proto::postcopy`; this crate is their I/O shell.
//! Both streams are secured like the engine's (TLS 1.3 by default, `dwcp_tls::Security`) and
//! authenticated with the DWCP stream handshake. Linux only (userfaultfd).
#![deny(missing_docs)]

mod conn;
mod dest;
mod memory;
mod source;

use std::time::Duration;

pub use dest::{DestinationReport, FaultLatency, PostcopyListener, PostcopyReceiver};
pub use dwcp_proto::postcopy::PageSet;
pub use memory::PostcopyMemory;
pub use source::{SourceReport, send};

/// Time limits of both ends of post-copy.
#[derive(Debug, Clone)]
pub struct PostcopyConfig {
    /// Limit on opening one stream, TLS and stream handshake included.
    pub connect_timeout: Duration,
    /// A stream on which nothing arrives for this long is lost (the destination sends a keepalive
    /// every [`keepalive`](Self::keepalive), so a live but idle stream never is).
    pub io_timeout: Duration,
    /// How long a lost connection is retried (source) or waited for (destination) before the
    /// migration fails.
    pub recovery_timeout: Duration,
    /// How often the destination says it is alive when it has nothing else to send.
    pub keepalive: Duration,
}

impl Default for PostcopyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
            recovery_timeout: Duration::from_secs(60),
            keepalive: Duration::from_millis(500),
        }
    }
}

/// Whether a failure may be cured by a new connection (a lost or silent stream) rather than being
/// a refusal, a protocol error or a local fault that would only repeat.
pub(crate) fn is_recoverable(e: &dwcp_core::Error) -> bool {
    matches!(
        e,
        dwcp_core::Error::Io { .. } | dwcp_core::Error::Timeout(_)
    )
}
