//! One host's whole agent process: the registry backend, gossip and the [`Agent`], started from a
//! cluster description file that every member shares.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dwcp::MigrationConfig;
use dwcp_acp::raft::{RaftConfig, RaftNode};
use dwcp_acp::{NodeId, Registry};
use dwcp_core::handshake::Psk;
use dwcp_tls::Security;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::{Agent, AgentConfig, NodeError};

/// How often a node publishes its state by gossip.
const PUBLISH_EVERY: Duration = Duration::from_millis(500);

/// Which registry the cluster uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BackendChoice {
    /// The embedded openraft cluster among the agents.
    Raft,
    /// An existing etcd cluster.
    Etcd {
        /// Its client endpoints (`http://host:port`).
        endpoints: Vec<String>,
        /// The key prefix of this cluster's records.
        prefix: String,
    },
}

/// One member in the cluster file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// Its id (1, 2, ...).
    pub id: NodeId,
    /// A name for people.
    pub name: String,
    /// The registry's RPC address (raft backend).
    pub raft_addr: SocketAddr,
    /// The agent's control address.
    pub agent_addr: SocketAddr,
    /// The gossip (UDP) address.
    pub gossip_addr: SocketAddr,
    /// The address incoming migrations are received on.
    pub migration_ip: IpAddr,
    /// Where the node keeps its registry log.
    pub data_dir: PathBuf,
    /// Guest memory it offers, in bytes.
    pub memory_capacity: u64,
}

/// What every member of a cluster knows about it (`cluster.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterFile {
    /// The registry backend.
    pub backend: BackendChoice,
    /// The file holding the cluster's pre-shared key.
    pub psk_file: PathBuf,
    /// Certificates instead of the key for TLS: a directory made by `dwcp certs init` holding,
    /// for each member, `<name>/` (`ca.pem`, `node.pem`, `node.key`) and `client/` for the
    /// `dwcp cluster` commands. Absent: TLS 1.3 keyed by the cluster key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// The members.
    pub nodes: Vec<NodeEntry>,
}

impl ClusterFile {
    /// Reads and checks a cluster file.
    pub fn load(path: &Path) -> Result<Self, NodeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NodeError::Refused(format!("reading {}: {e}", path.display())))?;
        let file: Self = serde_json::from_str(&text)
            .map_err(|e| NodeError::Refused(format!("{}: {e}", path.display())))?;
        file.validate()?;
        Ok(file)
    }

    /// Writes the file (pretty JSON).
    pub fn save(&self, path: &Path) -> Result<(), NodeError> {
        let text = serde_json::to_string_pretty(self).expect("serializable");
        std::fs::write(path, text + "\n")
            .map_err(|e| NodeError::Refused(format!("writing {}: {e}", path.display())))
    }

    fn validate(&self) -> Result<(), NodeError> {
        let mut ids = std::collections::BTreeSet::new();
        for n in &self.nodes {
            if n.id == 0 || !ids.insert(n.id) {
                return Err(NodeError::Refused(format!(
                    "node id {} is 0 or listed twice",
                    n.id
                )));
            }
        }
        if self.nodes.is_empty() {
            return Err(NodeError::Refused("the cluster file lists no node".into()));
        }
        Ok(())
    }

    /// The member `id`.
    pub fn node(&self, id: NodeId) -> Result<&NodeEntry, NodeError> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or_else(|| NodeError::Refused(format!("node {id} is not in the cluster file")))
    }

    /// The cluster key.
    pub fn psk(&self) -> Result<Psk, NodeError> {
        Psk::from_file(&self.psk_file).map_err(NodeError::Engine)
    }

    /// The members' default security: TLS 1.3 keyed by the cluster key, or by certificates
    /// when the file names a `tls_dir` (then see [`security_of`](Self::security_of)).
    pub fn security(&self) -> Result<Security, NodeError> {
        match &self.tls_dir {
            None => Ok(Security::psk(self.psk()?)),
            Some(_) => self.certificates("client"),
        }
    }

    /// How the member `id` secures its connections: its certificate under `tls_dir`, or the
    /// cluster key.
    pub fn security_of(&self, id: NodeId) -> Result<Security, NodeError> {
        match &self.tls_dir {
            None => self.security(),
            Some(_) => self.certificates(&self.node(id)?.name),
        }
    }

    fn certificates(&self, who: &str) -> Result<Security, NodeError> {
        let dir = self
            .tls_dir
            .as_ref()
            .ok_or_else(|| NodeError::Refused("the cluster file has no tls_dir".into()))?
            .join(who);
        Security::from_cert_dir(&dir).map_err(NodeError::Security)
    }
}

/// Options of one node's start.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    /// First start of a new cluster (raft backend: an empty data dir is accepted).
    pub bootstrap: bool,
    /// How migrations from this node run.
    pub migration: MigrationConfig,
    /// How all of this node's connections (registry RPC, control requests, migration streams)
    /// are secured. `None`: what the cluster file says ([`ClusterFile::security_of`]: TLS 1.3
    /// keyed by the cluster key, or the member's certificate), as every member and the
    /// `dwcp cluster` commands do by default. Every member must use the
    /// same mode; in certificate mode each member's certificate must name its addresses.
    pub security: Option<Security>,
}

