//! A single-process registry: the reference semantics with no replication, for deterministic
//! tests of code built on [`Registry`] and of the checker. Not for production: it is neither
//! durable nor shared between processes.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::{
    AcpError, Command, CommandOutcome, Fence, NodeRecord, Ownership, Registry, RegistryState, VmId,
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
}

#[async_trait::async_trait]
impl Registry for MemoryRegistry {
    async fn execute(&self, command: Command) -> Result<CommandOutcome, AcpError> {
        let mut state = self.state.lock();
        let at = Fence(self.next.fetch_add(1, Ordering::Relaxed) + 1);
        state.apply(&command, at)
    }

    async fn ownership(&self, vm: &VmId) -> Result<Option<Ownership>, AcpError> {
        Ok(self.state.lock().vms.get(vm).cloned())
    }

    async fn list(&self) -> Result<Vec<Ownership>, AcpError> {
        Ok(self.state.lock().vms.values().cloned().collect())
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, AcpError> {
        Ok(self.state.lock().nodes.values().cloned().collect())
    }
}
