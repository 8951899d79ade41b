//! Agents on loopback: a VM migrated among three real nodes (openraft registry on disk, real
//! migration streams, every connection in TLS 1.3 by default), the handover's failure cases
//! against a registry that refuses or loses answers, and what the control protocol's security
//! layer lets through.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use dwcp_acp::{
    AcpError, Command, CommandOutcome, Holding, MemoryRegistry, NodeRecord, Ownership, Registry,
    VmId,
};
use dwcp_core::handshake::Psk;
use dwcp_node::{
    Agent, AgentConfig, BackendChoice, ClusterFile, NodeEntry, NodeOptions, Request, RunningNode,
    Target,
};
use dwcp_tls::Security;
use dwcp_tls::certs::CertificateAuthority;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn cluster_file(dir: &Path, nodes: u64) -> ClusterFile {
    let psk_file = dir.join("cluster.psk");
    std::fs::write(&psk_file, Psk::generate().to_hex()).unwrap();
    ClusterFile {
        backend: BackendChoice::Raft,
        psk_file,
        tls_dir: None,
        nodes: (1..=nodes)
            .map(|id| NodeEntry {
                id,
                name: format!("node{id}"),
                raft_addr: loopback(free_port()),
                agent_addr: loopback(free_port()),
                gossip_addr: loopback(free_port()),
                migration_ip: Ipv4Addr::LOCALHOST.into(),
                data_dir: dir.join(format!("node{id}")),
                memory_capacity: 512 * MIB,
            })
            .collect(),
    }
}

