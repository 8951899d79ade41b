//! A Jepsen-style checker for recorded histories of registry operations.
//!
//! Tests wrap a backend in a [`RecordingRegistry`], run clients against it while they kill,
//! partition and restart the cluster, then read the final records and call [`check`]. Every call
//! is recorded with its invocation and completion time and its answer; an answer that may or may
//! not have committed (a timeout, no leader) is kept as indeterminate and constrains nothing.
//!
//! What is checked, per VM, is what "exactly one owner" means for a fenced registry:
//! - **one record per fence**: every answer that showed the record at fence `f` showed the same
//!   owner and handoff state (two differing records at one fence would be two owners);
//! - **one successor per fence**: at most one acknowledged change named fence `f` as the one it
//!   replaced (two would be two compare-and-sets succeeding from one version, i.e. split brain);
//!   and each change's new fence is above the one it named;
//! - **real time**: an answer given after another was acknowledged never shows an older fence,
//!   and an acknowledged change after another has a higher fence (no stale read, no lost write);
//! - **nothing lost**: the final record's fence is at least every fence any answer showed.
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::{AcpError, Command, CommandOutcome, Fence, NodeRecord, Ownership, Registry, VmId};

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A change ([`Registry::execute`] and the named changes built on it). A member's record
    /// ([`Command::PutNode`]) is recorded, not checked.
    Change(Command),
    /// [`Registry::ownership`].
    Read {
        /// The VM.
        vm: VmId,
    },
    /// [`Registry::list`].
    List,
    /// [`Registry::nodes`]: recorded, not checked.
    Nodes,
}

impl Op {
    fn vm(&self) -> Option<&VmId> {
        match self {
            Op::Change(command) => command.vm(),
            Op::Read { vm } => Some(vm),
            Op::List | Op::Nodes => None,
        }
    }

    /// The fence a change named as the version it replaces (`None` for a registration or a read).
    fn replaces(&self) -> Option<Fence> {
        match self {
            Op::Change(
                Command::BeginHandoff { fence, .. }
                | Command::CommitHandoff { fence, .. }
                | Command::AbortHandoff { fence, .. }
                | Command::Unregister { fence, .. },
            ) => Some(*fence),
            _ => None,
        }
    }

    fn is_change(&self) -> bool {
        matches!(self, Op::Change(command) if command.vm().is_some())
    }

    fn is_unregister(&self) -> bool {
        matches!(self, Op::Change(Command::Unregister { .. }))
    }
}

/// What the registry answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A record (a change's result or a read).
    Record(Ownership),
    /// A read found no record.
    Absent,
    /// The VM was removed.
    Removed,
    /// A listing.
    Listed(Vec<Ownership>),
    /// A membership call succeeded.
    Done,
    /// Refused for certain; nothing changed.
    Refused(AcpError),
    /// Failed in a way that may have committed.
    Indeterminate(AcpError),
}

/// One recorded call.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Which client made it.
    pub process: u64,
    /// The call.
    pub op: Op,
    /// When it was made, from the history's start.
    pub invoked: Duration,
    /// When it returned, or `None` if it never did.
    pub completed: Option<Duration>,
    /// What it returned.
    pub answer: Option<Answer>,
}

/// A thread-safe log of calls.
#[derive(Debug)]
pub struct History {
    start: Instant,
    entries: Mutex<Vec<Entry>>,
}

impl History {
    /// An empty history starting now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            entries: Mutex::new(Vec::new()),
        })
    }

    /// Records a call being made; returns its index for [`History::complete`].
    pub fn invoke(&self, process: u64, op: Op) -> usize {
        let mut entries = self.entries.lock();
        entries.push(Entry {
            process,
            op,
            invoked: self.start.elapsed(),
            completed: None,
            answer: None,
        });
        entries.len() - 1
    }

    /// Records the answer to call `index`.
    pub fn complete(&self, index: usize, answer: Answer) {
        let now = self.start.elapsed();
        let mut entries = self.entries.lock();
        entries[index].completed = Some(now);
        entries[index].answer = Some(answer);
    }

    /// A copy of every call so far.
    pub fn entries(&self) -> Vec<Entry> {
        self.entries.lock().clone()
    }
}

