//! `cargo xtask rdma-guest` and `cargo xtask bench rdma`: the RDMA test and benchmark binaries, run
//! inside a QEMU guest with Soft-RoCE.
//!
//! The host needs no RDMA device, only the Debian packages qemu-system-x86, linux-image-amd64,
//! busybox-static, ibverbs-providers, perftest (and, to build, libibverbs-dev, librdmacm-dev,
//! libclang-dev). The xtask builds the binaries, packs an initramfs (kernel modules of the host's
//! `/boot` kernel, busybox, libibverbs with the rxe provider, `ib_write_bw`, the binaries and every
//! shared library they load), boots it under TCG (no KVM needed), and reads the results from the
//! serial console. Inside, `rdma_rxe` binds `rxe0` to a dummy Ethernet interface; the tests run with
//! `DWCP_RDMA_REQUIRED=1`, so a missing device fails them instead of skipping them.
//!
//! Over 600 lines: the guest runner and the benchmark share the guest's boot and result parsing.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Workspace;
use crate::headline::upper_median;
use crate::process::{Io, Proc, run};

/// Kernel modules, in load order.
const MODULES: &[&str] = &[
    // A virtio RNG first: TLS needs random numbers at once, and without a source of entropy the
    // guest's getrandom() blocked tests for tens of seconds after boot.
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_rng",
    "crc32_generic",
    "ib_core",
    "ib_uverbs",
    "udp_tunnel",
    "ip6_udp_tunnel",
    "rdma_rxe",
    "dummy",
];
/// Host tools copied into the guest when present (diagnostics and the reference benchmark).
const GUEST_TOOLS: &[&str] = &[
    "/usr/bin/rdma",
    "/usr/bin/ibv_devices",
    "/usr/bin/ibv_devinfo",
    "/usr/bin/ib_write_bw",
];
/// Message size of both benchmarks: one full receive-ring slot's worth, like a full chunk.
const BENCH_MSG: u64 = 1 << 20;
/// The goodput ratio the issue asks for.
const TARGET_RATIO: f64 = 0.8;

/// Options of `cargo xtask rdma-guest`.
#[derive(Debug, clap::Args)]
pub struct RdmaGuestOpts {
    /// Only tests whose name contains this (passed to each test binary).
    #[arg(long)]
    filter: Option<String>,
    /// Also run the benchmark (dwcp next to ib_write_bw) after the tests, in the same guest.
    #[arg(long)]
    bench: bool,
    /// Limit on the whole guest run, boot included.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    guest_mem_mb: u32,
    /// Keep the work directory (initramfs, console log) and print where it is.
    #[arg(long)]
    keep: bool,
    /// Run this shell script in the guest instead of the tests (the test and benchmark binaries
    /// are in /bin, `ib_write_bw` too): for experiments and debugging.
    #[arg(long)]
    script: Option<PathBuf>,
}

/// Runs the RDMA tests in a Soft-RoCE guest.
pub fn guest(ws: &Workspace, opts: &RdmaGuestOpts) -> Result<()> {
    let tests = build_tests(ws)?;
    let bench = if opts.bench || opts.script.is_some() {
        Some(build_bench(ws)?)
    } else {
        None
    };
    let mut script = String::from(SCRIPT_PRELUDE);
    let filter = opts.filter.as_deref().map(shell_quote).unwrap_or_default();
    for t in &tests {
        let _ = writeln!(script, "run_test {} {filter}", shell_quote(&guest_name(t)));
    }
    if bench.is_some() {
        script.push_str(&bench_script(false));
    }
    script.push_str("exit $fail\n");
    if let Some(custom) = &opts.script {
        script = std::fs::read_to_string(custom)
            .with_context(|| format!("reading {}", custom.display()))?;
    }
    let mut binaries = tests.clone();
    binaries.extend(bench);
    let out = boot(
        ws,
        &binaries,
        &script,
        opts.guest_mem_mb,
        opts.timeout_secs,
        opts.keep,
    )?;
    if opts.script.is_some() {
        if out.exit != 0 {
            bail!("the guest script exited with {}", out.exit);
        }
        return Ok(());
    }
    let results = test_results(&out.console);
    eprintln!("\nrdma-guest: test binaries run inside the Soft-RoCE guest:");
    for (name, rc, summary) in &results {
        eprintln!("  {name:<24} exit {rc}  {summary}");
    }
    if opts.bench {
        report_bench(&out.console)?;
    }
    if results.len() != tests.len() {
        bail!(
            "{} of {} test binaries reported a result (the guest stopped early?)",
            results.len(),
            tests.len()
        );
    }
    if out.exit != 0 || results.iter().any(|(_, rc, _)| *rc != 0) {
        bail!("RDMA tests failed inside the guest (exit {})", out.exit);
    }
    eprintln!("rdma-guest: all RDMA tests passed on Soft-RoCE");
    Ok(())
}

