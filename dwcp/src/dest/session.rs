//! One running destination session: its streams' threads, the acceptor for joining streams, and the
//! loop that carries out what `dwcp_proto::dest::DestMachine` decides.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use dwcp_core::error::Error;
use dwcp_core::frame::FrameType;
use dwcp_core::messages::DigestMessage;
use dwcp_core::transport::Conn;
use dwcp_proto::dest::{DestAction, DestEvent, DestMachine, DestParams, StreamEnd as End};

use super::Listener;
use super::apply::{Event, Shared, SharedWriter, StreamEnd, apply_stream, panic_message};
use crate::config::{ReceiverConfig, threads_or_cores};
use crate::session::{StreamReader, StreamWriter, report_error};

/// How often an acceptor looks for new connections.
pub(super) const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// Longest single wait of the session's loop for an event.
const EVENT_WAIT: Duration = Duration::from_millis(50);

/// A stream of a running session: its index, its writer and a handle to shut it down.
type RegisteredStream = (u16, SharedWriter, Box<dyn Conn>);

/// One running session's stream management.
pub(super) struct Session<'a> {
    pub(super) id: u64,
    /// Session version negotiated on stream 0; a stream parked after the session keeps it.
    version: u8,
    pub(super) max_streams: usize,
    pub(super) cfg: &'a ReceiverConfig,
    pub(super) listener: &'a Listener,
    /// Every stream's writer, to tell the source why the session failed and shut the streams down.
    writers: Mutex<Vec<RegisteredStream>>,
    pub(super) stop_accepting: AtomicBool,
}

impl<'a> Session<'a> {
    pub(super) fn new(
        id: u64,
        version: u8,
        max_streams: usize,
        cfg: &'a ReceiverConfig,
        listener: &'a Listener,
    ) -> Self {
        Self {
            id,
            version,
            max_streams,
            cfg,
            listener,
            writers: Mutex::new(Vec::new()),
            stop_accepting: AtomicBool::new(false),
        }
    }

