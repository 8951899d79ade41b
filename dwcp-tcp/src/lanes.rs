//! Outgoing lanes: one writer thread per stream, fed through a bounded queue, with chunks scheduled to
//! the lane holding the fewest queued bytes.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded};
use parking_lot::Mutex;

use dwcp_core::error::Error;
use dwcp_core::frame::{FrameType, FrameWriter};
use dwcp_core::pool::PooledBuf;

/// Payload of an outgoing frame.
#[derive(Debug)]
pub enum Payload {
    /// A pooled buffer (chunks); returned to the pool once written.
    Pooled(PooledBuf),
    /// A small owned buffer (control frames).
    Owned(Vec<u8>),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Pooled(b) => b,
            Payload::Owned(v) => v,
        }
    }
}

/// One frame queued on a lane.
#[derive(Debug)]
pub struct Outgoing {
    /// Frame type.
    pub frame_type: FrameType,
    /// Frame payload.
    pub payload: Payload,
}

#[derive(Debug, Default)]
struct LaneState {
    queued_bytes: AtomicU64,
    written_frames: AtomicU64,
    written_bytes: AtomicU64,
    /// Sequence number of the last data frame written.
    last_data_seq: AtomicU64,
    data_frames: AtomicU64,
    failed: AtomicBool,
    error: Mutex<Option<String>>,
}

#[derive(Debug)]
struct Lane {
    tx: Option<Sender<Outgoing>>,
    state: Arc<LaneState>,
    thread: Option<JoinHandle<()>>,
}

/// Counters of one lane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LaneStats {
    /// Frames written.
    pub frames: u64,
    /// Bytes written (headers and payloads).
    pub bytes: u64,
    /// Data frames written.
    pub data_frames: u64,
}

/// The writer side of a stream set.
#[derive(Debug)]
pub struct Lanes {
    lanes: Vec<Lane>,
    next: AtomicU64,
}

/// Frames a lane may hold queued before its sender blocks.
pub const LANE_QUEUE_FRAMES: usize = 8;

impl Lanes {
    /// Starts one writer thread per stream. Each writer must already be bound to the session.
    pub fn start(writers: Vec<FrameWriter<TcpStream>>) -> Self {
        let lanes = writers
            .into_iter()
            .enumerate()
            .map(|(i, writer)| {
                let (tx, rx) = bounded(LANE_QUEUE_FRAMES);
                let state = Arc::new(LaneState::default());
                let st = Arc::clone(&state);
                let thread = std::thread::Builder::new()
                    .name(format!("amst-tx-{i}"))
                    .spawn(move || writer_loop(writer, rx, st))
                    .expect("spawning a lane writer");
                Lane {
                    tx: Some(tx),
                    state,
                    thread: Some(thread),
                }
            })
            .collect();
        Self {
            lanes,
            next: AtomicU64::new(0),
        }
    }

    /// Number of lanes.
    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    /// Whether there are no lanes.
    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    fn check(&self, lane: usize) -> Result<(), Error> {
        let st = &self.lanes[lane].state;
        if st.failed.load(Ordering::Acquire) {
            let why = st.error.lock().clone().unwrap_or_default();
            return Err(Error::io(
                format!("stream {lane} failed"),
                std::io::Error::other(why),
            ));
        }
        Ok(())
    }

    /// Queues a data frame on the lane with the fewest queued bytes; blocks while that lane is full.
    /// Returns the lane used.
    pub fn send_data(&self, payload: PooledBuf) -> Result<usize, Error> {
        let n = self.lanes.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) as usize % n;
        let lane = (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| !self.lanes[i].state.failed.load(Ordering::Relaxed))
            .min_by_key(|&i| self.lanes[i].state.queued_bytes.load(Ordering::Relaxed))
            .unwrap_or(start);
        self.send_on(
            lane,
            Outgoing {
                frame_type: FrameType::Data,
                payload: Payload::Pooled(payload),
            },
        )?;
        Ok(lane)
    }

    /// Queues a frame on a given lane (control frames go to lane 0).
    pub fn send_on(&self, lane: usize, out: Outgoing) -> Result<(), Error> {
        self.check(lane)?;
        let l = &self.lanes[lane];
        l.state
            .queued_bytes
            .fetch_add(out.payload.bytes().len() as u64, Ordering::Relaxed);
        let tx = l.tx.as_ref().expect("lanes are open until dropped");
        if tx.send(out).is_err() {
            self.check(lane)?;
            return Err(Error::Protocol(format!("stream {lane} writer stopped")));
        }
        Ok(())
    }

    /// Data frames written on `lane` so far, and the sequence number of the last one.
    pub fn data_written(&self, lane: usize) -> (u64, u64) {
        let st = &self.lanes[lane].state;
        (
            st.data_frames.load(Ordering::Acquire),
            st.last_data_seq.load(Ordering::Acquire),
        )
    }

    /// Fails if any lane's writer failed.
    pub fn check_all(&self) -> Result<(), Error> {
        (0..self.lanes.len()).try_for_each(|i| self.check(i))
    }

    /// Counters per lane.
    pub fn stats(&self) -> Vec<LaneStats> {
        self.lanes
            .iter()
            .map(|l| LaneStats {
                frames: l.state.written_frames.load(Ordering::Relaxed),
                bytes: l.state.written_bytes.load(Ordering::Relaxed),
                data_frames: l.state.data_frames.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Waits until every queued frame is written, then stops the writers.
    pub fn close(&mut self) -> Result<(), Error> {
        for l in &mut self.lanes {
            l.tx.take();
        }
        for l in &mut self.lanes {
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
        }
        self.check_all()
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

fn writer_loop(mut writer: FrameWriter<TcpStream>, rx: Receiver<Outgoing>, st: Arc<LaneState>) {
    for out in rx {
        let bytes = out.payload.bytes();
        let len = bytes.len() as u64;
        match writer.write_frame(out.frame_type, bytes) {
            Ok(seq) => {
                if out.frame_type == FrameType::Data {
                    st.last_data_seq.store(seq, Ordering::Release);
                    st.data_frames.fetch_add(1, Ordering::Release);
                }
                st.written_frames.fetch_add(1, Ordering::Relaxed);
                st.written_bytes
                    .fetch_add(len + dwcp_core::frame::HEADER_LEN as u64, Ordering::Relaxed);
                st.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            }
            Err(e) => {
                *st.error.lock() = Some(e.to_string());
                st.failed.store(true, Ordering::Release);
                // Unblock the peer's reader and ours: the stream is unusable now.
                let _ = writer.get_ref().shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    }
    let _ = writer.get_ref().flush();
}
