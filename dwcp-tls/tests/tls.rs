//! TLS sessions over real loopback sockets: what each mode accepts and refuses, and a session that
//! carries data both ways at once.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use dwcp_core::error::{Error, SecurityError};
use dwcp_core::frame::{FrameReader, FrameWriter};
use dwcp_core::handshake::{Offer, Psk, client_handshake, server_handshake};
use dwcp_core::transport::Conn;
use dwcp_tls::certs::CertificateAuthority;
use dwcp_tls::{Secured, Security, SecurityMode};

const DAY: Duration = Duration::from_secs(86_400);

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

fn node(ca: &CertificateAuthority, names: &[&str]) -> Security {
    ca.security_for(names).unwrap()
}

/// Runs `server.accept` on one side and `client.connect` on the other, then the DWCP stream
/// handshake over both; returns both results.
fn pair(server: Security, client: Security) -> (Result<(), Error>, Result<(), Error>) {
    let (l, addr) = listener();
    let srv = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let secured = server.accept(Box::new(s), deadline())?;
        dwcp_handshake_server(secured)
    });
    let conn = TcpStream::connect(addr).unwrap();
    let cli = client
        .connect(Box::new(conn), addr, deadline())
        .and_then(dwcp_handshake_client);
    (srv.join().unwrap(), cli)
}

type Halves = (FrameReader<Box<dyn Conn>>, FrameWriter<Box<dyn Conn>>);

fn halves(secured: &Secured) -> Halves {
    secured
        .conn
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (
        FrameReader::new(secured.conn.try_clone_conn().unwrap()),
        FrameWriter::new(secured.conn.try_clone_conn().unwrap()),
    )
}

fn dwcp_handshake_server(secured: Secured) -> Result<(), Error> {
    let (mut r, mut w) = halves(&secured);
    server_handshake(
        &mut r,
        &mut w,
        &secured.handshake_key,
        Offer::default(),
        |_| Ok(7),
    )
    .map(|_| ())
}

fn dwcp_handshake_client(secured: Secured) -> Result<(), Error> {
    let (mut r, mut w) = halves(&secured);
    client_handshake(
        &mut r,
        &mut w,
        &secured.handshake_key,
        Offer::default(),
        0,
        0,
    )
    .map(|_| ())
}

fn security_of(e: &Error) -> Option<&SecurityError> {
    e.security()
}

fn psk(b: u8) -> Psk {
    Psk::new(vec![b; 32]).unwrap()
}

#[test]
fn certificates_of_one_ca_authenticate_both_ways() {
    let ca = CertificateAuthority::generate().unwrap();
    let (s, c) = pair(node(&ca, &["127.0.0.1", "dest"]), node(&ca, &["src"]));
    s.unwrap();
    c.unwrap();
    assert_eq!(node(&ca, &["x"]).mode(), SecurityMode::Certificates);
}

#[test]
fn a_server_certificate_of_another_ca_is_refused_by_the_client() {
    let ca = CertificateAuthority::generate().unwrap();
    let other = CertificateAuthority::generate().unwrap();
    let (_s, c) = pair(node(&other, &["127.0.0.1"]), node(&ca, &["src"]));
    let e = c.unwrap_err();
    assert!(
        matches!(security_of(&e), Some(SecurityError::Handshake { reason, .. }) if reason.contains("invalid peer certificate")),
        "{e}"
    );
}

#[test]
fn a_client_certificate_of_another_ca_is_refused_by_the_server() {
    let ca = CertificateAuthority::generate().unwrap();
    let other = CertificateAuthority::generate().unwrap();
    let (s, c) = pair(node(&ca, &["127.0.0.1"]), node(&other, &["src"]));
    let e = s.unwrap_err();
    assert!(
        matches!(security_of(&e), Some(SecurityError::Handshake { .. })),
        "{e}"
    );
    // The client learns it at its first read, before any DWCP frame is accepted.
    let e = c.unwrap_err();
    assert!(e.security().is_some(), "{e}");
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let ca = CertificateAuthority::generate().unwrap();
    // A PSK-mode client presents no certificate.
    let (s, c) = pair(node(&ca, &["127.0.0.1"]), Security::psk(psk(1)));
    let e = s.unwrap_err();
    assert!(
        matches!(security_of(&e), Some(SecurityError::Handshake { .. })),
        "{e}"
    );
    assert!(c.is_err());
}

#[test]
fn an_expired_certificate_is_refused() {
    let ca = CertificateAuthority::generate().unwrap();
    let now = SystemTime::now();
    let expired = ca
        .issue_with_validity(&["127.0.0.1".to_string()], now - 30 * DAY, now - DAY)
        .unwrap();
    let server = Security::from_pem(
        ca.cert_pem().as_bytes(),
        expired.cert_pem.as_bytes(),
        expired.key_pem.as_bytes(),
    )
    .unwrap();
    let (_s, c) = pair(server, node(&ca, &["src"]));
    let e = c.unwrap_err();
    assert!(
        matches!(security_of(&e), Some(SecurityError::Handshake { reason, .. }) if reason.contains("expired")),
        "{e}"
    );
}

