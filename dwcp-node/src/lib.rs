//! The DWCP host agent (`dwcp node`): one per host, it ties the cluster's parts to the migration
//! engine.
//!
//! An [`Agent`] holds a handle to the replicated registry (ACP, `dwcp-acp`), runs the guests this
//! host owns, and answers authenticated control requests ([`protocol`], inside TLS 1.3 by default)
//! from the `dwcp cluster` commands and from other agents. One [`dwcp_tls::Security`] secures all
//! of a node's connections: registry RPC, control requests and migration streams.
//!
//! A migration flows like this: the owner's agent checks the registry, picks a destination (the
//! operator's, or placement's from the gossiped view when asked for `auto`), records the
//! beginning of the handoff, asks the destination's agent to prepare (the destination checks the
//! registry itself, then listens on a fresh port), and runs the engine. With the guest paused and
//! both digests equal, the engine asks this agent to record the new owner
//! ([`dwcp_core::VmControl::record_handover`]); only then does it tell the destination to take
//! over, and the destination runs the guest only once the registry names it. A refused record
//! resumes the source; an unknown one leaves both stopped until the registry answers, so there is
//! never a moment with two hosts running one VM.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod agent;
#[doc(hidden)]
pub mod fuzzing;
mod handover;
mod node;
pub mod protocol;

pub use agent::{Agent, AgentConfig, vm_uuid};
pub use node::{BackendChoice, ClusterFile, NodeEntry, NodeOptions, RunningNode};
pub use protocol::{Request, Target, call, call_with};

use dwcp_acp::AcpError;

/// Why an agent operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The registry refused or could not answer.
    #[error("cluster registry: {0}")]
    Registry(#[from] AcpError),
    /// The migration engine failed.
    #[error("migration: {0}")]
    Engine(#[from] dwcp_core::Error),
    /// The request cannot be carried out here (with the reason).
    #[error("{0}")]
    Refused(String),
    /// A control connection failed or carried malformed data.
    #[error("control connection: {0}")]
    Control(String),
    /// A control request's MAC did not verify: the client does not hold the cluster key.
    #[error("control request not authenticated (wrong cluster key?)")]
    Unauthenticated,
    /// A control connection's security layer failed: the TLS handshake (a peer in another mode, a
    /// certificate of another CA, no handshake in time) or the session's key.
    #[error("securing the control connection: {0}")]
    Security(dwcp_core::Error),
    /// Another agent answered with an error.
    #[error("remote agent: {0}")]
    Remote(String),
}
