//! The RDMA transport on a real device: streams, a whole migration, and failures.
//!
//! Without a device (an ordinary host) every test prints why it is skipped and passes; with
//! `DWCP_RDMA_REQUIRED=1` (set by `cargo xtask rdma-guest`, which runs them on Soft-RoCE) a missing
//! device fails them instead.
#![cfg(feature = "rdma")]

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dwcp::{Listener, Migration, MigrationConfig, ReceiverConfig};
use dwcp_core::Error;
use dwcp_core::handshake::Psk;
use dwcp_core::memory::{GuestRam, MemorySource, PAGE_SIZE};
use dwcp_core::sim::{ContentMix, SimulatedGuest, SimulatedGuestConfig};
use dwcp_core::transport::{Acceptor, Conn, Connector};
use dwcp_rdma::{DatacenterAcceptor, DatacenterConnector, RdmaConfig};

/// Generous: the guest's CPUs are emulated.
const SLOW: Duration = Duration::from_secs(60);

fn strict() -> RdmaConfig {
    RdmaConfig {
        fallback_to_tcp: false,
        setup_timeout: SLOW,
        ..Default::default()
    }
}

/// Whether the test can run; panics when a device is required but missing.
fn device_or_skip(test: &str) -> bool {
    let devices = dwcp_rdma::device_names();
    if !devices.is_empty() {
        return true;
    }
    if std::env::var("DWCP_RDMA_REQUIRED").as_deref() == Ok("1") {
        panic!("{test}: DWCP_RDMA_REQUIRED=1 but libibverbs lists no RDMA device");
    }
    eprintln!(
        "SKIPPED {test}: no RDMA device on this machine (`cargo xtask rdma-guest` runs it on Soft-RoCE)"
    );
    false
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A connected pair of RDMA streams: (client, server).
fn rdma_pair() -> (Box<dyn Conn>, Box<dyn Conn>) {
    let acceptor = DatacenterAcceptor::bind(localhost(), strict()).unwrap();
    assert!(acceptor.rdma_status().is_ok());
    let connector = DatacenterConnector::new(acceptor.local_addr().unwrap(), strict()).unwrap();
    let c = connector.connect(SLOW).unwrap();
    let s = acceptor.accept_timeout(SLOW).unwrap().expect("accepted");
    assert_eq!((c.transport(), s.transport()), ("rdma", "rdma"));
    (c, s)
}

/// A deterministic byte stream (xorshift), so the reader can check every byte and its position.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

/// Writes `total` pattern bytes in writes of varying sizes (single bytes, inline-sized, larger than
/// one ring slot), vectored half the time.
fn write_pattern(mut w: Box<dyn Conn>, seed: u64, total: usize) -> io::Result<()> {
    let sizes = [
        1,
        7,
        255,
        256,
        257,
        4096,
        65_536,
        1 << 20,
        (1 << 20) + (1 << 16) + 40,
        3 << 20,
    ];
    let mut p = Pattern(seed);
    let mut sent = 0;
    let mut i = 0;
    while sent < total {
        let n = sizes[i % sizes.len()].min(total - sent);
        let mut buf = vec![0u8; n];
        p.fill(&mut buf);
        if i % 2 == 0 {
            w.write_all(&buf)?;
        } else {
            let (a, b) = buf.split_at(n / 3);
            let mut bufs = [io::IoSlice::new(a), io::IoSlice::new(b)];
            let mut slices: &mut [io::IoSlice<'_>] = &mut bufs;
            while !slices.is_empty() {
                let k = w.write_vectored(slices)?;
                io::IoSlice::advance_slices(&mut slices, k);
            }
        }
        sent += n;
        i += 1;
    }
    w.shutdown(std::net::Shutdown::Write)
}

/// Reads to the end of the stream in reads of varying sizes and checks every byte.
fn read_pattern(mut r: Box<dyn Conn>, seed: u64, total: usize) -> io::Result<()> {
    let mut p = Pattern(seed);
    let mut expect = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 3 << 20];
    let reads = [1, 13, 4096, 100_000, 1 << 20, 3 << 20];
    let mut got = 0;
    let mut i = 0;
    loop {
        let want = reads[i % reads.len()];
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        let mut at = 0;
        while at < n {
            let k = (n - at).min(expect.len());
            p.fill(&mut expect[..k]);
            assert!(
                buf[at..at + k] == expect[..k],
                "bytes {}..{} differ",
                got + at,
                got + at + k
            );
            at += k;
        }
        got += n;
        i += 1;
    }
    assert_eq!(got, total, "the stream ended after {got} of {total} bytes");
    Ok(())
}

#[test]
fn bytes_arrive_intact_and_in_order_in_both_directions_at_once() {
    if !device_or_skip("bytes_arrive_intact_and_in_order_in_both_directions_at_once") {
        return;
    }
    let (c, s) = rdma_pair();
    for conn in [&c, &s] {
        conn.set_read_timeout(Some(SLOW)).unwrap();
        conn.set_write_timeout(Some(SLOW)).unwrap();
    }
    let total = 24 << 20;
    // Each side writes on one handle while another thread reads on a clone of it.
    let c_reader = c.try_clone_conn().unwrap();
    let s_reader = s.try_clone_conn().unwrap();
    let threads = [
        std::thread::spawn(move || write_pattern(c, 1, total)),
        std::thread::spawn(move || write_pattern(s, 2, total)),
        std::thread::spawn(move || read_pattern(s_reader, 1, total)),
        std::thread::spawn(move || read_pattern(c_reader, 2, total)),
    ];
    for t in threads {
        t.join().unwrap().unwrap();
    }
}

/// Records the transport of every connection the engine accepts (it delegates to the real acceptor).
#[derive(Debug)]
struct Recording {
    inner: DatacenterAcceptor,
    transports: Arc<Mutex<Vec<&'static str>>>,
}

impl Acceptor for Recording {
    fn accept_timeout(&self, timeout: Duration) -> Result<Option<Box<dyn Conn>>, Error> {
        let conn = self.inner.accept_timeout(timeout)?;
        if let Some(c) = &conn {
            self.transports.lock().unwrap().push(c.transport());
        }
        Ok(conn)
    }
    fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.inner.local_addr()
    }
}

