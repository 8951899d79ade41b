//! What a node knows of the cluster: [`ClusterView`] and the tracker that builds it from
//! chitchat's state.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use chitchat::{Chitchat, ChitchatId};
use serde::Serialize;
use tokio::time::Instant;
use tracing::warn;

use crate::NodeState;
use crate::keys::{ADDR, LINKS, RES};
use crate::state::{Addr, Links, Res, assemble, decode_addr, decode_links, decode_res};

/// Liveness of every known node id, as the failure detector sees it now.
pub type Liveness = BTreeMap<u64, bool>;

/// One node as this node sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeView {
    /// The node's id.
    pub node_id: u64,
    /// Its incarnation: a node restarted gets a larger one, and only the largest is shown.
    pub generation: u64,
    /// The address it gossips on.
    pub gossip_addr: SocketAddr,
    /// Its latest state that this node has received and accepted; `None` before the first valid
    /// publish arrived (or if every value it sent was malformed).
    pub state: Option<NodeState>,
    /// Alive per chitchat's phi-accrual failure detector (always true for this node itself).
    pub alive: bool,
    /// Time since this node last saw the peer's state change or its heartbeat advance, on this
    /// node's monotonic clock (zero for itself). While the peer lives this stays within a few
    /// gossip rounds (docs/ass.md); once it is dead it grows until the peer is forgotten.
    pub staleness: Duration,
    /// The peer's heartbeat counter as last seen.
    pub heartbeat: u64,
}

/// Every node this node knows of, by id.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterView {
    /// The id of the node that took the view.
    pub self_id: u64,
    /// The nodes, this one included.
    pub nodes: BTreeMap<u64, NodeView>,
}

impl ClusterView {
    /// The view of node `id`, if known.
    pub fn get(&self, id: u64) -> Option<&NodeView> {
        self.nodes.get(&id)
    }

    /// The nodes the failure detector considers alive.
    pub fn alive(&self) -> impl Iterator<Item = &NodeView> {
        self.nodes.values().filter(|n| n.alive)
    }

    /// The largest staleness among live peers: how old the freshest-possible knowledge of the
    /// worst-known live peer is.
    pub fn max_live_staleness(&self) -> Duration {
        self.alive().map(|n| n.staleness).max().unwrap_or_default()
    }
}

/// The last good decoded value of one key, and the version it was decoded at.
#[derive(Debug)]
struct Slot<T> {
    version: u64,
    good: Option<T>,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot {
            version: 0,
            good: None,
        }
    }
}

impl<T> Slot<T> {
    /// Decodes the key again only when its version moved, so a bad value is logged once, not on
    /// every view, and a view of 100 nodes does not re-parse 300 JSON values.
    fn update(
        &mut self,
        cid: &ChitchatId,
        node: &chitchat::NodeState,
        key: &str,
        decode: fn(&str) -> Result<T, String>,
    ) {
        let Some(vv) = node.get_versioned(key) else {
            return;
        };
        if vv.version == self.version {
            return;
        }
        self.version = vv.version;
        if vv.is_deleted() {
            // ASS never deletes its keys; a tombstone is someone else's doing. Keep the last
            // good value rather than blanking a node that is otherwise fine.
            warn!(node = %cid.node_id, key, "ignoring deletion of an ASS key");
            return;
        }
        match decode(&vv.value) {
            Ok(v) => self.good = Some(v),
            Err(reason) => warn!(
                node = %cid.node_id,
                generation = cid.generation_id,
                key,
                version = vv.version,
                %reason,
                "ignoring malformed peer value"
            ),
        }
    }
}

/// What the tracker remembers of one chitchat node (one incarnation of one node id).
#[derive(Debug)]
struct Tracked {
    node_id: u64,
    heartbeat: u64,
    max_version: u64,
    last_change: Instant,
    alive: bool,
    epoch: u64,
    res: Slot<Res>,
    addr: Slot<Addr>,
    links: Slot<Links>,
}

/// Turns chitchat's per-incarnation key-value state into per-node-id views, remembering what
/// chitchat does not expose: when each peer's heartbeat last advanced.
#[derive(Debug)]
pub(crate) struct Tracker {
    self_cid: ChitchatId,
    nodes: HashMap<ChitchatId, Tracked>,
    epoch: u64,
    /// chitchat node ids that are not ASS node ids, already reported (logged once each).
    foreign: HashSet<String>,
}

/// ASS node ids are decimal u64 in canonical form, so that "7" and "+7" cannot be two nodes.
fn parse_node_id(s: &str) -> Option<u64> {
    let id: u64 = s.parse().ok()?;
    (id.to_string() == s).then_some(id)
}

impl Tracker {
    pub(crate) fn new(self_cid: ChitchatId) -> Self {
        Tracker {
            self_cid,
            nodes: HashMap::new(),
            epoch: 0,
            foreign: HashSet::new(),
        }
    }

