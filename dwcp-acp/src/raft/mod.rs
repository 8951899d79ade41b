//! The embedded backend: an openraft cluster of the hosts' agents.
//!
//! Each agent runs a [`RaftNode`]: openraft does the consensus; this module gives it
//!
//! - a disk (`storage`): one redb file per node with the log, vote, committed/purged marks and
//!   the latest snapshot, synced before anything is acknowledged; the [`RegistryState`] in memory,
//!   rebuilt from the snapshot plus the log on restart; a snapshot every
//!   [`RaftConfig::snapshot_every`] entries, the log purged behind it;
//! - a network (`rpc`, `network`): postcard frames over TLS 1.3 on TCP with a hard size limit,
//!   each connection opened by a mutual HMAC-SHA256 challenge-response inside the TLS session
//!   (keyed by the cluster key bound to the session's exporter value, see
//!   [`RaftConfig::security`]), and only to and from the configured node ids;
//! - group commit (`batcher`): a raft entry is a batch of [`Command`]s, up to
//!   [`RaftConfig::max_batch`]. **Fences**: the k-th command (from 0) of the entry at log index i
//!   is applied at `Fence(i << 16 | k)`; batches hold at most 65 535 commands, so fences are
//!   unique and strictly increasing along the log (log indexes stay below 2^48 for any
//!   conceivable cluster life);
//! - timing (`timing`): heartbeat and election timeouts derived from the RTT measured to the
//!   peers at start ([`Timeouts::from_rtt`]), unless [`RaftConfig::timeouts`] overrides them.
//!
//! Any node's [`RaftNode::registry`] serves every call: the leader proposes changes and answers
//! reads after confirming its leadership with a quorum (`ensure_linearizable`); a follower
//! forwards both to the leader it knows, retrying across elections until
//! [`RaftConfig::request_timeout`]. A change is retried only when it is known not to be in the
//! log (the peer was not the leader, or could not be reached); once it may be in the log, a lost
//! answer is reported as [`AcpError::Unavailable`] or [`AcpError::Timeout`] (indeterminate), never
//! retried, so no change is applied twice for one call.
//!
//! **A node that lost its disk** must not vote again under its id (it forgot its last vote):
//! an empty `data_dir` is only accepted with [`RaftConfig::bootstrap`], which means "first start
//! of a new cluster", or [`RaftConfig::join`], "first start of a fresh id joining a running
//! cluster"; otherwise [`RaftNode::start`] refuses with [`AcpError::Storage`], asking for the host
//! to rejoin under a new node id: [`RaftNode::remove_voter`] the old id and
//! [`RaftNode::add_voter`] the new one on the leader.

mod batcher;
mod network;
pub(crate) mod rpc;
mod storage;
mod timing;
pub(crate) mod wire;

pub use timing::Timeouts;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dwcp_tls::Security;
use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft, ServerState, SnapshotPolicy};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::{
    AcpError, Command, CommandOutcome, NodeId, NodeRecord, Ownership, Registry, RegistryState, VmId,
};
use batcher::{Batcher, Submitted};
use rpc::{CallError, Net, RpcClient, Service};
use storage::Applied;
use wire::{Forwarded, ReadAnswer, ReadRequest, Request, Response, WireError};

