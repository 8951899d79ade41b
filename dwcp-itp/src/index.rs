//! The placement index: a max segment tree searched by branch and bound.

use crate::NodeId;
use crate::placer::State;
use crate::score::Query;

/// Per-subtree maxima, rounded *up* to 16 bytes so a node's two children share one 32-byte,
/// 32-aligned [`Pair`] (one cache line read per visited node, half the footprint of exact
/// values). They are upper bounds only: the search takes exact values at the leaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Agg {
    /// Static key, rounded up to `f32` (−∞ for a node that takes nothing).
    pub s: f32,
    /// Bandwidth from the index's source, rounded up to `f32` (0 for the source-less index).
    pub bw: f32,
    /// Free memory in MiB, rounded up, saturating (0 for a node that takes nothing).
    pub mem: u32,
    /// Free vCPUs (0 for a node that takes nothing).
    pub vcpus: u32,
}

const EMPTY: Agg = Agg {
    s: f32::NEG_INFINITY,
    bw: 0.0,
    mem: 0,
    vcpus: 0,
};

/// The two children of tree node `i` live in `pairs[i]` (`pairs[0][1]` is the root).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
struct Pair([Agg; 2]);

/// The smallest `f32` that is `>= x` (`x` is not NaN).
#[inline]
fn up32(x: f64) -> f32 {
    let f = x as f32;
    if f as f64 >= x {
        f
    } else if f == 0.0 {
        f32::from_bits(1) // the smallest positive subnormal
    } else if f > 0.0 {
        f32::from_bits(f.to_bits() + 1)
    } else {
        f32::from_bits(f.to_bits() - 1) // towards zero (also −∞ → −f32::MAX)
    }
}

/// Memory in MiB, rounded up and saturating at `u32::MAX`. Monotone, so `mib_up(free) <
/// mib_up(need)` implies `free < need`: a subtree pruned by it cannot fit.
#[inline]
pub(crate) fn mib_up(bytes: u64) -> u32 {
    bytes.div_ceil(1 << 20).min(u32::MAX as u64) as u32
}

#[inline]
fn max32(a: f32, b: f32) -> f32 {
    if a >= b { a } else { b }
}

#[inline]
fn combine(a: &Agg, b: &Agg) -> Agg {
    Agg {
        s: max32(a.s, b.s),
        bw: max32(a.bw, b.bw),
        mem: a.mem.max(b.mem),
        vcpus: a.vcpus.max(b.vcpus),
    }
}

/// Set in a change-log entry when the node's bandwidth forecasts changed.
pub(crate) const LINK_FLAG: u32 = 1 << 31;

/// One tree: for source-less requests, or for the requests from one source node.
#[derive(Debug, Clone)]
pub(crate) struct Index {
    source: Option<NodeId>,
    size: usize,
    /// Leaf → node slot.
    order: Vec<u32>,
    /// Node slot → leaf.
    pos: Vec<u32>,
    /// Tree node `i` is `agg[i / 2].0[i % 2]`: the root is 1, leaf `l` is `size + l`, and the
    /// children of `i` are `agg[i]`.
    agg: Vec<Pair>,
    /// Per leaf: bandwidth from the source, also for nodes that take nothing now (so a reservation
    /// or a cordon does not look it up again).
    bw: Vec<f64>,
    /// Change-log position this index has applied up to (absolute).
    seen: u64,
    /// Bandwidth changes applied since the leaves were sorted.
    link_changes: usize,
    /// For the LRU of per-source indexes.
    pub last_use: u64,
}

impl Index {
    fn leaf(st: &State, bw: f64, slot: u32) -> Agg {
        let s = st.static_key[slot as usize];
        if s == f64::NEG_INFINITY {
            return EMPTY;
        }
        let n = &st.nodes[slot as usize];
        Agg {
            s: up32(s),
            bw: up32(bw),
            mem: mib_up(n.memory_free),
            vcpus: n.vcpus_free,
        }
    }

    #[inline]
    fn get(&self, i: usize) -> &Agg {
        &self.agg[i >> 1].0[i & 1]
    }

    fn bw_of(st: &State, source: Option<NodeId>, slot: u32) -> f64 {
        source.map_or(0.0, |src| st.bw(src, slot))
    }

    /// Builds the tree; a per-source tree has its leaves sorted by bandwidth from the source, so
    /// subtrees cover narrow bandwidth ranges and their bounds are tight.
    pub fn build(st: &State, source: Option<NodeId>) -> Index {
        let n = st.nodes.len();
        let by_slot: Vec<f64> = (0..n as u32).map(|s| Self::bw_of(st, source, s)).collect();
        let mut order: Vec<u32> = (0..n as u32).collect();
        if source.is_some() {
            order.sort_by(|&a, &b| {
                by_slot[b as usize]
                    .total_cmp(&by_slot[a as usize])
                    .then(a.cmp(&b))
            });
        }
        let size = n.max(1).next_power_of_two();
        let mut pos = vec![0u32; n];
        let mut agg = vec![Pair([EMPTY; 2]); size];
        let mut bw = vec![0.0; n];
        for (leaf, &slot) in order.iter().enumerate() {
            pos[slot as usize] = leaf as u32;
            bw[leaf] = by_slot[slot as usize];
            let i = size + leaf;
            agg[i >> 1].0[i & 1] = Self::leaf(st, bw[leaf], slot);
        }
        for i in (1..size).rev() {
            let Pair([l, r]) = agg[i];
            agg[i >> 1].0[i & 1] = combine(&l, &r);
        }
        Index {
            source,
            size,
            order,
            pos,
            agg,
            bw,
            seen: st.log_base + st.log.len() as u64,
            link_changes: 0,
            last_use: 0,
        }
    }

