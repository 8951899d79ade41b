//! The destination against hand-made peers: hostile input, reordering on purpose, silent peers.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use dwcp::{Migration, ReceiverConfig};
use dwcp_core::digest::memory_digest;
use dwcp_core::frame::{FrameReader, FrameType, FrameWriter, encode_frame};
use dwcp_core::handshake::{MAX_VERSION, Offer, client_handshake};
use dwcp_core::memory::{GuestRam, MemoryLayout, MemorySink, MemorySource, PAGE_SIZE};
use dwcp_core::messages::{Ack, ClientHello, DigestMessage, ErrorMessage, Finish, SessionInit};
use dwcp_core::{Error, ErrorCode, FrameError, HandshakeError};
use dwcp_hde::{Codec, EncodeCounters, encode_chunk};

type Reader = FrameReader<TcpStream>;
type Writer = FrameWriter<TcpStream>;

fn open(addr: SocketAddr, session: u64, index: u16) -> (Reader, Writer, u64) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = FrameReader::new(s.try_clone().unwrap());
    let mut w = FrameWriter::new(s);
    let neg = client_handshake(&mut r, &mut w, &psk(1), Offer::default(), session, index).unwrap();
    (r, w, neg.session_id)
}

fn memory_with(pages: u64, byte: u8) -> GuestRam {
    let ram = GuestRam::anonymous(MemoryLayout::flat(pages * PAGE_SIZE as u64).unwrap()).unwrap();
    for p in 0..pages {
        ram.write_page(p, &[byte.wrapping_add(p as u8); PAGE_SIZE]);
    }
    ram
}

/// A Data frame's payload: chunk `id` carrying `pages` of `from` as iteration `iteration`.
fn data(id: u64, iteration: u32, pages: &[u64], from: &GuestRam) -> Vec<u8> {
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    encode_chunk(
        Codec::Lz4,
        iteration,
        pages,
        from,
        &mut out,
        &mut scratch,
        &EncodeCounters::default(),
        None,
    )
    .unwrap();
    let mut payload = id.to_le_bytes().to_vec();
    payload.extend_from_slice(&out);
    payload
}

fn digest_of(m: &GuestRam) -> u128 {
    memory_digest(m.layout().total_pages(), 1, &|p| {
        MemorySource::page_digest(m, p)
    })
}

/// An authenticated source with `streams` streams that has announced a flat layout of `pages` pages.
fn start_session(addr: SocketAddr, pages: u64, streams: u16) -> Vec<(Reader, Writer)> {
    let (mut r0, mut w0, sid) = open(addr, 0, 0);
    let layout = MemoryLayout::flat(pages * PAGE_SIZE as u64).unwrap();
    let init = SessionInit::new(layout, streams, MAX_VERSION, None);
    w0.write_frame(FrameType::SessionInit, &init.encode())
        .unwrap();
    assert_eq!(read(&mut r0).0, FrameType::SessionReady);
    let mut all = vec![(r0, w0)];
    for i in 1..streams {
        let (r, w, joined) = open(addr, sid, i);
        assert_eq!(joined, sid);
        all.push((r, w));
    }
    all
}

#[test]
fn an_older_copy_arriving_late_on_another_stream_never_wins() {
    let (l, addr) = listener(receiver_config());
    let rx = spawn_receiver_on(l);
    let mut s = start_session(addr, 4, 2);
    let old = memory_with(4, 1);
    let new = memory_with(4, 100);
    // Iteration 1 overtakes iteration 0: it is sent and applied first, on stream 1.
    s[1].1
        .write_frame(FrameType::Data, &data(1, 1, &[0, 1, 2, 3], &new))
        .unwrap();
    let (ft, p) = read(&mut s[1].0);
    assert_eq!(
        (ft, Ack::decode(&p).unwrap().through_seq),
        (FrameType::Ack, 2)
    );
    s[0].1
        .write_frame(FrameType::Data, &data(0, 0, &[0, 1, 2, 3], &old))
        .unwrap();
    assert_eq!(read(&mut s[0].0).0, FrameType::Ack);
    s[0].1
        .write_frame(
            FrameType::Finish,
            &Finish {
                final_iteration: 1,
                data_frames: 2,
            }
            .encode(),
        )
        .unwrap();
    let (ft, p) = read(&mut s[0].0);
    assert_eq!(ft, FrameType::Verdict);
    assert_eq!(
        DigestMessage::decode(&p).unwrap().digest,
        digest_of(&new),
        "destination holds the newer copy"
    );
    s[0].1
        .write_frame(
            FrameType::Commit,
            &DigestMessage {
                digest: digest_of(&new),
            }
            .encode(),
        )
        .unwrap();
    assert_eq!(read(&mut s[0].0).0, FrameType::CommitAck);
    for (_, w) in &mut s {
        w.write_frame(FrameType::Close, &[]).unwrap();
    }
    let (report, ram) = rx.join().unwrap();
    let report = report.unwrap();
    assert_eq!(report.stale_pages_dropped, 4);
    assert_eq!(report.pages_applied, 4);
    let ram = ram.unwrap();
    let mut buf = vec![0u8; PAGE_SIZE];
    for p in 0..4 {
        ram.copy_out(p, &mut buf);
        assert_eq!(buf, vec![100 + p as u8; PAGE_SIZE]);
    }
}

