//! `cargo xtask bench qemu`: QEMU's own migration (plain, multifd, multifd + zstd) against QEMU
//! carried through dwcp, on loopback and across the emulated WAN (`--profile`, default `internet`).
//!
//! Every run boots the same busybox guest (256 MiB; its workload fills about 80 MiB with random data,
//! binaries and text, then keeps rewriting 4 MiB) twice under TCG, a source and a `-incoming defer`
//! destination, and migrates it. Reported per run: QEMU's `total-time` and `downtime` from
//! `query-migrate` on the source; the end-to-end time from the `migrate` command to the destination's
//! RESUME event, and the real downtime from the source's STOP event to that RESUME (QEMU's own figures
//! end when the source has handed its last byte to the socket, which a proxy takes at once); QEMU's
//! `ram.transferred`, and the bytes on the wire (for dwcp runs, the tunnel's bytes). The WAN half needs
//! root; it runs QEMU and the proxies inside private namespaces (`dwcp-qb<pid>-s`/`-d`).
//! Results go to `target/xtask/bench-qemu.json`.
//!
//! Kept whole (about 850 lines): one benchmark, its variants, rounds and verdicts; the QEMU boot
//! helpers it shares with the tests live in the test harness.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::Workspace;
use crate::process::{Io, Proc, describe, free_port, run};

const GUEST_MIB: u32 = 256;
const GUEST_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t tmpfs -o size=200m tmpfs /tmp
dd if=/dev/urandom of=/tmp/rand bs=1M count=24 2>/dev/null
i=0; while [ $i -lt 24 ]; do cp /bin/busybox /tmp/bb$i; i=$((i+1)); done
seq 1 300000 > /tmp/text
echo GUEST-READY
while true; do dd if=/tmp/rand of=/tmp/hot bs=4k count=1024 conv=notrunc 2>/dev/null; done
"#;
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
const DST_ADDR: &str = "10.77.0.2";

/// One migration configuration.
#[derive(Debug, Clone, Copy)]
struct Variant {
    name: &'static str,
    multifd: u32,
    zstd: bool,
    dwcp: bool,
    /// The tunnel's codec (dwcp runs; empty: the proxies' default, which is raw segments on a
    /// local path and LZ4 otherwise).
    tunnel_codec: &'static str,
}

const VARIANTS: [Variant; 8] = [
    Variant {
        name: "direct plain",
        multifd: 0,
        zstd: false,
        dwcp: false,
        tunnel_codec: "",
    },
    Variant {
        name: "direct multifd 2",
        multifd: 2,
        zstd: false,
        dwcp: false,
        tunnel_codec: "",
    },
    Variant {
        name: "direct multifd 2 + zstd",
        multifd: 2,
        zstd: true,
        dwcp: false,
        tunnel_codec: "",
    },
    Variant {
        name: "dwcp plain",
        multifd: 0,
        zstd: false,
        dwcp: true,
        tunnel_codec: "",
    },
    Variant {
        name: "dwcp plain, raw tunnel",
        multifd: 0,
        zstd: false,
        dwcp: true,
        tunnel_codec: "none",
    },
    Variant {
        name: "dwcp plain, lz4 tunnel",
        multifd: 0,
        zstd: false,
        dwcp: true,
        tunnel_codec: "lz4",
    },
    Variant {
        name: "dwcp multifd 2",
        multifd: 2,
        zstd: false,
        dwcp: true,
        tunnel_codec: "",
    },
    Variant {
        name: "dwcp multifd 2, zstd tunnel",
        multifd: 2,
        zstd: false,
        dwcp: true,
        tunnel_codec: "zstd",
    },
];

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A QMP connection that remembers the STOP and RESUME events it saw (with QEMU's timestamps).
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    stop_at: Option<f64>,
    resume_at: Option<f64>,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("connecting to {}", path.display()));
                }
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut q = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            stop_at: None,
            resume_at: None,
        };
        q.line()?;
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<Value> {
        let mut l = String::new();
        if self.reader.read_line(&mut l)? == 0 {
            bail!("QMP closed");
        }
        let v: Value = serde_json::from_str(&l).context("QMP sent something else than JSON")?;
        if let Some(ev) = v["event"].as_str() {
            let ts = v["timestamp"]["seconds"].as_f64().unwrap_or(0.0)
                + v["timestamp"]["microseconds"].as_f64().unwrap_or(0.0) / 1e6;
            match ev {
                "STOP" => self.stop_at = Some(ts),
                "RESUME" => self.resume_at = Some(ts),
                _ => {}
            }
        }
        Ok(v)
    }

    fn cmd(&mut self, name: &str, args: Value) -> Result<Value> {
        writeln!(
            self.writer,
            "{}",
            json!({"execute": name, "arguments": args})
        )?;
        for _ in 0..10_000 {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {name}: {e}");
            }
        }
        bail!("QMP {name}: no answer")
    }
}

