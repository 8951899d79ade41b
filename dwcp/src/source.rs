//! The source side: pre-copy iterations, stop-and-copy, digest comparison and handover.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use parking_lot::{Condvar, Mutex};

use dwcp_core::digest::{PageHashes, memory_digest};
use dwcp_core::error::Error;
use dwcp_core::frame::{FrameType, FrameWriter};
use dwcp_core::handshake::{CAP_LZ4, CAP_ZSTD, Offer, Psk, client_handshake};
use dwcp_core::memory::{DirtyLog, MemorySource, PAGE_SIZE, VmControl};
use dwcp_core::messages::{Ack, DigestMessage, Finish, SessionInit};
use dwcp_core::pool::BufferPool;
use dwcp_hde::{Codec, Encoder};
use dwcp_tcp::{Lanes, Outgoing, Payload};

use crate::config::{MigrationConfig, Verification, threads_or_cores};
use crate::metrics::MigrationMetrics;
use crate::report::{IterationReport, MigrationReport, Progress};
use crate::session::{StreamReader, classify, error_payload, hex, peer_error, split, unexpected};

/// A live migration of one VM's memory to a destination [`crate::Listener`].
///
/// ```no_run
/// # use dwcp::{Migration, MigrationConfig};
/// # use dwcp_core::{handshake::Psk, sim::*};
/// let guest = SimulatedGuest::new(SimulatedGuestConfig { size_bytes: 1 << 30, mix: ContentMix::IDLE_GUEST, seed: 1 })?;
/// let psk = Psk::from_file("key".as_ref())?;
/// let report = Migration::new("10.0.0.2:7700".parse().unwrap(), psk)
///     .config(MigrationConfig::default())
///     .run(&*guest, &mut guest.dirty_log(), &mut guest.control())?;
/// assert!(report.digest_match);
/// # Ok::<(), dwcp_core::Error>(())
/// ```
pub struct Migration<'a> {
    addr: SocketAddr,
    psk: Psk,
    config: MigrationConfig,
    progress: Option<&'a (dyn Fn(&Progress) + Sync)>,
    metrics: Option<MigrationMetrics>,
    cancel: Arc<AtomicBool>,
}

impl std::fmt::Debug for Migration<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("addr", &self.addr)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<'a> Migration<'a> {
    /// A migration to the destination listening at `addr`, authenticated with `psk`.
    pub fn new(addr: SocketAddr, psk: Psk) -> Self {
        Self {
            addr,
            psk,
            config: MigrationConfig::default(),
            progress: None,
            metrics: None,
            cancel: Arc::default(),
        }
    }

    /// Replaces the configuration.
    pub fn config(mut self, config: MigrationConfig) -> Self {
        self.config = config;
        self
    }

    /// Calls `f` after every batch of chunks.
    pub fn on_progress(mut self, f: &'a (dyn Fn(&Progress) + Sync)) -> Self {
        self.progress = Some(f);
        self
    }

    /// Updates `metrics` as the migration runs.
    pub fn metrics(mut self, metrics: MigrationMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// A flag that cancels the migration when set; the source guest then keeps (or resumes) running.
    pub fn cancel_handle(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.cancel)
    }

    /// Runs the migration to completion. On success the destination owns the VM and `vm.handed_over()` was
    /// called; on any error before the handover the guest is running on the source (resumed if it had
    /// been paused), except for [`Error::HandoverUnconfirmed`].
    pub fn run(
        self,
        source: &dyn MemorySource,
        dirty: &mut dyn DirtyLog,
        vm: &mut dyn VmControl,
    ) -> Result<MigrationReport, Error> {
        self.config.validate()?;
        let result = Run::start(&self, source).and_then(|mut run| {
            let r = run.migrate(&self, source, dirty, vm);
            if let Err(e) = &r {
                run.abort(e);
            }
            run.shutdown();
            r
        });
        if let Some(m) = &self.metrics {
            m.migrations
                .with_label_values(&[if result.is_ok() { "ok" } else { "failed" }])
                .inc();
        }
        result
    }
}

/// A connected, authenticated stream: its socket (for shutdown) and its frame halves.
type JoinedStream = (TcpStream, StreamReader, FrameWriter<TcpStream>);

enum Event {
    Verdict(u128),
    CommitAck,
    Failed(usize, Error),
}

#[derive(Default)]
struct AckState {
    /// Per lane: 1 + the highest acknowledged data frame sequence (0: none yet).
    acked: Vec<AtomicU64>,
    changed: Mutex<()>,
    wake: Condvar,
}

