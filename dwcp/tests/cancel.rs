//! Cancel at every phase of a real loopback migration (TLS, the default), from the source through
//! `Migration::cancel_handle` and from the destination through `Incoming::cancel_handle`. Before
//! the point of no return every test checks that the source guest runs, that no page it did not
//! write changed, that the destination did not take the VM over and dropped the session, and that
//! the same guest then migrates to a fresh listener. After it, a cancel changes nothing.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use dwcp::{Listener, Migration, MigrationConfig, Progress, ReceiveReport};
use dwcp_core::memory::{
    DirtyLog, GuestRam, MemoryLayout, MemorySink, MemorySource, PAGE_SIZE, VmControl,
};
use dwcp_core::sim::{ContentMix, SimControl, SimDirtyLog, SimulatedGuest};
use dwcp_core::{Error, ErrorCode, HandoverDecision};

const KEY: u8 = 7;

/// A guest whose memory at the start is known, and every page it wrote since.
struct Tracked {
    g: Arc<SimulatedGuest>,
    initial: Vec<u8>,
    written: Arc<Mutex<BTreeSet<u64>>>,
}

impl Tracked {
    /// A 16 MiB guest that writes `rate` bytes per second from now on.
    fn new(seed: u64, rate: u64) -> Self {
        let g = guest(16 << 20, ContentMix::IDLE_GUEST, seed);
        let pages = g.layout().total_pages() as usize;
        let mut initial = vec![0u8; pages * PAGE_SIZE];
        for (p, page) in initial.chunks_mut(PAGE_SIZE).enumerate() {
            g.read_page(p as u64, page);
        }
        // Every write from here on sets its dirty bit: nothing the guest writes goes unseen.
        g.start_workload(rate, seed);
        Self {
            g,
            initial,
            written: Arc::default(),
        }
    }

    /// The guest's dirty log, remembering what it reports (and what starting it clears).
    fn dirty_log(&self) -> Witness {
        Witness {
            inner: self.g.dirty_log(),
            written: Arc::clone(&self.written),
        }
    }

    /// The guest runs, and every page it did not write is as it was at the start.
    fn assert_kept(&self, what: &str) {
        assert!(
            guest_keeps_running(&self.g),
            "{what}: the source guest does not run"
        );
        // Paused while checked, so that no write slips in between the last dirty bits and the
        // comparison.
        let mut control = self.g.control();
        control.pause().unwrap();
        let mut rest = Vec::new();
        self.g.dirty_log().take_dirty(&mut rest);
        let written = {
            let mut w = self.written.lock().unwrap();
            w.extend(rest);
            w.clone()
        };
        let mut page = vec![0u8; PAGE_SIZE];
        let changed: Vec<u64> = (0..self.g.layout().total_pages())
            .filter(|p| !written.contains(p))
            .filter(|&p| {
                self.g.read_page(p, &mut page);
                let at = p as usize * PAGE_SIZE;
                page[..] != self.initial[at..at + PAGE_SIZE]
            })
            .collect();
        control.resume();
        assert!(
            changed.is_empty(),
            "{what}: pages the guest never wrote changed: {changed:?}"
        );
    }

    /// The same guest migrates to a fresh listener, bit-exact.
    fn retry(&self, what: &str) {
        let (addr, dest) = spawn_dest(Hook::None);
        let report = Migration::new(addr, common::psk(KEY))
            .config(source_config())
            .run(&*self.g, &mut self.dirty_log(), &mut self.g.control())
            .unwrap_or_else(|e| panic!("{what}: the retry failed: {e}"));
        let (received, ram, running) = dest.join().unwrap();
        let received = received.unwrap_or_else(|e| panic!("{what}: the retry's destination: {e}"));
        assert_eq!(report.digest, received.digest, "{what}");
        assert_same_memory(&*self.g, &ram.unwrap());
        assert_eq!(running, 0, "{what}");
    }
}

