//! The streams of a running migration: opening and authenticating them, the acknowledgement reader
//! of each, background joins, parked streams from the connection pool, and the orderly end.

use dwcp_core::latency::{LatencyOp, LatencyRecorder};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, unbounded};

use dwcp_core::error::Error;
use dwcp_core::frame::{FrameType, MAX_PAYLOAD};
use dwcp_core::handshake::{Negotiated, Offer, client_handshake};
use dwcp_core::messages::{Ack, DigestMessage, JoinMessage, decode_u64, encode_u64};
use dwcp_core::transport::{Conn, Connector};
use dwcp_tcp::{LaneHandle, Lanes, Mode};
use dwcp_tls::Security;

use crate::pool::{ConnectionPool, PoolKey, PooledStream};
use crate::session::{
    StreamReader, StreamWriter, classify, peer_error, read_expected, split, unexpected,
};

/// An authenticated stream, ready to become a lane.
pub(super) struct JoinedStream {
    pub(super) index: u16,
    pub(super) reader: StreamReader,
    pub(super) writer: StreamWriter,
}

/// What the streams' threads report to the driver.
pub(super) enum LinkEvent {
    Verdict(u128),
    CommitAck,
    /// The destination reported an error or broke the protocol: the migration cannot continue.
    Fatal(u16, Error),
    /// A stream started in the background finished its handshake (or failed to).
    Joined(u16, Result<JoinedStream, Error>),
}

/// What opening a stream needs, shareable with background join threads.
#[derive(Clone)]
pub(super) struct Dialer {
    pub(super) connector: Arc<dyn Connector>,
    pub(super) security: Security,
    pub(super) offer: Offer,
    pub(super) connect_timeout: Duration,
    pub(super) io_timeout: Duration,
    /// The migration's latency histograms (stream setup here; the lanes add send and ack).
    pub(super) latency: Arc<LatencyRecorder>,
}

impl Dialer {
    /// Connects and authenticates stream `index` of `session_id` (0: open a new session).
    pub(super) fn open(
        &self,
        session_id: u64,
        index: u16,
    ) -> Result<(JoinedStream, Negotiated), Error> {
        let started = std::time::Instant::now();
        let conn = self.connector.connect(self.connect_timeout)?;
        let secured =
            self.security
                .connect(conn, self.connector.peer(), started + self.connect_timeout)?;
        let (mut reader, mut writer) = split(secured.conn, self.connect_timeout)?;
        let neg = client_handshake(
            &mut reader,
            &mut writer,
            &secured.handshake_key,
            self.offer,
            session_id,
            index,
        )
        .map_err(|e| classify(e, "a stream's handshake"))?;
        set_timeouts(writer.get_ref(), self.io_timeout, "configuring a stream")?;
        self.latency
            .record(LatencyOp::StreamSetup, started.elapsed());
        Ok((
            JoinedStream {
                index: neg.stream_index,
                reader,
                writer,
            },
            neg,
        ))
    }
}

fn set_timeouts(conn: &dyn Conn, timeout: Duration, what: &'static str) -> Result<(), Error> {
    let ctx = |e| Error::io(what, e);
    conn.set_read_timeout(Some(timeout)).map_err(ctx)?;
    conn.set_write_timeout(Some(timeout)).map_err(ctx)
}

/// The streams of one session.
pub(super) struct Links {
    pub(super) lanes: Lanes,
    pub(super) dialer: Dialer,
    pub(super) session_id: u64,
    /// Acknowledgement readers; each returns its stream's reader if the stream was parked.
    readers: Vec<JoinHandle<Option<(u16, StreamReader)>>>,
    pub(super) events: Receiver<LinkEvent>,
    events_tx: Sender<LinkEvent>,
    finished: Arc<AtomicBool>,
    pending_joins: usize,
    /// Parked streams taken from the pool and not used yet (joined before new connections are dialed).
    pooled_spare: Vec<PooledStream>,
    /// Where this migration's streams are parked when it succeeds.
    parking: Option<(ConnectionPool, PoolKey)>,
    /// Capabilities of the session's streams (kept with them in the pool).
    capabilities: u32,
    /// Session version of the streams (kept with them in the pool).
    version: u8,
    rtt: f64,
}

impl Links {
    pub(super) fn new(
        dialer: Dialer,
        session_id: u64,
        pooled_spare: Vec<PooledStream>,
        parking: Option<(ConnectionPool, PoolKey)>,
        capabilities: u32,
        version: u8,
        rtt: f64,
    ) -> Self {
        let (events_tx, events) = unbounded();
        let lanes = Lanes::new();
        lanes.record_latency_into(Arc::clone(&dialer.latency));
        Self {
            lanes,
            dialer,
            session_id,
            readers: Vec::new(),
            events,
            events_tx,
            finished: Arc::new(AtomicBool::new(false)),
            pending_joins: 0,
            pooled_spare,
            parking,
            capabilities,
            version,
            rtt,
        }
    }

