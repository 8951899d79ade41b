//! A simulated guest: memory filled like a real VM's, and a workload thread that keeps dirtying it at a
//! chosen rate, with a dirty log and pause/resume like a hypervisor's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rand::{Rng, RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::error::Error;
use crate::memory::{DirtyLog, GuestRam, MemoryLayout, MemorySource, PAGE_SIZE, VmControl};

/// Fractions of pages by content when the guest is created. They must sum to at most 1; the remainder
/// is zero pages.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ContentMix {
    /// Text-like pages (logs, configuration, code): compressible.
    pub text: f64,
    /// Random pages (encrypted or compressed data): incompressible.
    pub random: f64,
}

impl ContentMix {
    /// Like an idle booted Linux guest: about 88% zero, 8% text-like, 4% random.
    pub const IDLE_GUEST: Self = Self {
        text: 0.08,
        random: 0.04,
    };
    /// Incompressible memory: every page random.
    pub const RANDOM: Self = Self {
        text: 0.0,
        random: 1.0,
    };
    /// Untouched memory: every page zero.
    pub const ZERO: Self = Self {
        text: 0.0,
        random: 0.0,
    };

    fn validate(&self) -> Result<(), Error> {
        let ok = |f: f64| (0.0..=1.0).contains(&f);
        if ok(self.text) && ok(self.random) && self.text + self.random <= 1.0 + 1e-9 {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "content mix {self:?}: fractions must be in 0..=1 and sum to at most 1"
            )))
        }
    }
}

impl Default for ContentMix {
    fn default() -> Self {
        Self::IDLE_GUEST
    }
}

const WORDS: &[&str] = &[
    "kernel",
    "systemd",
    "INFO",
    "WARN",
    "connection",
    "accepted",
    "from",
    "user",
    "session",
    "opened",
    "closed",
    "GET",
    "/api/v1/items",
    "200",
    "latency_ms",
    "=",
    "{",
    "}",
    "\"id\":",
    "config",
    "value",
    "true",
    "false",
    "null",
    "fn",
    "return",
    "if",
    "else",
    "for",
    "while",
    "struct",
    "impl",
    "pub",
    "let",
    "mut",
    "0x7ffe",
];

/// Fills `buf` with text-like bytes (words, numbers, newlines).
pub fn fill_text(rng: &mut impl RngCore, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let r = rng.next_u32();
        let word: &[u8] = if r % 9 == 0 {
            let n = format!("{} ", (r >> 8) % 4096);
            let take = n.len().min(buf.len() - i);
            buf[i..i + take].copy_from_slice(&n.as_bytes()[..take]);
            i += take;
            continue;
        } else {
            WORDS[(r as usize >> 3) % WORDS.len()].as_bytes()
        };
        let take = word.len().min(buf.len() - i);
        buf[i..i + take].copy_from_slice(&word[..take]);
        i += take;
        if i < buf.len() {
            buf[i] = if r % 11 == 0 { b'\n' } else { b' ' };
            i += 1;
        }
    }
}

/// Parameters of a simulated guest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimulatedGuestConfig {
    /// Memory size in bytes (rounded up to whole pages).
    pub size_bytes: u64,
    /// Initial content.
    pub mix: ContentMix,
    /// Seed for reproducible content.
    pub seed: u64,
}

/// Dirty bits, one per page, set by the writer after each write and cleared by the reader.
#[derive(Debug)]
struct DirtyBitmap {
    words: Vec<AtomicU64>,
}

