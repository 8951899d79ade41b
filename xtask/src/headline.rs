//! The headline figures of `cargo xtask bench e2e`, measured in one run and set against their targets:
//!
//! 1. iperf3 over loopback, one stream: the reference of what one TCP stream moves here;
//! 2. `dwcp demo` (a simulated guest migrated over loopback by the release binary): logical throughput of
//!    an idle guest and of incompressible memory, and a run with the guest dirtying 100 MiB/s;
//! 3. `dwcp send` of a memory-mapped image file: the sender's peak anonymous RSS.
//!
//! Each dwcp figure is the median of several runs (min and max shown too). The table goes to stdout and,
//! as JSON, to `target/xtask/bench-e2e.json`.
//!
//! Kept whole (about 800 lines): every headline figure, its measurement and its target stand
//! together, so the verdict table reads top to bottom.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::process::{Io, Proc, describe, free_port, run, tail, wait_listening};
use crate::{Workspace, plot};

/// Limit of one measured command.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a server may take to start listening.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a one-shot server may take to exit once its client is done.
const SERVER_EXIT_TIMEOUT: Duration = Duration::from_secs(30);

const GB: f64 = 1e9;
const MIB: f64 = (1u64 << 20) as f64;

/// Targets.
const IDLE_TARGET_BPS: f64 = 2.5 * GB;
const RANDOM_TARGET_OF_IPERF: f64 = 0.8;
const RSS_TARGET_BYTES: f64 = 256.0 * MIB;
const DOWNTIME_TARGET_MS: f64 = 50.0;
const DIRTY_RATE_MIB_S: u64 = 100;

#[derive(Debug, Clone, Copy)]
struct Plan {
    demo_size: &'static str,
    image_size: &'static str,
    reps: usize,
}

/// Fails, saying how to install it, unless iperf3 can be run.
pub fn require_iperf3() -> Result<()> {
    match Proc::spawn(Command::new("iperf3").arg("--version"), Io::Capture) {
        Ok(mut p) => {
            p.wait(Duration::from_secs(30))?;
            Ok(())
        }
        Err(e) if is_not_found(&e) => {
            bail!(
                "iperf3 is not installed; the e2e headline compares against it. Install it with\n    \
                 apt-get install -y iperf3\n(Debian/Ubuntu; run `apt-get update` first on a fresh machine) and run again"
            )
        }
        Err(e) => Err(e),
    }
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

#[derive(Debug, Clone)]
struct Stats {
    samples: Vec<f64>,
}

/// The middle value of `v` (the upper of the two middle ones for an even count, so that it is always
/// a measured value); `None` for no values.
pub(crate) fn upper_median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

impl Stats {
    fn new(samples: Vec<f64>) -> Self {
        Self { samples }
    }

    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        s
    }

    fn median(&self) -> f64 {
        let s = self.sorted();
        match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        }
    }

    fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }

    /// `median [min..max]` in the given unit, the range only when there are several samples.
    fn show(&self, unit: &str, scale: f64, decimals: usize) -> String {
        let f = |x: f64| format!("{:.*}", decimals, x / scale);
        if self.samples.len() > 1 {
            format!(
                "{} {unit} [{}..{}]",
                f(self.median()),
                f(self.min()),
                f(self.max())
            )
        } else {
            format!("{} {unit}", f(self.median()))
        }
    }

    fn json(&self, unit: &str) -> Value {
        json!({ "unit": unit, "median": self.median(), "min": self.min(), "max": self.max(), "samples": self.samples })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Fail,
    Info,
    Error,
}

impl Verdict {
    fn of(ok: bool) -> Self {
        if ok { Self::Pass } else { Self::Fail }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Info => "info",
            Self::Error => "ERROR",
        }
    }
}

#[derive(Debug)]
struct Row {
    metric: String,
    measured: String,
    target: String,
    verdict: Verdict,
    data: Value,
}