/// Runs the RDMA benchmark in a Soft-RoCE guest.
pub fn bench(ws: &Workspace, quick: bool) -> Result<()> {
    let bin = build_bench(ws)?;
    let mut script = String::from(SCRIPT_PRELUDE);
    script.push_str(&bench_script(quick));
    script.push_str("exit $fail\n");
    let out = boot(ws, &[bin], &script, 2048, 900, false)?;
    if out.exit != 0 {
        bail!("the benchmark failed inside the guest (exit {})", out.exit);
    }
    report_bench(&out.console)
}

/// The guest's file name of a host binary.
fn guest_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

const SCRIPT_PRELUDE: &str = r#"
fail=0
export DWCP_RDMA_REQUIRED=1 RUST_BACKTRACE=1 RUST_LOG=warn
echo "== devices"; ibv_devices 2>&1; rdma link show 2>&1
run_test() {
  t=$1; shift
  echo "DWCP-TEST-START $t"
  /bin/$t --test-threads=1 "$@"
  rc=$?
  echo "DWCP-TEST-END $t rc=$rc"
  [ $rc -eq 0 ] || fail=1
}
"#;

/// Guest commands of the benchmark: rounds of `ib_write_bw` (server and client on rxe0) and dwcp
/// with the same message size and byte count, interleaved so that both see the same conditions
/// (the host's CPUs are shared); then dwcp over two connections, for information.
fn bench_script(quick: bool) -> String {
    let (rounds, iters) = if quick { (1, 100) } else { (5, 300) };
    let bytes = iters * BENCH_MSG;
    // Unmeasured warm-up of both, so that neither pays for first-touch page faults in round 1.
    let mut s = format!(
        r#"
echo "== benchmark warm-up"
ib_write_bw -d rxe0 -F -s {BENCH_MSG} -n 20 >/dev/null 2>&1 &
sleep 2
ib_write_bw -d rxe0 -F -s {BENCH_MSG} -n 20 10.7.0.1 >/dev/null 2>&1
wait
/bin/dwcp-rdma-bench --message-bytes {BENCH_MSG} --total-bytes {} >/dev/null || fail=1
"#,
        32 * BENCH_MSG
    );
    for round in 1..=rounds {
        let _ = write!(
            s,
            r#"
echo "== benchmark round {round}/{rounds}: ib_write_bw, {iters} x {BENCH_MSG} bytes"
ib_write_bw -d rxe0 -F -s {BENCH_MSG} -n {iters} >/tmp/ibsrv.log 2>&1 &
srv=$!
sleep 2
ib_write_bw -d rxe0 -F -s {BENCH_MSG} -n {iters} 10.7.0.1 >/tmp/ibcli.log 2>&1 || {{ echo "ib_write_bw client failed"; cat /tmp/ibsrv.log; fail=1; }}
wait $srv
echo "IBWRITEBW-BEGIN"; cat /tmp/ibcli.log; echo "IBWRITEBW-END"
echo "== benchmark round {round}/{rounds}: dwcp over RDMA, {bytes} bytes in {BENCH_MSG}-byte writes"
/bin/dwcp-rdma-bench --message-bytes {BENCH_MSG} --total-bytes {bytes} --connections 1 || fail=1
"#
        );
    }
    let _ = write!(
        s,
        r#"
echo "== benchmark: dwcp over RDMA, 2 connections"
/bin/dwcp-rdma-bench --message-bytes {BENCH_MSG} --total-bytes {bytes} --connections 2 || fail=1
"#
    );
    s
}

