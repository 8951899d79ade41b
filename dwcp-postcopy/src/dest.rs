//! The destination's side: accept the session, arm the memory, serve faults, place pages, wait
//! for the source again after a lost connection.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dwcp_core::digest::page_hash;
use dwcp_core::error::Error;
use dwcp_core::frame::FrameType;
use dwcp_core::handshake::new_session_id;
use dwcp_core::memory::{MemorySink, ZERO_PAGE};
use dwcp_core::transport::{Acceptor, Conn};
use dwcp_proto::postcopy::wire::{self, MAX_REQUEST_PAGES, PageBody};
use dwcp_proto::postcopy::{FaultDecision, Placement, PostcopyDest};
use dwcp_tcp::{SocketProfile, TcpAcceptor};
use dwcp_tls::Security;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use userfaultfd::{Event, Uffd};

use crate::conn::{self, PUSH, Reader, Stream, URGENT, Writer};
use crate::{PostcopyConfig, PostcopyMemory};

/// Where sources connect to start post-copy into this host.
#[derive(Debug)]
pub struct PostcopyListener {
    acceptor: TcpAcceptor,
    security: Security,
    config: PostcopyConfig,
}

/// How long the guest waited for the pages it faulted on: from the fault thread reading the fault
/// to the page being placed (which wakes the guest).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct FaultLatency {
    /// Faults measured.
    pub count: u64,
    /// Median, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// Longest, microseconds.
    pub max_us: f64,
}

/// What the destination's post-copy did.
#[derive(Debug, Clone, Serialize)]
pub struct DestinationReport {
    /// Pages placed (the post-copy set).
    pub pages: u64,
    /// Guest faults on missing pages, each answered by the source.
    pub faults: u64,
    /// Faults on pages outside the set, filled with zeros here.
    pub zero_fills: u64,
    /// Pages that arrived twice (requested and pushed); the second copy was dropped.
    pub duplicates: u64,
    /// Requests sent again after a reconnect.
    pub rerequested: u64,
    /// Connections used: 1, plus one per recovery.
    pub connections: u32,
    /// From the set's arrival until every page was placed.
    pub duration: Duration,
    /// How long faults waited.
    pub fault_latency: FaultLatency,
}

impl PostcopyListener {
    /// Listens on `addr` (port 0 picks one).
    pub fn bind(
        addr: SocketAddr,
        security: Security,
        config: PostcopyConfig,
    ) -> Result<Self, Error> {
        Ok(Self {
            acceptor: TcpAcceptor::bind(addr, SocketProfile::datacenter())?,
            security,
            config,
        })
    }