impl Row {
    fn error(metric: String, target: String, e: &anyhow::Error) -> Self {
        let first = format!("{e:#}")
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        Self {
            metric,
            measured: format!("error: {first}"),
            target,
            verdict: Verdict::Error,
            data: json!({ "error": format!("{e:#}") }),
        }
    }
}

/// Measures everything, prints the table and writes the JSON. Returns whether every target was met; fails
/// (after printing what it has) if a measurement could not be made.
pub fn measure(ws: &Workspace, quick: bool) -> Result<bool> {
    let plan = if quick {
        Plan {
            demo_size: "256M",
            image_size: "1G",
            reps: 1,
        }
    } else {
        Plan {
            demo_size: "1G",
            image_size: "4G",
            reps: 3,
        }
    };
    require_iperf3()?;
    let mut build = ws.cargo();
    build.args(["build", "--release", "-p", "dwcp-cli"]);
    eprintln!("\n==> {}", describe(&build));
    run(&mut build, Io::Inherit, crate::CARGO_TIMEOUT)?;
    let bin = ws
        .target
        .join("release")
        .join(if cfg!(windows) { "dwcp.exe" } else { "dwcp" });
    if !bin.is_file() {
        bail!("{} was not built", bin.display());
    }

    eprintln!(
        "\n==> headline measurements ({} demo, {} image, {} run(s) each)",
        plan.demo_size, plan.image_size, plan.reps
    );
    let mut rows = Vec::new();
    // With --plot: figures of the last run of each demo.
    let plots = if plot::requested() {
        Some(plot::dir(ws)?)
    } else {
        None
    };
    let plots = plots.as_deref();

    let iperf = iperf3();
    rows.push(match &iperf {
        Ok(bps) => Row {
            metric: "iperf3 loopback, 1 stream, 5 s".into(),
            measured: format!("{:.2} GB/s", bps / GB),
            target: "(reference)".into(),
            verdict: Verdict::Info,
            data: json!({ "bytes_per_sec": bps }),
        },
        Err(e) => Row::error(
            "iperf3 loopback, 1 stream, 5 s".into(),
            "(reference)".into(),
            e,
        ),
    });

    let metric = format!("dwcp demo idle {}, logical throughput", plan.demo_size);
    let target = format!(">= {:.2} GB/s", IDLE_TARGET_BPS / GB);
    rows.push(match demo_throughput(&bin, plan, "idle", plots) {
        Ok((stats, runs)) => Row {
            metric,
            measured: stats.show("GB/s", GB, 2),
            target,
            verdict: Verdict::of(stats.median() >= IDLE_TARGET_BPS),
            data: json!({ "throughput": stats.json("bytes_per_sec"), "runs": runs }),
        },
        Err(e) => Row::error(metric, target, &e),
    });

    let metric = format!("dwcp demo random {}, logical throughput", plan.demo_size);
    let target = format!(">= {RANDOM_TARGET_OF_IPERF:.2} x iperf3");
    rows.push(match demo_throughput(&bin, plan, "random", plots) {
        Ok((stats, runs)) => match &iperf {
            Ok(reference) => {
                let ratio = stats.median() / reference;
                Row {
                    metric,
                    measured: format!("{} = {ratio:.2} x iperf3", stats.show("GB/s", GB, 2)),
                    target: format!("{target} ({:.2} GB/s)", RANDOM_TARGET_OF_IPERF * reference / GB),
                    verdict: Verdict::of(ratio >= RANDOM_TARGET_OF_IPERF),
                    data: json!({ "throughput": stats.json("bytes_per_sec"), "ratio_to_iperf3": ratio, "runs": runs }),
                }
            }
            Err(_) => Row {
                metric,
                measured: format!("{} (no iperf3 figure to compare)", stats.show("GB/s", GB, 2)),
                target,
                verdict: Verdict::Error,
                data: json!({ "throughput": stats.json("bytes_per_sec"), "ratio_to_iperf3": null, "runs": runs }),
            },
        },
        Err(e) => Row::error(metric, target, &e),
    });

    // Not a target: the same transfer when the destination's RAM is faulted in during the migration,
    // which on this machine costs about 1.2 s per GiB of first touches whatever the transport.
    let metric = format!(
        "dwcp demo random {}, lazily faulted destination",
        plan.demo_size
    );
    rows.push(
        match demo_throughput_with(&bin, plan, "random", &["--lazy-destination"], None) {
            Ok((stats, runs)) => Row {
                metric,
                measured: match &iperf {
                    Ok(reference) => format!(
                        "{} = {:.2} x iperf3",
                        stats.show("GB/s", GB, 2),
                        stats.median() / reference
                    ),
                    Err(_) => stats.show("GB/s", GB, 2),
                },
                target: "(information)".into(),
                verdict: Verdict::Info,
                data: json!({ "throughput": stats.json("bytes_per_sec"), "runs": runs }),
            },
            Err(e) => Row::error(metric, "(information)".into(), &e),
        },
    );

    let metric = format!(
        "dwcp demo {}, guest dirtying {DIRTY_RATE_MIB_S} MiB/s",
        plan.demo_size
    );
    let target = format!("converged, digest ok, <= {DOWNTIME_TARGET_MS:.0} ms");
    rows.push(match demo_dirty(&bin, plan, plots) {
        Ok(row) => Row {
            metric,
            target,
            ..row
        },
        Err(e) => Row::error(metric, target, &e),
    });

    let metric = format!(
        "dwcp send {} mapped image, sender peak anon RSS",
        plan.image_size
    );
    let target = format!("<= {:.0} MiB", RSS_TARGET_BYTES / MIB);
    rows.push(match image_rss(ws, &bin, plan) {
        Ok((stats, runs)) => Row {
            metric,
            measured: stats.show("MiB", MIB, 1),
            target,
            verdict: Verdict::of(stats.median() <= RSS_TARGET_BYTES),
            data: json!({ "peak_rss_anon_bytes": stats.json("bytes"), "runs": runs }),
        },
        Err(e) => Row::error(metric, target, &e),
    });

    let errors = rows.iter().filter(|r| r.verdict == Verdict::Error).count();
    let targeted = rows
        .iter()
        .filter(|r| r.verdict != Verdict::Info && r.target != "(reference)")
        .count();
    let met = rows.iter().filter(|r| r.verdict == Verdict::Pass).count();
    let all_met = errors == 0 && met == targeted;

    print_table(&rows, plan);
    println!("targets met: {met}/{targeted}");

    let path = ws.target.join("xtask").join("bench-e2e.json");
    let report = json!({
        "generated_unix_s": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "quick": quick,
        "repetitions": plan.reps,
        "demo_size": plan.demo_size,
        "image_size": plan.image_size,
        "statistic": "median",
        "rows": rows.iter().map(|r| json!({
            "metric": r.metric,
            "measured": r.measured,
            "target": r.target,
            "verdict": r.verdict.name().to_lowercase(),
            "data": r.data,
        })).collect::<Vec<_>>(),
        "all_targets_met": all_met,
    });
    std::fs::create_dir_all(path.parent().expect("a parent directory")).with_context(|| {
        format!(
            "creating {}",
            path.parent()
                .map(Path::display)
                .map(|d| d.to_string())
                .unwrap_or_default()
        )
    })?;
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("written to {}", path.display());

    if errors > 0 {
        bail!("{errors} headline measurement(s) failed (see the table above)");
    }
    Ok(all_met)
}

