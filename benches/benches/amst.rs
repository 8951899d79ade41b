//! AMST stream management over real loopback TCP: opening a tuned stream and adding it to a lane
//! set, the round trip of chunks through 1, 4 and 16 lanes (dispatch to the least-loaded live
//! stream, the writer thread, the peer's acknowledgement), recovering the chunks of a lost stream,
//! and the stream-count controller's decision. The seed's figure for "AMST" was 10 K ops/s.
//!
//! Every peer here is a thread of this process reading frames from a real socket and
//! acknowledging them through the lane's handle, as the engine's acknowledgement reader does.

use std::net::TcpStream;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dwcp_core::frame::{FrameReader, FrameType, FrameWriter, MAX_PAYLOAD};
use dwcp_core::pool::BufferPool;
use dwcp_core::transport::Conn;
use dwcp_tcp::{DataChunk, LaneHandle, Lanes, SocketProfile, StreamCountController};

const SESSION: u64 = 7;
const CHUNK_BYTES: usize = 4096;
/// Chunks per measured batch of the round-trip benchmark.
const BATCH: u64 = 1024;

fn pair(listener: &std::net::TcpListener, profile: &SocketProfile) -> (TcpStream, TcpStream) {
    let addr = listener.local_addr().expect("listener address");
    let (c, _) = dwcp_tcp::connect(addr, profile, Duration::from_secs(5)).expect("connect");
    let (s, _) = listener.accept().expect("accept");
    (c, s)
}

fn writer(stream: TcpStream) -> FrameWriter<Box<dyn Conn>> {
    let mut w = FrameWriter::new(Box::new(stream) as Box<dyn Conn>);
    w.bind_session(SESSION);
    w
}

/// A peer that acknowledges every data frame until Close or a broken stream.
fn acknowledging_peer(stream: TcpStream, handle: LaneHandle) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut r = FrameReader::new(stream);
        r.bind_session(SESSION, MAX_PAYLOAD);
        let mut payload = Vec::new();
        let mut frames = 0;
        while let Ok(h) = r.read_frame(&mut payload) {
            if h.frame_type == FrameType::Close {
                break;
            }
            handle.acknowledge(h.seq);
            frames += 1;
        }
        frames
    })
}

struct LaneSet {
    lanes: Lanes,
    peers: Vec<std::thread::JoinHandle<u64>>,
}

fn lane_set(listener: &std::net::TcpListener, streams: u16) -> LaneSet {
    let mut lanes = Lanes::new();
    let mut peers = Vec::new();
    for id in 0..streams {
        let (c, s) = pair(listener, &SocketProfile::datacenter());
        let handle = lanes.add(id, writer(c)).expect("adding a lane");
        peers.push(acknowledging_peer(s, handle));
    }
    LaneSet { lanes, peers }
}

impl Drop for LaneSet {
    /// Sends every lane a Close frame, so that the peers' threads end.
    fn drop(&mut self) {
        let _ = self.lanes.close();
        for p in self.peers.drain(..) {
            let _ = p.join();
        }
    }
}

fn chunk(pool: &BufferPool, id: u64) -> DataChunk {
    let mut buf = pool.acquire(CHUNK_BYTES).expect("a pooled buffer");
    buf.clear();
    buf.extend_from_slice(&[0xA5; CHUNK_BYTES]);
    DataChunk { id, buf }
}

/// Sends `count` chunks from `next_id` on and waits until the peers acknowledged all of them.
fn round_trip(set: &LaneSet, pool: &BufferPool, next_id: &mut u64, count: u64) {
    for _ in 0..count {
        set.lanes
            .send_data(chunk(pool, *next_id))
            .unwrap_or_else(|_| panic!("no live lane for chunk {next_id}"));
        *next_id += 1;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while set.lanes.outstanding() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "chunks unacknowledged after 30 s"
        );
        set.lanes.wait_for_change(Duration::from_millis(10));
    }
}

fn amst(c: &mut Criterion) {
    let listener = dwcp_tcp::listen(
        "127.0.0.1:0".parse().expect("address"),
        &SocketProfile::datacenter(),
    )
    .expect("listening on loopback");
    let pool = BufferPool::new(64 << 20).expect("a buffer pool");

    let mut g = c.benchmark_group("amst");
    g.throughput(Throughput::Elements(1));
    // One stream: connect with the datacenter profile (BBR, buffers), accept, add it as a lane
    // (its writer thread starts), then close it (Close frame, writer joined, peer done).
    g.bench_function("stream_setup", |b| b.iter(|| drop(lane_set(&listener, 1))));

    for streams in [1u16, 4, 16] {
        let set = lane_set(&listener, streams);
        let mut next_id = 0;
        g.throughput(Throughput::Elements(BATCH));
        g.bench_function(BenchmarkId::new("chunk_round_trip", streams), |b| {
            b.iter(|| round_trip(&set, &pool, &mut next_id, BATCH))
        });
        drop(set);
    }

    // A stream dies with chunks written and unacknowledged: fail it, reap it, and re-send its
    // chunks on the survivors until all are acknowledged. Elements: the chunks recovered.
    g.throughput(Throughput::Elements(64));
    g.bench_function("lost_stream_recovery", |b| {
        b.iter_batched(
            || {
                let mut lanes = Lanes::new();
                // Lane 0's peer reads nothing, so its chunks stay unacknowledged; it is alone
                // while they are sent, so all of them go to it.
                let (c, silent) = pair(&listener, &SocketProfile::datacenter());
                let doomed = lanes.add(0, writer(c)).expect("lane 0");
                for id in 0..64 {
                    lanes
                        .send_data(chunk(&pool, id))
                        .unwrap_or_else(|_| panic!("lane 0 takes chunk {id}"));
                }
                let mut peers = Vec::new();
                for id in 1..4u16 {
                    let (c, s) = pair(&listener, &SocketProfile::datacenter());
                    let handle = lanes.add(id, writer(c)).expect("lane");
                    peers.push(acknowledging_peer(s, handle));
                }
                (LaneSet { lanes, peers }, doomed, silent)
            },
            |(mut set, doomed, silent)| {
                doomed.fail("benchmark: stream lost");
                let _ = silent.shutdown(std::net::Shutdown::Both);
                let lost = set.lanes.reap_failed();
                assert_eq!(lost.len(), 1, "lane 0 is reaped");
                let orphans = set.lanes.take_orphans();
                assert_eq!(
                    orphans.len(),
                    64,
                    "every chunk of the lost stream is recovered"
                );
                for ch in orphans {
                    set.lanes
                        .resend(ch)
                        .unwrap_or_else(|_| panic!("a surviving lane"));
                }
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while set.lanes.outstanding() > 0 {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "re-sent chunks unacknowledged after 30 s"
                    );
                    set.lanes.wait_for_change(Duration::from_millis(10));
                }
                set
            },
            criterion::BatchSize::PerIteration,
        )
    });

    // The decision of how many streams pay off, one goodput window at a time.
    g.throughput(Throughput::Elements(1));
    g.bench_function("stream_count_decision", |b| {
        let mut controller = StreamCountController::new(2, 1, 16);
        let mut window = 0u64;
        b.iter(|| {
            window += 1;
            let goodput = 1e9 + ((window * 7919) % 1000) as f64 * 1e6;
            std::hint::black_box(controller.observe(goodput))
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = dwcp_benches::criterion_config();
    targets = amst
}
criterion_main!(benches);
