//! The source side: pre-copy iterations, stop-and-copy, digest comparison and handover.
//!
//! Streams come and go while the migration runs. Stream 0 opens the session; data flows on it at
//! once while the other streams connect and authenticate in the background. Every chunk carries a
//! session-wide id and stays in memory until the destination acknowledges it, so when a stream fails
//! its unacknowledged chunks are re-sent on the others, and when every stream fails the source
//! reconnects (exponential backoff with jitter, bounded attempts) and resumes with those chunks, not
//! from the start. How many streams run is decided by a controller that keeps adding streams while
//! they raise the acknowledged goodput.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};

use dwcp_core::digest::{PageHashes, memory_digest};
use dwcp_core::error::{Error, HandshakeError};
use dwcp_core::frame::FrameType;
use dwcp_core::frame::MAX_PAYLOAD;
use dwcp_core::handshake::{CAP_LZ4, CAP_ZSTD, Negotiated, Offer, Psk, client_handshake};
use dwcp_core::memory::{DirtyLog, MemorySource, PAGE_SIZE, VmControl};
use dwcp_core::messages::{
    Ack, DigestMessage, Finish, JoinMessage, SessionInit, decode_u64, encode_u64,
};
use dwcp_core::pool::{BufferPool, PooledBuf};
use dwcp_core::transport::{Conn, Connector};
use dwcp_hde::{Codec, CodecPolicy, Encoder, Pass, SessionConfig, SessionEncoder};
use dwcp_tcp::{
    DataChunk, LaneHandle, Lanes, Mode, ModeSetting, Outgoing, Payload, StreamCountController,
    TcpConnector,
};

use crate::config::{MigrationConfig, PageClasses, Verification, threads_or_cores};
use crate::metrics::MigrationMetrics;
use crate::pool::{ConnectionPool, PoolKey, PooledStream};
use crate::report::{
    IterationReport, MigrationReport, Progress, ResilienceReport, StreamTelemetry,
};
use crate::session::{
    StreamReader, StreamWriter, classify, error_payload, hex, peer_error, split, unexpected,
};

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
    connector: Option<Arc<dyn Connector>>,
    pool: Option<ConnectionPool>,
    addr: SocketAddr,
    psk: Psk,
    config: MigrationConfig,
    progress: Option<&'a (dyn Fn(&Progress) + Sync)>,
    metrics: Option<MigrationMetrics>,
    cancel: Arc<AtomicBool>,
    telemetry: TelemetryFeed,
}

/// The latest `TCP_INFO` sample of every open stream of a running migration, refreshed about every
/// 250 ms. Cheap to clone; read it from any thread (the prediction component, a UI) while
/// [`Migration::run`] runs.
#[derive(Debug, Clone, Default)]
pub struct TelemetryFeed(Arc<parking_lot::RwLock<Vec<StreamTelemetry>>>);

impl TelemetryFeed {
    /// The latest samples, one per open stream.
    pub fn latest(&self) -> Vec<StreamTelemetry> {
        self.0.read().clone()
    }
}

/// How often the streams' `TCP_INFO` is sampled while a migration runs.
const TELEMETRY_INTERVAL: Duration = Duration::from_millis(250);

impl std::fmt::Debug for Migration<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("addr", &self.addr)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<'a> Migration<'a> {
    /// A migration over TCP to the destination listening at `addr`, authenticated with `psk`.
    pub fn new(addr: SocketAddr, psk: Psk) -> Self {
        Self {
            connector: None,
            pool: None,
            addr,
            psk,
            config: MigrationConfig::default(),
            progress: None,
            metrics: None,
            cancel: Arc::default(),
            telemetry: TelemetryFeed::default(),
        }
    }

    /// A feed of the streams' kernel telemetry, updated while the migration runs.
    pub fn telemetry_feed(&self) -> TelemetryFeed {
        self.telemetry.clone()
    }

    /// A migration over any transport: `connector` opens each stream (TCP, RDMA, ...); the engine
    /// above it is the same.
    pub fn over(connector: Arc<dyn Connector>, psk: Psk) -> Self {
        let addr = connector.peer();
        Self {
            connector: Some(connector),
            ..Self::new(addr, psk)
        }
    }

