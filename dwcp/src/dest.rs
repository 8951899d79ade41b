//! The destination side: accept an authenticated session, apply pages from every stream (newest
//! iteration wins), compare digests, and take over the VM on the source's commit.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, unbounded};
use parking_lot::Mutex;

use dwcp_core::apply::{Applied, PageVersions};
use dwcp_core::digest::{PageHashes, ZERO_PAGE_HASH};
use dwcp_core::error::{Error, HandshakeError};
use dwcp_core::frame::{FrameType, FrameWriter, HEADER_LEN};
use dwcp_core::handshake::{Negotiated, Offer, Psk, new_session_id, server_handshake};
use dwcp_core::memory::{MemoryLayout, MemorySink, PAGE_SIZE};
use dwcp_core::messages::{Ack, DigestMessage, Finish, SessionInit};
use dwcp_hde::{PageData, decode_chunk};

use crate::config::{ReceiverConfig, threads_or_cores};
use crate::report::ReceiveReport;
use crate::session::{StreamReader, classify, hex, peer_error, report_error, split, unexpected};

/// Acknowledge at least every this many applied data frames, even while more are buffered.
const ACK_EVERY_FRAMES: u32 = 16;

/// A destination waiting for migrations.
#[derive(Debug)]
pub struct Listener {
    listener: TcpListener,
    psk: Psk,
    config: ReceiverConfig,
}

