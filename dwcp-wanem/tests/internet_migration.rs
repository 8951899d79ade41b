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

/// Listens at `addr` inside namespace `ns` and receives one migration into fresh memory of
/// `layout`; returns once the destination listens.
fn receive_in(
    ns: &str,
    addr: SocketAddr,
    psk: &Psk,
    layout: dwcp_core::memory::MemoryLayout,
) -> std::thread::JoinHandle<dwcp::Result<dwcp::ReceiveReport>> {
    let (tx, rx) = mpsc::channel();
    let psk = psk.clone();
    let destination = spawn_in(ns, move || {
        let memory = GuestRam::anonymous(layout)?;
        let listener = Listener::bind(addr, psk, ReceiverConfig::default())?;
        tx.send(()).unwrap();
        listener.accept()?.receive_into(&memory)
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the destination listens");
    destination
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
    let destination = receive_in(&ready.dst_ns, addr, &psk, guest.ram().layout().clone());
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

/// One reading of the forwarder's counters file: when this test saw it change, and the bytes the
/// link had carried from source to destination by then.
fn forwarded_bytes(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["counters"]["forward"]["bytes_out"].as_u64()
}

#[test]
fn a_cap_changed_mid_migration_holds_within_a_second() {
    let stats = std::env::temp_dir().join(format!("dwcp-cap-test-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&stats);
    let stats_arg = stats.to_string_lossy().to_string();
    let bed = start("c", &["--profile", "internet", "--stats-file", &stats_arg]);
    let ready = bed.ready().clone();

    // Three phases of about 3 s: 40 MB/s, then 15 MB/s, then 60 MB/s, of incompressible pages
    // (the cap counts what goes on the wire, so compressible pages would only blur the figures).
    let caps: [u64; 3] = [40_000_000, 15_000_000, 60_000_000];
    let phase = Duration::from_secs(3);
    let guest = SimulatedGuest::new(SimulatedGuestConfig {
        size_bytes: 420 << 20,
        mix: ContentMix::RANDOM,
        seed: 9,
    })
    .expect("guest");
    let psk = Psk::generate();
    let addr = SocketAddr::new(ready.dst_addr.into(), 7701);
    let destination = receive_in(&ready.dst_ns, addr, &psk, guest.ram().layout().clone());
    let migration = Migration::new(addr, psk).config(MigrationConfig {
        max_bandwidth: Some(caps[0]),
        ..MigrationConfig::default()
    });
    let handle = migration.bandwidth_handle();
    let started = std::time::Instant::now();
    let source = spawn_in(&ready.src_ns, move || {
        migration.run(&*guest, &mut guest.dirty_log(), &mut guest.control())
    });

    // Change the caps on schedule while reading the counters as the forwarder rewrites them
    // (about once a second).
    let mut changes = vec![(started, caps[0])];
    let mut readings: Vec<(std::time::Instant, u64)> = Vec::new();
    let limit = started + Duration::from_secs(60);
    while !source.is_finished() {
        assert!(
            std::time::Instant::now() < limit,
            "the migration took over 60 s"
        );
        let next = changes.len();
        if next < caps.len() && started.elapsed() >= phase * next as u32 {
            handle.set(Some(caps[next])).unwrap();
            changes.push((std::time::Instant::now(), caps[next]));
        }
        if let Some(bytes) = forwarded_bytes(&stats) {
            if readings.last().is_none_or(|&(_, b)| b != bytes) {
                readings.push((std::time::Instant::now(), bytes));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sent = source.join().unwrap().expect("source side");
    let received = destination.join().unwrap().expect("destination side");
    assert!(sent.digest_match && received.digest_match);
    assert_eq!(
        changes.len(),
        3,
        "the migration ended before every cap was set"
    );

    // Judge every window that starts at least 1 s after a change and ends before the next one,
    // leaving out the last window with traffic (the end of sending falls in it).
    let mut judged = vec![0; caps.len()];
    let mut report = Vec::new();
    let windows: Vec<_> = readings.windows(2).map(|w| (w[0], w[1])).collect();
    for &((t0, b0), (t1, b1)) in windows.iter().rev().skip(1).rev() {
        let Some(i) = changes.iter().rposition(|&(at, _)| at <= t0) else {
            continue;
        };
        let settled = t0 >= changes[i].0 + Duration::from_secs(1);
        let before_next = changes.get(i + 1).is_none_or(|&(at, _)| t1 <= at);
        let rate = (b1 - b0) as f64 / t1.duration_since(t0).as_secs_f64();
        let cap = changes[i].1 as f64;
        report.push(format!(
            "{:.2}-{:.2} s: {:.1} MB/s (cap {:.0}){}",
            t0.duration_since(started).as_secs_f64(),
            t1.duration_since(started).as_secs_f64(),
            rate / 1e6,
            cap / 1e6,
            if settled && before_next {
                ""
            } else {
                ", not judged"
            }
        ));
        if settled && before_next {
            judged[i] += 1;
            assert!(
                (rate - cap).abs() <= 0.05 * cap,
                "a 1-s window off its cap by more than 5 %:\n{}",
                report.join("\n")
            );
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        judged.iter().all(|&n| n >= 1),
        "every cap must be judged in at least one window: {judged:?}\n{}",
        report.join("\n")
    );
    drop(bed);
    let _ = std::fs::remove_file(&stats);
}