    /// Starts connecting stream `index` in the background; [`LinkEvent::Joined`] reports the result.
    pub(super) fn spawn_join(&mut self, index: u16) {
        self.pending_joins += 1;
        let (dialer, tx, session) = (self.dialer.clone(), self.events_tx.clone(), self.session_id);
        let pooled = self.pooled_spare.pop();
        let spawned = std::thread::Builder::new()
            .name(format!("amst-join-{index}"))
            .spawn(move || {
                // A parked stream joins in one round trip; if it fails its check, dial a new one.
                let rejoined = pooled.and_then(|p| {
                    join_pooled(p, session, index, dialer.connect_timeout, dialer.io_timeout)
                        .inspect_err(
                            |e| tracing::debug!(error = %e, "a pooled stream could not join"),
                        )
                        .ok()
                });
                let joined = match rejoined {
                    Some(j) => Ok(j),
                    None => dialer.open(session, index).map(|(j, _)| j),
                };
                let _ = tx.send(LinkEvent::Joined(index, joined));
            });
        if let Err(e) = spawned {
            // Reported like a failed join, so the machine's count of pending joins stays true.
            let _ = self.events_tx.send(LinkEvent::Joined(
                index,
                Err(Error::io("starting a stream's join", e)),
            ));
        }
    }

    /// A background join reported back.
    pub(super) fn join_done(&mut self) {
        self.pending_joins = self.pending_joins.saturating_sub(1);
    }

    /// Makes an authenticated stream a lane with its acknowledgement reader, tuned for `mode`.
    pub(super) fn install(&mut self, joined: JoinedStream, mode: Mode) -> Result<(), Error> {
        let index = joined.index;
        let handle = self.lanes.add(index, joined.writer)?;
        let (tx, finished) = (self.events_tx.clone(), Arc::clone(&self.finished));
        let reader = joined.reader;
        let thread = std::thread::Builder::new()
            .name(format!("amst-rx-{index}"))
            .spawn(move || ack_reader(handle, reader, tx, finished))
            .map_err(|e| Error::io("starting an acknowledgement reader", e))?;
        self.readers.push(thread);
        let (rtt, io_timeout) = (self.rtt, self.dialer.io_timeout);
        self.lanes
            .with_conn(index, |c| tune_for_mode(c, mode, rtt, io_timeout));
        tracing::debug!(stream = index, live = self.lanes.live(), "stream joined");
        Ok(())
    }

