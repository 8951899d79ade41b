//! Lanes and socket profiles over real loopback sockets.

use std::net::TcpStream;
use std::time::Duration;

use dwcp_core::frame::{FrameReader, FrameType, FrameWriter, MAX_PAYLOAD};
use dwcp_core::pool::BufferPool;
use dwcp_tcp::{Lanes, Outgoing, Payload, SocketProfile};

fn pair(profile: &SocketProfile) -> (TcpStream, TcpStream, String) {
    let l = dwcp_tcp::listen("127.0.0.1:0".parse().unwrap(), profile).unwrap();
    let (c, applied) =
        dwcp_tcp::connect(l.local_addr().unwrap(), profile, Duration::from_secs(5)).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s, applied.congestion)
}

#[test]
fn datacenter_profile_gets_bbr_where_the_kernel_has_it() {
    let available = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .unwrap_or_default();
    let (_c, _s, congestion) = pair(&SocketProfile::datacenter());
    if available.split_whitespace().any(|c| c == "bbr") {
        assert_eq!(congestion, "bbr");
    } else {
        assert!(!congestion.is_empty(), "falls back to the kernel default");
    }
    let odd = SocketProfile {
        congestion: Some("no-such-algorithm".into()),
        ..SocketProfile::datacenter()
    };
    let (_c, _s, congestion) = pair(&odd);
    assert_ne!(
        congestion, "no-such-algorithm",
        "an unavailable algorithm is a warning, not an error"
    );
}

#[test]
fn every_frame_arrives_in_order_per_lane_and_load_is_spread() {
    let profile = SocketProfile::datacenter();
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (c, s, _) = pair(&profile);
        let mut w = FrameWriter::new(c);
        w.bind_session(9);
        writers.push(w);
        let mut r = FrameReader::new(s);
        r.bind_session(9, MAX_PAYLOAD);
        readers.push(r);
    }
    let pool = BufferPool::new(16 << 20).unwrap();
    let mut lanes = Lanes::start(writers);
    let consumers: Vec<_> = readers
        .into_iter()
        .map(|mut r| {
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut p = Vec::new();
                loop {
                    let h = r.read_frame(&mut p).unwrap();
                    if h.frame_type == FrameType::Close {
                        return got;
                    }
                    got.push(u32::from_le_bytes(p[..4].try_into().unwrap()));
                }
            })
        })
        .collect();
    let mut used = [0usize; 3];
    for i in 0..600u32 {
        let mut b = pool.acquire(64 << 10).unwrap();
        b.extend_from_slice(&i.to_le_bytes());
        b.resize(if i % 5 == 0 { 60 << 10 } else { 100 }, 0);
        used[lanes.send_data(b).unwrap()] += 1;
    }
    for lane in 0..3 {
        lanes
            .send_on(
                lane,
                Outgoing {
                    frame_type: FrameType::Close,
                    payload: Payload::Owned(Vec::new()),
                },
            )
            .unwrap();
    }
    lanes.close().unwrap();
    let mut all: Vec<u32> = Vec::new();
    for (lane, c) in consumers.into_iter().enumerate() {
        let got = c.join().unwrap();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "lane {lane} kept the order it was given"
        );
        assert_eq!(got.len(), used[lane]);
        all.extend(got);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (0..600).collect::<Vec<_>>(),
        "no frame lost or duplicated"
    );
    assert!(
        used.iter().all(|&n| n > 50),
        "all lanes carried load: {used:?}"
    );
    assert_eq!(
        pool.stats().in_use_bytes,
        0,
        "every buffer went back to the pool"
    );
}

#[test]
fn a_dead_stream_is_reported_not_hung_on() {
    let (c, s, _) = pair(&SocketProfile::datacenter());
    let mut lanes = Lanes::start(vec![FrameWriter::new(c)]);
    drop(s);
    let pool = BufferPool::new(16 << 20).unwrap();
    let mut failed = None;
    for _ in 0..2000 {
        let mut b = pool.acquire(1 << 20).unwrap();
        b.resize(1 << 20, 7);
        if let Err(e) = lanes.send_data(b) {
            failed = Some(e);
            break;
        }
    }
    let err = failed.expect("writing to a closed peer fails");
    assert!(err.to_string().contains("stream 0"), "{err}");
    assert!(lanes.close().is_err());
}
