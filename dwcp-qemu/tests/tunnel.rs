//! The tunnel over real loopback sockets, with plain TCP peers standing in for the two QEMUs (these
//! tests check the tunnel's own guarantees; `qemu_e2e.rs` runs real QEMUs). The tunnel is TLS unless
//! a test says otherwise.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dwcp_core::error::{Error, SecurityError};
use dwcp_core::handshake::Psk;
use dwcp_hde::Codec;
use dwcp_qemu::{
    DestinationProxy, Security, SecurityMode, SourceProxy, TunnelConfig, TunnelReport,
};
use dwcp_tls::certs::CertificateAuthority;

type Proxy = JoinHandle<Result<TunnelReport, Error>>;

fn config(codec: Codec) -> TunnelConfig {
    TunnelConfig {
        streams: 3,
        // Several streams even on loopback: segments overtaking each other is what these test.
        local_streams: 3,
        codec,
        local_codec: codec,
        window: 1 << 20,
        connect_timeout: Duration::from_secs(2),
        io_timeout: Duration::from_secs(10),
        accept_timeout: Duration::from_secs(20),
        ..TunnelConfig::default()
    }
}

/// Starts both proxies with one pre-shared key (so TLS keyed by it); returns the address "QEMU"
/// migrates to and the two proxy threads.
fn proxies(qemu: SocketAddr, cfg: TunnelConfig) -> (SocketAddr, Proxy, Proxy) {
    let psk = Psk::generate();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let dest = DestinationProxy::bind(any, qemu, psk.clone(), cfg.clone()).unwrap();
    let source = SourceProxy::bind(any, dest.local_addr().unwrap(), psk, cfg).unwrap();
    let addr = source.local_addr().unwrap();
    (
        addr,
        std::thread::spawn(move || source.run()),
        std::thread::spawn(move || dest.run()),
    )
}

/// Content like a migration stream: text, zero runs and pseudo-random bytes, different per `tag`.
fn content(tag: u8, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(tag);
    (0..len)
        .map(|i| match (i / 65_536) % 3 {
            0 => b"page header and some text "[i % 26] ^ tag,
            1 => 0,
            _ => xorshift(&mut x),
        })
        .collect()
}

/// The next byte of a xorshift64 generator.
fn xorshift(x: &mut u64) -> u8 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x as u8
}

#[test]
fn every_connection_arrives_exactly_in_order_both_ways() {
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd(1)] {
        let qemu = TcpListener::bind("127.0.0.1:0").unwrap();
        let qemu_addr = qemu.local_addr().unwrap();
        // The destination "QEMU": records each connection's bytes in accept order, answers each with
        // its own reply, then closes.
        let dst = std::thread::spawn(move || {
            (0..3u8)
                .map(|_| {
                    let (mut s, _) = qemu.accept().unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).unwrap();
                    s.write_all(&content(100 + got[0], 300_000)).unwrap();
                    got
                })
                .collect::<Vec<_>>()
        });
        let (addr, source, dest) = proxies(qemu_addr, config(codec));
        let sizes = [3_000_000usize, 1, 700_001];
        let clients: Vec<_> = (0..3u8)
            .map(|tag| {
                // Connect in order, as QEMU connects its main channel first.
                let mut s = TcpStream::connect(addr).unwrap();
                std::thread::sleep(Duration::from_millis(50));
                std::thread::spawn(move || {
                    let data = content(tag, sizes[tag as usize]);
                    s.write_all(&data).unwrap();
                    s.shutdown(Shutdown::Write).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    let mut reply = Vec::new();
                    s.read_to_end(&mut reply).unwrap();
                    (data, reply)
                })
            })
            .collect();
        let sent: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        let received = dst.join().unwrap();
        for (tag, (data, reply)) in sent.iter().enumerate() {
            assert!(
                received[tag] == *data,
                "{codec:?}: connection {tag} differs"
            );
            assert!(
                *reply == content(100 + data[0], 300_000),
                "{codec:?}: reply {tag}"
            );
        }
        let s = source.join().unwrap().unwrap();
        let d = dest.join().unwrap().unwrap();
        assert_eq!((s.channels, d.channels, s.resets + d.resets), (3, 3, 0));
        assert_eq!(s.raw_bytes_sent, sizes.iter().sum::<usize>() as u64);
        assert_eq!(d.raw_bytes_sent, 3 * 300_000);
        if codec != Codec::None {
            assert!(
                s.wire_bytes_sent < s.raw_bytes_sent,
                "{codec:?} compressed nothing"
            );
        }
    }
}

