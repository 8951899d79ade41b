//! Outgoing lanes: one writer thread per stream, fed through a bounded queue, with each data chunk
//! scheduled to the live lane holding the fewest unsent bytes.
//!
//! A chunk stays owned by its lane until the peer acknowledges it: the writer keeps every data frame
//! it wrote, keyed by its stream sequence, and [`LaneHandle::acknowledge`] releases them. When a lane
//! fails, whatever it had queued or written without acknowledgement becomes an *orphan* that the
//! engine re-sends on the remaining lanes (or after reconnecting), so losing a stream loses no data.
//! Lanes come and go while a session runs: [`Lanes::add`] starts one, [`Lanes::retire`] stops
//! scheduling on one and closes it once its chunks are acknowledged.
//!
//! Kept whole (about 650 lines): the scheduler, the writer loop, acknowledgement release and the
//! orphan hand-back share one set of counters and one locking order, which is easier to check in
//! one file.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};
use parking_lot::{Condvar, Mutex};

use dwcp_core::error::Error;
use dwcp_core::frame::{FrameType, FrameWriter, HEADER_LEN};
use dwcp_core::latency::{LatencyOp, LatencyRecorder};
use dwcp_core::pool::PooledBuf;
use dwcp_core::transport::Conn;

/// The write half of one stream.
pub type StreamWriter = FrameWriter<Box<dyn Conn>>;

/// Payload of an outgoing control frame.
#[derive(Debug)]
pub enum Payload {
    /// A pooled buffer.
    Pooled(PooledBuf),
    /// A small owned buffer.
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

/// One control frame queued on a lane.
#[derive(Debug)]
pub struct Outgoing {
    /// Frame type.
    pub frame_type: FrameType,
    /// Frame payload.
    pub payload: Payload,
}

/// One encoded chunk and its session-wide id (sent as the first 8 bytes of the Data payload).
#[derive(Debug)]
pub struct DataChunk {
    /// Dense per-session id: 0, 1, 2, ...
    pub id: u64,
    /// The encoded chunk.
    pub buf: PooledBuf,
}

impl DataChunk {
    /// Bytes this chunk occupies on the wire, header included.
    pub fn wire_len(&self) -> u64 {
        (HEADER_LEN + 8 + self.buf.len()) as u64
    }
}

#[derive(Debug)]
enum Item {
    Data(DataChunk),
    Control(Outgoing),
}

#[derive(Debug, Default)]
struct Retained {
    /// Highest sequence the peer acknowledged on this stream, if any.
    acked_through: Option<u64>,
    /// Data frames written and not yet acknowledged, in sequence order, with when each was written.
    unacked: VecDeque<(u64, DataChunk, Instant)>,
}

/// Chunks sent but not yet acknowledged, across all lanes (re-sends are not counted twice).
#[derive(Debug, Default)]
struct Outstanding {
    chunks: AtomicU64,
    acked_bytes: AtomicU64,
    lock: Mutex<()>,
    changed: Condvar,
    /// Where send and acknowledgement latencies go, once set.
    latency: OnceLock<Arc<LatencyRecorder>>,
}

impl Outstanding {
    fn notify(&self) {
        let _g = self.lock.lock();
        self.changed.notify_all();
    }
}

#[derive(Debug)]
struct LaneState {
    id: u16,
    /// A handle on the connection, to shut it down from any thread.
    conn: Box<dyn Conn>,
    queued_bytes: AtomicU64,
    written_frames: AtomicU64,
    written_bytes: AtomicU64,
    data_frames: AtomicU64,
    failed: AtomicBool,
    retiring: AtomicBool,
    /// A control frame was queued on it: it carries the handover, and `close_retired` leaves it.
    carries_control: AtomicBool,
    error: Mutex<Option<String>>,
    retained: Mutex<Retained>,
    /// Chunks the writer could not write because the lane had failed.
    orphans: Mutex<Vec<DataChunk>>,
    outstanding: Arc<Outstanding>,
}

impl LaneState {
    fn fail(&self, why: String) {
        let mut e = self.error.lock();
        if e.is_none() {
            *e = Some(why);
        }
        self.failed.store(true, Ordering::Release);
        // Unblocks the peer, our reader and our writer: the stream is unusable now.
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        drop(e);
        self.outstanding.notify();
    }
}

/// What an acknowledgement reader needs of its lane.
#[derive(Debug, Clone)]
pub struct LaneHandle(Arc<LaneState>);

impl LaneHandle {
    /// The lane's id (its stream index in the session).
    pub fn id(&self) -> u16 {
        self.0.id
    }

