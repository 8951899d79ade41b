//! `cargo xtask bench cluster`: the registry (ACP) on three real nodes, both backends side by side
//! in one run — commits per second with many concurrent writers, the latency of one commit, and
//! the latency of a migration's ownership handoff (begin + commit) — then placement (ITP) and
//! gossip convergence (ASS).
//!
//! Not a criterion bench: throughput under concurrency and latency percentiles need their own
//! loop. `DWCP_CLUSTER_TABLE` names the Markdown table to write (the JSON goes beside it);
//! `--quick` shortens every phase.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dwcp_acp::raft::{RaftConfig, RaftNode};
use dwcp_acp::{Registry, VmId};
use dwcp_core::handshake::Psk;
use serde_json::{Value, json};

struct Phase {
    quick: bool,
}

impl Phase {
    fn throughput_time(&self) -> Duration {
        Duration::from_secs(if self.quick { 2 } else { 8 })
    }
    fn handoffs(&self) -> usize {
        if self.quick { 100 } else { 500 }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// `writers` tasks registering fresh VMs for `time`: committed ops/s and per-op latency.
async fn throughput(
    registry: Arc<dyn Registry>,
    writers: usize,
    time: Duration,
    tag: &str,
) -> Value {
    let start = Instant::now();
    let deadline = start + time;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let registry = registry.clone();
            let tag = tag.to_owned();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let vm = VmId::new(format!("{tag}-w{w}-{n}")).expect("valid");
                    n += 1;
                    let t = Instant::now();
                    match registry.register(&vm, 1).await {
                        Ok(_) => latencies.push(t.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("writer task");
        all.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort();
    json!({
        "writers": writers,
        "ops_per_s": all.len() as f64 / elapsed,
        "p50_ms": percentile(&all, 0.5),
        "p99_ms": percentile(&all, 0.99),
        "errors": errors,
    })
}

/// Sequential handoffs of one VM between nodes 1 and 2: begin + commit, as a migration does.
async fn handoffs(registry: Arc<dyn Registry>, count: usize, tag: &str) -> Value {
    let vm = VmId::new(format!("{tag}-handoff")).expect("valid");
    let mut record = registry.register(&vm, 1).await.expect("register");
    let mut pairs = Vec::with_capacity(count);
    for _ in 0..count {
        let to = if record.owner == 1 { 2 } else { 1 };
        let t = Instant::now();
        let begun = registry
            .begin_handoff(&vm, record.owner, record.fence, to)
            .await
            .expect("begin");
        record = registry
            .commit_handoff(&vm, begun.owner, begun.fence, to)
            .await
            .expect("commit");
        pairs.push(t.elapsed());
    }
    pairs.sort();
    json!({ "handoffs": count, "p50_ms": percentile(&pairs, 0.5), "p99_ms": percentile(&pairs, 0.99) })
}

async fn measure(registry: Arc<dyn Registry>, phase: &Phase, tag: &str) -> Value {
    let single = throughput(
        registry.clone(),
        1,
        phase.throughput_time() / 2,
        &format!("{tag}-s"),
    )
    .await;
    let w64 = throughput(
        registry.clone(),
        64,
        phase.throughput_time(),
        &format!("{tag}-a"),
    )
    .await;
    let w512 = throughput(
        registry.clone(),
        512,
        phase.throughput_time(),
        &format!("{tag}-b"),
    )
    .await;
    let w2048 = throughput(
        registry.clone(),
        2048,
        phase.throughput_time(),
        &format!("{tag}-c"),
    )
    .await;
    let handoff = handoffs(registry, phase.handoffs(), tag).await;
    json!({
        "one_writer": single, "writers_64": w64, "writers_512": w512, "writers_2048": w2048,
        "handoff": handoff,
    })
}

fn free_addr() -> SocketAddr {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

async fn raft(phase: &Phase) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let psk = Psk::generate();
    let peers: BTreeMap<u64, SocketAddr> = (1..=3).map(|id| (id, free_addr())).collect();
    let starts: Vec<_> = peers
        .iter()
        .map(|(&id, &addr)| {
            let mut config = RaftConfig::new(
                id,
                dir.path().join(format!("n{id}")),
                addr,
                peers.clone(),
                psk.clone(),
            );
            config.bootstrap = true;
            tokio::spawn(RaftNode::start(config))
        })
        .collect();
    let mut nodes = Vec::new();
    for s in starts {
        nodes.push(s.await.expect("task").expect("raft node"));
    }
    let leader = nodes[0]
        .wait_for_leader(Duration::from_secs(10))
        .await
        .expect("a leader");
    let leader_node = nodes
        .iter()
        .find(|n| n.id() == leader)
        .expect("leader is a member");
    let follower_node = nodes.iter().find(|n| n.id() != leader).expect("a follower");
    let mut result = measure(leader_node.registry(), phase, "raft").await;
    result["via_follower"] = throughput(
        follower_node.registry(),
        64,
        phase.throughput_time(),
        "raft-f",
    )
    .await;
    for n in nodes {
        let _ = n.shutdown().await;
    }
    result
}

async fn etcd(phase: &Phase) -> Value {
    let cluster = match dwcp_acp::etcd::testing::EtcdCluster::start(3) {
        Ok(c) => c,
        Err(e) => return json!({ "error": e.to_string() }),
    };
    let registry = dwcp_acp::etcd::EtcdRegistry::connect(
        &cluster.endpoints(),
        "/bench",
        Duration::from_secs(5),
    )
    .await
    .expect("etcd client");
    measure(Arc::new(registry), phase, "etcd").await
}

fn row(name: &str, v: &Value) -> String {
    format!(
        "| {name} | {:.0} | {:.2} | {:.2} |",
        v["ops_per_s"].as_f64().unwrap_or(f64::NAN),
        v["p50_ms"].as_f64().unwrap_or(f64::NAN),
        v["p99_ms"].as_f64().unwrap_or(f64::NAN)
    )
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `cargo bench` passes `--bench`; anything else is ours to ignore.
    let phase = Phase { quick };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let raft = runtime.block_on(raft(&phase));
    let etcd = runtime.block_on(etcd(&phase));

    let mut table = String::from(
        "### ACP: the registry on 3 nodes on loopback, one run\n\n\
         | backend, load | committed ops/s | p50 ms | p99 ms |\n|---|---:|---:|---:|\n",
    );
    for (name, v) in [("embedded raft", &raft), ("etcd 3.4", &etcd)] {
        for (load, key) in [
            ("1 writer", "one_writer"),
            ("64 writers", "writers_64"),
            ("512 writers", "writers_512"),
            ("2048 writers", "writers_2048"),
        ] {
            table += &row(&format!("{name}, {load}"), &v[key]);
            table.push('\n');
        }
        if !v["via_follower"].is_null() {
            table += &row(
                &format!("{name}, 64 writers via a follower"),
                &v["via_follower"],
            );
            table.push('\n');
        }
        table += &format!(
            "| {name}, handoff (begin + commit), sequential | – | {:.2} | {:.2} |\n",
            v["handoff"]["p50_ms"].as_f64().unwrap_or(f64::NAN),
            v["handoff"]["p99_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let report = json!({ "raft": raft, "etcd": etcd });
    println!("{table}");
    if let Ok(path) = std::env::var("DWCP_CLUSTER_TABLE") {
        std::fs::write(&path, &table).expect("writing the table");
        let json_path = std::path::Path::new(&path).with_extension("json");
        std::fs::write(
            &json_path,
            serde_json::to_string_pretty(&report).expect("json"),
        )
        .expect("writing the JSON");
    }
}
