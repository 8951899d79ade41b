//! The agent: the guests this host runs, its control server, and the migration orchestration.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dwcp::{Listener, Migration, MigrationConfig, ReceiverConfig};
use dwcp_acp::{AcpError, Fence, Holding, NodeId, NodeRecord, Ownership, Registry, VmId};
use dwcp_core::messages::{ExpectedIdentity, VmUuid};
use dwcp_core::sim::{SimulatedGuest, SimulatedGuestConfig};
use dwcp_core::{GuestRam, MemoryLayout, VmControl};
use dwcp_tls::Security;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Value, json};

use crate::NodeError;
use crate::handover::HandoverControl;
use crate::protocol::{self, Request, Target};

/// What an agent needs to know about its host.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's id in the cluster configuration.
    pub id: NodeId,
    /// A name for people.
    pub name: String,
    /// How control connections (both ways) and migration streams are secured: TLS 1.3 keyed by
    /// the cluster's pre-shared key (`Security::psk`, what [`crate::RunningNode`] uses by
    /// default), mutual certificates, or, by explicit choice only, plain text.
    pub security: Security,
    /// Where the control server listens.
    pub control_listen: SocketAddr,
    /// The address migration listeners bind (a fresh port per incoming migration).
    pub migration_ip: IpAddr,
    /// Guest memory this host offers, in bytes.
    pub memory_capacity: u64,
    /// How migrations from this host run.
    pub migration: MigrationConfig,
    /// Bound on each registry call.
    pub registry_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum GuestState {
    Running,
    MigratingOut,
    /// The handover's outcome is unknown: the guest stays paused until the registry answers.
    Undecided,
}

#[derive(Debug)]
struct Hosted {
    guest: Arc<SimulatedGuest>,
    size: u64,
    dirty_rate: u64,
    fence: Fence,
    state: GuestState,
}

/// What the registry backend reports about itself (leader, term, ...), for `status`.
type BackendStatus = Arc<dyn Fn() -> Value + Send + Sync>;

struct StatusHook(Mutex<Option<BackendStatus>>);

impl std::fmt::Debug for StatusHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusHook")
    }
}

#[derive(Debug)]
struct Inner {
    config: AgentConfig,
    control_addr: SocketAddr,
    registry: Arc<dyn Registry>,
    runtime: tokio::runtime::Handle,
    hosted: Mutex<BTreeMap<VmId, Hosted>>,
    /// Memory promised to incoming migrations not finished yet.
    incoming: Mutex<BTreeMap<VmId, u64>>,
    draining: AtomicBool,
    stopping: AtomicBool,
    backend_status: StatusHook,
    gossip: Mutex<Option<Arc<dwcp_ass::Gossip>>>,
    /// Measured goodput of this node's past migrations to each peer, bytes/s (an EWMA), gossiped
    /// so that placement can predict how long a migration from here would take.
    links: Mutex<BTreeMap<NodeId, f64>>,
}

/// One host's agent. Dropping it (or [`Agent::shutdown`]) stops its server and its guests.
#[derive(Debug)]
pub struct Agent {
    inner: Arc<Inner>,
    server: Option<JoinHandle<()>>,
}