    /// Tells the source why the session failed (on every stream that still takes a frame) and shuts
    /// every stream down, which unblocks their threads at once instead of at their read time-out.
    pub(super) fn fail_all(&self, error: &Error) {
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
    pub(super) fn start_stream<'scope>(
        &'scope self,
        scope: &'scope std::thread::Scope<'scope, '_>,
        index: u16,
        reader: StreamReader,
        writer: StreamWriter,
        shared: &'scope Shared<'_>,
        tx: &Sender<Event>,
    ) {
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
                    apply_stream(index, reader, &writer, shared, &thread_tx)
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

    /// Accepts connections while this session runs; each is authenticated on its own short-lived
    /// thread, so a silent or hostile stranger cannot hold up the real streams, and strangers are
    /// turned away without ending the session. A stream goes to the running session it names (this
    /// one or another) through the listener's session registry (`router::Sessions`).
    pub(super) fn accept_joins(&self) {
        while !self.stop_accepting.load(Ordering::Acquire) {
            while let Ok(join) = self.listener.joins_rx.try_recv() {
                self.listener
                    .sessions
                    .route_parked(join, self.cfg.io_timeout);
            }
            if self.listener.handshakes.full(&self.cfg.limits) {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
            let conn = match self.listener.acceptor.accept_timeout(ACCEPT_POLL) {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a joining stream failed");
                    std::thread::sleep(ACCEPT_POLL);
                    continue;
                }
            };
            // The session does not wait for a stranger's handshake to end.
            self.listener.spawn_handshake(
                conn,
                "amst-join",
                "refused a stream that does not belong to the session",
            );
        }
    }

    /// Runs the session's machine to its end: streams join and end; Finish → digest → Verdict →
    /// Commit → CommitAck (or PostcopySwitch); the machine hears of a set `cancel` too. Returns the
    /// final iteration, the digest and whether the session ended in a switch to post-copy.
    pub(super) fn drive<'scope>(
        &'scope self,
        scope: &'scope std::thread::Scope<'scope, '_>,
        first: (StreamReader, StreamWriter),
        shared: &'scope Shared<'_>,
        events: &Receiver<Event>,
        tx: &Sender<Event>,
        cancel: &AtomicBool,
    ) -> (Result<(u32, u128, bool), Error>, u64) {
        let cfg = self.cfg;
        let mut machine = DestMachine::new(
            DestParams {
                announced_streams: self.max_streams,
                rejoin_window: cfg.io_timeout.max(cfg.connect_timeout),
            },
            Instant::now(),
        );
        let mut shell = Shell {
            session: self,
            scope,
            shared,
            tx: tx.clone(),
            joining: vec![(0, first.0, first.1, false)],
            finish_writer: None,
            finish_frames: None,
            commit_writer: None,
            parked: Vec::new(),
        };
        // The machine decides what a cancel means in its phase; it hears of one once.
        let mut cancel_told = false;
        loop {
            while let Some(action) = machine.poll_action() {
                if let DestAction::Finished(result) = action {
                    let postcopy = machine.is_postcopy();
                    return (
                        result.map(|(i, d)| (i, d, postcopy)).map_err(|f| f.0),
                        machine.streams_opened(),
                    );
                }
                if let Some(ev) = shell.execute(action) {
                    machine.handle(Instant::now(), ev);
                }
            }
            let now = Instant::now();
            let wait = machine.poll_timeout().map_or(EVENT_WAIT, |t| {
                t.saturating_duration_since(now).min(EVENT_WAIT)
            });
            let event = match events.recv_timeout(wait) {
                Ok(ev) => shell.event(ev),
                Err(_) => DestEvent::Tick,
            };
            machine.handle(Instant::now(), event);
            if !cancel_told && cancel.load(Ordering::Relaxed) {
                cancel_told = true;
                machine.handle(Instant::now(), DestEvent::Cancel);
            }
        }
    }
}

/// What the session's loop holds while it carries out the machine's actions.
struct Shell<'scope, 'env, 's, 'k> {
    session: &'scope Session<'s>,
    scope: &'scope std::thread::Scope<'scope, 'env>,
    shared: &'scope Shared<'k>,
    tx: Sender<Event>,
    /// Streams that asked to join, waiting for the machine's answer.
    joining: Vec<(u16, StreamReader, StreamWriter, bool)>,
    finish_writer: Option<SharedWriter>,
    /// Data frames the source's Finish announced.
    finish_frames: Option<u64>,
    commit_writer: Option<SharedWriter>,
    /// Readers of streams the source parked, waiting for the machine's answer.
    parked: Vec<(u16, StreamReader)>,
}

impl Shell<'_, '_, '_, '_> {
    /// Turns what a thread reported into the machine's event, keeping the streams it carries.
    fn event(&mut self, ev: Event) -> DestEvent {
        match ev {
            Event::Joined(index, r, w, pooled) => {
                self.joining.push((index, r, w, pooled));
                DestEvent::StreamJoined { index, pooled }
            }
            Event::Finish(stream, finish, writer) => {
                self.finish_writer = Some(writer);
                self.finish_frames = Some(finish.data_frames);
                DestEvent::Finish { finish, stream }
            }
            Event::PostcopySwitch(stream, finish, writer) => {
                self.finish_writer = Some(writer);
                self.finish_frames = Some(finish.data_frames);
                DestEvent::PostcopySwitch { finish, stream }
            }
            Event::Commit(stream, digest, writer) => {
                self.commit_writer = Some(writer);
                DestEvent::Commit { digest, stream }
            }
            Event::Ended(index, end) => DestEvent::StreamEnded {
                index,
                end: match end {
                    StreamEnd::Closed => End::Closed,
                    StreamEnd::Parked(reader) => {
                        self.parked.push((index, reader));
                        End::Parked
                    }
                    StreamEnd::Lost(e) => End::Lost(e),
                    StreamEnd::Fatal(e) => End::Fatal(e),
                },
            },
        }
    }

