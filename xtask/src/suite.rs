//! `cargo xtask bench all`: the seed's benchmark suite, measured for real in one run.
//!
//! 1. **Components**, criterion benches run one after the other: AMST stream management
//!    (`benches/benches/amst.rs`), HDE (`hde.rs`), PBA (`pba.rs`), ASS state sync (`ass.rs`),
//!    ITP placement (`dwcp-itp/benches/placement.rs`), and ACP consensus (`cluster.rs`, its own
//!    loop: commits under concurrency need one). Figures come from criterion's estimates.
//! 2. **End to end**, the `dwcp` binary migrating a random image from one process to another:
//!    datacenter (loopback), internet and hybrid (the WAN test bed's `internet` and `metro` links
//!    between two network namespaces; needs root), and a scalability series of 1, 10 and 100
//!    concurrent live migrations (`dwcp demo --vms N`).
//!
//! Every case records throughput, latency percentiles, CPU (user + system seconds of its
//! processes, from `wait4`) and peak memory, next to the seed's expected figure. The results go to
//! `target/xtask/bench-all.json` and a Markdown table `target/xtask/bench-all.md` (pasted into
//! docs/benchmarks.md).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::Workspace;
use crate::process::{Io, describe, free_port, run, tail};
use crate::wan::{self, DST_ADDR, DWCP_PORT, LinkOpts, PrivateLink};

const BENCH_TIMEOUT: Duration = Duration::from_secs(3600);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);
const MIB: f64 = 1024.0 * 1024.0;

/// What a finished child cost, from `wait4`.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    wall_s: f64,
    cpu_s: f64,
    max_rss_bytes: u64,
}

impl Usage {
    fn json(&self) -> Value {
        json!({ "wall_s": self.wall_s, "cpu_s": self.cpu_s, "max_rss_bytes": self.max_rss_bytes })
    }
}

/// A child process whose resource usage is collected when it is reaped. Dropped unreaped, it is
/// killed with its process group.
struct Measured {
    child: Child,
    label: String,
    started: Instant,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    reaped: bool,
}

struct Outcome {
    stdout: String,
    usage: Usage,
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> Option<JoinHandle<Vec<u8>>> {
    pipe.map(|mut p| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = p.read_to_end(&mut v);
            v
        })
    })
}

impl Measured {
    fn spawn(cmd: &mut Command) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let label = describe(cmd);
        eprintln!("  $ {label}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting `{label}`"))?;
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        Ok(Self {
            child,
            label,
            started: Instant::now(),
            stdout,
            stderr,
            reaped: false,
        })
    }

    /// Reaps the child if it has exited: its wait status and usage.
    fn try_reap(&mut self, block: bool) -> Result<Option<(i32, Usage)>> {
        let pid = self.child.id() as libc::pid_t;
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let flags = if block { 0 } else { libc::WNOHANG };
        // SAFETY: `pid` is our own child, not yet reaped (`reaped` is false); the pointers are
        // to live locals.
        let r = unsafe { libc::wait4(pid, &mut status, flags, &mut ru) };
        if r == 0 {
            return Ok(None);
        }
        if r < 0 {
            bail!(
                "waiting for `{}`: {}",
                self.label,
                std::io::Error::last_os_error()
            );
        }
        self.reaped = true;
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Ok(Some((
            status,
            Usage {
                wall_s: self.started.elapsed().as_secs_f64(),
                cpu_s: secs(ru.ru_utime) + secs(ru.ru_stime),
                // Linux reports kilobytes.
                max_rss_bytes: ru.ru_maxrss as u64 * 1024,
            },
        )))
    }

    fn has_exited(&mut self) -> bool {
        matches!(self.try_reap(false), Ok(Some(_)))
    }

    /// Waits until the child exits successfully, for at most `timeout`.
    fn wait(mut self, timeout: Duration) -> Result<Outcome> {
        let deadline = Instant::now() + timeout;
        let (status, usage) = loop {
            if let Some(done) = self.try_reap(false)? {
                break done;
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!("`{}` did not finish within {timeout:?}", self.label);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let text = |h: Option<JoinHandle<Vec<u8>>>| {
            h.and_then(|h| h.join().ok())
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_default()
        };
        let stdout = text(self.stdout.take());
        let stderr = text(self.stderr.take());
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            let how = if libc::WIFEXITED(status) {
                format!("exit code {}", libc::WEXITSTATUS(status))
            } else {
                format!("signal {}", libc::WTERMSIG(status))
            };
            bail!("`{}` failed ({how}){}", self.label, tail("stderr", &stderr));
        }
        Ok(Outcome { stdout, usage })
    }

    fn kill(&mut self) {
        if self.reaped {
            return;
        }
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our child's own process group (it was started with process_group(0)).
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.try_reap(true);
    }
}

