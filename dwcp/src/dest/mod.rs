//! The destination side's I/O shell: accept an authenticated session, apply pages from every stream
//! (newest iteration wins), compare digests, and take over the VM on the source's commit.
//!
//! [`Listener`] accepts connections and authenticates sources (also keeping parked streams for
//! reuse); [`session`] runs one session: it accepts the streams that join it and carries out what
//! `dwcp_proto::dest::DestMachine` decides; [`apply`] is the data path, one thread per stream.
//!
//! Streams of a session may join at any time (the source adds streams while it runs, and reconnects
//! after failures), so the listener keeps accepting for the session while it runs. A stream that
//! breaks is dropped without ending the session: the source re-sends what that stream carried, and
//! the chunk ledger makes sure a chunk that arrives twice is applied once. The session ends with an
//! error when the source breaks the protocol, reports an error, or leaves no stream open for longer
//! than it may take to reconnect.
//!
//! The operator may cancel a session ([`Incoming::cancel_handle`]) until the destination has sent
//! its verdict on the digests: the source is told and resumes its guest, and `receive_into` fails
//! with [`Error::Cancelled`].

mod apply;
mod limits;
mod router;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use parking_lot::Mutex;

use dwcp_core::apply::PageVersions;
use dwcp_core::digest::PageHashes;
use dwcp_core::error::Error;
use dwcp_core::frame::{FrameType, MAX_PAYLOAD};
use dwcp_core::handshake::{Negotiated, Offer, new_session_id, server_handshake};
use dwcp_core::ledger::ChunkLedger;
use dwcp_core::memory::{MemoryLayout, MemorySink, PAGE_SIZE};
use dwcp_core::messages::{
    ExpectedIdentity, IdentityCheck, JoinMessage, SessionInit, VmIdentity, decode_u64, encode_u64,
};
use dwcp_core::transport::Acceptor;
use dwcp_hde::ChunkDecoder;
use dwcp_tcp::TcpAcceptor;
use dwcp_tls::Security;

use self::apply::{Shared, SharedWriter};
use self::limits::HandshakeSlots;
pub use self::limits::ListenerLimits;
use self::session::{ACCEPT_POLL, Session};
use crate::config::ReceiverConfig;
use crate::report::ReceiveReport;
use crate::session::{
    StreamReader, StreamWriter, classify, hex, peer_error, report_error, split, unexpected,
};

/// A destination waiting for migrations.
pub struct Listener {
    acceptor: Box<dyn Acceptor>,
    security: Security,
    config: ReceiverConfig,
    /// New sessions that arrived while another session ran (authenticated, not yet read), and parked
    /// streams a source opens a session on.
    openers_tx: Sender<Opener>,
    openers_rx: Receiver<Opener>,
    /// Parked streams that join a running session.
    joins_tx: Sender<ParkedJoin>,
    joins_rx: Receiver<ParkedJoin>,
    parked_count: Arc<AtomicU64>,
    /// The sessions running now, so that a stream joins the one it names whichever thread accepted
    /// it (several migrations may arrive at once).
    sessions: router::Sessions,
    /// Handshakes in progress, counted against `config.limits`.
    handshakes: HandshakeSlots,
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
    /// A parked stream on which the source sent SessionInit (its payload), with the session
    /// version negotiated when the stream was authenticated.
    Parked(StreamReader, SharedWriter, Vec<u8>, u8),
    /// A new, authenticated connection asking for a new session while another one was running (a
    /// source starting its next migration a moment before the previous session ended here).
    Fresh(Negotiated, StreamReader, StreamWriter, SocketAddr),
}

/// A parked stream that asks to join a session.
type ParkedJoin = (JoinMessage, StreamReader, SharedWriter);

/// Streams a destination keeps parked at most (more are closed instead).
const MAX_PARKED: u64 = 256;

