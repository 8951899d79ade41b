//! The placer: node state, reservations, and the indexes over it.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::index::{Index, LINK_FLAG};
use crate::score::{self, Query};
use crate::{
    ItpError, NoFitReasons, NodeId, NodeView, Placement, ScoreBreakdown, VmRequest, Weights,
};

/// A multiplicative hasher for node ids (trusted, cluster-assigned integers): SipHash would cost
/// more than the rest of a decision's bookkeeping.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (n >> 32);
    }
}

type IdMap<V> = HashMap<NodeId, V, BuildHasherDefault<IdHasher>>;

/// Why a node cannot take a request (in the order [`NoFitReasons`] counts them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reject {
    Dead,
    Cordoned,
    Source,
    Forbidden,
    Memory,
    Vcpus,
    AntiAffinity,
}

/// Everything but the indexes (so an index can be updated while reading the state).
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub weights: Weights,
    /// By slot; `memory_free`, `vcpus_free`, `vms` and `anti_affinity_groups` include reservations.
    /// `link_to` is kept sorted by source.
    pub nodes: Vec<NodeView>,
    pub slot_of: IdMap<u32>,
    /// Per slot: (interned group, VM count), so `release` can tell when a group leaves a node.
    pub groups: Vec<Vec<(u32, u32)>>,
    pub group_ids: HashMap<String, u32>,
    pub static_key: Vec<f64>,
    /// `M`: the largest `memory_total` seen (at least 1).
    pub mem_norm: f64,
    /// Slots changed since `log_base` (with [`LINK_FLAG`] when forecasts changed).
    pub log: Vec<u32>,
    pub log_base: u64,
}

impl State {
    /// Forecast bandwidth from `source` into `slot`, 0 when there is none.
    #[inline]
    pub fn bw(&self, source: NodeId, slot: u32) -> f64 {
        let links = &self.nodes[slot as usize].link_to;
        match links.binary_search_by_key(&source, |&(s, _)| s) {
            Ok(i) => links[i].1,
            Err(_) => 0.0,
        }
    }

    fn touch(&mut self, slot: u32, links: bool) {
        if self.log.len() >= 4 * self.nodes.len() + 64 {
            // Indexes that are behind rebuild instead of replaying.
            self.log_base += self.log.len() as u64;
            self.log.clear();
        }
        self.log.push(slot | if links { LINK_FLAG } else { 0 });
    }

    /// Forces every index to rebuild (node added, `M` changed).
    fn invalidate(&mut self) {
        self.log_base += self.log.len() as u64 + 1;
        self.log.clear();
    }

    fn recompute(&mut self, slot: u32) {
        self.static_key[slot as usize] =
            score::static_key(&self.weights, self.mem_norm, &self.nodes[slot as usize]);
    }