impl Listener {
    /// Listens on `addr`; sources must prove knowledge of `psk`.
    pub fn bind(addr: SocketAddr, psk: Psk, config: ReceiverConfig) -> Result<Self, Error> {
        let listener = dwcp_tcp::listen(addr, &config.socket)?;
        Ok(Self {
            listener,
            psk,
            config,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.listener
            .local_addr()
            .map_err(|e| Error::io("reading the listener address", e))
    }

    /// Waits for a source, authenticates it and reads what it wants to send. A peer that fails the
    /// handshake yields an error (nothing has been written anywhere); call again to keep waiting.
    pub fn accept(&self) -> Result<Incoming<'_>, Error> {
        let (stream, peer) = self
            .listener
            .accept()
            .map_err(|e| Error::io("accepting a connection", e))?;
        let started = Instant::now();
        dwcp_tcp::apply(&stream, &self.config.socket)?;
        let socket = stream
            .try_clone()
            .map_err(|e| Error::io("cloning a stream", e))?;
        let (mut reader, mut writer) = split(stream, self.config.connect_timeout)?;
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
        if neg.stream_index != 0 {
            let e = Error::Protocol(format!(
                "a new session must start with stream 0, not {}",
                neg.stream_index
            ));
            report_error(&mut writer, &e);
            return Err(e);
        }
        let mut p = Vec::new();
        let h = reader
            .read_frame(&mut p)
            .map_err(|e| classify(e, "SessionInit"))?;
        let init = match h.frame_type {
            FrameType::SessionInit => match SessionInit::decode(&p) {
                Ok(init) => init,
                Err(e) => {
                    let e = Error::from(e);
                    report_error(&mut writer, &e);
                    return Err(e);
                }
            },
            FrameType::Error => return Err(peer_error(&p)),
            other => {
                let e = unexpected(other, "instead of SessionInit");
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
        tracing::info!(session = %format!("{:x}", neg.session_id), %peer, bytes = init.layout.total_bytes(), streams = init.stream_count, "source authenticated");
        Ok(Incoming {
            listener: self,
            session_id: neg.session_id,
            init,
            reader,
            writer,
            socket,
            peer,
            started,
        })
    }
}

/// An authenticated source whose memory layout is known; decide where its pages go.
#[derive(Debug)]
pub struct Incoming<'l> {
    listener: &'l Listener,
    session_id: u64,
    init: SessionInit,
    reader: StreamReader,
    writer: FrameWriter<TcpStream>,
    socket: TcpStream,
    peer: SocketAddr,
    started: Instant,
}

enum Event {
    Finish(Finish),
    Commit(u128),
    Failed(usize, Error),
}

struct Shared<'s> {
    sink: &'s dyn MemorySink,
    /// The sink was all zeros when this migration started (asked once: writes change the answer).
    sink_started_zeroed: bool,
    /// The source sent Finish: any further data frame is a protocol violation.
    finished: std::sync::atomic::AtomicBool,
    versions: PageVersions,
    hashes: PageHashes,
    total_pages: u64,
    frames_applied: AtomicU64,
    pages_applied: AtomicU64,
    stale: AtomicU64,
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
        let cfg = self.listener.config.clone();
        self.writer.write_frame(FrameType::SessionReady, &[])?;
        let count = self.init.stream_count as usize;
        let mut streams: Vec<(StreamReader, FrameWriter<TcpStream>)> = Vec::with_capacity(count);
        let mut sockets = vec![
            self.socket
                .try_clone()
                .map_err(|e| Error::io("cloning a stream", e))?,
        ];
        let (r0, w0) = (self.reader, self.writer);
        streams.push((r0, w0));
        if let Err(e) =
            self.listener
                .accept_joining(self.session_id, count, &mut streams, &mut sockets)
        {
            report_error(&mut streams[0].1, &e);
            return Err(e);
        }
        for s in &sockets {
            let _ = s.set_read_timeout(Some(cfg.io_timeout));
            let _ = s.set_write_timeout(Some(cfg.io_timeout));
        }
        let shared = Shared {
            sink,
            sink_started_zeroed: sink.starts_zeroed(),
            finished: std::sync::atomic::AtomicBool::new(false),
            versions: PageVersions::new(self.init.layout.total_pages()),
            hashes: PageHashes::new(self.init.layout.total_pages()),
            total_pages: self.init.layout.total_pages(),
            frames_applied: AtomicU64::new(0),
            pages_applied: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
        };
        let (readers, writers): (Vec<StreamReader>, Vec<_>) = streams
            .into_iter()
            .map(|(r, w)| (r, Arc::new(Mutex::new(w))))
            .unzip();
        let (tx, events) = unbounded();
        let session_id = self.session_id;
        let outcome = std::thread::scope(|scope| {
            for (i, r) in readers.into_iter().enumerate() {
                let (tx, w, shared) = (tx.clone(), Arc::clone(&writers[i]), &shared);
                std::thread::Builder::new()
                    .name(format!("amst-apply-{i}"))
                    .spawn_scoped(scope, move || {
                        // A panicking sink must end the session with an error, not leave it hanging.
                        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            apply_stream(i, r, &w, shared, &tx)
                        }));
                        let failure = match run {
                            Ok(Ok(())) => return,
                            Ok(Err(e)) => e,
                            Err(panic) => Error::Protocol(format!(
                                "applying pages panicked: {}",
                                panic_message(&panic)
                            )),
                        };
                        let _ = tx.send(Event::Failed(i, failure));
                    })
                    .expect("spawning a stream receiver");
            }
            drop(tx);
            let result = control(&shared, &events, &writers[0], &cfg);
            if let Err(e) = &result {
                report_error(&mut writers[0].lock(), e);
                // Unblock every stream thread at once instead of waiting for its read timeout.
                for s in &sockets {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            }
            result
        });
        let (final_iteration, digest) = outcome?;
        let pages = shared.pages_applied.load(Ordering::Relaxed);
        let report = ReceiveReport {
            session_id: format!("{session_id:016x}"),
            total_ms: self.started.elapsed().as_secs_f64() * 1e3,
            streams: count,
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

impl Listener {
    /// Accepts the remaining streams of a session (handshakes bound to `session_id`). Each connection is
    /// authenticated on its own short-lived thread, so a silent or hostile stranger cannot hold up the
    /// real streams; strangers are turned away without ending the session.
    fn accept_joining(
        &self,
        session_id: u64,
        count: usize,
        streams: &mut Vec<(StreamReader, FrameWriter<TcpStream>)>,
        sockets: &mut Vec<TcpStream>,
    ) -> Result<(), Error> {
        type Joined = Result<(Negotiated, StreamReader, FrameWriter<TcpStream>, TcpStream), Error>;
        let deadline = Instant::now() + self.config.connect_timeout;
        let mut slots: Vec<Option<(StreamReader, FrameWriter<TcpStream>, TcpStream)>> =
            (1..count).map(|_| None).collect();
        let mut missing = count - 1;
        // Bounds the threads a flood of connections can start.
        let max_attempts = 4 * count + 16;
        let mut attempts = 0;
        let (tx, rx) = unbounded::<Joined>();
        self.listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("polling the listener", e))?;
        let result = (|| {
            while missing > 0 {
                while let Ok(joined) = rx.try_recv() {
                    match joined {
                        Ok((neg, r, mut w, socket)) => {
                            let idx = neg.stream_index as usize;
                            if idx == 0 || idx >= count || slots[idx - 1].is_some() {
                                let e = Error::Protocol(format!(
                                    "stream index {idx} is invalid or taken"
                                ));
                                report_error(&mut w, &e);
                                return Err(e);
                            }
                            slots[idx - 1] = Some((r, w, socket));
                            missing -= 1;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "refused a stream that does not belong to the session")
                        }
                    }
                }
                if missing == 0 {
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::Timeout(format!(
                        "{missing} of {count} streams did not connect"
                    )));
                }
                let stream = match self.listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    Err(e) => return Err(Error::io("accepting a stream", e)),
                };
                attempts += 1;
                if attempts > max_attempts {
                    return Err(Error::Protocol(format!(
                        "{attempts} connection attempts while {missing} streams were due"
                    )));
                }
                let (psk, profile, tx) = (self.psk.clone(), self.config.socket.clone(), tx.clone());
                let remaining = deadline - now;
                std::thread::Builder::new()
                    .name("amst-join".into())
                    .spawn(move || {
                        let _ = tx.send(join_stream(stream, &psk, &profile, remaining, session_id));
                    })
                    .map_err(|e| Error::io("starting a handshake thread", e))?;
            }
            Ok(())
        })();
        self.listener
            .set_nonblocking(false)
            .map_err(|e| Error::io("configuring the listener", e))?;
        result?;
        for (r, w, s) in slots.into_iter().flatten() {
            streams.push((r, w));
            sockets.push(s);
        }
        Ok(())
    }
}