    /// Reuses streams parked in `pool` by earlier migrations to the same destination (with the same
    /// key), and parks this migration's streams there when it succeeds.
    pub fn connection_pool(mut self, pool: ConnectionPool) -> Self {
        self.pool = Some(pool);
        self
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
            run.shutdown(r.is_ok());
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

/// An authenticated stream, ready to become a lane.
struct JoinedStream {
    index: u16,
    reader: StreamReader,
    writer: StreamWriter,
}

enum Event {
    Verdict(u128),
    CommitAck,
    /// The destination reported an error or broke the protocol: the migration cannot continue.
    Fatal(u16, Error),
    /// A stream started in the background finished its handshake (or failed to).
    Joined(u16, Result<JoinedStream, Error>),
}

/// What opening a stream needs, shareable with background join threads.
#[derive(Clone)]
struct Dialer {
    connector: Arc<dyn Connector>,
    psk: Psk,
    offer: Offer,
    connect_timeout: Duration,
    io_timeout: Duration,
}

impl Dialer {
    /// Connects and authenticates stream `index` of `session_id` (0: open a new session).
    fn open(&self, session_id: u64, index: u16) -> Result<(JoinedStream, Negotiated), Error> {
        let conn = self.connector.connect(self.connect_timeout)?;
        let (mut reader, mut writer) = split(conn, self.connect_timeout)?;
        let neg = client_handshake(
            &mut reader,
            &mut writer,
            &self.psk,
            self.offer,
            session_id,
            index,
        )
        .map_err(|e| classify(e, "a stream's handshake"))?;
        let conn = writer.get_ref();
        let ctx = |e| Error::io("configuring a stream", e);
        conn.set_read_timeout(Some(self.io_timeout)).map_err(ctx)?;
        conn.set_write_timeout(Some(self.io_timeout)).map_err(ctx)?;
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

/// The stream-count controller's measurement window.
struct Window {
    started: Instant,
    acked_bytes: u64,
    /// The streams changed (or the session just started): this window lets congestion control settle
    /// and is not measured, or start-up growth would be credited to the new stream count.
    settling: bool,
}

struct Run {
    t0: Instant,
    session_id: u64,
    dialer: Dialer,
    mode: Mode,
    mode_probed: bool,
    lanes: Lanes,
    /// Acknowledgement readers; each returns its stream's reader if the stream was parked.
    readers: Vec<JoinHandle<Option<(u16, StreamReader)>>>,
    events: Receiver<Event>,
    events_tx: Sender<Event>,
    finished: Arc<AtomicBool>,
    next_index: u16,
    pending_joins: usize,
    /// Most streams the destination was told to expect at once.
    max_streams: usize,
    controller: Option<StreamCountController>,
    window: Window,
    peak_streams: usize,
    /// Lane that carried the handover's control frames.
    control_lane: Option<u16>,
    resilience: ResilienceReport,
    published_resilience: ResilienceReport,
    congestion: String,
    pool: BufferPool,
    encoder: PageEncoder,
    wire_bytes: u64,
    logical_bytes: u64,
    next_chunk_id: u64,
    passes: Vec<IterationReport>,
    hashes: PageHashes,
    /// Encoder counters and socket bytes already added to the metrics.
    published: dwcp_hde::EncodeStats,
    published_wire: u64,
    published_pool: dwcp_core::pool::PoolStats,
    /// Round trip of the first stream's handshake, seconds.
    rtt: f64,
    /// Where this migration's streams are parked when it succeeds.
    parking: Option<(ConnectionPool, PoolKey)>,
    /// Parked streams taken from the pool and not used yet (joined before new connections are dialed).
    pooled_spare: Vec<PooledStream>,
    /// Capabilities of the session's streams (kept with them in the pool).
    capabilities: u32,
    last_telemetry: Instant,
    /// The link rate the encoder is told.
    link: LinkEstimate,
    /// Pool bytes one encoded chunk may take.
    chunk_buffer_bytes: u64,
}

/// The link rate the encoder's codec choice is based on, from the streams' `TCP_INFO` samples.
///
/// The summed delivery rate is the link's rate once the congestion controllers have filled the pipe,
/// or, when every stream is starved of data (the kernel's app-limited flag), the rate the encoder
/// produces. During the start-up (BBR's, or slow start) it is neither. Taken as the link's, a
/// start-up sample of a few MB/s points the encoder at its slowest codecs, which then produce so
/// little that the streams never leave start-up: an idle image that takes 1.2 s across the emulated
/// WAN once took 11.5 s, every chunk compressed, slightly smaller than in the fast runs (the codec
/// levels are not in the report, so zstd-19 is the likely, not the observed, choice).
/// So no hint is given (the encoder uses its configured codec) until the rate stops growing by more
/// than a quarter per sample, or the streams are starved.
///
/// Pushing the hint up while starved, to pull the encoder towards cheaper codecs, was tried and
/// measured worse: the same idle image took 1.36-1.49 s (hint capped at 2x the delivered rate) and
/// 1.5-2.3 s (8x), against 1.21-1.27 s without.
#[derive(Debug, Default)]
struct LinkEstimate {
    last: f64,
    settled: bool,
}

/// Growth per sample above which the streams are taken to be still starting up.
const START_UP_GROWTH: f64 = 1.25;

impl LinkEstimate {
    /// The hint after a telemetry sample of every stream, if there is one yet.
    fn update(&mut self, samples: &[StreamTelemetry]) -> Option<f64> {
        let measured: f64 = samples.iter().map(|t| t.tcp.delivery_rate_bps).sum();
        if measured <= 0.0 {
            return self.settled.then_some(self.last);
        }
        let starved = samples.iter().all(|t| t.tcp.app_limited);
        if !self.settled && (starved || (self.last > 0.0 && measured < START_UP_GROWTH * self.last))
        {
            self.settled = true;
        }
        self.last = measured;
        self.settled.then_some(measured)
    }
}

/// Jitter source for reconnection backoff: a random fraction in 0.5..1.5.
fn jitter() -> f64 {
    0.5 + (dwcp_core::handshake::new_session_id() % 1_000_000) as f64 / 1e6
}

impl Run {
    fn start(m: &Migration<'_>, source: &dyn MemorySource) -> Result<Self, Error> {
        let t0 = Instant::now();
        let cfg = &m.config;
        let connector: Arc<dyn Connector> = match &m.connector {
            Some(c) => Arc::clone(c),
            None => Arc::new(TcpConnector::new(m.addr, cfg.socket.clone())),
        };
        let dialer = Dialer {
            connector,
            psk: m.psk.clone(),
            offer: Offer::default(),
            connect_timeout: cfg.connect_timeout,
            io_timeout: cfg.io_timeout,
        };
        // Stream 0 opens the session; its handshake (two round trips) also measures the path.
        let pool_key = (dialer.connector.peer(), m.psk.fingerprint());
        let mut pooled = m
            .pool
            .as_ref()
            .map(|p| p.take(pool_key))
            .unwrap_or_default();
        let hs_start = Instant::now();
        let mut reused = None;
        while let Some(mut p) = pooled.pop() {
            match health_check(&mut p, cfg.connect_timeout.min(Duration::from_secs(1))) {
                Ok(()) => {
                    reused = Some(p);
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "a pooled stream failed its health check"),
            }
        }
        let reused_stream = reused.is_some();
        let (first, capabilities, new_session) = match reused {
            Some(p) => (
                JoinedStream {
                    index: 0,
                    reader: p.reader,
                    writer: p.writer,
                },
                p.capabilities,
                None,
            ),
            None => {
                let (first, neg) = dialer.open(0, 0)?;
                (first, neg.capabilities, Some(neg.session_id))
            }
        };
        if let Some(pool) = &m.pool {
            tracing::debug!(
                reused = reused_stream,
                spare = pooled.len(),
                idle = pool.idle_streams(),
                "connection pool"
            );
        }
        // The kernel's RTT measurement where there is one: the handshake's wall time also counts key
        // derivation and thread start-up, which on a busy host would make loopback look like a WAN.
        let rtt = first
            .writer
            .get_ref()
            .as_tcp()
            .and_then(|s| dwcp_tcp::telemetry::sample(s).ok())
            .map(|t| t.min_rtt_s)
            .filter(|&r| r > 0.0)
            .unwrap_or_else(|| hs_start.elapsed().as_secs_f64() / 2.0);
        let congestion = first
            .writer
            .get_ref()
            .as_tcp()
            .and_then(|s| socket2::SockRef::from(s).tcp_congestion().ok())
            .map(|v| {
                String::from_utf8_lossy(&v)
                    .trim_end_matches('\0')
                    .to_string()
            })
            .unwrap_or_else(|| first.writer.get_ref().transport().to_string());
        let mode = match cfg.mode {
            ModeSetting::Fixed(mode) => mode,
            ModeSetting::Auto => dwcp_tcp::mode::classify(Duration::from_secs_f64(rtt), None),
        };
        let cores = threads_or_cores(0);
        let (mode_initial, mode_max) = mode.stream_range(cores);
        let initial = if cfg.streams > 0 {
            cfg.streams
        } else {
            mode_initial
        };
        let max_streams = if cfg.max_streams > 0 {
            cfg.max_streams
        } else if cfg.streams > 0 {
            mode_max.max(cfg.streams)
        } else {
            mode_max
        }
        .max(initial);
        let complete_encoder = match cfg.page_classes {
            PageClasses::All => true,
            PageClasses::Auto => mode != Mode::Datacenter,
            PageClasses::ZeroAndLiteral => false,
        };
        let codec = usable_codec(cfg.codec, capabilities);
        // Adaptive codec choice needs both codecs at the destination; otherwise the usable one, fixed.
        let both = capabilities & (CAP_LZ4 | CAP_ZSTD) == CAP_LZ4 | CAP_ZSTD;
        // On a datacenter path the kernel's delivery rate says nothing about what the pipeline can take
        // (loopback reports tens of GB/s and the adaptive choice would send raw pages at a third of
        // the speed lz4 reaches, measured), so the configured codec stays.
        let policy = if cfg.adaptive_codec && both && mode != Mode::Datacenter {
            CodecPolicy::Adaptive { fallback: codec }
        } else {
            CodecPolicy::Fixed(codec)
        };
        let init = SessionInit {
            layout: source.layout().clone(),
            stream_count: max_streams as u16,
        };
        let JoinedStream {
            mut reader,
            mut writer,
            ..
        } = first;
        // The dictionary goes once, before SessionInit, on a freshly authenticated stream 0 (a parked
        // stream opens its session with SessionInit alone).
        let dictionary = if cfg.dictionary
            && complete_encoder
            && capabilities & CAP_ZSTD != 0
            && new_session.is_some()
        {
            let d = Arc::new(dwcp_hde::Dictionary::train_from_memory(
                source,
                1024,
                64 << 10,
            )?);
            writer.write_frame(FrameType::Dictionary, &d.to_bytes())?;
            Some(d)
        } else {
            None
        };
        writer.write_frame(FrameType::SessionInit, &init.encode())?;
        let mut p = Vec::new();
        let h = reader
            .read_frame(&mut p)
            .map_err(|e| classify(e, "SessionReady"))?;
        match h.frame_type {
            FrameType::SessionReady => {}
            FrameType::Error => return Err(peer_error(&p)),
            other => return Err(unexpected(other, "instead of SessionReady")),
        }
        // On a pooled stream the destination names the new session in SessionReady.
        let session_id = match new_session {
            Some(id) => id,
            None => {
                let id = decode_u64(&p, "SessionReady")?;
                reader.bind_session(id, MAX_PAYLOAD);
                writer.bind_session(id);
                id
            }
        };
        tracing::info!(session = %format!("{session_id:x}"), ?mode, rtt_ms = rtt * 1e3, initial, max_streams, %congestion, "session established");
        let (events_tx, events) = unbounded();
        let pool = match &cfg.buffer_pool {
            Some(shared) => shared.clone(),
            None => BufferPool::new(cfg.buffer_budget)?,
        };
        let controller =
            (max_streams > initial).then(|| StreamCountController::new(initial, 1, max_streams));
        let mut run = Self {
            t0,
            session_id,
            dialer,
            mode,
            mode_probed: !matches!(cfg.mode, ModeSetting::Auto),
            lanes: Lanes::new(),
            readers: Vec::new(),
            events,
            events_tx,
            finished: Arc::new(AtomicBool::new(false)),
            next_index: 1,
            pending_joins: 0,
            max_streams,
            controller,
            window: Window {
                started: Instant::now(),
                acked_bytes: 0,
                settling: true,
            },
            peak_streams: 0,
            control_lane: None,
            resilience: ResilienceReport::default(),
            published_resilience: ResilienceReport::default(),
            congestion,
            pool: pool.clone(),
            encoder: if complete_encoder {
                let mut e = SessionEncoder::new(
                    SessionConfig {
                        codec: policy,
                        threads: cfg.encoder_threads,
                        delta_cache_bytes: cfg.delta_cache_bytes,
                        ..SessionConfig::default()
                    },
                    source.layout().total_pages(),
                )?;
                e.set_dictionary(dictionary);
                PageEncoder::Session(Box::new(e))
            } else {
                PageEncoder::Plain(Encoder::new(codec, cfg.encoder_threads)?)
            },
            wire_bytes: 0,
            logical_bytes: 0,
            next_chunk_id: 0,
            passes: Vec::new(),
            hashes: PageHashes::new(source.layout().total_pages()),
            published: Default::default(),
            published_wire: 0,
            // A shared pool's counters include earlier migrations: publish only what this one adds.
            published_pool: pool.stats(),
            rtt,
            parking: m.pool.clone().map(|p| (p, pool_key)),
            pooled_spare: pooled,
            capabilities,
            last_telemetry: Instant::now(),
            link: LinkEstimate::default(),
            chunk_buffer_bytes: dwcp_core::pool::SizeClass::for_len(
                dwcp_hde::format::max_extended_len(cfg.pages_per_chunk, cfg.pages_per_chunk),
            )
            .map_or(1 << 20, |c| c.capacity()) as u64,
        };
        run.install(JoinedStream {
            index: 0,
            reader,
            writer,
        })?;
        // Data flows on stream 0 while the others connect and authenticate in the background.
        for _ in 1..initial {
            run.spawn_join();
        }
        Ok(run)
    }

    /// Starts connecting one more stream in the background; [`Event::Joined`] reports the result.
    fn spawn_join(&mut self) {
        let index = self.next_index;
        self.next_index = self.next_index.wrapping_add(1).max(1);
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
                let _ = tx.send(Event::Joined(index, joined));
            });
        if spawned.is_err() {
            self.pending_joins -= 1;
        }
    }

    /// Makes an authenticated stream a lane with its acknowledgement reader.
    fn install(&mut self, joined: JoinedStream) -> Result<(), Error> {
        let index = joined.index;
        let handle = self.lanes.add(index, joined.writer)?;
        let (tx, finished) = (self.events_tx.clone(), Arc::clone(&self.finished));
        let reader = joined.reader;
        let thread = std::thread::Builder::new()
            .name(format!("amst-rx-{index}"))
            .spawn(move || ack_reader(handle, reader, tx, finished))
            .map_err(|e| Error::io("starting an acknowledgement reader", e))?;
        self.readers.push(thread);
        self.peak_streams = self.peak_streams.max(self.lanes.live());
        let (mode, rtt, io_timeout) = (self.mode, self.rtt, self.dialer.io_timeout);
        self.lanes
            .with_conn(index, |c| tune_for_mode(c, mode, rtt, io_timeout));
        tracing::debug!(stream = index, live = self.lanes.live(), "stream joined");
        Ok(())
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
            let literal_before = sent_content_pages(&self.encoder.stats());
            let count = if iteration == 0 {
                total
            } else {
                pages.len() as u64
            };
            self.encoder.begin_pass(if iteration == 0 {
                Pass::All
            } else {
                Pass::Pages(&pages)
            })?;
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
            // Only now may later passes encode deltas against (and refer to) what this pass sent.
            self.encoder.end_pass();
            let elapsed = pass_start.elapsed().as_secs_f64();
            let literal = sent_content_pages(&self.encoder.stats()) - literal_before;
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
                streams = self.lanes.live(),
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
        let stream_telemetry = self.sample_streams(m.metrics.as_ref());
        *m.telemetry.0.write() = stream_telemetry.clone();
        if let Some(mt) = &m.metrics {
            mt.downtime.set(downtime.as_secs_f64());
            self.publish_counters(mt);
        }
        for s in self.lanes.stats() {
            tracing::debug!(
                stream = s.id,
                frames = s.frames,
                bytes = s.bytes,
                "stream totals"
            );
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
            wire_bytes: self.lanes.wire_bytes(),
            logical_throughput_bps: memory_bytes as f64 / total_time,
            digest_match: true,
            digest: hex(digest),
            streams: self.lanes.live(),
            peak_streams: self.peak_streams,
            mode: self.mode,
            rtt_ms: self.rtt * 1e3,
            congestion: self.congestion.clone(),
            resilience: self.resilience,
            stream_telemetry,
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
        self.encoder.begin_pass(Pass::Pages(pages))?;
        self.send_pass(
            m,
            source,
            iteration,
            true,
            Some(pages),
            source.layout().total_pages(),
        )?;
        self.wait_acked(m)?;
        self.encoder.end_pass();
        self.passes.push(IterationReport {
            iteration,
            pages: pages.len() as u64,
            wire_bytes: self.wire_bytes - before,
            duration_ms: pass_start.elapsed().as_secs_f64() * 1e3,
            dirtied_pages: 0,
            predicted_downtime_ms: 0.0,
        });
        // The handover's frames all travel on one stream: if that stream fails now, the migration
        // fails (the guest resumes) rather than guessing which of them arrived.
        self.control_lane = Some(
            self.lanes.send_control(Outgoing {
                frame_type: FrameType::Finish,
                payload: Payload::Owned(
                    Finish {
                        final_iteration: iteration,
                        data_frames: self.next_chunk_id,
                    }
                    .encode(),
                ),
            })?,
        );
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

    /// Sends a control frame of the handover on the stream that carried Finish.
    fn control(&self, out: Outgoing) -> Result<(), Error> {
        match self.control_lane {
            Some(id) => self.lanes.send_on(id, out),
            None => self.lanes.send_control(out).map(|_| ()),
        }
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
            self.check_events(m)?;
            if !paused {
                self.adapt_streams();
            }
            if self.last_telemetry.elapsed() >= TELEMETRY_INTERVAL {
                self.last_telemetry = Instant::now();
                let samples = self.sample_streams(m.metrics.as_ref());
                // The kernel's delivery-rate estimates, summed over the streams, tell the encoder how
                // fast the link drains: it picks the codec that keeps up with it at the least CPU.
                if let Some(link) = self.link.update(&samples) {
                    self.encoder.set_bandwidth_hint(link as u64);
                }
                *m.telemetry.0.write() = samples;
            }
            let n = per_batch.min(count - done);
            storage.clear();
            match list {
                Some(l) => storage.extend_from_slice(&l[done as usize..(done + n) as usize]),
                None => storage.extend(done..done + n),
            }
            let chunks: Vec<&[u64]> = storage.chunks(per_chunk as usize).collect();
            self.wait_for_budget(m, chunks.len() as u64 * self.chunk_buffer_bytes)?;
            let bufs = self.encoder.encode_batch(
                iteration,
                &chunks,
                source,
                &self.pool,
                Some(&self.hashes),
            )?;
            for buf in bufs {
                let buf = self.shrink(buf);
                self.wire_bytes += buf.len() as u64;
                let mut chunk = DataChunk {
                    id: self.next_chunk_id,
                    buf,
                };
                self.next_chunk_id += 1;
                // Only when no stream is left: reconnect, then try again.
                while let Err(back) = self.lanes.send_data(chunk) {
                    chunk = back;
                    self.recover(m)?;
                }
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

    /// One step of the stream-count controller: at the end of each measurement window, feeds it the
    /// acknowledged goodput and opens or retires streams to reach its target.
    fn adapt_streams(&mut self) {
        for id in self.lanes.close_retired() {
            tracing::debug!(stream = id, "retired stream closed");
        }
        if self.controller.is_none() {
            return;
        }
        let link_now: f64 = if self.mode_probed {
            0.0
        } else {
            self.sample_streams(None)
                .iter()
                .map(|t| t.tcp.delivery_rate_bps)
                .sum()
        };
        let Some(controller) = self.controller.as_mut() else {
            return;
        };
        // Long paths need several round trips per window for the congestion controller to settle.
        let window = Duration::from_secs_f64((20.0 * self.rtt).clamp(0.1, 2.0));
        let now = Instant::now();
        let acked = self.lanes.acked_bytes();
        if self.pending_joins > 0 || self.lanes.live() < controller.target() {
            // Measure only once the streams of the current target are all carrying data.
            self.window = Window {
                started: now,
                acked_bytes: acked,
                settling: self.window.settling,
            };
            return;
        }
        let elapsed = now - self.window.started;
        if elapsed < window {
            return;
        }
        let goodput = (acked - self.window.acked_bytes) as f64 / elapsed.as_secs_f64();
        let settled = !self.window.settling;
        self.window = Window {
            started: now,
            acked_bytes: acked,
            settling: false,
        };
        if !self.mode_probed {
            // The first window doubles as the bandwidth probe of mode detection. The probe is the
            // kernel's delivery rate, not our goodput: compressed data or a busy encoder make goodput
            // say nothing about the link.
            self.mode_probed = true;
            let link: f64 = link_now;
            let probe = (link > 0.0).then_some(link);
            let probed = dwcp_tcp::mode::classify(Duration::from_secs_f64(self.rtt), probe);
            if probed != self.mode {
                tracing::info!(from = ?self.mode, to = ?probed, link_mbit = link * 8e-6, "mode changed by the bandwidth probe");
                self.mode = probed;
            }
        }
        if !settled {
            return;
        }
        let before = controller.target();
        let target = controller.observe(goodput);
        if target != before {
            self.window.settling = true;
        }
        tracing::debug!(
            goodput_mbit = goodput * 8e-6,
            streams = before,
            target,
            "stream-count window"
        );
        let live = self.lanes.live();
        if target > live {
            for _ in live..target {
                self.spawn_join();
            }
        } else {
            // Retire the newest streams first; stream 0 stays.
            let mut ids = self.lanes.live_ids();
            ids.sort_unstable();
            for id in ids.into_iter().rev().take(live - target) {
                self.lanes.retire(id);
            }
        }
    }

    /// Handles stream failures: removes failed streams, re-sends their unacknowledged chunks on the
    /// others and, when none is left, reconnects.
    fn recover(&mut self, m: &Migration<'_>) -> Result<(), Error> {
        loop {
            let lost = self.lanes.reap_failed();
            for l in &lost {
                tracing::warn!(stream = l.id, reason = %l.reason, "stream lost");
            }
            self.resilience.streams_lost += lost.len() as u64;
            if self.lanes.live() == 0 {
                self.reconnect(m)?;
            }
            let mut back = Vec::new();
            for chunk in self.lanes.take_orphans() {
                self.resilience.resent_chunks += 1;
                self.resilience.resent_bytes += chunk.wire_len();
                if let Err(c) = self.lanes.resend(chunk) {
                    back.push(c);
                }
            }
            if back.is_empty() && !self.lanes.any_failed() {
                break;
            }
            // Every stream failed again while re-sending: count those chunks once, and go round.
            for c in &back {
                self.resilience.resent_chunks -= 1;
                self.resilience.resent_bytes -= c.wire_len();
            }
            self.lanes.requeue_orphans(back);
        }
        // Keep the stream count the controller wants (joins happen in the background).
        let target = self
            .controller
            .as_ref()
            .map_or(self.peak_streams.min(self.max_streams), |c| c.target());
        let have = self.lanes.live() + self.pending_joins;
        if !m.cancel.load(Ordering::Relaxed) && self.control_lane.is_none() && have < target {
            for _ in have..target {
                self.spawn_join();
            }
        }
        Ok(())
    }

    /// Every stream is down: connects a new one to the same session, with exponential backoff and
    /// jitter, for at most `reconnect_attempts` attempts.
    fn reconnect(&mut self, m: &Migration<'_>) -> Result<(), Error> {
        let cfg = &m.config;
        let mut delay = cfg.reconnect_backoff;
        let mut last = String::from("every stream failed");
        for attempt in 1..=cfg.reconnect_attempts {
            if m.cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            // A stream started in the background may have made it in the meantime.
            self.drain_joins(m)?;
            if self.lanes.live() > 0 {
                return Ok(());
            }
            let index = self.next_index;
            self.next_index = self.next_index.wrapping_add(1).max(1);
            match self.dialer.open(self.session_id, index) {
                Ok((joined, _)) => {
                    self.install(joined)?;
                    self.resilience.reconnects += 1;
                    tracing::info!(attempt, stream = index, "reconnected; resuming");
                    return Ok(());
                }
                // The destination refused us outright (it dropped the session, or the key is wrong):
                // retrying cannot help.
                Err(
                    e @ (Error::Peer { .. }
                    | Error::Handshake(HandshakeError::AuthenticationFailed)),
                ) => {
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "reconnection failed");
                    last = e.to_string();
                }
            }
            std::thread::sleep(delay.mul_f64(jitter()));
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        Err(Error::StreamsLost {
            attempts: cfg.reconnect_attempts,
            last,
        })
    }

    /// Installs streams whose background join completed; returns a fatal event's error.
    fn drain_joins(&mut self, m: &Migration<'_>) -> Result<(), Error> {
        while let Ok(ev) = self.events.try_recv() {
            self.handle_event(m, ev)?;
        }
        Ok(())
    }

    fn handle_event(&mut self, m: &Migration<'_>, ev: Event) -> Result<(), Error> {
        match ev {
            Event::Joined(index, Ok(joined)) => {
                self.pending_joins -= 1;
                let retire = self.control_lane.is_some()
                    || m.cancel.load(Ordering::Relaxed)
                    || self.lanes.live() >= self.max_streams;
                self.install(joined)?;
                if retire {
                    self.lanes.retire(index);
                }
                Ok(())
            }
            Event::Joined(index, Err(e)) => {
                self.pending_joins -= 1;
                match e {
                    e @ Error::Peer { .. } => Err(e),
                    e => {
                        tracing::warn!(stream = index, error = %e, "a stream could not join");
                        Ok(())
                    }
                }
            }
            Event::Fatal(lane, e) => Err(lane_error(lane, e)),
            Event::Verdict(_) | Event::CommitAck => Err(Error::Protocol(
                "destination sent a handover frame during the transfer".into(),
            )),
        }
    }

    fn check_events(&mut self, m: &Migration<'_>) -> Result<(), Error> {
        self.drain_joins(m)?;
        if self.lanes.any_failed() {
            self.recover(m)?;
        }
        Ok(())
    }

    fn next_event(
        &mut self,
        m: &Migration<'_>,
        timeout: Duration,
        what: &str,
    ) -> Result<Event, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if m.cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            if let Some(id) = self.control_lane {
                if !self.lanes.live_ids().contains(&id) && self.lanes.any_failed() {
                    let lost = self.lanes.reap_failed();
                    if let Some(l) = lost.iter().find(|l| l.id == id) {
                        return Err(Error::Protocol(format!(
                            "the stream carrying the handover failed while waiting for {what}: {}",
                            l.reason
                        )));
                    }
                }
            }
            match self.events.recv_timeout(Duration::from_millis(20)) {
                Ok(Event::Fatal(lane, e)) => return Err(lane_error(lane, e)),
                Ok(Event::Joined(index, joined)) => {
                    self.pending_joins -= 1;
                    if let Ok(j) = joined {
                        self.install(j)?;
                        self.lanes.retire(index);
                    }
                }
                Ok(ev) => return Ok(ev),
                Err(_) if Instant::now() >= deadline => {
                    return Err(Error::Timeout(format!("waiting for {what}")));
                }
                Err(_) => {}
            }
        }
    }

    /// Moves a chunk that compressed well into a buffer of a smaller pool class. A sent chunk holds its
    /// buffer until it is acknowledged, and the budget counts whole buffers: without this, a long
    /// path full of 20 KB chunks in 1 MiB buffers would run out of budget long before it is full.
    fn shrink(&self, buf: PooledBuf) -> PooledBuf {
        let Some(class) = dwcp_core::pool::SizeClass::for_len(buf.len()) else {
            return buf;
        };
        if class.capacity() >= buf.class().capacity() {
            return buf;
        }
        // Never wait here: with the budget spent, keep the larger buffer.
        match self.pool.acquire_timeout(buf.len(), Duration::ZERO) {
            Ok(Some(mut small)) => {
                small.extend_from_slice(&buf);
                small
            }
            _ => buf,
        }
    }

    /// Waits until the pool can hold `need` more bytes. Sent chunks keep their buffers until they are
    /// acknowledged, so a full pool means the destination is behind: wait here, where stream failures
    /// are handled and a stalled destination times out, rather than inside the encoder.
    fn wait_for_budget(&mut self, m: &Migration<'_>, need: u64) -> Result<(), Error> {
        let mut last_progress = (Instant::now(), self.lanes.outstanding());
        loop {
            let st = self.pool.stats();
            if st.in_use_bytes + need <= st.budget_bytes {
                return Ok(());
            }
            if m.cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            self.check_events(m)?;
            let outstanding = self.lanes.outstanding();
            if outstanding != last_progress.1 {
                last_progress = (Instant::now(), outstanding);
            } else if last_progress.0.elapsed() >= m.config.io_timeout {
                return Err(Error::Timeout(
                    "the destination stopped acknowledging data (the buffer pool stayed full)"
                        .into(),
                ));
            }
            if outstanding == 0 {
                // Another migration sharing the pool holds the buffers.
                std::thread::sleep(Duration::from_millis(1));
            } else {
                self.lanes.wait_for_change(Duration::from_millis(5));
            }
        }
    }

    /// Waits until the destination acknowledged every chunk sent so far, recovering from stream
    /// failures on the way. Fails when no acknowledgement arrives for `io_timeout`.
    fn wait_acked(&mut self, m: &Migration<'_>) -> Result<(), Error> {
        let mut last_progress = (Instant::now(), self.lanes.outstanding());
        loop {
            if m.cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            self.check_events(m)?;
            let outstanding = self.lanes.outstanding();
            if outstanding == 0 {
                return Ok(());
            }
            if outstanding != last_progress.1 {
                last_progress = (Instant::now(), outstanding);
            } else if last_progress.0.elapsed() >= m.config.io_timeout {
                return Err(Error::Timeout(
                    "the destination stopped acknowledging data".into(),
                ));
            }
            self.lanes.wait_for_change(Duration::from_millis(5));
        }
    }

    /// Samples `TCP_INFO` of every open stream (and publishes it when metrics are on).
    fn sample_streams(&self, metrics: Option<&MigrationMetrics>) -> Vec<StreamTelemetry> {
        let mut out = Vec::new();
        for id in self.lanes.live_ids() {
            let sample = self
                .lanes
                .with_conn(id, |c| c.as_tcp().map(dwcp_tcp::telemetry::sample))
                .flatten();
            if let Some(Ok(tcp)) = sample {
                if let Some(mt) = metrics {
                    mt.publish_tcp(id, &tcp);
                }
                out.push(StreamTelemetry { stream: id, tcp });
            }
        }
        out
    }

    /// Adds what was sent since the last call to the (possibly shared, cumulative) counters.
    fn publish_counters(&mut self, mt: &MigrationMetrics) {
        let now = self.encoder.stats();
        let wire = self.lanes.wire_bytes();
        let page = PAGE_SIZE as u64;
        mt.page_bytes
            .with_label_values(&["zero"])
            .inc_by((now.zero_pages - self.published.zero_pages) * page);
        mt.page_bytes
            .with_label_values(&["literal"])
            .inc_by((now.literal_pages - self.published.literal_pages) * page);
        mt.page_bytes
            .with_label_values(&["dup"])
            .inc_by((now.dup_pages - self.published.dup_pages) * page);
        mt.page_bytes
            .with_label_values(&["delta"])
            .inc_by((now.delta_pages - self.published.delta_pages) * page);
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
        let (r, p) = (self.resilience, self.published_resilience);
        for (event, now, before) in [
            ("lost", r.streams_lost, p.streams_lost),
            ("reconnect", r.reconnects, p.reconnects),
            ("resent", r.resent_chunks, p.resent_chunks),
        ] {
            mt.stream_events
                .with_label_values(&[event])
                .inc_by(now.saturating_sub(before));
        }
        mt.streams.set(self.lanes.live() as i64);
        self.published = now;
        self.published_wire = self.published_wire.max(wire);
        self.published_pool = pool;
        self.published_resilience = r;
    }

    /// Tells the destination why the session ends.
    fn abort(&mut self, error: &Error) {
        if matches!(
            error,
            Error::Peer { .. } | Error::HandoverUnconfirmed(_) | Error::StreamsLost { .. }
        ) {
            return;
        }
        let _ = self.lanes.send_control(Outgoing {
            frame_type: FrameType::Error,
            payload: Payload::Owned(error_payload(error)),
        });
    }

    fn shutdown(&mut self, succeeded: bool) {
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
                    parked.push(PooledStream::new(reader, writer, self.capabilities));
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
                Ok(Event::Joined(_, joined)) => {
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
fn health_check(p: &mut PooledStream, timeout: Duration) -> Result<(), Error> {
    let conn = p.writer.get_ref();
    let ctx = |e| Error::io("configuring a pooled stream", e);
    conn.set_read_timeout(Some(timeout)).map_err(ctx)?;
    conn.set_write_timeout(Some(timeout)).map_err(ctx)?;
    let nonce = dwcp_core::handshake::new_session_id();
    p.writer.write_frame(FrameType::Ping, &encode_u64(nonce))?;
    let mut payload = Vec::new();
    let h = p
        .reader
        .read_frame(&mut payload)
        .map_err(|e| classify(e, "Pong"))?;
    match h.frame_type {
        FrameType::Pong if decode_u64(&payload, "Pong")? == nonce => Ok(()),
        FrameType::Error => Err(peer_error(&payload)),
        other => Err(unexpected(other, "instead of Pong")),
    }
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
    let h = p
        .reader
        .read_frame(&mut payload)
        .map_err(|e| classify(e, "the answer to Join"))?;
    match h.frame_type {
        FrameType::SessionReady => {}
        FrameType::Error => return Err(peer_error(&payload)),
        other => return Err(unexpected(other, "instead of SessionReady")),
    }
    p.reader.bind_session(session_id, MAX_PAYLOAD);
    let conn = p.writer.get_ref();
    let ctx = |e| Error::io("configuring a stream", e);
    conn.set_read_timeout(Some(io_timeout)).map_err(ctx)?;
    conn.set_write_timeout(Some(io_timeout)).map_err(ctx)?;
    Ok(JoinedStream {
        index,
        reader: p.reader,
        writer: p.writer,
    })
}

fn lane_error(lane: u16, e: Error) -> Error {
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
/// go to the engine. A broken stream marks its lane failed so the engine re-sends its chunks.
fn ack_reader(
    lane: LaneHandle,
    mut reader: StreamReader,
    events: Sender<Event>,
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
                Err(e) => Event::Fatal(lane.id(), e.into()),
            },
            FrameType::Verdict => match DigestMessage::decode(&p) {
                Ok(d) => Event::Verdict(d.digest),
                Err(e) => Event::Fatal(lane.id(), e.into()),
            },
            FrameType::CommitAck => Event::CommitAck,
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
            FrameType::Error => Event::Fatal(lane.id(), peer_error(&p)),
            other => Event::Fatal(lane.id(), unexpected(other, "from the destination")),
        };
        let fatal = matches!(event, Event::Fatal(..));
        let _ = events.send(event);
        if fatal {
            return None;
        }
    }
}

/// The page encoder of a migration: the complete one (DUP, DELTA, adaptive codecs), or the zero-and-
/// literal one, which costs half the CPU where the link is not the bottleneck.
enum PageEncoder {
    Plain(Encoder),
    Session(Box<SessionEncoder>),
}

impl PageEncoder {
    fn stats(&self) -> dwcp_hde::EncodeStats {
        match self {
            PageEncoder::Plain(e) => e.stats(),
            PageEncoder::Session(e) => e.stats(),
        }
    }

    fn begin_pass(&mut self, pages: Pass<'_>) -> Result<(), Error> {
        match self {
            PageEncoder::Plain(_) => Ok(()),
            PageEncoder::Session(e) => e.begin_pass(pages),
        }
    }

    fn end_pass(&mut self) {
        if let PageEncoder::Session(e) = self {
            e.end_pass();
        }
    }

    fn set_bandwidth_hint(&self, bytes_per_sec: u64) {
        if let PageEncoder::Session(e) = self {
            e.set_bandwidth_hint(bytes_per_sec);
        }
    }

    fn encode_batch(
        &self,
        iteration: u32,
        chunks: &[&[u64]],
        source: &dyn MemorySource,
        pool: &BufferPool,
        hashes: Option<&PageHashes>,
    ) -> Result<Vec<PooledBuf>, Error> {
        match self {
            PageEncoder::Plain(e) => e.encode_batch(iteration, chunks, source, pool, hashes),
            PageEncoder::Session(e) => e.encode_batch(iteration, chunks, source, pool, hashes),
        }
    }
}

/// Pages whose content went on the wire (literal, incompressible, duplicate and delta pages): what a
/// pass's time is charged to in the downtime prediction, since dirtied pages are almost never zero.
fn sent_content_pages(s: &dwcp_hde::EncodeStats) -> u64 {
    s.literal_pages + s.dup_pages + s.delta_pages
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

#[cfg(test)]
mod tests {
    use super::*;

    fn streams(rates: &[(f64, bool)]) -> Vec<StreamTelemetry> {
        rates
            .iter()
            .enumerate()
            .map(|(i, &(rate, app_limited))| StreamTelemetry {
                stream: i as u16,
                tcp: dwcp_tcp::TcpSample {
                    delivery_rate_bps: rate,
                    app_limited,
                    ..Default::default()
                },
            })
            .collect()
    }

    #[test]
    fn no_hint_while_the_streams_start_up() {
        let mut link = LinkEstimate::default();
        // BBR's start-up: the rate doubles per sample, every stream has a backlog.
        for rate in [2e6, 5e6, 11e6, 30e6, 70e6] {
            assert_eq!(
                link.update(&streams(&[(rate / 2.0, false), (rate / 2.0, false)])),
                None
            );
        }
        // The pipe is full: the rate stops growing, and from then on every sample is the hint.
        assert_eq!(
            link.update(&streams(&[(60e6, false), (20e6, false)])),
            Some(80e6)
        );
        assert_eq!(link.update(&streams(&[(40e6, false)])), Some(40e6));
        // Nothing delivered says nothing new.
        assert_eq!(link.update(&streams(&[(0.0, true)])), Some(40e6));
    }

    #[test]
    fn starved_streams_end_the_start_up_at_once() {
        // The encoder makes less than the link takes: the rate is ours, and a fine hint at once.
        let mut link = LinkEstimate::default();
        assert_eq!(link.update(&streams(&[(3e6, false)])), None);
        assert_eq!(
            link.update(&streams(&[(9e6, true), (8e6, true)])),
            Some(17e6)
        );
        // One stream with a backlog among starved ones is not "starved".
        let mut link = LinkEstimate::default();
        assert_eq!(link.update(&streams(&[(3e6, false)])), None);
        assert_eq!(link.update(&streams(&[(9e6, true), (8e6, false)])), None);
        assert_eq!(link.update(&[]), None);
    }
}
