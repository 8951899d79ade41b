//! Randomized fault schedules on one real 3-member etcd cluster: while a few clients register,
//! hand off and abort handoffs of a handful of VMs, members (the leader among them) are killed
//! and restarted, or paused and resumed (SIGSTOP: the member is cut off). Every call is recorded
//! and, after healing, the history and the final records must pass [`checker::check`]: never
//! two owners, no acknowledged change lost, no stale answer.
//!
//! Each schedule is drawn from a seed (schedule `i` uses `DWCP_FAULT_SEED + i`) and runs under a
//! fresh key prefix, so a failure names the seed to replay:
//! `DWCP_FAULT_SEED=<seed> DWCP_FAULT_SCHEDULES=1 cargo test -p dwcp-acp --test etcd_faults`.
//! The timing of a replay differs (real processes), its faults and choices do not.
//! `DWCP_FAULT_SCHEDULES` (default 100) raises the count.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dwcp_acp::checker::{self, History, RecordingRegistry, Summary};
use dwcp_acp::etcd::EtcdRegistry;
use dwcp_acp::etcd::testing::{ClusterConfig, EtcdCluster};
use dwcp_acp::{AcpError, Holding, NodeId, Ownership, Registry, VmId};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

const DEFAULT_SCHEDULES: u64 = 100;
const DEFAULT_SEED: u64 = 0xd3c9_0001;
const MEMBERS: usize = 3;
const CLIENTS: usize = 3;
const VMS: usize = 3;
const NODES: NodeId = 3;
/// How long the clients run in each schedule.
const RUN: Duration = Duration::from_millis(450);
/// Each client call's bound: short, so that a call stuck on a paused member does not use the
/// whole run.
const OP_TIMEOUT: Duration = Duration::from_millis(300);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug)]
enum Target {
    /// Whichever member leads when the fault starts.
    Leader,
    Member(usize),
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// SIGKILL, then a restart on the same data directory.
    Crash,
    /// SIGSTOP, then SIGCONT: the member is partitioned away meanwhile.
    Partition,
}

#[derive(Clone, Copy, Debug)]
struct Fault {
    target: Target,
    kind: Kind,
    start: Duration,
    length: Duration,
}

/// One or two faults; two may overlap, which takes the quorum away for a while.
fn draw_faults(rng: &mut Xoshiro256PlusPlus) -> Vec<Fault> {
    (0..rng.random_range(1..=2))
        .map(|_| Fault {
            target: if rng.random_bool(0.5) {
                Target::Leader
            } else {
                Target::Member(rng.random_range(0..MEMBERS))
            },
            kind: if rng.random_bool(0.5) {
                Kind::Crash
            } else {
                Kind::Partition
            },
            start: Duration::from_millis(rng.random_range(0..200)),
            length: Duration::from_millis(rng.random_range(50..250)),
        })
        .collect()
}

/// Runs a fixture call (a process spawn or a short HTTP poll) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("fixture call panicked")
}

async fn inject(cluster: Arc<EtcdCluster>, fault: Fault) {
    tokio::time::sleep(fault.start).await;
    let member = match fault.target {
        Target::Member(i) => i,
        Target::Leader => {
            let c = cluster.clone();
            match blocking(move || c.leader()).await {
                Some(i) => i,
                None => return, // No leader now: the cluster is already down a quorum.
            }
        }
    };
    let c = cluster.clone();
    blocking(move || match fault.kind {
        Kind::Crash => c.kill(member),
        Kind::Partition => c.pause(member),
    })
    .await
    .unwrap();
    tokio::time::sleep(fault.length).await;
    blocking(move || match fault.kind {
        Kind::Crash => cluster.restart(member),
        Kind::Partition => cluster.resume(member),
    })
    .await
    .unwrap();
}

/// One client: picks a VM, and from what it last learnt of it, the next step of its life
/// (register, begin, commit or abort a handoff, or read it). It acts on possibly stale
/// knowledge, so that other clients' changes make it conflict. After an indeterminate answer it
/// continues as a new process, as Jepsen's clients do after a crash.
async fn client(
    etcd: Arc<dyn Registry>,
    history: Arc<History>,
    processes: Arc<AtomicU64>,
    vms: Arc<Vec<VmId>>,
    seed: u64,
) {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut process = processes.fetch_add(1, Ordering::Relaxed);
    let mut registry = RecordingRegistry::new(etcd.clone(), history.clone(), process);
    let mut known: HashMap<VmId, Option<Ownership>> = HashMap::new();
    let started = Instant::now();
    while started.elapsed() < RUN {
        let vm = &vms[rng.random_range(0..vms.len())];
        let other = |rng: &mut Xoshiro256PlusPlus, of: NodeId| {
            let to = rng.random_range(1..NODES);
            if to >= of { to + 1 } else { to }
        };
        let result: Result<Option<Ownership>, AcpError> = match known.get(vm) {
            None => registry.ownership(vm).await,
            Some(_) if rng.random_bool(0.15) => registry.ownership(vm).await,
            Some(None) => registry
                .register(vm, rng.random_range(1..=NODES))
                .await
                .map(Some),
            Some(Some(r)) => match r.holding {
                Holding::Owned => {
                    let to = other(&mut rng, r.owner);
                    registry
                        .begin_handoff(vm, r.owner, r.fence, to)
                        .await
                        .map(Some)
                }
                Holding::HandingOver { to } if rng.random_bool(0.7) => registry
                    .commit_handoff(vm, r.owner, r.fence, to)
                    .await
                    .map(Some),
                Holding::HandingOver { .. } => {
                    registry.abort_handoff(vm, r.owner, r.fence).await.map(Some)
                }
            },
        };
        match result {
            Ok(record) => {
                known.insert(vm.clone(), record);
            }
            Err(
                AcpError::Conflict { current, .. } | AcpError::AlreadyRegistered { current, .. },
            ) => {
                known.insert(vm.clone(), Some(current));
            }
            Err(AcpError::NotRegistered { .. }) => {
                known.insert(vm.clone(), None);
            }
            Err(e) if e.is_indeterminate() => {
                known.remove(vm);
                process = processes.fetch_add(1, Ordering::Relaxed);
                registry = RecordingRegistry::new(etcd.clone(), history.clone(), process);
                tokio::time::sleep(Duration::from_millis(rng.random_range(5..30))).await;
            }
            Err(e) => panic!("client {process}: unexpected refusal {e}"),
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..3))).await;
    }
}