#[test]
fn an_unreachable_destination_qemu_closes_the_source_connection() {
    // Nothing listens here: the destination proxy's connect is refused until its timeout.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let qemu_addr = closed.local_addr().unwrap();
    drop(closed);
    let (addr, source, dest) = proxies(qemu_addr, config(Codec::Lz4));
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = Instant::now();
    let _ = s.write_all(&[1u8; 10_000]);
    let mut buf = [0u8; 16];
    // EOF or a reset: either way QEMU learns, within the connect timeout plus a little.
    let r = s.read(&mut buf);
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    let s = source.join().unwrap().unwrap();
    let d = dest.join().unwrap().unwrap();
    assert_eq!(s.channels, 1);
    assert!(s.resets + d.resets >= 1);
}

#[test]
fn a_destination_qemu_that_breaks_off_resets_the_source_connection() {
    let qemu = TcpListener::bind("127.0.0.1:0").unwrap();
    let qemu_addr = qemu.local_addr().unwrap();
    let dst = std::thread::spawn(move || {
        let (mut s, _) = qemu.accept().unwrap();
        let mut first = [0u8; 1000];
        s.read_exact(&mut first).unwrap();
        // Closing with unread data makes the kernel send a reset.
        drop(s);
    });
    let (addr, source, dest) = proxies(qemu_addr, config(Codec::None));
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let data = content(1, 1 << 20);
    let started = Instant::now();
    let mut failed = false;
    for _ in 0..200 {
        if s.write_all(&data).is_err() {
            failed = true;
            break;
        }
    }
    assert!(
        failed,
        "the source side kept accepting data after the destination broke off"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    dst.join().unwrap();
    drop(s);
    let s = source.join().unwrap().unwrap();
    let d = dest.join().unwrap().unwrap();
    assert!(s.resets + d.resets >= 1);
}

#[test]
fn a_wrong_key_never_reaches_the_destination_qemu() {
    let qemu = TcpListener::bind("127.0.0.1:0").unwrap();
    qemu.set_nonblocking(true).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let cfg = TunnelConfig {
        accept_timeout: Duration::from_secs(2),
        ..config(Codec::Lz4)
    };
    let dest = DestinationProxy::bind(
        any,
        qemu.local_addr().unwrap(),
        Psk::generate(),
        cfg.clone(),
    )
    .unwrap();
    let source = SourceProxy::bind(any, dest.local_addr().unwrap(), Psk::generate(), cfg).unwrap();
    let d = std::thread::spawn(move || dest.run());
    let err = source.run().unwrap_err();
    assert!(
        err.to_string().contains("authentication")
            || matches!(err, Error::Peer { .. } | Error::Handshake(_)),
        "{err}"
    );
    assert!(matches!(d.join().unwrap(), Err(Error::Timeout(_))));
    assert!(qemu.accept().is_err(), "the destination QEMU was contacted");
}

#[test]
fn a_connection_that_pauses_is_carried_whole() {
    // QEMU's connections go quiet for a while (a multifd channel waits for the main one's sync):
    // a pause of any length below the I/O timeout is not an error.
    let qemu = TcpListener::bind("127.0.0.1:0").unwrap();
    let qemu_addr = qemu.local_addr().unwrap();
    let dst = std::thread::spawn(move || {
        let (mut s, _) = qemu.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let (addr, source, dest) = proxies(qemu_addr, config(Codec::Lz4));
    let data = content(7, 400_000);
    // As QEMU does, connect once the source proxy is serving (its tunnel is up well within this):
    // connections accepted then, not ones queued earlier, are the ones a serving proxy handles.
    std::thread::sleep(Duration::from_millis(1500));
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&data[..100_000]).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    s.write_all(&data[100_000..]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(dst.join().unwrap() == data, "the bytes differ");
    let (s, d) = (
        source.join().unwrap().unwrap(),
        dest.join().unwrap().unwrap(),
    );
    assert_eq!(s.resets + d.resets, 0);
}

#[test]
fn a_qemu_that_never_migrates_times_the_source_out() {
    let qemu = TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = TunnelConfig {
        accept_timeout: Duration::from_secs(1),
        ..config(Codec::Lz4)
    };
    let started = Instant::now();
    let (_addr, source, dest) = proxies(qemu.local_addr().unwrap(), cfg);
    let err = source.join().unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::Timeout(m) if m.contains("QEMU did not connect")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the source gave up after {:?}",
        started.elapsed()
    );
    assert!(
        dest.join().unwrap().is_err(),
        "the destination saw the abort"
    );
}

/// Block `i` of the long stream below: text, zeros or pseudo-random bytes, so that segments take
/// different times to decode and the stream readers overtake each other.
fn block(i: u64, out: &mut [u8]) {
    let mut x = 0x2545_f491_4f6c_dd1du64 ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for (j, b) in out.iter_mut().enumerate() {
        *b = match i % 4 {
            0 => b"a text line of a guest's page cache\n"[j % 36],
            1 => 0,
            _ => xorshift(&mut x),
        };
    }
}

#[test]
fn a_long_stream_over_many_streams_arrives_in_order() {
    // Many segments of one connection spread over four streams: the destination's stream readers
    // release consecutive segments concurrently, and the bytes must still reach QEMU in order.
    const BLOCK: usize = 96 * 1024 + 17; // never a multiple of the segment size
    const BLOCKS: u64 = 1_500; // about 144 MB, several hundred segments
    let qemu = TcpListener::bind("127.0.0.1:0").unwrap();
    let qemu_addr = qemu.local_addr().unwrap();
    let dst = std::thread::spawn(move || {
        let (mut s, _) = qemu.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let (mut got, mut want) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
        for i in 0..BLOCKS {
            s.read_exact(&mut got)
                .unwrap_or_else(|e| panic!("block {i}: {e}"));
            block(i, &mut want);
            if got != want {
                let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
                return Err(format!("block {i} differs from byte {at} on"));
            }
        }
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        if rest.is_empty() {
            Ok(())
        } else {
            Err(format!("{} bytes too many", rest.len()))
        }
    });
    let cfg = TunnelConfig {
        streams: 4,
        local_streams: 4,
        window: 8 << 20,
        ..config(Codec::Lz4)
    };
    let (addr, source, dest) = proxies(qemu_addr, cfg);
    let mut s = TcpStream::connect(addr).unwrap();
    let mut buf = vec![0u8; BLOCK];
    for i in 0..BLOCKS {
        block(i, &mut buf);
        s.write_all(&buf).unwrap();
    }
    s.shutdown(Shutdown::Write).unwrap();
    let verdict = dst.join().unwrap();
    let mut rest = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.read_to_end(&mut rest);
    let (s, d) = (source.join().unwrap(), dest.join().unwrap());
    verdict.unwrap();
    let (s, d) = (s.unwrap(), d.unwrap());
    assert_eq!(s.raw_bytes_sent, BLOCKS * BLOCK as u64);
    assert_eq!(d.raw_bytes_received, s.raw_bytes_sent);
    assert_eq!(s.resets + d.resets, 0);
}

/// Certificate-mode security of a node whose certificate names `names`.
fn node(ca: &CertificateAuthority, names: &[&str]) -> Security {
    ca.security_for(names).unwrap()
}

/// A destination "QEMU" that records its first connection's bytes; `None` if no connection came
/// within 30 s (so that a broken tunnel fails the test instead of hanging it).
fn qemu_sink(qemu: TcpListener) -> JoinHandle<Option<Vec<u8>>> {
    std::thread::spawn(move || {
        qemu.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut s = loop {
            match qemu.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return None,
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).ok()?;
        Some(got)
    })
}

/// Carries one connection of `data` through proxies secured by `source` and `dest`, whose tunnel
/// goes to `via(destination proxy address)` (the destination proxy itself, or a relay in front of
/// it); checks the bytes arrived whole and returns both reports.
fn carry_one(
    source: Security,
    dest: Security,
    via: impl FnOnce(SocketAddr) -> SocketAddr,
    data: &[u8],
) -> (TunnelReport, TunnelReport) {
    let qemu = TcpListener::bind("127.0.0.1:0").unwrap();
    let qemu_addr = qemu.local_addr().unwrap();
    let dst = qemu_sink(qemu);
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let cfg = config(Codec::None);
    let d = DestinationProxy::bind(any, qemu_addr, dest, cfg.clone()).unwrap();
    let s = SourceProxy::bind(any, via(d.local_addr().unwrap()), source, cfg).unwrap();
    let addr = s.local_addr().unwrap();
    let (s, d) = (
        std::thread::spawn(move || s.run()),
        std::thread::spawn(move || d.run()),
    );
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = c.write_all(data);
    let _ = c.shutdown(Shutdown::Write);
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    let (s, d) = (s.join().unwrap().unwrap(), d.join().unwrap().unwrap());
    assert!(
        dst.join().unwrap().as_deref() == Some(data),
        "the bytes differ"
    );
    assert_eq!((s.channels, d.channels, s.resets + d.resets), (1, 1, 0));
    (s, d)
}

#[test]
fn a_pre_shared_key_alone_means_tls_and_the_reports_say_so() {
    let psk = Psk::generate();
    let (s, d) = carry_one(psk.clone().into(), psk.into(), |a| a, &content(3, 500_000));
    for r in [&s, &d] {
        assert_eq!(r.security, SecurityMode::PreSharedKey, "{r:?}");
        let tls = r.tls_session.as_deref().unwrap_or_default();
        assert!(tls.starts_with("TLSv1_3 "), "{tls:?}");
    }
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["security"], "tls-psk");
}

#[test]
fn certificates_authenticate_both_proxies() {
    let ca = CertificateAuthority::generate().unwrap();
    // The source checks that the destination's certificate names the address it dials.
    let (s, d) = carry_one(
        node(&ca, &["src"]),
        node(&ca, &["dest", "127.0.0.1"]),
        |a| a,
        &content(4, 300_000),
    );
    assert_eq!(s.security, SecurityMode::Certificates);
    assert_eq!(d.security, SecurityMode::Certificates);
    assert!(s.tls_session.is_some() && d.tls_session.is_some());
}

/// Runs a source proxy secured by `source` against a destination proxy secured by `dest` that must
/// refuse it; returns both errors, having checked that the destination QEMU was never contacted.
fn refused(source: Security, dest: Security) -> (Error, Error) {
    let qemu = TcpListener::bind("127.0.0.1:0").unwrap();
    qemu.set_nonblocking(true).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let cfg = TunnelConfig {
        accept_timeout: Duration::from_secs(2),
        ..config(Codec::Lz4)
    };
    let d = DestinationProxy::bind(any, qemu.local_addr().unwrap(), dest, cfg.clone()).unwrap();
    let s = SourceProxy::bind(any, d.local_addr().unwrap(), source, cfg).unwrap();
    let started = Instant::now();
    let d = std::thread::spawn(move || d.run());
    let source_error = s.run().unwrap_err();
    let dest_error = d.join().unwrap().unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(qemu.accept().is_err(), "the destination QEMU was contacted");
    (source_error, dest_error)
}

#[test]
fn a_source_with_a_certificate_of_another_ca_never_reaches_the_destination_qemu() {
    let (ca, other) = (
        CertificateAuthority::generate().unwrap(),
        CertificateAuthority::generate().unwrap(),
    );
    let (s, d) = refused(node(&other, &["src"]), node(&ca, &["127.0.0.1"]));
    assert!(
        matches!(s.security(), Some(SecurityError::Handshake { .. })),
        "source: {s}"
    );
    assert!(
        matches!(&d, Error::Timeout(m) if m.contains("TLS handshake")),
        "destination: {d}"
    );
}

#[test]
fn a_plain_text_source_is_refused_by_an_encrypted_destination() {
    let psk = Psk::generate();
    let (s, d) = refused(Security::insecure_plaintext(psk.clone()), psk.into());
    assert!(
        matches!(
            d.security(),
            Some(SecurityError::ModeMismatch {
                theirs: "plain-text DWCP",
                ours: "TLS",
                ..
            })
        ),
        "destination: {d}"
    );
    // The plain-text source reads frames, so the destination tells it why in one.
    assert!(
        matches!(&s, Error::Peer { message, .. } if message.contains("requires TLS")),
        "source: {s}"
    );
}

#[test]
fn an_encrypted_source_is_refused_by_a_plain_text_destination() {
    let psk = Psk::generate();
    let (s, d) = refused(psk.clone().into(), Security::insecure_plaintext(psk));
    assert!(
        matches!(
            s.security(),
            Some(SecurityError::ModeMismatch {
                theirs: "plain-text DWCP",
                ours: "TLS",
                ..
            })
        ),
        "source: {s}"
    );
    assert!(
        matches!(
            d.security(),
            Some(SecurityError::ModeMismatch { theirs: "TLS", .. })
        ),
        "destination: {d}"
    );
}

/// A relay on loopback in front of `target` that forwards its first `connections` connections
/// both ways and records every byte it forwards.
fn recording_relay(target: SocketAddr, connections: usize) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let wire = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&wire);
    std::thread::spawn(move || {
        for _ in 0..connections {
            let Ok((down, _)) = l.accept() else { return };
            let Ok(up) = TcpStream::connect(target) else {
                return;
            };
            for (from, to) in [
                (down.try_clone().unwrap(), up.try_clone().unwrap()),
                (up, down),
            ] {
                let record = Arc::clone(&record);
                std::thread::spawn(move || forward(from, to, &record));
            }
        }
    });
    (addr, wire)
}