/// A way the history breaks the registry's guarantees.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// Two answers showed different records at one fence.
    DivergentRecords {
        /// The VM.
        vm: VmId,
        /// One record.
        first: Ownership,
        /// The other.
        second: Ownership,
    },
    /// Two acknowledged changes replaced the same version.
    TwoSuccessors {
        /// The VM.
        vm: VmId,
        /// The version both named.
        replaced: Fence,
        /// What the two produced.
        results: (String, String),
    },
    /// An acknowledged change's new fence is not above the one it named.
    FenceNotIncreasing {
        /// The VM.
        vm: VmId,
        /// Named.
        replaced: Fence,
        /// Produced.
        produced: Fence,
    },
    /// An answer showed an older fence than one acknowledged before it was asked.
    StaleAnswer {
        /// The VM.
        vm: VmId,
        /// The fence acknowledged earlier.
        acknowledged: Fence,
        /// The older fence seen later.
        seen: Option<Fence>,
        /// The later call.
        call: String,
    },
    /// The final record is older than a fence some answer showed: an acknowledged entry was lost.
    Lost {
        /// The VM.
        vm: VmId,
        /// The newest fence any answer showed.
        newest_seen: Fence,
        /// The final record's fence, or `None` if the VM is gone without an unregister.
        last: Option<Fence>,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::DivergentRecords { vm, first, second } => {
                write!(f, "{vm}: two records at one fence: {first} / {second}")
            }
            Violation::TwoSuccessors {
                vm,
                replaced,
                results,
            } => write!(
                f,
                "{vm}: two acknowledged changes replaced {replaced}: {} and {}",
                results.0, results.1
            ),
            Violation::FenceNotIncreasing {
                vm,
                replaced,
                produced,
            } => {
                write!(f, "{vm}: a change of {replaced} produced {produced}")
            }
            Violation::StaleAnswer {
                vm,
                acknowledged,
                seen,
                call,
            } => write!(
                f,
                "{vm}: {call} answered {seen:?} after {acknowledged} had been acknowledged"
            ),
            Violation::Lost {
                vm,
                newest_seen,
                last,
            } => write!(
                f,
                "{vm}: {newest_seen} was seen but the final record is {last:?}"
            ),
        }
    }
}

/// Counts of what a history held.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// Calls recorded.
    pub calls: usize,
    /// Changes acknowledged.
    pub acknowledged_changes: usize,
    /// Calls refused for certain (conflicts, stale fences).
    pub refused: usize,
    /// Calls whose outcome is unknown (timeouts, no leader) or that never returned.
    pub indeterminate: usize,
    /// Handoffs committed and acknowledged.
    pub handoffs_committed: usize,
    /// VMs in the history.
    pub vms: usize,
    /// VMs whose final record is still handing over.
    pub unsettled: usize,
}

/// One answer that showed a record, for the real-time check.
struct Seen {
    fence: Option<Fence>,
    invoked: Duration,
    completed: Duration,
    acknowledged_change: bool,
    call: String,
}

/// Checks `entries` (from [`History::entries`]) against the final records read after the
/// faults were healed.
pub fn check(history: &History, final_records: &[Ownership]) -> Result<Summary, Vec<Violation>> {
    check_entries(&history.entries(), final_records)
}