fn print_table(rows: &[Row], plan: Plan) {
    let headers = ["metric", "measured", "target", "verdict"];
    let cells: Vec<[&str; 4]> = rows
        .iter()
        .map(|r| {
            [
                r.metric.as_str(),
                r.measured.as_str(),
                r.target.as_str(),
                r.verdict.name(),
            ]
        })
        .collect();
    let mut width = headers.map(str::len);
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let line = |c: [&str; 4]| {
        let mut s = String::new();
        for (i, (cell, w)) in c.iter().zip(width).enumerate() {
            if i > 0 {
                s.push_str(" | ");
            }
            s.push_str(&format!("{cell:<w$}"));
        }
        s.trim_end().to_string()
    };
    println!();
    println!(
        "DWCP headline, loopback ({} demo, {} image; median{} of {} run(s))",
        plan.demo_size,
        plan.image_size,
        if plan.reps > 1 { " [min..max]" } else { "" },
        plan.reps
    );
    println!("{}", line(headers));
    println!("{}", width.map(|w| "-".repeat(w)).join("-+-"));
    for c in cells {
        println!("{}", line(c));
    }
    println!();
}

/// iperf3 over loopback, one stream for 5 s: bytes per second received.
fn iperf3() -> Result<f64> {
    iperf3_parallel(1)
}