    /// The peer acknowledged every frame up to sequence `through` on this stream: releases the chunks.
    pub fn acknowledge(&self, through: u64) {
        let st = &self.0;
        let (mut count, mut bytes) = (0u64, 0u64);
        {
            let mut r = st.retained.lock();
            r.acked_through = Some(r.acked_through.map_or(through, |a| a.max(through)));
            let now = Instant::now();
            let latency = st.outstanding.latency.get();
            while r.unacked.front().is_some_and(|(seq, ..)| *seq <= through) {
                let (_, chunk, written) = r.unacked.pop_front().expect("front exists");
                bytes += chunk.wire_len();
                count += 1;
                if let Some(l) = latency {
                    l.record(LatencyOp::Ack, now.saturating_duration_since(written));
                }
            }
        }
        if count > 0 {
            st.outstanding.chunks.fetch_sub(count, Ordering::AcqRel);
            st.outstanding
                .acked_bytes
                .fetch_add(bytes, Ordering::Relaxed);
            st.outstanding.notify();
        }
    }

    /// Chunks written on this lane and not yet acknowledged.
    pub fn unacknowledged(&self) -> usize {
        self.0.retained.lock().unacked.len()
    }

    /// Marks the lane failed (its reader saw the stream break) and shuts its connection down.
    pub fn fail(&self, why: impl Into<String>) {
        self.0.fail(why.into());
    }

    /// Whether the lane failed.
    pub fn is_failed(&self) -> bool {
        self.0.failed.load(Ordering::Acquire)
    }
}

#[derive(Debug)]
struct Lane {
    tx: Option<Sender<Item>>,
    state: Arc<LaneState>,
    /// Ends with the writer back (unless the lane failed), for parking the stream.
    thread: Option<JoinHandle<Option<StreamWriter>>>,
}

/// Counters of one lane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LaneStats {
    /// Stream index.
    pub id: u16,
    /// Frames written.
    pub frames: u64,
    /// Bytes written (headers and payloads).
    pub bytes: u64,
    /// Data frames written.
    pub data_frames: u64,
}

/// A lane that failed and was removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostLane {
    /// Its stream index.
    pub id: u16,
    /// Why it failed.
    pub reason: String,
}

/// The writer side of a session's stream set.
#[derive(Debug, Default)]
pub struct Lanes {
    lanes: Vec<Lane>,
    /// Counters of lanes already removed, so totals never run backwards.
    removed: Vec<LaneStats>,
    outstanding: Arc<Outstanding>,
    /// Chunks of failed lanes waiting to be re-sent.
    orphans: Vec<DataChunk>,
    /// Where the search for the least-loaded lane starts, moved on by every chunk, so that ties
    /// rotate: a slow (capped) migration whose queues are always empty would otherwise put every
    /// chunk on the first lane, and the destination drops the others as silent.
    rotation: AtomicUsize,
}

/// Frames a lane may hold queued before its sender blocks.
pub const LANE_QUEUE_FRAMES: usize = 8;

impl Lanes {
    /// An empty set; add lanes with [`add`](Self::add).
    pub fn new() -> Self {
        Self::default()
    }

    /// Records every chunk's write ([`LatencyOp::Send`]) and acknowledgement
    /// ([`LatencyOp::Ack`]: from written to acknowledged) latency into `recorder` from now on; the
    /// first recorder set stays.
    pub fn record_latency_into(&self, recorder: Arc<LatencyRecorder>) {
        let _ = self.outstanding.latency.set(recorder);
    }

