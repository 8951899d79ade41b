//! The I/O shell around [`Tunnel`], shared by both proxies: one writer thread per DWCP stream (a
//! bounded queue each, keepalives when idle), one reader thread per DWCP stream, and two pump threads
//! per channel (local QEMU socket → tunnel, tunnel → local QEMU socket).
//!
//! No thread that reads from the tunnel ever blocks on a local socket or on a lane: stream readers
//! only decode, update the state and hand bytes to the channel's writer queue, whose size the peer's
//! window bounds. So a QEMU that stops reading one channel cannot stall the other channels, and the
//! two proxies can never wait on each other in a cycle.
//!
//! Kept whole (about 720 lines): the writer, reader and pump threads share the ownership rules
//! stated above, which is easier to check in one file.

use std::collections::HashMap;
use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded, unbounded};
use parking_lot::{Condvar, Mutex};

use dwcp_core::error::Error;
use dwcp_core::frame::{FrameReader, FrameType, FrameWriter, HEADER_LEN};
use dwcp_core::transport::Conn;
use dwcp_hde::Codec;

use crate::secure::{Stream, cut};
use crate::segment::{self, RawSegment};
use crate::state::{Event, Role, Tunnel};
use crate::wire::{DATA_HEADER_LEN, Encoding, MAX_SEGMENT, Message, data_header};

/// Frames a lane holds queued before its senders block.
const LANE_QUEUE_FRAMES: usize = 8;
/// Segment buffers kept for reuse (a fresh 256 KiB allocation per segment costs page faults).
const SPARE_BUFFERS: usize = 64;
/// How often waiting threads look at the session's health.
const TICK: Duration = Duration::from_millis(200);

pub(crate) type StreamReader = FrameReader<BufReader<Box<dyn Conn>>>;

/// What a proxy's main thread hears from the tunnel.
#[derive(Debug)]
pub(crate) enum Notice {
    /// The peer opened channel `id` (destination only).
    Opened(u32),
    /// Both pumps of channel `id` ended.
    ChannelDone(u32),
    /// The peer closed stream `i` in order.
    StreamClosed(usize),
    /// The session failed.
    Failed,
}

struct Lane {
    tx: Sender<(FrameType, Vec<u8>)>,
    queued: AtomicU64,
}

enum Down {
    Bytes(RawSegment),
    End,
    Reset,
}

struct Local {
    socket: Option<TcpStream>,
    down: Sender<Down>,
    down_rx: Option<Receiver<Down>>,
    pumps: usize,
}

/// Byte counters of the tunnel's streams.
#[derive(Debug, Default)]
pub(crate) struct WireCounters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

pub(crate) struct Shared {
    role: Role,
    codec: Codec,
    io_timeout: Duration,
    keepalive: Duration,
    pub state: Mutex<Tunnel>,
    credit: Condvar,
    lanes: Vec<Lane>,
    /// A handle to each tunnel stream, to shut it down with.
    streams: Vec<Box<dyn Conn>>,
    locals: Mutex<HashMap<u32, Local>>,
    failed: AtomicBool,
    closing: AtomicBool,
    failure: Mutex<Option<Error>>,
    notices: Sender<Notice>,
    pub wire: WireCounters,
    spare: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
    pub streams_closed: AtomicUsize,
}

/// A running tunnel endpoint.
pub(crate) struct Endpoint {
    pub shared: Arc<Shared>,
    pub notices: Receiver<Notice>,
    writers: Vec<JoinHandle<()>>,
    readers: Vec<JoinHandle<()>>,
}

/// The settings the I/O shell needs.
pub(crate) struct EndpointSettings {
    pub role: Role,
    pub codec: Codec,
    pub window: u64,
    pub max_channels: usize,
    pub io_timeout: Duration,
    pub keepalive: Duration,
}