impl Agent {
    /// Binds the control server, records this node in the registry, and starts serving.
    /// `runtime` runs the registry's futures; the agent's own threads block on it.
    pub fn start(
        config: AgentConfig,
        registry: Arc<dyn Registry>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, NodeError> {
        let listener = TcpListener::bind(config.control_listen).map_err(|e| {
            NodeError::Refused(format!(
                "binding the control server on {}: {e}",
                config.control_listen
            ))
        })?;
        let control_addr = listener
            .local_addr()
            .map_err(|e| NodeError::Control(e.to_string()))?;
        let inner = Arc::new(Inner {
            control_addr,
            registry,
            runtime,
            hosted: Mutex::new(BTreeMap::new()),
            incoming: Mutex::new(BTreeMap::new()),
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            backend_status: StatusHook(Mutex::new(None)),
            gossip: Mutex::new(None),
            links: Mutex::new(BTreeMap::new()),
            config,
        });
        let record = NodeRecord {
            id: inner.config.id,
            name: inner.config.name.clone(),
            migration_addr: inner.config.migration_ip.to_string(),
            agent_addr: control_addr.to_string(),
        };
        inner.retrying(Duration::from_secs(30), || {
            inner.registry.put_node(record.clone())
        })?;
        let server = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("agent-{}", inner.config.id))
                .spawn(move || serve(inner, listener))
                .map_err(|e| NodeError::Control(format!("starting the control server: {e}")))?
        };
        tracing::info!(node = inner.config.id, %control_addr, "agent serving");
        Ok(Self {
            inner,
            server: Some(server),
        })
    }

    /// Where the control server listens.
    pub fn control_addr(&self) -> SocketAddr {
        self.inner.control_addr
    }

    /// Adds what `status` reports about the registry backend (its role, term, leader...).
    pub fn set_backend_status(&self, report: impl Fn() -> Value + Send + Sync + 'static) {
        *self.inner.backend_status.0.lock() = Some(Arc::new(report));
    }

    /// Uses `gossip` for the cluster view: liveness and every node's resources for placement.
    pub fn set_gossip(&self, gossip: Arc<dwcp_ass::Gossip>) {
        *self.inner.gossip.lock() = Some(gossip);
    }

    /// A function that reports this node's state, for publishing by gossip.
    pub fn state_source(&self) -> impl Fn() -> dwcp_ass::NodeState + Send + Sync + 'static {
        let inner = self.inner.clone();
        move || inner.node_state()
    }

    /// Answers one request as the control server would (for callers in the same process).
    pub fn handle(&self, request: Request) -> Result<Value, NodeError> {
        self.inner.handle(request)
    }

    /// The VMs this agent runs now, with their fences.
    pub fn running(&self) -> Vec<(VmId, Fence)> {
        self.inner
            .hosted
            .lock()
            .iter()
            .filter(|(_, h)| h.state != GuestState::Undecided)
            .map(|(vm, h)| (vm.clone(), h.fence))
            .collect()
    }

    /// Stops serving and stops every guest.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.inner.control_addr, Duration::from_secs(1));
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
        for (_, hosted) in std::mem::take(&mut *self.inner.hosted.lock()) {
            hosted.guest.stop();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(inner: Arc<Inner>, listener: TcpListener) {
    for stream in listener.incoming() {
        if inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let inner = inner.clone();
        let spawned = std::thread::Builder::new()
            .name("agent-request".into())
            .spawn(move || {
                let peer = stream.peer_addr().ok();
                // Bounded in time inside: a client that stalls its TLS handshake or its request
                // line holds this thread only so long.
                let secured = match protocol::secure_accepted(stream, &inner.config.security) {
                    Ok(secured) => secured,
                    Err(e) => {
                        // No session to answer in: the peer learns by the closed connection.
                        tracing::warn!(?peer, error = %e, "control connection refused");
                        return;
                    }
                };
                let mut stream = secured.conn;
                let request = match protocol::accept_request(&mut stream, &secured.handshake_key) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(?peer, error = %e, "control request refused");
                        let _ = protocol::answer(&mut stream, Err(e));
                        return;
                    }
                };
                tracing::debug!(?peer, ?request, "control request");
                let result = inner.handle(request);
                if let Err(e) = &result {
                    tracing::warn!(?peer, error = %e, "control request failed");
                }
                let _ = protocol::answer(&mut stream, result);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a request thread");
        }
    }
}

impl Inner {
    fn id(&self) -> NodeId {
        self.config.id
    }

    /// One registry call, bounded.
    fn registry_call<T>(
        &self,
        call: impl Future<Output = Result<T, AcpError>>,
    ) -> Result<T, AcpError> {
        let bound = self.config.registry_timeout;
        self.runtime.block_on(async {
            tokio::time::timeout(bound, call)
                .await
                .unwrap_or(Err(AcpError::Timeout(bound)))
        })
    }