    pub fn query<'a>(&self, req: &'a VmRequest, source: Option<NodeId>) -> Query<'a> {
        let w = &self.weights;
        Query {
            memory: req.memory,
            vcpus: req.vcpus,
            source,
            source_slot: source.and_then(|s| self.slot_of.get(&s).copied()),
            dirty_rate: if req.dirty_rate > 0.0 {
                req.dirty_rate
            } else {
                0.0
            },
            c: req.memory as f64 / w.reference_migration_secs,
            w_mig: w.migration,
            penalty: w.non_convergence_penalty,
            gid: req
                .anti_affinity
                .as_ref()
                .and_then(|g| self.group_ids.get(g).copied()),
            forbidden: &req.forbidden,
            mem_const: w.memory * (req.memory as f64 / self.mem_norm),
        }
    }

    /// The filters the index does not aggregate: source, forbidden, anti-affinity.
    #[inline]
    pub fn extra_ok(&self, slot: u32, q: &Query<'_>) -> bool {
        if q.source_slot == Some(slot) {
            return false;
        }
        if !q.forbidden.is_empty() && q.forbidden.contains(&self.nodes[slot as usize].id) {
            return false;
        }
        match q.gid {
            Some(g) => !self.groups[slot as usize].iter().any(|&(h, _)| h == g),
            None => true,
        }
    }

    /// Every filter, in the order reasons are counted.
    pub fn check(&self, slot: u32, q: &Query<'_>) -> Result<(), Reject> {
        let n = &self.nodes[slot as usize];
        if !n.alive {
            return Err(Reject::Dead);
        }
        if n.cordoned {
            return Err(Reject::Cordoned);
        }
        if q.source_slot == Some(slot) {
            return Err(Reject::Source);
        }
        if q.forbidden.contains(&n.id) {
            return Err(Reject::Forbidden);
        }
        if n.memory_free < q.memory {
            return Err(Reject::Memory);
        }
        if n.vcpus_free < q.vcpus {
            return Err(Reject::Vcpus);
        }
        if let Some(g) = q.gid
            && self.groups[slot as usize].iter().any(|&(h, _)| h == g)
        {
            return Err(Reject::AntiAffinity);
        }
        Ok(())
    }

    fn bw_for(&self, q: &Query<'_>, slot: u32) -> f64 {
        q.source.map_or(0.0, |s| self.bw(s, slot))
    }

    /// The score of a node that passed the filters, `bandwidth` from the request's source.
    #[inline]
    pub fn score(&self, slot: u32, q: &Query<'_>, bandwidth: f64) -> f64 {
        q.total(self.static_key[slot as usize] + q.mig(bandwidth))
    }

    fn placement(&self, slot: u32, q: &Query<'_>, bandwidth: f64) -> Placement {
        let n = &self.nodes[slot as usize];
        let w = &self.weights;
        let migration = q.mig(bandwidth);
        let converges = q.source.is_none() || bandwidth > q.dirty_rate;
        Placement {
            node: n.id,
            score: self.score(slot, q, bandwidth),
            parts: ScoreBreakdown {
                headroom: w.memory * ((n.memory_free - q.memory) as f64 / self.mem_norm),
                cpu: w.cpu * score::cpu_free(n.cpu_load),
                spread: w.spread * score::spread(n.vms),
                migration,
                bandwidth,
                migration_secs: (q.source.is_some() && converges)
                    .then(|| q.memory as f64 / (bandwidth - q.dirty_rate)),
                converges,
            },
        }
    }

    fn no_fit(&self, req: &VmRequest, q: &Query<'_>) -> ItpError {
        let mut r = NoFitReasons {
            nodes: self.nodes.len(),
            memory_needed: req.memory,
            vcpus_needed: req.vcpus,
            group: req.anti_affinity.clone(),
            ..NoFitReasons::default()
        };
        for slot in 0..self.nodes.len() as u32 {
            let res = self.check(slot, q);
            if matches!(
                res,
                Ok(()) | Err(Reject::Memory | Reject::Vcpus | Reject::AntiAffinity)
            ) {
                let n = &self.nodes[slot as usize];
                r.largest_free_memory = r.largest_free_memory.max(n.memory_free);
                r.most_free_vcpus = r.most_free_vcpus.max(n.vcpus_free);
            }
            match res {
                Ok(()) => {}
                Err(Reject::Dead) => r.dead += 1,
                Err(Reject::Cordoned) => r.cordoned += 1,
                Err(Reject::Source) => r.source += 1,
                Err(Reject::Forbidden) => r.forbidden += 1,
                Err(Reject::Memory) => r.memory += 1,
                Err(Reject::Vcpus) => r.vcpus += 1,
                Err(Reject::AntiAffinity) => r.anti_affinity += 1,
            }
        }
        ItpError::NoFit {
            vm: req.vm.clone(),
            reasons: Box::new(r),
        }
    }

    fn intern(&mut self, g: &str) -> u32 {
        if let Some(&id) = self.group_ids.get(g) {
            return id;
        }
        let id = self.group_ids.len() as u32;
        self.group_ids.insert(g.to_string(), id);
        id
    }

    /// `gid` is the request's group if already interned (the query looked it up), saving a lookup.
    fn reserve(&mut self, slot: u32, req: &VmRequest, gid: Option<u32>) {
        let gid = gid.or_else(|| req.anti_affinity.as_deref().map(|g| self.intern(g)));
        let n = &mut self.nodes[slot as usize];
        n.memory_free -= req.memory;
        n.vcpus_free -= req.vcpus;
        n.vms = n.vms.saturating_add(1);
        if let (Some(g), Some(name)) = (gid, req.anti_affinity.as_ref()) {
            let groups = &mut self.groups[slot as usize];
            match groups.iter_mut().find(|(h, _)| *h == g) {
                Some((_, c)) => *c += 1,
                None => {
                    groups.push((g, 1));
                    n.anti_affinity_groups.push(name.clone());
                }
            }
        }
        self.recompute(slot);
        self.touch(slot, false);
    }

    /// Normalises a view and installs it in `slot` (which must exist).
    fn install(&mut self, slot: u32, mut v: NodeView) {
        v.memory_free = v.memory_free.min(v.memory_total);
        for l in &mut v.link_to {
            l.1 = score::sanitize_bw(l.1);
        }
        v.link_to.sort_by_key(|&(s, _)| s); // stable: the first of duplicates stays first
        v.link_to.dedup_by_key(|&mut (s, _)| s);
        v.anti_affinity_groups.sort();
        v.anti_affinity_groups.dedup();
        let groups = v
            .anti_affinity_groups
            .iter()
            .map(|g| (self.intern(g), 1))
            .collect();
        self.groups[slot as usize] = groups;
        self.nodes[slot as usize] = v;
    }
}

