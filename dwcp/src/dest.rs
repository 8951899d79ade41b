//! The destination side: accept an authenticated session, apply pages from every stream (newest
//! iteration wins), compare digests, and take over the VM on the source's commit.
//!
//! Streams of a session may join at any time (the source adds streams while it runs, and reconnects
//! after failures), so the listener keeps accepting for the session while it runs. A stream that
//! breaks is dropped without ending the session: the source re-sends what that stream carried, and
//! the chunk ledger makes sure a chunk that arrives twice is applied once. The session ends with an
//! error when the source breaks the protocol, reports an error, or leaves no stream open for longer
//! than it may take to reconnect.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use parking_lot::Mutex;

use dwcp_core::apply::{Applied, PageVersions};
use dwcp_core::digest::{PageHashes, ZERO_PAGE_HASH};
use dwcp_core::error::{Error, FrameError, HandshakeError};
use dwcp_core::frame::{FrameType, HEADER_LEN, MAX_PAYLOAD};
use dwcp_core::handshake::{Negotiated, Offer, Psk, new_session_id, server_handshake};
use dwcp_core::ledger::{ChunkLedger, Claim};
use dwcp_core::memory::{MemoryLayout, MemorySink, PAGE_SIZE};
use dwcp_core::messages::{
    Ack, DigestMessage, Finish, JoinMessage, SessionInit, decode_u64, encode_u64,
};
use dwcp_core::transport::{Acceptor, Conn};
use dwcp_hde::{ChunkDecoder, DecodeScratch, PageData};
use dwcp_tcp::TcpAcceptor;

use crate::config::{ReceiverConfig, threads_or_cores};
use crate::report::ReceiveReport;
use crate::session::{
    StreamReader, StreamWriter, classify, hex, peer_error, report_error, split, unexpected,
};

/// Acknowledge at least every this many applied data frames, even while more are buffered.
const ACK_EVERY_FRAMES: u32 = 16;
/// ... or every this many applied payload bytes: the source keeps each chunk's buffer until it is
/// acknowledged, so coarse acknowledgements would hold its buffer pool full.
const ACK_EVERY_BYTES: usize = 1 << 20;
/// Handshakes of joining streams run at once, at most (a flood of connections waits in the backlog).
const MAX_CONCURRENT_JOINS: usize = 16;
/// How often the session's acceptor looks for joining streams.
const JOIN_POLL: Duration = Duration::from_millis(20);

