//! ITP — *where does this VM go next?*
//!
//! A pure, sans-IO placement library: no clock, no sockets, no threads. The caller (the `dwcp node`
//! agent, `dwcp cluster evacuate`) owns the cluster state and feeds it in; ITP only decides.
//!
//! # Data flow
//!
//! 1. The caller builds one [`NodeView`] per node from whatever it knows (gossiped resources,
//!    bandwidth forecasts from PBA) and hands them to [`Placer::new`] with the scoring [`Weights`].
//! 2. Each [`VmRequest`] (a VM's memory, vCPUs, source node, dirty rate, anti-affinity group,
//!    forbidden nodes) goes to [`Placer::place`]. It returns a [`Placement`] — the node, its score
//!    and the [`ScoreBreakdown`] — or [`ItpError::NoFit`] with a count of nodes per rejection
//!    reason.
//! 3. `place` **reserves** what it hands out in the placer's view (free memory, free vCPUs, VM
//!    count, anti-affinity group), so the next decision sees it. [`Placer::place_batch`] places many
//!    VMs hardest-first; [`Placer::evacuate`] cordons a node and places its VMs elsewhere.
//! 4. When fresher data arrives the caller calls [`Placer::update_node`] (which replaces the node's
//!    view, reservations included: the fresh view is the truth), or [`Placer::release`] to give back
//!    a reservation whose migration did not happen.
//!
//! # Scoring
//!
//! Hard filters first; a node is a candidate only if it is alive, not cordoned, not the request's
//! source, not in its `forbidden` list, has `memory_free >= memory` and `vcpus_free >= vcpus`, and
//! runs no VM of the request's anti-affinity group. Among candidates the highest score wins:
//!
//! ```text
//! score(n, r) = w.memory · (memory_free(n) − memory(r)) / M        headroom after placement
//!             + w.cpu    · (1 − cpu_load(n))                        idle CPU
//!             + w.spread · 1 / (1 + vms(n))                         fewer VMs per node
//!             + mig(n, r)
//!
//! mig(n, r) = 0                                  if r has no source (a new VM)
//!           = w.migration · 1 / (1 + t / T)      if b > d, with t = memory(r) / (b − d)
//!           = −w.non_convergence_penalty         if b ≤ d (pre-copy never converges)
//! ```
//!
//! `M` is the largest `memory_total` the placer has seen, `b` the forecast bandwidth from the
//! source to `n` (bytes/s, 0 when there is no forecast), `d` the VM's dirty rate, `T` is
//! [`Weights::reference_migration_secs`]. `t` is the pre-copy time: the first copy takes
//! `memory / b`, and while it runs the guest dirties pages again at `d`; summing the rounds gives
//! `memory / (b − d)`, which only exists when `b > d`. See `docs/itp.md` for why each term is there.
//!
//! # Speed
//!
//! A decision does not scan the nodes. [`Placer`] keeps a max segment tree over the nodes with the
//! request-independent part of the score, the largest free memory, free vCPUs and (per source) the
//! largest bandwidth in each subtree, and finds the best node by branch and bound: a subtree is
//! skipped when it cannot fit the VM or when its bound cannot beat the best node found so far. The
//! source-dependent term gets one tree per source node, built lazily, leaves sorted by bandwidth
//! from that source. After a reservation only the changed node's leaf-to-root path is updated.
//! The result is exact: the same best score as the full scan [`Placer::best_by_scan`], which is kept
//! as the reference.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod index;
mod placer;
mod score;

use serde::{Deserialize, Serialize};
use std::fmt;

pub use placer::Placer;

/// A node's identifier, as the cluster layer assigns it.
pub type NodeId = u64;

/// What the placer knows about one node.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NodeView {
    /// The node's id.
    pub id: NodeId,
    /// A human-readable name, for messages.
    pub name: String,
    /// Whether the node is reachable and healthy; dead nodes never take VMs.
    pub alive: bool,
    /// A cordoned node takes no new VMs (being drained or under maintenance).
    pub cordoned: bool,
    /// Guest memory the node can host in total, bytes.
    pub memory_total: u64,
    /// Guest memory still free, bytes (clamped to `memory_total`).
    pub memory_free: u64,
    /// CPU load in `0..=1`: the per-core load averaged over cores (clamped; NaN counts as 1).
    pub cpu_load: f64,
    /// vCPUs the node can still give out.
    pub vcpus_free: u32,
    /// Zone or label, informational (not scored).
    pub zone: String,
    /// Forecast bandwidth *into* this node from other nodes: `(source, bytes/s)`. A source that is
    /// missing has no forecast and counts as bandwidth 0 (the migration is predicted not to
    /// converge). Non-finite or negative values count as 0; for a duplicated source the first
    /// entry wins.
    pub link_to: Vec<(NodeId, f64)>,
    /// Number of VMs running on the node.
    pub vms: u32,
    /// Anti-affinity groups with at least one VM on this node.
    pub anti_affinity_groups: Vec<String>,
}

/// One VM to place.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct VmRequest {
    /// The VM's name, for messages.
    pub vm: String,
    /// Guest memory, bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The node the VM runs on now (a migration), or `None` for a new VM.
    pub source: Option<NodeId>,
    /// How fast the guest dirties memory, bytes/s (negative or NaN counts as 0).
    pub dirty_rate: f64,
    /// No two VMs of one anti-affinity group share a node.
    pub anti_affinity: Option<String>,
    /// Nodes this VM must not go to.
    pub forbidden: Vec<NodeId>,
}