/// The placement engine over one view of the cluster. See the crate documentation.
#[derive(Debug, Clone)]
pub struct Placer {
    st: State,
    /// For requests without a source.
    base: Index,
    /// One per source node, built on first use, least recently used evicted past the limit.
    by_source: IdMap<Index>,
    source_index_limit: usize,
    tick: u64,
}

/// Default bound on per-source indexes (~80 KiB each at 1000 nodes).
const DEFAULT_SOURCE_INDEXES: usize = 64;

impl Placer {
    /// A placer over `nodes` (a later duplicate id replaces an earlier one).
    pub fn new(nodes: Vec<NodeView>, weights: Weights) -> Placer {
        let mut st = State {
            weights: score::sanitize(weights),
            nodes: Vec::with_capacity(nodes.len()),
            slot_of: IdMap::default(),
            groups: Vec::with_capacity(nodes.len()),
            group_ids: HashMap::new(),
            static_key: Vec::with_capacity(nodes.len()),
            mem_norm: 1.0,
            log: Vec::new(),
            log_base: 0,
        };
        for v in nodes {
            let slot = match st.slot_of.get(&v.id) {
                Some(&s) => s,
                None => {
                    let s = st.nodes.len() as u32;
                    st.slot_of.insert(v.id, s);
                    st.nodes.push(NodeView::default());
                    st.groups.push(Vec::new());
                    st.static_key.push(f64::NEG_INFINITY);
                    s
                }
            };
            st.mem_norm = st.mem_norm.max(v.memory_total as f64);
            st.install(slot, v);
        }
        for slot in 0..st.nodes.len() as u32 {
            st.recompute(slot);
        }
        let base = Index::build(&st, None);
        Placer {
            st,
            base,
            by_source: IdMap::default(),
            source_index_limit: DEFAULT_SOURCE_INDEXES,
            tick: 0,
        }
    }

    /// The weights in use (after sanitising).
    pub fn weights(&self) -> &Weights {
        &self.st.weights
    }

    /// Number of nodes in the view.
    pub fn len(&self) -> usize {
        self.st.nodes.len()
    }

    /// Whether the view has no nodes.
    pub fn is_empty(&self) -> bool {
        self.st.nodes.is_empty()
    }

    /// The current view of a node, reservations included.
    pub fn node(&self, id: NodeId) -> Option<&NodeView> {
        self.st
            .slot_of
            .get(&id)
            .map(|&s| &self.st.nodes[s as usize])
    }

    /// All nodes, in insertion order, reservations included.
    pub fn nodes(&self) -> &[NodeView] {
        &self.st.nodes
    }

    /// How many per-source indexes are kept (least recently used evicted; at least 1; default
    /// 64). Each reservation is replayed lazily into every index, so the limit bounds memory, not
    /// the cost of a decision.
    pub fn set_source_index_limit(&mut self, limit: usize) {
        self.source_index_limit = limit.max(1);
        while self.by_source.len() > self.source_index_limit {
            self.evict_one();
        }
    }

