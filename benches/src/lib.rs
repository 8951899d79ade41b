//! Shared helpers of the DWCP benchmarks: simulated guests and an in-process loopback migration.
//!
//! The benchmarks themselves live in `benches/`: `hde` (page encoder and decoder throughput) and `e2e`
//! (a whole migration over loopback TCP). Run them with `cargo bench -p dwcp-benches` or through
//! `cargo xtask bench hde|e2e|all`. The corpora of the `hde` suite are in [`corpus`].
#![deny(missing_docs)]

pub mod corpus;

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dwcp::{Listener, Migration, MigrationConfig, MigrationReport, ReceiveReport, ReceiverConfig};
use dwcp_core::handshake::Psk;
use dwcp_core::sim::{ContentMix, SimulatedGuest, SimulatedGuestConfig};
use dwcp_core::{Error, GuestRam};

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// Guest memory size used by the benchmarks.
pub const GUEST_BYTES: u64 = 256 * MIB;

/// The content mixes the benchmarks cover, with the names used in benchmark ids.
pub const MIXES: [(&str, ContentMix); 2] = [
    ("idle", ContentMix::IDLE_GUEST),
    ("random", ContentMix::RANDOM),
];

/// Seed of every benchmark guest, so that runs compare like with like.
pub const SEED: u64 = 0xD3C9_2025;

/// A simulated guest of `size_bytes` filled with `mix` (no workload running).
pub fn guest(size_bytes: u64, mix: ContentMix) -> Arc<SimulatedGuest> {
    SimulatedGuest::new(SimulatedGuestConfig {
        size_bytes,
        mix,
        seed: SEED,
    })
    .unwrap_or_else(|e| panic!("creating a {size_bytes}-byte simulated guest: {e}"))
}

/// What a loopback migration produced.
#[derive(Debug)]
pub struct Loopback {
    /// The source's report.
    pub source: MigrationReport,
    /// The destination's report.
    pub destination: ReceiveReport,
    /// Wall time from starting the migration to the destination's return (listener setup excluded).
    pub elapsed: Duration,
    /// The destination's copy of the memory; dropping it (unmapping) is left to the caller so that it can
    /// happen outside a timed region.
    pub destination_ram: GuestRam,
}

/// Migrates `guest` to a destination in a thread of this process, over TCP on 127.0.0.1, into anonymous
/// memory. The guest is reusable afterwards as long as no workload runs on it.
pub fn loopback_migration(
    guest: &SimulatedGuest,
    config: MigrationConfig,
) -> Result<Loopback, Error> {
    let psk = Psk::generate();
    let any: SocketAddr = "127.0.0.1:0".parse().expect("a valid socket address");
    let listener = Listener::bind(any, psk.clone(), ReceiverConfig::default())?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::Builder::new()
        .name("bench-destination".into())
        .spawn(move || -> Result<(ReceiveReport, GuestRam), Error> {
            let incoming = listener.accept()?;
            let ram = GuestRam::anonymous(incoming.layout().clone())?;
            let report = incoming.receive_into(&ram)?;
            Ok((report, ram))
        })
        .map_err(|e| Error::io("spawning the destination thread", e))?;
    let start = Instant::now();
    let source = Migration::new(addr, psk).config(config).run(
        guest,
        &mut guest.dirty_log(),
        &mut guest.control(),
    );
    if source.is_err() {
        // The source may have failed before connecting; wake the destination from `accept` so that it
        // fails too instead of waiting for ever.
        let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
    }
    let destination = receiver
        .join()
        .map_err(|_| Error::Protocol("the destination thread panicked".into()))?;
    let elapsed = start.elapsed();
    let source = source?;
    let (destination, destination_ram) = destination?;
    Ok(Loopback {
        source,
        destination,
        elapsed,
        destination_ram,
    })
}

/// Whose CPU time [`cpu_time`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuOf {
    /// Every thread of this process.
    ThisProcess,
    /// The child processes waited for so far.
    Children,
}

/// User plus system CPU time consumed so far. On a machine shared with other work, the CPU time of a
/// benchmark is a steadier measure than its wall time: it does not count time spent waiting for a
/// core.
pub fn cpu_time(of: CpuOf) -> Duration {
    let who = match of {
        CpuOf::ThisProcess => libc::RUSAGE_SELF,
        CpuOf::Children => libc::RUSAGE_CHILDREN,
    };
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid, writable rusage; getrusage only writes it.
    let rc = unsafe { libc::getrusage(who, usage.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage failed");
    // SAFETY: getrusage returned 0, so it initialised the whole struct (which was zeroed anyway).
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Criterion settings shared by the suites: short enough that `cargo xtask bench all` takes minutes.
/// `cargo bench --bench NAME -- --profile-time 10` profiles each benchmark instead of measuring it
/// and writes `flamegraph.svg` and `profile.pb` next to its report (see [`FlamegraphProfiler`]).
pub fn criterion_config() -> criterion::Criterion {
    criterion::Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .with_profiler(FlamegraphProfiler::new(PROFILE_HZ))
}

/// Samples per second of the benchmark profiler (as `dwcp --profile-out`).
pub const PROFILE_HZ: i32 = 99;

/// Criterion's profiler hook over pprof-rs: while criterion runs a benchmark under
/// `--profile-time`, CPU samples are taken; then `target/criterion/<id>/profile/flamegraph.svg`
/// and `profile.pb` (pprof protobuf) are written. The pprof crate's own criterion hook is built
/// for an older criterion, hence this one.
pub struct FlamegraphProfiler {
    frequency: i32,
    guard: Option<pprof::ProfilerGuard<'static>>,
}

impl std::fmt::Debug for FlamegraphProfiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlamegraphProfiler")
            .field("frequency", &self.frequency)
            .field("running", &self.guard.is_some())
            .finish()
    }
}

impl FlamegraphProfiler {
    /// A profiler sampling `frequency` times per second of CPU time.
    pub fn new(frequency: i32) -> Self {
        Self {
            frequency,
            guard: None,
        }
    }
}

impl criterion::profiler::Profiler for FlamegraphProfiler {
    fn start_profiling(&mut self, benchmark_id: &str, _benchmark_dir: &std::path::Path) {
        match pprof::ProfilerGuardBuilder::default()
            .frequency(self.frequency)
            .blocklist(&["libgcc", "libpthread", "ld-linux", "vdso"])
            .build()
        {
            Ok(g) => self.guard = Some(g),
            Err(e) => eprintln!("{benchmark_id}: the profiler did not start: {e}"),
        }
    }

    fn stop_profiling(&mut self, benchmark_id: &str, benchmark_dir: &std::path::Path) {
        use pprof::protos::Message;
        let Some(guard) = self.guard.take() else {
            return;
        };
        let written = (|| -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
            let report = guard.report().build()?;
            std::fs::create_dir_all(benchmark_dir)?;
            let svg = benchmark_dir.join("flamegraph.svg");
            report.flamegraph(std::fs::File::create(&svg)?)?;
            let mut bytes = Vec::new();
            report.pprof()?.encode(&mut bytes)?;
            std::fs::write(benchmark_dir.join("profile.pb"), bytes)?;
            Ok(svg)
        })();
        match written {
            Ok(svg) => eprintln!("{benchmark_id}: flamegraph {}", svg.display()),
            Err(e) => eprintln!("{benchmark_id}: writing the profile failed: {e}"),
        }
    }
}
