//! The embedded raft backend on real nodes: TLS 1.3 over TCP on 127.0.0.1 (ephemeral ports; PSK
//! mode unless a test says otherwise), redb files in temporary directories.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dwcp_acp::raft::{RaftConfig, RaftNode, RaftRole};
use dwcp_acp::{AcpError, NodeId, Registry, VmId, conformance};
use dwcp_core::handshake::Psk;
use dwcp_core::transport::Conn;
use dwcp_tls::Security;
use dwcp_tls::certs::CertificateAuthority;
use tempfile::TempDir;

fn psk() -> Psk {
    Psk::new(vec![0x5a; 32]).unwrap()
}

fn log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A cluster of real nodes; each keeps its directory across restarts.
struct Cluster {
    dirs: BTreeMap<NodeId, TempDir>,
    peers: BTreeMap<NodeId, SocketAddr>,
    nodes: BTreeMap<NodeId, RaftNode>,
    /// Each node's security; TLS keyed by [`psk`] for a node not in it.
    security: BTreeMap<NodeId, Security>,
}

impl Cluster {
    fn config(&self, id: NodeId, bootstrap: bool) -> RaftConfig {
        let security = self
            .security
            .get(&id)
            .cloned()
            .unwrap_or_else(|| Security::psk(psk()));
        let mut c = RaftConfig::new(
            id,
            self.dirs[&id].path(),
            self.peers[&id],
            self.peers.clone(),
            security,
        );
        c.bootstrap = bootstrap;
        c.snapshot_every = 50;
        c.keep_log_after_snapshot = 10;
        c.request_timeout = Duration::from_secs(5);
        c
    }

    async fn start(n: u64) -> Self {
        Self::start_secured(n, |_| None).await
    }

    async fn start_secured(n: u64, security: impl Fn(NodeId) -> Option<Security>) -> Self {
        log();
        // Bound now and handed to the nodes, so that no other test takes the ports meanwhile.
        let listeners: BTreeMap<NodeId, std::net::TcpListener> = (1..=n)
            .map(|id| (id, std::net::TcpListener::bind("127.0.0.1:0").unwrap()))
            .collect();
        let peers = listeners
            .iter()
            .map(|(id, l)| (*id, l.local_addr().unwrap()))
            .collect();
        let dirs = (1..=n)
            .map(|id| (id, tempfile::tempdir().unwrap()))
            .collect();
        let mut cluster = Cluster {
            dirs,
            peers,
            nodes: BTreeMap::new(),
            security: (1..=n).filter_map(|id| Some((id, security(id)?))).collect(),
        };
        for (id, listener) in listeners {
            let node = RaftNode::start_on(cluster.config(id, true), listener)
                .await
                .unwrap();
            cluster.nodes.insert(id, node);
        }
        cluster.leader().await;
        cluster
    }

