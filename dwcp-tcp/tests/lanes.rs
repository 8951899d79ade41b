//! Lanes and socket profiles over real loopback sockets.

use std::collections::BTreeMap;
use std::io::{IoSlice, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use dwcp_core::frame::{FrameReader, FrameType, FrameWriter, MAX_PAYLOAD};
use dwcp_core::pool::BufferPool;
use dwcp_core::transport::Conn;
use dwcp_tcp::{DataChunk, LaneHandle, Lanes, Outgoing, Payload, SocketProfile};
use proptest::prelude::*;

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
fn internet_profile_sets_the_unsent_limit_and_user_timeout() {
    let p = SocketProfile::internet(125e6, Duration::from_millis(50), Duration::from_secs(7));
    let (c, _s, _) = pair(&p);
    let s = socket2::SockRef::from(&c);
    assert_eq!(s.tcp_notsent_lowat().unwrap(), 256 << 10);
    assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(7)));
}

/// What one receiving end of a lane does.
#[derive(Debug, Clone, Copy)]
enum Peer {
    /// Reads and acknowledges everything until Close.
    Healthy,
    /// Reads `n` data frames, acknowledges the first `acked` of them, then breaks the connection.
    DiesAfter { n: usize, acked: usize },
}

struct Harness {
    lanes: Lanes,
    handles: Vec<LaneHandle>,
    consumers: Vec<std::thread::JoinHandle<Vec<u64>>>,
    dead: Vec<Arc<AtomicBool>>,
}

/// Lanes to consumers on loopback; each consumer acknowledges by calling the lane's handle, as the
/// engine's acknowledgement reader does, and returns the chunk ids it received.
fn harness(peers: &[Peer]) -> Harness {
    let mut lanes = Lanes::new();
    let mut handles = Vec::new();
    let mut consumers = Vec::new();
    let mut dead = Vec::new();
    for (i, peer) in peers.iter().copied().enumerate() {
        let (c, s, _) = pair(&SocketProfile::datacenter());
        let mut w = FrameWriter::new(Box::new(c) as Box<dyn Conn>);
        w.bind_session(9);
        let handle = lanes.add(i as u16, w).unwrap();
        handles.push(handle.clone());
        let died = Arc::new(AtomicBool::new(false));
        dead.push(Arc::clone(&died));
        consumers.push(std::thread::spawn(move || {
            let mut r = FrameReader::new(s.try_clone().unwrap());
            r.bind_session(9, MAX_PAYLOAD);
            let mut got = Vec::new();
            let mut p = Vec::new();
            let die = |got: Vec<u64>| {
                let _ = s.shutdown(std::net::Shutdown::Both);
                died.store(true, Ordering::Release);
                got
            };
            if matches!(peer, Peer::DiesAfter { .. }) {
                // A dying peer that is sent fewer than `n` frames dies once they stop coming.
                s.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
            }
            loop {
                let Ok(h) = r.read_frame(&mut p) else {
                    return match peer {
                        Peer::Healthy => got,
                        Peer::DiesAfter { .. } => die(got),
                    };
                };
                if h.frame_type == FrameType::Close {
                    return got;
                }
                got.push(u64::from_le_bytes(p[..8].try_into().unwrap()));
                match peer {
                    Peer::Healthy => handle.acknowledge(h.seq),
                    Peer::DiesAfter { n, acked } => {
                        if got.len() <= acked {
                            handle.acknowledge(h.seq);
                        }
                        if got.len() >= n {
                            return die(got);
                        }
                    }
                }
            }
        }));
    }
    Harness {
        lanes,
        handles,
        consumers,
        dead,
    }
}