openraft::declare_raft_types!(
    /// openraft's types for the registry: an entry carries a batch of commands.
    pub(crate) TypeConfig:
        D = wire::Batch,
        R = wire::BatchResponse,
        NodeId = crate::NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Largest [`RaftConfig::max_batch`]: the fence keeps 16 bits for the position in the batch.
pub const MAX_BATCH: usize = storage::FENCE_SLOTS - 1;

/// How a node joins and runs the cluster. Build it with [`RaftConfig::new`] and set fields
/// after: more may come.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RaftConfig {
    /// This node's id (never 0), a key of `peers`.
    pub id: NodeId,
    /// Where this node's redb file lives (created on bootstrap).
    pub data_dir: PathBuf,
    /// Where this node accepts its peers' RPC connections.
    pub listen: SocketAddr,
    /// The initial voters, this node included, and their RPC addresses. Only these ids may
    /// connect.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// How the RPC connections are secured. From the cluster key alone (`Psk` converts into it):
    /// TLS 1.3, every member proving the key inside the session; with certificates
    /// ([`Security::from_cert_dir`]): mutual X.509 of one CA, whose names must include each
    /// member's RPC address. Plain text only by [`Security::insecure_plaintext`].
    pub security: Security,
    /// First start of a new cluster: an empty `data_dir` is accepted, and the lowest id of
    /// `peers` initializes the membership. Leave it false on every later start.
    pub bootstrap: bool,
    /// First start of a node with a fresh id joining a running cluster: an empty `data_dir` is
    /// accepted and the node never initializes a membership; it waits, as a non-member, until
    /// the leader adds it ([`RaftNode::add_voter`]). `peers` must hold the current members.
    pub join: bool,
    /// Fixed timing instead of the one derived from the measured RTT.
    pub timeouts: Option<Timeouts>,
    /// Entries between snapshots.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot (for followers slightly behind, who then
    /// need no snapshot transfer).
    pub keep_log_after_snapshot: u64,
    /// Longest a registry call takes, retries across elections included.
    pub request_timeout: Duration,
    /// Most commands per raft entry (1 to [`MAX_BATCH`]).
    pub max_batch: usize,
}

impl RaftConfig {
    /// A configuration with the defaults: not bootstrapping, timing from the RTT, a snapshot
    /// every 10 000 entries keeping 1 000 behind it, 5 s per call, batches of 1 024.
    /// `security` is a [`Security`] or the cluster key (`Psk`), which means TLS 1.3 keyed by it.
    pub fn new(
        id: NodeId,
        data_dir: impl Into<PathBuf>,
        listen: SocketAddr,
        peers: BTreeMap<NodeId, SocketAddr>,
        security: impl Into<Security>,
    ) -> Self {
        Self {
            id,
            data_dir: data_dir.into(),
            listen,
            peers,
            security: security.into(),
            bootstrap: false,
            join: false,
            timeouts: None,
            snapshot_every: 10_000,
            keep_log_after_snapshot: 1_000,
            request_timeout: Duration::from_secs(5),
            max_batch: 1024,
        }
    }

    fn validate(&self) -> Result<(), AcpError> {
        let invalid = |m: String| Err(AcpError::Invalid(m));
        if self.id == 0 || self.peers.contains_key(&0) {
            return invalid("node id 0 is reserved".into());
        }
        if !self.peers.contains_key(&self.id) {
            return invalid(format!(
                "node {} is not among its peers {:?}",
                self.id,
                self.peers.keys()
            ));
        }
        if !(1..=MAX_BATCH).contains(&self.max_batch) {
            return invalid(format!("max_batch {} (1 to {MAX_BATCH})", self.max_batch));
        }
        if self.snapshot_every == 0 {
            return invalid("snapshot_every must be at least 1".into());
        }
        if self.request_timeout.is_zero() {
            return invalid("request_timeout must not be zero".into());
        }
        if let Some(t) = self.timeouts {
            if t.heartbeat.is_zero()
                || t.election_min <= t.heartbeat
                || t.election_max <= t.election_min
            {
                return invalid(format!(
                    "timeouts {t:?}: need 0 < heartbeat < election_min < election_max"
                ));
            }
        }
        Ok(())
    }
}

/// A node's role in its current term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftRole {
    /// Accepts changes and serves reads.
    Leader,
    /// Replicates the leader's log.
    Follower,
    /// Asking for votes.
    Candidate,
    /// Replicates but does not vote.
    Learner,
    /// Stopped.
    Shutdown,
}

/// What `dwcp cluster status` shows for one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RaftStatus {
    /// This node.
    pub id: NodeId,
    /// Its role.
    pub role: RaftRole,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// Its current term.
    pub term: u64,
    /// Index of the last entry in its log.
    pub last_log_index: Option<u64>,
    /// Index of the last entry applied to its state.
    pub last_applied_index: Option<u64>,
    /// Index covered by its latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Index up to which its log was purged.
    pub purged_index: Option<u64>,
    /// The voters of the membership in force.
    pub voters: BTreeSet<NodeId>,
    /// Its learners.
    pub learners: BTreeSet<NodeId>,
    /// Every member's RPC address.
    pub members: BTreeMap<NodeId, String>,
    /// The timing in use.
    pub timeouts: Timeouts,
    /// The RTT measured at start (the largest median over the peers that answered).
    pub measured_rtt: Option<Duration>,
    /// Peers this node is partitioned from ([`RaftNode::set_isolated_from`]).
    pub isolated_from: BTreeSet<NodeId>,
}