impl Drop for Measured {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One line of the suite's table.
#[derive(Debug, Clone)]
struct Row {
    section: &'static str,
    case: String,
    throughput: String,
    latency: String,
    cpu: String,
    memory: String,
    seed: String,
    verdict: Option<bool>,
    data: Value,
}

/// The row of a case that failed: the table still gets written, with the reason in it.
fn failed(section: &'static str, case: String, seed: String, error: &anyhow::Error) -> Row {
    let first = format!("{error:#}");
    let reason: String = first
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(160)
        .collect();
    eprintln!("  (case failed: {first})");
    Row {
        section,
        case,
        throughput: format!("FAILED: {}", reason.replace('|', "/")),
        latency: "–".into(),
        cpu: "–".into(),
        memory: "–".into(),
        seed,
        verdict: Some(false),
        data: json!({ "error": first }),
    }
}

const E2E: &str = "End to end (dwcp send → dwcp recv, two processes, random image)";
const SCALE: &str = "Scalability (dwcp demo --vms N: 16 MiB guests dirtying 1 MiB/s, destination in a second process, loopback)";

fn verdict(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "",
    }
}

fn markdown(rows: &[Row]) -> String {
    let mut s = String::new();
    let mut section = "";
    for r in rows {
        if r.section != section {
            section = r.section;
            s += &format!(
                "\n#### {section}\n\n| case | throughput | latency | CPU | peak memory | seed's figure | verdict |\n\
                 |---|---:|---|---:|---:|---:|---|\n"
            );
        }
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.case,
            r.throughput,
            r.latency,
            r.cpu,
            r.memory,
            r.seed,
            verdict(r.verdict)
        );
    }
    s
}

fn rate(per_s: f64, unit: &str) -> String {
    if unit == "B" {
        if per_s >= 1e9 {
            format!("{:.2} GB/s", per_s / 1e9)
        } else {
            format!("{:.0} MB/s", per_s / 1e6)
        }
    } else if per_s >= 1e6 {
        format!("{:.2} M {unit}/s", per_s / 1e6)
    } else if per_s >= 1e3 {
        format!("{:.1} K {unit}/s", per_s / 1e3)
    } else {
        format!("{per_s:.0} {unit}/s")
    }
}

fn mib(bytes: f64) -> String {
    format!("{:.0} MiB", bytes / MIB)
}

/// A criterion estimate: throughput per second and time per iteration.
#[derive(Debug, Clone)]
struct Estimate {
    per_s: f64,
    unit: &'static str,
    median_ns: f64,
    elements: f64,
}

/// Every benchmark criterion wrote under `home` since `since`, by full id.
fn estimates(home: &Path, since: SystemTime) -> BTreeMap<String, Estimate> {
    let mut out = BTreeMap::new();
    let mut stack = vec![home.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.file_name().is_none_or(|n| n != "benchmark.json")
                || p.parent()
                    .and_then(|d| d.file_name())
                    .is_none_or(|n| n != "new")
            {
                continue;
            }
            let fresh = std::fs::metadata(&p)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= since);
            let read = |p: &Path| -> Option<Value> {
                serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
            };
            let (Some(bench), Some(est)) = (read(&p), read(&p.with_file_name("estimates.json")))
            else {
                continue;
            };
            if !fresh {
                continue;
            }
            let Some(id) = bench["full_id"].as_str() else {
                continue;
            };
            let (elements, unit) = match &bench["throughput"] {
                Value::Object(m) if m.contains_key("Bytes") => {
                    (m["Bytes"].as_f64().unwrap_or(1.0), "B")
                }
                Value::Object(m) if m.contains_key("Elements") => {
                    (m["Elements"].as_f64().unwrap_or(1.0), "ops")
                }
                _ => (1.0, "ops"),
            };
            let median_ns = est["median"]["point_estimate"].as_f64().unwrap_or(f64::NAN);
            out.insert(
                id.to_string(),
                Estimate {
                    per_s: elements / (median_ns / 1e9),
                    unit,
                    median_ns,
                    elements,
                },
            );
        }
    }
    out
}