    fn evict_one(&mut self) {
        if let Some((&k, _)) = self.by_source.iter().min_by_key(|(_, i)| i.last_use) {
            self.by_source.remove(&k);
        }
    }

    /// Inserts a node or replaces its view. The new view is the truth: reservations made on the old
    /// one are gone (they are expected to show up in the fresh `memory_free`, `vms`, ...).
    pub fn update_node(&mut self, view: NodeView) {
        let st = &mut self.st;
        let grew = view.memory_total as f64 > st.mem_norm;
        st.mem_norm = st.mem_norm.max(view.memory_total as f64);
        match st.slot_of.get(&view.id).copied() {
            Some(slot) => {
                let links_changed = st.nodes[slot as usize].link_to != view.link_to;
                st.install(slot, view);
                st.recompute(slot);
                st.touch(slot, links_changed);
            }
            None => {
                let slot = st.nodes.len() as u32;
                st.slot_of.insert(view.id, slot);
                st.nodes.push(NodeView::default());
                st.groups.push(Vec::new());
                st.static_key.push(f64::NEG_INFINITY);
                st.install(slot, view);
                st.recompute(slot);
                st.invalidate();
            }
        }
        if grew {
            for slot in 0..st.nodes.len() as u32 {
                st.recompute(slot);
            }
            st.invalidate();
        }
    }

    /// Cordons (no new VMs) or uncordons a node.
    pub fn set_cordoned(&mut self, id: NodeId, cordoned: bool) -> Result<(), ItpError> {
        let slot = *self.st.slot_of.get(&id).ok_or(ItpError::UnknownNode(id))?;
        if self.st.nodes[slot as usize].cordoned != cordoned {
            self.st.nodes[slot as usize].cordoned = cordoned;
            self.st.recompute(slot);
            self.st.touch(slot, false);
        }
        Ok(())
    }

    /// Gives back what placing `req` on `node` reserved (a migration that did not happen).
    /// Saturating: never frees more than `memory_total`.
    pub fn release(&mut self, node: NodeId, req: &VmRequest) -> Result<(), ItpError> {
        let slot = *self
            .st
            .slot_of
            .get(&node)
            .ok_or(ItpError::UnknownNode(node))?;
        let gid = req
            .anti_affinity
            .as_ref()
            .and_then(|g| self.st.group_ids.get(g).copied());
        let st = &mut self.st;
        let n = &mut st.nodes[slot as usize];
        n.memory_free = n.memory_free.saturating_add(req.memory).min(n.memory_total);
        n.vcpus_free = n.vcpus_free.saturating_add(req.vcpus);
        n.vms = n.vms.saturating_sub(1);
        if let Some(g) = gid {
            let groups = &mut st.groups[slot as usize];
            if let Some(i) = groups.iter().position(|&(h, _)| h == g) {
                groups[i].1 -= 1;
                if groups[i].1 == 0 {
                    groups.swap_remove(i);
                    let name = req.anti_affinity.as_deref().unwrap_or_default();
                    n.anti_affinity_groups.retain(|x| x != name);
                }
            }
        }
        st.recompute(slot);
        st.touch(slot, false);
        Ok(())
    }