/// A running member of the cluster.
pub struct RaftNode {
    core: Arc<Core>,
    tasks: Vec<JoinHandle<()>>,
    db_closed: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Drop for RaftNode {
    /// A node dropped without [`RaftNode::shutdown`] still stops: its connections close at
    /// once and raft winds down in the background.
    fn drop(&mut self) {
        if self.core.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        self.core.net.stop.send_replace(true);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let raft = self.core.raft.clone();
            runtime.spawn(async move {
                let _ = raft.shutdown().await;
            });
        }
    }
}

impl fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RaftNode")
            .field("id", &self.core.id)
            .field("addr", &self.core.local_addr)
            .finish()
    }
}

/// RTT probes per peer at start (after one that opens the connection).
const PROBES: usize = 5;
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// The whole measurement, at most: a start is not held up by peers that are down.
const PROBE_BUDGET: Duration = Duration::from_secs(2);
/// The most a forwarded request may ask the leader to wait.
const MAX_FORWARDED_WAIT: Duration = Duration::from_secs(60);

impl RaftNode {
    /// Opens the node's storage, listens on [`RaftConfig::listen`], measures the RTT to the
    /// peers that answer, and starts raft. With `bootstrap` on the lowest id, also initializes
    /// the cluster's membership (once: a restarted node already has it).
    pub async fn start(config: RaftConfig) -> Result<RaftNode, AcpError> {
        Self::start_inner(config, None).await
    }

    /// [`RaftNode::start`] on a listener the caller already bound (to reserve ephemeral ports,
    /// or from socket activation); [`RaftConfig::listen`] is then ignored.
    pub async fn start_on(
        config: RaftConfig,
        listener: std::net::TcpListener,
    ) -> Result<RaftNode, AcpError> {
        Self::start_inner(config, Some(listener)).await
    }

    async fn start_inner(
        config: RaftConfig,
        listener: Option<std::net::TcpListener>,
    ) -> Result<RaftNode, AcpError> {
        config.validate()?;
        let id = config.id;
        // The disk first: a node refused by the wiped-disk rule must not even listen.
        let (db, db_closed) = storage::open(&config.data_dir, id, config.bootstrap || config.join)?;
        let log_store = storage::LogStore::new(db.clone());
        let state_machine =
            storage::StateMachine::open(db.clone(), config.data_dir.join(storage::FILE_NAME))?;
        let applied = state_machine.applied();
        drop(db);

        let listener = match listener {
            Some(l) => l
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(l))
                .map_err(|e| AcpError::Backend(format!("using the given listener: {e}")))?,
            None => TcpListener::bind(config.listen)
                .await
                .map_err(|e| AcpError::Backend(format!("listening on {}: {e}", config.listen)))?,
        };
        let local_addr = listener
            .local_addr()
            .map_err(|e| AcpError::Backend(format!("listener address: {e}")))?;

        let net = Arc::new(Net {
            me: id,
            security: config.security.clone(),
            peers: parking_lot::RwLock::new(config.peers.clone()),
            isolation: tokio::sync::watch::channel(BTreeSet::new()).0,
            stop: tokio::sync::watch::channel(false).0,
        });
        let service = Arc::new(NodeService {
            core: OnceLock::new(),
        });
        let server = rpc::spawn_server(listener, net.clone(), service.clone());
        // If raft fails to start below, the listener and its connections stop with this guard.
        let guard = StopOnDrop(Some(net.clone()));
        let client = Arc::new(RpcClient::new(net.clone()));