impl Listener {
    /// Listens for TCP streams on `addr`, secured by `security` (a [`Psk`](dwcp_core::handshake::Psk) alone means TLS 1.3
    /// keyed by it; see [`Security`]).
    pub fn bind(
        addr: SocketAddr,
        security: impl Into<Security>,
        config: ReceiverConfig,
    ) -> Result<Self, Error> {
        let acceptor = TcpAcceptor::bind(addr, config.socket.clone())?;
        Ok(Self::over(Box::new(acceptor), security, config))
    }

    /// Receives migrations over any transport: `acceptor` hands out the connections sources open
    /// (TCP, RDMA, ...); the engine above it is the same.
    pub fn over(
        acceptor: Box<dyn Acceptor>,
        security: impl Into<Security>,
        config: ReceiverConfig,
    ) -> Self {
        let (openers_tx, openers_rx) = unbounded();
        let (joins_tx, joins_rx) = unbounded();
        Self {
            acceptor,
            security: security.into(),
            config,
            openers_tx,
            openers_rx,
            joins_tx,
            joins_rx,
            parked_count: Arc::default(),
            sessions: router::Sessions::default(),
            handshakes: HandshakeSlots::default(),
        }
    }

    /// Streams parked for reuse by a later session right now.
    pub fn parked_streams(&self) -> u64 {
        self.parked_count.load(Ordering::Relaxed)
    }

    /// Keeps an authenticated stream of an ended session for reuse: a thread answers its health checks
    /// until the source opens a session or joins one on it, or it has been idle for
    /// `pool_idle_timeout`. `version` is the session version the stream negotiated.
    fn park(&self, reader: StreamReader, writer: SharedWriter, version: u8) {
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
                watch_parked(reader, writer, version, &openers, &joins, idle);
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
        loop {
            let conn = loop {
                if let Some(opener) = self.next_opener() {
                    return self.open(opener);
                }
                if let Some(c) = self.acceptor.accept_timeout(ACCEPT_POLL)? {
                    break c;
                }
            };
            let started = Instant::now();
            let (neg, reader, writer, peer, opens) = authenticate_opener(
                conn,
                &self.security,
                self.config.connect_timeout,
                &self.sessions,
            )?;
            // A stream of a session already running here goes to it; keep waiting for a new one.
            if let router::Routed::Opener(neg, reader, writer) =
                self.sessions
                    .route(neg, reader, writer, self.config.io_timeout, opens)
            {
                return self.opened(neg, reader, writer, peer, started);
            }
        }
    }

    /// Sessions receiving on this listener right now.
    pub fn running_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Waits until an authenticated source opens a session, as [`accept`](Self::accept) does, but
    /// never gives up on a stranger: a connection that fails the handshake (a port scanner, a health
    /// check, a peer with another key, one that sends garbage or nothing) is dropped with a logged
    /// reason. Handshakes run on their own threads, bounded in number by `config.limits` (in total
    /// and per peer address) and each in time by `connect_timeout`, so silent strangers cannot
    /// delay the real source. Fails only when the listener itself fails.
    pub fn accept_source(&self) -> Result<Incoming<'_>, Error> {
        loop {
            if let Some(opener) = self.next_opener() {
                match self.open(opener) {
                    Ok(incoming) => return Ok(incoming),
                    Err(e) => {
                        tracing::warn!(error = %e, "an authenticated source did not open a session; still waiting");
                        continue;
                    }
                }
            }
            if self.handshakes.full(&self.config.limits) {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
            let Some(conn) = self.acceptor.accept_timeout(ACCEPT_POLL)? else {
                continue;
            };
            // An opener that authenticates after we returned waits for the next call.
            self.spawn_handshake(
                conn,
                "dwcp-handshake",
                "refused a connection that did not authenticate; still waiting",
            );
        }
    }

    /// Handshakes in progress at this listener now (strangers included).
    pub fn handshakes_in_progress(&self) -> usize {
        self.handshakes.in_use()
    }

    /// Connections closed at once since the listener started because their address already had
    /// `max_handshakes_per_peer` handshakes in progress.
    pub fn connections_refused_by_limits(&self) -> u64 {
        self.handshakes.refused()
    }

