//! Post-copy over real loopback TLS streams into userfaultfd-armed memory, with a destination
//! guest that reads and writes while pages are still missing.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dwcp_core::Error;
use dwcp_core::handshake::Psk;
use dwcp_core::memory::{DirtyLog, MemorySink, MemorySource, PAGE_SIZE, VmControl};
use dwcp_core::sim::{ContentMix, SimulatedGuest, SimulatedGuestConfig};
use dwcp_postcopy::{PageSet, PostcopyConfig, PostcopyListener, PostcopyMemory, send};
use dwcp_tls::Security;
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};

fn security(key: u8) -> Security {
    Security::psk(Psk::new(vec![key; 32]).unwrap())
}

fn guest(mib: u64, seed: u64) -> Arc<SimulatedGuest> {
    SimulatedGuest::new(SimulatedGuestConfig {
        size_bytes: mib << 20,
        mix: ContentMix {
            text: 0.3,
            random: 0.4,
        },
        seed,
    })
    .unwrap()
}

/// A paused source guest, fresh destination memory, the whole memory as the post-copy set, and
/// a destination listener keyed by `key`.
fn paused_pair(
    mib: u64,
    seed: u64,
    key: u8,
    config: &PostcopyConfig,
) -> (
    Arc<SimulatedGuest>,
    Arc<PostcopyMemory>,
    PageSet,
    PostcopyListener,
) {
    let src = guest(mib, seed);
    src.control().pause().unwrap();
    let dst = Arc::new(PostcopyMemory::new(src.layout().clone()).unwrap());
    let set = PageSet::full(src.layout().total_pages());
    let listener = PostcopyListener::bind(
        "127.0.0.1:0".parse().unwrap(),
        security(key),
        config.clone(),
    )
    .unwrap();
    (src, dst, set, listener)
}

fn quick() -> PostcopyConfig {
    PostcopyConfig {
        recovery_timeout: Duration::from_secs(10),
        ..PostcopyConfig::default()
    }
}

/// One pre-copy pass done in-process while the source guest dirties memory fast, then the pause:
/// the destination holds a stale copy (zero pages left unwritten, as the engine leaves them in
/// fresh memory), and the set is every page dirtied since the pass began.
fn precopy_once_then_pause(src: &SimulatedGuest, dst: &PostcopyMemory) -> PageSet {
    let mut log = src.dirty_log();
    log.start();
    src.start_workload(256 << 20, 9);
    let mut buf = vec![0u8; PAGE_SIZE];
    for page in 0..src.layout().total_pages() {
        src.read_page(page, &mut buf);
        if !dwcp_core::memory::is_zero_page(&buf) {
            dst.write_page(page, &buf);
        }
    }
    src.control().pause().unwrap();
    let mut dirty = Vec::new();
    log.take_dirty(&mut dirty);
    let mut set = PageSet::new(src.layout().total_pages());
    for p in dirty {
        set.insert(p);
    }
    set
}

/// vCPU `vcpu` of `vcpus` of the destination's guest: reads random pages of its share (page
/// number modulo `vcpus`), checking each against the paused source, and writes a marker into some.
/// Returns the pages it wrote and how many touches it made.
fn run_destination_guest(
    src: &SimulatedGuest,
    dst: &PostcopyMemory,
    (vcpu, vcpus): (u64, u64),
    until: &AtomicBool,
) -> (Vec<u64>, u64) {
    let pages = dst.layout().total_pages();
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(vcpu);
    let (mut seen, mut want) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    let mut written = Vec::new();
    let mut touches = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !until.load(Ordering::Relaxed) && touches < 20_000 && Instant::now() < deadline {
        let page = rng.random_range(0..pages / vcpus) * vcpus + vcpu;
        touches += 1;
        if written.contains(&page) {
            continue;
        }
        dst.read_page(page, &mut seen);
        src.read_page(page, &mut want);
        assert!(
            seen == want,
            "the destination's guest read a wrong page {page}"
        );
        if touches % 8 == 0 {
            let mut marked = want.clone();
            marked[..8].copy_from_slice(&(page ^ 0xD5D5).to_le_bytes());
            dst.write_page(page, &marked);
            written.push(page);
        }
    }
    (written, touches)
}