        let rtt = measure_rtt(&client, &config.peers, id).await;
        let timeouts = config.timeouts.unwrap_or_else(|| Timeouts::from_rtt(rtt));
        let ms = |d: Duration| d.as_millis().max(1) as u64;
        let raft_config = openraft::Config {
            cluster_name: "dwcp-acp".into(),
            heartbeat_interval: ms(timeouts.heartbeat),
            election_timeout_min: ms(timeouts.election_min),
            election_timeout_max: ms(timeouts.election_max),
            install_snapshot_timeout: ms(timeouts.election_max).max(2000),
            // With entries of at most 256 KiB this keeps AppendEntries under 8 MiB.
            max_payload_entries: 32,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: config.keep_log_after_snapshot,
            snapshot_max_chunk_size: 1 << 20,
            ..Default::default()
        }
        .validate()
        .map_err(|e| AcpError::Invalid(format!("raft timing {timeouts:?}: {e}")))?;
        let factory = network::NetworkFactory {
            client: client.clone(),
            backoff: timeouts.heartbeat,
        };
        let raft = Raft::new(id, Arc::new(raft_config), factory, log_store, state_machine)
            .await
            .map_err(|e| AcpError::Backend(format!("starting raft: {e}")))?;
        let (batcher, batcher_task) =
            Batcher::spawn(raft.clone(), config.max_batch, net.stop.subscribe());

        let core = Arc::new(Core {
            id,
            config,
            raft,
            applied,
            batcher,
            client,
            net,
            timeouts,
            rtt,
            stopped: AtomicBool::new(false),
            local_addr,
        });
        // Until now the server answered only pings. From here the node's Drop stops it.
        let _ = service.core.set(core.clone());
        guard.disarm();
        let peer_sync = spawn_peer_sync(core.clone());
        let node = RaftNode {
            core,
            tasks: vec![server, batcher_task, peer_sync],
            db_closed: Some(db_closed),
        };
        let security = node.core.config.security.mode();
        info!(node = id, addr = %local_addr, %security, ?rtt, ?timeouts, "raft node started");

