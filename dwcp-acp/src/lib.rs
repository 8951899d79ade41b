//! ACP, the consensus side of DWCP: one replicated registry that says which node owns which VM and
//! which nodes make up the cluster.
//!
//! Every host's agent (`dwcp node`) talks to the registry through one trait, [`Registry`], with two
//! backends that pass the same test suite ([`conformance`]):
//!
//! - [`raft`]: an embedded openraft cluster (the default, no external service), its log and
//!   snapshots on disk in redb, its RPCs over authenticated TCP between the agents;
//! - [`etcd`]: an existing etcd cluster, ownership records as keys changed only by transactions.
//!
//! Data flows one way: a caller asks for a change as a [`Command`]; the backend orders it
//! (a raft log entry or an etcd transaction) and applies it to a [`RegistryState`]; the answer is
//! the record as the change left it. Each change of a VM's record gets a fresh [`Fence`] (the raft
//! log index or etcd revision that made it), strictly increasing, and every later change must name
//! the fence it saw: a stale owner, one that missed a handoff, is refused with
//! [`AcpError::Conflict`] and cannot act.
//!
//! A migration's ownership handoff is three commands: [`Registry::begin_handoff`] marks the VM
//! as leaving for a destination (no second migration of it can start), the engine copies its
//! memory, and after both digests match [`Registry::commit_handoff`] makes the destination the
//! owner; the source resumes if that commit is refused ([`Registry::abort_handoff`]), the
//! destination only after it. [`checker`] verifies recorded histories of these operations under
//! faults: never two owners, no acknowledged change lost.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod checker;
pub mod conformance;
mod error;
pub mod etcd;
#[doc(hidden)]
pub mod fuzzing;
mod memory;
pub mod raft;
mod state;

pub use error::AcpError;
pub use memory::MemoryRegistry;
pub use state::{Command, CommandOutcome, RegistryState};

use std::fmt;

use serde::{Deserialize, Serialize};

/// A node of the cluster, as numbered in its configuration (never 0).
pub type NodeId = u64;

/// Longest VM identifier accepted, in bytes.
pub const MAX_VM_ID_LEN: usize = 128;

/// A VM's name in the registry: 1 to [`MAX_VM_ID_LEN`] bytes of ASCII letters, digits and `._:-`
/// (a UUID fits), so that it is a safe etcd key and file name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmId(String);

impl VmId {
    /// Checks and wraps a VM's name.
    pub fn new(name: impl Into<String>) -> Result<Self, AcpError> {
        let name = name.into();
        let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
        if name.is_empty() || name.len() > MAX_VM_ID_LEN || !name.chars().all(valid_char) {
            return Err(AcpError::Invalid(format!(
                "VM id {name:?}: use 1 to {MAX_VM_ID_LEN} ASCII letters, digits or . _ : -"
            )));
        }
        Ok(Self(name))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VmId {
    type Error = AcpError;
    fn try_from(name: String) -> Result<Self, AcpError> {
        Self::new(name)
    }
}

impl From<VmId> for String {
    fn from(id: VmId) -> String {
        id.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The version of one VM's record: the raft log index or etcd revision of the change that made
/// it. Strictly increasing over the record's life, so whoever holds an older fence has been
/// superseded.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Fence(pub u64);

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Whether a VM stays with its owner or is being handed to another node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Holding {
    /// The owner runs it; no migration is in progress.
    Owned,
    /// A migration to `to` has begun; the owner still runs it until the handoff commits.
    HandingOver {
        /// The destination node.
        to: NodeId,
    },
}

/// One VM's record: who owns it, whether it is leaving, and the fence of its last change.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ownership {
    /// The VM.
    pub vm: VmId,
    /// The only node allowed to run it.
    pub owner: NodeId,
    /// Whether a handoff is in progress.
    pub holding: Holding,
    /// The version a caller must name to change this record.
    pub fence: Fence,
}

impl fmt::Display for Ownership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.holding {
            Holding::Owned => write!(
                f,
                "{} owned by node {} at {}",
                self.vm, self.owner, self.fence
            ),
            Holding::HandingOver { to } => write!(
                f,
                "{} owned by node {}, handing over to node {}, at {}",
                self.vm, self.owner, to, self.fence
            ),
        }
    }
}

/// A member of the cluster and where its agent can be reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Its number in the configuration.
    pub id: NodeId,
    /// A name for people (usually the host name).
    pub name: String,
    /// Address of its migration listener (`host:port`).
    pub migration_addr: String,
    /// Address of its agent's control API (`host:port`).
    pub agent_addr: String,
}