/// Loopback goodput of `iperf3 -P streams` over 5 s, bytes per second.
pub(crate) fn iperf3_parallel(streams: u32) -> Result<f64> {
    let port = free_port()?.to_string();
    let mut server = Proc::spawn(
        Command::new("iperf3").args(["-s", "-1", "-p", &port]),
        Io::Capture,
    )?;
    eprintln!("  $ {}", server.label());
    wait_listening(&mut server, port.parse()?, LISTEN_TIMEOUT)?;
    let mut client = Command::new("iperf3");
    let parallel = streams.to_string();
    client.args([
        "-c",
        "127.0.0.1",
        "-p",
        &port,
        "-t",
        "5",
        "-P",
        &parallel,
        "-J",
    ]);
    eprintln!("  $ {}", describe(&client));
    let out = Proc::spawn(&mut client, Io::Capture)?.wait(RUN_TIMEOUT)?;
    let report = parse_json("iperf3 -c", &out.stdout);
    if let Ok(msg) = report
        .as_ref()
        .map(|r| r["error"].as_str().unwrap_or_default())
    {
        if !msg.is_empty() {
            bail!("iperf3 client: {msg}");
        }
    }
    if !out.status.success() {
        bail!(
            "iperf3 client failed ({}){}{}",
            out.status,
            tail("stdout", &out.stdout),
            tail("stderr", &out.stderr)
        );
    }
    let bits = report?["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("iperf3 JSON has no end.sum_received.bits_per_second"))?;
    if server.wait(SERVER_EXIT_TIMEOUT).is_err() {
        eprintln!("  (the iperf3 server did not exit by itself; killed)");
    }
    Ok(bits / 8.0)
}

/// Runs `dwcp ARGS` and returns the JSON object it printed.
pub(crate) fn dwcp(bin: &Path, args: &[&str]) -> Result<Value> {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    eprintln!("  $ {}", describe(&cmd));
    let out = run(&mut cmd, Io::Capture, RUN_TIMEOUT)?;
    parse_json(&describe(&cmd), &out.stdout)
}

pub(crate) fn demo_with(
    bin: &Path,
    size: &str,
    mix: Option<&str>,
    dirty_rate: u64,
    extra: &[&str],
) -> Result<Value> {
    let rate = dirty_rate.to_string();
    let mut args = vec!["demo", "--size", size, "--dirty-rate", &rate];
    if let Some(mix) = mix {
        args.extend(["--mix", mix]);
    }
    args.extend(extra);
    args.extend(["--json", "--no-progress"]);
    dwcp(bin, &args)
}

/// A demo run, and with `plots` (`--plot`: where the figures go) its event log and figures named
/// `e2e-<name>`.
fn demo_plotted(
    bin: &Path,
    plan: Plan,
    mix: Option<&str>,
    dirty_rate: u64,
    extra: &[&str],
    plots: Option<(&Path, &str)>,
) -> Result<Value> {
    let Some((dir, name)) = plots else {
        return demo_with(bin, plan.demo_size, mix, dirty_rate, extra);
    };
    let name = format!("e2e-{name}");
    let events = plot::events_path(dir, &name);
    let events_s = events.to_string_lossy().into_owned();
    let mut args = extra.to_vec();
    args.extend(["--events", &events_s]);
    let r = demo_with(bin, plan.demo_size, mix, dirty_rate, &args)?;
    let what = format!(
        "dwcp demo {} {}, dirtying {dirty_rate} MiB/s",
        mix.unwrap_or("default mix"),
        plan.demo_size
    );
    plot::run_figures_or_warn(dir, &name, &what, &r, Some(&events));
    Ok(r)
}

/// Logical throughput (memory size / total time) of `plan.reps` demo runs without dirtying; with
/// `plots`, the figures of the last run.
fn demo_throughput(
    bin: &Path,
    plan: Plan,
    mix: &str,
    plots: Option<&Path>,
) -> Result<(Stats, Vec<Value>)> {
    demo_throughput_with(bin, plan, mix, &[], plots)
}

fn demo_throughput_with(
    bin: &Path,
    plan: Plan,
    mix: &str,
    extra: &[&str],
    plots: Option<&Path>,
) -> Result<(Stats, Vec<Value>)> {
    let mut samples = Vec::new();
    let mut runs = Vec::new();
    for rep in 0..plan.reps {
        let plot = plots.filter(|_| rep + 1 == plan.reps).map(|d| (d, mix));
        let r = demo_plotted(bin, plan, Some(mix), 0, extra, plot)?;
        if !flag(&r, "digest_match")? {
            bail!("dwcp demo --mix {mix}: digests differ");
        }
        let memory = num(&r, "memory_bytes")?;
        let total_ms = num(&r, "total_ms")?;
        let bps = memory / (total_ms / 1e3);
        samples.push(bps);
        runs.push(json!({
            "memory_bytes": raw(&r, "memory_bytes"),
            "total_ms": total_ms,
            "throughput_bps": bps,
            "reported_logical_throughput_bps": raw(&r, "logical_throughput_bps"),
            "logical_bytes": raw(&r, "logical_bytes"),
            "wire_bytes": raw(&r, "wire_bytes"),
            "iterations": raw(&r, "iterations"),
        }));
    }
    Ok((Stats::new(samples), runs))
}

/// `plan.reps` demo runs with the guest dirtying memory: convergence, digest and downtime; with
/// `plots`, the figures of the last run.
fn demo_dirty(bin: &Path, plan: Plan, plots: Option<&Path>) -> Result<Row> {
    let (mut converged, mut matched) = (0, 0);
    let mut downtime = Vec::new();
    let mut runs = Vec::new();
    for rep in 0..plan.reps {
        let plot = plots.filter(|_| rep + 1 == plan.reps).map(|d| (d, "dirty"));
        let r = demo_plotted(bin, plan, None, DIRTY_RATE_MIB_S, &[], plot)?;
        let c = flag(&r, "converged")?;
        let d = flag(&r, "digest_match")?;
        let ms = num(&r, "downtime_ms")?;
        converged += usize::from(c);
        matched += usize::from(d);
        downtime.push(ms);
        runs.push(json!({
            "converged": c,
            "digest_match": d,
            "downtime_ms": ms,
            "total_ms": raw(&r, "total_ms"),
            "iterations": raw(&r, "iterations"),
            "logical_bytes": raw(&r, "logical_bytes"),
            "wire_bytes": raw(&r, "wire_bytes"),
        }));
    }
    let n = plan.reps;
    let stats = Stats::new(downtime);
    let ok = converged == n && matched == n && stats.median() <= DOWNTIME_TARGET_MS;
    Ok(Row {
        metric: String::new(),
        measured: format!(
            "converged {converged}/{n}, digest ok {matched}/{n}, downtime {}",
            stats.show("ms", 1.0, 1)
        ),
        target: String::new(),
        verdict: Verdict::of(ok),
        data: json!({
            "dirty_rate_mib_s": DIRTY_RATE_MIB_S,
            "converged_runs": converged,
            "digest_match_runs": matched,
            "downtime_ms": stats.json("ms"),
            "runs": runs,
        }),
    })
}

/// A directory removed (with its contents) when dropped.
#[derive(Debug)]
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(base: &Path, prefix: &str) -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = base.join(format!("{prefix}-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

/// Removes `<base>/<prefix>-<pid>-*` directories left behind by xtask runs that were killed (their
/// process no longer exists).
pub(crate) fn remove_stale(base: &Path, prefix: &str) {
    let Ok(dir) = std::fs::read_dir(base) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&format!("{prefix}-"))
            .and_then(|r| r.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok()
            && !Path::new("/proc").join(pid).exists()
            && Path::new("/proc/self").exists()
        {
            eprintln!(
                "  removing {} (left by an earlier run)",
                entry.path().display()
            );
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("xtask: could not remove {}: {e}", self.0.display());
        }
    }
}

/// Sends a memory-mapped image file to a `dwcp recv` on loopback `plan.reps` times; the sender's peak
/// anonymous RSS of each run.
fn image_rss(ws: &Workspace, bin: &Path, plan: Plan) -> Result<(Stats, Vec<Value>)> {
    // Under the target directory rather than /tmp, which may be a RAM-backed tmpfs.
    let base = ws.target.join("xtask");
    remove_stale(&base, "rss");
    let tmp = TempDir::new(&base, "rss")?;
    let img = tmp.0.join("img");
    let key = tmp.0.join("key");
    let out = tmp.0.join("out");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let (img_s, key_s, out_s) = (s(&img), s(&key), s(&out));
    run_plain(
        bin,
        &[
            "mkimage",
            "--size",
            plan.image_size,
            "--mix",
            "idle",
            "--out",
            &img_s,
        ],
    )?;
    run_plain(bin, &["keygen", "--out", &key_s])?;
    let mut samples = Vec::new();
    let mut runs = Vec::new();
    for _ in 0..plan.reps {
        let _ = std::fs::remove_file(&out);
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let mut recv_cmd = Command::new(bin);
        recv_cmd.args([
            "recv",
            "--listen",
            &listen,
            "--out",
            &out_s,
            "--psk-file",
            &key_s,
            "--json",
        ]);
        eprintln!("  $ {} &", describe(&recv_cmd));
        let mut recv = Proc::spawn(&mut recv_cmd, Io::Capture)?;
        wait_listening(&mut recv, port, LISTEN_TIMEOUT)?;
        let sent = dwcp(
            bin,
            &[
                "send",
                "--to",
                &listen,
                "--image",
                &img_s,
                "--psk-file",
                &key_s,
                "--json",
                "--no-progress",
            ],
        )?;
        let received = match recv.wait(SERVER_EXIT_TIMEOUT) {
            Ok(f) if f.status.success() => parse_json("dwcp recv", &f.stdout).ok(),
            Ok(f) => bail!(
                "`{}` failed ({}){}",
                recv.label(),
                f.status,
                tail("stderr", &f.stderr)
            ),
            Err(_) => {
                eprintln!("  (dwcp recv did not exit after the migration; killed)");
                None
            }
        };
        if !flag(&sent, "digest_match")? {
            bail!("dwcp send: digests differ");
        }
        let rss = num(&sent, "peak_rss_anon_bytes")?;
        samples.push(rss);
        runs.push(json!({
            "peak_rss_anon_bytes": rss,
            "memory_bytes": raw(&sent, "memory_bytes"),
            "total_ms": raw(&sent, "total_ms"),
            "logical_throughput_bps": raw(&sent, "logical_throughput_bps"),
            "receiver_digest_match": received.as_ref().and_then(|r| find(r, "digest_match")).cloned(),
        }));
    }
    Ok((Stats::new(samples), runs))
}

/// Runs `dwcp ARGS` for its effect only.
pub(crate) fn run_plain(bin: &Path, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    eprintln!("  $ {}", describe(&cmd));
    run(&mut cmd, Io::Capture, RUN_TIMEOUT)?;
    Ok(())
}

/// The JSON object a command printed on stdout (the whole output, or else its last JSON line).
pub(crate) fn parse_json(what: &str, stdout: &str) -> Result<Value> {
    let text = stdout.trim();
    if let Ok(v @ Value::Object(_)) = serde_json::from_str(text) {
        return Ok(v);
    }
    for line in text
        .lines()
        .rev()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
    {
        if let Ok(v @ Value::Object(_)) = serde_json::from_str(line) {
            return Ok(v);
        }
    }
    if let (Some(a), Some(b)) = (text.find('{'), text.rfind('}')) {
        if let Ok(v @ Value::Object(_)) = serde_json::from_str(&text[a..=b]) {
            return Ok(v);
        }
    }
    bail!(
        "`{what}` printed no JSON object on stdout{}",
        tail("stdout", stdout)
    )
}

/// `key` in a report: at the top level, else under a source-side member, else anywhere (breadth first).
fn find<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    if let Some(x) = v.get(key) {
        return Some(x);
    }
    for side in ["source", "sender", "migration", "report", "send"] {
        if let Some(x) = v.get(side).and_then(|s| s.get(key)) {
            return Some(x);
        }
    }
    let mut queue: VecDeque<&Value> = v.as_object().into_iter().flat_map(|m| m.values()).collect();
    while let Some(x) = queue.pop_front() {
        if let Some(obj) = x.as_object() {
            if let Some(y) = obj.get(key) {
                return Some(y);
            }
            queue.extend(obj.values());
        }
    }
    None
}

pub(crate) fn num(v: &Value, key: &str) -> Result<f64> {
    find(v, key)
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("the JSON report has no number `{key}`"))
}

