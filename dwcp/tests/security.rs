//! The engine over TLS: certificate mode end to end, refusals before any page is written, and a
//! tampered stream that aborts the migration while the source guest keeps running.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::{guest, guest_keeps_running, psk, receiver_config, source_config, spawn_receiver_on};
use dwcp::{Listener, Migration, Security, SecurityMode};
use dwcp_core::error::SecurityError;
use dwcp_core::sim::ContentMix;
use dwcp_tls::certs::CertificateAuthority;

fn node(ca: &CertificateAuthority, name: &str) -> Security {
    ca.security_for(&[name, "127.0.0.1"]).unwrap()
}

fn bind(security: Security) -> (Listener, SocketAddr) {
    let l = Listener::bind("127.0.0.1:0".parse().unwrap(), security, receiver_config()).unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

#[test]
fn a_migration_with_certificates_arrives_intact_and_says_how_it_was_protected() {
    let ca = CertificateAuthority::generate().unwrap();
    let (l, addr) = bind(node(&ca, "dest"));
    let rx = spawn_receiver_on(l);
    let g = guest(16 << 20, ContentMix::IDLE_GUEST, 5);
    g.start_workload(2 << 20, 5);
    let report = Migration::new(addr, node(&ca, "src"))
        .config(source_config())
        .run(&*g, &mut g.dirty_log(), &mut g.control())
        .unwrap();
    let (received, ram) = rx.join().unwrap();
    let received = received.unwrap();
    assert!(report.digest_match && received.digest_match);
    assert_eq!(report.security, SecurityMode::Certificates);
    assert_eq!(received.security, SecurityMode::Certificates);
    common::assert_same_memory(&*g, &ram.unwrap());
}

#[test]
fn a_source_with_a_certificate_of_another_ca_is_refused_before_any_page() {
    let ca = CertificateAuthority::generate().unwrap();
    let other = CertificateAuthority::generate().unwrap();
    let (l, addr) = bind(node(&ca, "dest"));
    let rx = spawn_receiver_on(l);
    let g = guest(4 << 20, ContentMix::RANDOM, 6);
    let cfg = dwcp::MigrationConfig {
        reconnect_attempts: 0,
        ..source_config()
    };
    let err = Migration::new(addr, node(&other, "src"))
        .config(cfg)
        .run(&*g, &mut g.dirty_log(), &mut g.control())
        .unwrap_err();
    assert!(err.security().is_some(), "{err}");
    let (received, ram) = rx.join().unwrap();
    let e = received.unwrap_err();
    assert!(
        matches!(e.security(), Some(SecurityError::Handshake { .. })),
        "{e}"
    );
    assert!(
        ram.is_none(),
        "the destination got as far as allocating memory"
    );
}

#[test]
fn a_plain_text_source_cannot_migrate_to_an_encrypted_destination() {
    let (l, addr) = bind(Security::psk(psk(1)));
    let rx = spawn_receiver_on(l);
    let g = guest(4 << 20, ContentMix::RANDOM, 7);
    let cfg = dwcp::MigrationConfig {
        reconnect_attempts: 0,
        ..source_config()
    };
    let err = Migration::new(addr, Security::insecure_plaintext(psk(1)))
        .config(cfg)
        .run(&*g, &mut g.dirty_log(), &mut g.control());
    assert!(err.is_err());
    let (received, ram) = rx.join().unwrap();
    let e = received.unwrap_err();
    assert!(
        matches!(
            e.security(),
            Some(SecurityError::ModeMismatch {
                theirs: "plain-text DWCP",
                ..
            })
        ),
        "{e}"
    );
    assert!(ram.is_none());
}

/// Relays one connection to `target`, flipping one bit of the source-to-destination bytes at
/// offset `flip_at` (inside the memory pages, well after both handshakes); refuses later
/// connections, so the source cannot route around it.
fn tampering_relay(target: SocketAddr, flip_at: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let Ok((down, _)) = l.accept() else { return };
        drop(l);
        let up = TcpStream::connect(target).unwrap();
        let (mut d2, mut u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut u2, &mut d2);
            let _ = d2.shutdown(std::net::Shutdown::Both);
        });
        let (mut down, mut up) = (down, up);
        let mut seen = 0usize;
        let mut buf = vec![0u8; 16 << 10];
        while let Ok(n) = down.read(&mut buf) {
            if n == 0 {
                break;
            }
            if seen <= flip_at && flip_at < seen + n {
                buf[flip_at - seen] ^= 0x01;
            }
            seen += n;
            if up.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = up.shutdown(std::net::Shutdown::Both);
    });
    addr
}

#[test]
fn a_tampered_record_aborts_the_migration_and_the_source_keeps_running() {
    let (l, addr) = bind(Security::psk(psk(2)));
    let rx = spawn_receiver_on(l);
    let relay = tampering_relay(addr, 3 << 20);
    let g = guest(32 << 20, ContentMix::RANDOM, 8);
    g.start_workload(1 << 20, 8);
    let cfg = dwcp::MigrationConfig {
        streams: 1,
        max_streams: 1,
        reconnect_attempts: 0,
        io_timeout: Duration::from_secs(5),
        ..source_config()
    };
    let err = Migration::over(
        std::sync::Arc::new(dwcp_tcp::TcpConnector::new(relay, Default::default())),
        Security::psk(psk(2)),
    )
    .config(cfg)
    .run(&*g, &mut g.dirty_log(), &mut g.control())
    .unwrap_err();
    let (received, _ram) = rx.join().unwrap();
    let e = received.unwrap_err();
    assert!(
        matches!(e.security(), Some(SecurityError::Integrity { .. })),
        "destination: {e}"
    );
    assert!(
        guest_keeps_running(&g),
        "source guest not running after {err}"
    );
}