    /// The address sources connect to.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.acceptor.local_addr()
    }

    /// Waits up to `wait` for a source to start post-copy into `memory`, drops the set's pages
    /// from it and arms it. When this returns the VM may run on `memory`: a touch of a missing page
    /// waits for it. Connections that fail to authenticate are dropped and waiting goes on.
    pub fn accept(
        self,
        memory: Arc<PostcopyMemory>,
        wait: Duration,
    ) -> Result<PostcopyReceiver, Error> {
        let deadline = Instant::now() + wait;
        let session_id = new_session_id();
        let total = memory.layout().total_pages();
        let mut urgent = self.accept_stream(deadline, URGENT, |asked| {
            if asked == 0 {
                Ok(session_id)
            } else {
                Err(Error::Protocol(format!(
                    "no post-copy session {asked:#x} here"
                )))
            }
        })?;
        let push = self.accept_stream(deadline, PUSH, |asked| same_session(asked, session_id))?;
        let set = conn::read_set(
            &mut urgent.reader,
            Some(total),
            FrameType::PostcopyStart,
            total,
        )?;
        let arming = Instant::now();
        let uffd = memory.arm(&set)?;
        tracing::info!(
            pages = set.len(),
            arm_us = arming.elapsed().as_micros() as u64,
            "post-copy armed; the VM may run"
        );
        let Stream {
            reader: urgent_reader,
            writer: urgent_writer,
            ..
        } = urgent;
        let urgent_conn = clone_conn(urgent_writer.get_ref())?;
        let shared = Arc::new(Shared {
            machine: Mutex::new(PostcopyDest::new(set)),
            memory,
            uffd,
            // In place before the VM can run: its first faults are requested at once.
            urgent: Mutex::new(Some(urgent_writer)),
            epoch: Instant::now(),
            finished: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
            ),
            connections: AtomicU32::new(1),
        });
        let faults = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("postcopy-faults".into())
                .spawn(move || serve_faults(&shared))
                .map_err(|e| Error::io("starting the post-copy fault thread", e))?
        };
        let supervisor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("postcopy-streams".into())
                .spawn(move || {
                    let first = Urgent {
                        reader: urgent_reader,
                        conn: urgent_conn,
                        resume_with: None,
                    };
                    supervise(&shared, &self, session_id, first, push)
                })
                .map_err(|e| Error::io("starting the post-copy stream thread", e))?
        };
        Ok(PostcopyReceiver {
            shared,
            supervisor,
            faults,
        })
    }

    fn accept_stream(
        &self,
        deadline: Instant,
        index: u16,
        assign: impl Fn(u64) -> Result<u64, Error>,
    ) -> Result<Stream, Error> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(format!(
                    "no post-copy source opened stream {index} in time"
                )));
            }
            match conn::accept(
                &self.acceptor,
                &self.security,
                left.min(Duration::from_millis(200)),
                self.config.connect_timeout,
                self.config.io_timeout,
                &assign,
            ) {
                Ok(Some((stream, _))) if stream.index == index => return Ok(stream),
                Ok(Some((stream, _))) => {
                    tracing::warn!(
                        index = stream.index,
                        expected = index,
                        "post-copy stream out of order, dropped"
                    );
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "a post-copy connection was refused"),
            }
        }
    }
}

fn same_session(asked: u64, session_id: u64) -> Result<u64, Error> {
    if asked == session_id {
        Ok(session_id)
    } else {
        Err(Error::Protocol(format!(
            "post-copy stream for session {asked:#x}, this one is {session_id:#x}"
        )))
    }
}

