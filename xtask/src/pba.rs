//! `cargo xtask pba record|train` and `cargo xtask bench pba`: link traces for PBA's predictors,
//! the learned predictor's weights, and every predictor's error against last value.
//!
//! `record` migrates a random image with `dwcp send --trace` across loopback and across each WAN
//! profile (metro, internet, poor, shifting) and writes the traces to `dwcp-pba/traces/`. `train`
//! fits the learned predictor on them and writes `dwcp-pba/src/learned.txt`. `bench pba` replays
//! every trace (recorded and synthetic) through every predictor and prints MAE and p95 of the
//! one-second-ahead goodput forecast, then the fleet simulation of `simulate` (1 to 1000 guests
//! leaving one host at once), then runs the Criterion benchmark for predictions per second.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use dwcp_pba::eval::{self, Scores};
use dwcp_pba::fleet::{FleetMigration, FleetSpec, time_quantile};
use dwcp_pba::trace::Trace;

use crate::Workspace;
use crate::process::{Io, Proc, describe, run};
use crate::wan::{self, LinkOpts, PrivateLink};

/// `cargo xtask pba …`.
#[derive(Debug, Subcommand)]
pub enum PbaCmd {
    /// Records link traces across loopback and the WAN bed into dwcp-pba/traces/ (needs root).
    Record {
        /// Only this trace (loopback, metro, internet, poor or shifting).
        #[arg(long)]
        only: Option<String>,
    },
    /// Fits the learned predictor on dwcp-pba/traces/ and writes dwcp-pba/src/learned.txt.
    Train,
    /// Every predictor's error on every trace (the table of `bench pba`, without Criterion).
    Eval,
    /// Simulates a host evacuating 1, 10, 100 and 1000 guests at once (`dwcp_pba::fleet`).
    Simulate {
        /// The host's uplink, Gbit/s.
        #[arg(long, default_value_t = 10.0)]
        uplink_gbit: f64,
        /// Round trip to the destinations, milliseconds.
        #[arg(long, default_value_t = 0.5)]
        rtt_ms: f64,
    },
}

/// What each recorded trace is: a link, and an image that keeps it busy for 20 to 40 s.
const RECORDINGS: [(&str, &str); 5] = [
    ("loopback", "6G"),
    ("metro", "4G"),
    ("internet", "4G"),
    ("poor", "400M"),
    ("shifting", "2G"),
];

fn traces_dir(ws: &Workspace) -> PathBuf {
    ws.root.join("dwcp-pba").join("traces")
}

/// `cargo xtask pba …`.
pub fn pba(ws: &Workspace, cmd: PbaCmd) -> Result<()> {
    match cmd {
        PbaCmd::Record { only } => record(ws, only.as_deref()),
        PbaCmd::Train => train(ws),
        PbaCmd::Eval => table(ws).map(|_| ()),
        PbaCmd::Simulate {
            uplink_gbit,
            rtt_ms,
        } => simulate(uplink_gbit, rtt_ms),
    }
}

/// A fleet of `n` guests like a busy host's: memory 1-16 GiB and dirty rates 1-64 MiB/s, both
/// log-uniform (half the guests under 4 GiB, half writing under 8 MiB/s). Deterministic.
fn fleet(n: usize) -> Vec<FleetMigration> {
    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
    let unit = |k: u64| (eval::noise(k) + 1.0) / 2.0;
    (0..n as u64)
        .map(|i| FleetMigration {
            memory_bytes: GIB * 16f64.powf(unit(2 * i)),
            dirty_bytes_per_sec: 1024.0 * 1024.0 * 64f64.powf(unit(2 * i + 1)),
            weight: 1.0,
            max_rate: f64::INFINITY,
            start_at: 0.0,
        })
        .collect()
}

