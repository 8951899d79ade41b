//! [`Gossip`]: one node's chitchat server, the publisher of its [`NodeState`] and the source of
//! its [`ClusterView`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chitchat::transport::{ChannelTransport, Transport, UdpTransport};
use chitchat::{
    Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion,
    spawn_chitchat,
};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

use crate::view::{Liveness, Tracker};
use crate::{AssError, ClusterView, GossipConfig, NodeState, NodeView, state};

/// A running gossip node.
///
/// Dropping it stops the node the way a crash would (peers mark it dead after `dead_after`);
/// [`Gossip::shutdown`] does the same but waits for the server task to end.
pub struct Gossip {
    node_id: u64,
    generation: u64,
    listen: SocketAddr,
    chitchat: Arc<Mutex<Chitchat>>,
    tracker: Arc<StdMutex<Tracker>>,
    /// Last `seq` published; written under the chitchat lock so seq order is version order.
    seq: AtomicU64,
    liveness: watch::Receiver<Liveness>,
    // Options so that `shutdown(self)` can take them out despite the `Drop` impl.
    handle: Option<ChitchatHandle>,
    sampler: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Gossip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gossip")
            .field("node_id", &self.node_id)
            .field("generation", &self.generation)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// A simulated network for many nodes in one process: chitchat's in-memory `ChannelTransport`,
/// which serialises every message as the UDP transport does and enforces the same 64 KiB datagram
/// bound, but delivers through channels (no loss unless a link is cut or a queue of 100 messages
/// overflows).
#[derive(Clone)]
pub struct SimNetwork {
    transport: ChannelTransport,
    next_port: Arc<AtomicU64>,
}

impl std::fmt::Debug for SimNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stats = self.transport.statistics();
        f.debug_struct("SimNetwork")
            .field("messages", &stats.num_messages_total)
            .field("bytes", &stats.num_bytes_total)
            .finish()
    }
}

/// Messages and bytes a [`SimNetwork`] has carried so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimTraffic {
    /// Messages sent.
    pub messages: u64,
    /// Serialised bytes sent.
    pub bytes: u64,
}

impl Default for SimNetwork {
    fn default() -> Self {
        Self::new()
    }
}

