//! DWCP development automation, run as `cargo xtask <command>`:
//!
//! - `ci`: `cargo fmt --check`, `cargo clippy -D warnings` and `cargo test` over the workspace, in that
//!   order, stopping at the first failure.
//! - `bench hde|e2e [--quick] [--strict] [--headline-only]`: the Criterion benchmarks of
//!   `dwcp-benches`; `e2e` also measures the headline figures against their targets (iperf3 loopback, the
//!   `dwcp` binary's demo and memory-mapped image runs), prints them as a table and writes them to
//!   `target/xtask/bench-e2e.json`. `--quick` shrinks sizes and repetitions, `--strict` fails when a target
//!   is missed, `--headline-only` skips Criterion's e2e run.
//! - `bench all [--quick]`: the seed's suite — every component's benchmark and the end-to-end
//!   datacenter, internet, hybrid and 1/10/100-VM cases, with CPU and peak memory, next to the
//!   seed's figures, in `target/xtask/bench-all.{json,md}` (`suite.rs`).
//!
//! - `wan up|down|check` and `bench wan --profile P`: the WAN test bed (`dwcp-wanem`, see `wan.rs` and
//!   `docs/wan-testbed.md`); these need root.
//! - `bench amst`: loopback goodput of 1..16 streams next to `iperf3 -P` (`amst.rs`).
//! - `bench qemu`: QEMU's own migration direct and through dwcp, loopback and WAN (`qemu.rs`);
//!   `--baseline PATH` runs every dwcp configuration again with another `dwcp` build, interleaved,
//!   for an A/B comparison on the same noisy machine.
//! - `pba record|train|eval|simulate`, `bench pba` and `bench fleet`: PBA's link traces, its learned
//!   predictor's weights, every predictor's error on every trace, the fleet simulation, and many
//!   real migrations at once (`pba.rs`, `docs/pba.md`).
//! - `fuzz --seconds N [--target NAME]... [--jobs J]`: builds the libFuzzer targets of `fuzz/` and runs
//!   each for N seconds from the committed corpus, failing on a crash (`fuzz.rs`, `docs/fuzzing.md`).
//! - `rdma-guest` and `bench rdma`: the RDMA tests and benchmark inside a Soft-RoCE QEMU guest
//!   (`rdma.rs`, `docs/rdma.md`).
//! - `compat [--against REV]`: this tree's `dwcp` against a release build of an earlier commit (by
//!   default the one before the last protocol version bump), `send` and `recv` in both directions
//!   on loopback (`compat.rs`).
//!
//! Every child process runs under a time limit and is killed, with whatever it started, when the xtask
//! fails or gives up waiting.

mod amst;
mod cluster;
mod compat;
mod fuzz;
mod hde;
mod headline;
mod pba;
mod plot;
mod postcopy;
mod process;
mod qemu;
mod rdma;
mod security;
mod suite;
mod wan;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use process::{Io, run};

/// Limit of one cargo invocation (builds of the whole workspace on a small machine included).
const CARGO_TIMEOUT: Duration = Duration::from_secs(45 * 60);

#[derive(Debug, Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "DWCP development automation"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Format check, clippy with warnings denied, and the test suite, failing fast.
    Ci,
    /// Runs benchmarks; `e2e` also prints the headline table against its targets.
    Bench {
        /// Which benchmarks.
        which: Which,
        /// Smaller sizes and one repetition (and Criterion's --quick).
        #[arg(long)]
        quick: bool,
        /// Fail when a headline target is missed (by default only a failed measurement fails).
        #[arg(long)]
        strict: bool,
        /// With `e2e`/`all`: skip the Criterion e2e benchmark and only measure the headline table.
        #[arg(long)]
        headline_only: bool,
        /// With `amst`/`qemu`/`security`: interleaved rounds of every configuration; the verdicts compare
        /// medians (default 3, and 7 for `qemu` on loopback; 1 with `--quick`).
        #[arg(long)]
        rounds: Option<usize>,
        /// With `qemu`: only the configurations whose name contains this text (e.g. "multifd 2");
        /// with `all`: `components` or `e2e`, one half of the suite.
        #[arg(long)]
        only: Option<String>,
        /// With `qemu`, `amst` and `wan`: also run every dwcp configuration with this other `dwcp`
        /// binary (e.g. a build of an earlier commit), interleaved, as rows named "baseline ...",
        /// for an A/B comparison on the same noisy machine; the verdicts ignore these rows.
        #[arg(long)]
        baseline: Option<std::path::PathBuf>,
        /// With `e2e`, `amst` and `wan`: also draw SVG figures of the dwcp runs (throughput per pass,
        /// predicted vs measured bandwidth, streams over time) to target/xtask/plots/.
        #[arg(long)]
        plot: bool,
        /// With `wan`: the link and the dwcp runs.
        #[command(flatten)]
        wan: wan::BenchWanOpts,
    },
    /// The WAN test bed: emulated link between network namespaces (needs root).
    Wan {
        #[command(subcommand)]
        cmd: wan::WanCmd,
    },
    /// Builds the RDMA tests and benchmarks and runs them inside a Soft-RoCE QEMU guest.
    RdmaGuest(rdma::RdmaGuestOpts),
    /// PBA's link traces and learned predictor: `record` (needs root) and `train`.
    Pba {
        #[command(subcommand)]
        cmd: pba::PbaCmd,
    },
    /// Builds the libFuzzer targets of `fuzz/` and runs each for `--seconds`, failing on a crash.
    Fuzz(fuzz::FuzzOpts),
    /// Migrates between this tree's `dwcp` and an earlier commit's (protocol N against N−1), both
    /// ways, over loopback; builds the earlier one in release in a worktree under target/.
    Compat(compat::CompatOpts),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    /// Page encoder/decoder throughput.
    Hde,
    /// End-to-end migration, plus the headline table.
    E2e,
    /// The seed's suite: every component bench and the end-to-end cases (`suite.rs`).
    All,
    /// iperf3 and dwcp across the emulated WAN link (`--profile`; needs root).
    Wan,
    /// Loopback goodput of 1..16 streams next to `iperf3 -P` with the same counts.
    Amst,
    /// QEMU's own migration, direct and carried through dwcp.
    Qemu,
    /// dwcp over RDMA next to `ib_write_bw`, inside a Soft-RoCE guest.
    Rdma,
    /// PBA: every predictor's error on every trace, and predictions per second.
    Pba,
    /// Many real migrations at once on loopback (1, 10, 100), then the simulation of 1 to 1000.
    Fleet,
    /// The cluster side: registry commits (raft and etcd), handoff latency, placement, gossip.
    Cluster,
    /// Encrypted vs plain text, and a migration beside 200 hostile connections.
    Security,
    /// Post-copy's page-fault service latency on loopback, TLS and plain text.
    Postcopy,
}

