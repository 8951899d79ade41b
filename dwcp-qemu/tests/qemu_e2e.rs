//! A real QEMU live migration (TCG guest that fills and keeps dirtying its memory) carried through two
//! dwcp proxies on loopback, plain and multifd. Needs qemu-system-x86, linux-image-amd64,
//! busybox-static and cpio (scripts/setup.sh installs them); without them the test fails and says
//! which package is missing.

mod common;

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use dwcp_core::handshake::Psk;
use dwcp_hde::Codec;
use dwcp_qemu::{DestinationProxy, SourceProxy, TunnelConfig};
use serde_json::json;

use common::{Qemu, free_port};

/// Two guests at a time at most: the machine has two cores.
static QEMU_TESTS: Mutex<()> = Mutex::new(());

fn migrate_through_dwcp(multifd: u32) {
    common::init_logs();
    let _serial = QEMU_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    let mut src = Qemu::start("src", false, &[]);
    let mut dst = Qemu::start("dst", true, &[]);
    src.wait_ready(Duration::from_secs(180));
    src.configure(multifd, false);
    dst.configure(multifd, false);
    let qemu_incoming: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    dst.qmp.cmd(
        "migrate-incoming",
        json!({"uri": format!("tcp:{qemu_incoming}")}),
    );

    let psk = Psk::generate();
    // The plain migration uses the loopback default (segments sent raw); the multifd one compresses,
    // so both paths of the segment codec carry a real QEMU stream.
    let local_codec = if multifd > 0 {
        Codec::Lz4
    } else {
        TunnelConfig::default().local_codec
    };
    let config = TunnelConfig {
        streams: 2,
        // Two streams even on loopback, so that segments of one channel travel on both.
        local_streams: 2,
        local_codec,
        accept_timeout: Duration::from_secs(60),
        ..TunnelConfig::default()
    };
    let dest_proxy = DestinationProxy::bind(
        "127.0.0.1:0".parse().unwrap(),
        qemu_incoming,
        psk.clone(),
        config.clone(),
    )
    .unwrap();
    let tunnel_addr = dest_proxy.local_addr().unwrap();
    let source_proxy =
        SourceProxy::bind("127.0.0.1:0".parse().unwrap(), tunnel_addr, psk, config).unwrap();
    let migrate_to = source_proxy.local_addr().unwrap();
    let dest_thread = std::thread::spawn(move || dest_proxy.run());
    let source_thread = std::thread::spawn(move || source_proxy.run());

    src.qmp
        .cmd("migrate", json!({"uri": format!("tcp:{migrate_to}")}));
    let info = src.wait_migration(Duration::from_secs(240));
    eprintln!("multifd {multifd}: {info}");
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(dst.wait_running(Duration::from_secs(30)), "running");
    assert_eq!(
        src.qmp.cmd("query-status", json!({}))["status"],
        "postmigrate"
    );

    let sent = source_thread.join().unwrap().expect("source proxy");
    let received = dest_thread.join().unwrap().expect("destination proxy");
    eprintln!("source proxy: {sent:?}\ndestination proxy: {received:?}");
    assert_eq!(
        sent.channels,
        1 + u64::from(multifd),
        "one channel per QEMU connection"
    );
    assert_eq!(received.channels, sent.channels);
    assert_eq!(sent.resets + received.resets, 0);
    // Every byte QEMU wrote arrived, and QEMU itself accounted for at least its RAM pages.
    assert_eq!(sent.raw_bytes_sent, received.raw_bytes_received);
    assert_eq!(received.raw_bytes_sent, sent.raw_bytes_received);
    let ram_transferred = info["ram"]["transferred"].as_u64().unwrap();
    assert!(
        sent.raw_bytes_sent >= ram_transferred,
        "{} < {ram_transferred}",
        sent.raw_bytes_sent
    );
    assert!(
        ram_transferred > 60 << 20,
        "the guest's memory was filled: {ram_transferred}"
    );
    if local_codec == Codec::None {
        assert_eq!(sent.codec, "None");
        assert!(
            sent.wire_bytes_sent > sent.raw_bytes_sent,
            "raw segments plus headers"
        );
    } else {
        assert!(
            sent.wire_bytes_sent < sent.raw_bytes_sent,
            "busybox copies and text compress"
        );
    }
}

#[test]
fn plain_migration_through_dwcp() {
    migrate_through_dwcp(0);
}

#[test]
fn multifd_migration_through_dwcp() {
    migrate_through_dwcp(2);
}