impl DirtyBitmap {
    fn new(pages: u64) -> Self {
        Self {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn mark(&self, page: u64) {
        // Release: whoever clears this bit and then copies the page sees at least this write.
        self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
    }

    fn take(&self, out: &mut Vec<u64>) {
        for (wi, w) in self.words.iter().enumerate() {
            if w.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = w.swap(0, Ordering::Acquire);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                out.push(wi as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
    }
}

#[derive(Debug, Default)]
struct RunState {
    paused: bool,
    stopped: bool,
}

#[derive(Debug)]
struct Shared {
    ram: GuestRam,
    dirty: DirtyBitmap,
    run: Mutex<RunState>,
    wake: Condvar,
    pages_written: AtomicU64,
    /// Percent of the time the vCPUs are held back ([`VmControl::throttle`]).
    throttle: AtomicU8,
}

/// An in-process guest for demos, tests and benchmarks.
#[derive(Debug)]
pub struct SimulatedGuest {
    shared: Arc<Shared>,
    workload: Mutex<Option<JoinHandle<()>>>,
}

impl SimulatedGuest {
    /// Allocates and fills the guest memory.
    pub fn new(config: SimulatedGuestConfig) -> Result<Arc<Self>, Error> {
        config.mix.validate()?;
        let layout = MemoryLayout::flat(config.size_bytes).map_err(Error::Config)?;
        let pages = layout.total_pages();
        // A running VM's RAM is populated; reading never-touched memory would instead fault on every page.
        let ram = GuestRam::anonymous_preallocated(layout)?;
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed);
        let mut page = vec![0u8; PAGE_SIZE];
        let text_cut = config.mix.text;
        let random_cut = config.mix.text + config.mix.random;
        for p in 0..pages {
            let x: f64 = rng.random();
            if x < text_cut {
                fill_text(&mut rng, &mut page);
            } else if x < random_cut {
                rng.fill_bytes(&mut page);
            } else {
                continue;
            }
            ram.copy_in(p, 0, &page);
        }
        Ok(Self::from_ram(ram))
    }

    /// A guest that runs on memory received from elsewhere (the destination of a migration).
    pub fn from_ram(ram: GuestRam) -> Arc<Self> {
        let pages = ram.layout().total_pages();
        Arc::new(Self {
            shared: Arc::new(Shared {
                ram,
                dirty: DirtyBitmap::new(pages),
                run: Mutex::new(RunState::default()),
                wake: Condvar::new(),
                pages_written: AtomicU64::new(0),
                throttle: AtomicU8::new(0),
            }),
            workload: Mutex::new(None),
        })
    }

    /// Starts a workload thread writing `bytes_per_sec` of guest memory per second (in 512-byte to
    /// whole-page writes at random pages), until the guest is handed over or dropped.
    pub fn start_workload(&self, bytes_per_sec: u64, seed: u64) {
        if bytes_per_sec == 0 {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let handle = std::thread::Builder::new()
            .name("sim-guest-workload".into())
            .spawn(move || workload(shared, bytes_per_sec, seed))
            .expect("spawning the workload thread");
        *self.workload.lock() = Some(handle);
    }

    /// Pages the workload has written so far.
    pub fn pages_written(&self) -> u64 {
        self.shared.pages_written.load(Ordering::Relaxed)
    }

    /// The guest's dirty log.
    pub fn dirty_log(&self) -> SimDirtyLog {
        SimDirtyLog {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Pause/resume control of the guest.
    pub fn control(&self) -> SimControl {
        SimControl {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The guest's memory.
    pub fn ram(&self) -> &GuestRam {
        &self.shared.ram
    }

    /// Stops the workload for good.
    pub fn stop(&self) {
        stop(&self.shared);
        if let Some(h) = self.workload.lock().take() {
            let _ = h.join();
        }
    }
}

impl Drop for SimulatedGuest {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stop(shared: &Shared) {
    shared.run.lock().stopped = true;
    shared.wake.notify_all();
}

fn workload(shared: Arc<Shared>, bytes_per_sec: u64, seed: u64) {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let pages = shared.ram.layout().total_pages();
    let mut buf = vec![0u8; PAGE_SIZE];
    // Bytes the workload may write now: it earns `bytes_per_sec` while its vCPUs run, less the
    // share a throttle holds back, and nothing while paused.
    let mut credit = 0.0f64;
    let mut clock = Instant::now();
    loop {
        {
            let mut run = shared.run.lock();
            if run.stopped {
                return;
            }
            if run.paused {
                shared.wake.wait(&mut run);
                credit = 0.0;
                clock = Instant::now();
                continue;
            }
            let now = Instant::now();
            let running = 1.0 - f64::from(shared.throttle.load(Ordering::Relaxed).min(100)) / 100.0;
            credit += now.duration_since(clock).as_secs_f64() * bytes_per_sec as f64 * running;
            clock = now;
            // Writes happen under the run lock, so `pause` returns only between writes.
            let mut budget_steps = 256;
            while credit > 0.0 && budget_steps > 0 {
                let page = rng.random_range(0..pages);
                let len = [512usize, 1024, 2048, PAGE_SIZE][rng.random_range(0..4)];
                let offset = rng.random_range(0..=(PAGE_SIZE - len) / 512) * 512;
                fill_text(&mut rng, &mut buf[..len]);
                shared.ram.copy_in(page, offset, &buf[..len]);
                // Always marked: `DirtyLog::start` clears the bits, and the release/acquire pair on them
                // makes a write made just before `start` visible to the first pass that reads the page.
                shared.dirty.mark(page);
                shared.pages_written.fetch_add(1, Ordering::Relaxed);
                credit -= len as f64;
                budget_steps -= 1;
            }
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

impl MemorySource for SimulatedGuest {
    fn layout(&self) -> &MemoryLayout {
        self.shared.ram.layout()
    }
    fn read_page(&self, page: u64, out: &mut [u8]) {
        self.shared.ram.copy_out(page, out);
    }
    fn append_page(&self, page: u64, out: &mut Vec<u8>) {
        self.shared.ram.append_to(page, out);
    }
    fn page_digest(&self, page: u64) -> u128 {
        self.shared.ram.digest_in_place(page)
    }
}

/// The simulated guest's dirty log.
#[derive(Debug)]
pub struct SimDirtyLog {
    shared: Arc<Shared>,
}

impl DirtyLog for SimDirtyLog {
    fn start(&mut self) {
        let mut discard = Vec::new();
        self.shared.dirty.take(&mut discard);
    }
    fn take_dirty(&mut self, out: &mut Vec<u64>) {
        self.shared.dirty.take(out);
    }
}

/// Pause/resume of the simulated guest.
#[derive(Debug)]
pub struct SimControl {
    shared: Arc<Shared>,
}

impl VmControl for SimControl {
    fn pause(&mut self) -> Result<(), Error> {
        self.shared.run.lock().paused = true;
        Ok(())
    }
    fn resume(&mut self) {
        self.shared.run.lock().paused = false;
        self.shared.wake.notify_all();
    }
    fn handed_over(&mut self) {
        stop(&self.shared);
    }
    fn throttle(&mut self, percent: u8) -> Result<bool, Error> {
        self.shared
            .throttle
            .store(percent.min(100), Ordering::Relaxed);
        Ok(true)
    }
}

impl SimulatedGuest {
    /// The throttle the migration set, percent (0: none).
    pub fn throttle_percent(&self) -> u8 {
        self.shared.throttle.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::is_zero_page;

    #[test]
    fn content_mix_is_respected() {
        let g = SimulatedGuest::new(SimulatedGuestConfig {
            size_bytes: 4 << 20,
            mix: ContentMix::IDLE_GUEST,
            seed: 1,
        })
        .unwrap();
        let mut buf = [0u8; PAGE_SIZE];
        let zero = (0..1024).filter(|&p| {
            g.read_page(p, &mut buf);
            is_zero_page(&buf)
        });
        let n = zero.count();
        assert!((820..=940).contains(&n), "{n} zero pages of 1024");
        assert!(
            SimulatedGuest::new(SimulatedGuestConfig {
                size_bytes: 4096,
                mix: ContentMix {
                    text: 0.7,
                    random: 0.7
                },
                seed: 0
            })
            .is_err()
        );
    }

    #[test]
    fn workload_dirties_pages_and_pause_stops_it() {
        let g = SimulatedGuest::new(SimulatedGuestConfig {
            size_bytes: 8 << 20,
            mix: ContentMix::ZERO,
            seed: 2,
        })
        .unwrap();
        let mut log = g.dirty_log();
        log.start();
        g.start_workload(64 << 20, 3);
        wait_for_writes(&g, 0);
        let mut ctl = g.control();
        ctl.pause().unwrap();
        let mut dirty = Vec::new();
        log.take_dirty(&mut dirty);
        assert!(!dirty.is_empty());
        // Every page that is no longer zero must have been reported.
        let mut buf = [0u8; PAGE_SIZE];
        for p in 0..g.layout().total_pages() {
            g.read_page(p, &mut buf);
            if !is_zero_page(&buf) {
                assert!(
                    dirty.binary_search(&p).is_ok(),
                    "page {p} written but not in the dirty log"
                );
            }
        }
        let before = g.pages_written();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(g.pages_written(), before, "a paused guest writes nothing");
        let mut again = Vec::new();
        log.take_dirty(&mut again);
        assert!(again.is_empty());
        ctl.resume();
        wait_for_writes(&g, before);
    }

    /// Waits (bounded) until the guest has written more than `than` pages.
    fn wait_for_writes(g: &SimulatedGuest, than: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while g.pages_written() <= than {
            assert!(
                std::time::Instant::now() < deadline,
                "the workload wrote nothing for 5 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