    /// Authenticates `conn` on a thread of its own (a stranger's handshake may take until its
    /// time-out, and nobody waits for it) and routes it: to the running session it joins, or to the
    /// openers' queue as the opener of a new session. A connection whose address has all its
    /// handshake slots is closed at once; `refused` is logged for one that does not authenticate.
    pub(super) fn spawn_handshake(
        &self,
        conn: Box<dyn dwcp_core::transport::Conn>,
        thread_name: &str,
        refused: &'static str,
    ) {
        let peer = conn.peer_addr().ok().map(|a| a.ip());
        let Some(slot) = self.handshakes.acquire(peer, &self.config.limits) else {
            let _ = conn.shutdown(std::net::Shutdown::Both);
            return;
        };
        let (security, timeout, io_timeout) = (
            self.security.clone(),
            self.config.connect_timeout,
            self.config.io_timeout,
        );
        let (openers, sessions) = (self.openers_tx.clone(), self.sessions.clone());
        let spawned = std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || {
                match authenticate_opener(conn, &security, timeout, &sessions) {
                    Ok((neg, r, w, peer, opens)) => {
                        if let router::Routed::Opener(neg, r, w) =
                            sessions.route(neg, r, w, io_timeout, opens)
                        {
                            let _ = openers.send(Opener::Fresh(neg, r, w, peer));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "{refused}"),
                }
                drop(slot);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start a handshake thread");
        }
    }

    /// A stream waiting to open a session (a parked one, or one authenticated meanwhile); passes
    /// parked streams that ask to join a session on to it, and turns them away if it has ended.
    fn next_opener(&self) -> Option<Opener> {
        while let Ok(join) = self.joins_rx.try_recv() {
            self.sessions.route_parked(join, self.config.io_timeout);
        }
        self.openers_rx.try_recv().ok()
    }

    fn open(&self, opener: Opener) -> Result<Incoming<'_>, Error> {
        match opener {
            Opener::Parked(reader, writer, init, version) => {
                self.open_on_parked(reader, writer, &init, version)
            }
            Opener::Fresh(neg, reader, writer, peer) => {
                self.opened(neg, reader, writer, peer, Instant::now())
            }
        }
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
            neg.version,
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
        version: u8,
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
            version,
            reader,
            writer,
            init,
            peer,
            Instant::now(),
            encode_u64(session_id).to_vec(),
        )
    }

    /// Validates SessionInit (of a session speaking `version`) and the VM identity it announces, and
    /// returns the session waiting for its sink.
    #[allow(clippy::too_many_arguments)]
    fn incoming(
        &self,
        session_id: u64,
        version: u8,
        reader: StreamReader,
        mut writer: StreamWriter,
        init: &[u8],
        peer: SocketAddr,
        started: Instant,
        ready_payload: Vec<u8>,
    ) -> Result<Incoming<'_>, Error> {
        let init = match SessionInit::decode_version(init, version) {
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
        let limits = &self.config.limits;
        let (running, from_peer) = self.sessions.count(peer.ip());
        if running >= limits.max_sessions.max(1) || from_peer >= limits.max_sessions_per_peer.max(1)
        {
            let e = Error::Busy(format!(
                "{running} sessions running here ({from_peer} from {}), the limits are {} and {} per address",
                peer.ip(),
                limits.max_sessions,
                limits.max_sessions_per_peer
            ));
            report_error(&mut writer, &e);
            return Err(e);
        }
        // Before the session is registered or a sink chosen: a refused VM leaves no trace here.
        let identity = match self
            .config
            .expected_identity
            .check(init.identity.as_ref(), &init.layout)
        {
            Ok(check) => check,
            Err(e) => {
                report_error(&mut writer, &e);
                return Err(e);
            }
        };
        let vm_uuid = init
            .identity
            .and_then(|id| id.vm_uuid)
            .map(|u| u.to_string());
        tracing::info!(session = %format!("{session_id:x}"), %peer, bytes = init.layout.total_bytes(), streams = init.stream_count, version, ?identity, vm_uuid, "source authenticated");
        if identity == IdentityCheck::NotAnnounced {
            tracing::info!(session = %format!("{session_id:x}"), version, "the source speaks protocol version {version}: it announces no VM identity, so none can be checked");
        }
        Ok(Incoming {
            cancel: Arc::default(),
            listener: self,
            session_id,
            version,
            identity,
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
    version: u8,
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
                let _ = openers.send(Opener::Parked(reader, writer, p, version));
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
    /// Session version negotiated with the source.
    version: u8,
    /// How far the VM identity was checked so far.
    identity: IdentityCheck,
    init: SessionInit,
    reader: StreamReader,
    writer: StreamWriter,
    peer: SocketAddr,
    started: Instant,
    /// SessionReady's payload: empty, or the new session id on a parked stream.
    ready_payload: Vec<u8>,
    /// The zstd dictionary the source sent for this session's chunks.
    dictionary: Option<Arc<dwcp_hde::Dictionary>>,
    /// Set by the operator to cancel the session.
    cancel: Arc<AtomicBool>,
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

    /// The session version the source speaks (2 and later announce the VM's identity).
    pub fn protocol_version(&self) -> u8 {
        self.version
    }

    /// What the source announced about its VM: `None` when it speaks protocol version 1. The
    /// layout fingerprint in it was checked against [`layout`](Self::layout) already.
    pub fn identity(&self) -> Option<&VmIdentity> {
        self.init.identity.as_ref()
    }

    /// Refuses the migration unless the source's VM is the one `expected` describes, before any
    /// page is written: a source with another UUID, another layout, or none (protocol version 1)
    /// when a UUID is expected is told why ([`dwcp_core::ErrorCode::Identity`]) and the error is
    /// returned. For an expectation that holds for every source, see
    /// [`ReceiverConfig::expected_identity`].
    pub fn require(mut self, expected: &ExpectedIdentity) -> Result<Self, Error> {
        match expected.check(self.init.identity.as_ref(), &self.init.layout) {
            Ok(check) => {
                if self.identity != IdentityCheck::Verified {
                    self.identity = check;
                }
                Ok(self)
            }
            Err(e) => {
                report_error(&mut self.writer, &e);
                Err(e)
            }
        }
    }

    /// A flag that cancels the session when set (from any thread, before or while
    /// [`receive_into`](Self::receive_into) runs). A cancel is honoured until the destination has
    /// sent its verdict on the digests: the source is told ([`dwcp_core::ErrorCode::Cancelled`]) and
    /// keeps (or resumes) its guest, and `receive_into` fails with [`Error::Cancelled`]; what the
    /// sink received must then be discarded. From the verdict on, the source may commit at any
    /// moment, and a cancel racing its commit could leave the VM running nowhere: a later cancel is
    /// refused (and logged), the session runs to its end, and on `Ok` the caller owns the VM as
    /// usual. The session looks at the flag at least every 50 ms.
    pub fn cancel_handle(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.cancel)
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
                "destination memory has {} pages in {} regions (layout fingerprint {:016x}), the source sends {} in {} (fingerprint {:016x})",
                sink.layout().total_pages(),
                sink.layout().regions().len(),
                sink.layout().fingerprint(),
                self.init.layout.total_pages(),
                self.init.layout.regions().len(),
                self.init.layout.fingerprint(),
            ));
            report_error(&mut self.writer, &e);
            return Err(e);
        }
        if self.cancel.load(Ordering::Relaxed) {
            // Before SessionReady: the source, waiting for it, reads why instead.
            report_error(&mut self.writer, &Error::Cancelled);
            return Err(Error::Cancelled);
        }
        let listener = self.listener;
        let cfg = listener.config.clone();
        for c in [self.reader.get_ref().get_ref(), self.writer.get_ref()] {
            let _ = c.set_read_timeout(Some(cfg.io_timeout));
            let _ = c.set_write_timeout(Some(cfg.io_timeout));
        }
        // Registered before SessionReady: the source opens its other streams as soon as it reads it,
        // and whichever thread accepts them must find the session.
        let (tx, events) = unbounded();
        let registration =
            listener
                .sessions
                .register(self.session_id, tx.clone(), Some(self.peer.ip()));
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
            latency: Default::default(),
        };
        let session = Session::new(
            self.session_id,
            self.version,
            usize::from(self.init.stream_count).max(1),
            &cfg,
            listener,
        );
        let (outcome, streams_opened) = std::thread::scope(|scope| {
            let acceptor = {
                let session = &session;
                std::thread::Builder::new()
                    .name("amst-accept".into())
                    .spawn_scoped(scope, move || session.accept_joins())
                    .expect("spawning the session's acceptor")
            };
            let (result, opened) = session.drive(
                scope,
                (self.reader, self.writer),
                &shared,
                &events,
                &tx,
                &self.cancel,
            );
            drop(registration);
            session.stop_accepting.store(true, Ordering::Release);
            let _ = acceptor.join();
            if let Err(e) = &result {
                session.fail_all(e);
                tracing::warn!(error = %e, "migration failed on the destination");
            }
            drop(tx);
            (result, opened)
        });
        let (final_iteration, digest, postcopy) = outcome?;
        let pages = shared.pages_applied.load(Ordering::Relaxed);
        let report = ReceiveReport {
            session_id: format!("{:016x}", self.session_id),
            security: self.listener.security.mode(),
            identity: self.identity,
            total_ms: self.started.elapsed().as_secs_f64() * 1e3,
            streams: streams_opened as usize,
            duplicate_chunks: shared.duplicates.load(Ordering::Relaxed),
            memory_bytes: self.init.layout.total_bytes(),
            pages_applied: pages,
            stale_pages_dropped: shared.stale.load(Ordering::Relaxed),
            logical_bytes: (pages + shared.stale.load(Ordering::Relaxed)) * PAGE_SIZE as u64,
            wire_bytes: shared.wire_bytes.load(Ordering::Relaxed),
            final_iteration,
            digest_match: true,
            digest: hex(digest),
            latency: shared.latency.report(),
            postcopy,
        };
        if postcopy {
            tracing::info!(session = %report.session_id, pages, "pre-copy received; the rest comes by post-copy");
        } else {
            tracing::info!(session = %report.session_id, pages, "migration received and committed");
        }
        Ok(report)
    }
}