    /// Ends every stream: parked for the next migration when it `succeeded` and a pool is set,
    /// otherwise closed. Waits (bounded) for the readers and for joins still under way.
    pub(super) fn shutdown(&mut self, succeeded: bool) {
        self.finished.store(true, Ordering::Release);
        let parking = succeeded && self.parking.is_some();
        let writers = if parking {
            // Bound the wait for the destination's Park answers.
            self.lanes.park()
        } else {
            let _ = self.lanes.close();
            Vec::new()
        };
        for (_, w) in &writers {
            let _ = w.get_ref().set_read_timeout(Some(
                self.dialer.connect_timeout.min(Duration::from_secs(2)),
            ));
        }
        // The destination closes (or parks) its side once it has read our Close (Park) frames; readers
        // then return. A reader of a stream that is still joining in the background ends with it.
        let mut readers: Vec<(u16, StreamReader)> = Vec::new();
        for r in self.readers.drain(..) {
            if let Ok(Some(parked)) = r.join() {
                readers.push(parked);
            }
        }
        if let Some((pool, key)) = &self.parking {
            let mut parked = Vec::new();
            for (id, writer) in writers {
                if let Some(i) = readers.iter().position(|(r, _)| *r == id) {
                    let (_, reader) = readers.swap_remove(i);
                    parked.push(PooledStream::new(
                        reader,
                        writer,
                        self.capabilities,
                        self.version,
                    ));
                }
            }
            tracing::debug!(
                parked = parked.len(),
                "streams parked for the next migration"
            );
            parked.append(&mut self.pooled_spare);
            pool.put(*key, parked);
        }
        while self.pending_joins > 0 {
            match self.events.recv_timeout(self.dialer.connect_timeout) {
                Ok(LinkEvent::Joined(_, joined)) => {
                    self.pending_joins -= 1;
                    if let Ok(j) = joined {
                        let _ = j.writer.get_ref().shutdown(std::net::Shutdown::Both);
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
}

/// Checks a parked stream with Ping/Pong within `timeout`.
pub(super) fn health_check(p: &mut PooledStream, timeout: Duration) -> Result<(), Error> {
    set_timeouts(p.writer.get_ref(), timeout, "configuring a pooled stream")?;
    let nonce = dwcp_core::handshake::new_session_id();
    p.writer.write_frame(FrameType::Ping, &encode_u64(nonce))?;
    let mut payload = Vec::new();
    read_expected(&mut p.reader, &mut payload, FrameType::Pong, "Pong")?;
    if decode_u64(&payload, "Pong")? != nonce {
        return Err(Error::Protocol(
            "a parked stream answered the health check with another nonce".into(),
        ));
    }
    Ok(())
}

/// Joins a parked stream to session `session_id` as stream `index`: Ping/Pong, then Join answered by
/// SessionReady. Both directions are bound to the new session afterwards.
fn join_pooled(
    mut p: PooledStream,
    session_id: u64,
    index: u16,
    timeout: Duration,
    io_timeout: Duration,
) -> Result<JoinedStream, Error> {
    health_check(&mut p, timeout.min(Duration::from_secs(1)))?;
    let join = JoinMessage {
        session_id,
        stream_index: index,
    };
    p.writer.write_frame(FrameType::Join, &join.encode())?;
    p.writer.bind_session(session_id);
    let mut payload = Vec::new();
    read_expected(
        &mut p.reader,
        &mut payload,
        FrameType::SessionReady,
        "the answer to Join",
    )?;
    p.reader.bind_session(session_id, MAX_PAYLOAD);
    set_timeouts(p.writer.get_ref(), io_timeout, "configuring a stream")?;
    Ok(JoinedStream {
        index,
        reader: p.reader,
        writer: p.writer,
    })
}

/// The error a stream's failure is reported as.
pub(super) fn lane_error(lane: u16, e: Error) -> Error {
    match e {
        e @ (Error::Peer { .. } | Error::Timeout(_)) => e,
        other => Error::Protocol(format!("stream {lane} failed: {other}")),
    }
}

/// Applies the socket options of `mode` to a TCP stream (buffers sized for the path, the unsent
/// limit, the user timeout); other transports are left as they are.
fn tune_for_mode(conn: &dyn Conn, mode: Mode, rtt: f64, io_timeout: Duration) {
    let Some(tcp) = conn.as_tcp() else {
        return;
    };
    if mode == Mode::Datacenter {
        return;
    }
    // The link rate is not known yet: size buffers for 1 Gbit/s, the fastest internet path we plan for.
    let profile = mode.profile(125e6, Duration::from_secs_f64(rtt), io_timeout);
    if let Err(e) = dwcp_tcp::apply(tcp, &profile) {
        tracing::warn!(error = %e, ?mode, "could not apply the mode's socket options");
    }
}

/// Reads one stream's frames from the destination: acknowledgements release chunks, handover frames
/// go to the driver. A broken stream marks its lane failed so the driver re-sends its chunks.
fn ack_reader(
    lane: LaneHandle,
    mut reader: StreamReader,
    events: Sender<LinkEvent>,
    finished: Arc<AtomicBool>,
) -> Option<(u16, StreamReader)> {
    let mut p = Vec::new();
    loop {
        let h = match reader.read_frame(&mut p) {
            Ok(h) => h,
            Err(e) => {
                if finished.load(Ordering::Acquire) {
                    return None;
                }
                let e = classify(e, "acknowledgements");
                // An idle stream (nothing awaiting acknowledgement) may be silent for long.
                if matches!(e, Error::Timeout(_)) && lane.unacknowledged() == 0 {
                    continue;
                }
                lane.fail(e.to_string());
                return None;
            }
        };
        let event = match h.frame_type {
            FrameType::Ack => match Ack::decode(&p) {
                Ok(a) => {
                    lane.acknowledge(a.through_seq);
                    continue;
                }
                Err(e) => LinkEvent::Fatal(lane.id(), e.into()),
            },
            FrameType::Verdict => match DigestMessage::decode(&p) {
                Ok(d) => LinkEvent::Verdict(d.digest),
                Err(e) => LinkEvent::Fatal(lane.id(), e.into()),
            },
            FrameType::CommitAck => LinkEvent::CommitAck,
            FrameType::Close => {
                if !finished.load(Ordering::Acquire) {
                    // The destination refused or dropped this stream: re-send what it carried.
                    lane.fail("the destination closed the stream");
                }
                return None;
            }
            // The destination parked the stream after the handover: it is reusable.
            FrameType::Park if finished.load(Ordering::Acquire) => {
                return Some((lane.id(), reader));
            }
            FrameType::Error => LinkEvent::Fatal(lane.id(), peer_error(&p)),
            other => LinkEvent::Fatal(lane.id(), unexpected(other, "from the destination")),
        };
        let fatal = matches!(event, LinkEvent::Fatal(..));
        let _ = events.send(event);
        if fatal {
            return None;
        }
    }
}
