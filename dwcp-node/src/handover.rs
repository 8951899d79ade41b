//! The source guest's control during a migration: pause and resume as the guest's own, and the
//! handover recorded in the registry before the destination may take over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dwcp_acp::{AcpError, Fence, NodeId, Ownership, Registry, VmId};
use dwcp_core::sim::SimControl;
use dwcp_core::{HandoverDecision, VmControl};
use parking_lot::Mutex;

/// How long the record of a handover may take before the outcome is called unknown.
pub(crate) const RECORD_DEADLINE: Duration = Duration::from_secs(10);

pub(crate) struct HandoverControl {
    pub(crate) guest: SimControl,
    pub(crate) registry: Arc<dyn Registry>,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) vm: VmId,
    pub(crate) from: NodeId,
    pub(crate) begun: Fence,
    pub(crate) to: NodeId,
    pub(crate) recorded: Arc<Mutex<Option<Ownership>>>,
}

impl VmControl for HandoverControl {
    fn pause(&mut self) -> Result<(), dwcp_core::Error> {
        self.guest.pause()
    }

    fn resume(&mut self) {
        self.guest.resume();
    }

    fn handed_over(&mut self) {
        self.guest.handed_over();
    }

    fn record_handover(&mut self) -> HandoverDecision {
        let deadline = Instant::now() + RECORD_DEADLINE;
        loop {
            let attempt = self.runtime.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(3),
                    self.registry
                        .commit_handoff(&self.vm, self.from, self.begun, self.to),
                )
                .await
                .unwrap_or(Err(AcpError::Timeout(Duration::from_secs(3))))
            });
            match attempt {
                Ok(record) => {
                    *self.recorded.lock() = Some(record);
                    return HandoverDecision::Recorded;
                }
                // An earlier attempt whose answer was lost did commit: only that commit can have
                // made the destination the owner after our fence.
                Err(AcpError::Conflict { current, .. })
                    if current.owner == self.to && current.fence > self.begun =>
                {
                    *self.recorded.lock() = Some(current);
                    return HandoverDecision::Recorded;
                }
                Err(e) if !e.is_indeterminate() => return HandoverDecision::Refused(e.to_string()),
                Err(e) if Instant::now() >= deadline => {
                    return HandoverDecision::Unknown(e.to_string());
                }
                Err(e) => {
                    tracing::warn!(vm = %self.vm, error = %e, "recording the handover; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}