impl Endpoint {
    /// Starts the stream threads over authenticated, session-bound streams.
    pub fn start(settings: EndpointSettings, streams: Vec<Stream>) -> Self {
        let (notice_tx, notices) = unbounded();
        let mut lane_rx = Vec::new();
        let mut lanes = Vec::new();
        let mut handles = Vec::new();
        let mut halves = Vec::new();
        for (reader, writer, handle) in streams {
            let (tx, rx) = bounded(LANE_QUEUE_FRAMES);
            lanes.push(Lane {
                tx,
                queued: AtomicU64::new(0),
            });
            lane_rx.push(rx);
            // The socket's own limits, so they hold for every handle of the stream.
            let _ = handle.set_read_timeout(Some(settings.io_timeout));
            let _ = handle.set_write_timeout(Some(settings.io_timeout));
            handles.push(handle);
            halves.push((reader, writer));
        }
        let shared = Arc::new(Shared {
            role: settings.role,
            codec: settings.codec,
            io_timeout: settings.io_timeout,
            keepalive: settings.keepalive,
            state: Mutex::new(Tunnel::new(
                settings.role,
                settings.window,
                settings.max_channels,
            )),
            credit: Condvar::new(),
            lanes,
            streams: handles,
            locals: Mutex::new(HashMap::new()),
            failed: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            failure: Mutex::new(None),
            notices: notice_tx,
            wire: WireCounters::default(),
            spare: bounded(SPARE_BUFFERS),
            streams_closed: AtomicUsize::new(0),
        });
        let (mut writers, mut readers) = (Vec::new(), Vec::new());
        for (i, ((reader, writer), rx)) in halves.into_iter().zip(lane_rx).enumerate() {
            let s = Arc::clone(&shared);
            writers.push(
                std::thread::Builder::new()
                    .name(format!("tunnel-tx-{i}"))
                    .spawn(move || lane_writer(&s, i, writer, rx))
                    .expect("spawning a lane writer"),
            );
            let s = Arc::clone(&shared);
            readers.push(
                std::thread::Builder::new()
                    .name(format!("tunnel-rx-{i}"))
                    .spawn(move || stream_reader(&s, i, reader))
                    .expect("spawning a stream reader"),
            );
        }
        Self {
            shared,
            notices,
            writers,
            readers,
        }
    }

    /// Sends Close on every stream, then waits (bounded) until the peer closed every stream too and
    /// the threads ended.
    pub fn close(mut self, wait: Duration) -> Result<(), Error> {
        self.shared.closing.store(true, Ordering::Release);
        for lane in &self.shared.lanes {
            let _ = lane
                .tx
                .send_timeout((FrameType::Close, Vec::new()), self.shared.io_timeout);
        }
        // Each writer ends after writing its Close (or failing, bounded by the write timeout).
        for t in self.writers.drain(..) {
            let _ = t.join();
        }
        let deadline = Instant::now() + wait;
        while self.shared.streams_closed.load(Ordering::Acquire) < self.shared.lanes.len()
            && !self.shared.failed.load(Ordering::Acquire)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        let closed = self.shared.streams_closed.load(Ordering::Acquire) == self.shared.lanes.len();
        for s in &self.shared.streams {
            cut(&**s, Shutdown::Both);
        }
        for t in self.readers.drain(..) {
            let _ = t.join();
        }
        if let Some(e) = self.shared.failure.lock().take() {
            return Err(e);
        }
        if !closed {
            return Err(Error::Timeout(format!(
                "the peer did not close the tunnel within {} s",
                wait.as_secs()
            )));
        }
        Ok(())
    }

    /// Fails the session, then joins the threads.
    pub fn abort(mut self, error: Error) -> Error {
        self.shared.fail(error);
        for t in self.writers.drain(..).chain(self.readers.drain(..)) {
            let _ = t.join();
        }
        self.shared
            .failure
            .lock()
            .take()
            .unwrap_or_else(|| Error::Protocol("tunnel aborted".into()))
    }
}