        let lowest = node.core.config.peers.keys().next().copied();
        let initialized = node
            .core
            .raft
            .is_initialized()
            .await
            .map_err(|e| AcpError::Backend(format!("raft: {e}")))?;
        if node.core.config.bootstrap
            && !node.core.config.join
            && lowest == Some(id)
            && !initialized
        {
            node.initialize().await?;
        }
        Ok(node)
    }

    /// Makes the configured peers the cluster's voters (done by `start` when bootstrapping on
    /// the lowest id). Harmless on an initialized node.
    pub async fn initialize(&self) -> Result<(), AcpError> {
        let members: BTreeMap<NodeId, BasicNode> = self
            .core
            .config
            .peers
            .iter()
            .map(|(id, addr)| {
                (
                    *id,
                    BasicNode {
                        addr: addr.to_string(),
                    },
                )
            })
            .collect();
        match self.core.raft.initialize(members).await {
            Ok(()) => {
                info!(node = self.core.id, "initialized the cluster");
                Ok(())
            }
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(AcpError::Backend(format!("initializing the cluster: {e}"))),
        }
    }

    /// Adds node `id`, listening at `addr`, as a voter: first as a learner until it has caught
    /// up with the log (at most 30 s), then into the voters. Call it on the leader. The new node
    /// must run with [`RaftConfig::join`] and an id that was never a member: a host that lost
    /// its disk rejoins under a new id (see the module docs), so an id already among the voters
    /// is refused.
    pub async fn add_voter(&self, id: NodeId, addr: SocketAddr) -> Result<(), AcpError> {
        let core = &self.core;
        core.running()?;
        if id == 0 {
            return Err(AcpError::Invalid("node id 0 is reserved".into()));
        }
        let membership = core.raft.metrics().borrow().membership_config.clone();
        if membership.membership().voter_ids().any(|v| v == id) {
            return Err(AcpError::Invalid(format!(
                "node {id} is already a voter; a host that lost its disk rejoins under a new id"
            )));
        }
        core.net.peers.write().insert(id, addr);
        let node = BasicNode {
            addr: addr.to_string(),
        };
        tokio::time::timeout(CATCH_UP_TIMEOUT, core.raft.add_learner(id, node, true))
            .await
            .map_err(|_| AcpError::Timeout(CATCH_UP_TIMEOUT))?
            .map_err(membership_error)?;
        core.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(membership_error)?;
        info!(node = core.id, added = id, %addr, "added a voter");
        Ok(())
    }

    /// Removes node `id` from the voters (and the cluster). Call it on the leader.
    pub async fn remove_voter(&self, id: NodeId) -> Result<(), AcpError> {
        self.core.running()?;
        self.core
            .raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await
            .map_err(membership_error)?;
        info!(node = self.core.id, removed = id, "removed a voter");
        Ok(())
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.core.id
    }

    /// The address the RPC listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.core.local_addr
    }

    /// The registry, served through this node (any node: followers forward to the leader).
    pub fn registry(&self) -> Arc<dyn Registry> {
        Arc::new(RaftRegistry {
            core: self.core.clone(),
        })
    }

    /// Waits until this node knows a leader, and says which.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, AcpError> {
        let mut metrics = self.core.raft.metrics();
        let wait = async {
            loop {
                if let Some(leader) = metrics.borrow_and_update().current_leader {
                    return Ok(leader);
                }
                if metrics.changed().await.is_err() {
                    return Err(AcpError::Unavailable("the node stopped".into()));
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| AcpError::Timeout(timeout))?
    }

    /// The node's view of the cluster (cheap: openraft's latest metrics).
    pub fn status(&self) -> RaftStatus {
        self.core.status()
    }

    /// Fault injection, for tests: from now on this node neither sends to nor accepts from
    /// `peers` (an empty set heals). Live connections with them are closed at once, so the
    /// partition is real TCP silence both ways.
    pub fn set_isolated_from(&self, peers: BTreeSet<NodeId>) {
        info!(node = self.core.id, ?peers, "isolated from peers");
        self.core.net.isolation.send_replace(peers);
    }

    /// Stops raft, closes every connection and the listener, and waits until the redb file is
    /// closed (so the same directory can be opened again at once). Registries obtained from this
    /// node answer [`AcpError::Unavailable`] from now on.
    pub async fn shutdown(mut self) -> Result<(), AcpError> {
        let id = self.core.id;
        self.core.stopped.store(true, Ordering::Release);
        self.core.net.stop.send_replace(true);
        let stopped = self.core.raft.shutdown().await;
        for task in std::mem::take(&mut self.tasks) {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        // openraft's tasks drop their storage handles as they wind down; the last one closes
        // the file.
        if let Some(closed) = self.db_closed.take() {
            if tokio::time::timeout(Duration::from_secs(10), closed)
                .await
                .is_err()
            {
                warn!(node = id, "the redb file is still open 10 s after shutdown");
            }
        }
        info!(node = id, "raft node stopped");
        stopped.map_err(|e| AcpError::Backend(format!("stopping raft: {e}")))
    }
}

/// Stops a half-started node's RPC server unless disarmed.
struct StopOnDrop(Option<Arc<Net>>);

impl StopOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(net) = self.0.take() {
            net.stop.send_replace(true);
        }
    }
}

/// Keeps the RPC layer's peers (who may connect, and where each is) equal to the configured
/// peers plus the members of the membership in force, so that nodes added by
/// [`RaftNode::add_voter`] are reachable from every member.
fn spawn_peer_sync(core: Arc<Core>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut metrics = core.raft.metrics();
        let mut stop = core.net.stop.subscribe();
        let mut seen = None;
        loop {
            let membership = metrics.borrow_and_update().membership_config.clone();
            if seen.as_ref() != Some(membership.log_id()) {
                seen = Some(*membership.log_id());
                let mut peers = core.config.peers.clone();
                for (id, node) in membership.membership().nodes() {
                    match node.addr.parse::<SocketAddr>() {
                        Ok(addr) => {
                            peers.insert(*id, addr);
                        }
                        Err(e) => {
                            warn!(node = core.id, member = id, addr = %node.addr, error = %e, "a member's address does not parse")
                        }
                    }
                }
                *core.net.peers.write() = peers;
            }
            tokio::select! {
                r = metrics.changed() => if r.is_err() { return },
                _ = rpc::until_stopped(&mut stop) => return,
            }
        }
    })
}