#[test]
fn a_server_certificate_for_another_name_is_refused() {
    let ca = CertificateAuthority::generate().unwrap();
    let (_s, c) = pair(node(&ca, &["10.9.9.9", "other-host"]), node(&ca, &["src"]));
    let e = c.unwrap_err();
    assert!(
        matches!(security_of(&e), Some(SecurityError::Handshake { reason, .. }) if reason.contains("not valid for name")),
        "{e}"
    );
    // The same certificate is accepted when the client is told the name to check.
    let client = node(&ca, &["src"]).with_server_name("other-host").unwrap();
    let (s, c) = pair(node(&ca, &["10.9.9.9", "other-host"]), client);
    s.unwrap();
    c.unwrap();
}

#[test]
fn psk_mode_needs_the_same_key_on_both_ends() {
    let (s, c) = pair(Security::psk(psk(1)), Security::psk(psk(1)));
    s.unwrap();
    c.unwrap();
    let (s, c) = pair(Security::psk(psk(1)), Security::psk(psk(2)));
    assert!(matches!(
        c.unwrap_err(),
        Error::Handshake(dwcp_core::error::HandshakeError::AuthenticationFailed)
    ),);
    assert!(s.is_err());
}

#[test]
fn a_plain_text_peer_cannot_talk_to_an_encrypted_endpoint() {
    let (s, c) = pair(Security::psk(psk(1)), Security::insecure_plaintext(psk(1)));
    let e = s.unwrap_err();
    assert!(
        matches!(
            security_of(&e),
            Some(SecurityError::ModeMismatch {
                theirs: "plain-text DWCP",
                ..
            })
        ),
        "{e}"
    );
    assert!(c.is_err());
    // And an encrypted client gets nowhere with a plain-text endpoint.
    let (s, c) = pair(Security::insecure_plaintext(psk(1)), Security::psk(psk(1)));
    assert!(s.is_err());
    assert!(c.is_err());
}

/// A relay that forwards bytes between two sockets and flips one byte of the server-bound direction
/// once `flip_at` bytes have passed.
fn tampering_relay(upstream: SocketAddr, flip_at: usize) -> SocketAddr {
    let (l, addr) = listener();
    thread::spawn(move || {
        let (down, _) = l.accept().unwrap();
        let up = TcpStream::connect(upstream).unwrap();
        let (mut d2, mut u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
        thread::spawn(move || {
            let _ = std::io::copy(&mut u2, &mut d2);
        });
        let (mut down, mut up) = (down, up);
        let mut seen = 0usize;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match down.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if seen <= flip_at && flip_at < seen + n {
                buf[flip_at - seen] ^= 0x40;
            }
            seen += n;
            if up.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    addr
}

#[test]
fn a_tampered_record_is_an_integrity_error_not_data() {
    let security = Security::psk(psk(3));
    let (l, addr) = listener();
    let server = security.clone();
    let srv = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let secured = server.accept(Box::new(s), deadline()).unwrap();
        let mut conn = secured.conn;
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return Ok(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    });
    // Well past the handshake (a few KiB): inside the application data.
    let relay = tampering_relay(addr, 200_000);
    let secured = security
        .connect(
            Box::new(TcpStream::connect(relay).unwrap()),
            addr,
            deadline(),
        )
        .unwrap();
    let mut conn = secured.conn;
    let data = vec![0x5au8; 1 << 20];
    let _ = conn.write_all(&data);
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let e = srv.join().unwrap().unwrap_err();
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<SecurityError>());
    assert!(
        matches!(inner, Some(SecurityError::Integrity { .. })),
        "{e}"
    );
}

#[test]
fn data_flows_both_ways_at_once_intact() {
    let ca = CertificateAuthority::generate().unwrap();
    let server = node(&ca, &["127.0.0.1"]);
    let client = node(&ca, &["src"]);
    let (l, addr) = listener();
    const LEN: usize = 24 << 20;
    let pattern = |i: usize| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1];
    let echo_hash = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let secured = server.accept(Box::new(s), deadline()).unwrap();
        let mut reader = secured.conn.try_clone_conn().unwrap();
        let mut writer = secured.conn;
        // Send our own stream while reading theirs, on two threads of one session.
        let sender = thread::spawn(move || {
            let block: Vec<u8> = (0..LEN).map(pattern).collect();
            for part in block.chunks(1 << 20) {
                writer.write_all(part).unwrap();
            }
            writer
        });
        let mut got = vec![0u8; LEN];
        reader.read_exact(&mut got).unwrap();
        let _writer = sender.join().unwrap();
        got
    });
    let secured = client
        .connect(
            Box::new(TcpStream::connect(addr).unwrap()),
            addr,
            deadline(),
        )
        .unwrap();
    assert!(
        secured.session.as_deref().unwrap().contains("TLSv1_3"),
        "{:?}",
        secured.session
    );
    let mut reader = secured.conn.try_clone_conn().unwrap();
    let mut writer = secured.conn;
    let sender = thread::spawn(move || {
        let block: Vec<u8> = (0..LEN).map(|i| pattern(i) ^ 0xff).collect();
        let mut sent = 0;
        while sent < LEN {
            let n = (LEN - sent).min(777_777);
            let a = &block[sent..sent + n / 2];
            let b = &block[sent + n / 2..sent + n];
            let mut slices = [std::io::IoSlice::new(a), std::io::IoSlice::new(b)];
            let mut slices = &mut slices[..];
            while !slices.is_empty() {
                let w = writer.write_vectored(slices).unwrap();
                std::io::IoSlice::advance_slices(&mut slices, w);
            }
            sent += n;
        }
        writer
    });
    let mut got = vec![0u8; LEN];
    reader.read_exact(&mut got).unwrap();
    assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i)));
    let _w = sender.join().unwrap();
    let theirs = echo_hash.join().unwrap();
    assert!(
        theirs
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pattern(i) ^ 0xff)
    );
}

