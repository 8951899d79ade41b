use std::time::Duration;

use crate::{NodeId, Ownership, VmId};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AcpError {
    /// The VM is not in the registry.
    #[error("VM {vm} is not registered")]
    NotRegistered {
        /// The VM asked for.
        vm: VmId,
    },
    /// The VM is already in the registry.
    #[error("VM {vm} is already registered ({current})")]
    AlreadyRegistered {
        /// The VM asked for.
        vm: VmId,
        /// Its record.
        current: Ownership,
    },
    /// The caller's view of the record is out of date or wrong (another owner, another fence, or
    /// a handoff in a different state): nothing was changed.
    #[error("refused: {expected}, but the registry has {current}")]
    Conflict {
        /// What the caller assumed, in words.
        expected: String,
        /// The record as it is.
        current: Ownership,
    },
    /// A node id outside the configuration or 0.
    #[error("node {0} is not a member of the cluster")]
    UnknownNode(NodeId),
    /// No leader or no quorum can be reached; a change may or may not have committed.
    #[error("the registry is unavailable: {0}")]
    Unavailable(String),
    /// The operation did not finish in time; a change may or may not have committed.
    #[error("the registry did not answer within {0:?}")]
    Timeout(Duration),
    /// Bad input from the caller or from a peer.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The local log or snapshot store failed.
    #[error("registry storage: {0}")]
    Storage(String),
    /// The backend failed in a way not covered above.
    #[error("registry backend: {0}")]
    Backend(String),
}

impl AcpError {
    /// Whether a change that failed this way may still have committed.
    pub fn is_indeterminate(&self) -> bool {
        matches!(
            self,
            Self::Unavailable(_) | Self::Timeout(_) | Self::Backend(_)
        )
    }
}