    /// Starts a lane writing to `writer` (already bound to the session) as stream `id`. Returns the
    /// handle its acknowledgement reader uses.
    pub fn add(&mut self, id: u16, writer: StreamWriter) -> Result<LaneHandle, Error> {
        let conn = writer
            .get_ref()
            .try_clone_conn()
            .map_err(|e| Error::io("cloning a stream", e))?;
        let (tx, rx) = bounded(LANE_QUEUE_FRAMES);
        let state = Arc::new(LaneState {
            id,
            conn,
            queued_bytes: AtomicU64::new(0),
            written_frames: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            data_frames: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            retiring: AtomicBool::new(false),
            carries_control: AtomicBool::new(false),
            error: Mutex::new(None),
            retained: Mutex::new(Retained::default()),
            orphans: Mutex::new(Vec::new()),
            outstanding: Arc::clone(&self.outstanding),
        });
        let st = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name(format!("amst-tx-{id}"))
            .spawn(move || writer_loop(writer, rx, st))
            .map_err(|e| Error::io("starting a stream writer", e))?;
        self.lanes.push(Lane {
            tx: Some(tx),
            state: Arc::clone(&state),
            thread: Some(thread),
        });
        Ok(LaneHandle(state))
    }

    /// Lanes in the set (live, retiring or failed but not yet reaped).
    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    /// Whether the set has no lanes.
    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// Lanes that take new chunks (neither failed nor retiring).
    pub fn live(&self) -> usize {
        self.lanes.iter().filter(|l| schedulable(&l.state)).count()
    }

    /// Ids of the lanes that take new chunks.
    pub fn live_ids(&self) -> Vec<u16> {
        self.lanes
            .iter()
            .filter(|l| schedulable(&l.state))
            .map(|l| l.state.id)
            .collect()
    }

    /// Queues a new chunk on the live lane with the fewest unsent bytes; blocks while that lane's
    /// queue is full. Returns the lane used, or the chunk back when no lane is live.
    pub fn send_data(&self, chunk: DataChunk) -> Result<u16, DataChunk> {
        self.outstanding.chunks.fetch_add(1, Ordering::AcqRel);
        self.schedule(chunk).inspect_err(|_| {
            self.outstanding.chunks.fetch_sub(1, Ordering::AcqRel);
        })
    }

    /// Queues a chunk that was already counted as outstanding (an orphan of a failed lane).
    pub fn resend(&self, chunk: DataChunk) -> Result<u16, DataChunk> {
        self.schedule(chunk)
    }

    fn schedule(&self, chunk: DataChunk) -> Result<u16, DataChunk> {
        let n = self.lanes.len();
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        // `min_by_key` keeps the first of equal minima: the first in rotated order.
        let Some(lane) = (0..n)
            .map(|i| &self.lanes[start.wrapping_add(i) % n])
            .filter(|l| schedulable(&l.state))
            .min_by_key(|l| l.state.queued_bytes.load(Ordering::Relaxed))
        else {
            return Err(chunk);
        };
        lane.state
            .queued_bytes
            .fetch_add(chunk.buf.len() as u64, Ordering::Relaxed);
        let tx = lane.tx.as_ref().expect("lanes in the set have a queue");
        match tx.send(Item::Data(chunk)) {
            Ok(()) => Ok(lane.state.id),
            // The writer keeps its queue until the lane is reaped, so this cannot happen; if it did,
            // the chunk must not be lost.
            Err(crossbeam_channel::SendError(Item::Data(chunk))) => Err(chunk),
            Err(_) => unreachable!("a data item was sent"),
        }
    }

    /// Queues a control frame on lane `id`. From then on [`close_retired`](Self::close_retired)
    /// leaves the lane open, even if it is retiring: the next control frame (Commit after Finish)
    /// goes on the same lane, and the peer answers on it.
    pub fn send_on(&self, id: u16, out: Outgoing) -> Result<(), Error> {
        let lane = self
            .lanes
            .iter()
            .find(|l| l.state.id == id)
            .ok_or_else(|| Error::Protocol(format!("stream {id} is gone")))?;
        check(&lane.state)?;
        lane.state.carries_control.store(true, Ordering::Release);
        lane.state
            .queued_bytes
            .fetch_add(out.payload.bytes().len() as u64, Ordering::Relaxed);
        let tx = lane.tx.as_ref().expect("lanes in the set have a queue");
        tx.send(Item::Control(out))
            .map_err(|_| Error::Protocol(format!("stream {id} writer stopped")))
    }

