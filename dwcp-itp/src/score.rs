//! The score's pieces, shared by the index and the reference scan so both compute the same bits.

use crate::{NodeId, NodeView, Weights};

/// Weights with negative / non-finite values replaced (see [`Weights`]).
pub(crate) fn sanitize(w: Weights) -> Weights {
    let z = |x: f64| if x.is_finite() && x > 0.0 { x } else { 0.0 };
    Weights {
        memory: z(w.memory),
        cpu: z(w.cpu),
        migration: z(w.migration),
        spread: z(w.spread),
        non_convergence_penalty: z(w.non_convergence_penalty),
        reference_migration_secs: if w.reference_migration_secs.is_finite()
            && w.reference_migration_secs > 0.0
        {
            w.reference_migration_secs
        } else {
            Weights::default().reference_migration_secs
        },
    }
}

pub(crate) fn sanitize_bw(b: f64) -> f64 {
    if b.is_finite() && b > 0.0 { b } else { 0.0 }
}

pub(crate) fn cpu_free(load: f64) -> f64 {
    if load.is_nan() {
        0.0
    } else {
        1.0 - load.clamp(0.0, 1.0)
    }
}

pub(crate) fn spread(vms: u32) -> f64 {
    1.0 / (1.0 + vms as f64)
}

/// The request-independent part of the score: `w.memory·free/M + w.cpu·(1−load) + w.spread/(1+vms)`,
/// or −∞ for a node that takes nothing (dead or cordoned).
pub(crate) fn static_key(w: &Weights, mem_norm: f64, n: &NodeView) -> f64 {
    if !n.alive || n.cordoned {
        return f64::NEG_INFINITY;
    }
    w.memory * (n.memory_free as f64 / mem_norm)
        + w.cpu * cpu_free(n.cpu_load)
        + w.spread * spread(n.vms)
}

/// A request, preprocessed for one decision.
#[derive(Debug)]
pub(crate) struct Query<'a> {
    pub memory: u64,
    pub vcpus: u32,
    pub source: Option<NodeId>,
    pub source_slot: Option<u32>,
    pub dirty_rate: f64,
    /// `memory / T`.
    pub c: f64,
    pub w_mig: f64,
    pub penalty: f64,
    /// The interned anti-affinity group; `None` also when no node has the group yet.
    pub gid: Option<u32>,
    pub forbidden: &'a [NodeId],
    /// `w.memory · memory / M`, the same for every node.
    pub mem_const: f64,
}

impl Query<'_> {
    /// The migration term. Monotone non-decreasing in `bw` also in floating point (every step is
    /// a monotone rounding of a monotone operation), which the index's bounds rely on.
    #[inline]
    pub fn mig(&self, bw: f64) -> f64 {
        if self.source.is_none() {
            return 0.0;
        }
        let x = bw - self.dirty_rate;
        if x > 0.0 {
            // = 1 / (1 + t/T) with t = memory / x.
            self.w_mig * (1.0 - self.c / (x + self.c))
        } else {
            -self.penalty
        }
    }

    /// [`Query::mig`] (the same bits) computed without a data-dependent branch: both outcomes are
    /// computed and one is selected.
    #[inline(always)]
    pub fn mig_select(&self, bw: f64) -> f64 {
        if self.source.is_none() {
            return 0.0;
        }
        let x = bw - self.dirty_rate;
        let v = self.w_mig * (1.0 - self.c / (x + self.c));
        if x > 0.0 { v } else { -self.penalty }
    }

    /// The full score from the static key and the bandwidth.
    #[inline]
    pub fn total(&self, key: f64) -> f64 {
        key - self.mem_const
    }
}
