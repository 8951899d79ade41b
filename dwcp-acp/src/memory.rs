//! A single-process registry: the reference semantics with no replication, for deterministic
//! tests of code built on [`Registry`] and of the checker. Not for production: it is neither
//! durable nor shared between processes.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::{
    AcpError, Command, CommandOutcome, Fence, NodeId, NodeRecord, Ownership, Registry,
    RegistryState, VmId,
};

/// [`RegistryState`] behind a mutex, every command at the next fence.
#[derive(Debug, Default)]
pub struct MemoryRegistry {
    state: Mutex<RegistryState>,
    next: AtomicU64,
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn run(&self, command: Command) -> Result<CommandOutcome, AcpError> {
        let mut state = self.state.lock();
        let at = Fence(self.next.fetch_add(1, Ordering::Relaxed) + 1);
        state.apply(&command, at)
    }

    fn changed(&self, command: Command) -> Result<Ownership, AcpError> {
        match self.run(command)? {
            CommandOutcome::Changed(record) => Ok(record),
            other => Err(AcpError::Backend(format!("unexpected outcome {other:?}"))),
        }
    }
}

#[async_trait::async_trait]
impl Registry for MemoryRegistry {
    async fn register(&self, vm: &VmId, owner: NodeId) -> Result<Ownership, AcpError> {
        self.changed(Command::Register {
            vm: vm.clone(),
            owner,
        })
    }

    async fn ownership(&self, vm: &VmId) -> Result<Option<Ownership>, AcpError> {
        Ok(self.state.lock().vms.get(vm).cloned())
    }

    async fn list(&self) -> Result<Vec<Ownership>, AcpError> {
        Ok(self.state.lock().vms.values().cloned().collect())
    }

    async fn begin_handoff(
        &self,
        vm: &VmId,
        from: NodeId,
        fence: Fence,
        to: NodeId,
    ) -> Result<Ownership, AcpError> {
        self.changed(Command::BeginHandoff {
            vm: vm.clone(),
            from,
            fence,
            to,
        })
    }

    async fn commit_handoff(
        &self,
        vm: &VmId,
        from: NodeId,
        fence: Fence,
        to: NodeId,
    ) -> Result<Ownership, AcpError> {
        self.changed(Command::CommitHandoff {
            vm: vm.clone(),
            from,
            fence,
            to,
        })
    }

    async fn abort_handoff(
        &self,
        vm: &VmId,
        from: NodeId,
        fence: Fence,
    ) -> Result<Ownership, AcpError> {
        self.changed(Command::AbortHandoff {
            vm: vm.clone(),
            from,
            fence,
        })
    }

    async fn unregister(&self, vm: &VmId, owner: NodeId, fence: Fence) -> Result<(), AcpError> {
        self.run(Command::Unregister {
            vm: vm.clone(),
            owner,
            fence,
        })
        .map(|_| ())
    }

    async fn put_node(&self, node: NodeRecord) -> Result<(), AcpError> {
        self.run(Command::PutNode(node)).map(|_| ())
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, AcpError> {
        Ok(self.state.lock().nodes.values().cloned().collect())
    }
}