    /// The best node for `req` by the index, and the query it was found with.
    fn find<'a>(
        &mut self,
        req: &'a VmRequest,
        source: Option<NodeId>,
    ) -> Result<(u32, f64, Query<'a>), ItpError> {
        self.tick += 1;
        let idx = match source {
            None => &mut self.base,
            Some(s) => {
                if !self.by_source.contains_key(&s) {
                    if self.by_source.len() >= self.source_index_limit {
                        self.evict_one();
                    }
                    self.by_source.insert(s, Index::build(&self.st, Some(s)));
                }
                match self.by_source.get_mut(&s) {
                    Some(i) => i,
                    None => unreachable!("inserted above"),
                }
            }
        };
        idx.last_use = self.tick;
        idx.catch_up(&self.st);
        let q = self.st.query(req, source);
        match idx.search(&self.st, &q) {
            Some((slot, bw)) => Ok((slot, bw, q)),
            None => Err(self.st.no_fit(req, &q)),
        }
    }

    fn place_from(
        &mut self,
        req: &VmRequest,
        source: Option<NodeId>,
    ) -> Result<Placement, ItpError> {
        let (slot, bw, q) = self.find(req, source)?;
        let p = self.st.placement(slot, &q, bw);
        let gid = q.gid;
        self.st.reserve(slot, req, gid);
        Ok(p)
    }

    /// Places `req` on the best node and reserves its memory, vCPUs, a VM slot and its
    /// anti-affinity group there, so the next decision sees them.
    pub fn place(&mut self, req: &VmRequest) -> Result<Placement, ItpError> {
        self.place_from(req, req.source)
    }

    /// The node `place` would choose, without reserving anything.
    pub fn best(&mut self, req: &VmRequest) -> Result<Placement, ItpError> {
        let (slot, bw, q) = self.find(req, req.source)?;
        Ok(self.st.placement(slot, &q, bw))
    }

    /// The reference: the best node by scoring every node (O(nodes)), without reserving. Same best
    /// score as [`Placer::best`]; among equal scores the first node in insertion order.
    pub fn best_by_scan(&self, req: &VmRequest) -> Result<Placement, ItpError> {
        let q = self.st.query(req, req.source);
        let mut best: Option<(u32, f64, f64)> = None;
        for slot in 0..self.st.nodes.len() as u32 {
            if self.st.check(slot, &q).is_err() {
                continue;
            }
            let bw = self.st.bw_for(&q, slot);
            let s = self.st.score(slot, &q, bw);
            if best.is_none_or(|(_, b, _)| s > b) {
                best = Some((slot, s, bw));
            }
        }
        match best {
            Some((slot, _, bw)) => Ok(self.st.placement(slot, &q, bw)),
            None => Err(self.st.no_fit(req, &q)),
        }
    }

    /// [`Placer::best_by_scan`], then reserve like [`Placer::place`] (for comparisons).
    pub fn place_by_scan(&mut self, req: &VmRequest) -> Result<Placement, ItpError> {
        let p = self.best_by_scan(req)?;
        let slot = self.st.slot_of[&p.node];
        self.st.reserve(slot, req, None);
        Ok(p)
    }

    /// Places several VMs, hardest first: by memory, then vCPUs, then those with an anti-affinity
    /// group, then those with more forbidden nodes, then input order. Results are in input order.
    pub fn place_batch(&mut self, reqs: &[VmRequest]) -> Vec<Result<Placement, ItpError>> {
        self.batch(reqs, |r| r.source)
    }

    fn batch(
        &mut self,
        reqs: &[VmRequest],
        source: impl Fn(&VmRequest) -> Option<NodeId>,
    ) -> Vec<Result<Placement, ItpError>> {
        let mut order: Vec<usize> = (0..reqs.len()).collect();
        order.sort_by(|&a, &b| {
            let (x, y) = (&reqs[a], &reqs[b]);
            y.memory
                .cmp(&x.memory)
                .then(y.vcpus.cmp(&x.vcpus))
                .then(y.anti_affinity.is_some().cmp(&x.anti_affinity.is_some()))
                .then(y.forbidden.len().cmp(&x.forbidden.len()))
                .then(a.cmp(&b))
        });
        let mut out: Vec<Option<Result<Placement, ItpError>>> = vec![None; reqs.len()];
        for i in order {
            out[i] = Some(self.place_from(&reqs[i], source(&reqs[i])));
        }
        out.into_iter().flatten().collect()
    }

    /// Evacuates `node`: cordons it (it stays cordoned) and places every VM in `vms` elsewhere as
    /// [`Placer::place_batch`] does, with `node` as the source whatever `source` says.
    pub fn evacuate(
        &mut self,
        node: NodeId,
        vms: &[VmRequest],
    ) -> Result<Vec<Result<Placement, ItpError>>, ItpError> {
        self.set_cordoned(node, true)?;
        Ok(self.batch(vms, |_| Some(node)))
    }
}