/// `cargo xtask pba simulate`: 1, 10, 100 and 1000 guests leaving one host at once.
fn simulate(uplink_gbit: f64, rtt_ms: f64) -> Result<()> {
    let spec = FleetSpec {
        uplink: uplink_gbit * 1.25e8,
        rtt: rtt_ms * 1e-3,
        ..FleetSpec::default()
    };
    println!(
        "\nPBA fleet simulation: guests of 1-16 GiB dirtying 1-64 MiB/s, all due at once (run all, or at most 8, at a time), on a {uplink_gbit} Gbit/s uplink, RTT {rtt_ms} ms, downtime limit {} ms",
        spec.downtime_limit * 1e3
    );
    println!(
        "{:>6} {:>8} {:>10} {:>34} {:>7} {:>12} {:>22} {:>13} {:>9}",
        "guests",
        "at once",
        "makespan",
        "per migration min / p50 / p99 / max",
        "Jain",
        "converged",
        "downtime p50 / max",
        "buffers",
        "sim time"
    );
    for (n, max_running) in [
        (1usize, 0usize),
        (10, 0),
        (100, 0),
        (1000, 0),
        (100, 8),
        (1000, 8),
    ] {
        let guests = fleet(n);
        let spec = FleetSpec {
            max_running,
            ..spec
        };
        let t = std::time::Instant::now();
        let o = dwcp_pba::fleet::simulate(&spec, &guests)?;
        let took = t.elapsed();
        let mut downtimes: Vec<f64> = o.migrations.iter().map(|m| m.downtime).collect();
        downtimes.sort_by(f64::total_cmp);
        let q = |q: f64| time_quantile(&o, q);
        println!(
            "{:>6} {:>8} {:>9.1}s {:>34} {:>7.3} {:>12} {:>22} {:>9.0} MiB {:>7.1}ms",
            n,
            if max_running == 0 {
                "all".to_string()
            } else {
                max_running.to_string()
            },
            o.makespan,
            format!(
                "{:.1} / {:.1} / {:.1} / {:.1} s",
                q(0.0),
                q(0.5),
                q(0.99),
                q(1.0)
            ),
            o.jain_index,
            format!(
                "{} of {n}",
                o.migrations.iter().filter(|m| m.converged).count()
            ),
            format!(
                "{:.0} / {:.0} ms",
                downtimes[downtimes.len() / 2] * 1e3,
                downtimes[downtimes.len() - 1] * 1e3
            ),
            o.peak_buffer_bytes / (1024.0 * 1024.0),
            took.as_secs_f64() * 1e3,
        );
    }
    Ok(())
}

fn link_opts(profile: &str) -> LinkOpts {
    LinkOpts {
        profile: profile.into(),
        rate: None,
        rtt: None,
        jitter: None,
        loss: None,
        queue: None,
        reorder: false,
        rate_schedule: None,
    }
}

fn record(ws: &Workspace, only: Option<&str>) -> Result<()> {
    wan::require_root()?;
    wan::build(ws, &["dwcp-wanem", "dwcp-cli"])?;
    let dwcp = ws.target.join("release").join("dwcp");
    let work = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        ws.target.join("xtask")
    };
    let key = ws.target.join("xtask").join("pba-record.psk");
    std::fs::create_dir_all(ws.target.join("xtask"))?;
    run(
        Command::new(&dwcp)
            .args(["keygen", "--force", "--out"])
            .arg(&key),
        Io::Capture,
        wan::STEP_TIMEOUT,
    )?;
    std::fs::create_dir_all(traces_dir(ws))?;
    let mut recorded = 0;
    for (name, size) in RECORDINGS {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let img = work.join(format!("dwcp-pba-{size}.img"));
        let out = traces_dir(ws).join(format!("{name}.csv"));
        let mut mk = Command::new(&dwcp);
        mk.args(["mkimage", "--size", size, "--mix", "random", "--out"])
            .arg(&img);
        eprintln!("  $ {}", describe(&mk));
        run(&mut mk, Io::Capture, wan::STEP_TIMEOUT)?;
        let result = if name == "loopback" {
            migrate(&dwcp, &key, &img, &out, None, "127.0.0.1:7791")
        } else {
            let link = PrivateLink::up(ws, "pba", &link_opts(name))?;
            migrate(
                &dwcp,
                &key,
                &img,
                &out,
                Some(&link),
                &format!("{}:{}", wan::DST_ADDR, wan::DWCP_PORT),
            )
        };
        let _ = std::fs::remove_file(&img);
        let report = result.with_context(|| format!("recording the {name} trace"))?;
        let trace = Trace::parse(&std::fs::read_to_string(&out)?)
            .with_context(|| format!("reading back {}", out.display()))?;
        eprintln!(
            "  {name}: {} samplings over {:.1} s, {} streams, {:.0} Mbit/s mean; {report}",
            trace.samples().len(),
            trace.duration(),
            trace.streams(),
            trace.mean_goodput() * 8.0 / 1e6,
        );
        recorded += 1;
    }
    if recorded == 0 {
        bail!("--only {only:?}: no such trace (loopback, metro, internet, poor, shifting)");
    }
    Ok(())
}

