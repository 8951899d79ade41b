//! The WAN test bed (`dwcp-wanem`): `cargo xtask wan up|down|check` and `cargo xtask bench wan`.
//!
//! - `wan up` starts the forwarder in the background (namespaces `dwcp-src`/`dwcp-dst`, 10.77.0.1 and
//!   10.77.0.2) and records it in `target/xtask/wan/state.json`; `wan down` stops it and removes the
//!   namespaces, the processes left in them and the state.
//! - `wan check` validates the emulator on private links (names with this process's id): RTT within
//!   10%, forward loss within 20% of the configured rate, and iperf3 at ≥ 90% of the rate with loss
//!   turned off.
//! - `bench wan` measures, across one private link: iperf3 single-stream CUBIC, single-stream BBR and
//!   `-P 8`, then `dwcp send`/`recv` of a random and an idle-guest image; it prints goodput, logical
//!   throughput and migration time (with the adaptive codec's choices) and writes
//!   `target/xtask/bench-wan.json` and a copy named after the time of the run.
//!
//! Traffic only ever goes to 10.77.0.2 inside namespaces this xtask created. Every child runs under a
//! time limit, and a private link is torn down on every exit path (its forwarder also stops by itself
//! when this process dies, because its stdin pipe closes).
//!
//! Kept whole (about 1,050 lines): the test bed's commands and its benchmark share the namespace
//! and process bookkeeping; a split is due when the benchmark grows again.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::process::{Io, Proc, alive, describe, run, tail};
use crate::{Workspace, plot};

const SRC_NS: &str = "dwcp-src";
const DST_NS: &str = "dwcp-dst";
pub(crate) const DST_ADDR: &str = "10.77.0.2";
const PROBE_PORT: &str = "9100";
const IPERF_PORT: &str = "5201";
pub(crate) const DWCP_PORT: &str = "7700";
/// Limit of any single measurement process.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(240);

/// `cargo xtask wan …`.
#[derive(Debug, Subcommand)]
pub enum WanCmd {
    /// Brings the link up in the background (namespaces dwcp-src and dwcp-dst).
    Up(LinkOpts),
    /// Stops the forwarder and deletes the namespaces (and anything still running in them).
    Down,
    /// Validates the emulator (RTT, loss, rate) on private links; fails when a check fails.
    Check {
        #[command(flatten)]
        link: LinkOpts,
        /// Check metro, internet and poor in turn (ignores --profile).
        #[arg(long)]
        all: bool,
    },
}

/// Which link: a profile, with optional overrides (passed to `dwcp-wanem up`).
#[derive(Debug, Clone, Args)]
pub struct LinkOpts {
    /// lan, metro, internet, poor or shifting.
    #[arg(long, default_value = "internet")]
    pub profile: String,
    /// Rate per direction (1gbit, 300mbit, …).
    #[arg(long)]
    pub rate: Option<String>,
    /// Round-trip time (50ms).
    #[arg(long)]
    pub rtt: Option<String>,
    /// Jitter per direction (uniform ±).
    #[arg(long)]
    pub jitter: Option<String>,
    /// Loss per direction (0.1%, 1%/burst=4, ge:p=..,r=..).
    #[arg(long)]
    pub loss: Option<String>,
    /// Queue limit per direction (auto, 6MB, 60ms).
    #[arg(long)]
    pub queue: Option<String>,
    /// Let jitter reorder packets.
    #[arg(long)]
    pub reorder: bool,
    /// Rate changes after the link comes up (5s:300mbit,12s:1gbit).
    #[arg(long)]
    pub rate_schedule: Option<String>,
}

impl LinkOpts {
    fn args(&self) -> Vec<String> {
        let mut a = vec!["--profile".to_string(), self.profile.clone()];
        for (flag, v) in [
            ("--rate", &self.rate),
            ("--rtt", &self.rtt),
            ("--jitter", &self.jitter),
            ("--loss", &self.loss),
            ("--queue", &self.queue),
            ("--rate-schedule", &self.rate_schedule),
        ] {
            if let Some(v) = v {
                a.push(flag.into());
                a.push(v.clone());
            }
        }
        if self.reorder {
            a.push("--reorder".into());
        }
        a
    }

    pub(crate) fn with_profile(&self, profile: &str) -> Self {
        Self {
            profile: profile.into(),
            ..self.clone()
        }
    }

    fn without_loss(&self) -> Self {
        Self {
            loss: Some("0".into()),
            ..self.clone()
        }
    }
}

