//! [`GossipConfig`]: who this node is, where it gossips, and how quickly peers give up on it.

use std::net::SocketAddr;
use std::time::Duration;

use crate::AssError;

/// Configuration of one node's gossip.
///
/// Build it with [`GossipConfig::new`] and change fields after; it is `non_exhaustive` so that new
/// knobs can come with defaults.
///
/// How the failure detector decides (chitchat's phi-accrual): each peer's heartbeat advances
/// whenever it gossips, and the observer records the intervals at which it sees it advance. A peer
/// is dead once the time since its last advance exceeds `phi_threshold` × the mean recorded
/// interval (the mean is smoothed towards `initial_heartbeat_interval` with the weight of five
/// samples, so a young peer is not judged on two samples). Liveness is re-evaluated once per
/// gossip round. So a peer that stops is marked dead after roughly
/// `phi_threshold × mean interval + gossip_interval`, and since the observed interval is at most
/// about one gossip interval (usually less: several peers relay each heartbeat),
/// `(phi_threshold + 1) × gossip_interval` is a practical upper estimate of `dead_after`
/// ([`crate::Gossip::failure_detection_timeout`] gives the current one per peer).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GossipConfig {
    /// This node's id, unique in the cluster (the one used in `link_forecasts`).
    pub node_id: u64,
    /// UDP address to listen on. Port 0 picks a free port (see [`crate::Gossip::listen_addr`]).
    pub listen: SocketAddr,
    /// Address peers should send to, when it is not `listen` (a wildcard `listen`, NAT). `None`:
    /// `listen`, with its port once chosen.
    pub advertise: Option<SocketAddr>,
    /// Peers to contact first. chitchat keeps gossiping to one of them now and then, so a
    /// partition healed later rejoins through them.
    pub seeds: Vec<SocketAddr>,
    /// Only nodes with the same cluster id talk to each other (chitchat answers others
    /// `BadCluster`): two clusters on one network stay apart.
    pub cluster_id: String,
    /// Period of a gossip round: each round the node exchanges digests and deltas with up to three
    /// random live peers (plus, with some probability, a dead one and a seed).
    pub gossip_interval: Duration,
    /// Phi above which a peer is dead (chitchat's default 8).
    pub phi_threshold: f64,
    /// Prior for the mean heartbeat interval of a newly seen peer. `None`: `gossip_interval`, the
    /// interval a peer really beats at.
    pub initial_heartbeat_interval: Option<Duration>,
    /// A heartbeat gap longer than this is not recorded as a sample (a peer back from a long
    /// partition should not teach the detector that 10-minute gaps are normal).
    pub max_heartbeat_interval: Duration,
    /// How long a dead peer stays in the view (marked dead, with its last state) before it is
    /// forgotten.
    pub dead_node_grace_period: Duration,
    /// How long chitchat keeps tombstones of deleted keys. ASS never deletes keys, so this only
    /// matters for keys other software puts in the same chitchat.
    pub marked_for_deletion_grace_period: Duration,
    /// Send chitchat's protocol V1, whose digest (one entry per known node, so it grows with the
    /// cluster) is zstd-compressed: fewer bytes (a sixth in one simulated 100-node run), for a
    /// zstd compression per message. Off by default: V0 is what chitchat advises until every node
    /// decodes V1 (any node on chitchat 0.13 does, an older one does not), and in the 100-node
    /// one-process simulation the compression made the run CPU-bound (docs/ass.md).
    pub compress_digest: bool,
}

impl GossipConfig {
    /// A config with the defaults: no seeds, 250 ms rounds, phi 8, dead peers forgotten after an
    /// hour.
    pub fn new(node_id: u64, listen: SocketAddr, cluster_id: impl Into<String>) -> Self {
        GossipConfig {
            node_id,
            listen,
            advertise: None,
            seeds: Vec::new(),
            cluster_id: cluster_id.into(),
            // A quarter second keeps a 100-node cluster's state within about a second of fresh
            // (measured, docs/ass.md) for a few KiB/s per node.
            gossip_interval: Duration::from_millis(250),
            phi_threshold: 8.0,
            initial_heartbeat_interval: None,
            max_heartbeat_interval: Duration::from_secs(10),
            dead_node_grace_period: Duration::from_secs(3600),
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            compress_digest: false,
        }
    }

    /// Sets the seeds (builder style).
    pub fn with_seeds(mut self, seeds: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.seeds = seeds.into_iter().collect();
        self
    }

    /// Sets the gossip interval (builder style).
    pub fn with_gossip_interval(mut self, interval: Duration) -> Self {
        self.gossip_interval = interval;
        self
    }

    /// The rough upper estimate of how long a stopped peer takes to be marked dead,
    /// `(phi_threshold + 1) × gossip_interval` (see the type's docs).
    pub fn expected_dead_after(&self) -> Duration {
        self.gossip_interval.mul_f64(self.phi_threshold + 1.0)
    }

    pub(crate) fn validate(&self) -> Result<(), AssError> {
        let bad = |why: String| Err(AssError::InvalidConfig(why));
        if self.gossip_interval.is_zero() {
            return bad("gossip_interval is zero".into());
        }
        if !(self.phi_threshold.is_finite() && self.phi_threshold > 0.0) {
            return bad(format!(
                "phi_threshold {} is not positive",
                self.phi_threshold
            ));
        }
        if self.cluster_id.is_empty() || self.cluster_id.len() > 255 {
            return bad("cluster_id must be 1 to 255 bytes".into());
        }
        if self.initial_heartbeat_interval.is_some_and(|d| d.is_zero())
            || self.max_heartbeat_interval.is_zero()
        {
            return bad("heartbeat intervals must be positive".into());
        }
        let advertise = self.advertise.unwrap_or(self.listen);
        if advertise.ip().is_unspecified() {
            return bad(format!(
                "peers cannot send to {advertise}: set `advertise` when listening on a wildcard"
            ));
        }
        Ok(())
    }
}