struct Run {
    t0: Instant,
    session_id: u64,
    lanes: Lanes,
    sockets: Vec<TcpStream>,
    readers: Vec<JoinHandle<()>>,
    acks: Arc<AckState>,
    events: Receiver<Event>,
    finished: Arc<AtomicBool>,
    sent_per_lane: Vec<u64>,
    congestion: String,
    pool: BufferPool,
    encoder: Encoder,
    wire_bytes: u64,
    logical_bytes: u64,
    data_frames: u64,
    passes: Vec<IterationReport>,
    hashes: PageHashes,
    /// Encoder counters and socket bytes already added to the metrics.
    published: dwcp_hde::EncodeStats,
    published_wire: u64,
    published_pool: dwcp_core::pool::PoolStats,
    /// Round trip of the first stream's handshake, seconds.
    rtt: f64,
}

impl Run {
    fn start(m: &Migration<'_>, source: &dyn MemorySource) -> Result<Self, Error> {
        let t0 = Instant::now();
        let cfg = &m.config;
        let offer = Offer::default();
        // Stream 0 opens the session and announces the layout; the destination answers before it
        // accepts the other streams, which then connect and authenticate in parallel (each takes
        // about three round trips, which on a long path is most of a small migration's time).
        let (stream, applied) = dwcp_tcp::connect(m.addr, &cfg.socket, cfg.connect_timeout)?;
        let congestion = applied.congestion;
        let mut sockets = vec![
            stream
                .try_clone()
                .map_err(|e| Error::io("cloning a stream", e))?,
        ];
        let (mut r0, mut w0) = split(stream, cfg.connect_timeout)?;
        let hs_start = Instant::now();
        let neg = client_handshake(&mut r0, &mut w0, &m.psk, offer, 0, 0)
            .map_err(|e| classify(e, "the handshake"))?;
        // The handshake takes two round trips.
        let rtt = hs_start.elapsed().as_secs_f64() / 2.0;
        let session_id = neg.session_id;
        let codec = usable_codec(cfg.codec, neg.capabilities);
        let init = SessionInit {
            layout: source.layout().clone(),
            stream_count: cfg.streams as u16,
        };
        w0.write_frame(FrameType::SessionInit, &init.encode())?;
        let mut p = Vec::new();
        let h = r0
            .read_frame(&mut p)
            .map_err(|e| classify(e, "SessionReady"))?;
        match h.frame_type {
            FrameType::SessionReady => {}
            FrameType::Error => return Err(peer_error(&p)),
            other => return Err(unexpected(other, "instead of SessionReady")),
        }
        let joined: Vec<Result<JoinedStream, Error>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (1..cfg.streams)
                .map(|index| {
                    scope.spawn(move || {
                        let (stream, _) =
                            dwcp_tcp::connect(m.addr, &cfg.socket, cfg.connect_timeout)?;
                        let socket = stream
                            .try_clone()
                            .map_err(|e| Error::io("cloning a stream", e))?;
                        let (mut r, mut w) = split(stream, cfg.connect_timeout)?;
                        client_handshake(&mut r, &mut w, &m.psk, offer, session_id, index as u16)
                            .map_err(|e| classify(e, "a stream's handshake"))?;
                        Ok((socket, r, w))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let mut readers_raw: Vec<StreamReader> = vec![r0];
        let mut writers = vec![w0];
        for j in joined {
            let (socket, r, w) = j?;
            sockets.push(socket);
            readers_raw.push(r);
            writers.push(w);
        }
        for s in &sockets {
            let _ = s.set_read_timeout(Some(cfg.io_timeout));
            let _ = s.set_write_timeout(Some(cfg.io_timeout));
        }
        tracing::info!(session = %format!("{session_id:x}"), streams = cfg.streams, %congestion, "session established");
        let acks = Arc::new(AckState {
            acked: (0..cfg.streams).map(|_| AtomicU64::new(0)).collect(),
            ..Default::default()
        });
        let (tx, events) = unbounded();
        let finished = Arc::new(AtomicBool::new(false));
        let readers = readers_raw
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let (acks, tx, finished) = (Arc::clone(&acks), tx.clone(), Arc::clone(&finished));
                std::thread::Builder::new()
                    .name(format!("amst-rx-{i}"))
                    .spawn(move || ack_reader(i, r, acks, tx, finished))
                    .expect("spawning an ack reader")
            })
            .collect();
        let pool = match &cfg.buffer_pool {
            Some(shared) => shared.clone(),
            None => BufferPool::new(cfg.buffer_budget)?,
        };
        Ok(Self {
            t0,
            session_id,
            lanes: Lanes::start(writers),
            sockets,
            readers,
            acks,
            events,
            finished,
            sent_per_lane: vec![0; cfg.streams],
            congestion,
            pool: pool.clone(),
            encoder: Encoder::new(codec, cfg.encoder_threads)?,
            wire_bytes: 0,
            logical_bytes: 0,
            data_frames: 0,
            passes: Vec::new(),
            hashes: PageHashes::new(source.layout().total_pages()),
            published: Default::default(),
            published_wire: 0,
            // A shared pool's counters include earlier migrations: publish only what this one adds.
            published_pool: pool.stats(),
            rtt,
        })
    }

    fn migrate(
        &mut self,
        m: &Migration<'_>,
        source: &dyn MemorySource,
        dirty: &mut dyn DirtyLog,
        vm: &mut dyn VmControl,
    ) -> Result<MigrationReport, Error> {
        let cfg = &m.config;
        let total = source.layout().total_pages();
        let digest_threads = threads_or_cores(cfg.digest_threads);
        let digest_estimate = match cfg.verification {
            Verification::SentPages => time_it(|| self.hashes.digest(digest_threads)),
            Verification::FullMemory => estimate_full_digest(source),
        };
        let limit = cfg.downtime_limit.as_secs_f64();
        dirty.start();

        let mut iteration = 0u32;
        let mut pages: Vec<u64> = Vec::new();
        let mut smallest_dirty = u64::MAX;
        let mut passes_without_progress = 0u32;
        let why;
        loop {
            let pass_start = Instant::now();
            let before = self.wire_bytes;
            let literal_before = self.encoder.stats().literal_pages;
            let count = if iteration == 0 {
                total
            } else {
                pages.len() as u64
            };
            self.send_pass(
                m,
                source,
                iteration,
                false,
                if iteration == 0 { None } else { Some(&pages) },
                total,
            )?;
            // Measure delivery, not queueing: the pass ends when the destination has applied all of it.
            self.wait_acked(m)?;
            let elapsed = pass_start.elapsed().as_secs_f64();
            let literal = self.encoder.stats().literal_pages - literal_before;
            pages.clear();
            dirty.take_dirty(&mut pages);
            pages.sort_unstable();
            pages.dedup();
            let dirtied = pages.len() as u64;
            // Pages the guest wrote are almost never zero, so charge the whole pass to its literal pages:
            // a conservative cost per page that zero pages cannot make look cheap.
            let per_page = if literal > 0 {
                elapsed / literal as f64
            } else {
                elapsed / count.max(1) as f64
            };
            let predicted = dirtied as f64 * per_page + digest_estimate + 3.0 * self.rtt;
            let reason = stop_reason(
                dirtied,
                predicted,
                limit,
                iteration,
                cfg,
                smallest_dirty,
                passes_without_progress,
            );
            if dirtied < smallest_dirty {
                smallest_dirty = dirtied;
                passes_without_progress = 0;
            } else {
                passes_without_progress += 1;
            }
            self.passes.push(IterationReport {
                iteration,
                pages: count,
                wire_bytes: self.wire_bytes - before,
                duration_ms: elapsed * 1e3,
                dirtied_pages: dirtied,
                predicted_downtime_ms: predicted * 1e3,
            });
            if let Some(mt) = &m.metrics {
                mt.iterations.inc();
            }
            tracing::info!(
                iteration,
                pages = count,
                dirtied,
                predicted_downtime_ms = predicted * 1e3,
                "pass done"
            );
            if let Some(r) = reason {
                why = r;
                break;
            }
            iteration += 1;
        }
        if why != "converged" {
            tracing::warn!(
                reason = why,
                "stop-and-copy without meeting the downtime limit"
            );
        }

        // Stop-and-copy. From here on any failure before the handover resumes the guest.
        let pause_at = Instant::now();
        vm.pause()?;
        let outcome =
            self.stop_and_copy(m, source, dirty, iteration + 1, digest_threads, &mut pages);
        let (digest, digest_ms) = match outcome {
            Ok(v) => v,
            Err(e) => {
                if !matches!(e, Error::HandoverUnconfirmed(_)) {
                    tracing::warn!(error = %e, "migration failed after the pause; resuming the source guest");
                    vm.resume();
                }
                return Err(e);
            }
        };
        let downtime = pause_at.elapsed();
        vm.handed_over();
        let total_time = self.t0.elapsed().as_secs_f64();
        let memory_bytes = source.layout().total_bytes();
        if let Some(mt) = &m.metrics {
            mt.downtime.set(downtime.as_secs_f64());
            self.publish_counters(mt);
        }
        for (i, s) in self.lanes.stats().iter().enumerate() {
            tracing::debug!(lane = i, frames = s.frames, bytes = s.bytes, "lane totals");
        }
        Ok(MigrationReport {
            session_id: format!("{:016x}", self.session_id),
            total_ms: total_time * 1e3,
            downtime_ms: downtime.as_secs_f64() * 1e3,
            digest_ms: digest_ms * 1e3,
            iterations: self.passes.len() as u32,
            converged: why == "converged",
            stop_reason: why.to_string(),
            verification: cfg.verification,
            memory_bytes,
            logical_bytes: self.logical_bytes,
            wire_bytes: self.lanes.stats().iter().map(|s| s.bytes).sum(),
            logical_throughput_bps: memory_bytes as f64 / total_time,
            digest_match: true,
            digest: hex(digest),
            streams: self.lanes.len(),
            congestion: self.congestion.clone(),
            encode: self.encoder.stats(),
            pool: self.pool.stats(),
            passes: self.passes.clone(),
        })
    }

    fn stop_and_copy(
        &mut self,
        m: &Migration<'_>,
        source: &dyn MemorySource,
        dirty: &mut dyn DirtyLog,
        iteration: u32,
        digest_threads: usize,
        pages: &mut Vec<u64>,
    ) -> Result<(u128, f64), Error> {
        let cfg = &m.config;
        let pass_start = Instant::now();
        let before = self.wire_bytes;
        dirty.take_dirty(pages);
        pages.sort_unstable();
        pages.dedup();
        self.send_pass(
            m,
            source,
            iteration,
            true,
            Some(pages),
            source.layout().total_pages(),
        )?;
        self.wait_acked(m)?;
        self.passes.push(IterationReport {
            iteration,
            pages: pages.len() as u64,
            wire_bytes: self.wire_bytes - before,
            duration_ms: pass_start.elapsed().as_secs_f64() * 1e3,
            dirtied_pages: 0,
            predicted_downtime_ms: 0.0,
        });
        self.control(Outgoing {
            frame_type: FrameType::Finish,
            payload: Payload::Owned(
                Finish {
                    final_iteration: iteration,
                    data_frames: self.data_frames,
                }
                .encode(),
            ),
        })?;
        // The destination hashes its copy while we hash ours.
        let digest_start = Instant::now();
        let total = source.layout().total_pages();
        let digest = match cfg.verification {
            Verification::SentPages => self.hashes.digest(digest_threads),
            Verification::FullMemory => {
                memory_digest(total, digest_threads, &|p| source.page_digest(p))
            }
        };
        let digest_ms = digest_start.elapsed().as_secs_f64();
        let theirs = match self.next_event(m, cfg.io_timeout, "the destination's digest")? {
            Event::Verdict(d) => d,
            _ => return Err(Error::Protocol("expected the destination's digest".into())),
        };
        if theirs != digest {
            return Err(Error::DigestMismatch {
                source_digest: digest,
                destination_digest: theirs,
            });
        }
        self.control(Outgoing {
            frame_type: FrameType::Commit,
            payload: Payload::Owned(DigestMessage { digest }.encode().to_vec()),
        })?;
        match self.next_event(m, cfg.io_timeout, "the destination's handover confirmation") {
            Ok(Event::CommitAck) => Ok((digest, digest_ms)),
            Ok(_) => Err(Error::HandoverUnconfirmed(
                "the destination answered the commit with something else".into(),
            )),
            Err(e) => Err(Error::HandoverUnconfirmed(format!(
                "no confirmation after the commit was sent: {e}"
            ))),
        }
    }

    fn control(&self, out: Outgoing) -> Result<(), Error> {
        self.lanes.send_on(0, out)
    }

    fn send_pass(
        &mut self,
        m: &Migration<'_>,
        source: &dyn MemorySource,
        iteration: u32,
        paused: bool,
        list: Option<&[u64]>,
        total: u64,
    ) -> Result<(), Error> {
        let cfg = &m.config;
        let count = list.map_or(total, |l| l.len() as u64);
        let pass_start = Instant::now();
        let per_chunk = cfg.pages_per_chunk as u64;
        let per_batch = per_chunk * cfg.chunks_per_batch as u64;
        let mut storage: Vec<u64> = Vec::with_capacity(per_batch as usize);
        let mut done = 0u64;
        while done < count {
            if m.cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            self.check_events()?;
            let n = per_batch.min(count - done);
            storage.clear();
            match list {
                Some(l) => storage.extend_from_slice(&l[done as usize..(done + n) as usize]),
                None => storage.extend(done..done + n),
            }
            let chunks: Vec<&[u64]> = storage.chunks(per_chunk as usize).collect();
            let bufs = self.encoder.encode_batch(
                iteration,
                &chunks,
                source,
                &self.pool,
                Some(&self.hashes),
            )?;
            for buf in bufs {
                self.wire_bytes += buf.len() as u64;
                let lane = self.lanes.send_data(buf)?;
                self.sent_per_lane[lane] += 1;
                self.data_frames += 1;
            }
            done += n;
            self.logical_bytes += n * PAGE_SIZE as u64;
            let rate =
                (done * PAGE_SIZE as u64) as f64 / pass_start.elapsed().as_secs_f64().max(1e-9);
            if let Some(mt) = &m.metrics {
                mt.throughput.set(rate);
                mt.pool_in_use.set(self.pool.stats().in_use_bytes as i64);
                self.publish_counters(mt);
            }
            if let Some(f) = m.progress {
                f(&Progress {
                    iteration,
                    paused,
                    pass_pages_sent: done,
                    pass_pages_total: count,
                    logical_bytes: self.logical_bytes,
                    wire_bytes: self.wire_bytes,
                    memory_bytes: total * PAGE_SIZE as u64,
                    rate_bps: rate,
                });
            }
        }
        Ok(())
    }

    /// Adds what was sent since the last call to the (possibly shared, cumulative) counters.
    fn publish_counters(&mut self, mt: &MigrationMetrics) {
        let now = self.encoder.stats();
        let wire: u64 = self.lanes.stats().iter().map(|s| s.bytes).sum();
        let page = PAGE_SIZE as u64;
        mt.page_bytes
            .with_label_values(&["zero"])
            .inc_by((now.zero_pages - self.published.zero_pages) * page);
        mt.page_bytes
            .with_label_values(&["literal"])
            .inc_by((now.literal_pages - self.published.literal_pages) * page);
        mt.wire_bytes
            .inc_by(wire.saturating_sub(self.published_wire));
        let pool = self.pool.stats();
        for (result, now, before) in [
            ("hit", pool.hits, self.published_pool.hits),
            ("miss", pool.misses, self.published_pool.misses),
            ("wait", pool.waits, self.published_pool.waits),
        ] {
            mt.pool_acquisitions
                .with_label_values(&[result])
                .inc_by(now - before);
        }
        self.published = now;
        self.published_wire = self.published_wire.max(wire);
        self.published_pool = pool;
    }

    fn check_events(&self) -> Result<(), Error> {
        match self.events.try_recv() {
            Ok(Event::Failed(lane, e)) => Err(lane_error(lane, e)),
            Ok(_) => Err(Error::Protocol(
                "destination sent a control frame during the transfer".into(),
            )),
            Err(_) => self.lanes.check_all(),
        }
    }

    fn next_event(&self, m: &Migration<'_>, timeout: Duration, what: &str) -> Result<Event, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if m.cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            match self.events.recv_timeout(Duration::from_millis(50)) {
                Ok(Event::Failed(lane, e)) => return Err(lane_error(lane, e)),
                Ok(ev) => return Ok(ev),
                Err(_) if Instant::now() >= deadline => {
                    return Err(Error::Timeout(format!("waiting for {what}")));
                }
                Err(_) => {}
            }
        }
    }