impl Shared {
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Ends the session: records the first error, shuts every socket down (which unblocks every
    /// thread blocked on one) and wakes every waiter.
    pub fn fail(&self, error: Error) {
        if self.failed.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(error = %error, "QEMU tunnel failed");
        *self.failure.lock() = Some(error);
        for s in &self.streams {
            cut(&**s, Shutdown::Both);
        }
        for local in self.locals.lock().values() {
            if let Some(s) = &local.socket {
                let _ = s.shutdown(Shutdown::Both);
            }
            let _ = local.down.send(Down::Reset);
        }
        self.credit.notify_all();
        let _ = self.notices.send(Notice::Failed);
    }

    fn take_buffer(&self) -> Vec<u8> {
        self.spare
            .1
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(DATA_HEADER_LEN + MAX_SEGMENT + 1024))
    }

    /// Keeps `b` for reuse. Its length (initialised bytes) is kept too, so that the next user that
    /// resizes it does not zero-fill it again: every user overwrites what it uses.
    fn give_buffer(&self, b: Vec<u8>) {
        if b.capacity() >= DATA_HEADER_LEN + MAX_SEGMENT {
            let _ = self.spare.0.try_send(b);
        }
    }

    /// Queues a frame on the lane with the fewest queued bytes (or on `lane`), blocking while it is
    /// full, at most the I/O timeout.
    fn send(
        &self,
        frame_type: FrameType,
        payload: Vec<u8>,
        lane: Option<usize>,
    ) -> Result<(), Error> {
        if self.is_failed() {
            return Err(Error::Protocol("the tunnel failed".into()));
        }
        let i = lane.unwrap_or_else(|| {
            (0..self.lanes.len())
                .min_by_key(|&i| self.lanes[i].queued.load(Ordering::Relaxed))
                .unwrap_or(0)
        });
        let len = payload.len() as u64;
        self.lanes[i].queued.fetch_add(len, Ordering::Relaxed);
        match self.lanes[i]
            .tx
            .send_timeout((frame_type, payload), self.io_timeout)
        {
            Ok(()) => Ok(()),
            Err(_) => {
                self.lanes[i].queued.fetch_sub(len, Ordering::Relaxed);
                Err(Error::Timeout(format!(
                    "stream {i} accepted nothing for {} s",
                    self.io_timeout.as_secs()
                )))
            }
        }
    }

    fn send_message(&self, msg: &Message<'_>, lane: Option<usize>) -> Result<(), Error> {
        self.send(msg.frame_type(), msg.encode(), lane)
    }

    /// Registers channel `id` and its local socket; returns the queue its down pump reads.
    fn register(&self, id: u32, socket: Option<TcpStream>) {
        let (tx, rx) = unbounded();
        self.locals.lock().entry(id).or_insert(Local {
            socket,
            down: tx,
            down_rx: Some(rx),
            pumps: 2,
        });
    }