/// `key` as the report has it (null when absent), for the JSON file.
fn raw(v: &Value, key: &str) -> Value {
    find(v, key).cloned().unwrap_or(Value::Null)
}

pub(crate) fn flag(v: &Value, key: &str) -> Result<bool> {
    find(v, key)
        .and_then(Value::as_bool)
        .ok_or_else(|| anyhow!("the JSON report has no boolean `{key}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upper_median_is_always_a_measured_value() {
        assert_eq!(upper_median(&[]), None);
        assert_eq!(upper_median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(upper_median(&[4.0, 1.0, 3.0, 2.0]), Some(3.0));
    }

    #[test]
    fn median_min_max() {
        let s = Stats::new(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median(), s.min(), s.max()), (2.0, 1.0, 3.0));
        assert_eq!(Stats::new(vec![1.0, 4.0]).median(), 2.5);
        assert_eq!(s.show("x", 1.0, 1), "2.0 x [1.0..3.0]");
        assert_eq!(Stats::new(vec![5.0]).show("x", 1.0, 0), "5 x");
    }

    #[test]
    fn json_is_found_in_noisy_output_and_nested_reports() {
        let v = parse_json(
            "t",
            "log line\n{\"source\":{\"total_ms\":2.5},\"destination\":{\"total_ms\":9}}\n",
        )
        .unwrap();
        assert_eq!(num(&v, "total_ms").unwrap(), 2.5);
        let v = parse_json("t", "{\n \"a\": {\"b\": {\"digest_match\": true}}\n}").unwrap();
        assert!(flag(&v, "digest_match").unwrap());
        assert!(parse_json("t", "nothing").is_err());
        assert!(num(&v, "missing").is_err());
    }

    #[test]
    fn a_missing_program_is_recognised() {
        let e =
            Proc::spawn(&mut Command::new("dwcp-xtask-no-such-program"), Io::Capture).unwrap_err();
        assert!(is_not_found(&e), "{e:#}");
    }

    #[test]
    #[ignore = "takes 5 s and needs iperf3"]
    fn iperf3_measures_loopback() {
        let bps = iperf3().unwrap();
        assert!(bps > 1e8, "{bps}");
        eprintln!("iperf3 loopback: {:.2} GB/s", bps / GB);
    }
}
