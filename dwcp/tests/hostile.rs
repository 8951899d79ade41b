//! Hostile peers beside a real migration: one address flooding the listener with connections that
//! never authenticate, slow peers trickling bytes, and a destination at its session limits.

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{guest, psk, receiver_config, source_config};
use dwcp::{Error, Listener, ListenerLimits, Migration, MigrationConfig, ReceiverConfig};
use dwcp_core::ErrorCode;
use dwcp_core::memory::GuestRam;
use dwcp_core::sim::ContentMix;

fn connect_from(source: Ipv4Addr, target: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddr::from((source, 0)).into())?;
    s.connect_timeout(&target.into(), Duration::from_secs(2))?;
    Ok(s.into())
}

/// Keeps `count` connections from `source` open against `target` until `stop`, replacing those
/// the listener closes; slow ones write one byte a second. Bounded by `limit` whatever happens.
fn flood(
    source: Ipv4Addr,
    target: SocketAddr,
    count: usize,
    slow: bool,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<u64>> {
    let limit = Instant::now() + Duration::from_secs(60);
    (0..count)
        .map(|_| {
            let stop = Arc::clone(stop);
            std::thread::spawn(move || {
                let mut opened = 0;
                while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
                    let Ok(mut c) = connect_from(source, target) else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    opened += 1;
                    let _ = c.set_read_timeout(Some(Duration::from_millis(100)));
                    // A TLS record header, then nothing more than a byte a second.
                    let _ = c.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00]);
                    let mut last = Instant::now();
                    loop {
                        if stop.load(Ordering::Relaxed) || Instant::now() >= limit {
                            break;
                        }
                        if slow && last.elapsed() >= Duration::from_secs(1) {
                            last = Instant::now();
                            if c.write_all(&[0x41]).is_err() {
                                break;
                            }
                        }
                        let mut b = [0u8; 64];
                        match std::io::Read::read(&mut c, &mut b) {
                            Ok(0) => break,
                            Ok(_) => {}
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => break,
                        }
                    }
                }
                opened
            })
        })
        .collect()
}

#[test]
fn strangers_holding_every_handshake_they_may_do_not_keep_a_real_source_out() {
    // Strangers may hold a handshake for 30 s; the real source gives up on its own after 3 s. Without
    // the per-address limit the flood takes every slot and the source times out in the backlog.
    let config = ReceiverConfig {
        connect_timeout: Duration::from_secs(30),
        limits: ListenerLimits {
            max_handshakes: 40,
            max_handshakes_per_peer: 4,
            ..ListenerLimits::default()
        },
        ..receiver_config()
    };
    let listener =
        Arc::new(Listener::bind("127.0.0.1:0".parse().unwrap(), psk(3), config).unwrap());
    let addr = listener.local_addr().unwrap();
    let rx = {
        let l = Arc::clone(&listener);
        std::thread::spawn(move || {
            let incoming = l.accept_source()?;
            let ram = GuestRam::anonymous(incoming.layout().clone()).unwrap();
            incoming.receive_into(&ram).map(|r| (r, ram))
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    // One address opening connections in a loop, and seven more each trickling a byte a second:
    // 100 + 7 × 4 connections, which may hold 32 of the 40 slots.
    let mut floods = flood(Ipv4Addr::new(127, 0, 0, 2), addr, 100, false, &stop);
    for i in 3..10 {
        floods.extend(flood(Ipv4Addr::new(127, 0, 0, i), addr, 4, true, &stop));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while listener.handshakes_in_progress() < 28 || listener.connections_refused_by_limits() == 0 {
        assert!(
            Instant::now() < deadline,
            "the flood never filled the slots: {} in progress, {} refused",
            listener.handshakes_in_progress(),
            listener.connections_refused_by_limits()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let g = guest(16 << 20, ContentMix::RANDOM, 11);
    let cfg = MigrationConfig {
        connect_timeout: Duration::from_secs(3),
        reconnect_attempts: 0,
        ..source_config()
    };
    let sent =
        Migration::new(addr, psk(3))
            .config(cfg)
            .run(&*g, &mut g.dirty_log(), &mut g.control());
    let refused = listener.connections_refused_by_limits();
    stop.store(true, Ordering::Relaxed);
    let opened: u64 = floods.into_iter().map(|t| t.join().unwrap()).sum();
    let report = sent.unwrap_or_else(|e| panic!("the real source was kept out: {e}"));
    assert!(report.digest_match);
    let (received, ram) = rx.join().unwrap().unwrap();
    assert!(received.digest_match);
    common::assert_same_memory(&*g, &ram);
    assert!(
        refused > 0 && opened > 128,
        "the flood was not a flood: {opened} connections opened, {refused} refused"
    );
}

#[test]
fn a_destination_at_its_session_limit_for_an_address_refuses_the_next_source_as_busy() {
    let config = ReceiverConfig {
        limits: ListenerLimits {
            max_sessions_per_peer: 1,
            ..ListenerLimits::default()
        },
        ..receiver_config()
    };
    let listener =
        Arc::new(Listener::bind("127.0.0.1:0".parse().unwrap(), psk(4), config).unwrap());
    let addr = listener.local_addr().unwrap();
    let first = {
        let l = Arc::clone(&listener);
        std::thread::spawn(move || {
            let incoming = l.accept()?;
            let ram = GuestRam::anonymous(incoming.layout().clone()).unwrap();
            incoming.receive_into(&ram)
        })
    };
    // The first migration runs long enough (a capped link) for the second to arrive during it.
    let slow = guest(32 << 20, ContentMix::RANDOM, 12);
    let slow_source = {
        let g = Arc::clone(&slow);
        std::thread::spawn(move || {
            let cfg = MigrationConfig {
                max_bandwidth: Some(16 << 20),
                ..source_config()
            };
            Migration::new(addr, psk(4))
                .config(cfg)
                .run(&*g, &mut g.dirty_log(), &mut g.control())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while listener.running_sessions() == 0 {
        assert!(Instant::now() < deadline, "the first session never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let second = {
        let l = Arc::clone(&listener);
        std::thread::spawn(move || l.accept().map(|_| ()))
    };
    let g = guest(4 << 20, ContentMix::RANDOM, 13);
    g.start_workload(1 << 20, 13);
    let cfg = MigrationConfig {
        reconnect_attempts: 0,
        ..source_config()
    };
    let err = Migration::new(addr, psk(4))
        .config(cfg)
        .run(&*g, &mut g.dirty_log(), &mut g.control())
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Peer {
                code: ErrorCode::Busy,
                ..
            }
        ),
        "{err}"
    );
    let refused = second.join().unwrap().unwrap_err();
    assert!(matches!(refused, Error::Busy(_)), "{refused}");
    assert!(
        common::guest_keeps_running(&g),
        "the refused source's guest was left paused"
    );
    // The session already running is not disturbed.
    assert!(slow_source.join().unwrap().unwrap().digest_match);
    assert!(first.join().unwrap().unwrap().digest_match);
}