/// The replicated registry: every method is linearizable (a read sees every change acknowledged
/// before it began) and every change is durable on a quorum before it is acknowledged.
///
/// A backend implements [`Registry::execute`] (order a [`Command`] and apply it with
/// [`RegistryState::apply`]'s meaning) and the three reads; the named changes are built on
/// `execute`.
///
/// An [`AcpError::Unavailable`] or [`AcpError::Timeout`] answer to a change is indeterminate: it
/// may have committed. Read the record again before acting on it.
#[async_trait::async_trait]
pub trait Registry: Send + Sync + fmt::Debug {
    /// Orders `command` and applies it; a refused command changes nothing.
    async fn execute(&self, command: Command) -> Result<CommandOutcome, AcpError>;

    /// The record of `vm`, or `None` if it is not registered.
    async fn ownership(&self, vm: &VmId) -> Result<Option<Ownership>, AcpError>;

    /// Every VM's record, ordered by VM id.
    async fn list(&self) -> Result<Vec<Ownership>, AcpError>;

    /// Every member's record, ordered by id.
    async fn nodes(&self) -> Result<Vec<NodeRecord>, AcpError>;

    /// Records `vm` as owned by `owner`; refused if it is already registered.
    async fn register(&self, vm: &VmId, owner: NodeId) -> Result<Ownership, AcpError> {
        let command = Command::Register {
            vm: vm.clone(),
            owner,
        };
        self.execute(command).await?.into_record()
    }

    /// Marks `vm`, owned by `from` at `fence`, as leaving for `to`.
    async fn begin_handoff(
        &self,
        vm: &VmId,
        from: NodeId,
        fence: Fence,
        to: NodeId,
    ) -> Result<Ownership, AcpError> {
        let command = Command::BeginHandoff {
            vm: vm.clone(),
            from,
            fence,
            to,
        };
        self.execute(command).await?.into_record()
    }

    /// Makes `to` the owner of `vm`, which `from` was handing to it at `fence`.
    async fn commit_handoff(
        &self,
        vm: &VmId,
        from: NodeId,
        fence: Fence,
        to: NodeId,
    ) -> Result<Ownership, AcpError> {
        let command = Command::CommitHandoff {
            vm: vm.clone(),
            from,
            fence,
            to,
        };
        self.execute(command).await?.into_record()
    }

    /// Cancels the handoff of `vm` begun at `fence`: `from` keeps it.
    async fn abort_handoff(
        &self,
        vm: &VmId,
        from: NodeId,
        fence: Fence,
    ) -> Result<Ownership, AcpError> {
        let command = Command::AbortHandoff {
            vm: vm.clone(),
            from,
            fence,
        };
        self.execute(command).await?.into_record()
    }

    /// Removes `vm`, owned by `owner` at `fence`, from the registry (the VM was shut down).
    async fn unregister(&self, vm: &VmId, owner: NodeId, fence: Fence) -> Result<(), AcpError> {
        let command = Command::Unregister {
            vm: vm.clone(),
            owner,
            fence,
        };
        self.execute(command).await?.expect(CommandOutcome::Removed)
    }

    /// Adds or replaces a member's record.
    async fn put_node(&self, node: NodeRecord) -> Result<(), AcpError> {
        let outcome = self.execute(Command::PutNode(node)).await?;
        outcome.expect(CommandOutcome::NodeStored)
    }
}
