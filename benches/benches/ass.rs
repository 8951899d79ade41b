//! ASS state sync, the per-node costs: publishing this node's state (validate, encode, stamp,
//! write chitchat's keys) and reading the cluster view (decode each peer's newest values, liveness
//! and staleness) on 10- and 100-node clusters over chitchat's in-memory transport. The seed's
//! figure for "ASS" was 20 K/s. How fast an update spreads is a latency, measured by
//! `cargo run --release -p dwcp-ass --example convergence` (docs/ass.md).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dwcp_ass::{Gossip, GossipConfig, NodeState, SimNetwork};

fn state(id: u64, nodes: u64, load: f64) -> NodeState {
    NodeState {
        free_memory: 100 << 30,
        memory_total: 256 << 30,
        cpu_load: load,
        vcpus_free: 32,
        running_vms: 4,
        migration_addr: format!("10.1.{}.{}:7700", id / 256, id % 256),
        agent_addr: format!("10.1.{}.{}:7701", id / 256, id % 256),
        link_forecasts: (1..=8.min(nodes.saturating_sub(1)))
            .map(|d| ((id + d) % nodes, 1.1e9 + d as f64))
            .collect::<BTreeMap<_, _>>(),
        updated_at_ms: 0,
        seq: 0,
    }
}

/// `nodes` gossiping nodes, each with its state published, once node 0 sees all of them.
async fn cluster(net: &SimNetwork, nodes: u64) -> Vec<Gossip> {
    let mut all: Vec<Gossip> = Vec::new();
    for id in 0..nodes {
        let seeds: Vec<_> = all.iter().take(3).map(Gossip::listen_addr).collect();
        let config = GossipConfig::new(id, "127.0.0.1:0".parse().expect("address"), "bench")
            .with_seeds(seeds)
            .with_gossip_interval(Duration::from_millis(50));
        let node = Gossip::start_simulated(config, net)
            .await
            .expect("starting a simulated node");
        node.publish(&state(id, nodes, 0.5))
            .await
            .expect("publishing");
        all.push(node);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = all[0].view().await;
        let known = (0..nodes)
            .filter(|id| view.get(*id).is_some_and(|v| v.state.is_some()))
            .count() as u64;
        if known == nodes {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 0 knows {known} of {nodes} states after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    all
}

fn ass(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut g = c.benchmark_group("ass");

    let net = SimNetwork::new();
    let nodes = rt.block_on(cluster(&net, 10));
    let mut load = 0.0;
    g.throughput(Throughput::Elements(1));
    g.bench_function("publish", |b| {
        b.iter(|| {
            load += 0.001;
            rt.block_on(nodes[0].publish(&state(0, 10, load)))
                .expect("publishing")
        })
    });
    for n in nodes {
        rt.block_on(n.shutdown()).expect("shutting a node down");
    }

    for size in [10u64, 100] {
        let net = SimNetwork::new();
        let nodes = rt.block_on(cluster(&net, size));
        g.throughput(Throughput::Elements(size));
        g.bench_function(BenchmarkId::new("view", size), |b| {
            b.iter(|| {
                let view = rt.block_on(nodes[0].view());
                assert!(view.get(size - 1).is_some(), "the view holds every node");
                view
            })
        });
        for n in nodes {
            rt.block_on(n.shutdown()).expect("shutting a node down");
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = dwcp_benches::criterion_config();
    targets = ass
}
criterion_main!(benches);