/// Sends `count` chunks, re-sending orphans of failed lanes as the engine does, until every chunk is
/// acknowledged. Returns the ids each consumer received.
fn transfer(h: &mut Harness, count: u64, pool: &BufferPool) -> Vec<Vec<u64>> {
    let recover = |h: &mut Harness| {
        // The engine's reader notices a broken stream; here the test plays that part.
        for (d, handle) in h.dead.iter().zip(&h.handles) {
            if d.load(Ordering::Acquire) && !handle.is_failed() {
                handle.fail("peer went away");
            }
        }
        if h.lanes.any_failed() {
            h.lanes.reap_failed();
            for c in h.lanes.take_orphans() {
                h.lanes.resend(c).expect("a live lane remains");
            }
        }
    };
    for id in 0..count {
        let mut b = pool.acquire(64 << 10).unwrap();
        b.resize(if id % 5 == 0 { 60 << 10 } else { 100 }, id as u8);
        h.lanes
            .send_data(DataChunk { id, buf: b })
            .expect("a live lane remains");
        recover(h);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.lanes.outstanding() > 0 {
        assert!(Instant::now() < deadline, "chunks never acknowledged");
        recover(h);
        h.lanes.wait_for_change(Duration::from_millis(5));
    }
    h.lanes.close().unwrap();
    std::mem::take(&mut h.consumers)
        .into_iter()
        .map(|c| c.join().unwrap())
        .collect()
}

#[test]
fn every_chunk_arrives_once_in_order_per_lane_and_load_is_spread() {
    let pool = BufferPool::new(16 << 20).unwrap();
    let mut h = harness(&[Peer::Healthy; 3]);
    let got = transfer(&mut h, 600, &pool);
    let mut all: Vec<u64> = Vec::new();
    for (lane, ids) in got.iter().enumerate() {
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "lane {lane} kept the order it was given"
        );
        assert!(ids.len() > 50, "lane {lane} carried load: {}", ids.len());
        all.extend(ids);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (0..600).collect::<Vec<_>>(),
        "no chunk lost or duplicated"
    );
    assert_eq!(h.lanes.outstanding(), 0);
    assert_eq!(
        pool.stats().in_use_bytes,
        0,
        "every buffer went back to the pool once acknowledged"
    );
}

#[test]
fn a_slow_sender_spreads_its_chunks_over_every_lane() {
    // A capped migration sends one chunk at a time into empty queues: every lane ties as the least
    // loaded. Ties must rotate, or the other lanes stay silent until the destination drops them.
    let pool = BufferPool::new(16 << 20).unwrap();
    let mut h = harness(&[Peer::Healthy; 3]);
    for id in 0..30 {
        let mut b = pool.acquire(4096).unwrap();
        b.resize(100, id as u8);
        h.lanes.send_data(DataChunk { id, buf: b }).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while h.lanes.outstanding() > 0 {
            assert!(Instant::now() < deadline, "chunk {id} never acknowledged");
            h.lanes.wait_for_change(Duration::from_millis(5));
        }
    }
    h.lanes.close().unwrap();
    let got: Vec<Vec<u64>> = std::mem::take(&mut h.consumers)
        .into_iter()
        .map(|c| c.join().unwrap())
        .collect();
    for (lane, ids) in got.iter().enumerate() {
        assert!(
            ids.len() >= 9,
            "lane {lane} carried {} of 30: {got:?}",
            ids.len()
        );
    }
}

#[test]
fn a_dead_stream_is_reported_not_hung_on() {
    let (c, s, _) = pair(&SocketProfile::datacenter());
    let mut lanes = Lanes::new();
    let handle = lanes
        .add(0, FrameWriter::new(Box::new(c) as Box<dyn Conn>))
        .unwrap();
    drop(s);
    let pool = BufferPool::new(16 << 20).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut id = 0;
    while !lanes.any_failed() {
        assert!(Instant::now() < deadline, "writing to a closed peer fails");
        let mut b = pool.acquire(1 << 20).unwrap();
        b.resize(1 << 20, 7);
        if let Err(back) = lanes.send_data(DataChunk { id, buf: b }) {
            // The writer failed the lane between the check and the send: the chunk comes back.
            assert_eq!(back.id, id);
            break;
        }
        id += 1;
        lanes.wait_for_change(Duration::from_millis(1));
    }
    assert!(handle.is_failed());
    let lost = lanes.reap_failed();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].id, 0);
    assert!(!lost[0].reason.is_empty());
    let orphans = lanes.take_orphans();
    assert_eq!(
        orphans.len() as u64,
        id,
        "every chunk sent to the dead stream comes back for re-sending"
    );
    assert!(orphans.windows(2).all(|w| w[0].id < w[1].id));
    let back = lanes
        .send_data(DataChunk {
            id,
            buf: pool.acquire(10).unwrap(),
        })
        .expect_err("no lane is left");
    assert_eq!(back.id, id, "the chunk is handed back, not lost");
}

/// Loopback TCP whose writes wait at a gate, to hold a lane's writer in the middle of a frame.
#[derive(Debug, Clone)]
struct Gated {
    stream: Arc<TcpStream>,
    gate: Arc<Gate>,
}

#[derive(Debug, Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
    /// A write has reached the gate.
    reached: AtomicBool,
}

impl Gate {
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    fn pass(&self) {
        self.reached.store(true, Ordering::Release);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }
}

impl Read for Gated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self.stream).read(buf)
    }
}

impl Write for Gated {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.gate.pass();
        (&*self.stream).write(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        self.gate.pass();
        (&*self.stream).write_vectored(bufs)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        (&*self.stream).flush()
    }
}