    /// A registry call retried while its outcome is indeterminate (no leader yet, a timeout),
    /// for at most `patience`.
    fn retrying<T, F: Future<Output = Result<T, AcpError>>>(
        &self,
        patience: Duration,
        mut call: impl FnMut() -> F,
    ) -> Result<T, AcpError> {
        let deadline = Instant::now() + patience;
        loop {
            match self.registry_call(call()) {
                Err(e) if e.is_indeterminate() && Instant::now() < deadline => {
                    tracing::debug!(error = %e, "registry not ready; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }

    fn handle(self: &Arc<Self>, request: Request) -> Result<Value, NodeError> {
        match request {
            Request::Status => self.status(),
            Request::CreateVm {
                vm,
                size,
                dirty_rate,
            } => self.create_vm(vm, size, dirty_rate),
            Request::Migrate { vm, to } => self.migrate(&vm, to),
            Request::Evacuate => self.evacuate(),
            Request::Prepare {
                vm,
                from,
                fence,
                size,
                dirty_rate,
            } => self.prepare(vm, from, fence, size, dirty_rate),
        }
    }

    fn committed_memory(&self) -> u64 {
        let hosted = self.hosted.lock();
        let incoming = self.incoming.lock();
        hosted.values().map(|h| h.size).sum::<u64>() + incoming.values().sum::<u64>()
    }

    fn free_memory(&self) -> u64 {
        self.config
            .memory_capacity
            .saturating_sub(self.committed_memory())
    }

    fn status(&self) -> Result<Value, NodeError> {
        let records = self.registry_call(self.registry.list())?;
        let nodes = self.registry_call(self.registry.nodes())?;
        let gossip = self.gossip.lock().clone();
        let view = gossip.map(|g| self.runtime.block_on(g.view()));
        let peers: Vec<Value> = view
            .iter()
            .flat_map(|v| v.nodes.values())
            .map(|n| {
                json!({ "node": n.node_id, "alive": n.alive, "generation": n.generation,
                        "staleness_ms": n.staleness.as_secs_f64() * 1e3,
                        "free_memory": n.state.as_ref().map(|s| s.free_memory) })
            })
            .collect();
        let backend = self.backend_status.0.lock().clone();
        let backend = backend.map_or(Value::Null, |report| report());
        let hosted: Vec<Value> = self
            .hosted
            .lock()
            .iter()
            .map(|(vm, h)| {
                json!({ "vm": vm, "size": h.size, "dirty_rate": h.dirty_rate,
                        "fence": h.fence.0, "state": h.state })
            })
            .collect();
        Ok(json!({
            "node": self.id(),
            "name": self.config.name,
            "control_addr": self.control_addr.to_string(),
            "security": self.config.security.mode().name(),
            "draining": self.draining.load(Ordering::SeqCst),
            "memory_capacity": self.config.memory_capacity,
            "memory_free": self.free_memory(),
            "hosted": hosted,
            "vms": records,
            "nodes": nodes,
            "registry": backend,
            "gossip": peers,
        }))
    }

    fn create_vm(&self, vm: VmId, size: u64, dirty_rate: u64) -> Result<Value, NodeError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(NodeError::Refused(format!(
                "node {} is being evacuated",
                self.id()
            )));
        }
        if size > self.free_memory() {
            return Err(NodeError::Refused(format!(
                "node {} has {} bytes free, {vm} needs {size}",
                self.id(),
                self.free_memory()
            )));
        }
        let guest = SimulatedGuest::new(SimulatedGuestConfig {
            size_bytes: size,
            mix: Default::default(),
            seed: seed_of(&vm),
        })?;
        let record = self.registry_call(self.registry.register(&vm, self.id()))?;
        guest.start_workload(dirty_rate, seed_of(&vm));
        self.hosted.lock().insert(
            vm.clone(),
            Hosted {
                guest,
                size,
                dirty_rate,
                fence: record.fence,
                state: GuestState::Running,
            },
        );
        tracing::info!(%vm, size, fence = %record.fence, "VM created");
        Ok(serde_json::to_value(record).expect("serializable"))
    }

    /// This node's state as gossip carries it. A draining node offers no memory.
    fn node_state(&self) -> dwcp_ass::NodeState {
        let draining = self.draining.load(Ordering::SeqCst);
        dwcp_ass::NodeState {
            free_memory: if draining { 0 } else { self.free_memory() },
            memory_total: self.config.memory_capacity,
            cpu_load: cpu_load(),
            vcpus_free: u32::MAX,
            running_vms: self.hosted.lock().len() as u32,
            migration_addr: self.config.migration_ip.to_string(),
            agent_addr: self.control_addr.to_string(),
            link_forecasts: self.links.lock().clone(),
            ..Default::default()
        }
    }

    /// ITP over the gossiped view: every member, alive by chitchat's failure detector (or heard
    /// from within [`FRESH`]), with its free memory and load as gossiped and the measured goodput
    /// of this node's past migrations to it. Without gossip, every member counts as alive and
    /// empty.
    fn placer(&self, records: &[Ownership], nodes: &[NodeRecord]) -> dwcp_itp::Placer {
        let gossip = self.gossip.lock().clone();
        let view = gossip.map(|g| self.runtime.block_on(g.view()));
        let mut vms: BTreeMap<NodeId, u32> = BTreeMap::new();
        for r in records {
            *vms.entry(r.owner).or_default() += 1;
        }
        let me = self.id();
        let own_links = self.links.lock().clone();
        let views: Vec<dwcp_itp::NodeView> = nodes
            .iter()
            .map(|n| {
                let seen = view.as_ref().and_then(|v| v.get(n.id));
                let state = seen.and_then(|s| s.state.clone());
                let alive = match &view {
                    None => true,
                    // Gossip is a hint, Prepare the real check: a node heard from within FRESH
                    // counts as alive even when the failure detector has too few heartbeats to
                    // judge it (its first seconds) or flaps under CPU load (seen in CI: both
                    // peers "dead" for a moment on a saturated 2-core host). A node that is really
                    // gone fails Prepare and is excluded.
                    Some(_) => {
                        n.id == me
                            || seen.is_some_and(|s| {
                                s.state.is_some() && (s.alive || s.staleness < FRESH)
                            })
                    }
                };
                let (memory_total, memory_free, cpu) = match &state {
                    Some(s) => (s.memory_total, s.free_memory, s.cpu_load),
                    None => (
                        self.config.memory_capacity,
                        self.config.memory_capacity,
                        0.0,
                    ),
                };
                dwcp_itp::NodeView {
                    id: n.id,
                    name: n.name.clone(),
                    alive,
                    cordoned: false,
                    memory_total,
                    memory_free,
                    cpu_load: cpu,
                    vcpus_free: u32::MAX,
                    zone: String::new(),
                    link_to: own_links
                        .get(&n.id)
                        .map(|&bw| vec![(me, bw)])
                        .unwrap_or_default(),
                    vms: vms.get(&n.id).copied().unwrap_or(0),
                    anti_affinity_groups: Vec::new(),
                }
            })
            .collect();
        dwcp_itp::Placer::new(views, dwcp_itp::Weights::default())
    }

    fn request(
        &self,
        vm: &VmId,
        size: u64,
        dirty_rate: u64,
        excluded: &[NodeId],
    ) -> dwcp_itp::VmRequest {
        dwcp_itp::VmRequest {
            vm: vm.to_string(),
            memory: size,
            vcpus: 0,
            source: Some(self.id()),
            dirty_rate: dirty_rate as f64,
            anti_affinity: None,
            forbidden: excluded.to_vec(),
        }
    }

    /// Picks a destination for `vm`: the best-scoring member by ITP ([`Inner::placer`]).
    fn place(
        &self,
        vm: &VmId,
        size: u64,
        dirty_rate: u64,
        records: &[Ownership],
        nodes: &[NodeRecord],
        excluded: &[NodeId],
    ) -> Result<NodeId, NodeError> {
        let placement = self
            .placer(records, nodes)
            .place(&self.request(vm, size, dirty_rate, excluded))
            .map_err(|e| NodeError::Refused(format!("placement: {e}")))?;
        tracing::info!(%vm, node = placement.node, score = placement.score, parts = ?placement.parts, "placed");
        Ok(placement.node)
    }

    fn migrate(&self, vm: &VmId, target: Target) -> Result<Value, NodeError> {
        let (guest, size, dirty_rate) = {
            let mut hosted = self.hosted.lock();
            let h = hosted.get_mut(vm).ok_or_else(|| {
                NodeError::Refused(format!("node {} does not run {vm}", self.id()))
            })?;
            if h.state != GuestState::Running {
                return Err(NodeError::Refused(format!(
                    "{vm} is not running here ({:?})",
                    h.state
                )));
            }
            h.state = GuestState::MigratingOut;
            (h.guest.clone(), h.size, h.dirty_rate)
        };
        let result = self.migrate_out(vm, target, &guest, size, dirty_rate);
        if result.is_err() {
            let mut hosted = self.hosted.lock();
            if let Some(h) = hosted.get_mut(vm) {
                if h.state == GuestState::MigratingOut {
                    h.state = GuestState::Running;
                }
            }
        }
        result
    }

    fn migrate_out(
        &self,
        vm: &VmId,
        target: Target,
        guest: &Arc<SimulatedGuest>,
        size: u64,
        dirty_rate: u64,
    ) -> Result<Value, NodeError> {
        let me = self.id();
        let current = self
            .registry_call(self.registry.ownership(vm))?
            .ok_or_else(|| NodeError::Refused(format!("{vm} is not in the registry")))?;
        if current.owner != me || current.holding != Holding::Owned {
            // The registry no longer names this node: it must not run the VM (fencing).
            if current.owner != me {
                self.fence_off(vm, &current);
            }
            return Err(NodeError::Refused(format!(
                "cannot migrate: the registry has {current}"
            )));
        }
        let nodes = self.registry_call(self.registry.nodes())?;
        // With `auto`, a destination that cannot prepare (down before gossip noticed, out of
        // memory) is left out and the next best is tried.
        let mut excluded = Vec::new();
        let mut fence = current.fence;
        let (to, dest_ip, port, begun, handoff_begun) = loop {
            let to = match target {
                Target::Node(n) => n,
                Target::Auto => {
                    let records = self.registry_call(self.registry.list())?;
                    self.place(vm, size, dirty_rate, &records, &nodes, &excluded)?
                }
            };
            let (dest_agent, dest_ip) = addresses(&nodes, to)?;
            let started = Instant::now();
            let begun = self.registry_call(self.registry.begin_handoff(vm, me, fence, to))?;
            let handoff_begun = started.elapsed();
            let prepared = protocol::call_with(
                dest_agent,
                &self.config.security,
                &Request::Prepare {
                    vm: vm.clone(),
                    from: me,
                    fence: begun.fence,
                    size,
                    dirty_rate,
                },
                Duration::from_secs(30),
            )
            .and_then(|v| {
                v.get("port")
                    .and_then(Value::as_u64)
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| NodeError::Remote("prepare answered without a port".into()))
            });
            match prepared {
                Ok(port) => break (to, dest_ip, port, begun, handoff_begun),
                Err(e) => {
                    let aborted = self.abort(vm, begun.fence);
                    match (target, aborted) {
                        (Target::Auto, Some(record)) if excluded.len() < 3 => {
                            tracing::warn!(%vm, node = to, error = %e, "destination cannot prepare; trying another");
                            excluded.push(to);
                            fence = record.fence;
                        }
                        _ => return Err(e),
                    }
                }
            }
        };

        let recorded = Arc::new(Mutex::new(None));
        let mut control = HandoverControl {
            guest: guest.control(),
            registry: self.registry.clone(),
            runtime: self.runtime.clone(),
            vm: vm.clone(),
            from: me,
            begun: begun.fence,
            to,
            recorded: recorded.clone(),
        };
        let migration =
            Migration::new(SocketAddr::new(dest_ip, port), self.config.security.clone()).config(
                MigrationConfig {
                    vm_uuid: Some(vm_uuid(vm)),
                    ..self.config.migration.clone()
                },
            );
        let outcome = migration.run(&**guest, &mut guest.dirty_log(), &mut control);
        match outcome {
            Ok(report) => {
                let record = recorded.lock().clone();
                self.hosted.lock().remove(vm);
                if report.total_ms > 0.0 {
                    let rate = report.wire_bytes as f64 / (report.total_ms / 1e3);
                    let mut links = self.links.lock();
                    let link = links.entry(to).or_insert(rate);
                    *link = 0.7 * *link + 0.3 * rate;
                }
                tracing::info!(%vm, to, downtime_ms = report.downtime_ms, "VM handed over");
                Ok(json!({
                    "vm": vm, "from": me, "to": to,
                    "record": record,
                    "handoff_begin_ms": handoff_begun.as_secs_f64() * 1e3,
                    "total_ms": report.total_ms,
                    "downtime_ms": report.downtime_ms,
                    "iterations": report.iterations,
                    "wire_bytes": report.wire_bytes,
                    "digest": report.digest,
                }))
            }
            Err(dwcp_core::Error::HandoverUnconfirmed(reason)) => {
                self.settle_undecided(vm, begun.fence, to, &mut control);
                Err(NodeError::Engine(dwcp_core::Error::HandoverUnconfirmed(
                    reason,
                )))
            }
            Err(e) => {
                // The engine resumed the guest; give the VM back to this node in the registry.
                let _ = self.abort(vm, begun.fence);
                Err(NodeError::Engine(e))
            }
        }
    }

    /// Cancels a handoff begun at `fence`, until the registry answers for certain. The guest's
    /// state is the caller's to change: a retry with another destination keeps it migrating.
    fn abort(&self, vm: &VmId, fence: Fence) -> Option<Ownership> {
        match self.retrying(Duration::from_secs(30), || {
            self.registry.abort_handoff(vm, self.id(), fence)
        }) {
            Ok(record) => {
                if let Some(h) = self.hosted.lock().get_mut(vm) {
                    h.fence = record.fence;
                }
                tracing::info!(%vm, fence = %record.fence, "handoff aborted; the VM stays here");
                Some(record)
            }
            Err(e) => {
                tracing::error!(%vm, error = %e, "could not abort the handoff");
                None
            }
        }
    }

    /// The engine could not tell whether the destination took over. The registry decides: if it
    /// names the destination, this node drops the guest; if the handoff can still be aborted,
    /// this node resumes it. Until then the guest stays paused.
    fn settle_undecided(&self, vm: &VmId, begun: Fence, to: NodeId, control: &mut HandoverControl) {
        if let Some(h) = self.hosted.lock().get_mut(vm) {
            h.state = GuestState::Undecided;
        }
        let decided = self.retrying(Duration::from_secs(30), || {
            self.registry.abort_handoff(vm, self.id(), begun)
        });
        match decided {
            Ok(record) => {
                control.resume();
                if let Some(h) = self.hosted.lock().get_mut(vm) {
                    h.fence = record.fence;
                    h.state = GuestState::Running;
                }
                tracing::warn!(%vm, "handover unconfirmed and not recorded: aborted, the source resumed");
            }
            Err(AcpError::Conflict { current, .. }) if current.owner == to => {
                control.handed_over();
                self.hosted.lock().remove(vm);
                tracing::warn!(%vm, to, "handover unconfirmed but recorded: node {to} owns the VM");
            }
            Err(e) => tracing::error!(
                %vm, error = %e,
                "handover outcome unknown; the guest stays paused until the registry answers"
            ),
        }
    }

    /// Stops a guest the registry says another node owns.
    fn fence_off(&self, vm: &VmId, current: &Ownership) {
        if let Some(h) = self.hosted.lock().remove(vm) {
            h.guest.stop();
            tracing::error!(%vm, registry = %current, "stale owner: the guest was stopped here");
        }
    }

    /// Drains this node: one batched placement decision for all its VMs (ITP's evacuation,
    /// hardest to fit first, each decision seeing the ones before), then the migrations one by
    /// one to the planned nodes; a migration whose planned node cannot take it is placed again.
    fn evacuate(&self) -> Result<Value, NodeError> {
        self.draining.store(true, Ordering::SeqCst);
        let guests: Vec<(VmId, u64, u64)> = self
            .hosted
            .lock()
            .iter()
            .filter(|(_, h)| h.state == GuestState::Running)
            .map(|(vm, h)| (vm.clone(), h.size, h.dirty_rate))
            .collect();
        let records = self.registry_call(self.registry.list())?;
        let nodes = self.registry_call(self.registry.nodes())?;
        let requests: Vec<_> = guests
            .iter()
            .map(|(vm, size, rate)| self.request(vm, *size, *rate, &[]))
            .collect();
        let plan = self
            .placer(&records, &nodes)
            .evacuate(self.id(), &requests)
            .map_err(|e| NodeError::Refused(format!("placement: {e}")))?;
        let mut results = Vec::new();
        for ((vm, _, _), planned) in guests.iter().zip(plan) {
            let result = match &planned {
                Ok(p) => self.migrate(vm, Target::Node(p.node)).or_else(|e| {
                    tracing::warn!(%vm, planned = p.node, error = %e, "planned destination failed; placing again");
                    self.migrate(vm, Target::Auto)
                }),
                Err(e) => Err(NodeError::Refused(format!("placement: {e}"))),
            };
            let planned = planned.as_ref().ok().map(|p| p.node);
            results.push(match result {
                Ok(v) => json!({"vm": vm, "ok": true, "planned": planned, "result": v}),
                Err(e) => {
                    json!({"vm": vm, "ok": false, "planned": planned, "error": e.to_string()})
                }
            });
        }
        Ok(json!({ "node": self.id(), "migrations": results }))
    }

    fn prepare(
        self: &Arc<Self>,
        vm: VmId,
        from: NodeId,
        fence: Fence,
        size: u64,
        dirty_rate: u64,
    ) -> Result<Value, NodeError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(NodeError::Refused(format!(
                "node {} is being evacuated",
                self.id()
            )));
        }
        let record = self
            .registry_call(self.registry.ownership(&vm))?
            .ok_or_else(|| NodeError::Refused(format!("{vm} is not in the registry")))?;
        if record.owner != from
            || record.fence != fence
            || record.holding != (Holding::HandingOver { to: self.id() })
        {
            return Err(NodeError::Refused(format!(
                "node {from} asked to hand {vm} over at {fence}, but the registry has {record}"
            )));
        }
        {
            // Lock order everywhere: hosted, then incoming.
            let hosted = self.hosted.lock();
            let mut incoming = self.incoming.lock();
            if incoming.contains_key(&vm) || hosted.contains_key(&vm) {
                return Err(NodeError::Refused(format!("{vm} is already here")));
            }
            let committed: u64 =
                hosted.values().map(|h| h.size).sum::<u64>() + incoming.values().sum::<u64>();
            let free = self.config.memory_capacity.saturating_sub(committed);
            if size > free {
                return Err(NodeError::Refused(format!(
                    "node {} has {free} bytes free, {vm} needs {size}",
                    self.id()
                )));
            }
            incoming.insert(vm.clone(), size);
        }
        let setup = || -> Result<(Listener, GuestRam), NodeError> {
            let layout = MemoryLayout::flat(size).map_err(dwcp_core::Error::Config)?;
            let ram = GuestRam::anonymous(layout)?;
            let listener = Listener::bind(
                SocketAddr::new(self.config.migration_ip, 0),
                self.config.security.clone(),
                ReceiverConfig::default(),
            )?;
            Ok((listener, ram))
        };
        let (listener, ram) = match setup() {
            Ok(s) => s,
            Err(e) => {
                self.incoming.lock().remove(&vm);
                return Err(e);
            }
        };
        let addr = listener.local_addr()?;
        let inner = self.clone();
        std::thread::Builder::new()
            .name(format!("receive-{vm}"))
            .spawn(move || inner.receive(vm, listener, ram, dirty_rate))
            .map_err(|e| NodeError::Control(format!("starting the receiver: {e}")))?;
        Ok(json!({ "port": addr.port() }))
    }