    fn update(&mut self, st: &State, slot: u32, links: bool) {
        let leaf = self.pos[slot as usize] as usize;
        if links {
            self.bw[leaf] = Self::bw_of(st, self.source, slot);
        }
        let mut i = self.size + leaf;
        let mut new = Self::leaf(st, self.bw[leaf], slot);
        // Fused leaf-to-root walk: node `i` sits in `agg[i / 2]`, and `agg[i]` holds its two
        // children, so each step reads one pair and writes one entry.
        loop {
            let cell = &mut self.agg[i >> 1].0[i & 1];
            if *cell == new {
                break; // this node, and so its ancestors, unchanged
            }
            *cell = new;
            i >>= 1;
            if i == 0 {
                break;
            }
            let Pair([l, r]) = &self.agg[i];
            new = combine(l, r);
        }
    }

    /// Applies the node changes logged since this index last looked.
    pub fn catch_up(&mut self, st: &State) {
        if self.seen < st.log_base || self.pos.len() != st.nodes.len() {
            let last_use = self.last_use;
            *self = Index::build(st, self.source);
            self.last_use = last_use;
            return;
        }
        let start = (self.seen - st.log_base) as usize;
        for &e in &st.log[start..] {
            let links = e & LINK_FLAG != 0;
            self.link_changes += links as usize;
            self.update(st, e & !LINK_FLAG, links);
        }
        self.seen = st.log_base + st.log.len() as u64;
        // Forecast changes leave the bandwidth order stale: still exact, but bounds loosen.
        if self.source.is_some() && self.link_changes > st.nodes.len() / 4 + 1 {
            let last_use = self.last_use;
            *self = Index::build(st, self.source);
            self.last_use = last_use;
        }
    }

    /// An upper bound of the score (`static key + mig`) of the nodes under tree node `i` that fit,
    /// or −∞ when none fits or none can beat `best`. At a leaf it is the node's exact key, from the
    /// state (the tree's values are rounded up).
    #[inline]
    fn bound(&self, st: &State, i: usize, q: &Query<'_>, best: f64) -> f64 {
        let a = self.get(i);
        if a.mem < q.mem_mib || a.vcpus < q.vcpus || a.s as f64 + q.mig_max() <= best {
            return f64::NEG_INFINITY; // cannot fit, or cannot win even with the best migration
        }
        if i < self.size {
            return a.s as f64 + q.mig(a.bw as f64);
        }
        let leaf = i - self.size;
        let slot = self.order[leaf] as usize;
        let s = st.static_key[slot];
        let n = &st.nodes[slot];
        if n.memory_free < q.memory || n.vcpus_free < q.vcpus || s + q.mig_max() <= best {
            return f64::NEG_INFINITY;
        }
        s + q.mig(self.bw[leaf])
    }

    /// The slot with the highest `static key + mig` among the nodes that pass every filter, by
    /// depth-first branch and bound (better child first). At a leaf the bound *is* the node's key,
    /// so nothing is pruned that could beat or tie the best found, and the result's score equals
    /// the full scan's.
    ///
    /// Returns the slot and its bandwidth from the source.
    pub fn search(&self, st: &State, q: &Query<'_>) -> Option<(u32, f64)> {
        let mut best = f64::NEG_INFINITY;
        let mut best_slot = None;
        // Depth-first: at most one pending sibling per level.
        let mut stack = [(0usize, 0.0f64); 48]; // depth <= 33: slots are u32
        let mut sp = 0;
        let (mut i, mut b) = (1, self.bound(st, 1, q, best));
        loop {
            if b > best {
                if i >= self.size {
                    let slot = self.order[i - self.size];
                    if st.extra_ok(slot, q) {
                        best = b;
                        best_slot = Some((slot, self.bw[i - self.size]));
                    }
                } else {
                    let (l, r) = (2 * i, 2 * i + 1);
                    let (bl, br) = (self.bound(st, l, q, best), self.bound(st, r, q, best));
                    // Go on with the better child; the other waits on the stack.
                    let (go, wait) = if bl >= br {
                        ((l, bl), (r, br))
                    } else {
                        ((r, br), (l, bl))
                    };
                    if wait.1 > best {
                        stack[sp] = wait;
                        sp += 1;
                    }
                    (i, b) = go;
                    continue;
                }
            }
            if sp == 0 {
                break;
            }
            sp -= 1;
            (i, b) = stack[sp];
        }
        best_slot
    }
}