#[test]
fn a_silent_or_trickling_peer_is_dropped_at_the_handshake_deadline() {
    let security = Security::psk(psk(4));
    let (l, addr) = listener();
    let srv = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let started = Instant::now();
        let r = security.accept(Box::new(s), Instant::now() + Duration::from_millis(700));
        (r.map(|_| ()), started.elapsed())
    });
    // One byte of a TLS record header every 100 ms: each read returns in time, the whole does not.
    let mut c = TcpStream::connect(addr).unwrap();
    for b in [
        0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0, 0, 0, 0, 0,
    ] {
        if c.write_all(&[b]).is_err() {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let (r, took) = srv.join().unwrap();
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

/// Relays one connection to `upstream` and keeps every byte the client sent.
fn recording_relay(upstream: SocketAddr) -> (SocketAddr, thread::JoinHandle<Vec<u8>>) {
    let (l, addr) = listener();
    let recorder = thread::spawn(move || {
        let (down, _) = l.accept().unwrap();
        let up = TcpStream::connect(upstream).unwrap();
        let (mut down_r, mut up_w) = (down.try_clone().unwrap(), up.try_clone().unwrap());
        let (mut up_r, mut down_w) = (up, down);
        let back = thread::spawn(move || {
            let _ = std::io::copy(&mut up_r, &mut down_w);
            let _ = down_w.shutdown(std::net::Shutdown::Write);
        });
        let mut sent = Vec::new();
        let mut buf = [0u8; 16 << 10];
        loop {
            match down_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    sent.extend_from_slice(&buf[..n]);
                    if up_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = up_w.shutdown(std::net::Shutdown::Write);
        let _ = back.join();
        sent
    });
    (addr, recorder)
}

#[test]
fn a_recorded_session_replayed_to_the_server_is_refused() {
    for (name, security) in [
        ("tls-psk", Security::psk(psk(5))),
        ("tls-certificates", {
            let ca = CertificateAuthority::generate().unwrap();
            // One certificate on both ends is enough here: both trust the CA.
            node(&ca, &["127.0.0.1"])
        }),
    ] {
        let (l, addr) = listener();
        let server = security.clone();
        let srv = thread::spawn(move || {
            let mut results = Vec::new();
            for _ in 0..2 {
                let (s, _) = l.accept().unwrap();
                results.push(
                    server
                        .accept(Box::new(s), deadline())
                        .and_then(dwcp_handshake_server),
                );
            }
            results
        });
        let (relay, recorded) = recording_relay(addr);
        let conn = TcpStream::connect(relay).unwrap();
        let first = security
            .connect(Box::new(conn), addr, deadline())
            .and_then(dwcp_handshake_client);
        assert!(
            first.is_ok(),
            "{name}: the recorded session itself failed: {first:?}"
        );
        let recorded = recorded.join().unwrap();
        assert!(recorded.len() > 200, "{name}: nothing was recorded");
        // Everything the client said, sent again as is to a new connection.
        let mut replay = TcpStream::connect(addr).unwrap();
        replay.write_all(&recorded).unwrap();
        let _ = replay.shutdown(std::net::Shutdown::Write);
        let results = srv.join().unwrap();
        assert!(results[0].is_ok(), "{name}: {:?}", results[0]);
        let e = results[1]
            .as_ref()
            .expect_err("a replayed session was accepted");
        assert!(
            matches!(security_of(e), Some(SecurityError::Handshake { .. })),
            "{name}: {e}"
        );
    }
}