/// The executable cargo builds for bench target `bench` of package `package`.
fn bench_executable(ws: &Workspace, package: &str, bench: &str) -> Result<PathBuf> {
    let mut cmd = ws.cargo();
    cmd.args([
        "bench",
        "-p",
        package,
        "--bench",
        bench,
        "--no-run",
        "--message-format=json",
    ]);
    eprintln!("\n==> {}", describe(&cmd));
    let out = run(&mut cmd, Io::Capture, crate::CARGO_TIMEOUT)?;
    out.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == bench)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo built no executable for bench {bench} of {package}"))
}

/// One component bench binary: what it took to run, and where its output table went.
struct ComponentRun {
    name: &'static str,
    usage: Usage,
}

/// The seed's component figures and the benchmark that answers each.
const COMPONENT_TARGETS: &[(&str, &str, f64, &str)] = &[
    // (component, criterion id, seed's figure per second, what one element is)
    (
        "AMST",
        "amst/chunk_round_trip/4",
        10e3,
        "chunk sent and acknowledged, 4 streams",
    ),
    (
        "PBA",
        "pba/predict_batch/100000",
        100e3,
        "link forecast, 100 000 links a batch",
    ),
    ("ASS", "ass/publish", 20e3, "state published"),
    (
        "ITP",
        "place/indexed/1000-zoned",
        1e6,
        "placement, 1000-node zoned view",
    ),
];

const HDE_SEED_BPS: f64 = 500e6;
const ACP_SEED_OPS: f64 = 33e3;
const DATACENTER_SEED_BPS: f64 = 2.5e9;
const DATACENTER_SEED_MEMORY: f64 = 13e9;
const INTERNET_SEED_BPS: f64 = 50e6;