fn assert_bit_exact(src: &SimulatedGuest, dst: &PostcopyMemory, written: &[u64]) {
    let (mut a, mut b) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    for page in 0..src.layout().total_pages() {
        src.read_page(page, &mut a);
        dst.read_page(page, &mut b);
        if written.contains(&page) {
            a[..8].copy_from_slice(&(page ^ 0xD5D5).to_le_bytes());
        }
        assert!(a == b, "page {page} differs after post-copy");
    }
}

#[test]
fn a_guest_dirtying_faster_than_any_link_moves_by_post_copy_bit_exact_while_the_destination_runs() {
    let src = guest(64, 1);
    let dst = Arc::new(PostcopyMemory::new(src.layout().clone()).unwrap());
    let set = precopy_once_then_pause(&src, &dst);
    assert!(set.len() > 100, "the workload dirtied {} pages", set.len());
    let listener =
        PostcopyListener::bind("127.0.0.1:0".parse().unwrap(), security(1), quick()).unwrap();
    let addr = listener.local_addr().unwrap();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let source = s.spawn(|| send(addr, &security(1), &*src, set.clone(), &quick()));
        let receiver = listener
            .accept(Arc::clone(&dst), Duration::from_secs(10))
            .unwrap();
        let guests: Vec<_> = (0..2)
            .map(|i| {
                let (src, dst, done) = (&src, &dst, &done);
                s.spawn(move || run_destination_guest(src, dst, (i, 2), done))
            })
            .collect();
        let report = receiver.wait().unwrap();
        done.store(true, Ordering::Relaxed);
        let written: Vec<u64> = guests
            .into_iter()
            .flat_map(|g| g.join().unwrap().0)
            .collect();
        let sent = source.join().unwrap().unwrap();
        assert_eq!(report.pages, set.len());
        assert_eq!(sent.pages, set.len());
        assert_eq!(report.connections, 1);
        assert_eq!(sent.faults, report.faults);
        assert_eq!(report.fault_latency.count, report.faults);
        assert_bit_exact(&src, &dst, &written);
    });
}

#[test]
fn pure_post_copy_serves_every_fault_of_fresh_memory() {
    let (src, dst, set, listener) = paused_pair(32, 2, 2, &quick());
    let addr = listener.local_addr().unwrap();
    std::thread::scope(|s| {
        let source = s.spawn(|| send(addr, &security(2), &*src, set.clone(), &quick()));
        let receiver = listener
            .accept(Arc::clone(&dst), Duration::from_secs(10))
            .unwrap();
        // The guest starts at once and touches 500 pages before most have been pushed.
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(3);
        let mut buf = vec![0u8; PAGE_SIZE];
        for _ in 0..500 {
            dst.read_page(rng.random_range(0..set.bound()), &mut buf);
        }
        let report = receiver.wait().unwrap();
        let sent = source.join().unwrap().unwrap();
        assert!(report.faults > 0, "the guest faulted on missing pages");
        assert_eq!(report.zero_fills, 0, "every page is in the set");
        assert_eq!(sent.served, report.faults);
        assert_bit_exact(&src, &dst, &[]);
    });
}

/// A TCP relay in front of the destination that cuts every connection through it once, after a
/// given number of bytes from the source, and afterwards either relays again or refuses.
struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    cut_done: Arc<AtomicBool>,
}