#[test]
fn finish_with_missing_frames_or_pages_is_refused() {
    let (l, addr) = listener(receiver_config());
    let rx = spawn_receiver_on(l);
    let mut s = start_session(addr, 4, 1);
    let m = memory_with(4, 1);
    s[0].1
        .write_frame(FrameType::Data, &data(0, 0, &[0, 1], &m))
        .unwrap();
    read(&mut s[0].0);
    // Claims two data frames were sent; only one arrived (and pages 2 and 3 never did).
    s[0].1
        .write_frame(
            FrameType::Finish,
            &Finish {
                final_iteration: 0,
                data_frames: 2,
            }
            .encode(),
        )
        .unwrap();
    let (ft, p) = read(&mut s[0].0);
    assert_eq!(ft, FrameType::Error);
    assert_eq!(ErrorMessage::decode(&p).unwrap().code, ErrorCode::Protocol);
    assert!(matches!(rx.join().unwrap().0, Err(Error::Protocol(_))));
}

#[test]
fn pages_outside_the_layout_are_refused_and_reported() {
    let (l, addr) = listener(receiver_config());
    let rx = spawn_receiver_on(l);
    let mut s = start_session(addr, 4, 1);
    let bigger = memory_with(8, 1);
    s[0].1
        .write_frame(FrameType::Data, &data(0, 0, &[6], &bigger))
        .unwrap();
    let (ft, p) = read(&mut s[0].0);
    assert_eq!(ft, FrameType::Error);
    assert_eq!(ErrorMessage::decode(&p).unwrap().code, ErrorCode::Protocol);
    let (result, ram) = rx.join().unwrap();
    assert!(
        matches!(
            result,
            Err(Error::Chunk(dwcp_core::ChunkError::PageOutOfRange {
                page: 6,
                total_pages: 4
            }))
        ),
        "{result:?}"
    );
    let ram = ram.unwrap();
    assert_eq!(
        digest_of(&ram),
        digest_of(&memory_with_zero(4)),
        "nothing was written"
    );
}

fn memory_with_zero(pages: u64) -> GuestRam {
    GuestRam::anonymous(MemoryLayout::flat(pages * PAGE_SIZE as u64).unwrap()).unwrap()
}