    fn take_joining(&mut self, index: u16) -> Option<(StreamReader, StreamWriter, bool)> {
        let at = self.joining.iter().position(|j| j.0 == index)?;
        let (_, r, w, pooled) = self.joining.remove(at);
        Some((r, w, pooled))
    }

    /// Carries out one action; returns the event that answers it, if any.
    fn execute(&mut self, action: DestAction) -> Option<DestEvent> {
        let shared = self.shared;
        match action {
            DestAction::AcceptStream { index, .. } => {
                let (r, mut w, pooled) = self.take_joining(index)?;
                if pooled {
                    // SessionReady still carries the stream's old session id; then it is ours.
                    if let Err(e) = w.write_frame(FrameType::SessionReady, &[]) {
                        tracing::warn!(stream = index, error = %e, "a parked stream failed to join");
                        return Some(DestEvent::StreamEnded {
                            index,
                            end: End::Lost(e),
                        });
                    }
                    w.bind_session(self.session.id);
                }
                self.session
                    .start_stream(self.scope, index, r, w, shared, &self.tx);
                None
            }
            DestAction::RefuseStream { index, why } => {
                // Close, not Error: the refusal concerns this stream, not the session (the source
                // re-sends whatever it queued on it).
                tracing::warn!(stream = index, %why, "refused a joining stream");
                if let Some((_, mut w, _)) = self.take_joining(index) {
                    let _ = w.write_frame(FrameType::Close, &[]);
                    let _ = w.get_ref().shutdown(std::net::Shutdown::Both);
                }
                None
            }
            DestAction::StopData => {
                shared.finished.store(true, Ordering::Release);
                None
            }
            DestAction::CheckReceived => {
                // A chunk whose copy was claimed on a stream that then broke may still be being
                // applied.
                let deadline = Instant::now() + self.session.cfg.io_timeout;
                while shared.ledger.in_progress() > 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Some(DestEvent::Received {
                    frames_complete: self
                        .finish_frames
                        .is_some_and(|n| shared.ledger.is_complete(n)),
                    distinct_chunks: shared.ledger.claimed(),
                    in_progress: shared.ledger.in_progress(),
                    missing_pages: shared.versions.missing(),
                })
            }
            DestAction::ComputeDigest => Some(DestEvent::DigestComputed(
                shared
                    .hashes
                    .digest(threads_or_cores(self.session.cfg.digest_threads)),
            )),
            DestAction::SendVerdict { digest, .. } => {
                let w = self.finish_writer.as_ref()?;
                w.lock()
                    .write_frame(FrameType::Verdict, &DigestMessage { digest }.encode())
                    .err()
                    .map(DestEvent::LocalFailed)
            }
            DestAction::FlushSink => Some(match shared.sink.flush() {
                Ok(()) => DestEvent::Flushed,
                Err(e) => DestEvent::LocalFailed(e),
            }),
            DestAction::SendCommitAck { .. } => {
                let w = self.commit_writer.as_ref()?;
                Some(match w.lock().write_frame(FrameType::CommitAck, &[]) {
                    Ok(_) => DestEvent::CommitAckSent,
                    Err(e) => DestEvent::LocalFailed(e),
                })
            }
            DestAction::ParkStream { index } => {
                let at = self.parked.iter().position(|p| p.0 == index)?;
                let (_, reader) = self.parked.swap_remove(at);
                if let Some(w) = self.session.writer_of(index) {
                    if w.lock().write_frame(FrameType::Park, &[]).is_ok() {
                        self.session.listener.park(reader, w, self.session.version);
                    }
                }
                None
            }
            // The loop returns on Finished; other actions are new to this shell.
            _ => None,
        }
    }
}