fn components(ws: &Workspace, quick: bool, rows: &mut Vec<Row>) -> Result<()> {
    let home = ws.target.join("criterion");
    std::fs::create_dir_all(&home)?;
    let cluster_table = ws.target.join("xtask").join("bench-all-cluster.md");
    let hde_table = ws.target.join("xtask").join("bench-all-hde.md");
    let benches: &[(&'static str, &str, &str)] = &[
        ("AMST", "dwcp-benches", "amst"),
        ("HDE", "dwcp-benches", "hde"),
        ("PBA", "dwcp-benches", "pba"),
        ("ASS", "dwcp-benches", "ass"),
        ("ITP", "dwcp-itp", "placement"),
        ("ACP", "dwcp-benches", "cluster"),
    ];
    let executables = benches
        .iter()
        .map(|(_, p, b)| bench_executable(ws, p, b))
        .collect::<Result<Vec<_>>>()?;
    let since = SystemTime::now();
    let mut runs = Vec::new();
    for ((name, _, _), exe) in benches.iter().zip(&executables) {
        let mut cmd = Command::new(exe);
        cmd.arg("--bench")
            .current_dir(&ws.root)
            .env("CRITERION_HOME", &home)
            .env("DWCP_CLUSTER_TABLE", &cluster_table)
            .env("DWCP_HDE_TABLE", &hde_table);
        if quick {
            cmd.arg("--quick");
        }
        eprintln!("\n==> {name}");
        let out = Measured::spawn(&mut cmd)?.wait(BENCH_TIMEOUT)?;
        runs.push(ComponentRun {
            name,
            usage: out.usage,
        });
    }
    let found = estimates(&home, since);
    let usage_of = |name: &str| {
        runs.iter()
            .find(|r| r.name == name)
            .map(|r| r.usage)
            .unwrap_or_default()
    };
    let cpu = |u: Usage| format!("{:.2} cores", u.cpu_s / u.wall_s.max(1e-9));
    let mem = |u: Usage| format!("{} (max RSS of the bench)", mib(u.max_rss_bytes as f64));
    let component_row =
        |component: &'static str, id: &str, what: &str, seed: Option<f64>, e: &Estimate| -> Row {
            let u = usage_of(component);
            Row {
                section: "Components (criterion, one after the other)",
                case: format!("{component}: {what} (`{id}`)"),
                throughput: rate(e.per_s, e.unit),
                latency: if e.unit == "B" {
                    format!(
                        "{:.2} ms per MiB (median)",
                        e.median_ns / 1e6 / (e.elements / MIB)
                    )
                } else {
                    format!(
                        "{:.2} µs per op (median)",
                        e.median_ns / 1e3 / e.elements.max(1.0)
                    )
                },
                cpu: cpu(u),
                memory: mem(u),
                seed: seed.map_or("–".into(), |s| rate(s, e.unit)),
                verdict: seed.map(|s| e.per_s >= s),
                data: json!({
                    "id": id, "per_second": e.per_s, "unit": e.unit, "median_ns": e.median_ns,
                    "elements": e.elements, "seed_per_second": seed, "bench_usage": u.json(),
                }),
            }
        };
    for (component, id, seed, what) in COMPONENT_TARGETS {
        match found.get(*id) {
            Some(e) => rows.push(component_row(component, id, what, Some(*seed), e)),
            None => bail!("{component}: criterion wrote no estimate for {id}"),
        }
    }
    // The rest of each component's benchmarks, for information.
    for (id, e) in &found {
        let component = match id.split('/').next().unwrap_or_default() {
            "amst" => "AMST",
            "pba" => "PBA",
            "ass" => "ASS",
            "place" | "evacuate" | "best" => "ITP",
            "hde" => "HDE",
            _ => continue,
        };
        if COMPONENT_TARGETS.iter().any(|(_, t, _, _)| t == id) || id.contains("/scan/") {
            continue;
        }
        let seed = (component == "HDE" && id.starts_with("hde/encode/")).then_some(HDE_SEED_BPS);
        let what = if component == "HDE" {
            "logical bytes encoded or decoded"
        } else {
            "see the bench's doc"
        };
        rows.push(component_row(component, id, what, seed, e));
    }
    // ACP: the cluster bench's own JSON, beside its table.
    let acp_json = cluster_table.with_extension("json");
    let acp: Value = serde_json::from_str(
        &std::fs::read_to_string(&acp_json)
            .with_context(|| format!("reading {}", acp_json.display()))?,
    )?;
    let u = usage_of("ACP");
    for (backend, key) in [("embedded raft", "raft"), ("etcd 3.4", "etcd")] {
        for writers in ["writers_512", "writers_2048"] {
            let v = &acp[key][writers];
            let ops = v["ops_per_s"].as_f64().unwrap_or(f64::NAN);
            rows.push(Row {
                section: "Components (criterion, one after the other)",
                case: format!(
                    "ACP: registry commits on 3 nodes, {backend}, {} writers",
                    writers.trim_start_matches("writers_")
                ),
                throughput: rate(ops, "ops"),
                latency: format!(
                    "p50 {:.2} ms, p99 {:.2} ms",
                    v["p50_ms"].as_f64().unwrap_or(f64::NAN),
                    v["p99_ms"].as_f64().unwrap_or(f64::NAN)
                ),
                cpu: cpu(u),
                memory: format!(
                    "{} (the bench; etcd's processes not counted)",
                    mib(u.max_rss_bytes as f64)
                ),
                seed: rate(ACP_SEED_OPS, "ops"),
                verdict: Some(ops >= ACP_SEED_OPS),
                data: json!({ "backend": key, "load": writers, "figures": v, "bench_usage": u.json() }),
            });
        }
    }
    Ok(())
}