/// One `dwcp recv` + `dwcp send --trace`, across `link` (inside its namespaces) or on loopback.
fn migrate(
    dwcp: &Path,
    key: &Path,
    img: &Path,
    trace: &Path,
    link: Option<&PrivateLink>,
    addr: &str,
) -> Result<String> {
    let in_ns = |ns: Option<&str>| {
        let mut c = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(dwcp);
                c
            }
            None => Command::new(dwcp),
        };
        c.env_remove("RUST_LOG");
        c
    };
    let mut recv = in_ns(link.map(|l| l.dst.as_str()));
    recv.args(["recv", "--listen", addr, "--out", "/dev/null", "--psk-file"])
        .arg(key)
        .arg("--json");
    let mut recv = Proc::spawn(&mut recv, Io::Capture)?;
    let port = addr.rsplit(':').next().unwrap_or_default().to_string();
    match link {
        Some(l) => wan::wait_until(&mut recv, "listening", || wan::listening_in(&l.dst, &port))?,
        None => wan::wait_until(&mut recv, "listening", || {
            std::net::TcpStream::connect_timeout(
                &addr.parse().expect("a loopback address"),
                Duration::from_millis(100),
            )
            .is_ok()
        })?,
    }
    let mut send = in_ns(link.map(|l| l.src.as_str()));
    send.args(["send", "--to", addr, "--image"])
        .arg(img)
        .arg("--psk-file")
        .arg(key)
        .args(["--json", "--no-progress", "--trace"])
        .arg(trace);
    eprintln!("  $ {}", describe(&send));
    let sent = run(&mut send, Io::Capture, wan::STEP_TIMEOUT)?;
    recv.wait_success(Duration::from_secs(60))?;
    let s = wan::json_of("dwcp send", &sent.stdout)?;
    if s["digest_match"] != serde_json::Value::Bool(true) {
        bail!("digests differ: {s}");
    }
    Ok(format!(
        "migration {:.1} s, {} streams, digest ok",
        s["total_ms"].as_f64().unwrap_or(f64::NAN) / 1e3,
        s["streams"]
    ))
}

/// The recorded traces, by name.
fn recorded(ws: &Workspace) -> Result<Vec<(String, Trace)>> {
    let mut out = Vec::new();
    let dir = traces_dir(ws);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "csv"))
        .collect();
    paths.sort();
    for p in paths {
        let name = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let t = Trace::parse(&std::fs::read_to_string(&p)?)
            .with_context(|| format!("parsing {}", p.display()))?;
        out.push((name, t));
    }
    if out.is_empty() {
        bail!(
            "no traces in {} (record them with `cargo xtask pba record`)",
            dir.display()
        );
    }
    Ok(out)
}

fn train(ws: &Workspace) -> Result<()> {
    let traces = recorded(ws)?;
    let series: Vec<_> = traces.iter().map(|(_, t)| t.series()).collect();
    let weights = eval::fit(&series).context("fitting the learned predictor")?;
    let path = ws.root.join("dwcp-pba").join("src").join("learned.txt");
    let names: Vec<&str> = traces.iter().map(|(n, _)| n.as_str()).collect();
    std::fs::write(&path, weights.to_text(&names.join(", ")))
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}: {weights:?}", path.display());
    Ok(())
}

/// `cargo xtask bench pba`.
pub fn bench(ws: &Workspace, quick: bool) -> Result<()> {
    table(ws)?;
    simulate(10.0, 0.5)?;
    crate::criterion(ws, "pba", quick)
}

