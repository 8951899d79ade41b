//! The placement index: a max segment tree searched by branch and bound.

use crate::NodeId;
use crate::placer::State;
use crate::score::Query;

/// Per-subtree maxima. At a leaf they are the node's exact values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Agg {
    /// Static key (−∞ for a node that takes nothing).
    pub s: f64,
    /// Bandwidth from the index's source (0 for the source-less index).
    pub bw: f64,
    /// Free memory (0 for a node that takes nothing).
    pub mem: u64,
    /// Free vCPUs (0 for a node that takes nothing).
    pub vcpus: u32,
}

const EMPTY: Agg = Agg {
    s: f64::NEG_INFINITY,
    bw: 0.0,
    mem: 0,
    vcpus: 0,
};

/// The two children of one tree node, in one 64-byte cache line: the search reads both, and the
/// leaf-to-root walk reads a node's sibling next to it.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Pair([Agg; 2]);

/// `max` without the NaN handling of `f64::max` (no key or bandwidth is NaN).
#[inline]
fn max64(a: f64, b: f64) -> f64 {
    if a >= b { a } else { b }
}

#[inline]
fn combine(a: &Agg, b: &Agg) -> Agg {
    Agg {
        s: max64(a.s, b.s),
        bw: max64(a.bw, b.bw),
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
    /// The last search's winner and runner-up (slots; `u32::MAX` for none): evaluated first, they
    /// give the search a good lower bound to prune with from the start.
    hints: [u32; 2],
}

impl Index {
    fn leaf(st: &State, bw: f64, slot: u32) -> Agg {
        let s = st.static_key[slot as usize];
        if s == f64::NEG_INFINITY {
            return EMPTY;
        }
        let n = &st.nodes[slot as usize];
        Agg {
            s,
            bw,
            mem: n.memory_free,
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
            hints: [u32::MAX; 2],
        }
    }

    fn update(&mut self, st: &State, slot: u32, links: bool) {
        let leaf = self.pos[slot as usize] as usize;
        if links {
            self.bw[leaf] = Self::bw_of(st, self.source, slot);
        }
        let mut i = self.size + leaf;
        let mut new = Self::leaf(st, self.bw[leaf], slot);
        // Leaf-to-root: the parent is computed from the new value (in registers) and the sibling
        // next to it, never by re-reading what was just stored.
        loop {
            let pair = &mut self.agg[i >> 1];
            let k = i & 1;
            if pair.0[k] == new {
                break; // this node, and so its ancestors, unchanged
            }
            pair.0[k] = new;
            i >>= 1;
            if i == 0 {
                break;
            }
            new = combine(&new, &pair.0[k ^ 1]);
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

    /// The bound of tree node `i`: its max static key plus the migration term at its max
    /// bandwidth, or −∞ when it cannot fit. Branch-free (the outcomes are unpredictable, and a
    /// mispredicted branch costs more than the division): the same bits as `s + q.mig(bw)`.
    #[inline(always)]
    fn bound(&self, i: usize, q: &Query<'_>) -> f64 {
        let a = self.get(i);
        let fits = (a.mem >= q.memory) & (a.vcpus >= q.vcpus);
        let b = a.s + q.mig_select(a.bw);
        if fits { b } else { f64::NEG_INFINITY }
    }

    /// The slot with the highest `static key + mig` among the nodes that pass every filter, by
    /// depth-first branch and bound (better child first). At a leaf the bound *is* the node's key,
    /// so nothing is pruned that could beat the best found (a subtree whose bound only ties it
    /// holds at most a tie), and the result's score equals the full scan's.
    ///
    /// The last search's winner and runner-up are scored first: after a reservation they are
    /// usually still near the top, and a good first `best` prunes most of the tree. They only seed
    /// the lower bound, so the result's score does not depend on them; among exactly equal scores
    /// the first one found wins.
    ///
    /// Returns the slot and its bandwidth from the source.
    pub fn search(&mut self, st: &State, q: &Query<'_>) -> Option<(u32, f64)> {
        let mut best = f64::NEG_INFINITY;
        let mut best_slot = None;
        let mut runner_up = u32::MAX;
        for h in self.hints {
            if (h as usize) < self.pos.len() {
                let leaf = self.pos[h as usize] as usize;
                let b = self.bound(self.size + leaf, q);
                if b > best && st.extra_ok(h, q) {
                    best = b;
                    best_slot = Some((h, self.bw[leaf]));
                }
            }
        }
        // Depth-first: at most one pending sibling per level.
        let mut stack = [(0usize, 0.0f64); 48]; // depth <= 33: slots are u32
        let mut sp = 0;
        let (mut i, mut b) = (1, self.bound(1, q));
        loop {
            if b > best {
                if i >= self.size {
                    let slot = self.order[i - self.size];
                    if st.extra_ok(slot, q) {
                        best = b;
                        if let Some((prev, _)) = best_slot {
                            runner_up = prev;
                        }
                        best_slot = Some((slot, self.bw[i - self.size]));
                    }
                } else {
                    let (l, r) = (2 * i, 2 * i + 1);
                    let (bl, br) = (self.bound(l, q), self.bound(r, q));
                    // Go on with the better child; the other waits on the stack (pushed
                    // unconditionally, kept only if it can still win: no branch).
                    let left = bl >= br;
                    let (go, wait) = if left {
                        ((l, bl), (r, br))
                    } else {
                        ((r, br), (l, bl))
                    };
                    stack[sp] = wait;
                    sp += (wait.1 > best) as usize;
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
        if let Some((w, _)) = best_slot {
            if runner_up == u32::MAX {
                // The tree found nothing better than a hint: keep the other hint as runner-up.
                runner_up = if self.hints[0] == w {
                    self.hints[1]
                } else {
                    self.hints[0]
                };
            }
            self.hints = [w, runner_up];
        }
        best_slot
    }
}