/// A QEMU process (killed on drop).
struct Qemu {
    proc: Proc,
    qmp: Qmp,
    serial: PathBuf,
}

impl Qemu {
    fn start(
        dir: &Path,
        name: &str,
        initrd: &Path,
        kernel: &Path,
        incoming: bool,
        ns: Option<&str>,
    ) -> Result<Self> {
        // Fresh names per boot: a QEMU of the previous run may still be exiting.
        static BOOTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = BOOTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let qmp_path = dir.join(format!("{name}-{n}.qmp"));
        let serial = dir.join(format!("{name}-{n}.serial"));
        let _ = std::fs::remove_file(&qmp_path);
        let _ = std::fs::remove_file(&serial);
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        cmd.args([
            "-accel",
            "tcg",
            "-m",
            &GUEST_MIB.to_string(),
            "-nographic",
            "-no-reboot",
        ])
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-append",
            "console=ttyS0 quiet",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-qmp")
        .arg(format!("unix:{},server,nowait", qmp_path.display()))
        .arg("-serial")
        .arg(format!("file:{}", serial.display()));
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let proc = Proc::spawn(&mut cmd, Io::Capture)?;
        let qmp = Qmp::connect(&qmp_path)?;
        Ok(Self { proc, qmp, serial })
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while Instant::now() < deadline {
            if std::fs::read(&self.serial).is_ok_and(|b| b.windows(11).any(|w| w == b"GUEST-READY"))
            {
                return Ok(());
            }
            if self.proc.has_exited()? {
                bail!("QEMU exited while booting");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("the guest did not boot within {} s", BOOT_TIMEOUT.as_secs())
    }

    fn configure(&mut self, v: &Variant) -> Result<()> {
        self.qmp.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "multifd", "state": v.multifd > 0}]}),
        )?;
        if v.multifd > 0 {
            let mut p = json!({"multifd-channels": v.multifd});
            if v.zstd {
                p["multifd-compression"] = json!("zstd");
            }
            self.qmp.cmd("migrate-set-parameters", p)?;
        }
        self.qmp.cmd(
            "migrate-set-parameters",
            json!({"max-bandwidth": 1u64 << 40}),
        )?;
        Ok(())
    }
}

fn kernel() -> Result<PathBuf> {
    let mut k: Vec<PathBuf> = std::fs::read_dir("/boot")
        .context("reading /boot")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    k.sort();
    k.pop()
        .context("no kernel in /boot: apt-get install linux-image-amd64")
}

fn build_initrd(dir: &Path) -> Result<PathBuf> {
    let root = dir.join("initrd-root");
    for sub in ["bin", "proc", "tmp"] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("apt-get install busybox-static")?;
    std::fs::write(root.join("init"), GUEST_INIT)?;
    let out = dir.join("initrd.gz");
    run(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "chmod 755 init && find . | cpio -o -H newc 2>/dev/null | gzip -1 > {}",
                out.display()
            ))
            .current_dir(&root),
        Io::Capture,
        Duration::from_secs(60),
    )?;
    Ok(out)
}

/// Where a run happens: loopback in the root namespace, or a private emulated WAN link.
struct Place<'a> {
    label: String,
    src_ns: Option<&'a str>,
    dst_ns: Option<&'a str>,
    /// Address the destination QEMU and proxy listen on (as seen from the source).
    dst_host: &'a str,
}

