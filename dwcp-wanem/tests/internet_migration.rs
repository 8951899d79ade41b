//! A live migration across the emulated `internet` profile (1 Gbit/s, 50 ms RTT, 0.1% loss), between two
//! private network namespaces. Needs root and /dev/net/tun (as CI has); without them it fails and says
//! why.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use dwcp::{Listener, Migration, MigrationConfig, ReceiverConfig};
use dwcp_core::handshake::Psk;
use dwcp_core::memory::GuestRam;
use dwcp_core::sim::{ContentMix, SimulatedGuest, SimulatedGuestConfig};
use dwcp_wanem::netns;
use dwcp_wanem::probe::{self, ProbeOptions, ProbeServer};
use dwcp_wanem::testbed::Testbed;

const BIN: &str = env!("CARGO_BIN_EXE_dwcp-wanem");

fn names(tag: &str) -> (String, String) {
    let pid = std::process::id();
    (format!("dwt{tag}{pid}-s"), format!("dwt{tag}{pid}-d"))
}

fn start(tag: &str, profile_args: &[&str]) -> Testbed {
    if let Err(e) = netns::require_privileges() {
        panic!("this test builds a WAN test bed and needs root with /dev/net/tun: {e:#}");
    }
    let (src, dst) = names(tag);
    let extra: Vec<String> = profile_args.iter().map(|s| s.to_string()).collect();
    Testbed::start(Path::new(BIN), &src, &dst, &extra).expect("bringing the link up")
}

/// Runs `f` on a thread inside namespace `ns`.
fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        netns::enter(&ns).expect("entering the namespace");
        f()
    })
}

#[test]
fn migration_across_the_internet_profile() {
    let bed = start("m", &["--profile", "internet"]);
    let ready = bed.ready().clone();
    assert_eq!(ready.rate_bps, 1_000_000_000);
    assert_eq!(ready.rtt_ms, 50.0);

    // RTT: 30 UDP probes.
    let probe_addr = SocketAddr::new(ready.dst_addr.into(), 9100);
    let (tx, rx) = mpsc::channel();
    let server = spawn_in(&ready.dst_ns, move || {
        let s = ProbeServer::bind(probe_addr).expect("probe server");
        tx.send(()).unwrap();
        s.serve(Duration::from_secs(60)).expect("serving probes")
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let report = spawn_in(&ready.src_ns, move || {
        probe::run(
            probe_addr,
            ProbeOptions {
                rtt_count: 30,
                rtt_interval: Duration::from_millis(10),
                ..ProbeOptions::default()
            },
        )
    })
    .join()
    .unwrap()
    .expect("probing");
    server.join().unwrap();
    eprintln!("probe: {report:?}");
    assert!(report.rtt_echoed >= 25, "{report:?}");
    assert!(
        (report.rtt_median_ms - 50.0).abs() <= 5.0,
        "RTT {} ms, configured 50 ms",
        report.rtt_median_ms
    );

    // A guest of 64 MiB idle-like plus 16 MiB random memory (80 MiB: 6.4% text, 23.2% random).
    let guest = SimulatedGuest::new(SimulatedGuestConfig {
        size_bytes: 80 << 20,
        mix: ContentMix {
            text: 0.08 * 64.0 / 80.0,
            random: (0.04 * 64.0 + 16.0) / 80.0,
        },
        seed: 5,
    })
    .expect("guest");
    let psk = Psk::generate();
    let addr = SocketAddr::new(ready.dst_addr.into(), 7700);
    let layout = guest.ram().layout().clone();
    let (tx, rx) = mpsc::channel();
    let dest_psk = psk.clone();
    let destination = spawn_in(&ready.dst_ns, move || {
        let memory = GuestRam::anonymous(layout)?;
        let listener = Listener::bind(addr, dest_psk, ReceiverConfig::default())?;
        tx.send(()).unwrap();
        let incoming = listener.accept()?;
        incoming.receive_into(&memory)
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let source = spawn_in(&ready.src_ns, move || {
        Migration::new(addr, psk)
            .config(MigrationConfig::default())
            .run(&*guest, &mut guest.dirty_log(), &mut guest.control())
    });
    let sent = source
        .join()
        .unwrap()
        .expect("source side of the migration");
    let received = destination
        .join()
        .unwrap()
        .expect("destination side of the migration");
    eprintln!(
        "migrated {} MiB in {:.0} ms ({} wire bytes), digest match {}",
        sent.memory_bytes >> 20,
        sent.total_ms,
        sent.wire_bytes,
        sent.digest_match
    );
    assert!(sent.digest_match);
    assert!(received.digest_match);
    assert_eq!(sent.digest, received.digest);

    let (src, dst) = (ready.src_ns.clone(), ready.dst_ns.clone());
    let stopped = bed.stop().expect("tearing down");
    eprintln!("forwarder: {:?}", stopped.stats);
    assert!(stopped.stats.forward.bytes_out >= sent.wire_bytes);
    assert!(!netns::exists(&src) && !netns::exists(&dst));
}

#[test]
fn dropping_the_testbed_removes_everything() {
    let bed = start("d", &["--profile", "lan"]);
    let (src, dst) = (bed.ready().src_ns.clone(), bed.ready().dst_ns.clone());
    let forwarder = bed.ready().pid;
    assert!(netns::exists(&src) && netns::exists(&dst));
    assert_eq!(
        netns::sysctl(&src, "net/ipv4/tcp_wmem").unwrap(),
        dwcp_wanem::link::TCP_WMEM.replace(' ', "\t")
    );
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _bed = bed;
        panic!("a failing test");
    }));
    assert!(result.is_err());
    assert!(!netns::exists(&src), "{src} left behind");
    assert!(!netns::exists(&dst), "{dst} left behind");
    let links = netns::ip(&["-o", "link"]).unwrap();
    assert!(!links.contains(&format!("dw{forwarder}x")), "{links}");
}