    /// Starts both pumps of channel `id` over `socket`.
    pub fn start_pumps(self: &Arc<Self>, id: u32, socket: TcpStream) -> Result<(), Error> {
        let _ = socket.set_nodelay(true);
        let _ = socket.set_write_timeout(Some(self.io_timeout));
        let clone = |s: &TcpStream| {
            s.try_clone()
                .map_err(|e| Error::io("cloning a QEMU connection", e))
        };
        let (up, down) = (clone(&socket)?, clone(&socket)?);
        let rx = {
            let mut locals = self.locals.lock();
            let Some(local) = locals.get_mut(&id) else {
                return Ok(()); // reset meanwhile
            };
            local.socket = Some(socket);
            local.down_rx.take().expect("pumps start once")
        };
        let s = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("qemu-up-{id}"))
            .spawn(move || guarded(&s, id, |s| pump_up(s, id, up)))
            .map_err(|e| Error::io("spawning a channel pump", e))?;
        let s = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("qemu-down-{id}"))
            .spawn(move || guarded(&s, id, |s| pump_down(s, id, down, rx)))
            .map_err(|e| Error::io("spawning a channel pump", e))?;
        Ok(())
    }

    /// Source: a QEMU connection was accepted; open a channel for it.
    pub fn open_channel(self: &Arc<Self>, socket: TcpStream) -> Result<u32, Error> {
        let (id, open) = self.state.lock().open_local()?;
        self.register(id, None);
        // Opens travel in order on stream 0, so the destination connects in QEMU's order.
        self.send_message(&open, Some(0))?;
        self.start_pumps(id, socket)?;
        Ok(id)
    }

    /// Destination: a channel whose QEMU connection could not be made.
    pub fn refuse_channel(&self, id: u32, reason: &str) {
        self.reset_channel(id, reason, true);
        self.pump_finished(id);
        self.pump_finished(id);
    }

    /// Resets channel `id`: tells the peer (when `tell_peer`), and tears the local connection down.
    fn reset_channel(&self, id: u32, reason: &str, tell_peer: bool) {
        let msg = self.state.lock().reset_local(id, reason);
        if let (Some(msg), true) = (msg, tell_peer) {
            tracing::warn!(channel = id, reason, "resetting a QEMU channel");
            if let Err(e) = self.send_message(&msg, None) {
                self.fail(e);
            }
        }
        self.credit.notify_all();
        if let Some(local) = self.locals.lock().get(&id) {
            if let Some(s) = &local.socket {
                let _ = s.shutdown(Shutdown::Both);
            }
            let _ = local.down.send(Down::Reset);
        }
    }

    fn pump_finished(&self, id: u32) {
        let done = {
            let mut locals = self.locals.lock();
            let Some(local) = locals.get_mut(&id) else {
                return;
            };
            local.pumps -= 1;
            local.pumps == 0 && locals.remove(&id).is_some()
        };
        if done {
            self.state.lock().retire(id);
            let _ = self.notices.send(Notice::ChannelDone(id));
        }
    }

    /// Waits until channel `id` may send; returns the credit, or `None` when the channel or the
    /// session is gone.
    fn wait_credit(&self, id: u32) -> Result<Option<u64>, Error> {
        let mut state = self.state.lock();
        let deadline = Instant::now() + self.io_timeout;
        loop {
            if self.is_failed() {
                return Ok(None);
            }
            match state.credit(id) {
                None => return Ok(None),
                Some(0) => {}
                Some(c) => return Ok(Some(c)),
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "channel {id}: the peer acknowledged nothing for {} s",
                    self.io_timeout.as_secs()
                )));
            }
            self.credit.wait_for(&mut state, TICK);
        }
    }

    /// Hands the events of one state update to the channels; returns the peer's resets, which the
    /// caller handles once it released the state lock.
    ///
    /// Takes the state guard because it must run under the state lock: the stream readers update
    /// the state one after the other, and were the lock released before the segments a state update
    /// released were queued for QEMU, the next reader could queue later segments (or the channel's
    /// end) first, and QEMU would read the stream out of order (found by
    /// `a_long_stream_over_many_streams_arrives_in_order`: about one run in ten, and QEMU's multifd
    /// migrations failing about one in ten).
    fn route(&self, _state: &Tunnel, events: Vec<Event>) -> Vec<(u32, String)> {
        let mut resets = Vec::new();
        for e in events {
            match e {
                Event::Opened(id) => {
                    self.register(id, None);
                    let _ = self.notices.send(Notice::Opened(id));
                }
                Event::Deliver(id, bytes) => {
                    if let Some(l) = self.locals.lock().get(&id) {
                        let _ = l.down.send(Down::Bytes(bytes));
                    };
                }
                Event::Ended(id) => {
                    if let Some(l) = self.locals.lock().get(&id) {
                        let _ = l.down.send(Down::End);
                    };
                }
                Event::Reset(id, reason) => resets.push((id, reason)),
                Event::Credit(_) => {
                    self.credit.notify_all();
                }
            }
        }
        resets
    }
}

