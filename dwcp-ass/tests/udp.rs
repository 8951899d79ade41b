//! Real UDP on 127.0.0.1 with ephemeral ports: convergence, propagation, failure detection and
//! restart, malformed peer values. Every wait is bounded; each test prints what it measured.

use std::net::SocketAddr;
use std::time::Duration;

use chitchat::transport::UdpTransport;
use chitchat::{
    ChitchatConfig, ChitchatId, FailureDetectorConfig, ProtocolVersion, spawn_chitchat,
};
use dwcp_ass::{Gossip, GossipConfig, NodeState, keys};
use tokio::time::{Instant, sleep};

const ROUND: Duration = Duration::from_millis(100);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "dwcp_ass=warn".into()),
        )
        .try_init();
}

fn config(id: u64, cluster: &str, seeds: &[SocketAddr]) -> GossipConfig {
    GossipConfig::new(id, "127.0.0.1:0".parse().unwrap(), cluster)
        .with_seeds(seeds.iter().copied())
        .with_gossip_interval(ROUND)
}

fn state_of(id: u64, load: f64) -> NodeState {
    NodeState {
        free_memory: id << 30,
        memory_total: 256 << 30,
        cpu_load: load,
        vcpus_free: 8,
        running_vms: id as u32,
        migration_addr: format!("127.0.0.1:{}", 7000 + id),
        agent_addr: format!("127.0.0.1:{}", 8000 + id),
        link_forecasts: (0..5)
            .filter(|p| *p != id)
            .map(|p| (p, 1e8 * (p + 1) as f64))
            .collect(),
        updated_at_ms: 0,
        seq: 0,
    }
}

/// Starts `n` nodes, node 0 the seed of all others, each having published `state_of(id, 0.0)`.
async fn cluster(n: u64, name: &str) -> Vec<Gossip> {
    let first = Gossip::start(config(0, name, &[])).await.unwrap();
    let seed = first.listen_addr();
    let mut nodes = vec![first];
    for id in 1..n {
        nodes.push(Gossip::start(config(id, name, &[seed])).await.unwrap());
    }
    for node in &nodes {
        node.publish(&state_of(node.node_id(), 0.0)).await.unwrap();
    }
    nodes
}

/// Polls `cond` every 10 ms until it holds or `bound` passes; returns the time it took.
async fn within<F, Fut>(bound: Duration, what: &str, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < bound, "{what}: not within {bound:?}");
        sleep(Duration::from_millis(10)).await;
    }
}