impl Relay {
    fn start(upstream: SocketAddr, cut_after: u64, refuse_after_cut: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let cut_done = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        {
            let (stop, cut_done) = (Arc::clone(&stop), Arc::clone(&cut_done));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((client, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    };
                    if refuse_after_cut && cut_done.load(Ordering::Relaxed) {
                        drop(client);
                        continue;
                    }
                    client.set_nonblocking(false).unwrap();
                    let server = TcpStream::connect(upstream).unwrap();
                    live.lock().push(client.try_clone().unwrap());
                    live.lock().push(server.try_clone().unwrap());
                    let pump = |mut from: TcpStream, mut to: TcpStream, count: bool| {
                        let (forwarded, cut_done, live) = (
                            Arc::clone(&forwarded),
                            Arc::clone(&cut_done),
                            Arc::clone(&live),
                        );
                        std::thread::spawn(move || {
                            let mut buf = vec![0u8; 64 << 10];
                            while let Ok(n) = from.read(&mut buf) {
                                if n == 0 || to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                                if count
                                    && forwarded.fetch_add(n as u64, Ordering::Relaxed) + n as u64
                                        > cut_after
                                    && !cut_done.swap(true, Ordering::Relaxed)
                                {
                                    for c in live.lock().drain(..) {
                                        let _ = c.shutdown(Shutdown::Both);
                                    }
                                }
                            }
                            let _ = to.shutdown(Shutdown::Both);
                            let _ = from.shutdown(Shutdown::Both);
                        });
                    };
                    pump(
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        true,
                    );
                    pump(server, client, false);
                }
            });
        }
        Self {
            addr,
            stop,
            cut_done,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_connection_lost_in_the_middle_is_recovered_and_the_memory_still_arrives_bit_exact() {
    let (src, dst, set, listener) = paused_pair(32, 4, 3, &quick());
    // Cut after about a third of the memory has gone through.
    let relay = Relay::start(listener.local_addr().unwrap(), 10 << 20, false);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let source = s.spawn(|| send(relay.addr, &security(3), &*src, set.clone(), &quick()));
        let receiver = listener
            .accept(Arc::clone(&dst), Duration::from_secs(10))
            .unwrap();
        let guest = s.spawn(|| run_destination_guest(&src, &dst, (0, 1), &done));
        let report = receiver.wait().unwrap();
        done.store(true, Ordering::Relaxed);
        let (written, _) = guest.join().unwrap();
        let sent = source.join().unwrap().unwrap();
        assert!(
            relay.cut_done.load(Ordering::Relaxed),
            "the relay cut the connection"
        );
        assert_eq!((report.connections, sent.connections), (2, 2));
        assert_eq!(report.pages, set.len());
        assert_bit_exact(&src, &dst, &written);
    });
}

#[test]
fn a_source_that_never_comes_back_fails_both_ends_and_missing_pages_stay_missing() {
    let short = PostcopyConfig {
        recovery_timeout: Duration::from_secs(1),
        ..PostcopyConfig::default()
    };
    let (src, dst, set, listener) = paused_pair(32, 5, 4, &short);
    let relay = Relay::start(listener.local_addr().unwrap(), 4 << 20, true);
    std::thread::scope(|s| {
        let source = s.spawn(|| send(relay.addr, &security(4), &*src, set.clone(), &short));
        let receiver = listener
            .accept(Arc::clone(&dst), Duration::from_secs(10))
            .unwrap();
        let err = receiver.wait().unwrap_err();
        assert!(matches!(err, Error::Timeout(_)), "{err}");
        assert!(err.to_string().contains("did not reconnect"), "{err}");
        assert!(dst.failed());
        let err = source.join().unwrap().unwrap_err();
        assert!(matches!(err, Error::Timeout(_)), "{err}");
    });
}

#[test]
fn a_source_with_the_wrong_key_is_refused_and_nothing_is_armed() {
    let (src, dst, set, listener) = paused_pair(4, 6, 5, &quick());
    let addr = listener.local_addr().unwrap();
    std::thread::scope(|s| {
        let source = s.spawn(|| send(addr, &security(6), &*src, set.clone(), &quick()));
        let err = listener
            .accept(Arc::clone(&dst), Duration::from_secs(3))
            .unwrap_err();
        assert!(matches!(err, Error::Timeout(_)), "{err}");
        let err = source.join().unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                Error::Security(_) | Error::Handshake(_) | Error::Peer { .. }
            ),
            "{err}"
        );
    });
    // Not armed: a read of a page nobody wrote returns at once, as zeros.
    let mut buf = vec![1u8; PAGE_SIZE];
    dst.read_page(0, &mut buf);
    assert!(buf.iter().all(|&b| b == 0));
    assert!(!dst.failed());
}