/// A destination waiting for migrations.
pub struct Listener {
    acceptor: Box<dyn Acceptor>,
    psk: Psk,
    config: ReceiverConfig,
    /// New sessions that arrived while another session ran (authenticated, not yet read), and parked
    /// streams a source opens a session on.
    openers_tx: Sender<Opener>,
    openers_rx: Receiver<Opener>,
    /// Parked streams that join a running session.
    joins_tx: Sender<ParkedJoin>,
    joins_rx: Receiver<ParkedJoin>,
    parked_count: Arc<AtomicU64>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("acceptor", &self.acceptor)
            .field("config", &self.config)
            .field("parked", &self.parked_count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A stream that opens the next session.
enum Opener {
    /// A parked stream on which the source sent SessionInit (its payload).
    Parked(StreamReader, SharedWriter, Vec<u8>),
    /// A new, authenticated connection asking for a new session while another one was running (a
    /// source starting its next migration a moment before the previous session ended here).
    Fresh(Negotiated, StreamReader, StreamWriter, SocketAddr),
}

/// A parked stream that asks to join a session.
type ParkedJoin = (JoinMessage, StreamReader, SharedWriter);

/// Streams a destination keeps parked at most (more are closed instead).
const MAX_PARKED: u64 = 256;

impl Listener {
    /// Listens for TCP streams on `addr`; sources must prove knowledge of `psk`.
    pub fn bind(addr: SocketAddr, psk: Psk, config: ReceiverConfig) -> Result<Self, Error> {
        let acceptor = TcpAcceptor::bind(addr, config.socket.clone())?;
        Ok(Self::over(Box::new(acceptor), psk, config))
    }

    /// Receives migrations over any transport: `acceptor` hands out the connections sources open
    /// (TCP, RDMA, ...); the engine above it is the same.
    pub fn over(acceptor: Box<dyn Acceptor>, psk: Psk, config: ReceiverConfig) -> Self {
        let (openers_tx, openers_rx) = unbounded();
        let (joins_tx, joins_rx) = unbounded();
        Self {
            acceptor,
            psk,
            config,
            openers_tx,
            openers_rx,
            joins_tx,
            joins_rx,
            parked_count: Arc::default(),
        }
    }

    /// Streams parked for reuse by a later session right now.
    pub fn parked_streams(&self) -> u64 {
        self.parked_count.load(Ordering::Relaxed)
    }

    /// Keeps an authenticated stream of an ended session for reuse: a thread answers its health checks
    /// until the source opens a session or joins one on it, or it has been idle for
    /// `pool_idle_timeout`.
    fn park(&self, reader: StreamReader, writer: SharedWriter) {
        if self.parked_count.fetch_add(1, Ordering::AcqRel) >= MAX_PARKED {
            self.parked_count.fetch_sub(1, Ordering::AcqRel);
            let _ = writer.lock().write_frame(FrameType::Close, &[]);
            return;
        }
        let (openers, joins, count, idle) = (
            self.openers_tx.clone(),
            self.joins_tx.clone(),
            Arc::clone(&self.parked_count),
            self.config.pool_idle_timeout,
        );
        let spawned = std::thread::Builder::new()
            .name("amst-parked".into())
            .spawn(move || {
                watch_parked(reader, writer, &openers, &joins, idle);
                count.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            self.parked_count.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.acceptor.local_addr()
    }

    /// Waits for a source, authenticates it and reads what it wants to send. A peer that fails the
    /// handshake yields an error (nothing has been written anywhere); call again to keep waiting.
    pub fn accept(&self) -> Result<Incoming<'_>, Error> {
        let conn = loop {
            match self.openers_rx.try_recv() {
                Ok(Opener::Parked(reader, writer, init)) => {
                    return self.open_on_parked(reader, writer, &init);
                }
                Ok(Opener::Fresh(neg, reader, writer, peer)) => {
                    return self.opened(neg, reader, writer, peer, Instant::now());
                }
                Err(_) => {}
            }
            // Joins for a session that has ended.
            while let Ok((join, _, writer)) = self.joins_rx.try_recv() {
                let e = Error::Handshake(HandshakeError::UnknownSession(join.session_id));
                report_error(&mut writer.lock(), &e);
            }
            if let Some(c) = self.acceptor.accept_timeout(JOIN_POLL)? {
                break c;
            }
        };
        let started = Instant::now();
        let peer = conn
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (mut reader, mut writer) = split(conn, self.config.connect_timeout)?;
        let neg = server_handshake(
            &mut reader,
            &mut writer,
            &self.psk,
            Offer::default(),
            |requested| {
                if requested == 0 {
                    Ok(new_session_id())
                } else {
                    Err(HandshakeError::UnknownSession(requested).into())
                }
            },
        )
        .map_err(|e| classify(e, "the handshake"))?;
        self.opened(neg, reader, writer, peer, started)
    }

    /// Reads SessionInit on the first stream of a new session.
    fn opened(
        &self,
        neg: Negotiated,
        mut reader: StreamReader,
        mut writer: StreamWriter,
        peer: SocketAddr,
        started: Instant,
    ) -> Result<Incoming<'_>, Error> {
        if neg.stream_index != 0 {
            let e = Error::Protocol(format!(
                "a new session must start with stream 0, not {}",
                neg.stream_index
            ));
            report_error(&mut writer, &e);
            return Err(e);
        }
        let mut p = Vec::new();
        let mut h = reader
            .read_frame(&mut p)
            .map_err(|e| classify(e, "SessionInit"))?;
        // An optional zstd dictionary for the session's chunks comes first.
        let mut dictionary = None;
        if h.frame_type == FrameType::Dictionary {
            match dwcp_hde::Dictionary::from_bytes(&p) {
                Ok(d) => dictionary = Some(Arc::new(d)),
                Err(e) => {
                    let e = Error::from(e);
                    report_error(&mut writer, &e);
                    return Err(e);
                }
            }
            h = reader
                .read_frame(&mut p)
                .map_err(|e| classify(e, "SessionInit"))?;
        }
        let init = match h.frame_type {
            FrameType::SessionInit => p,
            FrameType::Error => return Err(peer_error(&p)),
            other => {
                let e = unexpected(other, "instead of SessionInit");
                report_error(&mut writer, &e);
                return Err(e);
            }
        };
        let mut incoming = self.incoming(
            neg.session_id,
            reader,
            writer,
            &init,
            peer,
            started,
            Vec::new(),
        )?;
        incoming.dictionary = dictionary;
        Ok(incoming)
    }

    /// A new session on a stream parked by an earlier one: SessionReady will carry the new id.
    fn open_on_parked(
        &self,
        mut reader: StreamReader,
        writer: SharedWriter,
        init: &[u8],
    ) -> Result<Incoming<'_>, Error> {
        let Ok(writer) = Arc::try_unwrap(writer).map(Mutex::into_inner) else {
            return Err(Error::Protocol(
                "a parked stream is still in use by the previous session".into(),
            ));
        };
        let session_id = new_session_id();
        reader.bind_session(session_id, MAX_PAYLOAD);
        let peer = writer
            .get_ref()
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        for c in [reader.get_ref().get_ref(), writer.get_ref()] {
            let _ = c.set_read_timeout(Some(self.config.connect_timeout));
            let _ = c.set_write_timeout(Some(self.config.connect_timeout));
        }
        tracing::debug!(session = %format!("{session_id:x}"), "session opened on a parked stream");
        self.incoming(
            session_id,
            reader,
            writer,
            init,
            peer,
            Instant::now(),
            encode_u64(session_id).to_vec(),
        )
    }

    /// Validates SessionInit and returns the session waiting for its sink.
    #[allow(clippy::too_many_arguments)]
    fn incoming(
        &self,
        session_id: u64,
        reader: StreamReader,
        mut writer: StreamWriter,
        init: &[u8],
        peer: SocketAddr,
        started: Instant,
        ready_payload: Vec<u8>,
    ) -> Result<Incoming<'_>, Error> {
        let init = match SessionInit::decode(init) {
            Ok(init) => init,
            Err(e) => {
                let e = Error::from(e);
                report_error(&mut writer, &e);
                return Err(e);
            }
        };
        if init.layout.total_bytes() > self.config.max_memory_bytes {
            let e = Error::Layout(format!(
                "source announces {} bytes of memory, this destination accepts at most {}",
                init.layout.total_bytes(),
                self.config.max_memory_bytes
            ));
            report_error(&mut writer, &e);
            return Err(e);
        }
        tracing::info!(session = %format!("{session_id:x}"), %peer, bytes = init.layout.total_bytes(), streams = init.stream_count, "source authenticated");
        Ok(Incoming {
            listener: self,
            session_id,
            init,
            reader,
            writer,
            peer,
            started,
            ready_payload,
            dictionary: None,
        })
    }
}