/// `cargo test --no-run` of dwcp-rdma with the feature; returns the test executables.
fn build_tests(ws: &Workspace) -> Result<Vec<PathBuf>> {
    eprintln!("==> cargo test --no-run --features rdma -p dwcp-rdma");
    let exes = cargo_executables(
        ws,
        &[
            "test",
            "--no-run",
            "--features",
            "rdma",
            "-p",
            "dwcp-rdma",
            "--message-format=json",
        ],
        true,
    )?;
    if exes.is_empty() {
        bail!("cargo built no dwcp-rdma test executable");
    }
    Ok(exes)
}

/// The release benchmark binary.
fn build_bench(ws: &Workspace) -> Result<PathBuf> {
    eprintln!("==> cargo build --release --features rdma -p dwcp-rdma --bin dwcp-rdma-bench");
    let exes = cargo_executables(
        ws,
        &[
            "build",
            "--release",
            "--features",
            "rdma",
            "-p",
            "dwcp-rdma",
            "--bin",
            "dwcp-rdma-bench",
            "--message-format=json",
        ],
        false,
    )?;
    exes.into_iter()
        .next()
        .context("cargo built no dwcp-rdma-bench executable")
}

/// Runs a cargo build with JSON messages and collects the executables it produced (test targets
/// only, or non-test targets only).
fn cargo_executables(ws: &Workspace, args: &[&str], tests: bool) -> Result<Vec<PathBuf>> {
    let mut cmd = ws.cargo();
    cmd.args(args);
    let out = run(&mut cmd, Io::Capture, crate::CARGO_TIMEOUT).context(
        "building the RDMA binaries (needs libibverbs-dev, librdmacm-dev, libclang-dev)",
    )?;
    let mut exes = Vec::new();
    for line in out.stdout.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"].as_bool() != Some(tests) {
            continue;
        }
        if let Some(exe) = msg["executable"].as_str() {
            exes.push(PathBuf::from(exe));
        }
    }
    Ok(exes)
}

/// What the guest printed and how its script ended.
struct GuestRun {
    console: String,
    exit: i32,
}

