//! Live-migrates rust-vmm guest memory to another process, as a VMM built on `vm-memory` would.
//!
//! ```text
//! cargo run --release -p dwcp --features vm-memory --example vm_memory -- \
//!     [--size 1G] [--dirty-rate 32] [--timeout-s 300]
//! ```
//!
//! The source builds a `GuestMemoryMmap<AtomicBitmap>` of `--size` bytes in two regions with a
//! hole between them (the low half at 0, the high half at 4 GiB, like a PC's RAM around its PCI
//! hole), fills it like a booted guest, and starts a workload thread that keeps writing to it
//! through vm-memory's API (`write_obj`, `write_slice`) at `--dirty-rate` MiB/s, so that
//! vm-memory's dirty bitmaps feed the migration's dirty log. It then re-executes itself as the
//! destination (`--role dest --listen 127.0.0.1:0`), which receives into its own fresh
//! `GuestMemoryMmap`, and migrates the running guest there over TLS 1.3 keyed by a fresh
//! pre-shared key (handed to the destination on its standard input, never on a command line).
//! Both processes print a digest of the whole guest memory and their report; the example exits
//! non-zero if the migration fails or the digests differ.
//!
//! `dwcp/tests/vm_memory.rs` includes this file and runs [`run_source`] with a 1 GiB guest: the
//! destination is then that test binary re-executed, which hands a command line starting with
//! `--role` to [`run`] as this program's `main` does.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dwcp::vm_memory::{VmDirtyLog, VmMemorySink, VmMemorySource};
use dwcp::{Error, Listener, Migration, MigrationConfig, MigrationReport, ReceiverConfig};
use dwcp_core::digest::memory_digest;
use dwcp_core::handshake::Psk;
use dwcp_core::memory::{MemorySink, MemorySource, PAGE_SIZE, VmControl};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the high region starts: above a 4 GiB boundary, as on a PC.
const HIGH_BASE: u64 = 4 << 30;
/// The low region never reaches into the hole below [`HIGH_BASE`].
const LOW_MAX: u64 = 3 << 30;
/// Pages the workload prefers (a guest's working set): three writes in four land here.
const HOT_PAGES: u64 = 4096;

/// The command line.
#[derive(Debug, Clone)]
pub struct Args {
    /// `--role dest`: this process is the destination (the source starts it).
    pub role_dest: bool,
    /// `--size`: guest memory in bytes.
    pub size: u64,
    /// `--dirty-rate`: MiB/s of pages the workload dirties.
    pub dirty_mib_s: u64,
    /// `--listen` (destination): where to listen; port 0 picks one.
    pub listen: SocketAddr,
    /// `--timeout-s`: how long either process may take at most.
    pub timeout: Duration,
}

fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// Parses the command line (without the program name).
pub fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut args = Args {
        role_dest: false,
        size: 1 << 30,
        dirty_mib_s: 32,
        listen: "127.0.0.1:0".parse().expect("a literal address"),
        timeout: Duration::from_secs(300),
    };
    let mut it = argv.iter().cloned();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--role" => match value()?.as_str() {
                "source" => args.role_dest = false,
                "dest" => args.role_dest = true,
                other => return Err(format!("--role {other}: source or dest")),
            },
            "--size" => {
                let v = value()?;
                args.size = parse_size(&v).ok_or(format!("--size {v}: e.g. 1G, 256M"))?;
            }
            "--dirty-rate" => {
                let v = value()?;
                args.dirty_mib_s = v.parse().map_err(|_| format!("--dirty-rate {v}: MiB/s"))?;
            }
            "--listen" => {
                let v = value()?;
                args.listen = v.parse().map_err(|_| format!("--listen {v}: HOST:PORT"))?;
            }
            "--timeout-s" => {
                let v = value()?;
                let s: u64 = v.parse().map_err(|_| format!("--timeout-s {v}: seconds"))?;
                args.timeout = Duration::from_secs(s.max(1));
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let page = PAGE_SIZE as u64;
    if args.size < 2 * page || args.size % page != 0 {
        return Err(format!(
            "--size {}: at least two pages and a multiple of {PAGE_SIZE}",
            args.size
        ));
    }
    Ok(args)
}

/// The guest's RAM: the low half (at most 3 GiB) at 0, the rest at 4 GiB.
fn guest_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let page = PAGE_SIZE as u64;
    let low = (size / 2 / page * page).min(LOW_MAX);
    vec![
        (GuestAddress(0), low as usize),
        (GuestAddress(HIGH_BASE), (size - low) as usize),
    ]
}

/// The digest both sides of a migration compare: xxh3-128 of every page, folded in segments.
fn digest(pages: u64, page_digest: &(dyn Fn(u64) -> u128 + Sync)) -> u128 {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    memory_digest(pages, threads, page_digest)
}