fn lane_writer(
    shared: &Shared,
    i: usize,
    mut writer: FrameWriter<Box<dyn Conn>>,
    rx: Receiver<(FrameType, Vec<u8>)>,
) {
    loop {
        let (frame_type, payload) = match rx.recv_timeout(shared.keepalive) {
            Ok(f) => f,
            Err(RecvTimeoutError::Timeout) => (FrameType::Keepalive, Vec::new()),
            Err(RecvTimeoutError::Disconnected) => return,
        };
        shared.lanes[i]
            .queued
            .fetch_sub(payload.len() as u64, Ordering::Relaxed);
        if shared.is_failed() {
            return;
        }
        if let Err(e) = writer.write_frame(frame_type, &payload) {
            shared.fail(e);
            return;
        }
        shared
            .wire
            .sent
            .fetch_add((HEADER_LEN + payload.len()) as u64, Ordering::Relaxed);
        if frame_type == FrameType::Close {
            cut(&**writer.get_ref(), Shutdown::Write);
            return;
        }
        shared.give_buffer(payload);
    }
}

fn stream_reader(shared: &Arc<Shared>, i: usize, mut reader: StreamReader) {
    let mut payload = Vec::new();
    let result = (|| -> Result<(), Error> {
        loop {
            let h = reader.read_frame(&mut payload)?;
            shared
                .wire
                .received
                .fetch_add((HEADER_LEN + payload.len()) as u64, Ordering::Relaxed);
            let resets = match Message::decode(h.frame_type, &payload)? {
                Message::Close => return Ok(()),
                Message::Keepalive => continue,
                Message::Data {
                    channel,
                    seq,
                    encoding,
                    raw_len,
                    body,
                } => {
                    let raw = if encoding == Encoding::Raw && body.len() == raw_len as usize {
                        // The frame's buffer goes on to QEMU as it is; the next frame is read into
                        // a spare one.
                        let start = payload.len() - body.len();
                        RawSegment::new(
                            std::mem::replace(&mut payload, shared.take_buffer()),
                            start,
                        )
                    } else {
                        // Decompress outside the state lock: the streams decode in parallel.
                        let mut raw = shared.take_buffer();
                        segment::decode(encoding, raw_len, body, &mut raw)?;
                        raw.into()
                    };
                    let mut state = shared.state.lock();
                    let events = state.on_data(channel, seq, raw)?;
                    shared.route(&state, events)
                }
                other => {
                    let mut state = shared.state.lock();
                    let events = state.on_message(&other)?;
                    shared.route(&state, events)
                }
            };
            for (id, reason) in resets {
                tracing::warn!(channel = id, %reason, "the peer reset a QEMU channel");
                shared.reset_channel(id, &reason, false);
            }
        }
    })();
    match result {
        Ok(()) => {
            shared.streams_closed.fetch_add(1, Ordering::AcqRel);
            let _ = shared.notices.send(Notice::StreamClosed(i));
        }
        Err(e) => {
            if !(shared.closing.load(Ordering::Acquire) && matches!(e, Error::Io { .. })) {
                shared.fail(match e {
                    Error::Io { context, source } => Error::Io {
                        context: format!("tunnel stream {i}: {context}"),
                        source,
                    },
                    other => other,
                });
            }
        }
    }
}

/// Runs a pump; should it panic (a bug), the session fails instead of waiting for the channel forever.
fn guarded(shared: &Arc<Shared>, id: u32, pump: impl FnOnce(&Arc<Shared>)) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pump(shared))) {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        shared.fail(Error::Protocol(format!(
            "channel {id}: internal error: {what}"
        )));
        shared.pump_finished(id);
    }
}