    /// Receives `vm` on `listener`, then runs it if and only if the registry names this node.
    fn receive(self: Arc<Self>, vm: VmId, listener: Listener, ram: GuestRam, dirty_rate: u64) {
        let addr = listener.local_addr().ok();
        let connected = Arc::new(AtomicBool::new(false));
        {
            // A source that never connects must not hold this thread and the memory forever.
            let connected = connected.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(30);
                while Instant::now() < deadline && !connected.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                if let (false, Some(addr)) = (connected.load(Ordering::SeqCst), addr) {
                    let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
                }
            });
        }
        let received = listener.accept().and_then(|incoming| {
            connected.store(true, Ordering::SeqCst);
            if incoming.layout() != ram.layout() {
                incoming.refuse(
                    dwcp_core::ErrorCode::Layout,
                    "the layout differs from the prepared one",
                );
                return Err(dwcp_core::Error::Protocol(format!(
                    "the source announced another memory layout than prepared for {vm}"
                )));
            }
            // The source names the VM it sends (protocol version 2); one that cannot (version 1,
            // a node of the previous release during an upgrade) is held to the layout alone.
            let expected = ExpectedIdentity {
                vm_uuid: (incoming.protocol_version() >= 2).then(|| vm_uuid(&vm)),
                layout_fingerprint: Some(ram.layout().fingerprint()),
            };
            incoming.require(&expected)?.receive_into(&ram)
        });
        connected.store(true, Ordering::SeqCst);
        let me = self.id();
        let owner = self.retrying(Duration::from_secs(30), || self.registry.ownership(&vm));
        let named = matches!(&owner, Ok(Some(r)) if r.owner == me && r.holding == Holding::Owned);
        let run = match (&received, named) {
            // The source sends its commit only after the registry recorded this node.
            (Ok(_), _) => true,
            // The commit was recorded (so both digests matched before) but its confirmation was
            // lost on the way: the memory here is the verified copy, and this node owns the VM.
            (Err(e), true) => {
                tracing::warn!(%vm, error = %e, "the session failed after the handover was recorded; running the VM here");
                true
            }
            (Err(e), false) => {
                tracing::warn!(%vm, error = %e, registry = ?owner, "incoming migration failed; discarding it");
                false
            }
        };
        let fence = match &owner {
            Ok(Some(r)) if r.owner == me => r.fence,
            _ => Fence::default(),
        };
        let mut hosted = self.hosted.lock();
        self.incoming.lock().remove(&vm);
        if run && !self.stopping.load(Ordering::SeqCst) {
            let size = ram.layout().total_bytes();
            let guest = SimulatedGuest::from_ram(ram);
            guest.start_workload(dirty_rate, seed_of(&vm) ^ fence.0);
            tracing::info!(%vm, %fence, "VM running here");
            hosted.insert(
                vm,
                Hosted {
                    guest,
                    size,
                    dirty_rate,
                    fence,
                    state: GuestState::Running,
                },
            );
        }
    }
}