struct Witness {
    inner: SimDirtyLog,
    written: Arc<Mutex<BTreeSet<u64>>>,
}

impl DirtyLog for Witness {
    fn start(&mut self) {
        // What starting the log clears was written too.
        let mut cleared = Vec::new();
        self.inner.take_dirty(&mut cleared);
        self.written.lock().unwrap().extend(cleared);
    }
    fn take_dirty(&mut self, out: &mut Vec<u64>) {
        let from = out.len();
        self.inner.take_dirty(out);
        self.written.lock().unwrap().extend(&out[from..]);
    }
}

/// The guest's control, recording what the migration asked of it, and setting a cancel flag from
/// inside the handover's callbacks.
struct Vm {
    inner: SimControl,
    calls: Arc<Mutex<Vec<&'static str>>>,
    cancel_on_record: Option<Arc<AtomicBool>>,
    cancel_on_handed_over: Option<Arc<AtomicBool>>,
}

impl Vm {
    fn new(g: &SimulatedGuest) -> Self {
        Self {
            inner: g.control(),
            calls: Arc::default(),
            cancel_on_record: None,
            cancel_on_handed_over: None,
        }
    }
    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }
}

impl VmControl for Vm {
    fn pause(&mut self) -> Result<(), Error> {
        self.calls.lock().unwrap().push("pause");
        self.inner.pause()
    }
    fn resume(&mut self) {
        self.calls.lock().unwrap().push("resume");
        self.inner.resume()
    }
    fn handed_over(&mut self) {
        self.calls.lock().unwrap().push("handed_over");
        if let Some(c) = &self.cancel_on_handed_over {
            c.store(true, Ordering::Relaxed);
        }
        self.inner.handed_over()
    }
    fn record_handover(&mut self) -> HandoverDecision {
        self.calls.lock().unwrap().push("record_handover");
        if let Some(c) = &self.cancel_on_record {
            c.store(true, Ordering::Relaxed);
        }
        HandoverDecision::Recorded
    }
}

/// When the destination's operator cancels.
#[derive(Clone, Copy)]
enum Hook {
    None,
    /// After this many pages were written into the sink.
    CancelAfterWrites(u64),
    /// When the sink is flushed (after the source's commit).
    CancelOnFlush,
}

struct HookedSink {
    ram: GuestRam,
    writes: AtomicU64,
    hook: Hook,
    cancel: Arc<AtomicBool>,
}

impl MemorySink for HookedSink {
    fn layout(&self) -> &MemoryLayout {
        self.ram.layout()
    }
    fn write_page(&self, page: u64, data: &[u8]) {
        let n = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
        if matches!(self.hook, Hook::CancelAfterWrites(at) if n == at) {
            self.cancel.store(true, Ordering::Relaxed);
        }
        MemorySink::write_page(&self.ram, page, data)
    }
    fn read_page(&self, page: u64, out: &mut [u8]) {
        self.ram.copy_out(page, out)
    }
    fn flush(&self) -> Result<(), Error> {
        if matches!(self.hook, Hook::CancelOnFlush) {
            self.cancel.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The destination's result, its memory, and the sessions still running on its listener after.
type DestEnd = (Result<ReceiveReport, Error>, Option<GuestRam>, usize);

/// A fresh listener receiving one migration into fresh memory, in a thread.
fn spawn_dest(hook: Hook) -> (SocketAddr, JoinHandle<DestEnd>) {
    let listener = Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        common::psk(KEY),
        receiver_config(),
    )
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let incoming = match listener.accept() {
            Ok(i) => i,
            Err(e) => return (Err(e), None, listener.running_sessions()),
        };
        let sink = HookedSink {
            ram: GuestRam::anonymous(incoming.layout().clone()).unwrap(),
            writes: AtomicU64::new(0),
            hook,
            cancel: incoming.cancel_handle(),
        };
        let r = incoming.receive_into(&sink);
        (r, Some(sink.ram), listener.running_sessions())
    });
    (addr, t)
}