    /// Queues a control frame on the live lane with the lowest id, or, when no lane is live, on the
    /// retiring one with the lowest id; returns that id.
    pub fn send_control(&self, out: Outgoing) -> Result<u16, Error> {
        // A retiring lane only when nothing else is left (the live ones failed): the frame must still
        // go out (an Error for the peer, say), and `send_on` keeps the lane open for what follows.
        // Otherwise a live one, so that retiring lanes still close once their chunks are acknowledged.
        let lowest = |usable: fn(&LaneState) -> bool| {
            self.lanes
                .iter()
                .filter(|l| usable(&l.state))
                .map(|l| l.state.id)
                .min()
        };
        let id = lowest(schedulable)
            .or_else(|| lowest(|st| !st.failed.load(Ordering::Acquire)))
            .ok_or_else(|| Error::Protocol("no stream left to send control frames on".into()))?;
        self.send_on(id, out)?;
        Ok(id)
    }

    /// Chunks sent (or queued) and not yet acknowledged.
    pub fn outstanding(&self) -> u64 {
        self.outstanding.chunks.load(Ordering::Acquire)
    }

    /// Bytes of data frames the peer acknowledged so far (goodput numerator).
    pub fn acked_bytes(&self) -> u64 {
        self.outstanding.acked_bytes.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` for an acknowledgement or a lane failure.
    pub fn wait_for_change(&self, timeout: Duration) {
        let mut g = self.outstanding.lock.lock();
        if self.outstanding.chunks.load(Ordering::Acquire) == 0 || self.any_failed() {
            return;
        }
        self.outstanding.changed.wait_for(&mut g, timeout);
    }

    /// Whether some lane has failed and awaits [`reap_failed`](Self::reap_failed).
    pub fn any_failed(&self) -> bool {
        self.lanes
            .iter()
            .any(|l| l.state.failed.load(Ordering::Acquire))
    }

    /// Removes failed lanes, collecting their unacknowledged and queued chunks as orphans (see
    /// [`take_orphans`](Self::take_orphans)). Returns which lanes were lost and why.
    pub fn reap_failed(&mut self) -> Vec<LostLane> {
        let mut lost = Vec::new();
        let mut i = 0;
        while i < self.lanes.len() {
            if !self.lanes[i].state.failed.load(Ordering::Acquire) {
                i += 1;
                continue;
            }
            let mut lane = self.lanes.swap_remove(i);
            // Closing the queue ends the writer, which moves what was queued to its orphans.
            lane.tx.take();
            if let Some(t) = lane.thread.take() {
                let _ = t.join();
            }
            let st = &lane.state;
            let mut r = st.retained.lock();
            self.orphans.extend(r.unacked.drain(..).map(|(_, c, _)| c));
            drop(r);
            self.orphans.append(&mut st.orphans.lock());
            self.removed.push(lane_stats(st));
            lost.push(LostLane {
                id: st.id,
                reason: st.error.lock().clone().unwrap_or_default(),
            });
        }
        // Re-send in the original order: older chunks first keeps the destination's ledger compact.
        self.orphans.sort_by_key(|c| c.id);
        lost
    }

    /// Chunks of failed lanes that must be re-sent (with [`resend`](Self::resend)).
    pub fn take_orphans(&mut self) -> Vec<DataChunk> {
        std::mem::take(&mut self.orphans)
    }

    /// Puts chunks back among the orphans (they could not be re-sent because no lane was live).
    pub fn requeue_orphans(&mut self, chunks: Vec<DataChunk>) {
        self.orphans.extend(chunks);
        self.orphans.sort_by_key(|c| c.id);
    }

    /// Keeps new chunks that [`send_data`](Self::send_data) handed back (no lane was live) with the
    /// orphans, counted as outstanding like them, so that they go out with the next re-send.
    pub fn hold_unsent(&mut self, chunks: Vec<DataChunk>) {
        self.outstanding
            .chunks
            .fetch_add(chunks.len() as u64, Ordering::AcqRel);
        self.requeue_orphans(chunks);
    }

    /// Stops scheduling new chunks on lane `id`; it is closed by [`close_retired`](Self::close_retired)
    /// once its chunks are acknowledged.
    pub fn retire(&self, id: u16) {
        if let Some(l) = self.lanes.iter().find(|l| l.state.id == id) {
            l.state.retiring.store(true, Ordering::Release);
        }
    }

    /// Closes retiring lanes that have nothing queued or unacknowledged and never carried a control
    /// frame: sends them a Close frame and waits for their writer. Returns their ids.
    pub fn close_retired(&mut self) -> Vec<u16> {
        let mut closed = Vec::new();
        let mut i = 0;
        while i < self.lanes.len() {
            let st = &self.lanes[i].state;
            let idle = st.retiring.load(Ordering::Acquire)
                && !st.failed.load(Ordering::Acquire)
                && !st.carries_control.load(Ordering::Acquire)
                && st.queued_bytes.load(Ordering::Acquire) == 0
                && st.retained.lock().unacked.is_empty();
            if !idle {
                i += 1;
                continue;
            }
            let mut lane = self.lanes.swap_remove(i);
            if let Some(tx) = lane.tx.take() {
                let _ = tx.send(Item::Control(Outgoing {
                    frame_type: FrameType::Close,
                    payload: Payload::Owned(Vec::new()),
                }));
            }
            if let Some(t) = lane.thread.take() {
                let _ = t.join();
            }
            let _ = lane.state.conn.shutdown(std::net::Shutdown::Write);
            self.removed.push(lane_stats(&lane.state));
            closed.push(lane.state.id);
        }
        closed
    }

    /// The connection of lane `id`, for telemetry.
    pub fn with_conn<T>(&self, id: u16, f: impl FnOnce(&dyn Conn) -> T) -> Option<T> {
        self.lanes
            .iter()
            .find(|l| l.state.id == id)
            .map(|l| f(&*l.state.conn))
    }

    /// Fails if any lane failed (without reaping it).
    pub fn check_all(&self) -> Result<(), Error> {
        self.lanes.iter().try_for_each(|l| check(&l.state))
    }

    /// Counters of every lane the set ever had.
    pub fn stats(&self) -> Vec<LaneStats> {
        let mut all = self.removed.clone();
        all.extend(self.lanes.iter().map(|l| lane_stats(&l.state)));
        all.sort_by_key(|s| s.id);
        all
    }

    /// Bytes written over every lane the set ever had.
    pub fn wire_bytes(&self) -> u64 {
        self.stats().iter().map(|s| s.bytes).sum()
    }

    /// Sends Close on every live lane, waits until everything queued is written, and stops the writers.
    pub fn close(&mut self) -> Result<(), Error> {
        for l in &mut self.lanes {
            if let Some(tx) = l.tx.take() {
                if !l.state.failed.load(Ordering::Acquire) {
                    let _ = tx.send(Item::Control(Outgoing {
                        frame_type: FrameType::Close,
                        payload: Payload::Owned(Vec::new()),
                    }));
                }
            }
        }
        for l in &mut self.lanes {
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
            let _ = l.state.conn.shutdown(std::net::Shutdown::Write);
        }
        self.check_all()
    }

    /// Ends the set for a connection pool: sends Park on every live lane (nothing may be queued or
    /// unacknowledged any more), waits for the writers and returns them with their stream ids. Failed
    /// lanes are dropped.
    pub fn park(&mut self) -> Vec<(u16, StreamWriter)> {
        let mut parked = Vec::new();
        for mut lane in self.lanes.drain(..) {
            if let Some(tx) = lane.tx.take() {
                if !lane.state.failed.load(Ordering::Acquire) {
                    let _ = tx.send(Item::Control(Outgoing {
                        frame_type: FrameType::Park,
                        payload: Payload::Owned(Vec::new()),
                    }));
                }
            }
            let writer = lane.thread.take().and_then(|t| t.join().ok().flatten());
            self.removed.push(lane_stats(&lane.state));
            if let Some(w) = writer {
                parked.push((lane.state.id, w));
            }
        }
        parked
    }

    /// Shuts every connection down at once (an abort: nothing more will be written or read).
    pub fn shutdown_all(&self) {
        for l in &self.lanes {
            let _ = l.state.conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        for l in &mut self.lanes {
            l.tx.take();
        }
        for l in &mut self.lanes {
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn schedulable(st: &LaneState) -> bool {
    !st.failed.load(Ordering::Acquire) && !st.retiring.load(Ordering::Acquire)
}

fn check(st: &LaneState) -> Result<(), Error> {
    if st.failed.load(Ordering::Acquire) {
        let why = st.error.lock().clone().unwrap_or_default();
        return Err(Error::io(
            format!("stream {} failed", st.id),
            std::io::Error::other(why),
        ));
    }
    Ok(())
}

fn lane_stats(st: &LaneState) -> LaneStats {
    LaneStats {
        id: st.id,
        frames: st.written_frames.load(Ordering::Relaxed),
        bytes: st.written_bytes.load(Ordering::Relaxed),
        data_frames: st.data_frames.load(Ordering::Relaxed),
    }
}

fn writer_loop(
    mut writer: StreamWriter,
    rx: Receiver<Item>,
    st: Arc<LaneState>,
) -> Option<StreamWriter> {
    for item in rx {
        let len = match &item {
            Item::Data(c) => c.buf.len(),
            Item::Control(o) => o.payload.bytes().len(),
        } as u64;
        if st.failed.load(Ordering::Acquire) {
            if let Item::Data(c) = item {
                st.orphans.lock().push(c);
            }
            st.queued_bytes.fetch_sub(len, Ordering::Release);
            continue;
        }
        match item {
            Item::Data(chunk) => {
                let started = Instant::now();
                match writer.write_frame_prefixed(
                    FrameType::Data,
                    &chunk.id.to_le_bytes(),
                    &chunk.buf,
                ) {
                    Ok(seq) => {
                        let written = Instant::now();
                        if let Some(l) = st.outstanding.latency.get() {
                            l.record(LatencyOp::Send, written.saturating_duration_since(started));
                        }
                        st.data_frames.fetch_add(1, Ordering::Relaxed);
                        st.written_frames.fetch_add(1, Ordering::Relaxed);
                        st.written_bytes
                            .fetch_add(chunk.wire_len(), Ordering::Relaxed);
                        let mut r = st.retained.lock();
                        if r.acked_through.is_some_and(|a| a >= seq) {
                            // Acknowledged before we got here (fast peer): release at once.
                            drop(r);
                            st.outstanding.chunks.fetch_sub(1, Ordering::AcqRel);
                            st.outstanding
                                .acked_bytes
                                .fetch_add(chunk.wire_len(), Ordering::Relaxed);
                            st.outstanding.notify();
                        } else {
                            r.unacked.push_back((seq, chunk, written));
                        }
                    }
                    Err(e) => {
                        st.orphans.lock().push(chunk);
                        st.fail(e.to_string());
                    }
                }
            }
            Item::Control(out) => match writer.write_frame(out.frame_type, out.payload.bytes()) {
                Ok(_) => {
                    st.written_frames.fetch_add(1, Ordering::Relaxed);
                    st.written_bytes
                        .fetch_add(len + HEADER_LEN as u64, Ordering::Relaxed);
                }
                Err(e) => st.fail(e.to_string()),
            },
        }
        // Counted as queued until written, not only until taken off the queue: a chunk in the
        // writer's hands is neither queued nor in `retained`, and a retiring lane must not look
        // idle to `close_retired` then (its stream would close under the chunk, which would never
        // be acknowledged nor re-sent). Release: who reads 0 here sees the chunk in `retained`.
        st.queued_bytes.fetch_sub(len, Ordering::Release);
    }
    let _ = writer.flush();
    (!st.failed.load(Ordering::Acquire)).then_some(writer)
}