fn guest(size: u64, seed: u64) -> Arc<SimulatedGuest> {
    SimulatedGuest::new(SimulatedGuestConfig {
        size_bytes: size,
        mix: ContentMix::IDLE_GUEST,
        seed,
    })
    .unwrap()
}

type Received = std::thread::JoinHandle<Result<(dwcp::ReceiveReport, GuestRam), Error>>;

/// A strict RDMA destination that receives one migration into fresh memory on its own thread, the
/// connector to reach it, and the transports of the streams it accepted.
fn rdma_destination(key: &Psk) -> (DatacenterConnector, Arc<Mutex<Vec<&'static str>>>, Received) {
    let transports = Arc::new(Mutex::new(Vec::new()));
    let acceptor = Recording {
        inner: DatacenterAcceptor::bind(localhost(), strict()).unwrap(),
        transports: Arc::clone(&transports),
    };
    let connector = DatacenterConnector::new(acceptor.local_addr().unwrap(), strict()).unwrap();
    let listener = Listener::over(
        Box::new(acceptor),
        key.clone(),
        ReceiverConfig {
            io_timeout: SLOW,
            connect_timeout: SLOW,
            ..Default::default()
        },
    );
    let rx = std::thread::spawn(move || {
        let incoming = listener.accept()?;
        let ram = GuestRam::anonymous(incoming.layout().clone())?;
        incoming.receive_into(&ram).map(|r| (r, ram))
    });
    (connector, transports, rx)
}

#[test]
fn a_live_migration_over_rdma_is_bit_exact() {
    if !device_or_skip("a_live_migration_over_rdma_is_bit_exact") {
        return;
    }
    let key = Psk::new(vec![6; 32]).unwrap();
    let (connector, transports, rx) = rdma_destination(&key);
    let g = guest(48 << 20, 6);
    // The guest keeps writing during the migration, so later passes resend dirtied pages.
    g.start_workload(4 << 20, 11);
    let report = Migration::over(Arc::new(connector), key)
        .config(MigrationConfig {
            streams: 3,
            io_timeout: SLOW,
            connect_timeout: SLOW,
            ..Default::default()
        })
        .run(&*g, &mut g.dirty_log(), &mut g.control())
        .unwrap();
    let (received, ram) = rx.join().unwrap().unwrap();
    assert!(report.digest_match);
    assert_eq!(report.digest, received.digest);
    assert!(
        report.iterations >= 2,
        "a pre-copy pass and the stop-and-copy pass"
    );
    // Streams beyond the first join in the background; a short migration may end before they do.
    let transports = transports.lock().unwrap().clone();
    assert!(!transports.is_empty());
    assert!(
        transports.iter().all(|t| *t == "rdma"),
        "every stream ran over RDMA: {transports:?}"
    );
    eprintln!(
        "migration over RDMA: {} streams accepted, {} at most in use, {} passes",
        transports.len(),
        report.peak_streams,
        report.iterations
    );
    // The guest stopped for good at the handover: its memory is the state the digest covered.
    let (mut a, mut b) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    for p in 0..g.layout().total_pages() {
        g.read_page(p, &mut a);
        ram.copy_out(p, &mut b);
        assert!(a == b, "page {p} differs");
    }
}