/// Builds the initramfs with `binaries` and `script`, boots it, and returns the console output.
fn boot(
    ws: &Workspace,
    binaries: &[PathBuf],
    script: &str,
    mem_mb: u32,
    timeout_secs: u64,
    keep: bool,
) -> Result<GuestRun> {
    let kernel = host_kernel()?;
    let kver = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("kernel file name is not vmlinuz-VERSION")?
        .to_string();
    for tool in ["qemu-system-x86_64", "busybox", "ldd", "modinfo"] {
        if which(tool).is_none() {
            bail!(
                "`{tool}` not found: apt-get install qemu-system-x86 busybox-static kmod \
                 linux-image-amd64 ibverbs-providers perftest"
            );
        }
    }
    let work = ws.target.join("xtask").join("rdma-guest");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    let mut ramfs = Initramfs::default();
    for d in [
        "/bin",
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/etc/libibverbs.d",
        "/lib/modules",
    ] {
        ramfs.dir(d);
    }
    for m in MODULES {
        let path = run(
            Command::new("modinfo").args(["-k", &kver, "-n", m]),
            Io::Capture,
            Duration::from_secs(30),
        )?
        .stdout
        .trim()
        .to_string();
        ramfs.file(
            &format!("/lib/modules/{m}.ko"),
            module_bytes(Path::new(&path))?,
            0o644,
        );
    }
    let busybox = which("busybox").context("busybox")?;
    ramfs.file("/bin/busybox", read(&busybox)?, 0o755);
    for tool in GUEST_TOOLS {
        if Path::new(tool).exists() {
            ramfs.executable_with_libs(Path::new(tool), tool)?;
        } else {
            eprintln!("rdma-guest: {tool} not on the host; the guest runs without it");
        }
    }
    ramfs.file(
        "/etc/libibverbs.d/rxe.driver",
        read(Path::new("/etc/libibverbs.d/rxe.driver"))
            .context("the rxe provider (apt-get install ibverbs-providers)")?,
        0o644,
    );
    let provider = std::fs::read_dir("/usr/lib/x86_64-linux-gnu/libibverbs")
        .context("the libibverbs providers directory (apt-get install ibverbs-providers)")?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("librxe-rdmav"))
        })
        .context("librxe-rdmav*.so (apt-get install ibverbs-providers)")?;
    ramfs.executable_with_libs(&provider, &provider.to_string_lossy())?;
    for b in binaries {
        let stripped = work.join(guest_name(b));
        strip_into(b, &stripped)?;
        ramfs.executable_with_libs_from(&stripped, b, &format!("/bin/{}", guest_name(b)))?;
    }
    ramfs.file("/guest-script.sh", script.as_bytes().to_vec(), 0o755);
    ramfs.file("/init", init_script().into_bytes(), 0o755);
    let initrd = work.join("initrd.cpio");
    std::fs::write(&initrd, ramfs.finish()).context("writing the initramfs")?;

    eprintln!(
        "==> booting {} under TCG ({} MiB, limit {timeout_secs} s)",
        kernel.display(),
        mem_mb
    );
    let log = work.join("console.log");
    let log_file = std::fs::File::create(&log)?;
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-smp", "2", "-m", &mem_mb.to_string()])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-device", "virtio-rng-pci"])
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    let started = Instant::now();
    let mut proc = Proc::spawn(&mut qemu, Io::Inherit)?;
    let waited = proc.wait(Duration::from_secs(timeout_secs));
    let console =
        String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).replace('\r', "");
    let exit = console
        .lines()
        .filter_map(|l| l.split("GUEST-EXIT=").nth(1))
        .filter_map(|v| v.trim().parse::<i32>().ok())
        .next_back();
    eprintln!("---- guest console ----");
    for line in console.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!("{line}");
    }
    eprintln!(
        "---- guest ended after {:.0} s ----",
        started.elapsed().as_secs_f64()
    );
    if keep {
        eprintln!("rdma-guest: work directory kept at {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    waited.context("the QEMU guest")?;
    let exit = exit.context("the guest script did not finish (timeout, panic or boot failure)")?;
    Ok(GuestRun { console, exit })
}

fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
for m in {mods}; do insmod /lib/modules/$m.ko || echo "insmod $m failed"; done
ip link set lo up
ip link add d0 type dummy; ip addr add 10.7.0.1/24 dev d0; ip link set d0 up
rdma link add rxe0 type rxe netdev d0 || echo "rdma link add failed"
ulimit -l unlimited
export PATH=/bin:/usr/bin HOME=/tmp
cd /tmp
sh /guest-script.sh; echo "GUEST-EXIT=$?"
poweroff -f
"#,
        mods = MODULES.join(" ")
    )
}

fn host_kernel() -> Result<PathBuf> {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .context("reading /boot")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    kernels
        .pop()
        .context("no kernel in /boot: apt-get install linux-image-amd64")
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn read(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

/// A module file, decompressed if the distribution compresses them.
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some(("xz", vec!["-dc"]))
    } else if name.ends_with(".zst") {
        Some(("zstd", vec!["-qdc"]))
    } else {
        None
    };
    match tool {
        None => read(path),
        Some((tool, args)) => {
            let out = Command::new(tool)
                .args(args)
                .arg(path)
                .output()
                .with_context(|| format!("{tool} {name}"))?;
            if !out.status.success() {
                bail!("{tool} failed on {name}");
            }
            Ok(out.stdout)
        }
    }
}