struct Shared {
    machine: Mutex<PostcopyDest>,
    memory: Arc<PostcopyMemory>,
    uffd: Uffd,
    /// The urgent stream's writer while connected: requests, keepalives and the closing report.
    urgent: Mutex<Option<Writer>>,
    epoch: Instant,
    finished: AtomicBool,
    stop: AtomicBool,
    latency: Mutex<Histogram<u64>>,
    connections: AtomicU32,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Sends a frame on the urgent stream if there is one; a failed write drops it (the stream
    /// threads notice the loss too, and a reconnect repeats what matters).
    fn send_urgent(&self, frame_type: FrameType, payload: &[u8]) {
        let mut urgent = self.urgent.lock();
        if let Some(w) = urgent.as_mut() {
            let sent = w.write_frame(frame_type, payload).and_then(|_| w.flush());
            if let Err(e) = sent {
                tracing::debug!(error = %e, "post-copy urgent stream write failed");
                *urgent = None;
            }
        }
    }

    fn request(&self, pages: &[u64]) {
        let mut payload = Vec::new();
        for part in pages.chunks(MAX_REQUEST_PAGES) {
            wire::encode_request(part, &mut payload);
            self.send_urgent(FrameType::PageRequest, &payload);
        }
    }

    fn send_complete(&self) {
        let complete = self.machine.lock().complete();
        self.send_urgent(FrameType::PostcopyComplete, &complete.encode());
    }
}

/// A running post-copy on the destination.
#[derive(Debug)]
pub struct PostcopyReceiver {
    shared: Arc<Shared>,
    supervisor: JoinHandle<Result<(), Error>>,
    faults: JoinHandle<Result<(), Error>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl PostcopyReceiver {
    /// Pages not placed yet.
    pub fn missing_pages(&self) -> u64 {
        self.shared.machine.lock().missing().len()
    }

    /// Waits until every page is placed (the memory is then disarmed: no more faults) or post-copy
    /// failed. After a failure the memory stays armed: the VM cannot continue, and a touch of a
    /// missing page blocks rather than read zeros; discard the memory.
    pub fn wait(self) -> Result<DestinationReport, Error> {
        let streams = self
            .supervisor
            .join()
            .expect("the post-copy stream thread does not panic");
        self.shared.stop.store(true, Ordering::Relaxed);
        let faults = self
            .faults
            .join()
            .expect("the post-copy fault thread does not panic");
        let shared = Arc::into_inner(self.shared).expect("the threads are done");
        if let Err(e) = streams.and(faults) {
            shared.memory.keep_armed(shared.uffd);
            return Err(e);
        }
        shared.memory.disarm(&shared.uffd)?;
        let stats = shared.machine.lock().stats();
        let h = shared.latency.lock();
        let us = |ns: u64| ns as f64 / 1_000.0;
        Ok(DestinationReport {
            pages: stats.placed,
            faults: stats.faults,
            zero_fills: stats.zero_fills,
            duplicates: stats.duplicates,
            rerequested: stats.rerequested,
            connections: shared.connections.load(Ordering::Relaxed),
            duration: shared.epoch.elapsed(),
            fault_latency: FaultLatency {
                count: h.len(),
                p50_us: us(h.value_at_quantile(0.5)),
                p99_us: us(h.value_at_quantile(0.99)),
                max_us: us(h.max()),
            },
        })
    }
}

/// The fault thread: every guest fault on a missing page becomes a request, a fill or a wake.
fn serve_faults(shared: &Shared) -> Result<(), Error> {
    let mut poll = libc::pollfd {
        fd: shared.uffd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !shared.stop.load(Ordering::Relaxed) {
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll, 1, 50) };
        if ready <= 0 {
            continue;
        }
        loop {
            let event = shared.uffd.read_event().map_err(|e| {
                Error::io(
                    "reading a userfaultfd event",
                    std::io::Error::other(e.to_string()),
                )
            })?;
            let Some(event) = event else { break };
            let Event::Pagefault { addr, .. } = event else {
                continue;
            };
            let Some(page) = shared.memory.page_at(addr as usize) else {
                continue;
            };
            let decision = shared.machine.lock().on_fault(page, shared.now_ns());
            match decision {
                FaultDecision::Request => shared.request(&[page]),
                FaultDecision::ZeroFill => shared.memory.zero_fill(&shared.uffd, page)?,
                FaultDecision::Wait => {
                    if !shared.machine.lock().missing().contains(page) {
                        shared.memory.wake(&shared.uffd, page);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Runs the streams of each connection in turn until every page is placed or recovery fails.
fn supervise(
    shared: &Shared,
    listener: &PostcopyListener,
    session_id: u64,
    mut urgent: Urgent,
    mut push: Stream,
) -> Result<(), Error> {
    let config = &listener.config;
    loop {
        match run_streams(shared, urgent, push, config.keepalive) {
            Ok(()) => return Ok(()),
            Err(e) if !crate::is_recoverable(&e) => return Err(e),
            Err(e) => {
                let missing = shared.machine.lock().missing().len();
                tracing::warn!(error = %e, missing, "post-copy connection lost; waiting for the source");
            }
        }
        let deadline = Instant::now() + config.recovery_timeout;
        let assign = |asked| same_session(asked, session_id);
        let reconnected = listener
            .accept_stream(deadline, URGENT, assign)
            .and_then(|u| Ok((u, listener.accept_stream(deadline, PUSH, assign)?)));
        (urgent, push) = match reconnected {
            Ok((u, p)) => (
                Urgent {
                    conn: clone_conn(u.writer.get_ref())?,
                    reader: u.reader,
                    resume_with: Some(u.writer),
                },
                p,
            ),
            Err(e) => {
                let missing = shared.machine.lock().missing().len();
                return Err(Error::Timeout(format!(
                    "the post-copy source did not reconnect within {:?} ({missing} pages still missing; the VM cannot go on): {e}",
                    config.recovery_timeout
                )));
            }
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
    }
}

/// The destination's half of an urgent stream.
struct Urgent {
    reader: Reader,
    /// A handle to shut the stream with.
    conn: Box<dyn Conn>,
    /// After a reconnect, the writer, to send the resume on before requests may use it; `None`
    /// when the writer is in place already (the first connection).
    resume_with: Option<Writer>,
}

/// One connection: both readers place pages; this thread sends keepalives until the end or a
/// loss.
fn run_streams(
    shared: &Shared,
    urgent: Urgent,
    push: Stream,
    keepalive: Duration,
) -> Result<(), Error> {
    let Urgent {
        reader: urgent_reader,
        conn: urgent_conn,
        resume_with,
    } = urgent;
    let push_conn = clone_conn(push.writer.get_ref())?;
    if let Some(mut writer) = resume_with {
        let (missing, waiting) = shared.machine.lock().on_reconnect();
        conn::send_set(&mut writer, &missing, FrameType::PostcopyResume)?;
        tracing::info!(
            missing = missing.len(),
            waiting = waiting.len(),
            "post-copy resumed"
        );
        *shared.urgent.lock() = Some(writer);
        shared.request(&waiting);
        if shared.machine.lock().is_complete() {
            shared.finished.store(true, Ordering::Relaxed);
            shared.send_complete();
        }
    }
    let lost = AtomicBool::new(false);
    let read = |reader: Reader| {
        let r = read_pages(shared, reader);
        if !shared.finished.load(Ordering::Relaxed) {
            lost.store(true, Ordering::Relaxed);
        }
        r
    };
    let read = &read;
    let result = std::thread::scope(|scope| {
        let a = scope.spawn(move || read(urgent_reader));
        let b = scope.spawn(move || read(push.reader));
        let mut last = Instant::now();
        while !shared.finished.load(Ordering::Relaxed) && !lost.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5).min(keepalive));
            if last.elapsed() >= keepalive {
                shared.send_urgent(FrameType::Keepalive, &[]);
                if shared.urgent.lock().is_none() {
                    break;
                }
                last = Instant::now();
            }
        }
        if shared.finished.load(Ordering::Relaxed) {
            // Give the source a moment to read the closing report before the streams go.
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = urgent_conn.shutdown(std::net::Shutdown::Both);
        let _ = push_conn.shutdown(std::net::Shutdown::Both);
        let ra = a.join().expect("a post-copy reader does not panic");
        let rb = b.join().expect("a post-copy reader does not panic");
        ra.and(rb)
    });
    *shared.urgent.lock() = None;
    if shared.finished.load(Ordering::Relaxed) {
        return Ok(());
    }
    match result {
        Err(e) => Err(e),
        Ok(()) => Err(Error::io(
            "a post-copy stream",
            std::io::ErrorKind::ConnectionAborted.into(),
        )),
    }
}

fn clone_conn(conn: &dyn Conn) -> Result<Box<dyn Conn>, Error> {
    conn.try_clone_conn()
        .map_err(|e| Error::io("cloning a post-copy stream", e))
}

/// Reads page frames until the stream ends; places every page that is still missing.
fn read_pages(shared: &Shared, mut reader: Reader) -> Result<(), Error> {
    let total = shared.memory.layout().total_pages();
    let mut payload = Vec::new();
    loop {
        let h = match reader.read_frame(&mut payload) {
            Ok(h) => h,
            // The end of a finished post-copy shuts the streams: not a failure.
            Err(_) if shared.finished.load(Ordering::Relaxed) => return Ok(()),
            Err(e) => return Err(e),
        };
        match h.frame_type {
            FrameType::PostcopyPages => {
                wire::decode_pages(&payload, total, |page, body| {
                    let bytes = match body {
                        PageBody::Bytes(b) => b,
                        PageBody::Zero => &ZERO_PAGE[..],
                    };
                    let placement =
                        shared
                            .machine
                            .lock()
                            .on_page(page, page_hash(bytes), shared.now_ns())?;
                    if let Placement::Place { waited_ns } = placement {
                        shared.memory.place(&shared.uffd, page, bytes)?;
                        if let Some(ns) = waited_ns {
                            let _ = shared.latency.lock().record(ns.max(1));
                        }
                        if shared.machine.lock().placed() {
                            shared.finished.store(true, Ordering::Relaxed);
                            shared.send_complete();
                        }
                    }
                    Ok(())
                })?;
            }
            FrameType::Keepalive => {}
            FrameType::Error => return Err(conn::peer_error(&payload)),
            other => {
                return Err(Error::Protocol(format!(
                    "{} on a post-copy page stream",
                    other.name()
                )));
            }
        }
    }
}
