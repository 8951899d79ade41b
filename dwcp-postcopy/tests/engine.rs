//! Pre-copy that cannot converge, ended in post-copy: the engine (`dwcp`) hands back the pages it
//! could not move within the operator's ceiling, and `dwcp-postcopy` moves them while the
//! destination runs the VM. Real loopback TLS streams on both legs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dwcp::{Listener, Migration, MigrationConfig, ReceiverConfig};
use dwcp_core::Error;
use dwcp_core::handshake::Psk;
use dwcp_core::memory::{MemorySink, MemorySource, PAGE_SIZE};
use dwcp_core::sim::{ContentMix, SimulatedGuest, SimulatedGuestConfig};
use dwcp_postcopy::{PageSet, PostcopyConfig, PostcopyListener, PostcopyMemory, send};
use dwcp_tls::Security;
use rand::{Rng, SeedableRng};

fn key() -> Psk {
    Psk::new(vec![7u8; 32]).unwrap()
}

/// A 32 MiB guest dirtying 128 MB/s over a link capped at 64 MB/s (twice the link rate), with a
/// 50 ms ceiling on the pause and no vCPU throttle: pre-copy cannot converge.
fn setup() -> (Arc<SimulatedGuest>, MigrationConfig) {
    let guest = SimulatedGuest::new(SimulatedGuestConfig {
        size_bytes: 32 << 20,
        mix: ContentMix {
            text: 0.3,
            random: 0.5,
        },
        seed: 11,
    })
    .unwrap();
    guest.start_workload(128_000_000, 12);
    let config = MigrationConfig {
        max_bandwidth: Some(64_000_000),
        downtime_limit: Duration::from_millis(10),
        downtime_ceiling: Some(Duration::from_millis(50)),
        throttle: None,
        io_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        ..MigrationConfig::default()
    };
    (guest, config)
}

fn receiver() -> (Listener, std::net::SocketAddr) {
    let config = ReceiverConfig {
        io_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let l = Listener::bind("127.0.0.1:0".parse().unwrap(), key(), config).unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

fn running(g: &SimulatedGuest) -> bool {
    let before = g.pages_written();
    std::thread::sleep(Duration::from_millis(200));
    g.pages_written() > before
}

#[test]
fn without_post_copy_a_guest_dirtying_twice_the_link_rate_does_not_converge() {
    let (guest, config) = setup();
    let (listener, addr) = receiver();
    let dest = std::thread::spawn(move || {
        let incoming = listener.accept()?;
        let memory = PostcopyMemory::new(incoming.layout().clone())?;
        incoming.receive_into(&memory)
    });
    let err = Migration::new(addr, key())
        .config(config)
        .run(&*guest, &mut guest.dirty_log(), &mut guest.control())
        .unwrap_err();
    assert!(matches!(err, Error::NotConverged { .. }), "{err}");
    assert!(running(&guest), "the guest runs on at the source");
    assert!(dest.join().unwrap().is_err());
    guest.stop();
}

#[test]
fn with_post_copy_the_same_guest_moves_bit_exact_and_the_destination_runs_before_it_has_all_pages()
{
    let (guest, config) = setup();
    let config = MigrationConfig {
        postcopy: true,
        ..config
    };
    let (listener, addr) = receiver();
    let postcopy = PostcopyListener::bind(
        "127.0.0.1:0".parse().unwrap(),
        Security::psk(key()),
        PostcopyConfig::default(),
    )
    .unwrap();
    let postcopy_addr = postcopy.local_addr().unwrap();
    // The destination: pre-copy into post-copy memory, then post-copy into the same memory.
    let dest = std::thread::spawn(move || {
        let incoming = listener.accept()?;
        let memory = Arc::new(PostcopyMemory::new(incoming.layout().clone())?);
        let pre = incoming.receive_into(&*memory)?;
        assert!(pre.postcopy, "the session ended in a switch to post-copy");
        let receiver = postcopy.accept(Arc::clone(&memory), Duration::from_secs(30))?;
        let running_at = Instant::now();
        Ok::<_, Error>((memory, receiver, running_at))
    });

    let report = Migration::new(addr, key())
        .config(config)
        .run(&*guest, &mut guest.dirty_log(), &mut guest.control())
        .unwrap();
    assert_eq!(report.stop_reason, "postcopy");
    assert!(
        report.digest_match,
        "both sides agreed on the pages as sent"
    );
    let handoff = report.postcopy.clone().expect("handed to post-copy");
    assert!(handoff.count > 0, "a guest this busy leaves pages behind");
    assert!(handoff.why.contains("converge"), "{}", handoff.why);
    assert!(!running(&guest), "the source guest stays paused");

    let set = PageSet::from_pages(guest.layout().total_pages(), handoff.pages.iter().copied())
        .expect("pages of this memory");
    let switched = Instant::now();
    let sender = {
        let (guest, set) = (Arc::clone(&guest), set.clone());
        std::thread::spawn(move || {
            send(
                postcopy_addr,
                &Security::psk(key()),
                &*guest,
                set,
                &PostcopyConfig::default(),
            )
        })
    };
    let (memory, receiver, running_at) = dest.join().unwrap().unwrap();
    // The destination's vCPU: runs at once and checks every page it reads.
    let done = Arc::new(AtomicBool::new(false));
    let vcpu = {
        let (memory, guest, done) = (Arc::clone(&memory), Arc::clone(&guest), Arc::clone(&done));
        let pages = set.bound();
        std::thread::spawn(move || {
            let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(1);
            let (mut seen, mut want) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
            let mut touched = 0u64;
            while !done.load(Ordering::Relaxed) && touched < 50_000 {
                let page = rng.random_range(0..pages);
                memory.read_page(page, &mut seen);
                guest.read_page(page, &mut want);
                assert!(
                    seen == want,
                    "the destination's guest read a wrong page {page}"
                );
                touched += 1;
            }
            touched
        })
    };
    let received = receiver.wait().unwrap();
    done.store(true, Ordering::Relaxed);
    let touched = vcpu.join().unwrap();
    let sent = sender.join().unwrap().unwrap();
    assert_eq!(sent.pages, handoff.count);
    assert_eq!(received.pages, handoff.count);
    assert!(touched > 0);
    eprintln!(
        "pre-copy {} passes, pause to switch {:.1} ms, switch to destination running {:.1} ms, {} pages by post-copy ({} faults, p99 {:.0} us)",
        report.iterations,
        report.downtime_ms,
        running_at.saturating_duration_since(switched).as_secs_f64() * 1e3,
        handoff.count,
        received.faults,
        received.fault_latency.p99_us
    );
    let (mut a, mut b) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    for page in 0..guest.layout().total_pages() {
        guest.read_page(page, &mut a);
        memory.read_page(page, &mut b);
        assert!(a == b, "page {page} differs after pre-copy and post-copy");
    }
    guest.stop();
}