/// Copies `src` to `dst` without debug information (test binaries are mostly DWARF, and the
/// initramfs lives in guest memory).
fn strip_into(src: &Path, dst: &Path) -> Result<()> {
    if which("strip").is_some() {
        let ok = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(dst)
            .arg(src)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
    }
    std::fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
    Ok(())
}

/// The shared libraries `exe` loads, per `ldd`.
fn shared_libs(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .with_context(|| format!("ldd {}", exe.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .filter(|w| w.starts_with('/') && w.contains(".so"))
        .map(PathBuf::from)
        .collect())
}

/// An initramfs in the `newc` cpio format (uncompressed: the kernel takes it as it is).
#[derive(Default)]
struct Initramfs {
    out: Vec<u8>,
    inode: u32,
    paths: BTreeSet<String>,
}

impl Initramfs {
    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.inode += 1;
        let name = path.trim_start_matches('/');
        let mut h = String::from("070701");
        for field in [
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ] {
            let _ = write!(h, "{field:08x}");
        }
        self.out.extend_from_slice(h.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn dir(&mut self, path: &str) {
        let mut at = String::new();
        for part in path.trim_start_matches('/').split('/') {
            at.push('/');
            at.push_str(part);
            if self.paths.insert(at.clone()) {
                let p = at.clone();
                self.entry(&p, 0o040755, &[]);
            }
        }
    }

    fn file(&mut self, path: &str, data: Vec<u8>, perm: u32) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            if !parent.is_empty() {
                self.dir(parent);
            }
        }
        if self.paths.insert(path.to_string()) {
            self.entry(path, 0o100000 | perm, &data);
        }
    }

    /// Adds the host file `exe` at `dest` with the libraries it loads, at their host paths.
    fn executable_with_libs(&mut self, exe: &Path, dest: &str) -> Result<()> {
        self.executable_with_libs_from(exe, exe, dest)
    }

    /// Adds `content` at `dest`, with the libraries that `exe` loads.
    fn executable_with_libs_from(&mut self, content: &Path, exe: &Path, dest: &str) -> Result<()> {
        self.file(dest, read(content)?, 0o755);
        for lib in shared_libs(exe)? {
            let dest = lib.to_string_lossy().into_owned();
            if !self.paths.contains(&dest) {
                // `read` follows symlinks: the guest gets the real file under the linked name.
                self.file(&dest, read(&lib)?, 0o755);
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// `(binary, exit code, cargo's result line)` of each test binary the guest ran.
fn test_results(console: &str) -> Vec<(String, i32, String)> {
    let mut results = Vec::new();
    let mut summary = String::new();
    for line in console.lines() {
        if line.starts_with("test result:") {
            summary = line.trim().to_string();
        }
        if let Some(rest) = line.strip_prefix("DWCP-TEST-END ") {
            let mut it = rest.split(" rc=");
            let name = it.next().unwrap_or_default().to_string();
            let rc = it.next().and_then(|r| r.trim().parse().ok()).unwrap_or(-1);
            results.push((name, rc, std::mem::take(&mut summary)));
        }
    }
    results
}

/// `ib_write_bw`'s average bandwidth in MB/s (perftest's MB: 2^20 bytes), one per client run.
fn ib_write_bw_averages(console: &str) -> Vec<f64> {
    console
        .split("IBWRITEBW-BEGIN")
        .skip(1)
        .filter_map(|block| {
            let mut lines = block.split("IBWRITEBW-END").next()?.lines();
            lines.find(|l| l.contains("BW average"))?;
            // The first line of numbers after the header: bytes, iterations, peak, average, rate.
            lines
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|f| f.len() >= 4 && f[0].parse::<u64>().is_ok())
                .and_then(|f| f[3].parse().ok())
        })
        .collect()
}

/// The dwcp benchmark's results: `(connections, MB/s)`, MB = 2^20 bytes, in run order.
fn dwcp_goodputs(console: &str) -> Vec<(u64, f64)> {
    console
        .lines()
        .filter_map(|l| l.split("DWCP-RDMA-BENCH ").nth(1))
        .filter_map(|j| serde_json::from_str::<serde_json::Value>(j.trim()).ok())
        .filter(|v| v["transport"] == "rdma")
        .filter_map(|v| Some((v["connections"].as_u64()?, v["mib_per_s"].as_f64()?)))
        .collect()
}

fn report_bench(console: &str) -> Result<()> {
    let ib = ib_write_bw_averages(console);
    let dwcp = dwcp_goodputs(console);
    let single: Vec<f64> = dwcp
        .iter()
        .filter(|(c, _)| *c == 1)
        .map(|(_, g)| *g)
        .collect();
    let ib_median = upper_median(&ib)
        .context("no ib_write_bw result in the guest output (see the console above)")?;
    let dwcp_median = upper_median(&single)
        .context("no dwcp RDMA benchmark result in the guest output (see the console above)")?;
    eprintln!(
        "\nRDMA goodput in one Soft-RoCE guest, {BENCH_MSG}-byte messages, MB = 2^20 bytes (rounds interleaved):"
    );
    for (i, (a, b)) in ib.iter().zip(&single).enumerate() {
        eprintln!(
            "  round {}: ib_write_bw {a:7.1} MB/s   dwcp (1 connection) {b:7.1} MB/s   ratio {:.2}",
            i + 1,
            b / a
        );
    }
    for (c, g) in dwcp.iter().filter(|(c, _)| *c != 1) {
        eprintln!("  dwcp ({c} connections) {g:7.1} MB/s");
    }
    // Each dwcp round runs right after its ib_write_bw round: the per-round ratio cancels the load
    // of the (shared) host drifting between rounds, the ratio of the medians does not.
    let round_ratios: Vec<f64> = ib.iter().zip(&single).map(|(a, b)| b / a).collect();
    let paired = upper_median(&round_ratios).unwrap_or(0.0);
    let ratio = dwcp_median / ib_median;
    let verdict = |r: f64| if r >= TARGET_RATIO { "met" } else { "MISSED" };
    eprintln!(
        "  median: ib_write_bw {ib_median:.1} MB/s, dwcp {dwcp_median:.1} MB/s: {ratio:.2} x ({})",
        verdict(ratio)
    );
    eprintln!(
        "  median of the per-round ratios: {paired:.2} x ({}); target: dwcp >= {TARGET_RATIO} x ib_write_bw",
        verdict(paired)
    );
    let json = serde_json::json!({
        "message_bytes": BENCH_MSG,
        "ib_write_bw_mib_per_s": ib,
        "dwcp_single_connection_mib_per_s": single,
        "dwcp_all": dwcp.iter().map(|(c, g)| serde_json::json!({"connections": c, "mib_per_s": g})).collect::<Vec<_>>(),
        "ratio_of_medians": ratio,
        "round_ratios": round_ratios,
        "median_round_ratio": paired,
        "target_ratio": TARGET_RATIO,
    });
    println!("{json}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ib_write_bw_and_dwcp_lines() {
        let console = "IBWRITEBW-BEGIN\n---\n #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]\n 1048576    400              52.31              50.12 \t\t   0.000050\n---\nIBWRITEBW-END\nDWCP-RDMA-BENCH {\"transport\":\"rdma\",\"connections\":1,\"mib_per_s\":45.5}\n";
        assert_eq!(ib_write_bw_averages(console), vec![50.12]);
        assert_eq!(dwcp_goodputs(console), vec![(1, 45.5)]);
    }

    #[test]
    fn newc_archive_is_well_formed() {
        let mut r = Initramfs::default();
        r.file("/bin/x", b"abc".to_vec(), 0o755);
        let out = r.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        for name in ["bin\0", "bin/x\0", "abc", "TRAILER!!!\0"] {
            assert!(text.contains(name), "{name:?}");
        }
    }

    #[test]
    fn reads_test_results() {
        let console =
            "DWCP-TEST-START t\ntest result: ok. 3 passed; 0 failed\nDWCP-TEST-END t rc=0\n";
        assert_eq!(
            test_results(console),
            vec![("t".into(), 0, "test result: ok. 3 passed; 0 failed".into())]
        );
    }
}