/// The source's guest memory, as the migration reads it.
type Guest = VmMemorySource<GuestMemoryMmap<AtomicBitmap>>;

/// A small fast pseudo-random generator for content and write addresses.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills the guest like a booted one: a quarter of the pages text-like, an eighth random, the rest
/// left zero. Written through vm-memory, before the migration's dirty log starts.
fn boot(guest: &Guest) {
    const WORDS: &[&[u8]] = &[
        b"kernel: ",
        b"systemd[1]: ",
        b"INFO ",
        b"GET /api/v1/items ",
        b"200 ",
        b"latency_ms=",
        b"{\"id\": ",
        b"true, ",
        b"null ",
        b"session opened\n",
    ];
    let mut rng = 0x00C0_FFEE_u64;
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..guest.layout().total_pages() {
        let kind = splitmix(&mut rng) % 8;
        if kind >= 3 {
            continue;
        }
        if kind == 0 {
            for word in page.chunks_mut(8) {
                word.copy_from_slice(&splitmix(&mut rng).to_le_bytes());
            }
        } else {
            let mut at = 0;
            while at < PAGE_SIZE {
                let w = WORDS[(splitmix(&mut rng) % WORDS.len() as u64) as usize];
                let n = w.len().min(PAGE_SIZE - at);
                page[at..at + n].copy_from_slice(&w[..n]);
                at += n;
            }
        }
        guest
            .memory()
            .write_slice(&page, guest.page_addr(p))
            .expect("the page lies in guest memory");
    }
}

#[derive(Debug, Default)]
struct RunState {
    /// The migration asked the guest to stop.
    pause_requested: bool,
    /// The workload has stopped writing and waits to resume.
    parked: bool,
    /// The workload ends (the VM was handed over, or the example is done).
    stop: bool,
    /// The workload thread has ended.
    exited: bool,
    /// Percent of the time the vCPUs are held back.
    throttle: u8,
}

#[derive(Debug, Default)]
struct Run {
    state: Mutex<RunState>,
    changed: Condvar,
    /// Writes made by the workload.
    writes: AtomicU64,
}

impl Run {
    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The guest's vCPUs: one thread writing guest memory through vm-memory at `rate` bytes/s (of
/// dirtied pages), three writes in four to a hot working set, until stopped or `deadline`.
fn start_workload(
    guest: Arc<Guest>,
    rate: u64,
    run: Arc<Run>,
    deadline: Instant,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        const TICK: Duration = Duration::from_millis(5);
        let per_tick = (rate as f64 / PAGE_SIZE as f64 * TICK.as_secs_f64()).max(1.0);
        let pages = guest.layout().total_pages();
        let mut rng = 0x5EED_u64;
        let mut owed = 0.0f64;
        let mut counter = 0u64;
        let mut next_tick = Instant::now();
        loop {
            let throttle = {
                let mut s = run.lock();
                if s.pause_requested && !s.stop {
                    s.parked = true;
                    run.changed.notify_all();
                    while s.pause_requested && !s.stop && Instant::now() < deadline {
                        s = run
                            .changed
                            .wait_timeout(s, Duration::from_millis(50))
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    s.parked = false;
                    next_tick = Instant::now();
                }
                if s.stop || Instant::now() >= deadline {
                    s.exited = true;
                    run.changed.notify_all();
                    return;
                }
                s.throttle
            };
            owed += per_tick * f64::from(100 - throttle.min(100)) / 100.0;
            while owed >= 1.0 {
                owed -= 1.0;
                let r = splitmix(&mut rng);
                let page = if r % 4 == 0 {
                    (r >> 8) % pages
                } else {
                    (r >> 8) % HOT_PAGES.min(pages)
                };
                let base = guest.page_addr(page);
                counter += 1;
                let result = if r & 0x10 == 0 {
                    // A counter somewhere in the page.
                    let at = ((r >> 40) % (PAGE_SIZE as u64 / 8)) * 8;
                    guest.memory().write_obj(counter, GuestAddress(base.0 + at))
                } else {
                    // A short record at the start of the page.
                    let mut rec = [0u8; 256];
                    for (i, b) in rec.iter_mut().enumerate() {
                        *b = (counter as u8).wrapping_add(i as u8);
                    }
                    guest.memory().write_slice(&rec, base)
                };
                result.expect("the page lies in guest memory");
                run.writes.fetch_add(1, Ordering::Relaxed);
            }
            next_tick += TICK;
            let now = Instant::now();
            if next_tick > now {
                std::thread::sleep(next_tick - now);
            } else {
                next_tick = now;
            }
        }
    })
}