/// Chunk size of the capped migrations, in pages (256 KiB).
const CAPPED_CHUNK_PAGES: usize = 64;

/// One migration of a random guest over RDMA under `cap` bytes/s, changed to `later`'s rate (None:
/// no cap) after its delay; returns the wire bytes, the time it took and the transports the
/// destination saw.
fn capped_rdma_migration(
    size: u64,
    cap: u64,
    later: Option<(Duration, Option<u64>)>,
) -> (dwcp::MigrationReport, Duration, Vec<&'static str>) {
    let key = Psk::new(vec![7; 32]).unwrap();
    let (connector, transports, rx) = rdma_destination(&key);
    let g = SimulatedGuest::new(SimulatedGuestConfig {
        size_bytes: size,
        mix: ContentMix::RANDOM,
        seed: 8,
    })
    .unwrap();
    let migration = Migration::over(Arc::new(connector), key).config(MigrationConfig {
        streams: 2,
        // The bucket charges whole chunks: at the default 1 MiB a chunk is two seconds of this cap.
        pages_per_chunk: CAPPED_CHUNK_PAGES,
        max_bandwidth: Some(cap),
        io_timeout: SLOW,
        connect_timeout: SLOW,
        ..Default::default()
    });
    let handle = migration.bandwidth_handle();
    let changer = later.map(|(after, rate)| {
        std::thread::spawn(move || {
            std::thread::sleep(after);
            handle.set(rate).unwrap();
        })
    });
    let started = std::time::Instant::now();
    let report = migration
        .run(&*g, &mut g.dirty_log(), &mut g.control())
        .unwrap();
    let elapsed = started.elapsed();
    if let Some(c) = changer {
        c.join().unwrap();
    }
    let (received, _) = rx.join().unwrap().unwrap();
    assert!(report.digest_match);
    assert_eq!(report.digest, received.digest);
    let transports = transports.lock().unwrap().clone();
    (report, elapsed, transports)
}

#[test]
fn a_bandwidth_cap_holds_over_rdma_and_can_be_lifted_while_it_runs() {
    if !device_or_skip("a_bandwidth_cap_holds_over_rdma_and_can_be_lifted_while_it_runs") {
        return;
    }
    // Random pages cross Soft-RoCE in this TCG guest at 2-4 MiB/s (the encoder runs emulated), so a
    // cap of 512 KiB/s is what limits: 4 MiB cannot take less than about 8 s, and should not take
    // much more.
    let cap = 512 << 10;
    let (report, elapsed, transports) = capped_rdma_migration(4 << 20, cap, None);
    assert!(transports.iter().all(|t| *t == "rdma"), "{transports:?}");
    // Judged over the passes, without the streams' setup, which is slow in an emulated guest.
    let pass_secs: f64 = report.passes.iter().map(|p| p.duration_ms / 1e3).sum();
    let pass_bytes: u64 = report.passes.iter().map(|p| p.wire_bytes).sum();
    let rate = pass_bytes as f64 / pass_secs;
    eprintln!(
        "over RDMA under {} KiB/s: {pass_bytes} wire bytes in passes of {pass_secs:.2} s \
         ({:.0} KiB/s), {elapsed:?} in all",
        cap >> 10,
        rate / 1024.0
    );
    // The last chunk is sent on credit and its debt never waited for.
    let last_chunk = (CAPPED_CHUNK_PAGES * PAGE_SIZE) as f64;
    assert!(
        pass_secs >= (pass_bytes as f64 - last_chunk) / cap as f64 - 0.05,
        "faster than the cap: {pass_bytes} bytes in {pass_secs:.2} s"
    );
    assert!(
        rate >= 0.8 * cap as f64,
        "well under the cap, so something else limited it: {rate:.0} B/s"
    );
    // At 256 KiB/s the same guest would take 16 s; with the cap lifted after 300 ms, a few.
    let (report, elapsed, transports) =
        capped_rdma_migration(4 << 20, 256 << 10, Some((Duration::from_millis(300), None)));
    assert!(transports.iter().all(|t| *t == "rdma"), "{transports:?}");
    eprintln!(
        "over RDMA, 256 KiB/s lifted after 300 ms: {} wire bytes in {elapsed:?}",
        report.wire_bytes
    );
    assert!(
        elapsed < Duration::from_secs(8),
        "the lifted cap still held: {elapsed:?}"
    );
}