/// Answers a parked stream's health checks until the source reuses it (the stream then goes to
/// `openers` or `joins`), closes it, or leaves it idle for `idle`.
fn watch_parked(
    mut reader: StreamReader,
    writer: SharedWriter,
    openers: &Sender<Opener>,
    joins: &Sender<ParkedJoin>,
    idle: Duration,
) {
    let _ = reader.get_ref().get_ref().set_read_timeout(Some(idle));
    let mut p = Vec::new();
    loop {
        let Ok(h) = reader.read_frame(&mut p) else {
            return;
        };
        match h.frame_type {
            FrameType::Ping => {
                let Ok(nonce) = decode_u64(&p, "Ping") else {
                    return;
                };
                if writer
                    .lock()
                    .write_frame(FrameType::Pong, &encode_u64(nonce))
                    .is_err()
                {
                    return;
                }
            }
            FrameType::SessionInit => {
                let _ = openers.send(Opener::Parked(reader, writer, p));
                return;
            }
            FrameType::Join => {
                if let Ok(join) = JoinMessage::decode(&p) {
                    let _ = joins.send((join, reader, writer));
                }
                return;
            }
            _ => return,
        }
    }
}

/// An authenticated source whose memory layout is known; decide where its pages go.
#[derive(Debug)]
pub struct Incoming<'l> {
    listener: &'l Listener,
    session_id: u64,
    init: SessionInit,
    reader: StreamReader,
    writer: StreamWriter,
    peer: SocketAddr,
    started: Instant,
    /// SessionReady's payload: empty, or the new session id on a parked stream.
    ready_payload: Vec<u8>,
    /// The zstd dictionary the source sent for this session's chunks.
    dictionary: Option<Arc<dwcp_hde::Dictionary>>,
}

type SharedWriter = Arc<Mutex<StreamWriter>>;
/// A stream of a running session: its index, its writer and a handle to shut it down.
type RegisteredStream = (u16, SharedWriter, Box<dyn Conn>);

enum Event {
    /// An authenticated stream joined the session (`true`: a parked stream, which is owed
    /// SessionReady).
    Joined(u16, StreamReader, StreamWriter, bool),
    /// The source sent Finish on a stream (answer on the same stream).
    Finish(Finish, SharedWriter),
    /// The source committed the handover.
    Commit(u128, SharedWriter),
    /// A stream ended: cleanly (`Ok`), broken (`Lost`: the source may re-send and reconnect), or
    /// with an error that ends the session (`Fatal`).
    Ended(u16, StreamEnd),
}