fn membership_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> AcpError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            AcpError::Unavailable(format!(
                "not the leader (the leader is {:?}): change the membership on the leader",
                f.leader_id
            ))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            AcpError::Invalid(e.to_string())
        }
        RaftError::Fatal(f) => AcpError::Backend(format!("raft: {f}")),
    }
}

/// How long [`RaftNode::add_voter`] waits for the new node to catch up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// Pings every other peer a few times; the largest of the per-peer median RTTs, or `None` if
/// no peer answered (they may not be up yet: the floors of [`Timeouts::from_rtt`] then apply).
async fn measure_rtt(
    client: &Arc<RpcClient>,
    peers: &BTreeMap<NodeId, SocketAddr>,
    me: NodeId,
) -> Option<Duration> {
    let mut probes = JoinSet::new();
    for &peer in peers.keys().filter(|p| **p != me) {
        let client = client.clone();
        probes.spawn(async move {
            // The first call also connects and authenticates: not a round trip.
            client.call(peer, Request::Ping, PROBE_TIMEOUT).await.ok()?;
            let mut samples = Vec::with_capacity(PROBES);
            for _ in 0..PROBES {
                let sent = Instant::now();
                if let Ok(Response::Pong) = client.call(peer, Request::Ping, PROBE_TIMEOUT).await {
                    samples.push(sent.elapsed());
                }
            }
            samples.sort();
            samples.get(samples.len() / 2).copied()
        });
    }
    let mut worst = None;
    let _ = tokio::time::timeout(PROBE_BUDGET, async {
        while let Some(r) = probes.join_next().await {
            if let Ok(Some(rtt)) = r {
                worst = worst.max(Some(rtt));
            }
        }
    })
    .await;
    worst
}

/// What a node's registries, its RPC service and its handle share.
struct Core {
    id: NodeId,
    config: RaftConfig,
    raft: Raft<TypeConfig>,
    applied: Arc<RwLock<Applied>>,
    batcher: Batcher,
    client: Arc<RpcClient>,
    net: Arc<Net>,
    timeouts: Timeouts,
    rtt: Option<Duration>,
    stopped: AtomicBool,
    local_addr: SocketAddr,
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Core")
            .field("id", &self.id)
            .field("addr", &self.local_addr)
            .finish()
    }
}

/// First pause between retries of a call, doubled up to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(10);
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(100);