/// Where a transfer runs: on loopback, or between the WAN bed's namespaces.
enum Path2<'a> {
    Loopback,
    Link(&'a PrivateLink),
}

/// `dwcp recv` in one process, `dwcp send` of `image` in another; both reports and usages.
fn transfer(
    dwcp: &Path,
    path: &Path2,
    image: &Path,
    key: &Path,
    out: &Path,
    extra: &[&str],
) -> Result<Value> {
    let _ = std::fs::remove_file(out);
    let (listen, port, prefix_src, prefix_dst) = match path {
        Path2::Loopback => {
            let port = free_port()?;
            (format!("127.0.0.1:{port}"), port.to_string(), None, None)
        }
        Path2::Link(link) => (
            format!("{DST_ADDR}:{DWCP_PORT}"),
            DWCP_PORT.to_string(),
            Some(link.src.clone()),
            Some(link.dst.clone()),
        ),
    };
    let command = |ns: &Option<String>| {
        let mut c = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(dwcp);
                c
            }
            None => Command::new(dwcp),
        };
        c.env("RUST_LOG", "warn");
        c
    };
    let mut recv_cmd = command(&prefix_dst);
    recv_cmd
        .args(["recv", "--listen", &listen, "--out"])
        .arg(out)
        .arg("--psk-file")
        .arg(key)
        .args(extra)
        .arg("--json");
    let mut recv = Measured::spawn(&mut recv_cmd)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listening = match &prefix_dst {
            Some(ns) => wan::listening_in(ns, &port),
            None => crate::process::is_listening(port.parse()?).unwrap_or(true),
        };
        if listening {
            break;
        }
        if recv.has_exited() || Instant::now() > deadline {
            bail!("`dwcp recv` did not start listening on {listen}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut send_cmd = command(&prefix_src);
    send_cmd
        .args(["send", "--to", &listen, "--image"])
        .arg(image)
        .arg("--psk-file")
        .arg(key)
        .args(extra)
        .args(["--json", "--no-progress"]);
    let sent = Measured::spawn(&mut send_cmd)?.wait(MIGRATION_TIMEOUT)?;
    let received = recv.wait(Duration::from_secs(60))?;
    let _ = std::fs::remove_file(out);
    let s = wan::json_of("dwcp send", &sent.stdout)?;
    let r = wan::json_of("dwcp recv", &received.stdout)?;
    if s["digest_match"] != Value::Bool(true) || r["digest_match"] != Value::Bool(true) {
        bail!("dwcp send/recv: the digests differ");
    }
    Ok(json!({
        "send": s, "recv": r,
        "send_usage": sent.usage.json(), "recv_usage": received.usage.json(),
    }))
}

fn latency_of(report: &Value, op: &str) -> Option<(f64, f64)> {
    report["latency"].as_array()?.iter().find_map(|o| {
        (o["op"].as_str()? == op).then(|| {
            (
                o["p50_us"].as_f64().unwrap_or(f64::NAN),
                o["p99_us"].as_f64().unwrap_or(f64::NAN),
            )
        })
    })
}

fn transfer_row(case: String, seed_bps: Option<f64>, seed_memory: Option<f64>, v: Value) -> Row {
    let s = &v["send"];
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let throughput = f(s, "memory_bytes") / (f(s, "total_ms") / 1e3);
    let cpu_s = f(&v["send_usage"], "cpu_s") + f(&v["recv_usage"], "cpu_s");
    let wall = f(s, "total_ms") / 1e3;
    let (send_anon, recv_anon) = (
        f(s, "peak_rss_anon_bytes"),
        f(&v["recv"], "peak_rss_anon_bytes"),
    );
    let ack = latency_of(s, "ack");
    let latency = match ack {
        Some((p50, p99)) => format!(
            "chunk ack p50 {:.2} ms, p99 {:.2} ms; downtime {:.1} ms",
            p50 / 1e3,
            p99 / 1e3,
            f(s, "downtime_ms")
        ),
        None => format!("downtime {:.1} ms", f(s, "downtime_ms")),
    };
    let mut seed = seed_bps.map_or("–".to_string(), |b| rate(b, "B"));
    if let Some(m) = seed_memory {
        seed += &format!(" with {:.0} GB", m / 1e9);
    }
    let verdict = seed_bps
        .map(|b| throughput >= b && seed_memory.is_none_or(|m| send_anon.max(recv_anon) <= m));
    Row {
        section: E2E,
        case,
        throughput: rate(throughput, "B"),
        latency,
        cpu: format!(
            "{cpu_s:.1} CPU-s = {:.2} cores (both ends)",
            cpu_s / wall.max(1e-9)
        ),
        memory: format!(
            "sender {} / receiver {} anon",
            mib(send_anon),
            mib(recv_anon)
        ),
        seed,
        verdict,
        data: v,
    }
}

fn end_to_end(ws: &Workspace, quick: bool, link: &LinkOpts, rows: &mut Vec<Row>) -> Result<()> {
    let dwcp = ws.target.join("release").join("dwcp");
    let dir = ws.target.join("xtask").join("suite");
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("key.psk");
    wan::keygen(&dwcp, &key)?;
    let image = |size: &str| -> Result<PathBuf> {
        let img = dir.join(format!("random-{size}.img"));
        if !img.is_file() {
            run(
                Command::new(&dwcp)
                    .args(["mkimage", "--size", size, "--mix", "random", "--out"])
                    .arg(&img),
                Io::Capture,
                Duration::from_secs(600),
            )?;
        }
        Ok(img)
    };
    // The destination's memory is RAM, as a VMM's would be.
    let out_dir = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        dir.clone()
    };
    let out = out_dir.join(format!("dwcp-suite-{}.img", std::process::id()));
    let (dc_size, wan_size) = if quick {
        ("256M", "256M")
    } else {
        ("4G", "1G")
    };

    eprintln!("\n==> datacenter: loopback, {dc_size}");
    let dc_image = image(dc_size)?;
    // The loopback ceiling in the same run, and what `dwcp demo` reaches into preallocated memory
    // (send/recv below write a tmpfs file, faulting its pages in during the migration).
    let reference = |case: &str, result: Result<(f64, Value)>| match result {
        Ok((bps, data)) => Row {
            section: E2E,
            case: case.into(),
            throughput: rate(bps, "B"),
            latency: "–".into(),
            cpu: "–".into(),
            memory: "–".into(),
            seed: "(reference)".into(),
            verdict: None,
            data,
        },
        Err(e) => failed(E2E, case.into(), "(reference)".into(), &e),
    };
    rows.push(reference(
        "iperf3 loopback, 1 stream, 5 s",
        crate::headline::iperf3_parallel(1).map(|b| (b, json!({ "bytes_per_sec": b }))),
    ));
    let demo = crate::headline::demo_with(
        &dwcp,
        if quick { "256M" } else { "1G" },
        Some("random"),
        0,
        &[],
    );
    rows.push(reference(
        &format!(
            "datacenter: `dwcp demo` random {}, preallocated destination, in one process (TLS)",
            if quick { "256M" } else { "1G" }
        ),
        demo.and_then(|v| {
            let bps = crate::headline::num(&v, "memory_bytes")?
                / (crate::headline::num(&v, "total_ms")? / 1e3);
            Ok((bps, v))
        }),
    ));
    // With the defaults (TLS 1.3), then in plain text, to show what encryption costs here.
    for plain in [false, true] {
        let case = format!(
            "datacenter: loopback, {dc_size}{}",
            if plain { ", --insecure-plaintext" } else { "" }
        );
        let extra: &[&str] = if plain {
            &["--insecure-plaintext"]
        } else {
            &[]
        };
        rows.push(
            match transfer(&dwcp, &Path2::Loopback, &dc_image, &key, &out, extra) {
                Ok(v) => transfer_row(
                    case,
                    Some(DATACENTER_SEED_BPS),
                    Some(DATACENTER_SEED_MEMORY),
                    v,
                ),
                Err(e) => failed(E2E, case, rate(DATACENTER_SEED_BPS, "B"), &e),
            },
        );
    }
    if !quick {
        // The big image is not kept: 4 GiB of disk for a file made in seconds.
        let _ = std::fs::remove_file(&dc_image);
    }

    if wan::require_root().is_err() {
        eprintln!("(not root: the internet and hybrid cases need the WAN test bed; skipped)");
        for case in ["internet", "hybrid"] {
            rows.push(Row {
                section: E2E,
                case: format!("{case}: skipped (needs root for the WAN test bed)"),
                throughput: "–".into(),
                latency: "–".into(),
                cpu: "–".into(),
                memory: "–".into(),
                seed: "–".into(),
                verdict: None,
                data: Value::Null,
            });
        }
    } else {
        let wan_image = image(wan_size)?;
        for (case, profile, seed) in [
            ("internet", "internet", Some(INTERNET_SEED_BPS)),
            ("hybrid", "metro", None),
        ] {
            let bed = PrivateLink::up(ws, "suite", &link.with_profile(profile))?;
            let summary = bed.info["summary"].as_str().unwrap_or_default().to_string();
            let v = transfer(&dwcp, &Path2::Link(&bed), &wan_image, &key, &out, &[]);
            drop(bed);
            let case = format!("{case}: WAN bed `{profile}` ({summary}), {wan_size}");
            rows.push(match v {
                Ok(v) => transfer_row(case, seed, None, v),
                Err(e) => failed(E2E, case, seed.map_or("–".into(), |b| rate(b, "B")), &e),
            });
        }
    }

    // Scalability: N live migrations at once, each a 16 MiB guest dirtying 1 MiB/s.
    // The last: what an operator does with 100 on two cores, admission control (`dwcp::Admission`).
    for (vms, at_most) in [(1u32, None), (10, None), (100, None), (100, Some(8u32))] {
        eprintln!("\n==> scalability: {vms} VMs");
        let mut cmd = Command::new(&dwcp);
        cmd.args(["demo", "--vms", &vms.to_string(), "--size", "16M"])
            .args([
                "--mix",
                "random",
                "--dirty-rate",
                "1",
                "--destination-process",
            ])
            .args(["--json", "--no-progress"]);
        if let Some(k) = at_most {
            cmd.args(["--max-running", &k.to_string()]);
        }
        let case = match at_most {
            None => format!("{vms} VM{} at once", if vms == 1 { "" } else { "s" }),
            Some(k) => format!("{vms} VMs, at most {k} at once (`--max-running {k}`)"),
        };
        let measured = Measured::spawn(&mut cmd)
            .and_then(|m| m.wait(MIGRATION_TIMEOUT))
            .and_then(|done| {
                let v: Value = serde_json::from_str(done.stdout.trim())
                    .with_context(|| format!("the report of dwcp demo --vms {vms}"))?;
                Ok((done, v))
            });
        let (done, v) = match measured {
            Ok(m) => m,
            Err(e) => {
                rows.push(failed(SCALE, case, "–".into(), &e));
                continue;
            }
        };
        let f = |p: &str| v.pointer(p).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let wall = f("/wall_ms") / 1e3;
        let bytes = f64::from(vms) * f("/guest_bytes");
        rows.push(Row {
            section: SCALE,
            case,
            throughput: format!("{} ({wall:.2} s)", rate(bytes / wall, "B")),
            latency: format!(
                "per migration p50 {:.2} s, p99 {:.2} s; max downtime {:.1} ms",
                f("/time_s/p50"),
                f("/time_s/p99"),
                f("/max_downtime_ms")
            ),
            cpu: format!(
                "{:.1} CPU-s = {:.2} cores (both processes)",
                done.usage.cpu_s,
                done.usage.cpu_s / done.usage.wall_s.max(1e-9)
            ),
            memory: format!(
                "engine {} + {} (source, destination; guest memory excluded)",
                mib(f("/engine_rss_bytes")),
                mib(f("/destination_process/engine_rss_bytes"))
            ),
            seed: "–".into(),
            verdict: None,
            data: json!({ "report": v, "usage": done.usage.json() }),
        });
    }
    Ok(())
}

