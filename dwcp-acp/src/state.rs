//! The registry's state and the one function that changes it, shared by every backend so that
//! they agree on what each command means.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{AcpError, Fence, Holding, NodeId, NodeRecord, Ownership, VmId};

/// A change to the registry, as it is ordered by consensus.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// See [`crate::Registry::register`].
    Register {
        /// The VM.
        vm: VmId,
        /// Its first owner.
        owner: NodeId,
    },
    /// See [`crate::Registry::begin_handoff`].
    BeginHandoff {
        /// The VM.
        vm: VmId,
        /// Its owner.
        from: NodeId,
        /// The fence the owner holds.
        fence: Fence,
        /// The destination.
        to: NodeId,
    },
    /// See [`crate::Registry::commit_handoff`].
    CommitHandoff {
        /// The VM.
        vm: VmId,
        /// Its owner.
        from: NodeId,
        /// The fence of the handoff's beginning.
        fence: Fence,
        /// The destination.
        to: NodeId,
    },
    /// See [`crate::Registry::abort_handoff`].
    AbortHandoff {
        /// The VM.
        vm: VmId,
        /// Its owner.
        from: NodeId,
        /// The fence of the handoff's beginning.
        fence: Fence,
    },
    /// See [`crate::Registry::unregister`].
    Unregister {
        /// The VM.
        vm: VmId,
        /// Its owner.
        owner: NodeId,
        /// The fence the owner holds.
        fence: Fence,
    },
    /// See [`crate::Registry::put_node`].
    PutNode(NodeRecord),
}

/// What applying a command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutcome {
    /// The VM's record after the change.
    Changed(Ownership),
    /// The VM was removed.
    Removed,
    /// A member's record was stored.
    NodeStored,
}

impl Command {
    /// The VM the command changes (`None` for a member's record).
    pub fn vm(&self) -> Option<&VmId> {
        match self {
            Command::Register { vm, .. }
            | Command::BeginHandoff { vm, .. }
            | Command::CommitHandoff { vm, .. }
            | Command::AbortHandoff { vm, .. }
            | Command::Unregister { vm, .. } => Some(vm),
            Command::PutNode(_) => None,
        }
    }
}

impl CommandOutcome {
    /// The changed record, for a command that changes one.
    pub fn into_record(self) -> Result<Ownership, AcpError> {
        match self {
            CommandOutcome::Changed(record) => Ok(record),
            other => Err(AcpError::Backend(format!("unexpected outcome {other:?}"))),
        }
    }

    /// Checks that the outcome is `expected`.
    pub fn expect(self, expected: CommandOutcome) -> Result<(), AcpError> {
        if self == expected {
            Ok(())
        } else {
            Err(AcpError::Backend(format!("unexpected outcome {self:?}")))
        }
    }
}

/// Every VM's record and every member's, as of some point in the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryState {
    /// VM records by id.
    pub vms: BTreeMap<VmId, Ownership>,
    /// Member records by id.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
}

impl RegistryState {
    /// Applies `command`, ordered at position `at` (strictly greater than every earlier one), and
    /// says what it changed. A refused command changes nothing; the refusal is deterministic, so
    /// every replica refuses it alike.
    pub fn apply(&mut self, command: &Command, at: Fence) -> Result<CommandOutcome, AcpError> {
        match command {
            Command::Register { vm, owner } => {
                check_node(*owner)?;
                if let Some(current) = self.vms.get(vm) {
                    return Err(AcpError::AlreadyRegistered {
                        vm: vm.clone(),
                        current: current.clone(),
                    });
                }
                let record = Ownership {
                    vm: vm.clone(),
                    owner: *owner,
                    holding: Holding::Owned,
                    fence: at,
                };
                self.vms.insert(vm.clone(), record.clone());
                Ok(CommandOutcome::Changed(record))
            }
            Command::BeginHandoff {
                vm,
                from,
                fence,
                to,
            } => {
                check_node(*to)?;
                let record = self.expect(vm, *from, *fence, Holding::Owned, || {
                    format!("node {from} owns {vm} at {fence} and no handoff is in progress")
                })?;
                if *to == *from {
                    return Err(AcpError::Invalid(format!(
                        "{vm}: a handoff from node {from} to itself"
                    )));
                }
                record.holding = Holding::HandingOver { to: *to };
                record.fence = at;
                Ok(CommandOutcome::Changed(record.clone()))
            }
            Command::CommitHandoff {
                vm,
                from,
                fence,
                to,
            } => {
                let record =
                    self.expect(vm, *from, *fence, Holding::HandingOver { to: *to }, || {
                        format!("node {from} is handing {vm} to node {to} since {fence}")
                    })?;
                record.owner = *to;
                record.holding = Holding::Owned;
                record.fence = at;
                Ok(CommandOutcome::Changed(record.clone()))
            }
            Command::AbortHandoff { vm, from, fence } => {
                let current = self.record(vm)?;
                let Holding::HandingOver { to } = current.holding else {
                    return Err(AcpError::Conflict {
                        expected: format!("node {from} is handing {vm} over since {fence}"),
                        current: current.clone(),
                    });
                };
                let record = self.expect(vm, *from, *fence, Holding::HandingOver { to }, || {
                    format!("node {from} is handing {vm} over since {fence}")
                })?;
                record.holding = Holding::Owned;
                record.fence = at;
                Ok(CommandOutcome::Changed(record.clone()))
            }
            Command::Unregister { vm, owner, fence } => {
                self.expect(vm, *owner, *fence, Holding::Owned, || {
                    format!("node {owner} owns {vm} at {fence} and no handoff is in progress")
                })?;
                self.vms.remove(vm);
                Ok(CommandOutcome::Removed)
            }
            Command::PutNode(node) => {
                check_node(node.id)?;
                self.nodes.insert(node.id, node.clone());
                Ok(CommandOutcome::NodeStored)
            }
        }
    }