enum StreamEnd {
    Closed,
    /// The source parked the stream after the handover (connection pool).
    Parked(StreamReader),
    Lost(Error),
    Fatal(Error),
}

struct Shared<'s> {
    sink: &'s dyn MemorySink,
    /// The sink was all zeros when this migration started (asked once: writes change the answer).
    sink_started_zeroed: bool,
    /// The source sent Finish: any further data frame is a protocol violation.
    finished: AtomicBool,
    versions: PageVersions,
    hashes: PageHashes,
    ledger: ChunkLedger,
    decoder: ChunkDecoder,
    total_pages: u64,
    pages_applied: AtomicU64,
    stale: AtomicU64,
    duplicates: AtomicU64,
    wire_bytes: AtomicU64,
}

impl<'l> Incoming<'l> {
    /// The memory layout the source will send.
    pub fn layout(&self) -> &MemoryLayout {
        &self.init.layout
    }

    /// The source's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Refuses the migration, telling the source why (`code` says what kind of refusal it is).
    pub fn refuse(mut self, code: dwcp_core::ErrorCode, reason: &str) {
        let msg = dwcp_core::messages::ErrorMessage {
            code,
            message: reason.to_string(),
        };
        let _ = self.writer.write_frame(FrameType::Error, &msg.encode());
    }

    /// Receives the migration into `sink`, whose layout must equal [`layout`](Self::layout). Returns after
    /// the digests matched and the source committed the handover: the caller now owns the VM.
    pub fn receive_into(mut self, sink: &dyn MemorySink) -> Result<ReceiveReport, Error> {
        if sink.layout() != &self.init.layout {
            let e = Error::Layout(format!(
                "destination memory has {} pages, the source sends {}",
                sink.layout().total_pages(),
                self.init.layout.total_pages()
            ));
            report_error(&mut self.writer, &e);
            return Err(e);
        }
        let listener = self.listener;
        let cfg = listener.config.clone();
        for c in [self.reader.get_ref().get_ref(), self.writer.get_ref()] {
            let _ = c.set_read_timeout(Some(cfg.io_timeout));
            let _ = c.set_write_timeout(Some(cfg.io_timeout));
        }
        self.writer
            .write_frame(FrameType::SessionReady, &self.ready_payload)?;
        self.writer.bind_session(self.session_id);
        let total_pages = self.init.layout.total_pages();
        let shared = Shared {
            sink,
            sink_started_zeroed: sink.starts_zeroed(),
            finished: AtomicBool::new(false),
            versions: PageVersions::new(total_pages),
            hashes: PageHashes::new(total_pages),
            ledger: ChunkLedger::new(),
            // Each stream's thread decodes its own chunks; the decoder's pool is not used.
            decoder: {
                let mut d = ChunkDecoder::new(1)?;
                d.set_dictionary(self.dictionary.clone());
                d
            },
            total_pages,
            pages_applied: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
        };
        let session = Session {
            id: self.session_id,
            max_streams: usize::from(self.init.stream_count).max(1),
            cfg: &cfg,
            listener,
            writers: Mutex::new(Vec::new()),
            stop_accepting: AtomicBool::new(false),
            streams_opened: AtomicU64::new(0),
        };
        let (tx, events) = unbounded();
        let outcome = std::thread::scope(|scope| {
            session.start_stream(scope, 0, self.reader, self.writer, &shared, &tx);
            let acceptor = {
                let (session, tx) = (&session, tx.clone());
                std::thread::Builder::new()
                    .name("amst-accept".into())
                    .spawn_scoped(scope, move || session.accept_joins(&tx))
                    .expect("spawning the session's acceptor")
            };
            let result = session.control(scope, &shared, &events, &tx);
            session.stop_accepting.store(true, Ordering::Release);
            let _ = acceptor.join();
            if let Err(e) = &result {
                session.fail_all(e);
                tracing::warn!(error = %e, "migration failed on the destination");
            }
            drop(tx);
            result
        });
        let (final_iteration, digest) = outcome?;
        let pages = shared.pages_applied.load(Ordering::Relaxed);
        let report = ReceiveReport {
            session_id: format!("{:016x}", self.session_id),
            total_ms: self.started.elapsed().as_secs_f64() * 1e3,
            streams: session.streams_opened.load(Ordering::Relaxed) as usize,
            duplicate_chunks: shared.duplicates.load(Ordering::Relaxed),
            memory_bytes: self.init.layout.total_bytes(),
            pages_applied: pages,
            stale_pages_dropped: shared.stale.load(Ordering::Relaxed),
            logical_bytes: (pages + shared.stale.load(Ordering::Relaxed)) * PAGE_SIZE as u64,
            wire_bytes: shared.wire_bytes.load(Ordering::Relaxed),
            final_iteration,
            digest_match: true,
            digest: hex(digest),
        };
        tracing::info!(session = %report.session_id, pages, "migration received and committed");
        Ok(report)
    }
}

