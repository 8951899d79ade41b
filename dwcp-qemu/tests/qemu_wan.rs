//! A real QEMU live migration carried through two dwcp proxies across the emulated `internet` profile
//! (1 Gbit/s, 50 ms RTT, 0.1% loss) between two private network namespaces (`dwq<pid>-s`/`-d`,
//! 10.77.0.1 and 10.77.0.2). QEMU and each proxy run inside their namespace; only the QMP sockets
//! (files) cross. Needs root and /dev/net/tun as CI has; without them it fails and says why.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use dwcp_core::handshake::Psk;
use dwcp_qemu::{DestinationProxy, SourceProxy, TunnelConfig};
use dwcp_wanem::config::Profile;
use dwcp_wanem::link::{ActiveLink, LinkSpec};
use dwcp_wanem::netns;
use serde_json::json;

use common::Qemu;

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
fn multifd_migration_across_the_internet_profile() {
    common::init_logs();
    if let Err(e) = netns::require_privileges() {
        panic!("this test builds a WAN test bed and needs root with /dev/net/tun: {e:#}");
    }
    let pid = std::process::id();
    let (src_ns, dst_ns) = (format!("dwq{pid}-s"), format!("dwq{pid}-d"));
    let mut link =
        ActiveLink::bring_up(LinkSpec::new(&src_ns, &dst_ns, Profile::Internet.params()))
            .expect("bringing the link up");
    let dst_addr = link.spec().dst_addr;

    let mut src = Qemu::start("wsrc", false, &["ip", "netns", "exec", &src_ns]);
    let mut dst = Qemu::start("wdst", true, &["ip", "netns", "exec", &dst_ns]);
    src.wait_ready(Duration::from_secs(180));
    src.configure(2, false);
    dst.configure(2, false);
    let qemu_incoming: SocketAddr = "127.0.0.1:4445".parse().unwrap();
    dst.qmp.cmd(
        "migrate-incoming",
        json!({"uri": format!("tcp:{qemu_incoming}")}),
    );

    let psk = Psk::generate();
    let config = TunnelConfig {
        accept_timeout: Duration::from_secs(60),
        ..TunnelConfig::default()
    };
    let tunnel_addr = SocketAddr::new(dst_addr.into(), 7800);
    let (tx, rx) = std::sync::mpsc::channel();
    let (dpsk, dcfg) = (psk.clone(), config.clone());
    let dest = spawn_in(&dst_ns, move || {
        let proxy = DestinationProxy::bind(tunnel_addr, qemu_incoming, dpsk, dcfg)?;
        tx.send(()).unwrap();
        proxy.run()
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let migrate_to: SocketAddr = "127.0.0.1:4444".parse().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let source = spawn_in(&src_ns, move || {
        let proxy = SourceProxy::bind(migrate_to, tunnel_addr, psk, config)?;
        tx.send(()).unwrap();
        proxy.run()
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();

    src.qmp
        .cmd("migrate", json!({"uri": format!("tcp:{migrate_to}")}));
    let info = src.wait_migration(Duration::from_secs(240));
    eprintln!("across internet: {info}");
    let dest_status = dst.wait_running(Duration::from_secs(30));
    let sent = source.join().unwrap();
    let received = dest.join().unwrap();
    eprintln!("source proxy: {sent:?}\ndestination proxy: {received:?}");
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(dest_status, "running");
    let (sent, received) = (
        sent.expect("source proxy"),
        received.expect("destination proxy"),
    );
    eprintln!("source proxy: {sent:?}\ndestination proxy: {received:?}");
    assert_eq!(sent.channels, 3);
    assert_eq!(sent.raw_bytes_sent, received.raw_bytes_received);
    let stats = link.stats();
    eprintln!("link: {stats:?}");
    assert!(
        stats.forward.bytes_out >= sent.wire_bytes_sent,
        "the tunnel really crossed the link"
    );
    drop(src);
    drop(dst);
    link.tear_down().expect("tearing the link down");
    assert!(!netns::exists(&src_ns) && !netns::exists(&dst_ns));
}

/// Measurement aid, not a check: tunnel throughput across `internet` for 1 and 3 connections of
/// 100 MB each, with plain TCP peers (`cargo test -p dwcp-qemu --test qemu_wan -- --ignored tunnel_throughput`).
#[test]
#[ignore]
fn tunnel_throughput_across_the_internet_profile() {
    use std::io::{Read, Write};
    let pid = std::process::id();
    let (src_ns, dst_ns) = (format!("dwqt{pid}-s"), format!("dwqt{pid}-d"));
    let link = ActiveLink::bring_up(LinkSpec::new(
        &src_ns,
        &dst_ns,
        if std::env::var_os("LAN").is_some() {
            Profile::Lan
        } else {
            Profile::Internet
        }
        .params(),
    ))
    .expect("bringing the link up");
    let dst_addr = link.spec().dst_addr;
    let codec = std::env::var("CODEC").unwrap_or_else(|_| "lz4".into());
    let window: u32 = std::env::var("WINDOW")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(32 << 20);
    for (round, conns) in [1usize, 3].into_iter().enumerate() {
        let port = 7900 + round as u16;
        let sink_port = 5000 + round as u16;
        let psk = Psk::generate();
        let config = TunnelConfig {
            codec: dwcp_hde::Codec::parse(&codec).unwrap(),
            local_codec: dwcp_hde::Codec::parse(&codec).unwrap(),
            window,
            accept_timeout: Duration::from_secs(30),
            ..TunnelConfig::default()
        };
        let tunnel_addr = SocketAddr::new(dst_addr.into(), port);
        let sink_addr: SocketAddr = format!("127.0.0.1:{sink_port}").parse().unwrap();
        let (dpsk, dcfg) = (psk.clone(), config.clone());
        let sink = spawn_in(&dst_ns, move || {
            let l = std::net::TcpListener::bind(sink_addr).unwrap();
            let dest = std::thread::spawn(move || {
                DestinationProxy::bind(tunnel_addr, sink_addr, dpsk, dcfg)
                    .unwrap()
                    .run()
            });
            let mut total = 0u64;
            let readers: Vec<_> = (0..conns)
                .map(|_| {
                    let (mut s, _) = l.accept().unwrap();
                    std::thread::spawn(move || {
                        let mut b = vec![0u8; 1 << 20];
                        let mut n = 0u64;
                        loop {
                            match s.read(&mut b) {
                                Ok(0) | Err(_) => return n,
                                Ok(k) => n += k as u64,
                            }
                        }
                    })
                })
                .collect();
            for r in readers {
                total += r.join().unwrap();
            }
            (total, dest.join().unwrap())
        });
        let migrate_to: SocketAddr = format!("127.0.0.1:{}", 4600 + round).parse().unwrap();
        let source = spawn_in(&src_ns, move || {
            let p = SourceProxy::bind(migrate_to, tunnel_addr, psk, config).unwrap();
            p.run()
        });
        std::thread::sleep(Duration::from_millis(1500));
        let datas: Vec<Vec<u8>> = (0..conns)
            .map(|i| {
                // One page in two random, the others text: about half compressible, like the guest.
                let mut x = 0x9e37_79b9_7f4a_7c15u64 + i as u64;
                (0..100_000_000usize / conns)
                    .map(|k| {
                        if (k / 4096) % 2 == 0 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            x as u8
                        } else {
                            b"text of a page "[k % 15]
                        }
                    })
                    .collect()
            })
            .collect();
        let started = std::time::Instant::now();
        let writers = spawn_in(&src_ns, move || {
            let writers: Vec<_> = datas
                .into_iter()
                .map(|data| {
                    let mut s = std::net::TcpStream::connect(migrate_to).unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                    std::thread::spawn(move || {
                        s.write_all(&data).unwrap();
                        s.shutdown(std::net::Shutdown::Write).unwrap();
                        let _ = s.read(&mut [0u8; 1]);
                    })
                })
                .collect();
            for w in writers {
                w.join().unwrap();
            }
        });
        writers.join().unwrap();
        let (total, dest) = sink.join().unwrap();
        let elapsed = started.elapsed();
        let src = source.join().unwrap().unwrap();
        eprintln!(
            "{conns} connection(s), codec {codec}, window {window}: {total} bytes in {:.0} ms = {:.0} MB/s raw; wire {} bytes ({:.0} Mbit/s); dest {:?}",
            elapsed.as_secs_f64() * 1e3,
            total as f64 / elapsed.as_secs_f64() / 1e6,
            src.wire_bytes_sent,
            src.wire_bytes_sent as f64 * 8.0 / elapsed.as_secs_f64() / 1e6,
            dest.map(|d| d.duration_ms)
        );
    }
}