/// The destination dropped the session without taking the VM over, told by the source why.
fn assert_dest_discarded(end: DestEnd, what: &str) {
    let (r, _, running) = end;
    assert!(
        matches!(
            r,
            Err(Error::Peer {
                code: ErrorCode::Cancelled,
                ..
            })
        ),
        "{what}: the destination {r:?}"
    );
    assert_eq!(running, 0, "{what}: the session still runs");
}

/// The guest was handed over: it writes nothing any more.
fn assert_stays_stopped(g: &SimulatedGuest) {
    let before = g.pages_written();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.pages_written(), before, "the source guest runs again");
}

/// A configuration under which only the cancel ends pre-copy (no limit is met, no stall seen).
fn endless() -> MigrationConfig {
    MigrationConfig {
        max_iterations: 1_000_000,
        stall_passes: u32::MAX,
        downtime_limit: Duration::ZERO,
        ..source_config()
    }
}

/// Runs a migration of `t` to `addr` whose cancel flag `when` sets from the progress callback,
/// returning its result, the passes its progress showed and whether it showed the guest paused.
fn run_cancelled_by_progress(
    t: &Tracked,
    addr: SocketAddr,
    config: MigrationConfig,
    vm: &mut Vm,
    when: fn(&Progress) -> bool,
) -> (Result<dwcp::MigrationReport, Error>, u32, bool) {
    let m = Migration::new(addr, common::psk(KEY)).config(config);
    let cancel = m.cancel_handle();
    let (last_pass, paused) = (AtomicU32::new(0), AtomicBool::new(false));
    let progress = |p: &Progress| {
        last_pass.fetch_max(p.iteration, Ordering::Relaxed);
        paused.fetch_or(p.paused, Ordering::Relaxed);
        if when(p) {
            cancel.store(true, Ordering::Relaxed);
        }
    };
    let r = m.on_progress(&progress).run(&*t.g, &mut t.dirty_log(), vm);
    (
        r,
        last_pass.load(Ordering::Relaxed),
        paused.load(Ordering::Relaxed),
    )
}

#[test]
fn cancel_before_connecting_opens_no_connection() {
    let t = Tracked::new(1, 8 << 20);
    // A bare socket: any connection the source made would be waiting in its queue.
    let bare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    bare.set_nonblocking(true).unwrap();
    let m = Migration::new(bare.local_addr().unwrap(), common::psk(KEY)).config(source_config());
    m.cancel_handle().store(true, Ordering::Relaxed);
    let mut vm = Vm::new(&t.g);
    let err = m.run(&*t.g, &mut t.dirty_log(), &mut vm).unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        bare.accept().is_err(),
        "the cancelled migration connected to the destination"
    );
    assert!(vm.calls().is_empty(), "{:?}", vm.calls());
    t.assert_kept("before connecting");
    t.retry("before connecting");
}

#[test]
fn cancel_while_the_destination_is_silent_in_the_handshake() {
    let t = Tracked::new(2, 8 << 20);
    // Accepts connections and never answers: the handshake would wait for `connect_timeout`.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let holder = std::thread::spawn(move || silent.accept().map(|(c, _)| c));
    let m = Migration::new(addr, common::psk(KEY)).config(source_config());
    let cancel = m.cancel_handle();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        cancel.store(true, Ordering::Relaxed);
    });
    let started = Instant::now();
    let err = m
        .run(&*t.g, &mut t.dirty_log(), &mut t.g.control())
        .unwrap_err();
    let took = started.elapsed();
    canceller.join().unwrap();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert!(
        took < Duration::from_secs(2),
        "the cancel waited for the handshake's timeout: {took:?}"
    );
    let conn = holder.join().unwrap();
    assert!(
        conn.is_ok(),
        "the source had connected when it was cancelled"
    );
    t.assert_kept("handshake");
    t.retry("handshake");
}