/// One running session's stream management.
struct Session<'a> {
    id: u64,
    max_streams: usize,
    cfg: &'a ReceiverConfig,
    listener: &'a Listener,
    /// Every stream's writer, to tell the source why the session failed and shut the streams down.
    writers: Mutex<Vec<RegisteredStream>>,
    stop_accepting: AtomicBool,
    streams_opened: AtomicU64,
}

impl<'a> Session<'a> {
    /// Tells the source why the session failed (on every stream that still takes a frame) and shuts
    /// every stream down, which unblocks their threads at once instead of at their read time-out.
    fn fail_all(&self, error: &Error) {
        for (_, w, conn) in self.writers.lock().iter() {
            // A writer blocked on a stalled stream must not stall the failure itself.
            if let Some(mut w) = w.try_lock_for(Duration::from_millis(100)) {
                report_error(&mut w, error);
            }
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The writer of the newest stream with `index`, taken out of the registry (it is being parked).
    fn writer_of(&self, index: u16) -> Option<SharedWriter> {
        let mut writers = self.writers.lock();
        let at = writers.iter().rposition(|(i, _, _)| *i == index)?;
        Some(writers.swap_remove(at).1)
    }

    /// Starts the apply thread of one authenticated stream.
    fn start_stream<'scope>(
        &'scope self,
        scope: &'scope std::thread::Scope<'scope, '_>,
        index: u16,
        reader: StreamReader,
        writer: StreamWriter,
        shared: &'scope Shared<'_>,
        tx: &Sender<Event>,
    ) {
        self.streams_opened.fetch_add(1, Ordering::Relaxed);
        let conn = writer.get_ref().try_clone_conn();
        let writer = Arc::new(Mutex::new(writer));
        if let Ok(conn) = conn {
            self.writers.lock().push((index, Arc::clone(&writer), conn));
        }
        let thread_tx = tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("amst-apply-{index}"))
            .spawn_scoped(scope, move || {
                // A panicking sink must end the session with an error, not leave it hanging.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    apply_stream(reader, &writer, shared, &thread_tx)
                }));
                let end = match run {
                    Ok(end) => end,
                    Err(panic) => StreamEnd::Fatal(Error::Protocol(format!(
                        "applying pages panicked: {}",
                        panic_message(&panic)
                    ))),
                };
                if let StreamEnd::Fatal(e) = &end {
                    report_error(&mut writer.lock(), e);
                }
                let _ = thread_tx.send(Event::Ended(index, end));
            });
        if let Err(e) = spawned {
            let _ = tx.send(Event::Ended(
                index,
                StreamEnd::Lost(Error::io("starting a stream receiver", e)),
            ));
        }
    }

    /// Accepts connections for this session until told to stop; each is authenticated on its own
    /// short-lived thread, so a silent or hostile stranger cannot hold up the real streams, and
    /// strangers are turned away without ending the session.
    fn accept_joins(&self, tx: &Sender<Event>) {
        let in_flight = Arc::new(AtomicU64::new(0));
        while !self.stop_accepting.load(Ordering::Acquire) {
            while let Ok(join) = self.listener.joins_rx.try_recv() {
                self.parked_join(join, tx);
            }
            if in_flight.load(Ordering::Acquire) as usize >= MAX_CONCURRENT_JOINS {
                std::thread::sleep(JOIN_POLL);
                continue;
            }
            let conn = match self.listener.acceptor.accept_timeout(JOIN_POLL) {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a joining stream failed");
                    std::thread::sleep(JOIN_POLL);
                    continue;
                }
            };
            in_flight.fetch_add(1, Ordering::AcqRel);
            let (psk, tx, joining) = (
                self.listener.psk.clone(),
                tx.clone(),
                Arc::clone(&in_flight),
            );
            let (session_id, timeout) = (self.id, self.cfg.connect_timeout);
            let io_timeout = self.cfg.io_timeout;
            let openers = self.listener.openers_tx.clone();
            // Not scoped: a stranger's handshake may take until its time-out, and the session must not
            // wait for it to end.
            let spawned = std::thread::Builder::new()
                .name("amst-join".into())
                .spawn(move || {
                    match join_stream(conn, &psk, timeout, io_timeout, session_id) {
                        Ok((neg, r, w)) if neg.session_id == session_id => {
                            let _ = tx.send(Event::Joined(neg.stream_index, r, w, false));
                        }
                        Ok((neg, r, w)) => {
                            // The opener of the next session: the listener takes it once this one ends.
                            let peer = w
                                .get_ref()
                                .peer_addr()
                                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                            let _ = openers.send(Opener::Fresh(neg, r, w, peer));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "refused a stream that does not belong to the session")
                        }
                    }
                    joining.fetch_sub(1, Ordering::AcqRel);
                });
            if spawned.is_err() {
                in_flight.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// A parked stream that wants to join this session (or, wrongly, open another one).
    fn parked_join(&self, (join, mut reader, writer): ParkedJoin, tx: &Sender<Event>) {
        if join.session_id != self.id {
            let e = Error::Handshake(HandshakeError::UnknownSession(join.session_id));
            report_error(&mut writer.lock(), &e);
            return;
        }
        let Ok(writer) = Arc::try_unwrap(writer).map(Mutex::into_inner) else {
            return;
        };
        reader.bind_session(self.id, MAX_PAYLOAD);
        for c in [reader.get_ref().get_ref(), writer.get_ref()] {
            let _ = c.set_read_timeout(Some(self.cfg.io_timeout));
            let _ = c.set_write_timeout(Some(self.cfg.io_timeout));
        }
        let _ = tx.send(Event::Joined(join.stream_index, reader, writer, true));
    }

    /// The session's control flow: streams join and end; Finish → digest → Verdict → Commit →
    /// CommitAck.
    fn control<'scope>(
        &'scope self,
        scope: &'scope std::thread::Scope<'scope, '_>,
        shared: &'scope Shared<'_>,
        events: &Receiver<Event>,
        tx: &Sender<Event>,
    ) -> Result<(u32, u128), Error> {
        let cfg = self.cfg;
        // Streams the source may open over the session (re-connections included), before we suspect
        // a runaway client.
        let max_joins = 8 * self.max_streams as u64 + 64;
        let mut live: Vec<u16> = vec![0];
        let mut orphaned_since: Option<Instant> = None;
        let rejoin_window = cfg.io_timeout.max(cfg.connect_timeout);
        let mut finish: Option<Finish> = None;
        let mut digest: Option<u128> = None;
        let mut committed = false;
        loop {
            if committed && live.is_empty() {
                break;
            }
            let ev = match events.recv_timeout(Duration::from_millis(50)) {
                Ok(ev) => ev,
                Err(_) => {
                    if let Some(since) = orphaned_since {
                        if since.elapsed() >= rejoin_window {
                            if committed {
                                break;
                            }
                            return Err(Error::Timeout(format!(
                                "every stream of the session failed and the source did not reconnect within {rejoin_window:?}"
                            )));
                        }
                    }
                    continue;
                }
            };
            match ev {
                Event::Joined(index, r, mut w, pooled) => {
                    let refusal = if committed || finish.is_some() {
                        Some("the session is ending".to_string())
                    } else if live.contains(&index) {
                        Some(format!("stream index {index} is already in use"))
                    } else if live.len() >= 2 * self.max_streams {
                        // Twice the announced count: streams the source saw break may not have
                        // ended here yet while their replacements join.
                        Some(format!(
                            "the source announced at most {} streams",
                            self.max_streams
                        ))
                    } else if self.streams_opened.load(Ordering::Relaxed) >= max_joins {
                        Some(format!("{max_joins} streams opened in one session"))
                    } else {
                        None
                    };
                    if let Some(why) = refusal {
                        // Close, not Error: the refusal concerns this stream, not the session (the
                        // source re-sends whatever it queued on it).
                        tracing::warn!(stream = index, %why, "refused a joining stream");
                        let _ = w.write_frame(FrameType::Close, &[]);
                        let _ = w.get_ref().shutdown(std::net::Shutdown::Both);
                        continue;
                    }
                    if pooled {
                        // SessionReady still carries the stream's old session id; then it is ours.
                        if let Err(e) = w.write_frame(FrameType::SessionReady, &[]) {
                            tracing::warn!(stream = index, error = %e, "a parked stream failed to join");
                            continue;
                        }
                        w.bind_session(self.id);
                    }
                    live.push(index);
                    orphaned_since = None;
                    self.start_stream(scope, index, r, w, shared, tx);
                }
                Event::Ended(index, end) => {
                    live.retain(|&i| i != index);
                    match end {
                        StreamEnd::Closed => {}
                        StreamEnd::Parked(reader) if committed => {
                            if let Some(w) = self.writer_of(index) {
                                if w.lock().write_frame(FrameType::Park, &[]).is_ok() {
                                    self.listener.park(reader, w);
                                }
                            }
                        }
                        StreamEnd::Parked(_) => {
                            return Err(Error::Protocol(
                                "the source parked a stream before the handover".into(),
                            ));
                        }
                        StreamEnd::Lost(e) if !committed => {
                            tracing::warn!(stream = index, error = %e, "stream lost; waiting for the source to re-send");
                        }
                        StreamEnd::Lost(e) => {
                            tracing::debug!(stream = index, error = %e, "stream ended after the handover");
                        }
                        StreamEnd::Fatal(e) if committed => {
                            tracing::debug!(stream = index, error = %e, "stream ended after the handover");
                        }
                        StreamEnd::Fatal(e) => return Err(e),
                    }
                    if live.is_empty() {
                        orphaned_since = Some(Instant::now());
                    }
                }
                Event::Finish(f, writer) => {
                    if finish.is_some() {
                        return Err(Error::Protocol("second finish".into()));
                    }
                    shared.finished.store(true, Ordering::Release);
                    let d = verify_finished(shared, &f, cfg)?;
                    writer
                        .lock()
                        .write_frame(FrameType::Verdict, &DigestMessage { digest: d }.encode())?;
                    finish = Some(f);
                    digest = Some(d);
                }
                Event::Commit(theirs, writer) => {
                    let Some(ours) = digest else {
                        return Err(Error::Protocol("commit before finish".into()));
                    };
                    if committed {
                        return Err(Error::Protocol("second commit".into()));
                    }
                    if theirs != ours {
                        return Err(Error::DigestMismatch {
                            source_digest: theirs,
                            destination_digest: ours,
                        });
                    }
                    shared.sink.flush()?;
                    writer.lock().write_frame(FrameType::CommitAck, &[])?;
                    committed = true;
                    // Wait (bounded) for the source's Close on every stream so the sockets end cleanly.
                    orphaned_since = Some(Instant::now());
                }
            }
        }
        let f = finish.expect("committed after finish");
        Ok((
            f.final_iteration,
            digest.expect("digest computed at finish"),
        ))
    }
}