/// [`check`] on a copied list of entries.
pub fn check_entries(
    entries: &[Entry],
    final_records: &[Ownership],
) -> Result<Summary, Vec<Violation>> {
    let mut violations = Vec::new();
    let mut summary = Summary {
        calls: entries.len(),
        ..Summary::default()
    };
    let mut by_fence: BTreeMap<(VmId, Fence), Ownership> = BTreeMap::new();
    let mut successors: BTreeMap<(VmId, Fence), String> = BTreeMap::new();
    let mut seen: BTreeMap<VmId, Vec<Seen>> = BTreeMap::new();
    let mut removed_possibly: BTreeMap<VmId, bool> = BTreeMap::new();

    let mut observe = |record: &Ownership, violations: &mut Vec<Violation>| match by_fence
        .get(&(record.vm.clone(), record.fence))
    {
        Some(first) if first != record => violations.push(Violation::DivergentRecords {
            vm: record.vm.clone(),
            first: first.clone(),
            second: record.clone(),
        }),
        Some(_) => {}
        None => {
            by_fence.insert((record.vm.clone(), record.fence), record.clone());
        }
    };

    for entry in entries {
        let (Some(answer), Some(completed)) = (&entry.answer, entry.completed) else {
            summary.indeterminate += 1;
            if let (true, Some(vm)) = (entry.op.is_unregister(), entry.op.vm()) {
                removed_possibly.insert(vm.clone(), true);
            }
            continue;
        };
        let call = format!("{:?} by client {}", entry.op, entry.process);
        let mut push_seen = |vm: &VmId, fence: Option<Fence>, acknowledged_change: bool| {
            seen.entry(vm.clone()).or_default().push(Seen {
                fence,
                invoked: entry.invoked,
                completed,
                acknowledged_change,
                call: call.clone(),
            });
        };
        match answer {
            Answer::Record(record) => {
                observe(record, &mut violations);
                let change = entry.op.is_change();
                if change {
                    summary.acknowledged_changes += 1;
                    if matches!(entry.op, Op::Change(Command::CommitHandoff { .. })) {
                        summary.handoffs_committed += 1;
                    }
                }
                if let (true, Some(replaced)) = (change, entry.op.replaces()) {
                    if record.fence <= replaced {
                        violations.push(Violation::FenceNotIncreasing {
                            vm: record.vm.clone(),
                            replaced,
                            produced: record.fence,
                        });
                    }
                    let key = (record.vm.clone(), replaced);
                    let this = format!("{record} (by {call})");
                    if let Some(other) = successors.insert(key, this.clone()) {
                        violations.push(Violation::TwoSuccessors {
                            vm: record.vm.clone(),
                            replaced,
                            results: (other, this),
                        });
                    }
                }
                push_seen(&record.vm, Some(record.fence), change);
            }
            Answer::Removed => {
                summary.acknowledged_changes += 1;
                removed_possibly
                    .insert(entry.op.vm().cloned().expect("unregister names a VM"), true);
                if let (Some(vm), Some(replaced)) = (entry.op.vm(), entry.op.replaces()) {
                    let key = (vm.clone(), replaced);
                    let this = format!("removal (by {call})");
                    if let Some(other) = successors.insert(key, this.clone()) {
                        violations.push(Violation::TwoSuccessors {
                            vm: vm.clone(),
                            replaced,
                            results: (other, this),
                        });
                    }
                }
            }
            Answer::Absent => {
                if let Some(vm) = entry.op.vm() {
                    push_seen(vm, None, false);
                }
            }
            Answer::Listed(records) => {
                for record in records {
                    observe(record, &mut violations);
                    push_seen(&record.vm, Some(record.fence), false);
                }
            }
            Answer::Refused(error) => {
                summary.refused += 1;
                if let AcpError::Conflict { current, .. }
                | AcpError::AlreadyRegistered { current, .. } = error
                {
                    observe(current, &mut violations);
                    push_seen(&current.vm, Some(current.fence), false);
                }
            }
            Answer::Indeterminate(_) => {
                summary.indeterminate += 1;
                if let (true, Some(vm)) = (entry.op.is_unregister(), entry.op.vm()) {
                    removed_possibly.insert(vm.clone(), true);
                }
            }
            Answer::Done => {}
        }
    }

    for (vm, answers) in &seen {
        let may_be_removed = removed_possibly.get(vm).copied().unwrap_or(false);
        for earlier in answers {
            let Some(acknowledged) = earlier.fence else {
                continue;
            };
            for later in answers.iter().filter(|l| l.invoked > earlier.completed) {
                let stale = match later.fence {
                    Some(f) if later.acknowledged_change && earlier.acknowledged_change => {
                        f <= acknowledged
                    }
                    Some(f) => f < acknowledged,
                    None => !may_be_removed,
                };
                if stale {
                    violations.push(Violation::StaleAnswer {
                        vm: vm.clone(),
                        acknowledged,
                        seen: later.fence,
                        call: later.call.clone(),
                    });
                }
            }
        }
    }

    let finals: BTreeMap<&VmId, &Ownership> = final_records.iter().map(|r| (&r.vm, r)).collect();
    for record in final_records {
        observe(record, &mut violations);
    }
    summary.unsettled = final_records
        .iter()
        .filter(|r| r.holding != crate::Holding::Owned)
        .count();
    for (vm, answers) in &seen {
        let Some(newest_seen) = answers.iter().filter_map(|a| a.fence).max() else {
            continue;
        };
        let last = finals.get(vm).map(|r| r.fence);
        let lost = match last {
            Some(f) => f < newest_seen,
            None => !removed_possibly.get(vm).copied().unwrap_or(false),
        };
        if lost {
            violations.push(Violation::Lost {
                vm: vm.clone(),
                newest_seen,
                last,
            });
        }
    }
    summary.vms = seen.len();

    if violations.is_empty() {
        Ok(summary)
    } else {
        Err(violations)
    }
}