#[test]
fn an_rdma_capable_source_falls_back_to_tcp_when_the_destination_has_no_device() {
    if !device_or_skip("an_rdma_capable_source_falls_back_to_tcp") {
        return;
    }
    let acceptor = DatacenterAcceptor::bind(
        localhost(),
        RdmaConfig {
            device: Some("no-such-rdma-device".into()),
            ..Default::default()
        },
    )
    .unwrap();
    // This side has a device, so it offers RDMA; the destination refuses with its reason and the
    // same TCP connection carries the stream.
    let connector =
        DatacenterConnector::new(acceptor.local_addr().unwrap(), RdmaConfig::default()).unwrap();
    assert!(connector.rdma_status().is_ok());
    let mut c = connector.connect(SLOW).unwrap();
    let mut s = acceptor.accept_timeout(SLOW).unwrap().expect("accepted");
    assert_eq!((c.transport(), s.transport()), ("tcp", "tcp"));
    c.write_all(b"fallback").unwrap();
    let mut got = [0u8; 8];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"fallback");
    // With fallback off, the refusal is an error that carries the destination's reason.
    let strict_connector =
        DatacenterConnector::new(acceptor.local_addr().unwrap(), strict()).unwrap();
    let e = strict_connector.connect(SLOW).unwrap_err();
    assert!(e.to_string().contains("no-such-rdma-device"), "{e}");
}

#[test]
fn a_garbage_hello_is_dropped_and_the_acceptor_keeps_serving() {
    if !device_or_skip("a_garbage_hello_is_dropped") {
        return;
    }
    let acceptor = DatacenterAcceptor::bind(localhost(), strict()).unwrap();
    let addr = acceptor.local_addr().unwrap();
    let mut stranger = std::net::TcpStream::connect(addr).unwrap();
    // The right magic and version, then an endpoint announcing 65535 ring slots.
    let mut hello = b"RDMA\x01\0\0\0".to_vec();
    hello.extend_from_slice(&[0u8; 26]);
    hello.extend_from_slice(&[3, 2]);
    hello.extend_from_slice(&1024u32.to_le_bytes());
    hello.extend_from_slice(&(1u32 << 20).to_le_bytes());
    hello.extend_from_slice(&u16::MAX.to_le_bytes());
    stranger.write_all(&hello).unwrap();
    let mut rest = Vec::new();
    stranger.set_read_timeout(Some(SLOW)).unwrap();
    // The acceptor drops the connection without answering.
    assert_eq!(stranger.read_to_end(&mut rest).unwrap_or(0), 0);
    let connector = DatacenterConnector::new(addr, strict()).unwrap();
    let c = connector.connect(SLOW).unwrap();
    let s = acceptor.accept_timeout(SLOW).unwrap().expect("accepted");
    assert_eq!((c.transport(), s.transport()), ("rdma", "rdma"));
}

/// Run as a child process by `a_vanished_peer_fails_reads_and_writes`: connects, writes, waits
/// for the parent's go-ahead, and dies without closing anything.
#[test]
fn peer_process_helper() {
    let Ok(addr) = std::env::var("DWCP_RDMA_PEER_OF") else {
        return; // Only meaningful as the child.
    };
    let connector = DatacenterConnector::new(addr.parse().unwrap(), strict()).unwrap();
    let mut c = connector.connect(SLOW).unwrap();
    c.write_all(&vec![7u8; 1 << 20]).unwrap();
    let mut go = [0u8; 1];
    c.read_exact(&mut go).unwrap();
    std::process::abort();
}

#[test]
fn a_vanished_peer_fails_reads_and_writes() {
    if !device_or_skip("a_vanished_peer_fails_reads_and_writes") {
        return;
    }
    let acceptor = DatacenterAcceptor::bind(localhost(), strict()).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "peer_process_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "DWCP_RDMA_PEER_OF",
            acceptor.local_addr().unwrap().to_string(),
        )
        .spawn()
        .unwrap();
    let mut s = acceptor
        .accept_timeout(SLOW)
        .unwrap()
        .expect("the child connected");
    assert_eq!(s.transport(), "rdma");
    s.set_read_timeout(Some(SLOW)).unwrap();
    s.set_write_timeout(Some(SLOW)).unwrap();
    let mut got = vec![0u8; 1 << 20];
    s.read_exact(&mut got).unwrap();
    assert!(got.iter().all(|&b| b == 7));
    s.write_all(b"g").unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child aborted");
    // The process is gone, its queue pair with it: a read fails (not a timeout, not a clean end).
    let e = s.read(&mut got).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    assert!(e.to_string().contains("gone"), "{e}");
    let e = s.write(b"anyone?").unwrap_err();
    assert!(
        !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{e}"
    );
}