fn in_ns(ns: Option<&str>, program: &Path) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

struct Ctx {
    dir: PathBuf,
    initrd: PathBuf,
    kernel: PathBuf,
    dwcp: PathBuf,
    /// Another `dwcp` binary every dwcp configuration also runs with (`--baseline`).
    baseline: Option<PathBuf>,
    psk: PathBuf,
}

/// One run of the benchmark: a configuration, and the `dwcp` binary of its proxies.
struct Run<'a> {
    variant: &'a Variant,
    name: String,
    dwcp: &'a Path,
}

/// The runs of one round: every configuration, and each dwcp one again with the baseline binary
/// right after it.
fn runs<'a>(ctx: &'a Ctx, variants: &[&'a Variant]) -> Vec<Run<'a>> {
    let mut out = Vec::new();
    for &v in variants {
        out.push(Run {
            variant: v,
            name: v.name.to_string(),
            dwcp: &ctx.dwcp,
        });
        if let (true, Some(b)) = (v.dwcp, &ctx.baseline) {
            out.push(Run {
                variant: v,
                name: format!("baseline {}", v.name),
                dwcp: b,
            });
        }
    }
    out
}

fn measure(ctx: &Ctx, place: &Place<'_>, run: &Run<'_>) -> Result<Value> {
    eprintln!("\n==> {} / {}", place.label, run.name);
    let mut src = Qemu::start(
        &ctx.dir,
        "src",
        &ctx.initrd,
        &ctx.kernel,
        false,
        place.src_ns,
    )?;
    let mut dst = Qemu::start(
        &ctx.dir,
        "dst",
        &ctx.initrd,
        &ctx.kernel,
        true,
        place.dst_ns,
    )?;
    let mut proxies = Vec::new();
    match migrate(ctx, place, run, &mut src, &mut dst, &mut proxies) {
        Ok(r) => Ok(r),
        // What the QEMUs and the proxies said last is what tells why.
        Err(e) => {
            let mut why = format!("{e:#}");
            for p in [&mut src.proc, &mut dst.proc]
                .into_iter()
                .chain(proxies.iter_mut())
            {
                why.push_str(&p.stop_and_tail());
            }
            bail!("{why}")
        }
    }
}

/// The migration of one run, between two booted QEMUs; the proxies it starts go to `proxies`.
fn migrate(
    ctx: &Ctx,
    place: &Place<'_>,
    run: &Run<'_>,
    src: &mut Qemu,
    dst: &mut Qemu,
    proxies: &mut Vec<Proc>,
) -> Result<Value> {
    let v = run.variant;
    src.wait_ready()?;
    std::thread::sleep(Duration::from_secs(1));
    src.configure(v)?;
    dst.configure(v)?;
    let qemu_port = free_port()?;
    let dst_qemu_host = if v.dwcp { "127.0.0.1" } else { place.dst_host };
    dst.qmp.cmd(
        "migrate-incoming",
        json!({"uri": format!("tcp:{dst_qemu_host}:{qemu_port}")}),
    )?;
    let target = if v.dwcp {
        let (tunnel_port, src_port) = (free_port()?, free_port()?);
        let mut recv = in_ns(place.dst_ns, run.dwcp);
        recv.args(["qemu", "recv", "--json", "--wait-secs", "120", "--listen"])
            .arg(format!("{}:{tunnel_port}", place.dst_host))
            .arg("--qemu")
            .arg(format!("127.0.0.1:{qemu_port}"))
            .arg("--psk-file")
            .arg(&ctx.psk);
        // The source proxy retries a refused connection, so the order of the two does not matter.
        let recv = Proc::spawn(&mut recv, Io::Capture)?;
        let mut send = in_ns(place.src_ns, run.dwcp);
        send.args(["qemu", "send", "--json", "--wait-secs", "120"]);
        if !v.tunnel_codec.is_empty() {
            send.args(["--codec", v.tunnel_codec]);
        }
        send.arg("--listen")
            .arg(format!("127.0.0.1:{src_port}"))
            .arg("--to")
            .arg(format!("{}:{tunnel_port}", place.dst_host))
            .arg("--psk-file")
            .arg(&ctx.psk);
        let send = Proc::spawn(&mut send, Io::Capture)?;
        // The source proxy connects its tunnel when it starts, before QEMU migrates.
        std::thread::sleep(Duration::from_millis(1500));
        proxies.push(send);
        proxies.push(recv);
        format!("127.0.0.1:{src_port}")
    } else {
        std::thread::sleep(Duration::from_millis(300));
        format!("{}:{qemu_port}", place.dst_host)
    };
    let t0 = now_s();
    src.qmp
        .cmd("migrate", json!({"uri": format!("tcp:{target}")}))?;
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let info = loop {
        let info = src.qmp.cmd("query-migrate", json!({}))?;
        let status = info["status"].as_str().unwrap_or("").to_string();
        if ["completed", "failed", "cancelled"].contains(&status.as_str()) {
            break info;
        }
        if Instant::now() >= deadline {
            let _ = src.qmp.cmd("migrate_cancel", json!({}));
            bail!(
                "migration still {status} after {} s",
                MIGRATION_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let dest_status = loop {
        let s = dst.qmp.cmd("query-status", json!({}))?["status"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if (s == "running" && dst.qmp.resume_at.is_some()) || Instant::now() >= deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut tunnel = Vec::new();
    for p in proxies.iter_mut() {
        let out = p.wait_success(Duration::from_secs(90))?;
        tunnel.push(serde_json::from_str::<Value>(out.stdout.trim()).unwrap_or(Value::Null));
    }
    let ram = &info["ram"];
    let resume = dst.qmp.resume_at;
    let end_to_end_ms = resume.map(|r| (r - t0) * 1e3);
    let real_downtime_ms = match (src.qmp.stop_at, resume) {
        (Some(s), Some(r)) => Some((r - s) * 1e3),
        _ => None,
    };
    let wire = if v.dwcp {
        tunnel
            .iter()
            .map(|t| t["wire_bytes_sent"].as_u64().unwrap_or(0))
            .sum::<u64>()
    } else {
        ram["transferred"].as_u64().unwrap_or(0)
    };
    let r = json!({
        "place": place.label, "run": run.name, "status": info["status"], "dest_status": dest_status,
        "total_ms": info["total-time"], "downtime_ms": info["downtime"],
        "end_to_end_ms": end_to_end_ms, "real_downtime_ms": real_downtime_ms,
        "qemu_transferred_bytes": ram["transferred"], "wire_bytes": wire,
        "dirty_sync_count": ram["dirty-sync-count"], "tunnel": tunnel,
    });
    eprintln!("    {r}");
    if info["status"] != "completed" || dest_status != "running" {
        bail!(
            "{} / {}: migration {} and destination {dest_status}",
            place.label,
            run.name,
            info["status"]
        );
    }
    Ok(r)
}

/// A private WAN link (the `dwcp-wanem` binary as a child), torn down on drop.
struct Link {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Link {
    fn up(
        ws: &Workspace,
        src: &str,
        dst: &str,
        link: &crate::wan::LinkOpts,
        dir: &Path,
    ) -> Result<Self> {
        let ready = dir.join("link.ready.json");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Command::new(ws.target.join("release/dwcp-wanem"));
        cmd.args([
            "up",
            "--src-ns",
            src,
            "--dst-ns",
            dst,
            "--exit-on-stdin-eof",
            "--profile",
        ])
        .arg(&link.profile)
        .arg("--ready-file")
        .arg(&ready)
        .args(["--max-lifetime", "1800s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
        for (flag, v) in [
            ("--rate", &link.rate),
            ("--rtt", &link.rtt),
            ("--loss", &link.loss),
            ("--queue", &link.queue),
            ("--jitter", &link.jitter),
        ] {
            if let Some(v) = v {
                cmd.args([flag, v]);
            }
        }
        eprintln!("\n==> {}", describe(&cmd));
        let mut child = cmd.spawn().context("starting dwcp-wanem")?;
        let stdin = child.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            if Instant::now() >= deadline || child.try_wait()?.is_some() {
                let _ = child.kill();
                bail!("the WAN link did not come up");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { child, stdin })
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ms(v: &Value) -> String {
    v.as_f64()
        .map(|x| format!("{x:.0}"))
        .unwrap_or_else(|| "?".into())
}

fn print_table(results: &[Value], with_round: bool) {
    println!(
        "\n{:<10} {:<26} {:>5} {:>9} {:>9} {:>11} {:>10} {:>12} {:>12}",
        "where",
        "run",
        if with_round { "round" } else { "runs" },
        "total ms",
        "down ms",
        "e2e ms",
        "real down",
        "QEMU MB",
        "wire MB"
    );
    for r in results {
        println!(
            "{:<10} {:<26} {:>5} {:>9} {:>9} {:>11} {:>10} {:>12.1} {:>12.1}",
            r["place"].as_str().unwrap_or(""),
            r["run"].as_str().unwrap_or(""),
            if with_round { &r["round"] } else { &r["runs"] },
            ms(&r["total_ms"]),
            ms(&r["downtime_ms"]),
            ms(&r["end_to_end_ms"]),
            ms(&r["real_downtime_ms"]),
            r["qemu_transferred_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            r["wire_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        );
    }
}

/// One row per place and configuration: the median of each figure over the rounds that succeeded
/// (`runs` says how many).
fn medians(results: &[Value]) -> Vec<Value> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in results {
        let k = (
            r["place"].as_str().unwrap_or("").to_string(),
            r["run"].as_str().unwrap_or("").to_string(),
        );
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(place, run)| {
            let rows: Vec<&Value> = results
                .iter()
                .filter(|r| r["place"] == place.as_str() && r["run"] == run.as_str())
                .filter(|r| r.get("error").is_none())
                .collect();
            let mut m = json!({"place": place, "run": run, "runs": rows.len()});
            for key in [
                "total_ms",
                "downtime_ms",
                "end_to_end_ms",
                "real_downtime_ms",
                "qemu_transferred_bytes",
                "wire_bytes",
            ] {
                let v: Vec<f64> = rows.iter().filter_map(|r| r[key].as_f64()).collect();
                if !v.is_empty() {
                    m[key] = json!(crate::headline::upper_median(&v));
                }
            }
            m
        })
        .collect()
}

/// Judges one place: the best dwcp configuration against the best direct one (by their medians), on
/// QEMU's total time and on the end-to-end time. Returns the lines to print.
fn verdicts(results: &[Value], place: &str, ratio: f64) -> Vec<String> {
    let best = |dwcp: bool, key: &str| {
        results
            .iter()
            .filter(|r| {
                let run = r["run"].as_str().unwrap_or("");
                r["place"] == place
                    && !run.starts_with("baseline")
                    && run.starts_with("dwcp") == dwcp
            })
            .filter_map(|r| {
                r[key]
                    .as_f64()
                    .map(|t| (t, r["run"].as_str().unwrap_or("").to_string()))
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
    };
    let mut lines = Vec::new();
    for (key, what) in [
        ("total_ms", "QEMU total-time"),
        ("end_to_end_ms", "migrate → destination running"),
    ] {
        if let (Some((d, dn)), Some((t, tn))) = (best(false, key), best(true, key)) {
            let met = t <= ratio * d;
            lines.push(format!(
                "  [{}] {place}: {what}: best dwcp ({tn}) {t:.0} ms <= {ratio} x best direct ({dn}) {d:.0} ms: {:.2} x",
                if met { "met" } else { "MISSED" },
                t / d
            ));
        }
    }
    lines
}

/// Runs the QEMU benchmark.
pub fn bench(
    ws: &Workspace,
    wan: &crate::wan::BenchWanOpts,
    quick: bool,
    rounds: Option<usize>,
    only: Option<&str>,
    baseline: Option<PathBuf>,
) -> Result<()> {
    let variants: Vec<&Variant> = VARIANTS
        .iter()
        .filter(|v| only.is_none_or(|o| v.name.contains(o)))
        .collect();
    if variants.is_empty() {
        anyhow::bail!("no configuration's name contains {only:?}");
    }
    // One migration of this guest varies 2-3x between runs on the shared 2-core machine (direct
    // multifd 2 on loopback: 303 to 2123 ms), so every configuration runs in several interleaved
    // rounds and the verdicts compare medians.
    // Loopback migrations vary most (±30 % per round, against a tunnel cost of about 10 %) and
    // are short, so the loopback half runs more rounds by default than the WAN half.
    let loopback_rounds = rounds.unwrap_or(if quick { 1 } else { 7 }).max(1);
    let wan_rounds = rounds.unwrap_or(3).max(1);
    let mut build = ws.cargo();
    build.args(["build", "--release", "-p", "dwcp-cli", "-p", "dwcp-wanem"]);
    eprintln!("\n==> {}", describe(&build));
    run(&mut build, Io::Inherit, crate::CARGO_TIMEOUT)?;
    let dir = ws.target.join("xtask").join("qemu-bench");
    std::fs::create_dir_all(&dir)?;
    let psk = dir.join("psk");
    std::fs::write(
        &psk,
        format!("qemu-bench-key-{}-{}\n", std::process::id(), now_s()),
    )?;
    let ctx = Ctx {
        initrd: build_initrd(&dir)?,
        kernel: kernel()?,
        dwcp: ws.target.join("release/dwcp"),
        baseline,
        psk,
        dir: dir.clone(),
    };
    let mut results = Vec::new();
    let loopback = Place {
        label: "loopback".into(),
        src_ns: None,
        dst_ns: None,
        dst_host: "127.0.0.1",
    };
    let runs = runs(&ctx, &variants);
    for round in 0..loopback_rounds {
        for run in &runs {
            let mut r = measure(&ctx, &loopback, run)?;
            r["round"] = json!(round);
            results.push(r);
        }
    }
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if quick || !root {
        eprintln!(
            "\nskipping the WAN half ({})",
            if quick { "--quick" } else { "needs root" }
        );
    } else {
        let (s, d) = (
            format!("dwcp-qb{}-s", std::process::id()),
            format!("dwcp-qb{}-d", std::process::id()),
        );
        let link = Link::up(ws, &s, &d, &wan.link, &dir)?;
        let place = Place {
            label: wan.link.profile.clone(),
            src_ns: Some(&s),
            dst_ns: Some(&d),
            dst_host: DST_ADDR,
        };
        for round in 0..wan_rounds {
            for run in &runs {
                match measure(&ctx, &place, run) {
                    Ok(mut r) => {
                        r["round"] = json!(round);
                        results.push(r);
                    }
                    Err(e) => {
                        eprintln!("    failed: {e:#}");
                        results.push(json!({"place": place.label, "run": run.name, "round": round, "error": format!("{e:#}")}));
                    }
                }
            }
        }
        drop(link);
    }
    println!("\nevery run:");
    print_table(&results, true);
    let failed: Vec<&Value> = results
        .iter()
        .filter(|r| r.get("error").is_some())
        .collect();
    for r in &failed {
        println!(
            "  failed: {} / {} round {}: {}",
            r["place"], r["run"], r["round"], r["error"]
        );
    }
    let med = medians(&results);
    println!("\nmedians ({loopback_rounds} rounds on loopback, {wan_rounds} across the WAN):");
    print_table(&med, false);
    println!();
    for l in verdicts(&med, "loopback", 1.2) {
        println!("{l}");
    }
    for l in verdicts(&med, &wan.link.profile, 0.5) {
        println!("{l}");
    }
    let out = ws.target.join("xtask").join("bench-qemu.json");
    std::fs::write(
        &out,
        serde_json::to_string_pretty(
            &json!({"loopback_rounds": loopback_rounds, "wan_rounds": wan_rounds, "runs": results, "medians": med}),
        )?,
    )?;
    println!("\nresults: {}", out.display());
    Ok(())
}