#[test]
fn cancel_while_the_destination_takes_the_session_sends_no_page() {
    // The destination has read SessionInit; the cancel comes before it answers SessionReady.
    let t = Tracked::new(10, 8 << 20);
    let listener = Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        common::psk(KEY),
        receiver_config(),
    )
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let m = Migration::new(addr, common::psk(KEY)).config(source_config());
    let cancel = m.cancel_handle();
    let dest = std::thread::spawn(move || {
        let incoming = listener.accept().unwrap();
        cancel.store(true, Ordering::Relaxed);
        let sink = HookedSink {
            ram: GuestRam::anonymous(incoming.layout().clone()).unwrap(),
            writes: AtomicU64::new(0),
            hook: Hook::None,
            cancel: incoming.cancel_handle(),
        };
        let r = incoming.receive_into(&sink);
        (
            r,
            sink.writes.load(Ordering::Relaxed),
            listener.running_sessions(),
        )
    });
    let mut vm = Vm::new(&t.g);
    let err = m.run(&*t.g, &mut t.dirty_log(), &mut vm).unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert!(vm.calls().is_empty(), "{:?}", vm.calls());
    let (received, writes, running) = dest.join().unwrap();
    assert!(
        matches!(
            received,
            Err(Error::Peer {
                code: ErrorCode::Cancelled,
                ..
            })
        ),
        "{received:?}"
    );
    assert_eq!(writes, 0, "pages were sent after the cancel");
    assert_eq!(running, 0);
    t.assert_kept("session start");
    t.retry("session start");
}

#[test]
fn cancel_during_pass_0() {
    let t = Tracked::new(3, 16 << 20);
    let (addr, dest) = spawn_dest(Hook::None);
    let mut vm = Vm::new(&t.g);
    let (r, last_pass, paused) = run_cancelled_by_progress(&t, addr, endless(), &mut vm, |p| {
        p.iteration == 0 && p.pass_pages_sent > 0
    });
    let err = r.unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert_eq!((last_pass, paused), (0, false), "cancelled in pass 0");
    assert!(vm.calls().is_empty(), "{:?}", vm.calls());
    assert_dest_discarded(dest.join().unwrap(), "pass 0");
    t.assert_kept("pass 0");
    t.retry("pass 0");
}

#[test]
fn cancel_during_a_later_pass_of_a_dirtying_guest() {
    let t = Tracked::new(4, 32 << 20);
    let (addr, dest) = spawn_dest(Hook::None);
    let mut vm = Vm::new(&t.g);
    let (r, last_pass, paused) =
        run_cancelled_by_progress(&t, addr, endless(), &mut vm, |p| p.iteration >= 2);
    let err = r.unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert!(
        last_pass >= 2 && !paused,
        "pass {last_pass}, paused {paused}"
    );
    assert!(vm.calls().is_empty(), "{:?}", vm.calls());
    assert!(
        !t.written.lock().unwrap().is_empty(),
        "the guest dirtied pages"
    );
    assert_dest_discarded(dest.join().unwrap(), "a later pass");
    t.assert_kept("a later pass");
    t.retry("a later pass");
}

#[test]
fn cancel_during_stop_and_copy_resumes_the_guest() {
    // Two pre-copy passes, then the pause: what the guest dirtied meanwhile is the final pass.
    let t = Tracked::new(5, 64 << 20);
    let (addr, dest) = spawn_dest(Hook::None);
    let config = MigrationConfig {
        max_iterations: 2,
        downtime_limit: Duration::ZERO,
        ..source_config()
    };
    let mut vm = Vm::new(&t.g);
    let (r, _, paused) = run_cancelled_by_progress(&t, addr, config, &mut vm, |p| p.paused);
    let err = r.unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert!(paused, "the final pass ran");
    assert_eq!(vm.calls(), ["pause", "resume"]);
    assert_dest_discarded(dest.join().unwrap(), "stop-and-copy");
    t.assert_kept("stop-and-copy");
    t.retry("stop-and-copy");
}