/// The hypervisor hooks of the example's guest: pause waits until the workload has really stopped
/// writing, so that the final pass and the digest see quiescent memory.
#[derive(Debug)]
struct WorkloadControl {
    run: Arc<Run>,
}

impl VmControl for WorkloadControl {
    fn pause(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = self.run.lock();
        s.pause_requested = true;
        self.run.changed.notify_all();
        while !s.parked && !s.exited {
            let now = Instant::now();
            if now >= deadline {
                s.pause_requested = false;
                return Err(Error::VmControl(
                    "the workload did not stop within 10 s".into(),
                ));
            }
            s = self
                .run
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    fn resume(&mut self) {
        self.run.lock().pause_requested = false;
        self.run.changed.notify_all();
    }

    fn handed_over(&mut self) {
        // The destination runs the VM now: the source's vCPUs never run again.
        self.run.lock().stop = true;
        self.run.changed.notify_all();
    }

    fn throttle(&mut self, percent: u8) -> Result<bool, Error> {
        self.run.lock().throttle = percent.min(100);
        Ok(true)
    }
}

/// Lines the destination prints, read on a thread so that waiting for them has a deadline.
fn lines_of(stdout: ChildStdout) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The next destination line starting with `prefix`, echoing every line; `None` once the
/// destination closed its output or `deadline` passed.
fn expect_line(lines: &Receiver<String>, prefix: &str, deadline: Instant) -> Option<String> {
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match lines.recv_timeout(left) {
            Ok(line) => {
                println!("{line}");
                if let Some(rest) = line.strip_prefix(prefix) {
                    return Some(rest.trim().to_string());
                }
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
        }
    }
}

/// Waits for the destination process to end, killing it at `deadline`.
fn reap(child: &mut Child, deadline: Instant) -> bool {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

fn print_report(size: u64, r: &MigrationReport, wall: Duration) {
    println!(
        "source: {} MiB in {:.1} ms ({:.2} GB/s logical; wall {:.2} s with boot and digests), \
         downtime {:.1} ms (digest {:.1} ms), {} passes, stop: {}, wire {} bytes, {:?}, digest match {}",
        size >> 20,
        r.total_ms,
        r.logical_throughput_bps / 1e9,
        wall.as_secs_f64(),
        r.downtime_ms,
        r.digest_ms,
        r.iterations,
        r.stop_reason,
        r.wire_bytes,
        r.security,
        r.digest_match,
    );
    for p in &r.passes {
        println!(
            "source:   pass {}: {} pages, {} wire bytes, {:.1} ms, dirtied {}",
            p.iteration, p.pages, p.wire_bytes, p.duration_ms, p.dirtied_pages
        );
    }
}

/// What the source side of a run ended with.
#[derive(Debug)]
pub struct SourceOutcome {
    /// The migration's report.
    pub report: MigrationReport,
    /// Digest of the source's guest memory after the migration, in hex.
    pub source_digest: String,
    /// The digest the destination process printed, if it did.
    pub dest_digest: Option<String>,
    /// The destination process ended successfully.
    pub dest_ok: bool,
    /// Writes the workload made through vm-memory.
    pub writes: u64,
}

impl SourceOutcome {
    /// Both processes hold the same memory, and the migration's own digests agree with them.
    pub fn matches(&self) -> bool {
        self.dest_ok
            && self.report.digest_match
            && self.report.digest == self.source_digest
            && self.dest_digest.as_deref() == Some(self.source_digest.as_str())
    }
}

/// The source: builds and boots the guest, starts the destination process and its workload,
/// migrates, and compares digests.
pub fn run_source(args: &Args) -> Result<SourceOutcome, String> {
    let started = Instant::now();
    let deadline = started + args.timeout;
    let memory = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&guest_ranges(args.size))
        .map_err(|e| format!("allocating guest memory: {e}"))?;
    let mut dirty = VmDirtyLog::new(&memory).map_err(|e| e.to_string())?;
    let source = Arc::new(VmMemorySource::new(memory).map_err(|e| e.to_string())?);
    boot(&source);

    // The destination: this program again, in its own process.
    let exe = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
    let mut child = Command::new(exe)
        .args(["--role", "dest", "--listen", "127.0.0.1:0", "--size"])
        .arg(args.size.to_string())
        .arg("--timeout-s")
        .arg(args.timeout.as_secs().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the destination process: {e}"))?;
    // A fresh key as `dwcp keygen` writes it (hex text, used as the key bytes); the pipe closes
    // when `stdin` is dropped, after the line.
    let key_hex = Psk::generate().to_hex();
    let key = Psk::new(key_hex.clone().into_bytes()).expect("64 hex digits are a strong key");
    let handed_key = child
        .stdin
        .take()
        .is_some_and(|mut stdin| writeln!(stdin, "{key_hex}").is_ok());
    let lines = lines_of(child.stdout.take().expect("stdout is piped"));
    let listening = handed_key
        .then(|| expect_line(&lines, "dest: listening ", deadline))
        .flatten()
        .and_then(|a| a.parse::<SocketAddr>().ok());
    let Some(addr) = listening else {
        reap(&mut child, Instant::now());
        return Err("the destination did not start listening".into());
    };

    let run = Arc::new(Run::default());
    let workload = start_workload(
        Arc::clone(&source),
        args.dirty_mib_s << 20,
        Arc::clone(&run),
        deadline,
    );
    let mut control = WorkloadControl {
        run: Arc::clone(&run),
    };
    let result = Migration::new(addr, key)
        .config(MigrationConfig::default())
        .run(&*source, &mut dirty, &mut control);
    // Handed over (the workload stopped) or failed (the guest was resumed): end it either way.
    {
        let mut s = run.lock();
        s.stop = true;
        run.changed.notify_all();
    }
    workload.join().map_err(|_| "the workload panicked")?;
    let writes = run.writes.load(Ordering::Relaxed);
    let source_digest = format!(
        "{:032x}",
        digest(source.layout().total_pages(), &|p| source.page_digest(p))
    );
    println!("source: workload made {writes} writes through vm-memory");
    println!("source: digest {source_digest}");

    let dest_digest = expect_line(&lines, "dest: digest ", deadline);
    let dest_ok = reap(&mut child, deadline);
    // The destination's remaining lines (its report); its output closed when it ended.
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(1)) {
        println!("{line}");
    }
    let report = match result {
        Ok(r) => r,
        Err(e) => return Err(format!("migration failed: {e}")),
    };
    print_report(args.size, &report, started.elapsed());
    let outcome = SourceOutcome {
        report,
        source_digest,
        dest_digest,
        dest_ok,
        writes,
    };
    println!(
        "{}: source digest {}, destination digest {}, destination process {}",
        if outcome.matches() {
            "MATCH"
        } else {
            "MISMATCH"
        },
        outcome.source_digest,
        outcome.dest_digest.as_deref().unwrap_or("(none)"),
        if outcome.dest_ok { "ok" } else { "failed" },
    );
    Ok(outcome)
}

/// The destination: receives one migration into fresh guest memory and prints its digest.
pub fn run_dest(args: &Args) -> Result<bool, String> {
    // Bounded: the destination never outlives the source's deadline, even if the source vanished.
    let limit = args.timeout;
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("dest: no migration completed within {} s", limit.as_secs());
        std::process::exit(2);
    });
    let mut key = String::new();
    std::io::stdin()
        .read_line(&mut key)
        .map_err(|e| format!("reading the key: {e}"))?;
    let psk = Psk::new(key.trim().as_bytes().to_vec()).map_err(|e| format!("the key: {e}"))?;
    // A VMM creates the destination VM's memory from its configuration: the same regions as the
    // source's, freshly mapped (so zero pages the source sends need not be written at all).
    let memory = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&guest_ranges(args.size))
        .map_err(|e| format!("allocating guest memory: {e}"))?;
    let sink = VmMemorySink::fresh_anonymous(memory).map_err(|e| e.to_string())?;
    let listener = Listener::bind(args.listen, psk, ReceiverConfig::default())
        .map_err(|e| format!("listening on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("dest: listening {addr}");
    let _ = std::io::stdout().flush();
    let incoming = listener.accept().map_err(|e| format!("accepting: {e}"))?;
    let received = incoming.receive_into(&sink);
    let pages = sink.layout().total_pages();
    println!(
        "dest: digest {:032x}",
        digest(pages, &|p| sink.page_digest(p))
    );
    let r = received.map_err(|e| format!("receiving: {e}"))?;
    println!(
        "dest: received {} pages in {:.1} ms over {} streams, {} wire bytes, {:?}, digest match {}",
        r.pages_applied, r.total_ms, r.streams, r.wire_bytes, r.security, r.digest_match
    );
    Ok(r.digest_match)
}

/// Runs either role with `argv` (the command line without the program name).
pub fn run(argv: &[String]) -> ExitCode {
    let args = match parse_args(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vm_memory: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = if args.role_dest {
        run_dest(&args)
    } else {
        run_source(&args).map(|o| o.matches())
    };
    let _ = std::io::stdout().flush();
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            let role = if args.role_dest { "dest" } else { "source" };
            eprintln!("vm_memory ({role}): {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    run(&std::env::args().skip(1).collect::<Vec<_>>())
}