/// Authenticates one connection that claims to join `session_id`, within `timeout`.
fn join_stream(
    stream: TcpStream,
    psk: &Psk,
    profile: &dwcp_tcp::SocketProfile,
    timeout: Duration,
    session_id: u64,
) -> Result<(Negotiated, StreamReader, FrameWriter<TcpStream>, TcpStream), Error> {
    stream
        .set_nonblocking(false)
        .map_err(|e| Error::io("configuring a stream", e))?;
    dwcp_tcp::apply(&stream, profile)?;
    let socket = stream
        .try_clone()
        .map_err(|e| Error::io("cloning a stream", e))?;
    let (mut r, mut w) = split(stream, timeout.max(Duration::from_millis(1)))?;
    let neg = server_handshake(&mut r, &mut w, psk, Offer::default(), |requested| {
        if requested == session_id {
            Ok(session_id)
        } else {
            Err(HandshakeError::UnknownSession(requested).into())
        }
    })
    .map_err(|e| classify(e, "a joining stream's handshake"))?;
    Ok((neg, r, w, socket))
}

/// Reads one stream until the source closes it, applying data frames.
fn apply_stream(
    lane: usize,
    mut reader: StreamReader,
    writer: &Mutex<FrameWriter<TcpStream>>,
    shared: &Shared<'_>,
    events: &Sender<Event>,
) -> Result<(), Error> {
    let mut payload = Vec::new();
    let mut scratch = Vec::new();
    let mut unacked = 0u32;
    loop {
        let h = reader
            .read_frame(&mut payload)
            .map_err(|e| classify(e, "data from the source"))?;
        shared
            .wire_bytes
            .fetch_add((HEADER_LEN + payload.len()) as u64, Ordering::Relaxed);
        match h.frame_type {
            FrameType::Data => {
                if shared.finished.load(Ordering::Acquire) {
                    return Err(Error::Protocol("data frame after Finish".into()));
                }
                let chunk = decode_chunk(&payload, shared.total_pages, &mut scratch)?;
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
                shared.frames_applied.fetch_add(1, Ordering::AcqRel);
                unacked += 1;
                // Acknowledge before we would block on the socket, or periodically during long bursts.
                if reader.get_ref().buffer().is_empty() || unacked >= ACK_EVERY_FRAMES {
                    writer
                        .lock()
                        .write_frame(FrameType::Ack, &Ack { through_seq: h.seq }.encode())?;
                    unacked = 0;
                }
            }
            FrameType::Finish if lane == 0 => {
                let _ = events.send(Event::Finish(Finish::decode(&payload)?));
            }
            FrameType::Commit if lane == 0 => {
                let _ = events.send(Event::Commit(DigestMessage::decode(&payload)?.digest));
            }
            FrameType::Close => return Ok(()),
            FrameType::Error => return Err(peer_error(&payload)),
            other => return Err(unexpected(other, "from the source")),
        }
    }
}