/// A running node: its runtime, registry backend and agent. Dropping it stops everything.
#[derive(Debug)]
pub struct RunningNode {
    agent: Option<Agent>,
    raft: Arc<Mutex<Option<RaftNode>>>,
    runtime: Option<tokio::runtime::Runtime>,
    registry: Arc<dyn Registry>,
}

impl RunningNode {
    /// Starts member `id` of `cluster`.
    pub fn start(
        cluster: &ClusterFile,
        id: NodeId,
        options: NodeOptions,
    ) -> Result<Self, NodeError> {
        let me = cluster.node(id)?.clone();
        let psk = cluster.psk()?;
        let security = match options.security.clone() {
            Some(s) => s,
            None => cluster.security_of(id)?,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("node-{id}"))
            .enable_all()
            .build()
            .map_err(|e| NodeError::Refused(format!("starting the async runtime: {e}")))?;
        let (raft, registry): (Option<RaftNode>, Arc<dyn Registry>) = match &cluster.backend {
            BackendChoice::Raft => {
                let peers: BTreeMap<NodeId, SocketAddr> =
                    cluster.nodes.iter().map(|n| (n.id, n.raft_addr)).collect();
                let mut config = RaftConfig::new(
                    id,
                    me.data_dir.clone(),
                    me.raft_addr,
                    peers,
                    security.clone(),
                );
                config.bootstrap = options.bootstrap;
                let node = runtime.block_on(RaftNode::start(config))?;
                let registry = node.registry();
                (Some(node), registry)
            }
            BackendChoice::Etcd { endpoints, prefix } => {
                let registry = runtime.block_on(dwcp_acp::etcd::EtcdRegistry::connect(
                    endpoints,
                    prefix,
                    Duration::from_secs(5),
                ))?;
                (None, Arc::new(registry) as Arc<dyn Registry>)
            }
        };
        let raft = Arc::new(Mutex::new(raft));
        let seeds: Vec<SocketAddr> = cluster
            .nodes
            .iter()
            .filter(|n| n.id != id)
            .map(|n| n.gossip_addr)
            .collect();
        // The cluster id keeps two clusters on one network apart (not a secret: gossip is not
        // authenticated, see docs/ass.md).
        let cluster_id = format!("dwcp-{:016x}", psk.fingerprint());
        let gossip = runtime
            .block_on(dwcp_ass::Gossip::start(
                dwcp_ass::GossipConfig::new(id, me.gossip_addr, cluster_id).with_seeds(seeds),
            ))
            .map_err(|e| {
                NodeError::Refused(format!("starting gossip on {}: {e}", me.gossip_addr))
            })?;
        let gossip = Arc::new(gossip);
        let agent = Agent::start(
            AgentConfig {
                id,
                name: me.name.clone(),
                security,
                control_listen: me.agent_addr,
                migration_ip: me.migration_ip,
                memory_capacity: me.memory_capacity,
                migration: options.migration,
                registry_timeout: Duration::from_secs(10),
            },
            registry.clone(),
            runtime.handle().clone(),
        )?;
        agent.set_gossip(gossip.clone());
        {
            let state = agent.state_source();
            let gossip = gossip.clone();
            runtime.spawn(async move {
                loop {
                    if let Err(e) = gossip.publish(&state()).await {
                        tracing::warn!(error = %e, "publishing this node's state");
                    }
                    tokio::time::sleep(PUBLISH_EVERY).await;
                }
            });
        }
        {
            let raft = raft.clone();
            agent.set_backend_status(move || match &*raft.lock() {
                Some(node) => serde_json::to_value(node.status()).unwrap_or_default(),
                None => serde_json::json!({ "role": "etcd client" }),
            });
        }
        Ok(Self {
            agent: Some(agent),
            raft,
            runtime: Some(runtime),
            registry,
        })
    }

    /// The agent.
    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("running")
    }

    /// The registry this node uses.
    pub fn registry(&self) -> Arc<dyn Registry> {
        self.registry.clone()
    }

    /// Runs `f` on the raft node (with the raft backend).
    pub fn with_raft<T>(&self, f: impl FnOnce(&RaftNode) -> T) -> Option<T> {
        self.raft.lock().as_ref().map(f)
    }

    /// Runs `f` on the node's runtime (for callers outside it).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.as_ref().expect("running").block_on(f)
    }

    /// Stops the agent, then the registry backend.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.shutdown();
        }
        let raft = self.raft.lock().take();
        if let (Some(raft), Some(runtime)) = (raft, self.runtime.as_ref()) {
            if let Err(e) = runtime.block_on(raft.shutdown()) {
                tracing::warn!(error = %e, "stopping the registry node");
            }
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        self.stop();
    }
}