#[test]
fn cancel_once_the_handover_is_recorded_is_refused() {
    // The cancel comes while the new owner is being recorded: it is seen once the commit is out,
    // too late to resume here, and the migration completes.
    let t = Tracked::new(6, 8 << 20);
    let (addr, dest) = spawn_dest(Hook::None);
    let m = Migration::new(addr, common::psk(KEY)).config(source_config());
    let mut vm = Vm::new(&t.g);
    vm.cancel_on_record = Some(m.cancel_handle());
    let report = m.run(&*t.g, &mut t.dirty_log(), &mut vm).unwrap();
    assert_eq!(vm.calls(), ["pause", "record_handover", "handed_over"]);
    let (received, ram, _) = dest.join().unwrap();
    assert_eq!(received.unwrap().digest, report.digest);
    assert_same_memory(&*t.g, &ram.unwrap());
    assert_stays_stopped(&t.g);
}

#[test]
fn cancel_after_completion_changes_nothing() {
    let t = Tracked::new(7, 8 << 20);
    let (addr, dest) = spawn_dest(Hook::None);
    let m = Migration::new(addr, common::psk(KEY)).config(source_config());
    let cancel = m.cancel_handle();
    let mut vm = Vm::new(&t.g);
    vm.cancel_on_handed_over = Some(Arc::clone(&cancel));
    let report = m.run(&*t.g, &mut t.dirty_log(), &mut vm).unwrap();
    assert!(cancel.load(Ordering::Relaxed), "the cancel was set");
    cancel.store(true, Ordering::Relaxed);
    assert_eq!(vm.calls(), ["pause", "record_handover", "handed_over"]);
    let (received, ram, running) = dest.join().unwrap();
    assert_eq!(received.unwrap().digest, report.digest);
    assert_eq!(running, 0);
    assert_same_memory(&*t.g, &ram.unwrap());
    assert_stays_stopped(&t.g);
}

#[test]
fn destination_cancel_while_receiving_resumes_nothing_and_is_told_to_the_source() {
    let t = Tracked::new(8, 16 << 20);
    let (addr, dest) = spawn_dest(Hook::CancelAfterWrites(64));
    let mut vm = Vm::new(&t.g);
    let err = Migration::new(addr, common::psk(KEY))
        .config(endless())
        .run(&*t.g, &mut t.dirty_log(), &mut vm)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Peer {
                code: ErrorCode::Cancelled,
                ..
            }
        ),
        "{err}"
    );
    // The session looks at its cancel flag every 50 ms at least: the source may have paused by
    // then, and then it resumed.
    let calls = vm.calls();
    assert!(
        calls.is_empty() || calls == ["pause", "resume"],
        "{calls:?}"
    );
    let (received, _, running) = dest.join().unwrap();
    assert!(matches!(received, Err(Error::Cancelled)), "{received:?}");
    assert_eq!(running, 0, "the session still runs");
    t.assert_kept("destination cancel");
    t.retry("destination cancel");
}

#[test]
fn destination_cancel_after_the_commit_is_refused() {
    let t = Tracked::new(9, 8 << 20);
    let (addr, dest) = spawn_dest(Hook::CancelOnFlush);
    let mut vm = Vm::new(&t.g);
    let report = Migration::new(addr, common::psk(KEY))
        .config(source_config())
        .run(&*t.g, &mut t.dirty_log(), &mut vm)
        .unwrap();
    assert_eq!(vm.calls(), ["pause", "record_handover", "handed_over"]);
    let (received, ram, _) = dest.join().unwrap();
    assert_eq!(received.unwrap().digest, report.digest);
    assert_same_memory(&*t.g, &ram.unwrap());
}