/// Authenticates a connection that opens a new session, within `timeout`.
fn authenticate_opener(
    conn: Box<dyn dwcp_core::transport::Conn>,
    security: &Security,
    timeout: Duration,
    sessions: &router::Sessions,
) -> Result<(Negotiated, StreamReader, StreamWriter, SocketAddr, bool), Error> {
    let peer = conn
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let timeout = timeout.max(Duration::from_millis(1));
    // One deadline for the TLS handshake, so a peer trickling bytes cannot hold a thread.
    let secured = security.accept(conn, Instant::now() + timeout)?;
    let (mut reader, mut writer) = split(secured.conn, timeout)?;
    let mut opens = false;
    let neg = server_handshake(
        &mut reader,
        &mut writer,
        &secured.handshake_key,
        Offer::default(),
        |requested| {
            opens = requested == 0;
            sessions.choose(requested)
        },
    )
    .map_err(|e| match e {
        Error::Frame(dwcp_core::error::FrameError::BadMagic(m))
            if dwcp_tls::looks_like_tls(&m.to_be_bytes()) =>
        {
            dwcp_core::error::SecurityError::ModeMismatch {
                peer: peer.to_string(),
                theirs: "TLS",
                ours: "plain-text DWCP (--insecure-plaintext)",
            }
            .into()
        }
        e => classify(e, &format!("the handshake of {peer}")),
    })?;
    Ok((neg, reader, writer, peer, opens))
}
