//! `cargo xtask bench postcopy`: the fault service latency of post-copy on loopback (issue 17's
//! target: p99 <= 1 ms), TLS and plain text alternating, with a 4 KiB TCP round trip measured in
//! the same process as the floor. Each round moves the whole memory by post-copy while two vCPU
//! threads on the destination touch random pages from the first moment.
//!
//! Results go to stdout and `target/xtask/bench-postcopy.json`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::Workspace;
use crate::headline::{parse_json, upper_median};
use crate::process::{Io, run};

/// Target (issue 17): page-fault service latency p99 on loopback.
const FAULT_P99_TARGET_US: f64 = 1000.0;
const ROUND_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs the benchmark.
pub fn bench(ws: &Workspace, quick: bool, rounds: Option<usize>) -> Result<()> {
    let mut build = ws.cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "dwcp-postcopy",
        "--example",
        "postcopy_latency",
    ]);
    run(&mut build, Io::Inherit, crate::CARGO_TIMEOUT)?;
    let bin: PathBuf = ws
        .target
        .join("release")
        .join("examples")
        .join("postcopy_latency");
    if !bin.is_file() {
        bail!("{} was not built", bin.display());
    }
    let size = if quick { "256" } else { "1024" };
    let rounds = rounds.unwrap_or(if quick { 1 } else { 3 }).max(1);
    let mut runs: Vec<Value> = Vec::new();
    for round in 0..rounds {
        for plaintext in [false, true] {
            let mut cmd = Command::new(&bin);
            cmd.args(["--size-mib", size, "--vcpus", "2"]);
            if plaintext {
                cmd.arg("--plaintext");
            }
            let done = run(&mut cmd, Io::Capture, ROUND_TIMEOUT)?;
            let v = parse_json("postcopy_latency", &done.stdout)?;
            eprintln!("round {round}: {v}");
            runs.push(v);
        }
    }
    let field = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let mut summary = serde_json::Map::new();
    for mode in ["tls-psk", "insecure-plaintext"] {
        let of: Vec<&Value> = runs
            .iter()
            .filter(|v| v.get("security").and_then(Value::as_str) == Some(mode))
            .collect();
        let median = |k: &str| upper_median(&of.iter().map(|v| field(v, k)).collect::<Vec<_>>());
        summary.insert(
            mode.into(),
            json!({
                "fault_p50_us": median("fault_p50_us"),
                "fault_p99_us": median("fault_p99_us"),
                "fault_max_us": median("fault_max_us"),
                "faults": median("faults"),
                "throughput_mb_s": median("throughput_mb_s"),
                "tcp_4k_rtt_p99_us": median("tcp_4k_rtt_p99_us"),
            }),
        );
    }
    let tls_p99 = summary["tls-psk"]["fault_p99_us"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let met = tls_p99 <= FAULT_P99_TARGET_US;
    println!("\npost-copy of {size} MiB, {rounds} round(s), medians:");
    for (mode, s) in &summary {
        println!(
            "  {mode:<19} fault p50 {:>7.1} us  p99 {:>7.1} us  max {:>9.1} us  ({} faults, {:.0} MB/s; 4 KiB TCP RTT p99 {:.1} us)",
            s["fault_p50_us"].as_f64().unwrap_or(f64::NAN),
            s["fault_p99_us"].as_f64().unwrap_or(f64::NAN),
            s["fault_max_us"].as_f64().unwrap_or(f64::NAN),
            s["faults"].as_f64().unwrap_or(f64::NAN),
            s["throughput_mb_s"].as_f64().unwrap_or(f64::NAN),
            s["tcp_4k_rtt_p99_us"].as_f64().unwrap_or(f64::NAN),
        );
    }
    println!(
        "  target: TLS fault p99 <= {FAULT_P99_TARGET_US} us: {}",
        if met { "met" } else { "NOT met" }
    );
    let out = ws.target.join("xtask").join("bench-postcopy.json");
    std::fs::create_dir_all(out.parent().expect("a parent"))?;
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&json!({
            "size_mib": size,
            "rounds": rounds,
            "runs": runs,
            "summary": summary,
            "target_fault_p99_us": FAULT_P99_TARGET_US,
            "met": met,
        }))?,
    )?;
    println!("  written to {}", out.display());
    Ok(())
}