/// How recent a peer's gossip must be for placement to count it alive whatever the failure
/// detector says (see [`Inner::placer`]).
const FRESH: Duration = Duration::from_secs(5);

/// Where a member's agent and migration listeners are.
fn addresses(nodes: &[NodeRecord], id: NodeId) -> Result<(SocketAddr, IpAddr), NodeError> {
    let dest = nodes
        .iter()
        .find(|n| n.id == id)
        .ok_or_else(|| NodeError::Refused(format!("node {id} is not a member")))?;
    let agent = dest.agent_addr.parse().map_err(|_| {
        NodeError::Refused(format!(
            "node {id} has a bad agent address {:?}",
            dest.agent_addr
        ))
    })?;
    let ip = dest.migration_addr.parse().map_err(|_| {
        NodeError::Refused(format!(
            "node {id} has a bad migration address {:?}",
            dest.migration_addr
        ))
    })?;
    Ok((agent, ip))
}

/// The one-minute load average per core (0 where /proc is not readable).
fn cpu_load() -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |l| l / cores)
}

fn seed_of(vm: &VmId) -> u64 {
    vm.as_str().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The UUID a node announces for `vm` when it migrates it, and the one the destination requires:
/// derived from the VM's registry name, so that every node computes the same one, in the RFC 9562
/// layout of a version 8 (custom) UUID. A destination prepared for one VM thereby refuses another
/// VM's memory before any page is written, even from a source holding the cluster key.
pub fn vm_uuid(vm: &VmId) -> VmUuid {
    let mut name = b"DWCP node VM ".to_vec();
    name.extend_from_slice(vm.as_str().as_bytes());
    let mut b = dwcp_core::hash::xxh3_128(&name).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    VmUuid::new(b).expect("the version bits make it non-nil")
}
