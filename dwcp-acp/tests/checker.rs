//! The checker and the conformance suite, run against the single-process reference registry and
//! against deliberately broken registries that the checker must catch.

use std::sync::Arc;

use dwcp_acp::checker::{self, History, RecordingRegistry, Violation};
use dwcp_acp::{
    AcpError, Command, CommandOutcome, Holding, MemoryRegistry, NodeRecord, Ownership, Registry,
    VmId,
};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

#[tokio::test]
async fn the_reference_registry_passes_the_conformance_suite() {
    dwcp_acp::conformance::check_registry(Arc::new(MemoryRegistry::new()), "mem").await;
}

/// Clients migrating a few VMs back and forth among nodes 1..=3, as an agent would: read, begin,
/// then commit or abort with the fence they got.
async fn run_clients(registry: Arc<dyn Registry>, history: Arc<History>, seed: u64, clients: u64) {
    let vms: Vec<VmId> = (0..4)
        .map(|i| VmId::new(format!("vm{i}")).unwrap())
        .collect();
    let mut tasks = Vec::new();
    for process in 0..clients {
        let client = RecordingRegistry::new(registry.clone(), history.clone(), process);
        let vms = vms.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed * 1000 + process);
            for _ in 0..60 {
                let vm = &vms[rng.random_range(0..vms.len())];
                let Ok(current) = client.ownership(vm).await else {
                    continue;
                };
                // Let other clients act between the read and the change, as the network would.
                tokio::time::sleep(std::time::Duration::from_micros(rng.random_range(0..300)))
                    .await;
                let Some(current) = current else {
                    let _ = client.register(vm, rng.random_range(1..=3)).await;
                    continue;
                };
                match current.holding {
                    Holding::Owned => {
                        let to = (current.owner % 3) + 1;
                        let _ = client
                            .begin_handoff(vm, current.owner, current.fence, to)
                            .await;
                    }
                    Holding::HandingOver { to } => {
                        if rng.random_bool(0.7) {
                            let _ = client
                                .commit_handoff(vm, current.owner, current.fence, to)
                                .await;
                        } else {
                            let _ = client.abort_handoff(vm, current.owner, current.fence).await;
                        }
                    }
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_registry_under_racing_clients_has_no_violation() {
    for seed in 0..20 {
        let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new());
        let history = History::new();
        run_clients(registry.clone(), history.clone(), seed, 6).await;
        let finals = registry.list().await.unwrap();
        let summary =
            checker::check(&history, &finals).unwrap_or_else(|v| panic!("seed {seed}: {v:?}"));
        assert!(summary.acknowledged_changes > 20, "{summary:?}");
        assert!(
            summary.refused > 0,
            "racing clients must collide: {summary:?}"
        );
        assert!(summary.handoffs_committed > 0, "{summary:?}");
    }
}

/// Two replicas that never talk: what a partitioned cluster without consensus would be.
#[derive(Debug)]
struct SplitBrain {
    halves: [MemoryRegistry; 2],
    turn: std::sync::atomic::AtomicUsize,
}

impl SplitBrain {
    fn half(&self) -> &MemoryRegistry {
        &self.halves[self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 2]
    }
}

#[async_trait::async_trait]
impl Registry for SplitBrain {
    async fn execute(&self, command: Command) -> Result<CommandOutcome, AcpError> {
        if let Command::Register { .. } = command {
            // Both halves learn the registration, as if it committed before the partition.
            let first = self.halves[0].execute(command.clone()).await;
            let _ = self.halves[1].execute(command).await;
            return first;
        }
        self.half().execute(command).await
    }
    async fn ownership(&self, vm: &VmId) -> Result<Option<Ownership>, AcpError> {
        self.half().ownership(vm).await
    }
    async fn list(&self) -> Result<Vec<Ownership>, AcpError> {
        self.half().list().await
    }
    async fn nodes(&self) -> Result<Vec<NodeRecord>, AcpError> {
        self.half().nodes().await
    }
}

#[tokio::test]
async fn a_split_brain_is_caught() {
    let registry = Arc::new(SplitBrain {
        halves: [MemoryRegistry::new(), MemoryRegistry::new()],
        turn: Default::default(),
    });
    let history = History::new();
    let a = RecordingRegistry::new(registry.clone(), history.clone(), 1);
    let vm = VmId::new("vm").unwrap();
    let r = a.register(&vm, 1).await.unwrap();
    // Each half accepts a handoff of the same version: two owners-to-be.
    let x = a.begin_handoff(&vm, 1, r.fence, 2).await.unwrap();
    let y = a.begin_handoff(&vm, 1, r.fence, 3).await.unwrap();
    assert_ne!(x, y);
    let finals = registry.halves[0].list().await.unwrap();
    let violations = checker::check(&history, &finals).unwrap_err();
    assert!(
        violations
            .iter()
            .any(|v| matches!(v, Violation::TwoSuccessors { .. })),
        "{violations:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_under_racing_clients_is_caught_every_time() {
    for seed in 0..10 {
        let registry = Arc::new(SplitBrain {
            halves: [MemoryRegistry::new(), MemoryRegistry::new()],
            turn: Default::default(),
        });
        let history = History::new();
        run_clients(registry.clone(), history.clone(), seed, 4).await;
        let finals = registry.halves[0].list().await.unwrap();
        assert!(checker::check(&history, &finals).is_err(), "seed {seed}");
    }
}

#[tokio::test]
async fn a_lost_acknowledged_change_is_caught() {
    let registry = Arc::new(MemoryRegistry::new());
    let history = History::new();
    let client = RecordingRegistry::new(registry.clone(), history.clone(), 1);
    let vm = VmId::new("vm").unwrap();
    let r = client.register(&vm, 1).await.unwrap();
    let before = registry.list().await.unwrap();
    client.begin_handoff(&vm, 1, r.fence, 2).await.unwrap();
    // A final state from before the acknowledged begin: the entry was lost.
    let violations = checker::check(&history, &before).unwrap_err();
    assert!(
        violations
            .iter()
            .any(|v| matches!(v, Violation::Lost { .. })),
        "{violations:?}"
    );
    // And a VM that vanished without an unregister.
    let violations = checker::check(&history, &[]).unwrap_err();
    assert!(
        violations
            .iter()
            .any(|v| matches!(v, Violation::Lost { last: None, .. }))
    );
}

#[tokio::test]
async fn a_stale_read_is_caught() {
    let registry = Arc::new(MemoryRegistry::new());
    let lagging = Arc::new(MemoryRegistry::new());
    let history = History::new();
    let writer = RecordingRegistry::new(registry.clone(), history.clone(), 1);
    let vm = VmId::new("vm").unwrap();
    let r = writer.register(&vm, 1).await.unwrap();
    lagging.register(&vm, 1).await.unwrap();
    let moved = writer.begin_handoff(&vm, 1, r.fence, 2).await.unwrap();
    // A reader served by a replica that has not applied the begin yet.
    let reader = RecordingRegistry::new(lagging.clone(), history.clone(), 2);
    assert_eq!(reader.ownership(&vm).await.unwrap().unwrap().fence, r.fence);
    let violations = checker::check(&history, &[moved]).unwrap_err();
    assert!(
        violations
            .iter()
            .any(|v| matches!(v, Violation::StaleAnswer { .. })),
        "{violations:?}"
    );
}

#[tokio::test]
async fn indeterminate_answers_constrain_nothing() {
    let history = History::new();
    let vm = VmId::new("vm").unwrap();
    let i = history.invoke(
        1,
        checker::Op::Change(Command::Register {
            vm: vm.clone(),
            owner: 1,
        }),
    );
    history.complete(
        i,
        checker::Answer::Indeterminate(AcpError::Unavailable("no leader".into())),
    );
    let never = history.invoke(2, checker::Op::Read { vm });
    let _ = never;
    let summary = checker::check(&history, &[]).unwrap();
    assert_eq!(summary.indeterminate, 2);
}
