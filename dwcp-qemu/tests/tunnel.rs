//! The tunnel over real loopback sockets, with plain TCP peers standing in for the two QEMUs (these
//! tests check the tunnel's own guarantees; `qemu_e2e.rs` runs real QEMUs).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dwcp_core::error::Error;
use dwcp_core::handshake::Psk;
use dwcp_hde::Codec;
use dwcp_qemu::{DestinationProxy, SourceProxy, TunnelConfig, TunnelReport};

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

/// Starts both proxies; returns the address "QEMU" migrates to and the two proxy threads.
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