    fn record(&self, vm: &VmId) -> Result<&Ownership, AcpError> {
        self.vms
            .get(vm)
            .ok_or_else(|| AcpError::NotRegistered { vm: vm.clone() })
    }

    fn expect(
        &mut self,
        vm: &VmId,
        owner: NodeId,
        fence: Fence,
        holding: Holding,
        expected: impl FnOnce() -> String,
    ) -> Result<&mut Ownership, AcpError> {
        let current = self
            .vms
            .get_mut(vm)
            .ok_or_else(|| AcpError::NotRegistered { vm: vm.clone() })?;
        if current.owner != owner || current.fence != fence || current.holding != holding {
            return Err(AcpError::Conflict {
                expected: expected(),
                current: current.clone(),
            });
        }
        Ok(current)
    }
}

fn check_node(id: NodeId) -> Result<(), AcpError> {
    if id == 0 {
        return Err(AcpError::UnknownNode(0));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> VmId {
        VmId::new("vm-1").unwrap()
    }

    #[test]
    fn a_handoff_moves_the_owner_and_raises_the_fence_each_step() {
        let mut s = RegistryState::default();
        let CommandOutcome::Changed(r) = s
            .apply(&Command::Register { vm: vm(), owner: 1 }, Fence(5))
            .unwrap()
        else {
            panic!()
        };
        assert_eq!((r.owner, r.fence), (1, Fence(5)));
        let begin = Command::BeginHandoff {
            vm: vm(),
            from: 1,
            fence: Fence(5),
            to: 2,
        };
        s.apply(&begin, Fence(6)).unwrap();
        // The same begin again names a fence that is gone.
        assert!(matches!(
            s.apply(&begin, Fence(7)),
            Err(AcpError::Conflict { .. })
        ));
        let commit = Command::CommitHandoff {
            vm: vm(),
            from: 1,
            fence: Fence(6),
            to: 2,
        };
        let CommandOutcome::Changed(r) = s.apply(&commit, Fence(8)).unwrap() else {
            panic!()
        };
        assert_eq!((r.owner, r.holding, r.fence), (2, Holding::Owned, Fence(8)));
        // The old owner cannot abort or commit again: its fence is stale.
        let abort = Command::AbortHandoff {
            vm: vm(),
            from: 1,
            fence: Fence(6),
        };
        assert!(matches!(
            s.apply(&abort, Fence(9)),
            Err(AcpError::Conflict { .. })
        ));
        assert!(matches!(
            s.apply(&commit, Fence(9)),
            Err(AcpError::Conflict { .. })
        ));
        assert_eq!(s.vms[&vm()].owner, 2);
    }

    #[test]
    fn bad_ids_are_refused() {
        assert!(VmId::new("").is_err());
        assert!(VmId::new("a/b").is_err());
        assert!(VmId::new("x".repeat(MAX_VM_ID_LEN + 1)).is_err());
        assert!(VmId::new("0b7c1f7e-2d4e-4c1a-9d1e-7f7a3b2c1d0e").is_ok());
        let mut s = RegistryState::default();
        assert_eq!(
            s.apply(&Command::Register { vm: vm(), owner: 0 }, Fence(1)),
            Err(AcpError::UnknownNode(0))
        );
    }

    use crate::MAX_VM_ID_LEN;
}