/// Runs the suite and writes its JSON and Markdown.
pub fn bench(ws: &Workspace, quick: bool, link: &LinkOpts, only: Option<&str>) -> Result<()> {
    let (parts, e2e) = match only {
        None => (true, true),
        Some("components") => (true, false),
        Some("e2e") => (false, true),
        Some(other) => bail!("--only {other}: `components` or `e2e`"),
    };
    crate::wan::build(ws, &["dwcp-cli", "dwcp-wanem"])?;
    let started = SystemTime::now();
    let mut rows = Vec::new();
    if parts {
        components(ws, quick, &mut rows)?;
    }
    if e2e {
        end_to_end(ws, quick, link, &mut rows)?;
    }
    let table = markdown(&rows);
    println!("{table}");
    let dir = ws.target.join("xtask");
    std::fs::create_dir_all(&dir)?;
    let md = dir.join("bench-all.md");
    let js = dir.join("bench-all.json");
    std::fs::write(&md, &table)?;
    let doc = json!({
        "generated_unix_s": started.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "quick": quick,
        "only": only,
        "rows": rows.iter().map(|r| json!({
            "section": r.section, "case": r.case, "throughput": r.throughput, "latency": r.latency,
            "cpu": r.cpu, "peak_memory": r.memory, "seed": r.seed,
            "met": r.verdict, "data": r.data,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(&js, serde_json::to_string_pretty(&doc)? + "\n")?;
    let missed = rows.iter().filter(|r| r.verdict == Some(false)).count();
    let judged = rows.iter().filter(|r| r.verdict.is_some()).count();
    println!(
        "seed figures met: {}/{judged}\n(written to {} and {})",
        judged - missed,
        md.display(),
        js.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_naturally() {
        assert_eq!(rate(2.5e9, "B"), "2.50 GB/s");
        assert_eq!(rate(50e6, "B"), "50 MB/s");
        assert_eq!(rate(12_345.0, "ops"), "12.3 K ops/s");
        assert_eq!(rate(1.5e6, "ops"), "1.50 M ops/s");
        assert_eq!(rate(12.0, "ops"), "12 ops/s");
    }

    #[test]
    fn the_table_has_one_header_per_section_and_marks_misses() {
        let row = |section, verdict| Row {
            section,
            case: "c".into(),
            throughput: "t".into(),
            latency: "l".into(),
            cpu: "u".into(),
            memory: "m".into(),
            seed: "s".into(),
            verdict,
            data: Value::Null,
        };
        let t = markdown(&[row("A", Some(true)), row("A", Some(false)), row("B", None)]);
        assert_eq!(t.matches("#### A").count(), 1);
        assert_eq!(t.matches("#### B").count(), 1);
        assert_eq!(t.matches("| met |").count(), 1);
        assert_eq!(t.matches("**missed**").count(), 1);
    }

    #[test]
    fn estimates_are_read_from_criterions_files() {
        let dir = std::env::temp_dir().join(format!("xtask-suite-{}", std::process::id()));
        let new = dir.join("amst").join("x").join("new");
        std::fs::create_dir_all(&new).unwrap();
        let since = SystemTime::now() - Duration::from_secs(5);
        std::fs::write(
            new.join("benchmark.json"),
            r#"{"full_id":"amst/x","throughput":{"Elements":1000}}"#,
        )
        .unwrap();
        std::fs::write(
            new.join("estimates.json"),
            r#"{"median":{"point_estimate":2000000.0}}"#,
        )
        .unwrap();
        let e = estimates(&dir, since);
        std::fs::remove_dir_all(&dir).unwrap();
        let x = &e["amst/x"];
        assert_eq!(x.unit, "ops");
        assert!((x.per_s - 500_000.0).abs() < 1e-6, "{}", x.per_s);
        assert!(
            estimates(&std::env::temp_dir().join("no-such-dir-xtask"), since).is_empty(),
            "a missing directory yields nothing"
        );
    }
}