/// A [`Registry`] that records every call into a [`History`] and passes it on.
#[derive(Debug)]
pub struct RecordingRegistry {
    inner: Arc<dyn Registry>,
    history: Arc<History>,
    process: u64,
}

impl RecordingRegistry {
    /// Records the calls of client `process` to `inner`.
    pub fn new(inner: Arc<dyn Registry>, history: Arc<History>, process: u64) -> Arc<Self> {
        Arc::new(Self {
            inner,
            history,
            process,
        })
    }

    fn error(e: &AcpError) -> Answer {
        if e.is_indeterminate() {
            Answer::Indeterminate(e.clone())
        } else {
            Answer::Refused(e.clone())
        }
    }

    /// Records `op`, awaits `call`, records its answer as `answer` makes it.
    async fn record<T>(
        &self,
        op: Op,
        call: impl std::future::Future<Output = Result<T, AcpError>>,
        answer: impl FnOnce(&T) -> Answer,
    ) -> Result<T, AcpError> {
        let index = self.history.invoke(self.process, op);
        let result = call.await;
        let recorded = match &result {
            Ok(value) => answer(value),
            Err(e) => Self::error(e),
        };
        self.history.complete(index, recorded);
        result
    }
}

#[async_trait::async_trait]
impl Registry for RecordingRegistry {
    async fn execute(&self, command: Command) -> Result<CommandOutcome, AcpError> {
        let op = Op::Change(command.clone());
        self.record(op, self.inner.execute(command), |outcome| match outcome {
            CommandOutcome::Changed(r) => Answer::Record(r.clone()),
            CommandOutcome::Removed => Answer::Removed,
            CommandOutcome::NodeStored => Answer::Done,
        })
        .await
    }

    async fn ownership(&self, vm: &VmId) -> Result<Option<Ownership>, AcpError> {
        let op = Op::Read { vm: vm.clone() };
        self.record(op, self.inner.ownership(vm), |r| match r {
            Some(r) => Answer::Record(r.clone()),
            None => Answer::Absent,
        })
        .await
    }

    async fn list(&self) -> Result<Vec<Ownership>, AcpError> {
        self.record(Op::List, self.inner.list(), |r| Answer::Listed(r.clone()))
            .await
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, AcpError> {
        self.record(Op::Nodes, self.inner.nodes(), |_| Answer::Done)
            .await
    }
}
