//! Measures gossip convergence for many simulated nodes in one process and prints JSON.
//!
//! ```text
//! cargo run --release -p dwcp-ass --example convergence -- \
//!     [--nodes 100] [--runs 5] [--updates 20] [--interval-ms 100] [--seeds 3] [--links 8] \
//!     [--transport mem|udp] [--compress on|off]
//! ```
//!
//! Per run: start all nodes (each publishes at once) and time until every node holds every
//! node's state (`cold_start_all_states`) and sees every node alive (`cold_start_all_alive`); then
//! sample every node's staleness of every live peer in steady state; then, `updates` times, let one
//! node publish and time until all nodes hold that `seq` (`update_all_nodes`). Percentiles are
//! nearest-rank over all runs' samples. `mem` is chitchat's in-memory transport (serialised
//! messages, 64 KiB datagram bound, no loss); `udp` is real sockets on 127.0.0.1.

use std::collections::BTreeMap;
use std::time::Duration;

use dwcp_ass::{Gossip, GossipConfig, NodeState, SimNetwork};
use serde_json::{Value, json};
use tokio::time::{Instant, sleep};

struct Args {
    nodes: u64,
    runs: usize,
    updates: usize,
    interval: Duration,
    seeds: usize,
    links: u64,
    udp: bool,
    compress: bool,
}

fn args() -> Args {
    let mut a = Args {
        nodes: 100,
        runs: 5,
        updates: 20,
        interval: Duration::from_millis(100),
        seeds: 3,
        links: 8,
        udp: false,
        compress: false,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| panic!("{flag} needs a value"))
                .clone()
        };
        match flag.as_str() {
            "--nodes" => a.nodes = val().parse().expect("--nodes N"),
            "--runs" => a.runs = val().parse().expect("--runs N"),
            "--updates" => a.updates = val().parse().expect("--updates N"),
            "--interval-ms" => a.interval = Duration::from_millis(val().parse().expect("ms")),
            "--seeds" => a.seeds = val().parse().expect("--seeds N"),
            "--links" => a.links = val().parse().expect("--links N"),
            "--transport" => a.udp = val() == "udp",
            "--compress" => a.compress = val() == "on",
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(a.nodes >= 2 && a.seeds >= 1);
    a
}

fn state(id: u64, n: u64, links: u64, load: f64) -> NodeState {
    NodeState {
        free_memory: 100 << 30,
        memory_total: 256 << 30,
        cpu_load: load,
        vcpus_free: 32,
        running_vms: 4,
        migration_addr: format!("10.1.{}.{}:7700", id / 256, id % 256),
        agent_addr: format!("10.1.{}.{}:7701", id / 256, id % 256),
        // Forecasts towards the next `links` nodes: a node forecasts the links it has measured.
        link_forecasts: (1..=links.min(n - 1))
            .map(|d| ((id + d) % n, 1.1e9 + d as f64))
            .collect(),
        updated_at_ms: 0,
        seq: 0,
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

fn summary(mut samples: Vec<f64>) -> Value {
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if samples.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * samples.len() as f64).ceil().max(1.0) as usize;
        samples[rank - 1]
    };
    json!({
        "n": samples.len(),
        "p50": pct(50.0),
        "p99": pct(99.0),
        "max": samples.last().copied().unwrap_or(f64::NAN),
    })
}