/// Reads every record under `prefix` once the cluster is healed, retrying while it recovers.
async fn final_records(cluster: &EtcdCluster, prefix: &str) -> Vec<Ownership> {
    let registry = EtcdRegistry::connect(&cluster.endpoints(), prefix, Duration::from_secs(2))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match registry.list().await {
            Ok(records) => return records,
            Err(e) if e.is_indeterminate() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("final read under {prefix}: {e}"),
        }
    }
}

async fn run_schedule(cluster: &Arc<EtcdCluster>, seed: u64) -> Summary {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let faults = draw_faults(&mut rng);
    let prefix = format!("/faults/{seed}");
    let vms: Arc<Vec<VmId>> = Arc::new(
        (0..VMS)
            .map(|i| VmId::new(format!("vm-{i}")).unwrap())
            .collect(),
    );
    let history = History::new();
    let processes = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        // One connection per client, as each agent has its own.
        let etcd: Arc<dyn Registry> = Arc::new(
            EtcdRegistry::connect(&cluster.endpoints(), &prefix, OP_TIMEOUT)
                .await
                .unwrap(),
        );
        clients.push(tokio::spawn(client(
            etcd,
            history.clone(),
            processes.clone(),
            vms.clone(),
            rng.random(),
        )));
    }
    let injectors: Vec<_> = faults
        .iter()
        .map(|f| tokio::spawn(inject(cluster.clone(), *f)))
        .collect();
    for task in clients.into_iter().chain(injectors) {
        task.await
            .unwrap_or_else(|e| panic!("seed {seed}, faults {faults:?}: {e}"));
    }
    let c = cluster.clone();
    blocking(move || {
        c.heal()?;
        c.wait_healthy(Duration::from_secs(30))
    })
    .await
    .unwrap_or_else(|e| panic!("seed {seed}: the cluster did not heal: {e}"));
    let records = final_records(cluster, &prefix).await;
    match checker::check(&history, &records) {
        Ok(summary) => summary,
        Err(violations) => {
            for entry in history.entries() {
                eprintln!("{entry:?}");
            }
            panic!(
                "seed {seed}, faults {faults:?}: {} violation(s):\n{}\nfinal records: {records:?}\n\
                 replay: DWCP_FAULT_SEED={seed} DWCP_FAULT_SCHEDULES=1",
                violations.len(),
                violations
                    .iter()
                    .map(|v| format!("  {v}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_fault_schedules_keep_one_owner_and_lose_nothing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let schedules = env_u64("DWCP_FAULT_SCHEDULES", DEFAULT_SCHEDULES);
    let base = env_u64("DWCP_FAULT_SEED", DEFAULT_SEED);
    // Short raft timing so that a lost leader is replaced within a schedule.
    let config = ClusterConfig {
        heartbeat_interval: Duration::from_millis(50),
        election_timeout: Duration::from_millis(500),
        ..ClusterConfig::default()
    };
    let cluster = Arc::new(
        blocking(move || EtcdCluster::start_with(MEMBERS, config))
            .await
            .unwrap(),
    );
    let started = Instant::now();
    let mut total = Summary::default();
    for i in 0..schedules {
        let summary = run_schedule(&cluster, base + i).await;
        total.calls += summary.calls;
        total.acknowledged_changes += summary.acknowledged_changes;
        total.refused += summary.refused;
        total.indeterminate += summary.indeterminate;
        total.handoffs_committed += summary.handoffs_committed;
        total.vms += summary.vms;
        total.unsettled += summary.unsettled;
    }
    println!(
        "{schedules} schedules in {:?}: {total:?}",
        started.elapsed()
    );
    assert!(
        total.acknowledged_changes > schedules as usize,
        "too little progress: {total:?}"
    );
    assert!(total.handoffs_committed > 0, "{total:?}");
}
