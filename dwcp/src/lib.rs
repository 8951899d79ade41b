//! DWCP: live migration of a VM's memory between hosts over several authenticated TCP streams.
//!
//! The source side is a [`Migration`]: it connects `streams` TCP streams to a destination
//! [`Listener`], authenticates each with the pre-shared key, announces the memory layout, and then runs
//! pre-copy passes — every page first, then the pages the guest dirtied meanwhile — encoding chunks in
//! parallel (`dwcp-hde`) and spreading them over the streams (`dwcp-tcp`). When the predicted downtime
//! fits the limit it pauses the guest, sends the last dirty pages, waits until every chunk is
//! acknowledged, and both sides compare a whole-memory digest. Only if they match does the source
//! commit, the destination confirm, and the VM change hands; any failure before that resumes the source.
//!
//! On the destination, one thread per stream decodes chunks and applies pages; a page copy from an
//! older pass never overwrites a newer one (see `dwcp_core::apply`).
//!
//! A host that migrates many guests shares its uplink among them with [`HostUplink`] (a paused
//! guest's final pass first) and limits how many run at once with [`Admission`].
#![deny(missing_docs)]

mod admission;
pub mod config;
mod dest;
pub mod metrics;
mod pool;
pub mod report;
mod session;
mod source;
mod uplink;
// Adapters for rust-vmm's `vm-memory` guest memory: source, dirty log and sink (feature `vm-memory`).
#[cfg(feature = "vm-memory")]
pub mod vm_memory;

pub use admission::{Admission, AdmissionTicket};
pub use config::{MigrationConfig, PageClasses, ReceiverConfig, Verification};
pub use dest::{Incoming, Listener, ListenerLimits};
pub use dwcp_core::{Error, Result};
pub use dwcp_proto::source::ThrottleSteps;
pub use dwcp_tls::{Security, SecurityMode};
pub use metrics::MigrationMetrics;
pub use pool::ConnectionPool;
pub use report::{
    FailureReason, IterationReport, MigrationEvent, MigrationPhase, MigrationReport, PostcopyPages,
    Progress, ReceiveReport,
};
pub use source::{BandwidthHandle, Migration, TelemetryFeed, TelemetrySnapshot};
pub use uplink::{Deadline, HostUplink, UplinkShare};
