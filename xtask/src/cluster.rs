//! `cargo xtask bench cluster`: the cluster side measured in one run, written to one table
//! (`target/criterion/cluster-table.md`, JSON beside it):
//!
//! - ACP: commits/s and commit latency on 3 nodes on loopback, the embedded raft and a real etcd
//!   side by side, and the ownership handoff's latency (`benches/benches/cluster.rs`);
//! - ITP: placement decisions/s on 100- and 1000-node views, the index next to the full scan
//!   (`dwcp-itp/benches/placement.rs`, criterion);
//! - ASS: gossip convergence for 100 simulated nodes (`dwcp-ass/examples/convergence.rs`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::Workspace;
use crate::process::{Io, run};

const TIMEOUT: Duration = Duration::from_secs(3600);

/// Runs the three parts and prints the combined table.
pub fn bench(ws: &Workspace, quick: bool) -> Result<()> {
    let dir = ws.target.join("criterion");
    std::fs::create_dir_all(&dir)?;
    let acp_table = dir.join("cluster-acp.md");
    let mut acp = ws.cargo();
    acp.args(["bench", "-p", "dwcp-benches", "--bench", "cluster"])
        .env("DWCP_CLUSTER_TABLE", &acp_table);
    if quick {
        acp.args(["--", "--quick"]);
    }
    eprintln!("\n==> cargo bench -p dwcp-benches --bench cluster");
    run(&mut acp, Io::Inherit, TIMEOUT)?;

    let mut itp = ws.cargo();
    itp.args(["bench", "-p", "dwcp-itp", "--bench", "placement"]);
    if quick {
        itp.args(["--", "--quick"]);
    }
    eprintln!("\n==> cargo bench -p dwcp-itp --bench placement");
    run(&mut itp, Io::Inherit, TIMEOUT)?;

    let mut ass = ws.cargo();
    ass.args([
        "run",
        "--release",
        "-q",
        "-p",
        "dwcp-ass",
        "--example",
        "convergence",
        "--",
    ])
    .args([
        "--runs",
        if quick { "2" } else { "5" },
        "--updates",
        if quick { "5" } else { "10" },
    ]);
    eprintln!("\n==> cargo run --release -p dwcp-ass --example convergence");
    let out = run(&mut ass, Io::Capture, TIMEOUT)?;
    let gossip: Value =
        serde_json::from_str(&out.stdout).context("parsing the convergence report")?;

    let mut table = std::fs::read_to_string(&acp_table)
        .with_context(|| format!("reading {}", acp_table.display()))?;
    table += "\n";
    table += &placement_table(&dir)?;
    table += "\n";
    table += &gossip_table(&gossip);
    let path = dir.join("cluster-table.md");
    std::fs::write(&path, &table)?;
    std::fs::write(
        dir.join("cluster-gossip.json"),
        serde_json::to_string_pretty(&gossip)?,
    )?;
    println!("{table}\n(written to {})", path.display());
    Ok(())
}

/// Criterion's mean time per iteration, in nanoseconds.
fn mean_ns(dir: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join("new").join("estimates.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn placement_table(criterion: &Path) -> Result<String> {
    let mut out = String::from(
        "### ITP: placement decisions per second (criterion, same run)\n\n\
         | benchmark | view | indexed | full scan | ratio |\n|---|---|---:|---:|---:|\n",
    );
    for (group, per_iteration) in [("place", 1000.0), ("evacuate", 1000.0), ("best", 1.0)] {
        let indexed = criterion.join(group).join("indexed");
        let Ok(views) = std::fs::read_dir(&indexed) else {
            continue;
        };
        let mut views: Vec<String> = views
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|v| v != "report")
            .collect();
        views.sort();
        for view in views {
            let rate = |kind: &str| {
                mean_ns(&criterion.join(group).join(kind).join(&view))
                    .map(|ns| per_iteration / ns * 1e9)
            };
            let (i, s) = (rate("indexed"), rate("scan"));
            let fmt = |r: Option<f64>| r.map_or("–".into(), |r| format!("{:.0}", r));
            let ratio = match (i, s) {
                (Some(i), Some(s)) => format!("{:.1}x", i / s),
                _ => "–".into(),
            };
            out += &format!("| {group} | {view} | {} | {} | {ratio} |\n", fmt(i), fmt(s));
        }
    }
    Ok(out)
}

fn gossip_table(g: &Value) -> String {
    let row = |name: &str, key: &str| {
        format!(
            "| {name} | {:.0} | {:.0} | {:.0} |\n",
            g[key]["p50"].as_f64().unwrap_or(f64::NAN),
            g[key]["p99"].as_f64().unwrap_or(f64::NAN),
            g[key]["max"].as_f64().unwrap_or(f64::NAN)
        )
    };
    let mut out = format!(
        "### ASS: gossip among {} simulated nodes ({}, {} ms rounds, {} runs)\n\n\
         | quantity | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|\n",
        g["nodes"],
        g["transport"].as_str().unwrap_or("?"),
        g["gossip_interval_ms"],
        g["runs"]
    );
    out += &row(
        "cold start: every node has every state",
        "cold_start_all_states_ms",
    );
    out += &row(
        "cold start: every node sees every other alive",
        "cold_start_all_alive_ms",
    );
    out += &row("one update reaches all nodes", "update_all_nodes_ms");
    out += &row("staleness of live peers' state", "live_staleness_ms");
    out
}