/// Prints the error table; returns the median ratio of chosen to last value over recorded traces.
fn table(ws: &Workspace) -> Result<f64> {
    let mut rows: Vec<(String, bool, Scores)> = Vec::new();
    let traces = recorded(ws)?;
    let series: Vec<_> = traces.iter().map(|(_, t)| t.series()).collect();
    for (k, (name, _)) in traces.iter().enumerate() {
        // The learned predictor as shipped, and fitted without this trace (an out-of-sample figure).
        let others: Vec<_> = series
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != k)
            .map(|(_, s)| s.clone())
            .collect();
        let held_out = eval::fit(&others).ok();
        rows.push((
            name.clone(),
            true,
            eval::score(&series[k], held_out.as_ref()),
        ));
    }
    for (name, s) in eval::synthetic() {
        rows.push((name.to_string(), false, eval::score(&s, None)));
    }
    println!(
        "\nPBA: error of the 1-s-ahead goodput forecast (MAE / p95, Mbit/s), every predictor against last value"
    );
    print!("{:<26} {:>6}", "trace", "points");
    for p in eval::COLUMNS {
        print!(" {:>16}", p);
    }
    println!(" {:>12}", "chosen/last");
    let mut ratios = Vec::new();
    for (name, real, s) in &rows {
        print!("{:<26} {:>6}", name, s.points);
        for c in &s.columns {
            print!(
                " {:>16}",
                format!("{:.1} / {:.1}", c.mae * 8e-6, c.p95 * 8e-6)
            );
        }
        let ratio = s.chosen_over_last();
        println!(" {:>12.3}", ratio);
        if *real {
            ratios.push(ratio);
        }
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN);
    let median = if ratios.len() % 2 == 0 && ratios.len() >= 2 {
        (ratios[ratios.len() / 2 - 1] + ratios[ratios.len() / 2]) / 2.0
    } else {
        median
    };
    println!(
        "median over the {} recorded traces: chosen (learned part held out) MAE = {median:.3} x last value's (target <= 0.70)",
        ratios.len()
    );
    Ok(median)
}

/// `cargo xtask bench fleet`: 1, 10 and 100 real migrations at once on loopback (`dwcp demo --vms N
/// --destination-process`: each side's memory on its own), 100 eight at a time (`--max-running 8`),
/// 10 under a shared uplink cap, then the fleet simulation of 1 to 1000.
pub fn bench_fleet(ws: &Workspace, quick: bool) -> Result<()> {
    wan::build(ws, &["dwcp-cli"])?;
    let dwcp = ws.target.join("release").join("dwcp");
    // (guests, uplink cap, at most this many at once)
    let runs: &[(u32, Option<&str>, Option<u32>)] = if quick {
        &[(1, None, None), (10, None, None), (10, Some("200M"), None)]
    } else {
        &[
            (1, None, None),
            (10, None, None),
            (100, None, None),
            (100, None, Some(8)),
            (10, Some("200M"), None),
        ]
    };
    println!(
        "\nfleet: 16 MiB random guests dirtying 1 MiB/s over loopback, destination in a second process"
    );
    println!(
        "{:>4} {:>7} {:>10} {:>9} {:>30} {:>7} {:>13} {:>14} {:>14}",
        "vms",
        "at once",
        "uplink",
        "wall",
        "per migration min / p50 / max",
        "Jain",
        "max downtime",
        "sender engine",
        "dest engine"
    );
    for &(vms, uplink, max_running) in runs {
        let mut cmd = Command::new(&dwcp);
        cmd.args([
            "demo",
            "--vms",
            &vms.to_string(),
            "--size",
            "16M",
            "--mix",
            "random",
        ]);
        cmd.args([
            "--dirty-rate",
            "1",
            "--destination-process",
            "--json",
            "--no-progress",
        ]);
        if let Some(u) = uplink {
            cmd.args(["--uplink", u]);
        }
        if let Some(k) = max_running {
            cmd.args(["--max-running", &k.to_string()]);
        }
        eprintln!("  $ {}", describe(&cmd));
        let out = run(&mut cmd, Io::Capture, Duration::from_secs(600))?;
        let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
            .with_context(|| format!("the report of {}", describe(&cmd)))?;
        let f = |p: &str| v.pointer(p).and_then(|x| x.as_f64()).unwrap_or(f64::NAN);
        let mib = |p: &str| f(p) / (1024.0 * 1024.0);
        println!(
            "{:>4} {:>7} {:>10} {:>8.2}s {:>30} {:>7.3} {:>10.1} ms {:>10.0} MiB {:>10.0} MiB",
            vms,
            max_running.map_or("all".to_string(), |k| k.to_string()),
            uplink.unwrap_or("none"),
            f("/wall_ms") / 1e3,
            format!(
                "{:.2} / {:.2} / {:.2} s",
                f("/time_s/min"),
                f("/time_s/p50"),
                f("/time_s/max")
            ),
            f("/jain_index"),
            f("/max_downtime_ms"),
            mib("/engine_rss_bytes"),
            mib("/destination_process/engine_rss_bytes"),
        );
    }
    simulate(10.0, 0.5)
}
