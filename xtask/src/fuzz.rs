//! `cargo xtask fuzz`: builds the libFuzzer targets of `fuzz/` and runs each for a fixed time,
//! seeded from the committed corpus (`fuzz/corpus/<target>/`), failing on any crash.
//!
//! The targets are built directly, with the flags `cargo fuzz` would pass (SanitizerCoverage with
//! inline 8-bit counters, PC table and compare tracing, `--cfg fuzzing`, AddressSanitizer), plus
//! debug assertions, on the stable toolchain with `RUSTC_BOOTSTRAP=1` (for `-Zsanitizer`): nothing
//! beyond rustup's stable toolchain and a C++ compiler (libfuzzer-sys builds libFuzzer) is needed.
//! `--target <host>` keeps build scripts and proc macros uninstrumented.
//!
//! New inputs go to a working corpus under `fuzz/target/fuzz-corpus/<target>/` (kept between runs);
//! the committed corpus is only read. A crash, leak, timeout or out-of-memory input is copied into
//! `fuzz/corpus/<target>/`, so that once fixed it is replayed by `cargo test` forever.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::Workspace;
use crate::process::{Io, Proc, run};

/// Options of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub struct FuzzOpts {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Only these targets (repeatable); default: every target of `fuzz/Cargo.toml`.
    #[arg(long = "target")]
    targets: Vec<String>,
    /// Targets run at once.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
}

const RUSTFLAGS: &str = "-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Zsanitizer=address \
    -Cdebug-assertions";

/// What one target's run did.
#[derive(Debug, Default)]
struct Outcome {
    target: String,
    execs: Option<u64>,
    execs_per_sec: Option<u64>,
    cov: Option<u64>,
    ft: Option<u64>,
    corpus: Option<u64>,
    crashes: Vec<PathBuf>,
    failure: Option<String>,
}

/// The `[[bin]]` names of `fuzz/Cargo.toml`.
fn all_targets(manifest: &Path) -> Result<Vec<String>> {
    let text =
        fs::read_to_string(manifest).with_context(|| format!("reading {}", manifest.display()))?;
    let mut targets = Vec::new();
    let mut in_bin = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(name) = line.strip_prefix("name = ") {
            targets.push(name.trim_matches('"').to_string());
        }
    }
    Ok(targets)
}

fn host_triple() -> Result<String> {
    let out = run(
        Command::new("rustc").arg("-vV"),
        Io::Capture,
        Duration::from_secs(60),
    )?;
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .context("no host triple in `rustc -vV`")
}

/// The number after `key` in `text` (last occurrence).
fn number_after(text: &str, key: &str) -> Option<u64> {
    let at = text.rfind(key)? + key.len();
    let digits: String = text[at..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Runs `cargo xtask fuzz`.
pub fn fuzz(ws: &Workspace, opts: &FuzzOpts) -> Result<()> {
    let dir = ws.root.join("fuzz");
    let manifest = dir.join("Cargo.toml");
    let known = all_targets(&manifest)?;
    let targets = if opts.targets.is_empty() {
        known.clone()
    } else {
        for t in &opts.targets {
            if !known.contains(t) {
                bail!("no fuzz target {t} (targets: {})", known.join(", "));
            }
        }
        opts.targets.clone()
    };
    let host = host_triple()?;
    let mut build = ws.cargo();
    build
        .args(["build", "--release", "--manifest-path"])
        .arg(&manifest)
        .args(["--target", &host])
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTFLAGS", RUSTFLAGS)
        .env_remove("CARGO_TARGET_DIR");
    for t in &targets {
        build.args(["--bin", t]);
    }
    eprintln!("\n==> building {} fuzz target(s)", targets.len());
    run(&mut build, Io::Inherit, crate::CARGO_TIMEOUT)?;
    let bin_dir = dir.join("target").join(&host).join("release");
    let mut outcomes = Vec::new();
    for group in targets.chunks(opts.jobs.max(1)) {
        let mut running = Vec::new();
        for t in group {
            running.push((t.clone(), start(&dir, &bin_dir, t, opts.seconds)?));
        }
        for (t, mut proc) in running {
            outcomes.push(finish(&dir, &t, &mut proc, opts.seconds));
        }
    }
    report(&outcomes, opts.seconds);
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            if !o.crashes.is_empty() {
                let files: Vec<String> =
                    o.crashes.iter().map(|p| p.display().to_string()).collect();
                Some(format!("{} crashed: {}", o.target, files.join(", ")))
            } else {
                o.failure.as_ref().map(|f| format!("{}: {f}", o.target))
            }
        })
        .collect();
    if !failed.is_empty() {
        bail!("fuzzing failed:\n  {}", failed.join("\n  "));
    }
    eprintln!("\nfuzz: {} target(s), no crash", outcomes.len());
    Ok(())
}