impl SimNetwork {
    /// An empty network.
    pub fn new() -> Self {
        SimNetwork {
            // The same bound as a UDP datagram, so deltas are cut as they would be on the wire.
            transport: ChannelTransport::with_mtu(65_507),
            next_port: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Traffic so far, all nodes together.
    pub fn traffic(&self) -> SimTraffic {
        let s = self.transport.statistics();
        SimTraffic {
            messages: s.num_messages_total,
            bytes: s.num_bytes_total,
        }
    }

    /// Cuts the link between two gossip addresses, both ways.
    pub async fn cut(&self, a: SocketAddr, b: SocketAddr) {
        self.transport.remove_link(a, b).await;
    }

    /// Restores a link cut by [`SimNetwork::cut`].
    pub async fn heal(&self, a: SocketAddr, b: SocketAddr) {
        self.transport.add_link(a, b).await;
    }

    /// A fresh logical address (nothing is bound: the network is in memory).
    fn fresh_addr(&self, ip: std::net::IpAddr) -> SocketAddr {
        let n = self.next_port.fetch_add(1, Ordering::Relaxed);
        SocketAddr::new(ip, 10_000 + (n % 50_000) as u16)
    }
}

/// A generation id larger than any earlier one in this process and, across restarts, larger than
/// the previous incarnation's as long as the wall clock moved forward: chitchat treats a larger
/// generation of the same node id as a restart and the old one as a separate (dead) node.
fn next_generation() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = wall_ms();
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

enum Net<'a> {
    Udp,
    Sim(&'a SimNetwork),
}

impl Gossip {
    /// Starts a node on real UDP (chitchat's `UdpTransport`) and begins gossiping with the seeds.
    ///
    /// Must be called inside a tokio runtime (the server and the sampler are tokio tasks).
    pub async fn start(config: GossipConfig) -> Result<Gossip, AssError> {
        Self::start_on(config, Net::Udp).await
    }

    /// Starts a node on a [`SimNetwork`] (in memory). A `listen` port of 0 gets a fresh logical
    /// address on that network.
    pub async fn start_simulated(
        config: GossipConfig,
        network: &SimNetwork,
    ) -> Result<Gossip, AssError> {
        Self::start_on(config, Net::Sim(network)).await
    }

    async fn start_on(config: GossipConfig, net: Net<'_>) -> Result<Gossip, AssError> {
        config.validate()?;
        // chitchat advertises the address it is configured with, so port 0 must be resolved
        // before it starts. On UDP: bind, read the port, release it, and let chitchat bind it
        // again (a tiny window in which another process could take it; retried below).
        let attempts = if config.listen.port() == 0 { 5 } else { 1 };
        let mut last_err = None;
        for _ in 0..attempts {
            let listen = match (&net, config.listen.port()) {
                (_, p) if p != 0 => config.listen,
                (Net::Udp, _) => std::net::UdpSocket::bind(config.listen)
                    .and_then(|s| s.local_addr())
                    .map_err(|e| AssError::Start {
                        addr: config.listen,
                        reason: e.to_string(),
                    })?,
                (Net::Sim(n), _) => n.fresh_addr(config.listen.ip()),
            };
            let transport: &dyn Transport = match &net {
                Net::Udp => &UdpTransport,
                Net::Sim(n) => &n.transport,
            };
            match Self::spawn(&config, listen, transport).await {
                Ok(g) => return Ok(g),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| AssError::Task("no start attempt".into())))
    }

    async fn spawn(
        config: &GossipConfig,
        listen: SocketAddr,
        transport: &dyn Transport,
    ) -> Result<Gossip, AssError> {
        let mut advertise = config.advertise.unwrap_or(listen);
        if advertise.port() == 0 {
            advertise.set_port(listen.port());
        }
        let generation = next_generation();
        let cid = ChitchatId::new(config.node_id.to_string(), generation, advertise);
        let cc_config = ChitchatConfig {
            chitchat_id: cid.clone(),
            cluster_id: config.cluster_id.clone(),
            gossip_interval: config.gossip_interval,
            listen_addr: listen,
            seed_nodes: config
                .seeds
                .iter()
                .filter(|s| **s != advertise)
                .map(|s| s.to_string())
                .collect(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: config.phi_threshold,
                // The window only needs to cover the recent past; chitchat's 1000 samples would
                // make the detector slow to adapt after a change of load.
                sampling_window_size: 100,
                max_interval: config.max_heartbeat_interval,
                initial_interval: config
                    .initial_heartbeat_interval
                    .unwrap_or(config.gossip_interval),
                dead_node_grace_period: config.dead_node_grace_period,
            },
            marked_for_deletion_grace_period: config.marked_for_deletion_grace_period,
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: if config.compress_digest {
                ProtocolVersion::V1
            } else {
                ProtocolVersion::V0
            },
        };
        let handle = spawn_chitchat(cc_config, Vec::new(), transport)
            .await
            .map_err(|e| AssError::Start {
                addr: listen,
                reason: format!("{e:#}"),
            })?;
        let chitchat = handle.chitchat();
        let tracker = Arc::new(StdMutex::new(Tracker::new(cid)));
        let (liveness_tx, liveness) = watch::channel(Liveness::new());
        let sampler = tokio::spawn(sample(
            chitchat.clone(),
            tracker.clone(),
            liveness_tx,
            (config.gossip_interval / 2).clamp(Duration::from_millis(5), Duration::from_secs(1)),
        ));
        debug!(node = config.node_id, generation, %listen, "gossip started");
        Ok(Gossip {
            node_id: config.node_id,
            generation,
            listen,
            chitchat,
            tracker,
            seq: AtomicU64::new(0),
            liveness,
            handle: Some(handle),
            sampler: Some(sampler),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// This incarnation's generation (larger after every restart).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The address the node listens on, port resolved.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Publishes `state`, stamped with the next `seq` and the wall clock; returns the `seq`.
    ///
    /// Peers get it on their next exchanges with this node or with one that already has it;
    /// only the keys whose value changed are sent.
    pub async fn publish(&self, state: &NodeState) -> Result<u64, AssError> {
        let mut chitchat = self.chitchat.lock().await;
        let seq = self.seq.load(Ordering::Relaxed) + 1;
        let values = state::encode(state, seq, wall_ms())?;
        let own = chitchat.self_node_state();
        for (key, value) in values {
            own.set(key, value);
        }
        self.seq.store(seq, Ordering::Relaxed);
        Ok(seq)
    }

    /// Everything this node knows of the cluster now.
    pub async fn view(&self) -> ClusterView {
        let chitchat = self.chitchat.lock().await;
        let now = Instant::now();
        let mut tracker = lock(&self.tracker);
        tracker.refresh(&chitchat, now);
        drop(chitchat);
        tracker.view(self.node_id, now)
    }

    /// What this node knows of node `id` now (cheaper than a whole [`Gossip::view`]).
    pub async fn node(&self, id: u64) -> Option<NodeView> {
        let chitchat = self.chitchat.lock().await;
        let now = Instant::now();
        let mut tracker = lock(&self.tracker);
        tracker.refresh(&chitchat, now);
        drop(chitchat);
        tracker.node(id, now)
    }

    /// A watch of every known node id's liveness. It changes when a node is first seen, dies,
    /// comes back or is forgotten, checked every half gossip round; heartbeats and state updates
    /// alone do not wake it.
    pub fn subscribe_liveness(&self) -> watch::Receiver<Liveness> {
        self.liveness.clone()
    }

    /// How long node `id` may now stay silent before the failure detector marks it dead (phi
    /// threshold × its mean observed heartbeat interval); `None` for this node, an unknown one,
    /// or one without enough samples yet.
    pub async fn failure_detection_timeout(&self, id: u64) -> Option<Duration> {
        let cid = lock(&self.tracker).chitchat_id(id)?;
        self.chitchat.lock().await.failure_detection_timeout(&cid)
    }

    /// Stops the node and waits for its server task to end. Peers are not told: they mark it dead
    /// like a crashed node, which is the only way chitchat has.
    pub async fn shutdown(mut self) -> Result<(), AssError> {
        if let Some(s) = self.sampler.take() {
            s.abort();
        }
        match self.handle.take() {
            Some(h) => h
                .shutdown()
                .await
                .map_err(|e| AssError::Task(format!("{e:#}"))),
            None => Ok(()),
        }
    }
}

impl Drop for Gossip {
    fn drop(&mut self) {
        if let Some(s) = self.sampler.take() {
            s.abort();
        }
        if let Some(h) = self.handle.take() {
            // Dropping the handle alone would stop the server at its next select; aborting also
            // frees the socket now, so a restart on the same port can bind at once.
            h.abort();
        }
    }
}

/// A poisoned tracker only means a panic elsewhere mid-refresh; the data is still a usable cache
/// (the next refresh rewrites what it needs), so recover rather than spread the panic.
fn lock(tracker: &StdMutex<Tracker>) -> MutexGuard<'_, Tracker> {
    tracker.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps the tracker current between views, so that staleness is measured even when nobody asks,
/// and feeds the liveness watch.
async fn sample(
    chitchat: Arc<Mutex<Chitchat>>,
    tracker: Arc<StdMutex<Tracker>>,
    liveness_tx: watch::Sender<Liveness>,
    period: Duration,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let liveness = {
            let chitchat = chitchat.lock().await;
            let mut tracker = lock(&tracker);
            tracker.refresh(&chitchat, Instant::now());
            tracker.liveness()
        };
        liveness_tx.send_if_modified(|old| {
            let changed = *old != liveness;
            if changed {
                *old = liveness;
            }
            changed
        });
    }
}