#[test]
fn garbage_and_oversize_frames_are_refused_before_authentication() {
    let (l, addr) = listener(receiver_config());
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: example\r\nAccept: */*\r\n\r\n")
        .unwrap();
    let e = l.accept().unwrap_err();
    assert!(matches!(e, Error::Frame(FrameError::BadMagic(_))), "{e:?}");

    let mut s = TcpStream::connect(addr).unwrap();
    let mut frame = Vec::new();
    encode_frame(FrameType::ClientHello, 0, 0, &[0u8; 8], &mut frame);
    frame[24..28].copy_from_slice(&(1u32 << 30).to_le_bytes());
    s.write_all(&frame).unwrap();
    assert!(matches!(
        l.accept().unwrap_err(),
        Error::Frame(FrameError::Oversize { .. })
    ));

    let mut s = TcpStream::connect(addr).unwrap();
    let mut frame = Vec::new();
    encode_frame(
        FrameType::ClientHello,
        0,
        0,
        &ClientHello {
            min_version: 1,
            max_version: 1,
            capabilities: 0,
            nonce: [0; 32],
            session_id: 0,
            stream_index: 0,
        }
        .encode(),
        &mut frame,
    );
    frame[50] ^= 1;
    s.write_all(&frame).unwrap();
    assert!(matches!(
        l.accept().unwrap_err(),
        Error::Frame(FrameError::ChecksumMismatch)
    ));

    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&frame[..30]).unwrap();
    drop(s);
    assert!(matches!(l.accept().unwrap_err(), Error::Io { .. }));
}

#[test]
fn unsupported_versions_are_refused_with_a_typed_error_on_both_sides() {
    let (l, addr) = listener(receiver_config());
    let t = std::thread::spawn(move || l.accept().map(|_| ()));
    let s = TcpStream::connect(addr).unwrap();
    let mut r = FrameReader::new(s.try_clone().unwrap());
    let mut w = FrameWriter::new(s);
    let future = Offer {
        min_version: MAX_VERSION + 1,
        max_version: MAX_VERSION + 2,
        capabilities: 0,
    };
    let err = client_handshake(&mut r, &mut w, &psk(1), future, 0, 0).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Peer {
                code: ErrorCode::Version,
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(
        t.join().unwrap(),
        Err(Error::Handshake(HandshakeError::VersionMismatch {
            theirs_min: 3,
            theirs_max: 4,
            ..
        }))
    ));
}

#[test]
fn a_client_that_cannot_prove_the_key_is_refused() {
    let (l, addr) = listener(receiver_config());
    let t = std::thread::spawn(move || l.accept().map(|_| ()));
    let s = TcpStream::connect(addr).unwrap();
    let mut r = FrameReader::new(s.try_clone().unwrap());
    let mut w = FrameWriter::new(s);
    let hello = ClientHello {
        min_version: 1,
        max_version: 1,
        capabilities: 3,
        nonce: [7; 32],
        session_id: 0,
        stream_index: 0,
    };
    w.write_frame(FrameType::ClientHello, &hello.encode())
        .unwrap();
    let (ft, p) = read(&mut r);
    assert_eq!(ft, FrameType::ServerHello);
    // Ignore the server's proof and answer with a forged one (its own MAC reflected back).
    let sid = u64::from_le_bytes(p[37..45].try_into().unwrap());
    w.bind_session(sid);
    r.bind_session(sid, 4096);
    w.write_frame(FrameType::ClientAuth, &p[45..77]).unwrap();
    let (ft, p) = read(&mut r);
    assert_eq!(ft, FrameType::Error);
    assert_eq!(
        ErrorMessage::decode(&p).unwrap().code,
        ErrorCode::Authentication
    );
    assert!(matches!(
        t.join().unwrap(),
        Err(Error::Handshake(HandshakeError::AuthenticationFailed))
    ));
}

#[test]
fn a_silent_source_times_out_instead_of_hanging() {
    // A broken or silent stream does not end the session at once: the source may reconnect within
    // the larger of the two time-outs.
    let cfg = ReceiverConfig {
        io_timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_millis(300),
        ..receiver_config()
    };
    let (l, addr) = listener(cfg);
    let rx = spawn_receiver_on(l);
    let _s = start_session(addr, 4, 1);
    let started = Instant::now();
    let (result, _) = rx.join().unwrap();
    assert!(matches!(result, Err(Error::Timeout(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_destination_that_stops_acknowledging_fails_the_source_which_keeps_running() {
    let fake = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = fake.local_addr().unwrap();
    // Authenticates, accepts the layout, then reads nothing more and never acknowledges.
    let t = std::thread::spawn(move || {
        let (s, _) = fake.accept().unwrap();
        let mut r = FrameReader::new(s.try_clone().unwrap());
        let mut w = FrameWriter::new(s);
        dwcp_core::handshake::server_handshake(&mut r, &mut w, &psk(1), Offer::default(), |_| {
            Ok(77)
        })
        .unwrap();
        let mut p = Vec::new();
        r.read_frame(&mut p).unwrap();
        w.write_frame(FrameType::SessionReady, &[]).unwrap();
        std::thread::sleep(Duration::from_secs(3));
    });
    let g = guest(4 << 20, dwcp_core::sim::ContentMix::RANDOM, 1);
    g.start_workload(4 << 20, 1);
    let cfg = dwcp::MigrationConfig {
        streams: 1,
        max_streams: 1,
        io_timeout: Duration::from_millis(500),
        reconnect_attempts: 2,
        ..source_config()
    };
    let started = Instant::now();
    let err = dwcp::Migration::new(addr, plain(1))
        .config(cfg)
        .run(&*g, &mut g.dirty_log(), &mut g.control())
        .unwrap_err();
    // Either the source gave up waiting for acknowledgements, or it treated the silent stream as lost
    // and could not reconnect (the fake accepts one connection only): both are clear, bounded errors.
    assert!(
        matches!(err, Error::Timeout(_) | Error::StreamsLost { .. }),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(guest_keeps_running(&g), "the source guest was resumed");
    t.join().unwrap();
}

#[test]
fn data_after_finish_is_refused() {
    let (l, addr) = listener(receiver_config());
    let rx = spawn_receiver_on(l);
    let mut s = start_session(addr, 2, 1);
    let m = memory_with(2, 1);
    s[0].1
        .write_frame(FrameType::Data, &data(0, 0, &[0, 1], &m))
        .unwrap();
    read(&mut s[0].0);
    s[0].1
        .write_frame(
            FrameType::Finish,
            &Finish {
                final_iteration: 0,
                data_frames: 1,
            }
            .encode(),
        )
        .unwrap();
    assert_eq!(read(&mut s[0].0).0, FrameType::Verdict);
    s[0].1
        .write_frame(FrameType::Data, &data(1, 1, &[0], &memory_with(2, 9)))
        .unwrap();
    let (ft, p) = read(&mut s[0].0);
    assert_eq!(ft, FrameType::Error, "{:?}", ErrorMessage::decode(&p));
    assert!(matches!(rx.join().unwrap().0, Err(Error::Protocol(_))));
}

#[test]
fn a_silent_stranger_does_not_hold_up_the_streams_of_a_session() {
    let cfg = ReceiverConfig {
        connect_timeout: Duration::from_secs(5),
        ..receiver_config()
    };
    let (l, addr) = listener(cfg);
    let rx = spawn_receiver_on(l);
    let started = Instant::now();
    let (mut r0, mut w0, sid) = open(addr, 0, 0);
    let layout = MemoryLayout::flat(PAGE_SIZE as u64).unwrap();
    let init = SessionInit::new(layout, 2, MAX_VERSION, None);
    w0.write_frame(FrameType::SessionInit, &init.encode())
        .unwrap();
    assert_eq!(read(&mut r0).0, FrameType::SessionReady);
    let _stranger = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (mut r1, mut w1, _) = open(addr, sid, 1);
    let m = memory_with(1, 5);
    w1.write_frame(FrameType::Data, &data(0, 0, &[0], &m))
        .unwrap();
    assert_eq!(read(&mut r1).0, FrameType::Ack);
    w0.write_frame(
        FrameType::Finish,
        &Finish {
            final_iteration: 0,
            data_frames: 1,
        }
        .encode(),
    )
    .unwrap();
    let (ft, p) = read(&mut r0);
    assert_eq!(ft, FrameType::Verdict, "{:?}", ErrorMessage::decode(&p));
    w0.write_frame(FrameType::Commit, &p).unwrap();
    assert_eq!(read(&mut r0).0, FrameType::CommitAck);
    w0.write_frame(FrameType::Close, &[]).unwrap();
    w1.write_frame(FrameType::Close, &[]).unwrap();
    rx.join().unwrap().0.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn strangers_do_not_end_or_delay_a_destination_waiting_for_its_source() {
    // A scanner's worth of bad connections first: garbage, a wrong key, and silent ones that hold
    // their handshake until the time-out (5 s here).
    let (l, addr) = listener(receiver_config());
    let rx = std::thread::spawn(move || {
        let incoming = l.accept_source()?;
        let ram = GuestRam::anonymous(incoming.layout().clone()).unwrap();
        incoming.receive_into(&ram).map(|r| (r, ram))
    });
    let mut silent = Vec::new();
    for i in 0..20u8 {
        let mut s = TcpStream::connect(addr).unwrap();
        if i % 4 == 0 {
            silent.push(s);
        } else {
            let _ = s.write_all(&[i; 64]);
        }
    }
    let wrong_key = Migration::new(addr, plain(9)).config(source_config());
    let g = guest(4 << 20, dwcp_core::sim::ContentMix::IDLE_GUEST, 21);
    let refused = wrong_key.run(&*g, &mut g.dirty_log(), &mut g.control());
    assert!(refused.is_err(), "a source with another key was let in");
    let started = Instant::now();
    let report = Migration::new(addr, plain(1))
        .config(source_config())
        .run(&*g, &mut g.dirty_log(), &mut g.control())
        .unwrap();
    let (received, ram) = rx.join().unwrap().unwrap();
    assert!(report.digest_match && received.digest_match);
    common::assert_same_memory(&*g, &ram);
    // The five silent strangers hold five handshake threads for 5 s, not the real source.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the real source waited {:?} behind strangers",
        started.elapsed()
    );
    drop(silent);
}