/// Options of `cargo xtask bench wan`.
#[derive(Debug, Clone, Args)]
pub struct BenchWanOpts {
    #[command(flatten)]
    pub link: LinkOpts,
    /// Image size for the dwcp runs.
    #[arg(long, default_value = "1G")]
    pub image_size: String,
    /// Seconds of each iperf3 run.
    #[arg(long, default_value_t = 10)]
    pub iperf_secs: u32,
    /// dwcp streams (the library's default when absent).
    #[arg(long)]
    pub streams: Option<u32>,
    /// Also send every image in plain text (`--insecure-plaintext` on both ends), alternating
    /// with the encrypted run, and print the TLS / plain ratios.
    #[arg(long)]
    pub plaintext_too: bool,
}

/// A fresh pre-shared key from `dwcp keygen` at `key` (overwriting an old one).
pub(crate) fn keygen(dwcp: &Path, key: &Path) -> Result<()> {
    run(
        Command::new(dwcp)
            .args(["keygen", "--force", "--out"])
            .arg(key),
        Io::Capture,
        STEP_TIMEOUT,
    )?;
    Ok(())
}

pub(crate) fn require_root() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|r| r.split_whitespace().nth(1))
        .unwrap_or("?");
    if uid != "0" {
        bail!(
            "the WAN test bed needs root (network namespaces, TUN devices); effective uid is {uid}"
        );
    }
    Ok(())
}

pub(crate) fn build(ws: &Workspace, packages: &[&str]) -> Result<()> {
    let mut cmd = ws.cargo();
    cmd.args(["build", "--release"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    eprintln!("\n==> {}", describe(&cmd));
    run(&mut cmd, Io::Inherit, crate::CARGO_TIMEOUT)?;
    Ok(())
}

fn wanem_bin(ws: &Workspace) -> PathBuf {
    ws.target.join("release").join("dwcp-wanem")
}

fn state_dir(ws: &Workspace) -> PathBuf {
    ws.target.join("xtask").join("wan")
}

/// A command run inside a namespace.
fn in_ns(ns: &str, program: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program).args(args);
    c
}

fn ns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

/// Kills every process still running inside `ns` (servers started in the test bed), then deletes it.
fn remove_ns(ns: &str) {
    if !ns_exists(ns) {
        return;
    }
    if let Ok(out) = Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
    {
        let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if !pids.is_empty() {
            eprintln!("wan: killing processes left in {ns}: {}", pids.join(" "));
            let _ = Command::new("kill").arg("-KILL").args(&pids).status();
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "delete", ns])
        .stderr(Stdio::null())
        .status();
}

fn is_wanem(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("dwcp-wanem"))
        .unwrap_or(false)
}

fn signal(sig: &str, pid: u32) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Waits for `path` to appear (the forwarder writes it once the link forwards).
fn wait_file(path: &Path, child: &mut Child, log: &str, timeout: Duration) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str::<Value>(&text)
        {
            return Ok(v);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            bail!(
                "dwcp-wanem exited ({status}) before the link came up{}",
                tail("its log", &log)
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the link did not come up within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------------
// wan up / down

/// Runs a `wan` subcommand.
pub fn wan(ws: &Workspace, cmd: WanCmd) -> Result<()> {
    require_root()?;
    match cmd {
        WanCmd::Up(link) => up(ws, &link),
        WanCmd::Down => down(ws),
        WanCmd::Check { link, all } => check(ws, &link, all),
    }
}

fn up(ws: &Workspace, link: &LinkOpts) -> Result<()> {
    let dir = state_dir(ws);
    let state_path = dir.join("state.json");
    if let Ok(text) = std::fs::read_to_string(&state_path) {
        let pid = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["pid"].as_u64())
            .unwrap_or(0) as u32;
        if pid != 0 && alive(pid) && is_wanem(pid) {
            bail!("a link is already up (forwarder pid {pid}); run `cargo xtask wan down` first");
        }
    }
    for ns in [SRC_NS, DST_NS] {
        if ns_exists(ns) {
            bail!(
                "namespace {ns} exists but no forwarder is recorded; run `cargo xtask wan down` first"
            );
        }
    }
    build(ws, &["dwcp-wanem"])?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ready = dir.join("ready.json");
    let stats = dir.join("stats.json");
    let log = dir.join("forwarder.log");
    let _ = std::fs::remove_file(&ready);
    let logf = std::fs::File::create(&log)?;
    let mut cmd = Command::new(wanem_bin(ws));
    cmd.args(["up", "--src-ns", SRC_NS, "--dst-ns", DST_NS])
        .args(link.args())
        .arg("--ready-file")
        .arg(&ready)
        .arg("--stats-file")
        .arg(&stats)
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf);
    // Its own process group: a Ctrl-C in this terminal later must not take the link down.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    eprintln!("\n==> {}", describe(&cmd));
    let mut child = cmd.spawn().context("starting dwcp-wanem")?;
    let info = wait_file(
        &ready,
        &mut child,
        &log.to_string_lossy(),
        Duration::from_secs(30),
    )?;
    let state = json!({
        "pid": child.id(), "src_ns": SRC_NS, "dst_ns": DST_NS, "log": log, "stats": stats, "link": info,
    });
    std::fs::write(&state_path, serde_json::to_string_pretty(&state)?)?;
    println!(
        "wan: link up: {} — forwarder pid {}\n\
         \x20 {SRC_NS}: 10.77.0.1 on wan0    {DST_NS}: 10.77.0.2 on wan0    MTU {}\n\
         \x20 e.g.  ip netns exec {DST_NS} iperf3 -s -1 &  ip netns exec {SRC_NS} iperf3 -c 10.77.0.2\n\
         \x20 counters: {}   log: {}\n\
         \x20 tear down with `cargo xtask wan down`",
        info["summary"].as_str().unwrap_or("?"),
        child.id(),
        info["mtu"],
        stats.display(),
        log.display()
    );
    Ok(())
}