/// Copies `from` to `to`, recording the bytes before they are passed on.
fn forward(mut from: TcpStream, mut to: TcpStream, record: &Mutex<Vec<u8>>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        record.lock().unwrap().extend_from_slice(&buf[..n]);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[test]
fn the_guest_s_bytes_cross_the_network_encrypted() {
    const MARKER: &[u8] = b"<guest page 0123456789abcdef>";
    let data: Vec<u8> = MARKER
        .iter()
        .copied()
        .cycle()
        .take(MARKER.len() * 20_000)
        .collect();
    let found = |wire: &[u8]| wire.windows(MARKER.len()).any(|w| w == MARKER);
    for security in [
        Security::psk(Psk::generate()),
        Security::insecure_plaintext(Psk::generate()),
    ] {
        let mut wire = None;
        let (s, _) = carry_one(
            security.clone(),
            security.clone(),
            // Every stream of the tunnel goes through the relay (three on loopback).
            |dest| {
                let (relay, w) = recording_relay(dest, 3);
                wire = Some(w);
                relay
            },
            &data,
        );
        let wire = wire.unwrap();
        let wire = wire.lock().unwrap();
        assert!(
            wire.len() > data.len(),
            "the relay saw {} bytes",
            wire.len()
        );
        assert_eq!(s.security, security.mode());
        if security.mode().is_encrypted() {
            assert!(
                !found(&wire),
                "the guest's bytes crossed in clear text over TLS"
            );
        } else {
            // The same check finds them when the tunnel is not encrypted.
            assert!(
                found(&wire),
                "plain text, yet the marker is not on the wire"
            );
            assert_eq!(s.tls_session, None);
        }
    }
}

#[test]
fn strangers_that_never_finish_tls_do_not_hold_the_tunnel_up() {
    let qemu = TcpListener::bind("127.0.0.1:0").unwrap();
    let qemu_addr = qemu.local_addr().unwrap();
    let dst = qemu_sink(qemu);
    let psk = Psk::generate();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    // Each handshake may take this long: strangers served one after the other would hold the
    // tunnel up for a multiple of it.
    let cfg = TunnelConfig {
        connect_timeout: Duration::from_secs(8),
        ..config(Codec::Lz4)
    };
    let d = DestinationProxy::bind(any, qemu_addr, psk.clone(), cfg.clone()).unwrap();
    let tunnel = d.local_addr().unwrap();
    let d = std::thread::spawn(move || d.run());
    // One says nothing, one stops inside its ClientHello; both stay connected.
    let silent = TcpStream::connect(tunnel).unwrap();
    let mut trickler = TcpStream::connect(tunnel).unwrap();
    trickler
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let s = SourceProxy::bind(any, tunnel, psk, cfg).unwrap();
    let addr = s.local_addr().unwrap();
    let s = std::thread::spawn(move || s.run());
    let data = content(9, 200_000);
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = c.write_all(&data);
    let _ = c.shutdown(Shutdown::Write);
    let got = dst.join().unwrap();
    let elapsed = started.elapsed();
    s.join().unwrap().unwrap();
    d.join().unwrap().unwrap();
    assert!(got == Some(data), "the bytes differ");
    assert!(
        elapsed < Duration::from_secs(5),
        "the strangers held the tunnel up: {elapsed:?}"
    );
    drop((silent, trickler));
}