impl Core {
    fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    fn running(&self) -> Result<(), AcpError> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(AcpError::Unavailable(format!(
                "node {} is shut down",
                self.id
            )));
        }
        Ok(())
    }

    fn status(&self) -> RaftStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let role = if self.stopped.load(Ordering::Acquire) {
            RaftRole::Shutdown
        } else {
            match m.state {
                ServerState::Leader => RaftRole::Leader,
                ServerState::Follower => RaftRole::Follower,
                ServerState::Candidate => RaftRole::Candidate,
                ServerState::Learner => RaftRole::Learner,
                ServerState::Shutdown => RaftRole::Shutdown,
            }
        };
        RaftStatus {
            id: self.id,
            role,
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            last_applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            members: membership
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect(),
            timeouts: self.timeouts,
            measured_rtt: self.rtt,
            isolated_from: self.net.isolation.borrow().clone(),
        }
    }

    /// Proposes `command` here if this node leads (the leader side of a write).
    async fn propose(&self, command: Command) -> Forwarded<CommandOutcome> {
        let leader = self.leader();
        if leader != Some(self.id) {
            return Forwarded::Retry {
                leader,
                why: format!("node {} is not the leader", self.id),
            };
        }
        match self.batcher.submit(command).await {
            Submitted::Applied(r) => Forwarded::Done(r),
            Submitted::NotLeader(leader) => Forwarded::Retry {
                leader,
                why: format!("node {} lost the leadership", self.id),
            },
            Submitted::Indeterminate(why) => Forwarded::Indeterminate(why),
            Submitted::Refused(e) => Forwarded::Done(Err(e.into())),
        }
    }

    /// Answers `read` after confirming the leadership with a quorum (the leader side of a read).
    async fn linearizable_read(&self, read: &ReadRequest) -> Forwarded<ReadAnswer> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => {
                let applied = self.applied.read();
                Forwarded::Done(Ok(answer(&applied.state, read)))
            }
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Forwarded::Retry {
                leader: f.leader_id,
                why: format!("node {} is not the leader", self.id),
            },
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => Forwarded::Retry {
                leader: None,
                why: q.to_string(),
            },
            Err(RaftError::Fatal(f)) => Forwarded::Indeterminate(format!("raft: {f}")),
        }
    }

    /// A change, from any node: proposed here if this node leads, else forwarded to the
    /// leader; retried (only while certainly not in the log) until the request deadline.
    async fn write(&self, command: Command) -> Result<CommandOutcome, AcpError> {
        self.running()?;
        let timeout = self.config.request_timeout;
        let deadline = Instant::now() + timeout;
        let mut hint = None;
        let mut pause = FIRST_RETRY_PAUSE;
        let mut why;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let target = hint.take().or_else(|| self.leader());
            let answer = match target {
                None => Forwarded::Retry {
                    leader: None,
                    why: "no leader is known".into(),
                },
                Some(leader) if leader == self.id => {
                    match tokio::time::timeout(remaining, self.propose(command.clone())).await {
                        Ok(answer) => answer,
                        Err(_) => return Err(AcpError::Timeout(timeout)),
                    }
                }
                Some(leader) => {
                    let request = Request::Write {
                        command: command.clone(),
                        timeout_ms: remaining.as_millis() as u64,
                    };
                    match self.client.call(leader, request, remaining).await {
                        Ok(Response::Write(answer)) => answer,
                        Ok(Response::NotReady(why)) => Forwarded::Retry { leader: None, why },
                        Ok(other) => {
                            Forwarded::Indeterminate(format!("node {leader} answered {other:?}"))
                        }
                        Err(CallError::NotSent(why)) => Forwarded::Retry { leader: None, why },
                        Err(CallError::Timeout(_)) => return Err(AcpError::Timeout(timeout)),
                        Err(e @ CallError::Lost(_)) => {
                            Forwarded::Indeterminate(format!("forwarding to node {leader}: {e}"))
                        }
                        Err(e @ CallError::TooLarge(_)) => {
                            Forwarded::Done(Err(WireError::Invalid(e.to_string())))
                        }
                    }
                }
            };
            match answer {
                Forwarded::Done(result) => return result.map_err(AcpError::from),
                Forwarded::Indeterminate(why) => {
                    return Err(AcpError::Unavailable(format!(
                        "the change may or may not have committed: {why}"
                    )));
                }
                Forwarded::Retry { leader, why: w } => {
                    // Ask the hinted leader next, unless it is the node that just refused.
                    hint = leader.filter(|l| Some(*l) != target);
                    why = w;
                }
            }
            if Instant::now() + pause >= deadline {
                return Err(AcpError::Unavailable(format!(
                    "no leader took the change within {timeout:?}: {why}"
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
        }
    }

    /// A linearizable read, from any node: answered by the leader. Reads change nothing, so any
    /// failure is retried until the request deadline.
    async fn read(&self, read: ReadRequest) -> Result<ReadAnswer, AcpError> {
        self.running()?;
        let timeout = self.config.request_timeout;
        let deadline = Instant::now() + timeout;
        let mut hint = None;
        let mut pause = FIRST_RETRY_PAUSE;
        let mut why;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let target = hint.take().or_else(|| self.leader());
            let (leader, w) = match target {
                None => (None, "no leader is known".to_string()),
                Some(leader) if leader == self.id => {
                    match tokio::time::timeout(remaining, self.linearizable_read(&read)).await {
                        Ok(Forwarded::Done(r)) => return r.map_err(AcpError::from),
                        Ok(Forwarded::Retry { leader, why }) => (leader, why),
                        Ok(Forwarded::Indeterminate(why)) => (None, why),
                        Err(_) => return Err(AcpError::Timeout(timeout)),
                    }
                }
                Some(leader) => {
                    let request = Request::Read {
                        read: read.clone(),
                        timeout_ms: remaining.as_millis() as u64,
                    };
                    match self.client.call(leader, request, remaining).await {
                        Ok(Response::Read(Forwarded::Done(r))) => return r.map_err(AcpError::from),
                        Ok(Response::Read(Forwarded::Retry { leader, why })) => (leader, why),
                        Ok(Response::Read(Forwarded::Indeterminate(why))) => (None, why),
                        Ok(other) => (None, format!("node {leader} answered {other:?}")),
                        Err(e) => (None, format!("reading through node {leader}: {e}")),
                    }
                }
            };
            hint = leader.filter(|l| Some(*l) != target);
            why = w;
            if Instant::now() + pause >= deadline {
                return Err(AcpError::Unavailable(format!(
                    "no leader answered within {timeout:?}: {why}"
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
        }
    }
}

fn answer(state: &RegistryState, read: &ReadRequest) -> ReadAnswer {
    match read {
        ReadRequest::Ownership(vm) => ReadAnswer::Ownership(state.vms.get(vm).cloned()),
        ReadRequest::List => ReadAnswer::List(state.vms.values().cloned().collect()),
        ReadRequest::Nodes => ReadAnswer::Nodes(state.nodes.values().cloned().collect()),
    }
}

/// The node's side of the RPC.
struct NodeService {
    /// Set once raft runs; before that only pings are answered.
    core: OnceLock<Arc<Core>>,
}

#[async_trait::async_trait]
impl Service for NodeService {
    async fn handle(&self, _from: NodeId, request: Request) -> Response {
        if let Request::Ping = request {
            return Response::Pong;
        }
        let Some(core) = self.core.get() else {
            return Response::NotReady("the node is starting".into());
        };
        if core.stopped.load(Ordering::Acquire) {
            return Response::NotReady("the node is shutting down".into());
        }
        // Answer a forwarded request a little before the caller gives up, so that it learns
        // the outcome rather than a timeout.
        let wait =
            |ms: u64| Duration::from_millis(ms.saturating_mul(9) / 10).min(MAX_FORWARDED_WAIT);
        match request {
            Request::Ping => Response::Pong,
            Request::AppendEntries(r) => Response::AppendEntries(core.raft.append_entries(r).await),
            Request::Vote(r) => Response::Vote(core.raft.vote(r).await),
            Request::InstallSnapshot(r) => {
                Response::InstallSnapshot(core.raft.install_snapshot(r).await)
            }
            Request::Write {
                command,
                timeout_ms,
            } => match tokio::time::timeout(wait(timeout_ms), core.propose(command)).await {
                Ok(answer) => Response::Write(answer),
                Err(_) => Response::Write(Forwarded::Indeterminate(format!(
                    "not applied within {timeout_ms} ms on the leader"
                ))),
            },
            Request::Read { read, timeout_ms } => {
                match tokio::time::timeout(wait(timeout_ms), core.linearizable_read(&read)).await {
                    Ok(answer) => Response::Read(answer),
                    Err(_) => Response::Read(Forwarded::Retry {
                        leader: None,
                        why: format!("no quorum confirmed the leader within {timeout_ms} ms"),
                    }),
                }
            }
        }
    }
}

/// [`Registry`] over a node.
struct RaftRegistry {
    core: Arc<Core>,
}

impl fmt::Debug for RaftRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RaftRegistry")
            .field("node", &self.core.id)
            .finish()
    }
}

fn unexpected<T>(answer: ReadAnswer) -> Result<T, AcpError> {
    Err(AcpError::Backend(format!("unexpected answer {answer:?}")))
}

#[async_trait::async_trait]
impl Registry for RaftRegistry {
    async fn execute(&self, command: Command) -> Result<CommandOutcome, AcpError> {
        self.core.write(command).await
    }

    async fn ownership(&self, vm: &VmId) -> Result<Option<Ownership>, AcpError> {
        match self.core.read(ReadRequest::Ownership(vm.clone())).await? {
            ReadAnswer::Ownership(o) => Ok(o),
            other => unexpected(other),
        }
    }

    async fn list(&self) -> Result<Vec<Ownership>, AcpError> {
        match self.core.read(ReadRequest::List).await? {
            ReadAnswer::List(l) => Ok(l),
            other => unexpected(other),
        }
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, AcpError> {
        match self.core.read(ReadRequest::Nodes).await? {
            ReadAnswer::Nodes(n) => Ok(n),
            other => unexpected(other),
        }
    }
}