fn start_all(file: &ClusterFile, bootstrap: bool) -> Vec<RunningNode> {
    // Started in parallel: each waits for a quorum of the others.
    let handles: Vec<_> = file
        .nodes
        .iter()
        .map(|n| {
            let file = file.clone();
            let id = n.id;
            std::thread::spawn(move || {
                RunningNode::start(
                    &file,
                    id,
                    NodeOptions {
                        bootstrap,
                        ..NodeOptions::default()
                    },
                )
                .unwrap()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn ask(node: &RunningNode, request: Request) -> Result<Value, String> {
    node.agent().handle(request).map_err(|e| e.to_string())
}

fn owner(node: &RunningNode, vm: &VmId) -> Ownership {
    node.block_on(node.registry().ownership(vm))
        .unwrap()
        .unwrap()
}

fn runs(node: &RunningNode, vm: &VmId) -> bool {
    node.agent().running().iter().any(|(v, _)| v == vm)
}

#[test]
fn a_vm_moves_among_three_nodes_and_exactly_one_runs_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = cluster_file(dir.path(), 3);
    let nodes = start_all(&file, true);
    let vm = VmId::new("vm-a").unwrap();

    let created = ask(
        &nodes[0],
        Request::CreateVm {
            vm: vm.clone(),
            size: 16 * MIB,
            dirty_rate: MIB,
        },
    )
    .unwrap();
    assert_eq!(created["owner"], 1);
    assert!(runs(&nodes[0], &vm));
    // Every member is in TLS by default, and answers a client holding the cluster key.
    let psk = file.psk().unwrap();
    for n in &file.nodes {
        let status = dwcp_node::call(
            n.agent_addr,
            &psk,
            &Request::Status,
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(status["security"], "tls-psk", "{status}");
    }

    // To a named node, through the real engine; the registry follows and only node 2 runs it.
    let moved = ask(
        &nodes[0],
        Request::Migrate {
            vm: vm.clone(),
            to: Target::Node(2),
        },
    )
    .unwrap();
    assert_eq!(moved["to"], 2, "{moved}");
    let record = owner(&nodes[2], &vm);
    assert_eq!((record.owner, record.holding), (2, Holding::Owned));
    assert!(record.fence.0 > created["fence"].as_u64().unwrap());
    wait_until(|| runs(&nodes[1], &vm));
    assert!(!runs(&nodes[0], &vm) && !runs(&nodes[2], &vm));

    // Node 1 no longer owns it: asking it to migrate is refused.
    assert!(
        ask(
            &nodes[0],
            Request::Migrate {
                vm: vm.clone(),
                to: Target::Node(3),
            },
        )
        .is_err()
    );

    // Placement picks the emptier of the others; evacuation empties node 2.
    let other = VmId::new("vm-b").unwrap();
    ask(
        &nodes[0],
        Request::CreateVm {
            vm: other.clone(),
            size: 8 * MIB,
            dirty_rate: 0,
        },
    )
    .unwrap();
    // Placement works from the gossiped view: every member must have seen every other.
    wait_until(|| {
        nodes.iter().all(|n| {
            ask(n, Request::Status).is_ok_and(|s| {
                s["gossip"]
                    .as_array()
                    .is_some_and(|g| g.iter().filter(|p| p["alive"] == true).count() == 3)
            })
        })
    });
    let auto = ask(
        &nodes[1],
        Request::Migrate {
            vm: vm.clone(),
            to: Target::Auto,
        },
    )
    .unwrap();
    assert_eq!(
        auto["to"], 3,
        "node 1 holds vm-b, so node 3 is emptier: {auto}"
    );
    wait_until(|| runs(&nodes[2], &vm));
    let evacuated = ask(&nodes[2], Request::Evacuate).unwrap();
    assert_eq!(evacuated["migrations"][0]["ok"], true, "{evacuated}");
    wait_until(|| !nodes[2].agent().running().iter().any(|_| true));
    let record = owner(&nodes[0], &vm);
    assert_ne!(record.owner, 3);
    wait_until(|| runs(&nodes[(record.owner - 1) as usize], &vm));
    // A draining node takes no new VM.
    assert!(
        ask(
            &nodes[2],
            Request::CreateVm {
                vm: VmId::new("vm-c").unwrap(),
                size: MIB,
                dirty_rate: 0,
            },
        )
        .is_err()
    );

    // The registry survives a restart of every node from disk.
    let before = nodes[0].block_on(nodes[0].registry().list()).unwrap();
    drop(nodes);
    let nodes = start_all(&file, false);
    let after = nodes[0].block_on(nodes[0].registry().list()).unwrap();
    assert_eq!(before, after);
}

fn wait_until(condition: impl Fn() -> bool) {
    for _ in 0..200 {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("condition not reached within 10 s");
}

/// A registry whose handoff commits misbehave as told, over the reference semantics.
#[derive(Debug, Default)]
struct Faulty {
    inner: MemoryRegistry,
    /// Refuse every commit (a stale fence would).
    refuse_commits: bool,
    /// Apply the commit but lose this many answers (a leader change after commit).
    lose_commit_answers: AtomicU32,
    /// Never answer a commit (no quorum).
    commits_unavailable: bool,
}

#[async_trait::async_trait]
impl Registry for Faulty {
    async fn execute(&self, command: Command) -> Result<CommandOutcome, AcpError> {
        let Command::CommitHandoff { vm, .. } = &command else {
            return self.inner.execute(command).await;
        };
        if self.refuse_commits {
            let current = self.inner.ownership(vm).await?.unwrap();
            return Err(AcpError::Conflict {
                expected: "test: refused".into(),
                current,
            });
        }
        if self.commits_unavailable {
            return Err(AcpError::Unavailable("test: no quorum".into()));
        }
        let result = self.inner.execute(command).await;
        if self
            .lose_commit_answers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(AcpError::Timeout(Duration::from_millis(1)));
        }
        result
    }
    async fn ownership(&self, vm: &VmId) -> Result<Option<Ownership>, AcpError> {
        self.inner.ownership(vm).await
    }
    async fn list(&self) -> Result<Vec<Ownership>, AcpError> {
        self.inner.list().await
    }
    async fn nodes(&self) -> Result<Vec<NodeRecord>, AcpError> {
        self.inner.nodes().await
    }
}

struct Pair {
    source: Agent,
    dest: Agent,
    registry: Arc<Faulty>,
    runtime: tokio::runtime::Runtime,
    /// The agents' cluster key.
    psk: Psk,
}

fn pair(registry: Faulty) -> Pair {
    pair_secured(registry, Security::psk)
}

/// Two agents secured by `security` of one fresh cluster key.
fn pair_secured(registry: Faulty, security: impl Fn(Psk) -> Security) -> Pair {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let registry = Arc::new(registry);
    let psk = Psk::generate();
    let agent = |id| {
        Agent::start(
            AgentConfig {
                id,
                name: format!("n{id}"),
                security: security(psk.clone()),
                control_listen: loopback(0),
                migration_ip: Ipv4Addr::LOCALHOST.into(),
                memory_capacity: 256 * MIB,
                migration: Default::default(),
                registry_timeout: Duration::from_secs(2),
            },
            registry.clone(),
            runtime.handle().clone(),
        )
        .unwrap()
    };
    Pair {
        source: agent(1),
        dest: agent(2),
        registry,
        runtime,
        psk,
    }
}

fn migrate_once(p: &Pair) -> (Result<Value, String>, Ownership) {
    let vm = VmId::new("vm").unwrap();
    p.source
        .handle(Request::CreateVm {
            vm: vm.clone(),
            size: 8 * MIB,
            dirty_rate: MIB,
        })
        .unwrap();
    let result = p
        .source
        .handle(Request::Migrate {
            vm: vm.clone(),
            to: Target::Node(2),
        })
        .map_err(|e| e.to_string());
    let record = p
        .runtime
        .block_on(p.registry.ownership(&vm))
        .unwrap()
        .unwrap();
    (result, record)
}

#[test]
fn a_refused_handover_keeps_the_vm_on_the_source_and_the_destination_discards_it() {
    let p = pair(Faulty {
        refuse_commits: true,
        ..Faulty::default()
    });
    let (result, record) = migrate_once(&p);
    let error = result.unwrap_err();
    assert!(error.contains("refused"), "{error}");
    assert_eq!(
        (record.owner, record.holding),
        (1, Holding::Owned),
        "aborted back to the source"
    );
    assert_eq!(p.source.running().len(), 1, "the source runs it again");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        p.dest.running().is_empty(),
        "the destination must not run it"
    );
}

#[test]
fn a_destination_prepared_for_one_vm_refuses_another_vms_memory_before_writing_a_page() {
    let p = pair(Faulty::default());
    let vm = VmId::new("vm").unwrap();
    p.source
        .handle(Request::CreateVm {
            vm: vm.clone(),
            size: 8 * MIB,
            dirty_rate: 0,
        })
        .unwrap();
    // What node 1 does before it migrates `vm` to node 2, up to the destination's port.
    let owned = p
        .runtime
        .block_on(p.registry.ownership(&vm))
        .unwrap()
        .unwrap();
    let begun = p
        .runtime
        .block_on(p.registry.begin_handoff(&vm, 1, owned.fence, 2))
        .unwrap();
    let prepared = p
        .dest
        .handle(Request::Prepare {
            vm: vm.clone(),
            from: 1,
            fence: begun.fence,
            size: 8 * MIB,
            dirty_rate: 0,
        })
        .unwrap();
    let port = u16::try_from(prepared["port"].as_u64().unwrap()).unwrap();
    // A source with the cluster key sends another VM of the same size into that slot.
    let other = dwcp_core::sim::SimulatedGuest::new(dwcp_core::sim::SimulatedGuestConfig {
        size_bytes: 8 * MIB,
        mix: dwcp_core::sim::ContentMix::RANDOM,
        seed: 7,
    })
    .unwrap();
    let error = dwcp::Migration::new(loopback(port), Security::psk(p.psk.clone()))
        .config(dwcp::MigrationConfig {
            vm_uuid: Some(dwcp_node::vm_uuid(&VmId::new("another-vm").unwrap())),
            ..Default::default()
        })
        .run(
            &*other,
            &mut other.dirty_log(),
            &mut dwcp_core::memory::NoVmControl,
        )
        .unwrap_err();
    assert_eq!(
        error.reason(),
        dwcp_core::FailureReason::Identity,
        "refused for its identity: {error}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        p.dest.running().is_empty(),
        "the destination runs nothing it was sent"
    );
    assert_ne!(
        dwcp_node::vm_uuid(&vm),
        dwcp_node::vm_uuid(&VmId::new("another-vm").unwrap()),
        "names give distinct UUIDs"
    );
}

#[test]
fn a_lost_commit_answer_is_found_in_the_registry_and_the_destination_takes_over() {
    let p = pair(Faulty {
        lose_commit_answers: AtomicU32::new(1),
        ..Faulty::default()
    });
    let (result, record) = migrate_once(&p);
    result.unwrap();
    assert_eq!((record.owner, record.holding), (2, Holding::Owned));
    wait_until(|| p.dest.running().len() == 1);
    assert!(p.source.running().is_empty());
}

#[test]
fn an_unavailable_registry_at_the_handover_leaves_one_owner_and_the_source_resumes_after_abort() {
    let p = pair(Faulty {
        commits_unavailable: true,
        ..Faulty::default()
    });
    let (result, record) = migrate_once(&p);
    let error = result.unwrap_err();
    assert!(error.contains("unconfirmed"), "{error}");
    // The commit never applied, so the abort succeeds and the source runs the VM again.
    assert_eq!((record.owner, record.holding), (1, Holding::Owned));
    assert_eq!(p.source.running().len(), 1);
    std::thread::sleep(Duration::from_millis(500));
    assert!(p.dest.running().is_empty());
}

#[test]
fn the_same_agents_run_on_a_real_etcd_and_evacuate_a_node_in_one_batch() {
    let etcd = dwcp_acp::etcd::testing::EtcdCluster::start(1)
        .expect("etcd (scripts/setup.sh installs it)");
    let dir = tempfile::tempdir().unwrap();
    let mut file = cluster_file(dir.path(), 3);
    file.backend = BackendChoice::Etcd {
        endpoints: etcd.endpoints(),
        prefix: "/dwcp-test".into(),
    };
    let nodes = start_all(&file, true);
    let (a, b) = (VmId::new("etcd-a").unwrap(), VmId::new("etcd-b").unwrap());
    for vm in [&a, &b] {
        ask(
            &nodes[1],
            Request::CreateVm {
                vm: vm.clone(),
                size: 8 * MIB,
                dirty_rate: MIB,
            },
        )
        .unwrap();
    }
    wait_until(|| {
        nodes.iter().all(|n| {
            ask(n, Request::Status).is_ok_and(|s| {
                s["gossip"]
                    .as_array()
                    .is_some_and(|g| g.iter().filter(|p| p["alive"] == true).count() == 3)
            })
        })
    });
    let evacuated = ask(&nodes[1], Request::Evacuate).unwrap();
    let migrations = evacuated["migrations"].as_array().unwrap();
    assert_eq!(migrations.len(), 2, "{evacuated}");
    for m in migrations {
        assert_eq!(m["ok"], true, "{m}");
        assert_eq!(
            m["planned"], m["result"]["to"],
            "went where the batch planned: {m}"
        );
    }
    for vm in [&a, &b] {
        let record = owner(&nodes[0], vm);
        assert_ne!(record.owner, 2);
        assert_eq!(record.holding, Holding::Owned);
        wait_until(|| runs(&nodes[(record.owner - 1) as usize], vm));
        // Exactly one agent runs it.
        assert_eq!(nodes.iter().filter(|n| runs(n, vm)).count(), 1);
    }
    assert!(nodes[1].agent().running().is_empty());
}

#[test]
fn the_control_server_refuses_wrong_keys_garbage_and_oversize_requests() {
    use std::io::{BufRead, BufReader};
    let p = pair(Faulty::default());
    let addr = p.source.control_addr();
    let create = Request::CreateVm {
        vm: VmId::new("intruder").unwrap(),
        size: MIB,
        dirty_rate: 0,
    };
    // A client with another key.
    let error =
        dwcp_node::call(addr, &Psk::generate(), &create, Duration::from_secs(5)).unwrap_err();
    assert!(error.to_string().contains("not authenticated"), "{error}");
    // Garbage, a line past the limit, a replayed (wrong-nonce) MAC, inside a TLS session: each
    // answered with an error.
    let raw = |payload: Vec<u8>| -> String {
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let secured = Security::psk(p.psk.clone())
            .connect(Box::new(tcp), addr, deadline)
            .unwrap();
        let mut s = secured.conn;
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut reader = BufReader::new(s.try_clone_conn().unwrap());
        let mut challenge = String::new();
        reader.read_line(&mut challenge).unwrap();
        let _ = s.write_all(&payload);
        let mut answer = String::new();
        let _ = reader.read_line(&mut answer);
        answer
    };
    assert!(raw(b"not json\n".to_vec()).contains("malformed"));
    let mut huge = vec![b'x'; dwcp_node::protocol::MAX_LINE + 10];
    huge.push(b'\n');
    assert!(raw(huge).contains("longer than"));
    let replay = format!(
        "{{\"mac\":\"{}\",\"request\":{}}}\n",
        "00".repeat(32),
        serde_json::to_string(&create).unwrap()
    );
    assert!(raw(replay.into_bytes()).contains("not authenticated"));
    // Nothing was created.
    let vm = VmId::new("intruder").unwrap();
    assert_eq!(p.runtime.block_on(p.registry.ownership(&vm)).unwrap(), None);
    assert!(p.source.running().is_empty());
}

/// A TCP relay on loopback to `target` for one connection; returns its address and, once the
/// connection ended, what the client sent.
fn relay(target: SocketAddr) -> (SocketAddr, std::thread::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind(loopback(0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (inbound, _) = listener.accept().unwrap();
        let outbound = TcpStream::connect(target).unwrap();
        for s in [&inbound, &outbound] {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        }
        let back = {
            let (from, to) = (outbound.try_clone().unwrap(), inbound.try_clone().unwrap());
            std::thread::spawn(move || pipe(from, to))
        };
        let sent = pipe(inbound, outbound);
        let _ = back.join();
        sent
    });
    (addr, handle)
}

/// Copies `from` to `to` until the end, and returns the bytes.
fn pipe(mut from: TcpStream, mut to: TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 16 << 10];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        seen.extend_from_slice(&buf[..n]);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    seen
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn control_requests_cross_the_wire_encrypted_and_plain_text_clients_are_refused() {
    const MARKER: &str = "control-wire-marker-9b7d";
    let create = Request::CreateVm {
        vm: VmId::new(MARKER).unwrap(),
        size: MIB,
        dirty_rate: 0,
    };
    // TLS (the default): the request is carried out, but neither it nor the challenge is visible
    // on the wire.
    let p = pair(Faulty::default());
    let (via, sent) = relay(p.source.control_addr());
    let created = dwcp_node::call(via, &p.psk, &create, Duration::from_secs(10)).unwrap();
    assert_eq!(created["vm"], MARKER, "{created}");
    let sent = sent.join().unwrap();
    assert!(!sent.is_empty());
    assert!(!contains(&sent, MARKER.as_bytes()), "the request in clear");
    assert!(!contains(&sent, b"\"mac\""), "the envelope in clear");

    // A client without TLS (same key) gets nothing in clear and is refused; the agent goes on
    // serving clients that speak TLS.
    let plain = Security::insecure_plaintext(p.psk.clone());
    let status = Request::Status;
    let refused = dwcp_node::call_with(
        p.source.control_addr(),
        &plain,
        &status,
        Duration::from_secs(2),
    );
    assert!(refused.is_err(), "{refused:?}");
    dwcp_node::call(
        p.source.control_addr(),
        &p.psk,
        &status,
        Duration::from_secs(10),
    )
    .unwrap();

    // The same capture of an explicitly plain-text agent does show the request: the check above
    // looks at the right bytes.
    let p = pair_secured(Faulty::default(), Security::insecure_plaintext);
    let plain = Security::insecure_plaintext(p.psk.clone());
    let (via, sent) = relay(p.source.control_addr());
    dwcp_node::call_with(via, &plain, &create, Duration::from_secs(10)).unwrap();
    assert!(contains(&sent.join().unwrap(), MARKER.as_bytes()));
    // And a TLS client does not get through to a plain-text agent either.
    let refused = dwcp_node::call(
        p.source.control_addr(),
        &p.psk,
        &status,
        Duration::from_secs(5),
    );
    assert!(refused.is_err(), "{refused:?}");
}

fn certified(ca: &CertificateAuthority) -> Security {
    ca.security_for(&["127.0.0.1"]).unwrap()
}

#[test]
fn agents_with_certificates_migrate_and_refuse_clients_without_one() {
    let ca = CertificateAuthority::generate().unwrap();
    let p = pair_secured(Faulty::default(), |_| certified(&ca));
    // Prepare (agent to agent) and the migration streams run in certificate mode.
    let (result, record) = migrate_once(&p);
    result.unwrap();
    assert_eq!((record.owner, record.holding), (2, Holding::Owned));
    wait_until(|| p.dest.running().len() == 1);

    let addr = p.dest.control_addr();
    let status = Request::Status;
    let answer =
        dwcp_node::call_with(addr, &certified(&ca), &status, Duration::from_secs(10)).unwrap();
    assert_eq!(answer["security"], "tls-certificates", "{answer}");
    let other_ca = certified(&CertificateAuthority::generate().unwrap());
    for (who, client) in [
        ("a certificate of another CA", other_ca),
        (
            "the cluster key without a certificate",
            Security::psk(p.psk.clone()),
        ),
        ("plain text", Security::insecure_plaintext(p.psk.clone())),
    ] {
        let refused = dwcp_node::call_with(addr, &client, &status, Duration::from_secs(3));
        assert!(refused.is_err(), "{who}: {refused:?}");
    }
}