/// Checks that everything the source sent has been applied and hashes the result.
fn verify_finished(
    shared: &Shared<'_>,
    finish: &Finish,
    cfg: &ReceiverConfig,
) -> Result<u128, Error> {
    // A chunk whose copy was claimed on a stream that then broke may still be being applied.
    let deadline = Instant::now() + cfg.io_timeout;
    while shared.ledger.in_progress() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if !shared.ledger.is_complete(finish.data_frames) {
        return Err(Error::Protocol(format!(
            "source finished after {} data frames, {} distinct ones were applied ({} still being applied)",
            finish.data_frames,
            shared.ledger.claimed(),
            shared.ledger.in_progress()
        )));
    }
    let missing = shared.versions.missing();
    if missing > 0 {
        return Err(Error::Protocol(format!(
            "source finished but {missing} pages were never sent"
        )));
    }
    Ok(shared.hashes.digest(threads_or_cores(cfg.digest_threads)))
}

/// Authenticates one connection that claims to join `session_id`, within `timeout`.
fn join_stream(
    conn: Box<dyn Conn>,
    psk: &Psk,
    timeout: Duration,
    io_timeout: Duration,
    session_id: u64,
) -> Result<(Negotiated, StreamReader, StreamWriter), Error> {
    let (mut r, mut w) = split(conn, timeout.max(Duration::from_millis(1)))?;
    let neg = server_handshake(&mut r, &mut w, psk, Offer::default(), |requested| {
        if requested == session_id {
            Ok(session_id)
        } else if requested == 0 {
            // A new session: it waits until this one has ended.
            Ok(new_session_id())
        } else {
            Err(HandshakeError::UnknownSession(requested).into())
        }
    })
    .map_err(|e| classify(e, "a joining stream's handshake"))?;
    let conn = w.get_ref();
    let ctx = |e| Error::io("configuring a stream", e);
    conn.set_read_timeout(Some(io_timeout)).map_err(ctx)?;
    conn.set_write_timeout(Some(io_timeout)).map_err(ctx)?;
    Ok((neg, r, w))
}