fn paths(dir: &Path, target: &str) -> (PathBuf, PathBuf, PathBuf) {
    let work = dir.join("target");
    (
        work.join("fuzz-corpus").join(target),
        work.join("fuzz-artifacts").join(target),
        work.join("fuzz-logs").join(format!("{target}.log")),
    )
}

fn start(dir: &Path, bin_dir: &Path, target: &str, seconds: u64) -> Result<Proc> {
    let (corpus, artifacts, log) = paths(dir, target);
    let seeds = dir.join("corpus").join(target);
    if !seeds.is_dir() {
        bail!("the seed corpus {} is missing", seeds.display());
    }
    let _ = fs::remove_dir_all(&artifacts);
    for d in [&corpus, &artifacts, &log.parent().unwrap().to_path_buf()] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(bin_dir.join(target));
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus)
        .arg(&seeds)
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out));
    eprintln!(
        "==> fuzzing {target} for {seconds} s (log: {})",
        log.display()
    );
    Proc::spawn(&mut cmd, Io::Inherit)
}

fn finish(dir: &Path, target: &str, proc: &mut Proc, seconds: u64) -> Outcome {
    let (_, artifacts, log) = paths(dir, target);
    let mut o = Outcome {
        target: target.to_string(),
        ..Outcome::default()
    };
    // Loading the corpus and the final merge come on top of the fuzzing time.
    let status = proc.wait(Duration::from_secs(seconds + 600));
    let text = fs::read_to_string(&log).unwrap_or_default();
    o.execs = number_after(&text, "stat::number_of_executed_units:");
    o.execs_per_sec = number_after(&text, "stat::average_exec_per_sec:");
    o.cov = number_after(&text, "cov: ");
    o.ft = number_after(&text, "ft: ");
    o.corpus = number_after(&text, "corp: ");
    let committed = dir.join("corpus").join(target);
    if let Ok(entries) = fs::read_dir(&artifacts) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if ["crash-", "leak-", "timeout-", "oom-"]
                .iter()
                .any(|p| name.starts_with(p))
            {
                let to = committed.join(&name);
                match fs::copy(e.path(), &to) {
                    Ok(_) => o.crashes.push(to),
                    Err(_) => o.crashes.push(e.path()),
                }
            }
        }
    }
    match status {
        Ok(f) if f.status.success() => {}
        Ok(f) => {
            o.failure = Some(format!(
                "exited with {}; see {}{}",
                f.status,
                log.display(),
                crate::process::tail("log", &text)
            ))
        }
        Err(e) => o.failure = Some(format!("{e:#}")),
    }
    o
}

fn report(outcomes: &[Outcome], seconds: u64) {
    let n = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
    eprintln!("\n| target | seconds | executions | exec/s | cov | ft | corpus | crashes |");
    eprintln!("|---|---|---|---|---|---|---|---|");
    for o in outcomes {
        eprintln!(
            "| {} | {seconds} | {} | {} | {} | {} | {} | {} |",
            o.target,
            n(o.execs),
            n(o.execs_per_sec),
            n(o.cov),
            n(o.ft),
            n(o.corpus),
            o.crashes.len()
        );
    }
}
