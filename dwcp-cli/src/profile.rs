//! `--profile-out DIR`: CPU profiles of the running command (pprof-rs, sampled by SIGPROF), as a
//! flamegraph SVG and a pprof protobuf that `go tool pprof` / `pprof` reads. With
//! `--profile-every SECS` a long-running command (`dwcp node`, `dwcp recv`) writes one pair of files
//! per period, for continuous profiling in staging; without it, one pair when the command ends.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use pprof::protos::Message;

/// Profiling options, accepted by every command.
#[derive(Debug, Args)]
pub struct ProfileOpts {
    /// Write CPU profiles of this command into DIR: `profile-<unix ms>.svg` (flamegraph) and
    /// `profile-<unix ms>.pb` (pprof protobuf).
    #[arg(long, value_name = "DIR", global = true)]
    pub profile_out: Option<PathBuf>,
    /// With --profile-out: write a profile every SECS seconds (each covers its period) instead of
    /// one at the end.
    #[arg(long, value_name = "SECS", global = true, requires = "profile_out")]
    pub profile_every: Option<f64>,
    /// Samples per second of CPU time (99, like perf, by default: off the beat of periodic work).
    #[arg(long, value_name = "HZ", default_value_t = 99, global = true)]
    pub profile_frequency: i32,
}

/// A running profiler; [`Profiler::finish`] writes the last profile.
pub struct Profiler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<u32>>>,
}

impl Profiler {
    /// Starts profiling if `--profile-out` was given.
    pub fn start(opts: &ProfileOpts) -> anyhow::Result<Option<Self>> {
        let Some(dir) = opts.profile_out.clone() else {
            return Ok(None);
        };
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the profile directory {}", dir.display()))?;
        anyhow::ensure!(
            (1..=10_000).contains(&opts.profile_frequency),
            "--profile-frequency {} is not in 1..=10000",
            opts.profile_frequency
        );
        let period = match opts.profile_every {
            Some(s) if s.is_finite() && s >= 0.1 => Some(Duration::from_secs_f64(s)),
            Some(s) => anyhow::bail!("--profile-every {s} must be at least 0.1 seconds"),
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let frequency = opts.profile_frequency;
        let flag = Arc::clone(&stop);
        // The guard is made and dropped on this thread; SIGPROF samples every thread of the process.
        let thread = std::thread::Builder::new()
            .name("dwcp-profiler".into())
            .spawn(move || run(&dir, frequency, period, &flag))
            .context("starting the profiler thread")?;
        Ok(Some(Self {
            stop,
            thread: Some(thread),
        }))
    }

    /// Stops profiling and writes the last profile; returns how many profiles were written.
    pub fn finish(mut self) -> anyhow::Result<u32> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(written)) => written,
            Some(Err(_)) => anyhow::bail!("the profiler thread panicked"),
            None => Ok(0),
        }
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn run(
    dir: &Path,
    frequency: i32,
    period: Option<Duration>,
    stop: &AtomicBool,
) -> anyhow::Result<u32> {
    let mut written = 0;
    loop {
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(frequency)
            // Unwinding from a signal that interrupted the unwinder or the dynamic loader can
            // deadlock (pprof-rs's advice). libc stays in: its memcpy is where a migration spends
            // much of its time, and a profile without it (tried) came out empty.
            .blocklist(&["libgcc", "libpthread", "ld-linux", "vdso"])
            .build()
            .context("starting the CPU profiler")?;
        let started = Instant::now();
        while !stop.load(Ordering::Relaxed) && period.is_none_or(|p| started.elapsed() < p) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let report = guard.report().build().context("building the CPU profile")?;
        drop(guard);
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let svg = dir.join(format!("profile-{stamp}.svg"));
        // A period without a single sample (the short last one, or an idle process) has no
        // flamegraph to draw; writing one would leave an empty, invalid file behind.
        if report.data.is_empty() {
            tracing::debug!(svg = %svg.display(), "no CPU samples in this period; no profile written");
        } else {
            let mut image = Vec::new();
            report
                .flamegraph(&mut image)
                .with_context(|| format!("drawing {}", svg.display()))?;
            std::fs::write(&svg, image).with_context(|| format!("writing {}", svg.display()))?;
            write_pprof(&report, &dir.join(format!("profile-{stamp}.pb")))?;
            tracing::info!(svg = %svg.display(), "CPU profile written");
            written += 1;
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(written);
        }
    }
}

/// The pprof protobuf of `report` at `pb`.
fn write_pprof(report: &pprof::Report, pb: &Path) -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    report
        .pprof()
        .context("converting the profile to pprof")?
        .encode(&mut bytes)
        .context("encoding the pprof profile")?;
    std::fs::write(pb, bytes).with_context(|| format!("writing {}", pb.display()))
}