async fn start(a: &Args, net: &SimNetwork) -> Vec<Gossip> {
    let mut nodes: Vec<Gossip> = Vec::new();
    for id in 0..a.nodes {
        let seeds: Vec<_> = nodes
            .iter()
            .take(a.seeds)
            .map(|g| g.listen_addr())
            .collect();
        let mut config = GossipConfig::new(id, "127.0.0.1:0".parse().unwrap(), "convergence")
            .with_seeds(seeds)
            .with_gossip_interval(a.interval);
        config.compress_digest = a.compress;
        let node = if a.udp {
            Gossip::start(config).await
        } else {
            Gossip::start_simulated(config, net).await
        }
        .expect("start node");
        node.publish(&state(id, a.nodes, a.links, 0.0))
            .await
            .unwrap();
        nodes.push(node);
    }
    nodes
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let n = a.nodes as usize;
    let bound = Duration::from_secs(120);
    let (mut cold_states, mut cold_alive, mut spawn) = (vec![], vec![], vec![]);
    let (mut updates, mut staleness, mut traffic) = (vec![], vec![], vec![]);
    for run in 0..a.runs {
        let net = SimNetwork::new();
        let t0 = Instant::now();
        let nodes = start(&a, &net).await;
        spawn.push(ms(t0.elapsed()));

        // Cold start: every node must know every node's state, then see every node alive.
        let (mut have_states, mut have_alive) = (vec![false; n], vec![false; n]);
        let (mut t_states, mut t_alive) = (None, None);
        while t_alive.is_none() {
            assert!(
                t0.elapsed() < bound,
                "run {run}: no convergence within {bound:?}"
            );
            for (i, node) in nodes.iter().enumerate() {
                if have_alive[i] {
                    continue;
                }
                let v = node.view().await;
                have_states[i] |= v.nodes.len() == n && v.nodes.values().all(|x| x.state.is_some());
                have_alive[i] = have_states[i] && v.nodes.values().all(|x| x.alive);
            }
            if t_states.is_none() && have_states.iter().all(|x| *x) {
                t_states = Some(t0.elapsed());
            }
            if have_alive.iter().all(|x| *x) {
                t_alive = Some(t0.elapsed());
            }
            sleep(Duration::from_millis(10)).await;
        }
        cold_states.push(ms(t_states.unwrap()));
        cold_alive.push(ms(t_alive.unwrap()));

        // Steady state: staleness of every live peer as every node sees it, and traffic.
        sleep(a.interval * 10).await;
        let (traffic0, tt0) = (net.traffic(), Instant::now());
        for _ in 0..5 {
            for node in &nodes {
                let v = node.view().await;
                staleness.extend(
                    v.alive()
                        .filter(|x| x.node_id != v.self_id)
                        .map(|x| ms(x.staleness)),
                );
            }
            sleep(a.interval * 3).await;
        }
        if !a.udp {
            let bytes = net.traffic().bytes - traffic0.bytes;
            traffic.push(bytes as f64 / tt0.elapsed().as_secs_f64() / n as f64);
        }

        // Updates: one node publishes; time until all nodes hold that seq.
        for u in 0..a.updates {
            let k = ((run * a.updates + u) * 37 % n) as u64;
            let seq = nodes[k as usize]
                .publish(&state(k, a.nodes, a.links, 1.0 + u as f64))
                .await
                .unwrap();
            let t = Instant::now();
            let mut done = vec![false; n];
            loop {
                assert!(
                    t.elapsed() < bound,
                    "run {run}: update not everywhere in {bound:?}"
                );
                for (i, node) in nodes.iter().enumerate() {
                    if !done[i] {
                        done[i] = node
                            .node(k)
                            .await
                            .and_then(|x| x.state)
                            .is_some_and(|s| s.seq >= seq);
                    }
                }
                if done.iter().all(|x| *x) {
                    break;
                }
                // 10 ms: finer polling of 100 nodes costs CPU the simulated nodes share.
                sleep(Duration::from_millis(10)).await;
            }
            updates.push(ms(t.elapsed()));
            sleep(a.interval * 2).await;
        }
        for node in nodes {
            node.shutdown().await.unwrap();
        }
        eprintln!(
            "run {run}: cold start states {:?} ms, alive {:?} ms",
            cold_states.last().unwrap(),
            cold_alive.last().unwrap()
        );
    }
    let interval_ms = a.interval.as_secs_f64() * 1e3;
    let rounds = |v: &[f64]| {
        summary(
            v.iter()
                .map(|x| (x / interval_ms * 10.0).round() / 10.0)
                .collect(),
        )
    };
    let mut out = BTreeMap::new();
    out.insert("nodes", json!(a.nodes));
    out.insert("runs", json!(a.runs));
    out.insert("updates_per_run", json!(a.updates));
    out.insert("gossip_interval_ms", json!(interval_ms));
    out.insert("seeds", json!(a.seeds));
    out.insert("compress_digest", json!(a.compress));
    out.insert("link_forecasts_per_node", json!(a.links.min(a.nodes - 1)));
    out.insert(
        "transport",
        json!(if a.udp { "udp-loopback" } else { "in-memory" }),
    );
    out.insert("spawn_all_ms", summary(spawn));
    out.insert("cold_start_all_states_ms", summary(cold_states.clone()));
    out.insert("cold_start_all_states_rounds", rounds(&cold_states));
    out.insert("cold_start_all_alive_ms", summary(cold_alive));
    out.insert("update_all_nodes_ms", summary(updates.clone()));
    out.insert("update_all_nodes_rounds", rounds(&updates));
    out.insert("live_staleness_ms", summary(staleness));
    if !traffic.is_empty() {
        out.insert("steady_bytes_per_node_per_s", summary(traffic));
    }
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