    fn wait_acked(&self, m: &Migration<'_>) -> Result<(), Error> {
        let deadline = Instant::now() + m.config.io_timeout;
        let mut guard = self.acks.changed.lock();
        loop {
            if m.cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            self.check_events()?;
            let all = (0..self.lanes.len()).all(|i| {
                let (written, last_seq) = self.lanes.data_written(i);
                written == self.sent_per_lane[i]
                    && (written == 0 || self.acks.acked[i].load(Ordering::Acquire) > last_seq)
            });
            if all {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(
                    "the destination stopped acknowledging data".into(),
                ));
            }
            self.acks
                .wake
                .wait_for(&mut guard, Duration::from_millis(5));
        }
    }

    /// Tells the destination why the session ends.
    fn abort(&mut self, error: &Error) {
        if matches!(error, Error::Peer { .. } | Error::HandoverUnconfirmed(_)) {
            return;
        }
        let _ = self.control(Outgoing {
            frame_type: FrameType::Error,
            payload: Payload::Owned(error_payload(error)),
        });
    }

    fn shutdown(&mut self) {
        self.finished.store(true, Ordering::Release);
        for lane in 0..self.lanes.len() {
            let _ = self.lanes.send_on(
                lane,
                Outgoing {
                    frame_type: FrameType::Close,
                    payload: Payload::Owned(Vec::new()),
                },
            );
        }
        let _ = self.lanes.close();
        for s in &self.sockets {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        // The destination closes its side once it has read our Close frames; readers then see EOF.
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

fn lane_error(lane: usize, e: Error) -> Error {
    match e {
        e @ (Error::Peer { .. } | Error::Timeout(_)) => e,
        other => Error::Protocol(format!("stream {lane} failed: {other}")),
    }
}

fn ack_reader(
    lane: usize,
    mut reader: StreamReader,
    acks: Arc<AckState>,
    events: Sender<Event>,
    finished: Arc<AtomicBool>,
) {
    let mut p = Vec::new();
    loop {
        let h = match reader.read_frame(&mut p) {
            Ok(h) => h,
            Err(e) => {
                if !finished.load(Ordering::Acquire) {
                    let _ = events.send(Event::Failed(lane, classify(e, "acknowledgements")));
                }
                return;
            }
        };
        let event = match h.frame_type {
            FrameType::Ack => match Ack::decode(&p) {
                Ok(a) => {
                    acks.acked[lane].fetch_max(a.through_seq.saturating_add(1), Ordering::AcqRel);
                    let _g = acks.changed.lock();
                    acks.wake.notify_all();
                    continue;
                }
                Err(e) => Event::Failed(lane, e.into()),
            },
            FrameType::Verdict if lane == 0 => match DigestMessage::decode(&p) {
                Ok(d) => Event::Verdict(d.digest),
                Err(e) => Event::Failed(lane, e.into()),
            },
            FrameType::CommitAck if lane == 0 => Event::CommitAck,
            FrameType::Close => return,
            FrameType::Error => Event::Failed(lane, peer_error(&p)),
            other => Event::Failed(lane, unexpected(other, "from the destination")),
        };
        let failed = matches!(event, Event::Failed(..));
        let _ = events.send(event);
        if failed {
            return;
        }
    }
}

/// The configured codec if the destination decodes it, else no compression (with a warning).
fn usable_codec(wanted: Codec, capabilities: u32) -> Codec {
    let needed = match wanted {
        Codec::None => return wanted,
        Codec::Lz4 => CAP_LZ4,
        Codec::Zstd(_) => CAP_ZSTD,
    };
    if capabilities & needed != 0 {
        wanted
    } else {
        tracing::warn!(
            ?wanted,
            "the destination does not decode this codec; sending literal pages uncompressed"
        );
        Codec::None
    }
}

/// Whether pre-copy should end now, and why.
fn stop_reason(
    dirty: u64,
    predicted: f64,
    limit: f64,
    iteration: u32,
    cfg: &MigrationConfig,
    smallest_dirty: u64,
    passes_without_progress: u32,
) -> Option<&'static str> {
    if predicted <= limit {
        Some("converged")
    } else if dirty == 0 {
        Some("clean")
    } else if iteration + 1 >= cfg.max_iterations {
        Some("iteration_limit")
    } else if dirty >= smallest_dirty && passes_without_progress + 1 >= cfg.stall_passes {
        Some("stalled")
    } else {
        None
    }
}

fn time_it<T>(f: impl FnOnce() -> T) -> f64 {
    let start = Instant::now();
    std::hint::black_box(f());
    start.elapsed().as_secs_f64()
}

/// Predicts a full pass over source memory from a sample of pages. Hashing memory is bound by memory
/// bandwidth, so more threads barely help: the estimate is per core.
fn estimate_full_digest(source: &dyn MemorySource) -> f64 {
    // The guest is running: copy pages out (never hash them in place) to time a sample.
    let total = source.layout().total_pages();
    let sample = total.min(2048);
    let step = (total / sample.max(1)).max(1);
    let mut buf = vec![0u8; PAGE_SIZE];
    let start = Instant::now();
    let mut acc = 0u128;
    for i in 0..sample {
        source.read_page(i * step, &mut buf);
        acc ^= dwcp_core::digest::page_hash(&buf);
    }
    std::hint::black_box(acc);
    start.elapsed().as_secs_f64() / sample.max(1) as f64 * total as f64
}