/// Local QEMU socket → tunnel.
fn pump_up(shared: &Arc<Shared>, id: u32, mut socket: TcpStream) {
    let mut scratch = Vec::new();
    let result = (|| -> Result<(), String> {
        loop {
            let credit = match shared.wait_credit(id) {
                Ok(Some(c)) => c,
                Ok(None) => return Ok(()),
                Err(e) => {
                    shared.fail(e);
                    return Ok(());
                }
            };
            let max = (credit as usize).min(MAX_SEGMENT);
            let mut buf = shared.take_buffer();
            buf.resize(DATA_HEADER_LEN + max, 0);
            let n = loop {
                match socket.read(&mut buf[DATA_HEADER_LEN..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(format!("reading from the local QEMU connection: {e}"));
                    }
                }
            };
            if n == 0 {
                let end = shared.state.lock().end_local(id);
                if let Some(end) = end
                    && let Err(e) = shared.send_message(&end, None)
                {
                    shared.fail(e);
                }
                return Ok(());
            }
            buf.truncate(DATA_HEADER_LEN + n);
            let mut payload = buf;
            let encoding = if shared.codec == Codec::None {
                segment::encode(
                    Codec::None,
                    &payload[DATA_HEADER_LEN..],
                    &mut scratch,
                    &mut Vec::new(),
                )
            } else {
                let mut out = shared.take_buffer();
                out.resize(DATA_HEADER_LEN, 0);
                let enc = segment::encode(
                    shared.codec,
                    &payload[DATA_HEADER_LEN..],
                    &mut out,
                    &mut scratch,
                );
                if enc != Encoding::Raw {
                    shared.give_buffer(std::mem::replace(&mut payload, out));
                } else {
                    shared.give_buffer(out);
                }
                enc
            };
            if encoding == Encoding::Zero {
                payload.truncate(DATA_HEADER_LEN);
            }
            let Some(seq) = shared.state.lock().next_segment(id, n) else {
                return Ok(()); // reset meanwhile
            };
            payload[..DATA_HEADER_LEN].copy_from_slice(&data_header(id, seq, encoding, n as u32));
            if let Err(e) = shared.send(FrameType::ChannelData, payload, None) {
                shared.fail(e);
                return Ok(());
            }
        }
    })();
    if let Err(reason) = result
        && !shared.is_failed()
    {
        shared.reset_channel(id, &reason, true);
    }
    shared.pump_finished(id);
}

/// Tunnel → local QEMU socket.
fn pump_down(shared: &Arc<Shared>, id: u32, mut socket: TcpStream, rx: Receiver<Down>) {
    let mut idle_since = Instant::now();
    loop {
        match rx.recv_timeout(TICK) {
            Ok(Down::Bytes(bytes)) => {
                idle_since = Instant::now();
                if let Err(e) = socket.write_all(&bytes) {
                    shared.reset_channel(
                        id,
                        &format!("writing to the local QEMU connection: {e}"),
                        true,
                    );
                    break;
                }
                let ack = shared
                    .state
                    .lock()
                    .on_written(id, bytes.len() as u64, rx.is_empty());
                shared.give_buffer(bytes.into_buffer());
                if let Some(ack) = ack
                    && let Err(e) = shared.send_message(&ack, None)
                {
                    shared.fail(e);
                    break;
                }
            }
            Ok(Down::End) => {
                let _ = socket.shutdown(Shutdown::Write);
                break;
            }
            Ok(Down::Reset) | Err(RecvTimeoutError::Disconnected) => {
                let _ = socket.shutdown(Shutdown::Both);
                break;
            }
            Err(RecvTimeoutError::Timeout) => {
                if shared.is_failed() {
                    let _ = socket.shutdown(Shutdown::Both);
                    break;
                }
                // Our QEMU closed its side long ago and the peer's never ends: do not linger forever.
                let local_ended = shared.state.lock().credit(id).is_some()
                    && shared.locals.lock().get(&id).is_some_and(|l| l.pumps == 1);
                if local_ended && idle_since.elapsed() > shared.io_timeout {
                    shared.reset_channel(
                        id,
                        "the peer's QEMU kept its side open long after ours closed",
                        true,
                    );
                    break;
                }
            }
        }
    }
    shared.pump_finished(id);
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("role", &self.shared.role)
            .finish()
    }
}