/// A decision: the node and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// The chosen node.
    pub node: NodeId,
    /// Its score (higher is better); the largest over all nodes that pass the filters.
    pub score: f64,
    /// The score's terms.
    pub parts: ScoreBreakdown,
}

/// The weighted terms of a score. They add up to [`Placement::score`] up to rounding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreBreakdown {
    /// `w.memory · (memory_free − memory) / M`: memory headroom left after placement.
    pub headroom: f64,
    /// `w.cpu · (1 − cpu_load)`.
    pub cpu: f64,
    /// `w.spread / (1 + vms)`.
    pub spread: f64,
    /// The migration term (0 for a new VM, negative when the migration does not converge).
    pub migration: f64,
    /// Forecast bandwidth from the source, bytes/s (0 without a source or forecast).
    pub bandwidth: f64,
    /// Predicted pre-copy time `memory / (bandwidth − dirty_rate)` in seconds; `None` for a new VM
    /// or when the migration does not converge.
    pub migration_secs: Option<f64>,
    /// Whether the forecast bandwidth exceeds the dirty rate (always true for a new VM).
    pub converges: bool,
}

/// Scoring weights. Negative or non-finite weights count as 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Weights {
    /// Weight of free memory after placement, as a fraction of the largest node. Default 1.
    pub memory: f64,
    /// Weight of idle CPU. Default 1.
    pub cpu: f64,
    /// Weight of the migration-time term (0..1 before weighting). Default 2.
    pub migration: f64,
    /// Weight of spread, `1 / (1 + vms)`. Default 0.5.
    pub spread: f64,
    /// Subtracted when the forecast bandwidth does not exceed the dirty rate. Default 100: more
    /// than all other terms together, so any converging node wins over any non-converging one, but
    /// a non-converging node is still returned when it is the only one that fits.
    pub non_convergence_penalty: f64,
    /// `T`: a migration of this many seconds scores half of `migration`. Default 60 s
    /// (non-positive or non-finite counts as the default).
    pub reference_migration_secs: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            memory: 1.0,
            cpu: 1.0,
            migration: 2.0,
            spread: 0.5,
            non_convergence_penalty: 100.0,
            reference_migration_secs: 60.0,
        }
    }
}

/// How many nodes were rejected for which reason. Each node counts once, under the first reason
/// in this order: dead, cordoned, source, forbidden, memory, vCPUs, anti-affinity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoFitReasons {
    /// Nodes in the view.
    pub nodes: usize,
    /// Not alive.
    pub dead: usize,
    /// Cordoned.
    pub cordoned: usize,
    /// The VM's own source node.
    pub source: usize,
    /// In the request's `forbidden` list.
    pub forbidden: usize,
    /// Alive and allowed but with less free memory than the VM needs.
    pub memory: usize,
    /// Enough memory but too few free vCPUs.
    pub vcpus: usize,
    /// Would fit but already runs a VM of the request's anti-affinity group.
    pub anti_affinity: usize,
    /// Memory the VM needs, bytes.
    pub memory_needed: u64,
    /// vCPUs the VM needs.
    pub vcpus_needed: u32,
    /// The most free memory on any alive, uncordoned, allowed node, bytes.
    pub largest_free_memory: u64,
    /// The most free vCPUs on any alive, uncordoned, allowed node.
    pub most_free_vcpus: u32,
    /// The request's anti-affinity group, if any.
    pub group: Option<String>,
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

impl fmt::Display for NoFitReasons {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nodes == 0 {
            return write!(f, "the view has no nodes (add them with update_node)");
        }
        write!(f, "of {} nodes", self.nodes)?;
        let counts = [
            (self.dead, "dead"),
            (self.cordoned, "cordoned"),
            (self.source, "the source"),
            (self.forbidden, "forbidden"),
            (self.memory, "short of memory"),
            (self.vcpus, "short of vCPUs"),
            (
                self.anti_affinity,
                "already running its anti-affinity group",
            ),
        ];
        for (n, what) in counts.iter().filter(|(n, _)| *n > 0) {
            write!(f, ", {n} {what}")?;
        }
        // The advice follows the most common reason.
        let top = counts.iter().max_by_key(|(n, _)| *n).map(|(_, w)| *w);
        let advice = match top {
            Some("dead") => "bring dead nodes back or add nodes".to_string(),
            Some("cordoned") => "uncordon a node".to_string(),
            Some("the source") | Some("forbidden") => {
                "allow more nodes (shorten the forbidden list) or add nodes".to_string()
            }
            Some("short of memory") => format!(
                "free memory on a node or add one: the VM needs {}, the largest free is {}",
                gib(self.memory_needed),
                gib(self.largest_free_memory)
            ),
            Some("short of vCPUs") => format!(
                "free vCPUs or add a node: the VM needs {}, the most free is {}",
                self.vcpus_needed, self.most_free_vcpus
            ),
            _ => format!(
                "add a node or relax anti-affinity group {:?}",
                self.group.as_deref().unwrap_or("")
            ),
        };
        write!(f, "; {advice}")
    }
}

/// ITP's errors.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ItpError {
    /// No node passes the hard filters.
    #[error("no node can take VM {vm:?} ({} and {} vCPUs): {reasons}", gib(reasons.memory_needed), reasons.vcpus_needed)]
    NoFit {
        /// The VM's name.
        vm: String,
        /// Why the nodes were rejected (boxed: keeps `Result`s small on the hot path).
        reasons: Box<NoFitReasons>,
    },
    /// The node is not in the view.
    #[error("node {0} is not in the placer's view")]
    UnknownNode(NodeId),
}