/// Where the workspace is and where cargo puts its output.
#[derive(Debug)]
pub struct Workspace {
    /// The workspace root.
    pub root: PathBuf,
    /// cargo's target directory.
    pub target: PathBuf,
}

impl Workspace {
    fn locate() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("the xtask crate has no parent directory")?
            .to_path_buf();
        let out = run(
            cargo(&root).args(["metadata", "--format-version", "1", "--no-deps"]),
            Io::Capture,
            Duration::from_secs(120),
        )?;
        let meta: serde_json::Value =
            serde_json::from_str(&out.stdout).context("parsing `cargo metadata`")?;
        let target = meta["target_directory"]
            .as_str()
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        Ok(Self { root, target })
    }

    /// A `cargo` command run in the workspace root.
    pub fn cargo(&self) -> Command {
        cargo(&self.root)
    }
}

fn cargo(root: &Path) -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root);
    c
}

fn step(ws: &Workspace, args: &[&str]) -> Result<()> {
    let mut cmd = ws.cargo();
    cmd.args(args);
    eprintln!("\n==> cargo {}", args.join(" "));
    run(&mut cmd, Io::Inherit, CARGO_TIMEOUT)?;
    Ok(())
}

fn ci(ws: &Workspace) -> Result<()> {
    step(ws, &["fmt", "--all", "--", "--check"])?;
    step(
        ws,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    step(ws, &["test", "--workspace"])?;
    eprintln!("\nci: all steps passed");
    Ok(())
}

pub(crate) fn criterion(ws: &Workspace, bench: &str, quick: bool) -> Result<()> {
    let mut args = vec!["bench", "-p", "dwcp-benches", "--bench", bench];
    if quick {
        args.extend(["--", "--quick"]);
    }
    step(ws, &args)
}

fn bench(ws: &Workspace, quick: bool, strict: bool, headline_only: bool) -> Result<()> {
    // Before spending minutes on anything else.
    headline::require_iperf3()?;
    if !headline_only {
        criterion(ws, "e2e", quick)?;
    }
    let all_met = headline::measure(ws, quick)?;
    if strict && !all_met {
        bail!("some headline targets were missed (--strict)");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Bench { plot: true, .. } = &cli.command {
        plot::request();
    }
    let result = Workspace::locate().and_then(|ws| match cli.command {
        Cmd::Ci => ci(&ws),
        Cmd::Bench {
            which,
            quick,
            strict,
            headline_only,
            wan,
            rounds,
            only,
            baseline,
            ..
        } => match which {
            Which::Wan => wan::bench(&ws, &wan, quick, strict, baseline),
            Which::Amst => amst::bench(&ws, quick, rounds, baseline),
            Which::Qemu => qemu::bench(&ws, &wan, quick, rounds, only.as_deref(), baseline),
            Which::Rdma => rdma::bench(&ws, quick),
            Which::Hde => hde::bench(&ws, quick),
            Which::Pba => pba::bench(&ws, quick),
            Which::Fleet => pba::bench_fleet(&ws, quick),
            Which::Cluster => cluster::bench(&ws, quick),
            Which::Security => security::bench(&ws, quick, rounds),
            Which::Postcopy => postcopy::bench(&ws, quick, rounds),
            Which::All => suite::bench(&ws, quick, &wan.link, only.as_deref()),
            Which::E2e => bench(&ws, quick, strict, headline_only),
        },
        Cmd::Wan { cmd } => wan::wan(&ws, cmd),
        Cmd::RdmaGuest(opts) => rdma::guest(&ws, &opts),
        Cmd::Pba { cmd } => pba::pba(&ws, cmd),
        Cmd::Fuzz(opts) => fuzz::fuzz(&ws, &opts),
        Cmd::Compat(opts) => compat::compat(&ws, &opts),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