    /// Catches up with chitchat's state. Called by the sampler task every half round (so
    /// staleness is measured to that resolution) and by every view.
    pub(crate) fn refresh(&mut self, chitchat: &Chitchat, now: Instant) {
        self.epoch += 1;
        let epoch = self.epoch;
        let live: HashSet<&ChitchatId> = chitchat.live_nodes().collect();
        for (cid, node) in chitchat.node_states() {
            let tracked = match self.nodes.get_mut(cid) {
                Some(t) => t,
                None => {
                    let Some(node_id) = parse_node_id(&cid.node_id) else {
                        if self.foreign.len() < 1024 && self.foreign.insert(cid.node_id.to_string())
                        {
                            warn!(node = %cid.node_id, addr = %cid.gossip_advertise_addr,
                                "ignoring a chitchat node whose id is not an ASS node id");
                        }
                        continue;
                    };
                    self.nodes.entry(cid.clone()).or_insert(Tracked {
                        node_id,
                        heartbeat: 0,
                        max_version: 0,
                        last_change: now,
                        alive: false,
                        epoch,
                        res: Slot::default(),
                        addr: Slot::default(),
                        links: Slot::default(),
                    })
                }
            };
            tracked.epoch = epoch;
            tracked.alive = live.contains(cid);
            let heartbeat = u64::from(node.heartbeat());
            if heartbeat != tracked.heartbeat || node.max_version() != tracked.max_version {
                tracked.heartbeat = heartbeat;
                tracked.last_change = now;
            }
            if node.max_version() != tracked.max_version {
                tracked.max_version = node.max_version();
                tracked.res.update(cid, node, RES, decode_res);
                tracked.addr.update(cid, node, ADDR, decode_addr);
                tracked.links.update(cid, node, LINKS, decode_links);
            }
        }
        // chitchat forgets a peer after the dead-node grace period; so do we.
        self.nodes.retain(|_, t| t.epoch == epoch);
    }

    /// The newest incarnation of each node id.
    fn newest(&self) -> BTreeMap<u64, (&ChitchatId, &Tracked)> {
        let mut out: BTreeMap<u64, (&ChitchatId, &Tracked)> = BTreeMap::new();
        for (cid, t) in &self.nodes {
            let newer = out
                .get(&t.node_id)
                .is_none_or(|(old, _)| cid.generation_id > old.generation_id);
            if newer {
                out.insert(t.node_id, (cid, t));
            }
        }
        out
    }

    fn node_view(&self, cid: &ChitchatId, t: &Tracked, now: Instant) -> NodeView {
        let is_self = *cid == self.self_cid;
        let state = match (&t.res.good, &t.addr.good) {
            (Some(res), Some(addr)) => Some(assemble(res, addr, t.links.good.as_ref())),
            _ => None,
        };
        NodeView {
            node_id: t.node_id,
            generation: cid.generation_id,
            gossip_addr: cid.gossip_advertise_addr,
            state,
            alive: is_self || t.alive,
            staleness: if is_self {
                Duration::ZERO
            } else {
                now.saturating_duration_since(t.last_change)
            },
            heartbeat: t.heartbeat,
        }
    }

    pub(crate) fn view(&self, self_id: u64, now: Instant) -> ClusterView {
        ClusterView {
            self_id,
            nodes: self
                .newest()
                .into_iter()
                .map(|(id, (cid, t))| (id, self.node_view(cid, t, now)))
                .collect(),
        }
    }

    pub(crate) fn node(&self, id: u64, now: Instant) -> Option<NodeView> {
        self.nodes
            .iter()
            .filter(|(_, t)| t.node_id == id)
            .max_by_key(|(cid, _)| cid.generation_id)
            .map(|(cid, t)| self.node_view(cid, t, now))
    }

    /// The chitchat id of the newest incarnation of `id`.
    pub(crate) fn chitchat_id(&self, id: u64) -> Option<ChitchatId> {
        self.nodes
            .iter()
            .filter(|(_, t)| t.node_id == id)
            .map(|(cid, _)| cid)
            .max_by_key(|cid| cid.generation_id)
            .cloned()
    }

    pub(crate) fn liveness(&self) -> Liveness {
        self.newest()
            .into_iter()
            .map(|(id, (cid, t))| (id, *cid == self.self_cid || t.alive))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::parse_node_id;

    #[test]
    fn node_ids_are_canonical_decimal() {
        assert_eq!(parse_node_id("7"), Some(7));
        assert_eq!(parse_node_id("18446744073709551615"), Some(u64::MAX));
        for bad in ["+7", "07", "-1", "", "node-7", "7 ", "18446744073709551616"] {
            assert_eq!(parse_node_id(bad), None, "{bad}");
        }
    }
}