/// Marks a claimed chunk complete when dropped, so an error while applying cannot leave the ledger
/// waiting for it.
struct Claimed<'a>(&'a ChunkLedger, u64);

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        self.0.complete(self.1);
    }
}

/// Reads one stream until the source closes it, applying data frames.
fn apply_stream(
    mut reader: StreamReader,
    writer: &SharedWriter,
    shared: &Shared<'_>,
    events: &Sender<Event>,
) -> StreamEnd {
    let mut payload = Vec::new();
    let mut scratch = DecodeScratch::default();
    let mut unacked = 0u32;
    let mut unacked_bytes = 0usize;
    loop {
        let h = match reader.read_frame(&mut payload) {
            Ok(h) => h,
            // Broken, silent or corrupted in transit: the source re-sends what this stream carried.
            Err(e) => return StreamEnd::Lost(classify(e, "data from the source")),
        };
        shared
            .wire_bytes
            .fetch_add((HEADER_LEN + payload.len()) as u64, Ordering::Relaxed);
        let fatal = |e: Error| StreamEnd::Fatal(e);
        match h.frame_type {
            FrameType::Data => {
                if shared.finished.load(Ordering::Acquire) {
                    return fatal(Error::Protocol("data frame after Finish".into()));
                }
                let Some((id, chunk_bytes)) = payload.split_first_chunk::<8>() else {
                    return fatal(
                        FrameError::Malformed {
                            what: "Data",
                            why: "shorter than its chunk id".into(),
                        }
                        .into(),
                    );
                };
                let id = u64::from_le_bytes(*id);
                match shared.ledger.claim(id) {
                    Err(e) => return fatal(e.into()),
                    Ok(Claim::Duplicate) => {
                        shared.duplicates.fetch_add(1, Ordering::Relaxed);
                        // The first copy may still be being applied on a stream that broke; the Ack
                        // below lets the source start the next pass, whose deltas need it applied.
                        let deadline = Instant::now() + Duration::from_secs(5);
                        while shared.ledger.is_applying(id) && Instant::now() < deadline {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                    }
                    Ok(Claim::New) => {
                        let _claimed = Claimed(&shared.ledger, id);
                        if let Err(e) = apply_chunk(chunk_bytes, shared, &mut scratch) {
                            return fatal(e);
                        }
                    }
                }
                unacked += 1;
                unacked_bytes += payload.len();
                // Acknowledge before we would block on the stream, or periodically during long bursts.
                if reader.get_ref().buffer().is_empty()
                    || unacked >= ACK_EVERY_FRAMES
                    || unacked_bytes >= ACK_EVERY_BYTES
                {
                    if let Err(e) = writer
                        .lock()
                        .write_frame(FrameType::Ack, &Ack { through_seq: h.seq }.encode())
                    {
                        return StreamEnd::Lost(e);
                    }
                    unacked = 0;
                    unacked_bytes = 0;
                }
            }
            FrameType::Finish => match Finish::decode(&payload) {
                Ok(f) => {
                    let _ = events.send(Event::Finish(f, Arc::clone(writer)));
                }
                Err(e) => return fatal(e.into()),
            },
            FrameType::Commit => match DigestMessage::decode(&payload) {
                Ok(d) => {
                    let _ = events.send(Event::Commit(d.digest, Arc::clone(writer)));
                }
                Err(e) => return fatal(e.into()),
            },
            FrameType::Close => return StreamEnd::Closed,
            FrameType::Park => return StreamEnd::Parked(reader),
            FrameType::Error => return fatal(peer_error(&payload)),
            other => return fatal(unexpected(other, "from the source")),
        }
    }
}

/// Decodes one chunk and applies its pages (newest iteration wins).
fn apply_chunk(
    bytes: &[u8],
    shared: &Shared<'_>,
    scratch: &mut DecodeScratch,
) -> Result<(), Error> {
    // DUP and DELTA pages are rebuilt from the sink's current pages, after their hashes are checked.
    let chunk = shared
        .decoder
        .decode(bytes, shared.total_pages, shared.sink, scratch)?;
    let (mut applied, mut stale) = (0, 0);
    for (page, data) in &chunk.pages {
        let outcome = shared.versions.apply(*page, chunk.iteration, |previous| {
            match data {
                // Fresh memory is already zero where nothing was written: leave it untouched.
                PageData::Zero if previous.is_none() && shared.sink_started_zeroed => {
                    shared.hashes.set(*page, *ZERO_PAGE_HASH);
                    return;
                }
                PageData::Zero => shared.sink.write_zero_page(*page),
                PageData::Literal(bytes) => shared.sink.write_page(*page, bytes),
            }
            // Hash what the sink holds now, while it is in cache: the digest then proves the
            // stored bytes, not just the received ones.
            shared.hashes.set(*page, shared.sink.page_digest(*page));
        });
        match outcome {
            Applied::Written => applied += 1,
            Applied::Stale => stale += 1,
        }
    }
    shared.pages_applied.fetch_add(applied, Ordering::Relaxed);
    shared.stale.fetch_add(stale, Ordering::Relaxed);
    Ok(())
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