fn down(ws: &Workspace) -> Result<()> {
    let dir = state_dir(ws);
    let state_path = dir.join("state.json");
    let state: Value = std::fs::read_to_string(&state_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    // Servers a user left in the namespaces first, so nothing keeps a namespace alive.
    for ns in [SRC_NS, DST_NS] {
        if ns_exists(ns)
            && let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                eprintln!("wan: killing process {pid} left in {ns}");
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
    }
    if let Some(pid) = state["pid"].as_u64().map(|p| p as u32) {
        if alive(pid) && is_wanem(pid) {
            signal("-TERM", pid);
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if alive(pid) {
                signal("-KILL", pid);
            }
            eprintln!("wan: stopped forwarder {pid}");
        }
    } else if ns_exists(SRC_NS) || ns_exists(DST_NS) {
        eprintln!("wan: no forwarder recorded; removing the namespaces");
    }
    for ns in [SRC_NS, DST_NS] {
        remove_ns(ns);
    }
    let _ = std::fs::remove_file(&state_path);
    let _ = std::fs::remove_file(dir.join("ready.json"));
    let _ = std::fs::remove_file(dir.join("stats.json"));
    let left: Vec<&str> = [SRC_NS, DST_NS]
        .into_iter()
        .filter(|n| ns_exists(n))
        .collect();
    if !left.is_empty() {
        bail!("could not delete namespace(s) {}", left.join(", "));
    }
    println!("wan: link down; namespaces {SRC_NS} and {DST_NS} are gone");
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Private links for check and bench

/// A link brought up for one measurement, torn down on drop.
pub(crate) struct PrivateLink {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    pub(crate) src: String,
    pub(crate) dst: String,
    stats: PathBuf,
    log: PathBuf,
    pub(crate) info: Value,
}

impl PrivateLink {
    pub(crate) fn up(ws: &Workspace, tag: &str, link: &LinkOpts) -> Result<Self> {
        let src = format!("dwcp-{tag}{}-s", std::process::id());
        let dst = format!("dwcp-{tag}{}-d", std::process::id());
        let dir = state_dir(ws);
        std::fs::create_dir_all(&dir)?;
        let ready = dir.join(format!("{src}.ready.json"));
        let stats = dir.join(format!("{src}.stats.json"));
        let log = dir.join(format!("{src}.log"));
        let _ = std::fs::remove_file(&ready);
        let logf = std::fs::File::create(&log)?;
        let mut cmd = Command::new(wanem_bin(ws));
        cmd.args([
            "up",
            "--src-ns",
            &src,
            "--dst-ns",
            &dst,
            "--exit-on-stdin-eof",
        ])
        .args(link.args())
        .arg("--ready-file")
        .arg(&ready)
        .arg("--stats-file")
        .arg(&stats)
        .arg("--max-lifetime")
        .arg("900s")
        .stdin(Stdio::piped())
        .stdout(logf.try_clone()?)
        .stderr(logf);
        eprintln!("\n==> {}", describe(&cmd));
        let mut child = cmd.spawn().context("starting dwcp-wanem")?;
        let stdin = child.stdin.take();
        let mut me = Self {
            child: Some(child),
            stdin,
            src,
            dst,
            stats,
            log,
            info: Value::Null,
        };
        let child = me.child.as_mut().expect("just set");
        me.info = wait_file(
            &ready,
            child,
            &me.log.to_string_lossy(),
            Duration::from_secs(30),
        )?;
        let _ = std::fs::remove_file(&ready);
        eprintln!(
            "  link up: {}",
            me.info["summary"].as_str().unwrap_or_default()
        );
        Ok(me)
    }

    fn counters(&self) -> Value {
        std::fs::read_to_string(&self.stats)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .map(|v| v["counters"].clone())
            .unwrap_or(Value::Null)
    }

    fn rate_bps(&self) -> f64 {
        self.info["rate_bps"].as_f64().unwrap_or(0.0)
    }
}

impl Drop for PrivateLink {
    fn drop(&mut self) {
        // Closing stdin makes the forwarder tear its link down.
        if let Some(mut s) = self.stdin.take() {
            let _ = s.flush();
        }
        for ns in [&self.src, &self.dst] {
            if ns_exists(ns)
                && let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output()
            {
                let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                if !pids.is_empty() {
                    let _ = Command::new("kill").arg("-KILL").args(&pids).status();
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        remove_ns(&self.src);
        remove_ns(&self.dst);
        let _ = std::fs::remove_file(&self.stats);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A file of `/proc/net` as seen inside namespace `ns`.
fn proc_net(ns: &str, file: &str) -> String {
    Command::new("ip")
        .args(["netns", "exec", ns, "cat"])
        .arg(format!("/proc/net/{file}"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Local ports (with their state) of the sockets in a `/proc/net/{tcp,udp}` table.
fn ports(table: &str) -> Vec<(u16, String)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = f
                .get(1)?
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())?;
            Some((port, f.get(3)?.to_string()))
        })
        .collect()
}

/// Whether some socket in `ns` listens on TCP `port`.
pub(crate) fn listening_in(ns: &str, port: &str) -> bool {
    let port: u16 = port.parse().unwrap_or(0);
    ports(&proc_net(ns, "tcp"))
        .iter()
        .any(|(p, st)| *p == port && st == "0A")
}

/// Whether some UDP socket in `ns` is bound to `port`.
fn bound_udp_in(ns: &str, port: &str) -> bool {
    let port: u16 = port.parse().unwrap_or(0);
    ports(&proc_net(ns, "udp")).iter().any(|(p, _)| *p == port)
}

pub(crate) fn wait_until(
    server: &mut Proc,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ready() {
        if server.has_exited()? {
            let out = server.wait(Duration::from_secs(1))?;
            bail!(
                "`{}` exited ({}) before {what}{}",
                server.label(),
                out.status,
                tail("stderr", &out.stderr)
            );
        }
        if Instant::now() >= deadline {
            bail!("`{}`: not {what} within 15 s", server.label());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub(crate) fn json_of(what: &str, stdout: &str) -> Result<Value> {
    stdout
        .lines()
        .rev()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .or_else(|| serde_json::from_str(stdout.trim()).ok())
        .ok_or_else(|| anyhow!("`{what}` printed no JSON{}", tail("stdout", stdout)))
}

/// Probes RTT (and loss, with `count` > 0) across a link.
fn probe(ws: &Workspace, link: &PrivateLink, count: u64, pps: u64) -> Result<Value> {
    let bin = wanem_bin(ws);
    let bind = format!("{DST_ADDR}:{PROBE_PORT}");
    let mut server = Proc::spawn(
        &mut in_ns(
            &link.dst,
            &bin,
            &["probe-server", "--bind", &bind, "--max-time", "200s"],
        ),
        Io::Capture,
    )?;
    wait_until(&mut server, "bound", || bound_udp_in(&link.dst, PROBE_PORT))?;
    let (c, p) = (count.to_string(), pps.to_string());
    let mut client = in_ns(
        &link.src,
        &bin,
        &["probe", "--to", &bind, "--count", &c, "--pps", &p],
    );
    eprintln!("  $ {}", describe(&client));
    let out = run(&mut client, Io::Capture, STEP_TIMEOUT)?;
    let _ = server.wait(Duration::from_secs(5));
    json_of("dwcp-wanem probe", &out.stdout)
}

/// One iperf3 client run against a server already listening in the destination namespace.
fn iperf3(link: &PrivateLink, args: &[&str]) -> Result<Value> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &link.src, "iperf3", "-c", DST_ADDR, "-p"])
        .arg(IPERF_PORT)
        .args(["-J"])
        .args(args);
    eprintln!("  $ {}", describe(&cmd));
    let out = Proc::spawn(&mut cmd, Io::Capture)?.wait(STEP_TIMEOUT)?;
    let v = json_of("iperf3 -c", &out.stdout)?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    if !out.status.success() {
        bail!(
            "iperf3 failed ({}){}",
            out.status,
            tail("stderr", &out.stderr)
        );
    }
    Ok(v)
}

fn iperf3_server(link: &PrivateLink) -> Result<Proc> {
    let mut server = Proc::spawn(
        Command::new("ip").args([
            "netns", "exec", &link.dst, "iperf3", "-s", "-B", DST_ADDR, "-p", IPERF_PORT,
        ]),
        Io::Capture,
    )?;
    wait_until(&mut server, "listening", || {
        listening_in(&link.dst, IPERF_PORT)
    })?;
    Ok(server)
}

fn iperf_bps(v: &Value) -> Result<f64> {
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("iperf3 JSON has no end.sum_received.bits_per_second"))
}

fn mbit(bps: f64) -> String {
    format!("{:.0} Mbit/s", bps / 1e6)
}

// ---------------------------------------------------------------------------------------------------
// wan check

struct Check {
    profile: String,
    metric: String,
    configured: String,
    measured: String,
    rule: String,
    ok: bool,
}

fn check(ws: &Workspace, link: &LinkOpts, all: bool) -> Result<()> {
    build(ws, &["dwcp-wanem"])?;
    crate::headline::require_iperf3()?;
    let profiles: Vec<LinkOpts> = if all {
        ["metro", "internet", "poor"]
            .into_iter()
            .map(|p| link.with_profile(p))
            .collect()
    } else {
        vec![link.clone()]
    };
    let mut rows = Vec::new();
    for opts in &profiles {
        if let Err(e) = check_one(ws, opts, &mut rows) {
            rows.push(Check {
                profile: opts.profile.clone(),
                metric: "measurement".into(),
                configured: String::new(),
                measured: format!("error: {e:#}"),
                rule: String::new(),
                ok: false,
            });
        }
    }
    println!("\nWAN emulator validation");
    println!(
        "{:<9} {:<34} {:>14} {:>34} {:<22} verdict",
        "profile", "metric", "configured", "measured", "rule"
    );
    for r in &rows {
        println!(
            "{:<9} {:<34} {:>14} {:>34} {:<22} {}",
            r.profile,
            r.metric,
            r.configured,
            r.measured,
            r.rule,
            if r.ok { "ok" } else { "FAILED" }
        );
    }
    let failed = rows.iter().filter(|r| !r.ok).count();
    if failed > 0 {
        bail!("{failed} check(s) failed");
    }
    println!("\nwan check: all {} checks passed", rows.len());
    Ok(())
}

fn check_one(ws: &Workspace, opts: &LinkOpts, rows: &mut Vec<Check>) -> Result<()> {
    let name = opts.profile.clone();
    // 1. RTT and rate with loss off.
    let clean = PrivateLink::up(ws, "chk", &opts.without_loss())?;
    let rtt_cfg = clean.info["rtt_ms"].as_f64().unwrap_or(0.0);
    let rate = clean.rate_bps();
    let p = probe(ws, &clean, 0, 1)?;
    let rtt = p["rtt_median_ms"].as_f64().unwrap_or(f64::NAN);
    rows.push(Check {
        profile: name.clone(),
        metric: "RTT (UDP probe, median of 100)".into(),
        configured: format!("{rtt_cfg:.1} ms"),
        measured: format!(
            "{rtt:.2} ms (min {:.2}, p99 {:.2})",
            p["rtt_min_ms"].as_f64().unwrap_or(f64::NAN),
            p["rtt_p99_ms"].as_f64().unwrap_or(f64::NAN)
        ),
        rule: "within 10%".into(),
        ok: (rtt - rtt_cfg).abs() <= 0.1 * rtt_cfg.max(0.5),
    });
    if rate > 0.0 {
        let server = iperf3_server(&clean)?;
        let v = iperf3(&clean, &["-t", "10", "-O", "2", "-C", "bbr"])?;
        drop(server);
        let got = iperf_bps(&v)?;
        rows.push(Check {
            profile: name.clone(),
            metric: "iperf3 BBR 1 stream, no loss, 10 s".into(),
            configured: mbit(rate),
            measured: format!(
                "{} = {:.1}% (retr {})",
                mbit(got),
                100.0 * got / rate,
                v["end"]["sum_sent"]["retransmits"]
            ),
            rule: ">= 90% of the rate".into(),
            ok: got >= 0.9 * rate,
        });
    }
    drop(clean);
    // 2. Loss with the profile's loss model.
    let lossy = PrivateLink::up(ws, "chk", opts)?;
    let loss_cfg = lossy.info["loss"].as_f64().unwrap_or(0.0);
    // Enough probes to expect ≥ 400 losses (±10% at 2σ), between 20,000 and 400,000, at 40,000/s.
    let count = if loss_cfg > 0.0 {
        ((400.0 / loss_cfg) as u64).clamp(20_000, 400_000)
    } else {
        20_000
    };
    let p = probe(ws, &lossy, count, 40_000)?;
    let fwd = p["forward_loss"].as_f64().unwrap_or(f64::NAN);
    let rev = p["reverse_loss"].as_f64().unwrap_or(f64::NAN);
    let counters = lossy.counters();
    rows.push(Check {
        profile: name.clone(),
        metric: format!("loss → ({count} UDP probes)"),
        configured: format!("{:.3}%", loss_cfg * 100.0),
        measured: format!(
            "{:.3}% (queue drops {})",
            fwd * 100.0,
            counters["forward"]["queue_drops"]
        ),
        rule: "within 20%".into(),
        ok: (fwd - loss_cfg).abs() <= 0.2 * loss_cfg.max(1e-4),
    });
    rows.push(Check {
        profile: name,
        metric: "loss ← (the echoes)".into(),
        configured: format!("{:.3}%", loss_cfg * 100.0),
        measured: format!("{:.3}%", rev * 100.0),
        rule: "within 20%".into(),
        ok: (rev - loss_cfg).abs() <= 0.2 * loss_cfg.max(1e-4),
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// bench wan

struct BenchRow {
    name: String,
    goodput: f64,
    logical: Option<f64>,
    time_s: f64,
    notes: String,
    data: Value,
}

fn counter_delta(before: &Value, after: &Value, key: &str) -> u64 {
    let get = |v: &Value| v["forward"][key].as_u64().unwrap_or(0);
    get(after).saturating_sub(get(before))
}

/// `cargo xtask bench wan`.
pub fn bench(
    ws: &Workspace,
    opts: &BenchWanOpts,
    quick: bool,
    strict: bool,
    baseline: Option<PathBuf>,
) -> Result<()> {
    if let Some(b) = &baseline {
        if !b.is_file() {
            bail!(
                "--baseline {}: no such file (a `dwcp` binary of another build)",
                b.display()
            );
        }
    }
    require_root()?;
    crate::headline::require_iperf3()?;
    build(ws, &["dwcp-wanem", "dwcp-cli"])?;
    let dwcp = ws.target.join("release").join("dwcp");
    let (image_size, secs) = if quick {
        ("256M".to_string(), 5.min(opts.iperf_secs))
    } else {
        (opts.image_size.clone(), opts.iperf_secs)
    };
    let dir = ws.target.join("xtask").join("wan-bench");
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("key.psk");
    keygen(&dwcp, &key)?;
    let mut images = Vec::new();
    for mix in ["random", "idle"] {
        let img = dir.join(format!("{mix}-{image_size}.img"));
        if !img.is_file() {
            let mut cmd = Command::new(&dwcp);
            cmd.args(["mkimage", "--size", &image_size, "--mix", mix, "--out"])
                .arg(&img);
            eprintln!("  $ {}", describe(&cmd));
            run(&mut cmd, Io::Capture, STEP_TIMEOUT)?;
        }
        images.push((mix, img));
    }

    let link = PrivateLink::up(ws, "bench", &opts.link)?;
    let rate = link.rate_bps();
    let mut rows: Vec<BenchRow> = Vec::new();
    let t = secs.to_string();
    {
        let _server = iperf3_server(&link)?;
        for (name, args) in [
            ("iperf3 1 stream CUBIC", vec!["-t", &t, "-C", "cubic"]),
            ("iperf3 1 stream BBR", vec!["-t", &t, "-C", "bbr"]),
            ("iperf3 -P 8 (BBR)", vec!["-t", &t, "-P", "8", "-C", "bbr"]),
        ] {
            let before = link.counters();
            let v = iperf3(&link, &args)?;
            std::thread::sleep(Duration::from_millis(1100));
            let after = link.counters();
            let bps = iperf_bps(&v)?;
            rows.push(BenchRow {
                name: name.into(),
                goodput: bps / 8.0,
                logical: None,
                time_s: v["end"]["sum_received"]["seconds"].as_f64().unwrap_or(0.0),
                notes: format!(
                    "retransmits {}, emulator: lost {} / queue drops {}",
                    v["end"]["sum_sent"]["retransmits"],
                    counter_delta(&before, &after, "lost"),
                    counter_delta(&before, &after, "queue_drops")
                ),
                data: json!({ "bits_per_second": bps, "retransmits": v["end"]["sum_sent"]["retransmits"] }),
            });
        }
    }
    // The destination's memory is RAM, as a VMM's would be: a file on disk would add its write-back
    // (about 0.8 s per GiB here, in the commit) to every migration.
    let out_dir = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        dir.clone()
    };
    // With --plot: an event log and figures of each image's "dwcp" run (not baseline, not plain).
    let plots = if plot::requested() {
        Some(plot::dir(ws)?)
    } else {
        None
    };
    let dwcp_row = |dwcp: &Path,
                    label: &str,
                    mix: &str,
                    img: &Path,
                    plain: bool|
     -> Result<BenchRow> {
        let plain_flag: &[&str] = if plain {
            &["--insecure-plaintext"]
        } else {
            &[]
        };
        let out = out_dir.join(format!("dwcp-wan-bench-{}.img", std::process::id()));
        let _ = std::fs::remove_file(&out);
        let listen = format!("{DST_ADDR}:{DWCP_PORT}");
        let mut recv = Proc::spawn(
            Command::new("ip")
                .args(["netns", "exec", &link.dst])
                .arg(dwcp)
                .args(["recv", "--listen", &listen, "--out"])
                .arg(&out)
                .arg("--psk-file")
                .arg(&key)
                .args(plain_flag)
                .arg("--json"),
            Io::Capture,
        )?;
        wait_until(&mut recv, "listening", || {
            listening_in(&link.dst, DWCP_PORT)
        })?;
        let mut send = Command::new("ip");
        send.args(["netns", "exec", &link.src])
            .arg(dwcp)
            .args(["send", "--to", &listen, "--image"])
            .arg(img)
            .arg("--psk-file")
            .arg(&key)
            .args(plain_flag)
            .args(["--json", "--no-progress"]);
        if let Some(n) = opts.streams {
            send.args(["--streams", &n.to_string()]);
        }
        let plot_to = plots
            .as_deref()
            .filter(|_| label == "dwcp")
            .map(|d| (d, format!("wan-{}-{mix}", opts.link.profile)));
        if let Some((d, name)) = &plot_to {
            send.arg("--events").arg(plot::events_path(d, name));
        }
        eprintln!("  $ {}", describe(&send));
        let before = link.counters();
        let started = Instant::now();
        let sent = run(&mut send, Io::Capture, STEP_TIMEOUT)?;
        let wall = started.elapsed().as_secs_f64();
        let received = recv.wait_success(Duration::from_secs(60))?;
        std::thread::sleep(Duration::from_millis(1100));
        let after = link.counters();
        let _ = std::fs::remove_file(&out);
        let s = json_of("dwcp send", &sent.stdout)?;
        let r = json_of("dwcp recv", &received.stdout).unwrap_or(Value::Null);
        let num = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
        let total_s = num("total_ms") / 1e3;
        if s["digest_match"] != Value::Bool(true) {
            bail!("dwcp send ({mix}): digests differ: {s}");
        }
        if let Some((d, name)) = &plot_to {
            let what = format!("dwcp send {mix} {image_size}, WAN {}", opts.link.profile);
            let events = plot::events_path(d, name);
            plot::run_figures_or_warn(d, name, &what, &s, Some(&events));
        }
        // The first pass alone (after the streams are set up, before the end game), for comparison
        // with iperf3, whose figure excludes its connection setup too.
        let pass0 = &s["passes"][0];
        let pass0_rate = pass0["wire_bytes"].as_f64().unwrap_or(f64::NAN)
            / (pass0["duration_ms"].as_f64().unwrap_or(f64::NAN) / 1e3);
        let setup_ms = num("total_ms")
            - num("downtime_ms")
            - s["passes"]
                .as_array()
                .map(|p| p.iter().filter_map(|x| x["duration_ms"].as_f64()).sum())
                .unwrap_or(0.0);
        Ok(BenchRow {
            name: format!("{label} {mix} {image_size}"),
            goodput: num("wire_bytes") / total_s,
            logical: Some(num("memory_bytes") / total_s),
            time_s: total_s,
            notes: format!(
                "wire {:.0} MB, {} streams, digest ok; pass 0 {} wire, setup {setup_ms:.0} ms, commit {:.0} ms; emulator: lost {} / queue drops {}, wall {wall:.1} s{}",
                num("wire_bytes") / 1e6,
                s["streams"].as_u64().map_or("?".into(), |n| n.to_string()),
                mbit(pass0_rate * 8.0),
                num("downtime_ms"),
                counter_delta(&before, &after, "lost"),
                counter_delta(&before, &after, "queue_drops"),
                codec_choices(&s["encode"]["adaptive_choices"])
            ),
            data: json!({ "send": s, "recv": r }),
        })
    };
    // With a baseline, each image is sent by both builds (both ends), the first one alternating.
    let mut pairs: Vec<(String, f64, f64)> = Vec::new();
    let mut plain_pairs: Vec<(String, f64, f64)> = Vec::new();
    for (i, (mix, img)) in images.iter().enumerate() {
        if baseline.is_none() && opts.plaintext_too {
            let (tls, plain) = if i % 2 == 0 {
                let t = dwcp_row(&dwcp, "dwcp", mix, img, false)?;
                (t, dwcp_row(&dwcp, "dwcp plain", mix, img, true)?)
            } else {
                let p = dwcp_row(&dwcp, "dwcp plain", mix, img, true)?;
                (dwcp_row(&dwcp, "dwcp", mix, img, false)?, p)
            };
            plain_pairs.push((
                format!("{mix} {image_size}"),
                tls.time_s / plain.time_s,
                tls.logical.unwrap_or(0.0) / plain.logical.unwrap_or(f64::NAN),
            ));
            rows.push(tls);
            rows.push(plain);
            continue;
        }
        let Some(b) = &baseline else {
            rows.push(dwcp_row(&dwcp, "dwcp", mix, img, false)?);
            continue;
        };
        let (current, base) = if i % 2 == 0 {
            let c = dwcp_row(&dwcp, "dwcp", mix, img, false)?;
            (c, dwcp_row(b, "baseline dwcp", mix, img, false)?)
        } else {
            let base = dwcp_row(b, "baseline dwcp", mix, img, false)?;
            (dwcp_row(&dwcp, "dwcp", mix, img, false)?, base)
        };
        pairs.push((
            format!("{mix} {image_size}"),
            current.time_s / base.time_s,
            current.logical.unwrap_or(0.0) / base.logical.unwrap_or(f64::NAN),
        ));
        rows.push(current);
        rows.push(base);
    }
    let summary = link.info["summary"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    drop(link);

    println!("\nWAN benchmark, profile {} ({summary})", opts.link.profile);
    println!(
        "{:<24} {:>14} {:>16} {:>9}  notes",
        "run", "goodput", "logical", "time"
    );
    for r in &rows {
        println!(
            "{:<24} {:>14} {:>16} {:>8.2}s  {}",
            r.name,
            mbit(r.goodput * 8.0),
            r.logical.map(|l| mbit(l * 8.0)).unwrap_or_default(),
            r.time_s,
            r.notes
        );
    }
    for (image, time, logical) in &pairs {
        println!("dwcp / baseline, {image}: time {time:.2} x, logical throughput {logical:.2} x");
    }
    for (image, time, logical) in &plain_pairs {
        println!(
            "TLS / plain text, {image}: time {time:.2} x, logical throughput {logical:.2} x (target >= 0.97 x)"
        );
    }
    let best_iperf = rows
        .iter()
        .filter(|r| r.logical.is_none())
        .map(|r| r.goodput)
        .fold(0.0, f64::max);
    let mut targets = Vec::new();
    if let Some(r) = rows.iter().find(|r| r.name.starts_with("dwcp random")) {
        let link_bytes = rate / 8.0;
        targets.push((
            format!(
                "dwcp random goodput >= 0.9 x link ({}): {:.2} x",
                mbit(rate),
                r.goodput / link_bytes
            ),
            rate > 0.0 && r.goodput >= 0.9 * link_bytes,
        ));
        targets.push((
            format!(
                "dwcp random goodput >= best iperf3 ({}): {:.2} x",
                mbit(best_iperf * 8.0),
                r.goodput / best_iperf
            ),
            r.goodput >= best_iperf,
        ));
    }
    if let Some(r) = rows.iter().find(|r| r.name.starts_with("dwcp idle")) {
        let l = r.logical.unwrap_or(0.0);
        targets.push((
            format!(
                "dwcp idle logical >= 5 x link: {:.2} x",
                l / (rate / 8.0).max(1.0)
            ),
            rate > 0.0 && l >= 5.0 * rate / 8.0,
        ));
    }
    println!();
    if opts.link.profile != "internet" {
        println!("  (the targets are set for the internet profile; here they are for information)");
    }
    for (t, ok) in &targets {
        println!("  [{}] {t}", if *ok { "met" } else { "MISSED" });
    }
    let json_path = ws.target.join("xtask").join("bench-wan.json");
    let doc = json!({
        "profile": opts.link.profile, "link": summary, "rate_bps": rate,
        "rows": rows.iter().map(|r| json!({
            "run": r.name, "goodput_bytes_per_sec": r.goodput, "logical_bytes_per_sec": r.logical,
            "seconds": r.time_s, "notes": r.notes, "data": r.data,
        })).collect::<Vec<_>>(),
        "targets": targets.iter().map(|(t, ok)| json!({ "target": t, "met": ok })).collect::<Vec<_>>(),
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)?)?;
    // Every run is also kept under its own name: an outlier is only understood from its report.
    let stamped = ws.target.join("xtask").join(format!(
        "bench-wan-{}.json",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    ));
    std::fs::write(&stamped, serde_json::to_string_pretty(&doc)?)?;
    println!(
        "\n(written to {} and {})",
        json_path.display(),
        stamped.display()
    );
    if strict && targets.iter().any(|(_, ok)| !ok) {
        bail!("some WAN targets were missed (--strict)");
    }
    Ok(())
}

/// The adaptive codec's choices of a `dwcp send` report (sections per codec), those it made, as
/// "; codecs: lz4 530, zstd-1 409"; empty when it made none.
fn codec_choices(choices: &Value) -> String {
    let made: Vec<String> = choices
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(codec, n)| {
            n.as_u64()
                .filter(|&n| n > 0)
                .map(|n| format!("{codec} {n}"))
        })
        .collect();
    if made.is_empty() {
        String::new()
    } else {
        format!("; codecs: {}", made.join(", "))
    }
}