impl Conn for Gated {
    fn try_clone_conn(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.clone()))
    }
    fn shutdown(&self, how: std::net::Shutdown) -> std::io::Result<()> {
        self.stream.shutdown(how)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.stream.set_write_timeout(timeout)
    }
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.stream.peer_addr()
    }
    fn transport(&self) -> &'static str {
        "gated-tcp"
    }
}

#[test]
fn a_retired_lane_is_not_closed_while_its_writer_still_holds_a_chunk() {
    // The stream-count controller retires a lane while its last chunk is being written (on a slow
    // host TLS alone takes milliseconds per chunk): the chunk has left the queue and is not yet
    // among the unacknowledged. Taking the lane for idle then closed the stream right behind the
    // chunk, the destination (seeing Close already buffered) did not acknowledge it, and the lane
    // had left the set, so the chunk was never re-sent either: the migration ended in
    // `Timeout("the destination stopped acknowledging data")` after `io_timeout`.
    let (c, s, _) = pair(&SocketProfile::datacenter());
    let gate = Arc::new(Gate::default());
    let conn = Gated {
        stream: Arc::new(c),
        gate: Arc::clone(&gate),
    };
    let mut w = FrameWriter::new(Box::new(conn) as Box<dyn Conn>);
    w.bind_session(9);
    let mut lanes = Lanes::new();
    let handle = lanes.add(0, w).unwrap();
    // The peer reports every frame it reads; the test acknowledges them.
    let (frames_tx, frames) = std::sync::mpsc::channel();
    let consumer = std::thread::spawn(move || {
        let mut r = FrameReader::new(s);
        r.bind_session(9, MAX_PAYLOAD);
        let mut p = Vec::new();
        while let Ok(h) = r.read_frame(&mut p) {
            let _ = frames_tx.send((h.frame_type, h.seq));
            if h.frame_type == FrameType::Close {
                break;
            }
        }
    });
    let pool = BufferPool::new(16 << 20).unwrap();
    let mut b = pool.acquire(4096).unwrap();
    b.resize(100, 1);
    lanes.send_data(DataChunk { id: 0, buf: b }).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gate.reached.load(Ordering::Acquire) {
        assert!(
            Instant::now() < deadline,
            "the writer never started the frame"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    lanes.retire(0);
    // Lets the writer go after a while (closing the lane would wait for it).
    let opener = {
        let gate = Arc::clone(&gate);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            gate.open();
        })
    };
    assert_eq!(
        lanes.close_retired(),
        Vec::<u16>::new(),
        "a lane whose writer holds a chunk is not idle"
    );
    opener.join().unwrap();
    let (frame_type, seq) = frames.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(frame_type, FrameType::Data);
    assert_eq!(
        lanes.close_retired(),
        Vec::<u16>::new(),
        "a lane with an unacknowledged chunk is not idle"
    );
    assert_eq!(lanes.outstanding(), 1);
    handle.acknowledge(seq);
    loop {
        let closed = lanes.close_retired();
        if closed == [0] {
            break;
        }
        assert!(closed.is_empty(), "{closed:?}");
        assert!(Instant::now() < deadline, "an idle retired lane is closed");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(lanes.outstanding(), 0);
    let (frame_type, _) = frames.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(frame_type, FrameType::Close);
    consumer.join().unwrap();
    assert_eq!(pool.stats().in_use_bytes, 0);
}

/// `n` lanes to peers that report every frame they read (its type and payload) on one channel per
/// lane, until Close.
#[allow(clippy::type_complexity)]
fn observed(
    n: u16,
) -> (
    Lanes,
    Vec<LaneHandle>,
    Vec<std::sync::mpsc::Receiver<(FrameType, Vec<u8>)>>,
    Vec<std::thread::JoinHandle<()>>,
) {
    let mut lanes = Lanes::new();
    let (mut handles, mut frames, mut consumers) = (Vec::new(), Vec::new(), Vec::new());
    for id in 0..n {
        let (c, s, _) = pair(&SocketProfile::datacenter());
        let mut w = FrameWriter::new(Box::new(c) as Box<dyn Conn>);
        w.bind_session(9);
        handles.push(lanes.add(id, w).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        frames.push(rx);
        consumers.push(std::thread::spawn(move || {
            let mut r = FrameReader::new(s);
            r.bind_session(9, MAX_PAYLOAD);
            let mut p = Vec::new();
            while let Ok(h) = r.read_frame(&mut p) {
                let _ = tx.send((h.frame_type, p.clone()));
                if h.frame_type == FrameType::Close {
                    break;
                }
            }
        }));
    }
    (lanes, handles, frames, consumers)
}

fn control(frame_type: FrameType, payload: &[u8]) -> Outgoing {
    Outgoing {
        frame_type,
        payload: Payload::Owned(payload.to_vec()),
    }
}

#[test]
fn control_frames_go_on_a_live_lane_not_a_retiring_one() {
    // Retiring lanes are normally the newest, but after lost streams and a reconnection the lowest id
    // may be one. Finish went on it; `close_retired` then closed it as idle, and the Commit that
    // follows on the same lane failed with "stream 0 is gone".
    let (mut lanes, _handles, frames, consumers) = observed(2);
    lanes.retire(0);
    assert_eq!(
        lanes
            .send_control(control(FrameType::Finish, b"finish"))
            .unwrap(),
        1,
        "the live lane carries it"
    );
    let (frame_type, payload) = frames[1].recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(
        (frame_type, &payload[..]),
        (FrameType::Finish, &b"finish"[..])
    );
    assert_eq!(
        lanes.close_retired(),
        [0],
        "the idle retiring lane still closes"
    );
    assert_eq!(
        frames[0].recv_timeout(Duration::from_secs(10)).unwrap().0,
        FrameType::Close
    );
    lanes
        .send_on(1, control(FrameType::Commit, b"commit"))
        .expect("the lane carrying the handover is still there");
    let (frame_type, payload) = frames[1].recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(
        (frame_type, &payload[..]),
        (FrameType::Commit, &b"commit"[..])
    );
    lanes.close().unwrap();
    for c in consumers {
        c.join().unwrap();
    }
}

#[test]
fn a_retiring_lane_left_to_carry_control_frames_is_not_closed_under_them() {
    // The live lane failed (not yet reaped): the retiring one is all that is left, and it carries
    // Finish. It must stay open for the Commit after it, even once its queue is empty.
    let (mut lanes, handles, frames, consumers) = observed(2);
    lanes.retire(0);
    handles[1].fail("peer went away");
    assert_eq!(
        lanes
            .send_control(control(FrameType::Finish, b"finish"))
            .unwrap(),
        0,
        "with no live lane, a retiring one still carries it"
    );
    let (frame_type, _) = frames[0].recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(frame_type, FrameType::Finish);
    // The writer has written the frame; give it time to count it as no longer queued.
    let until = Instant::now() + Duration::from_millis(200);
    while Instant::now() < until {
        assert_eq!(
            lanes.close_retired(),
            Vec::<u16>::new(),
            "the lane carrying the handover stays"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    lanes
        .send_on(0, control(FrameType::Commit, b"commit"))
        .expect("the lane carrying the handover is still there");
    let (frame_type, payload) = frames[0].recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(
        (frame_type, &payload[..]),
        (FrameType::Commit, &b"commit"[..])
    );
    assert_eq!(lanes.reap_failed().len(), 1);
    lanes.close().unwrap();
    assert_eq!(
        frames[0].recv_timeout(Duration::from_secs(10)).unwrap().0,
        FrameType::Close
    );
    for c in consumers {
        c.join().unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Whatever lane dies and whenever, every chunk reaches a live consumer, none is lost, and a chunk
    /// is received twice only if the dying lane received it without acknowledging it.
    #[test]
    fn no_chunk_is_lost_when_a_stream_dies(lanes in 2usize..5, victim in 0usize..5, n in 1usize..120, acked_frac in 0.0f64..1.0) {
        let victim = victim % lanes;
        let acked = (n as f64 * acked_frac) as usize;
        let peers: Vec<Peer> = (0..lanes)
            .map(|i| if i == victim { Peer::DiesAfter { n, acked } } else { Peer::Healthy })
            .collect();
        let pool = BufferPool::new(64 << 20).unwrap();
        let mut h = harness(&peers);
        let got = transfer(&mut h, 400, &pool);
        let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
        for ids in &got {
            for id in ids {
                *seen.entry(*id).or_default() += 1;
            }
        }
        prop_assert_eq!(seen.len(), 400, "every chunk arrived");
        prop_assert_eq!(seen.keys().next_back().copied(), Some(399));
        let duplicates: u32 = seen.values().map(|c| c - 1).sum();
        let unacked_on_victim = got[victim].len().saturating_sub(acked);
        prop_assert!(duplicates as usize <= unacked_on_victim,
            "{duplicates} duplicates, only {unacked_on_victim} unacknowledged on the dead stream");
        prop_assert_eq!(pool.stats().in_use_bytes, 0);
    }
}