/// The session's control flow on the destination: Finish → digest → Verdict → Commit → CommitAck.
fn control(
    shared: &Shared<'_>,
    events: &crossbeam_channel::Receiver<Event>,
    writer0: &Mutex<FrameWriter<TcpStream>>,
    cfg: &ReceiverConfig,
) -> Result<(u32, u128), Error> {
    let closed = || Error::Protocol("the source closed every stream before finishing".into());
    let finish = match events.recv().map_err(|_| closed())? {
        Event::Finish(f) => f,
        Event::Failed(lane, e) => return Err(stream_error(lane, e)),
        Event::Commit(_) => return Err(Error::Protocol("commit before finish".into())),
    };
    shared.finished.store(true, Ordering::Release);
    let applied = shared.frames_applied.load(Ordering::Acquire);
    if applied != finish.data_frames {
        return Err(Error::Protocol(format!(
            "source finished after {} data frames, {applied} were applied",
            finish.data_frames
        )));
    }
    let missing = shared.versions.missing();
    if missing > 0 {
        return Err(Error::Protocol(format!(
            "source finished but {missing} pages were never sent"
        )));
    }
    let digest = shared.hashes.digest(threads_or_cores(cfg.digest_threads));
    writer0
        .lock()
        .write_frame(FrameType::Verdict, &DigestMessage { digest }.encode())?;
    let theirs = match events.recv().map_err(|_| closed())? {
        Event::Commit(d) => d,
        Event::Failed(lane, e) => return Err(stream_error(lane, e)),
        Event::Finish(_) => return Err(Error::Protocol("second finish".into())),
    };
    if theirs != digest {
        return Err(Error::DigestMismatch {
            source_digest: theirs,
            destination_digest: digest,
        });
    }
    shared.sink.flush()?;
    writer0.lock().write_frame(FrameType::CommitAck, &[])?;
    // Wait for the source's Close on every stream (or its failure) so the sockets end cleanly.
    while let Ok(ev) = events.recv() {
        if let Event::Failed(lane, e) = ev {
            tracing::debug!(lane, error = %e, "stream ended after the handover");
        }
    }
    Ok((finish.final_iteration, digest))
}

fn stream_error(lane: usize, e: Error) -> Error {
    match e {
        e @ (Error::Peer { .. } | Error::Timeout(_) | Error::Chunk(_) | Error::Frame(_)) => e,
        other => Error::Protocol(format!("stream {lane} failed: {other}")),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