/// True when every node sees every node in `ids` alive with the state `want(id)` (seq aside).
async fn all_see(nodes: &[Gossip], ids: &[u64], want: impl Fn(u64) -> (NodeState, u64)) -> bool {
    for node in nodes {
        let view = node.view().await;
        for &id in ids {
            let (mut expected, seq) = want(id);
            let Some(nv) = view.get(id) else { return false };
            let Some(got) = &nv.state else { return false };
            expected.seq = seq;
            expected.updated_at_ms = got.updated_at_ms;
            if !nv.alive || *got != expected {
                return false;
            }
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_converge_and_an_update_propagates() {
    init_tracing();
    let nodes = cluster(5, "converge").await;
    let ids: Vec<u64> = (0..5).collect();
    let t = within(Duration::from_secs(10), "5 nodes converge", || {
        all_see(&nodes, &ids, |id| (state_of(id, 0.0), 1))
    })
    .await;
    println!(
        "5 nodes converged in {t:?} ({:.1} rounds)",
        t.as_secs_f64() / ROUND.as_secs_f64()
    );

    // Staleness of live peers is a few rounds at most once converged.
    let worst = {
        let mut worst = Duration::ZERO;
        for node in &nodes {
            worst = worst.max(node.view().await.max_live_staleness());
        }
        worst
    };
    println!("worst live staleness after convergence: {worst:?}");
    assert!(worst < ROUND * 10, "staleness {worst:?}");

    // An update of node 3 reaches all.
    let seq = nodes[3].publish(&state_of(3, 2.5)).await.unwrap();
    assert_eq!(seq, 2);
    let t = within(Duration::from_secs(5), "update propagates", || {
        all_see(&nodes, &[3], |id| (state_of(id, 2.5), 2))
    })
    .await;
    println!("update propagated to 5 nodes in {t:?}");
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_marked_dead_and_alive_again_after_restart() {
    init_tracing();
    let mut nodes = cluster(5, "kill").await;
    let ids: Vec<u64> = (0..5).collect();
    within(Duration::from_secs(10), "5 nodes converge", || {
        all_see(&nodes, &ids, |id| (state_of(id, 0.0), 1))
    })
    .await;
    let mut liveness = nodes[0].subscribe_liveness();
    let expected = config(4, "kill", &[]).expected_dead_after();

    // Kill node 4 (dropping it aborts its server and frees its socket, as a crash would).
    let victim = nodes.pop().unwrap();
    let (addr, old_generation) = (victim.listen_addr(), victim.generation());
    drop(victim);
    let t = within(Duration::from_secs(10), "node 4 marked dead", || async {
        for node in &nodes {
            let v = node.view().await;
            if v.get(4).is_none_or(|n| n.alive) {
                return false;
            }
        }
        true
    })
    .await;
    println!("node 4 marked dead by all 4 others in {t:?} (estimate {expected:?})");
    // The dead node's last state is still there, and its staleness grows.
    let v = nodes[0].node(4).await.unwrap();
    assert_eq!(v.state.unwrap().seq, 1);
    assert!(
        v.staleness >= Duration::from_millis(200),
        "{:?}",
        v.staleness
    );
    // The liveness watch saw it.
    tokio::time::timeout(
        Duration::from_secs(2),
        liveness.wait_for(|l| l.get(&4) == Some(&false)),
    )
    .await
    .expect("liveness watch reports node 4 dead")
    .unwrap();

    // Restart node 4 on the same address: a new generation, alive again, with fresh state.
    let mut cfg = config(4, "kill", &[nodes[0].listen_addr()]);
    cfg.listen = addr;
    let node4 = Gossip::start(cfg).await.unwrap();
    assert!(node4.generation() > old_generation);
    node4.publish(&state_of(4, 7.0)).await.unwrap();
    nodes.push(node4);
    let t = within(Duration::from_secs(10), "node 4 alive again", || {
        all_see(&nodes, &ids, |id| {
            if id == 4 {
                (state_of(4, 7.0), 1)
            } else {
                (state_of(id, 0.0), 1)
            }
        })
    })
    .await;
    println!("restarted node 4 alive with its new state everywhere in {t:?}");
    for node in &nodes[..4] {
        assert!(node.node(4).await.unwrap().generation > old_generation);
    }
    tokio::time::timeout(
        Duration::from_secs(2),
        liveness.wait_for(|l| l.get(&4) == Some(&true)),
    )
    .await
    .expect("liveness watch reports node 4 alive")
    .unwrap();
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

/// A raw chitchat node (not ASS) that publishes whatever it is given.
async fn raw_peer(
    node_id: &str,
    cluster: &str,
    seed: SocketAddr,
    kvs: Vec<(String, String)>,
) -> chitchat::ChitchatHandle {
    let listen = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = ChitchatConfig {
        chitchat_id: ChitchatId::new(node_id, 1, listen),
        cluster_id: cluster.to_string(),
        gossip_interval: ROUND,
        listen_addr: listen,
        seed_nodes: vec![seed.to_string()],
        failure_detector_config: FailureDetectorConfig {
            initial_interval: ROUND,
            ..Default::default()
        },
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V0,
    };
    spawn_chitchat(config, kvs, &UdpTransport).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_peer_values_are_ignored() {
    init_tracing();
    let nodes = cluster(3, "malformed").await;
    let seed = nodes[0].listen_addr();
    let good_res = r#"{"seq":1,"at_ms":5,"free_memory":1,"memory_total":2,"cpu_load":0.5,"vcpus_free":1,"running_vms":0}"#;
    let good_addr = r#"{"migration":"127.0.0.1:1","agent":"127.0.0.1:2"}"#;
    // Node 9: garbage resources, oversize addresses, links of the wrong shape.
    let bad = raw_peer(
        "9",
        "malformed",
        seed,
        vec![
            (keys::RES.into(), "not json {".into()),
            (
                keys::ADDR.into(),
                "x".repeat(keys::MAX_ADDR_VALUE_BYTES + 1),
            ),
            (keys::LINKS.into(), r#"{"peer":"fast"}"#.into()),
        ],
    )
    .await;
    // Node 10: valid resources and addresses, but a negative forecast and a NaN-ish load later.
    let partly = raw_peer(
        "10",
        "malformed",
        seed,
        vec![
            (keys::RES.into(), good_res.into()),
            (keys::ADDR.into(), good_addr.into()),
            (keys::LINKS.into(), r#"{"1":-3.0}"#.into()),
        ],
    )
    .await;
    // A chitchat node whose id is not an ASS node id at all.
    let foreign = raw_peer("not-a-number", "malformed", seed, vec![]).await;

    within(
        Duration::from_secs(10),
        "raw peers seen, bad values ignored",
        || async {
            for node in &nodes {
                let v = node.view().await;
                let (Some(n9), Some(n10)) = (v.get(9), v.get(10)) else {
                    return false;
                };
                // 9 is a member (it gossips) but has no usable state; 10's good keys are used and
                // its bad forecast map is dropped.
                let ok10 = n10.state.as_ref().is_some_and(|s| {
                    s.seq == 1 && s.cpu_load == 0.5 && s.link_forecasts.is_empty()
                });
                if !(n9.alive && n9.state.is_none() && ok10 && v.nodes.len() == 5) {
                    return false;
                }
            }
            true
        },
    )
    .await;

    // A later malformed resource value from 10 leaves its last good state in place; a later
    // valid one from 9 is taken.
    partly
        .with_chitchat(|c| {
            c.self_node_state()
                .set(keys::RES, r#"{"seq":2,"cpu_load":"high"}"#)
        })
        .await;
    bad.with_chitchat(|c| {
        let s = c.self_node_state();
        s.set(keys::RES, good_res);
        s.set(keys::ADDR, good_addr);
    })
    .await;
    within(Duration::from_secs(10), "node 9 recovers", || async {
        for node in &nodes {
            let v = node.view().await;
            if v.get(9)
                .and_then(|n| n.state.as_ref())
                .is_none_or(|s| s.seq != 1)
            {
                return false;
            }
        }
        true
    })
    .await;
    // Node 10's bad update arrived by now too (it was set before 9's good one, on another
    // node, so give it one more round) and was ignored.
    sleep(ROUND * 3).await;
    for node in &nodes {
        let s = node.node(10).await.unwrap().state.unwrap();
        assert_eq!((s.seq, s.cpu_load), (1, 0.5));
    }
    for h in [bad, partly, foreign] {
        h.shutdown().await.unwrap();
    }
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_with_different_ids_stay_apart() {
    init_tracing();
    let a = Gossip::start(config(1, "alpha", &[])).await.unwrap();
    let b = Gossip::start(config(2, "beta", &[a.listen_addr()]))
        .await
        .unwrap();
    a.publish(&state_of(1, 0.0)).await.unwrap();
    b.publish(&state_of(2, 0.0)).await.unwrap();
    sleep(ROUND * 10).await;
    assert_eq!(
        a.view().await.nodes.keys().copied().collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(
        b.view().await.nodes.keys().copied().collect::<Vec<_>>(),
        vec![2]
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