    /// The leader, once every running node agrees on it.
    async fn leader(&self) -> NodeId {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let statuses: Vec<_> = self.nodes.values().map(|n| n.status()).collect();
            let leaders: BTreeSet<_> = statuses.iter().map(|s| s.leader).collect();
            if let [Some(leader)] = leaders.iter().copied().collect::<Vec<_>>()[..] {
                if statuses
                    .iter()
                    .any(|s| s.id == leader && s.role == RaftRole::Leader)
                {
                    return leader;
                }
            }
            assert!(Instant::now() < deadline, "no agreed leader: {statuses:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(&mut self, id: NodeId) {
        self.nodes.remove(&id).unwrap().shutdown().await.unwrap();
    }

    async fn restart(&mut self, id: NodeId) {
        let node = RaftNode::start(self.config(id, false)).await.unwrap();
        self.nodes.insert(id, node);
    }

    async fn shutdown(mut self) {
        for id in self.nodes.keys().copied().collect::<Vec<_>>() {
            self.stop(id).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_through_a_follower_and_the_leader() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    let status = cluster.nodes[&follower].status();
    assert_eq!(status.voters, BTreeSet::from([1, 2, 3]));
    assert_eq!(status.role, RaftRole::Follower);
    assert!(
        status.timeouts.election_min >= Duration::from_millis(300),
        "{status:?}"
    );
    assert!(status.measured_rtt.is_some() || follower == 1, "{status:?}");
    // The JSON form is what `dwcp cluster status` prints.
    serde_json::to_string(&status).unwrap();

    conformance::check_registry(cluster.nodes[&follower].registry(), "follower").await;
    conformance::check_registry(cluster.nodes[&leader].registry(), "leader").await;
    // Either node sees what the other wrote.
    let seen = cluster.nodes[&follower].registry().list().await.unwrap();
    assert!(seen.iter().any(|o| o.vm.as_str() == "leader-a"), "{seen:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_disk_keeps_every_committed_record() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    // Enough entries for a few snapshots and purges (every 50), through both kinds of node.
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let registry = cluster.nodes[if w % 2 == 0 { &leader } else { &follower }].registry();
            tokio::spawn(async move {
                for i in 0..30u64 {
                    let vm = VmId::new(format!("vm-{w}-{i}")).unwrap();
                    let owner = 1 + (w + i) % 3;
                    let r = registry.register(&vm, owner).await.unwrap();
                    if i % 3 == 0 {
                        let to = 1 + owner % 3;
                        let b = registry
                            .begin_handoff(&vm, owner, r.fence, to)
                            .await
                            .unwrap();
                        registry
                            .commit_handoff(&vm, owner, b.fence, to)
                            .await
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    // And some one at a time: at least 60 entries whatever the batching, so a snapshot and a
    // purge are certain.
    let registry = cluster.nodes[&follower].registry();
    for i in 0..60 {
        registry
            .register(&VmId::new(format!("one-{i}")).unwrap(), 2)
            .await
            .unwrap();
    }
    let before = cluster.nodes[&leader].registry().list().await.unwrap();
    assert_eq!(before.len(), 300);
    // Snapshots are built, and the log purged, in the background.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = cluster.nodes[&leader].status();
        if status.snapshot_index.is_some() && status.purged_index.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot or purge: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    for id in [1, 2, 3] {
        cluster.stop(id).await;
    }
    for id in [3, 1, 2] {
        cluster.restart(id).await;
    }
    cluster.leader().await;
    for id in [1, 2, 3] {
        let after = cluster.nodes[&id].registry().list().await.unwrap();
        assert_eq!(after, before, "node {id} after the restart");
    }
    // And the cluster goes on: a fence after the restart is above every fence before it.
    let vm = VmId::new("after-restart").unwrap();
    let r = cluster.nodes[&follower]
        .registry()
        .register(&vm, 1)
        .await
        .unwrap();
    assert!(before.iter().all(|o| o.fence < r.fence));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_disk_is_refused_and_the_host_rejoins_under_a_new_id() {
    let mut cluster = Cluster::start(3).await;
    let registry = cluster.nodes[&1].registry();
    registry
        .register(&VmId::new("vm").unwrap(), 1)
        .await
        .unwrap();
    cluster.stop(3).await;
    for entry in std::fs::read_dir(cluster.dirs[&3].path()).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let err = RaftNode::start(cluster.config(3, false)).await.unwrap_err();
    match &err {
        AcpError::Storage(m) => assert!(
            m.contains("may have voted") && m.contains("new node id"),
            "{m}"
        ),
        other => panic!("a wiped voter started: {other:?}"),
    }
    // The other two still make a quorum.
    registry
        .register(&VmId::new("vm-2").unwrap(), 2)
        .await
        .unwrap();

    // The host rejoins under a new id: 3 leaves the membership, 4 joins with an empty disk.
    let leader = cluster.leader().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr4 = listener.local_addr().unwrap();
    let err = cluster.nodes[&leader]
        .add_voter(2, addr4)
        .await
        .unwrap_err();
    assert!(
        matches!(err, AcpError::Invalid(_)),
        "re-adding a voter's id: {err:?}"
    );
    cluster.nodes[&leader].remove_voter(3).await.unwrap();
    let dir4 = tempfile::tempdir().unwrap();
    let mut peers = cluster.peers.clone();
    peers.remove(&3);
    peers.insert(4, addr4);
    let mut config = RaftConfig::new(4, dir4.path(), addr4, peers, psk());
    config.join = true;
    let node4 = RaftNode::start_on(config, listener).await.unwrap();
    cluster.nodes[&leader].add_voter(4, addr4).await.unwrap();
    // Node 4 learns that the change committed with the leader's next message.
    let deadline = Instant::now() + Duration::from_secs(5);
    while node4.status().voters != BTreeSet::from([1, 2, 4]) {
        assert!(Instant::now() < deadline, "{:?}", node4.status());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Node 4 serves the registry, and every node accepts its connections (1 and 2 learnt its
    // address from the membership: it is not in their configuration).
    let via4 = node4.registry();
    assert_eq!(via4.list().await.unwrap().len(), 2);
    via4.register(&VmId::new("vm-4").unwrap(), 4).await.unwrap();
    for id in [1, 2] {
        assert_eq!(cluster.nodes[&id].registry().list().await.unwrap().len(), 3);
    }
    // A quorum of {1, 2, 4} needs node 4 once one of the others is gone.
    let other = if leader == 1 { 2 } else { 1 };
    cluster.stop(other).await;
    via4.register(&VmId::new("vm-5").unwrap(), 4).await.unwrap();
    node4.shutdown().await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_purged_log_catches_up_by_snapshot() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let lagging = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    let registry = cluster.nodes[&leader].registry();
    registry
        .register(&VmId::new("first").unwrap(), 1)
        .await
        .unwrap();
    let behind = cluster.nodes[&lagging].status().last_log_index.unwrap();
    cluster.stop(lagging).await;
    // Enough entries for the leader to snapshot (every 50) and purge past `behind`: one at a
    // time, so that batching does not fold them into fewer entries.
    for i in 0..120 {
        let vm = VmId::new(format!("vm-{i}")).unwrap();
        registry.register(&vm, 2).await.unwrap();
    }
    // Snapshots are built, and the log purged, in the background.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.nodes[&leader].status().purged_index <= Some(behind) {
        let status = cluster.nodes[&leader].status();
        assert!(
            Instant::now() < deadline,
            "follower at {behind}, leader {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.restart(lagging).await;
    let target = cluster.nodes[&leader].status().last_applied_index;
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.nodes[&lagging].status().last_applied_index < target {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            cluster.nodes[&lagging].status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The snapshot arrived over the RPC: the log it needed was gone.
    let status = cluster.nodes[&lagging].status();
    assert!(status.snapshot_index > Some(behind), "{status:?}");
    // With the leader gone, the caught-up follower and the third node carry every record.
    let before = registry.list().await.unwrap();
    cluster.stop(leader).await;
    let after = cluster.nodes[&lagging].registry().list().await.unwrap();
    assert_eq!(after, before);
    cluster.shutdown().await;
}

/// Writes `payload` in plain text to a node's RPC port and says whether the node hung up.
fn hangs_up(addr: SocketAddr, payload: &[u8]) -> (bool, Vec<u8>) {
    let s = std::net::TcpStream::connect(addr).unwrap();
    hangs_up_on(Box::new(s), payload)
}

/// Writes `payload` inside a TLS session (the cluster's PSK mode, so the node's checks after
/// TLS are reached) and says whether the node hung up.
fn hangs_up_in_tls(addr: SocketAddr, payload: &[u8]) -> (bool, Vec<u8>) {
    let s = std::net::TcpStream::connect(addr).unwrap();
    let secured = Security::psk(psk())
        .connect(Box::new(s), addr, Instant::now() + Duration::from_secs(5))
        .unwrap();
    hangs_up_on(secured.conn, payload)
}

fn hangs_up_on(mut s: Box<dyn Conn>, payload: &[u8]) -> (bool, Vec<u8>) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The node may hang up before reading everything (a refused length).
    let _ = s.write_all(payload);
    let mut answer = Vec::new();
    let closed = match s.read_to_end(&mut answer) {
        Ok(_) => true,
        // A TLS session cut without close_notify, or a reset: hung up all the same.
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    (closed, answer)
}

/// postcard's varint.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_and_wrong_keys_are_refused() {
    let mut cluster = Cluster::start(3).await;
    let addr = cluster.peers[&1];

    // Inside TLS: an oversize length, and the node hangs up without reading (or allocating)
    // 4 GiB; garbage of a plausible size; a truncated frame.
    let (closed, _) = hangs_up_in_tls(addr, &u32::MAX.to_be_bytes());
    assert!(closed, "oversize frame");
    let mut garbage = 8u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff; 8]);
    assert!(hangs_up_in_tls(addr, &garbage).0, "garbage");
    assert!(hangs_up_in_tls(addr, &[0, 0, 0, 50, 1, 2]).0, "truncated");

    // A well-formed Hello from node 9, which is not in the configuration: refused, with the
    // reason, before any challenge. (Hello is magic, version, from, to and a 32-byte nonce.)
    let mut hello = b"DACP".to_vec();
    varint(1, &mut hello);
    varint(9, &mut hello);
    varint(1, &mut hello);
    hello.extend_from_slice(&[3; 32]);
    let mut frame = (hello.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&hello);
    let (closed, answer) = hangs_up_in_tls(addr, &frame);
    assert!(closed);
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.contains("node 9 is not in the configuration"),
        "{answer:?}"
    );

    // The same Hello in plain text, from a configured node: TLS refuses it before it is read as
    // a frame, so no refusal reason (or challenge) comes back in clear; only a TLS alert.
    let mut hello_from_2 = b"DACP".to_vec();
    varint(1, &mut hello_from_2);
    varint(2, &mut hello_from_2);
    varint(1, &mut hello_from_2);
    hello_from_2.extend_from_slice(&[3; 32]);
    let mut plain = (hello_from_2.len() as u32).to_be_bytes().to_vec();
    plain.extend_from_slice(&hello_from_2);
    for payload in [plain, frame, u32::MAX.to_be_bytes().to_vec()] {
        let (closed, answer) = hangs_up(addr, &payload);
        assert!(closed, "a plain-text client was kept");
        assert!(
            answer.is_empty() || answer[0] == 0x15,
            "not a TLS alert: {answer:?}"
        );
    }
    // And the node still serves its peers: a restarted member reconnects to it.
    cluster.stop(2).await;
    cluster.restart(2).await;
    cluster.leader().await;
    let via2 = cluster.nodes[&2].registry();
    via2.register(&VmId::new("after-strangers").unwrap(), 2)
        .await
        .unwrap();

    // Node 3 replaced by an impostor that holds the wrong key: the others never replicate to it
    // and it never joins an election, while the real two carry on.
    cluster.stop(3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = cluster.config(3, true);
    config.data_dir = dir.path().to_path_buf();
    config.security = Security::psk(Psk::new(vec![0x66; 32]).unwrap());
    config.request_timeout = Duration::from_millis(500);
    let impostor = RaftNode::start(config).await.unwrap();
    let registry = cluster.nodes[&1].registry();
    // (The restart above may still be settling the leadership: retry the indeterminate.)
    for i in 0..10 {
        let vm = VmId::new(format!("vm-{i}")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match registry.register(&vm, 1).await {
                Ok(_) | Err(AcpError::AlreadyRegistered { .. }) => break,
                Err(e) if e.is_indeterminate() && Instant::now() < deadline => {}
                Err(e) => panic!("{vm}: {e}"),
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = impostor.status();
    assert_eq!(
        status.last_log_index, None,
        "the impostor got entries: {status:?}"
    );
    assert_eq!(
        status.term, 0,
        "the impostor's votes reached the cluster: {status:?}"
    );
    assert!(impostor.registry().list().await.is_err());
    impostor.shutdown().await.unwrap();
    cluster.shutdown().await;
}

fn certified(ca: &CertificateAuthority) -> Security {
    ca.security_for(&["127.0.0.1"]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_certificates_replicates_and_keeps_out_other_cas() {
    let ca = CertificateAuthority::generate().unwrap();
    let mut cluster = Cluster::start_secured(3, |_| Some(certified(&ca))).await;
    let leader = cluster.leader().await;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    // Through a follower: a forwarded write and read, over certificate-mode connections.
    let registry = cluster.nodes[&follower].registry();
    let vm = VmId::new("certified").unwrap();
    let r = registry.register(&vm, follower).await.unwrap();
    let seen = cluster.nodes[&leader]
        .registry()
        .ownership(&vm)
        .await
        .unwrap();
    assert_eq!(seen.map(|o| o.fence), Some(r.fence));

    // A node whose certificate comes from another CA takes the place of a member: refused.
    let other = *cluster
        .nodes
        .keys()
        .find(|id| **id != leader && **id != follower)
        .unwrap();
    cluster.stop(other).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = cluster.config(other, true);
    config.data_dir = dir.path().to_path_buf();
    config.security = certified(&CertificateAuthority::generate().unwrap());
    config.request_timeout = Duration::from_millis(500);
    let impostor = RaftNode::start(config).await.unwrap();
    for i in 0..5 {
        registry
            .register(&VmId::new(format!("vm-{i}")).unwrap(), follower)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = impostor.status();
    assert_eq!(
        status.last_log_index, None,
        "the impostor got entries: {status:?}"
    );
    assert_eq!(
        status.term, 0,
        "the impostor's votes reached the cluster: {status:?}"
    );
    impostor.shutdown().await.unwrap();
    cluster.shutdown().await;
}

/// `cargo test -p dwcp-acp --release --test raft -- --ignored --nocapture throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn throughput_and_handoff_latency() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    for (name, via) in [("leader", leader), ("follower", follower)] {
        let registry: Arc<dyn Registry> = cluster.nodes[&via].registry();
        let per_writer = 200u64;
        let started = Instant::now();
        let writers: Vec<_> = (0..64u64)
            .map(|w| {
                let registry = registry.clone();
                tokio::spawn(async move {
                    for i in 0..per_writer {
                        let vm = VmId::new(format!("{name}-{w}-{i}")).unwrap();
                        registry.register(&vm, 1).await.unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        let elapsed = started.elapsed();
        println!(
            "64 writers through the {name}: {} commits in {elapsed:?} = {:.0} commits/s",
            64 * per_writer,
            (64 * per_writer) as f64 / elapsed.as_secs_f64()
        );
        let mut latencies = Vec::new();
        for i in 0..100 {
            let vm = VmId::new(format!("{name}-handoff-{i}")).unwrap();
            let r = registry.register(&vm, 1).await.unwrap();
            let t = Instant::now();
            let b = registry.begin_handoff(&vm, 1, r.fence, 2).await.unwrap();
            registry.commit_handoff(&vm, 1, b.fence, 2).await.unwrap();
            latencies.push(t.elapsed());
        }
        latencies.sort();
        println!(
            "handoff begin+commit through the {name}: median {:?}, p99 {:?}",
            latencies[50], latencies[98]
        );
    }
    cluster.shutdown().await;
}
