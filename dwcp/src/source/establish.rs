//! Opening a migration's session: stream 0 (a parked stream from the connection pool when one
//! passes its health check, else a new authenticated connection), the path's round trip, the mode,
//! the codec, the optional dictionary, SessionInit and SessionReady.
//!
//! The migration's cancel flag is honoured here too, before the session exists: before dialing,
//! while stream 0 connects and authenticates (the dial runs on a thread of its own, so a silent
//! destination does not hold a cancel for `connect_timeout`), and between the steps after it. Once
//! the destination has a stream, it is told why the session ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, SendError, bounded};

use dwcp_core::digest::PageHashes;
use dwcp_core::error::Error;
use dwcp_core::frame::{FrameType, MAX_PAYLOAD};
use dwcp_core::handshake::{CAP_LZ4, CAP_ZSTD, Negotiated, Offer};
use dwcp_core::memory::MemorySource;
use dwcp_core::messages::{SessionInit, decode_u64};
use dwcp_core::pool::BufferPool;
use dwcp_core::transport::Connector;
use dwcp_hde::{CodecPolicy, Encoder, SessionConfig, SessionEncoder};
use dwcp_proto::source::{StreamRange, stream_range};
use dwcp_tcp::{Mode, ModeSetting, TcpConnector};

use super::Migration;
use super::encoder::{PageEncoder, usable_codec};
use super::links::{Dialer, JoinedStream, Links, health_check};
use crate::config::{PageClasses, threads_or_cores};
use crate::session::{StreamWriter, read_expected, report_error};

/// How often a cancel is looked at while stream 0 is being dialed.
const CANCEL_POLL: Duration = Duration::from_millis(10);

/// A session the destination accepted, with stream 0 carrying data.
pub(super) struct Established {
    pub(super) t0: Instant,
    pub(super) links: Links,
    pub(super) mode: Mode,
    pub(super) mode_configured: bool,
    pub(super) streams: StreamRange,
    pub(super) rtt: f64,
    pub(super) congestion: String,
    pub(super) pool: BufferPool,
    pub(super) encoder: PageEncoder,
    pub(super) hashes: PageHashes,
    /// Pool bytes one encoded chunk may take.
    pub(super) chunk_buffer_bytes: u64,
    /// Whether SessionInit carried the VM's identity (the destination speaks version 2 or later).
    pub(super) identity_announced: bool,
}

impl Established {
    pub(super) fn open(m: &Migration<'_>, source: &dyn MemorySource) -> Result<Self, Error> {
        let t0 = Instant::now();
        let cfg = &m.config;
        let cancelled = || m.cancel.load(Ordering::Relaxed);
        if cancelled() {
            return Err(Error::Cancelled);
        }
        let connector: Arc<dyn Connector> = match &m.connector {
            Some(c) => Arc::clone(c),
            None => Arc::new(TcpConnector::new(m.addr, cfg.socket.clone())),
        };
        let dialer = Dialer {
            connector,
            security: m.security.clone(),
            offer: Offer::default(),
            connect_timeout: cfg.connect_timeout,
            io_timeout: cfg.io_timeout,
            latency: Arc::default(),
        };
        // Stream 0 opens the session; its handshake (two round trips) also measures the path.
        let pool_key = (dialer.connector.peer(), m.security.fingerprint());
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
        let (first, capabilities, version, new_session) = match reused {
            Some(p) => (
                JoinedStream {
                    index: 0,
                    reader: p.reader,
                    writer: p.writer,
                },
                p.capabilities,
                p.version,
                None,
            ),
            None => {
                let (first, neg) = dial_first(&dialer, &m.cancel)?;
                (first, neg.capabilities, neg.version, Some(neg.session_id))
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
        let streams = stream_range(mode, threads_or_cores(0), cfg.streams, cfg.max_streams);
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
        let init = SessionInit::new(
            source.layout().clone(),
            streams.max as u16,
            version,
            cfg.vm_uuid,
        );
        let identity_announced = init.identity.is_some();
        if !identity_announced {
            // The session goes on (a rolling upgrade needs N-1), but nobody checks which VM it is.
            match cfg.vm_uuid {
                Some(uuid) => tracing::warn!(
                    version,
                    vm_uuid = %uuid,
                    "the destination speaks protocol version {version}: the VM's identity cannot be announced, so it is not checked"
                ),
                None => tracing::info!(
                    version,
                    "the destination speaks protocol version {version}: no VM identity is announced"
                ),
            }
        }
        let JoinedStream {
            mut reader,
            mut writer,
            ..
        } = first;
        let cancel_here = |writer: &mut StreamWriter| {
            // Whatever the destination waits for (SessionInit, or the session's first frame), an
            // Error frame ends its wait at once.
            report_error(writer, &Error::Cancelled);
            Err(Error::Cancelled)
        };
        if cancelled() {
            return cancel_here(&mut writer);
        }
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
            if cancelled() {
                return cancel_here(&mut writer);
            }
            writer.write_frame(FrameType::Dictionary, &d.to_bytes())?;
            Some(d)
        } else {
            None
        };
        writer.write_frame(FrameType::SessionInit, &init.encode())?;
        let mut p = Vec::new();
        read_expected(&mut reader, &mut p, FrameType::SessionReady, "SessionReady")?;
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
        if cancelled() {
            // The destination has started the session (the writer is bound to it now): it reads
            // the Error frame as the first frame of the session.
            return cancel_here(&mut writer);
        }
        tracing::info!(session = %format!("{session_id:x}"), ?mode, rtt_ms = rtt * 1e3, initial = streams.initial, max_streams = streams.max, %congestion, version, identity_announced, "session established");
        let pool = match &cfg.buffer_pool {
            Some(shared) => shared.clone(),
            None => BufferPool::new(cfg.buffer_budget)?,
        };
        let encoder = if complete_encoder {
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
        };
        let mut links = Links::new(
            dialer,
            session_id,
            pooled,
            m.pool.clone().map(|p| (p, pool_key)),
            capabilities,
            version,
            rtt,
        );
        links.install(
            JoinedStream {
                index: 0,
                reader,
                writer,
            },
            mode,
        )?;
        Ok(Self {
            t0,
            links,
            mode,
            mode_configured: !matches!(cfg.mode, ModeSetting::Auto),
            streams,
            rtt,
            congestion,
            pool,
            encoder,
            hashes: PageHashes::new(source.layout().total_pages()),
            chunk_buffer_bytes: dwcp_core::pool::SizeClass::for_len(
                dwcp_hde::format::max_extended_len(cfg.pages_per_chunk, cfg.pages_per_chunk),
            )
            .map_or(1 << 20, |c| c.capacity()) as u64,
            identity_announced,
        })
    }
}

/// Opens stream 0 of a new session on a thread of its own and waits for it, looking at `cancel`
/// meanwhile: a destination that is slow to answer (or silent) would otherwise hold a cancel for
/// up to `connect_timeout`. A stream that authenticates after the cancel tells the destination why
/// it closes at once.
fn dial_first(dialer: &Dialer, cancel: &AtomicBool) -> Result<(JoinedStream, Negotiated), Error> {
    let (tx, rx) = bounded(1);
    let d = dialer.clone();
    std::thread::Builder::new()
        .name("dwcp-dial".into())
        .spawn(move || {
            if let Err(SendError(Ok((mut late, _)))) = tx.send(d.open(0, 0)) {
                report_error(&mut late.writer, &Error::Cancelled);
            }
        })
        .map_err(|e| Error::io("starting the first stream's dial", e))?;
    loop {
        match rx.recv_timeout(CANCEL_POLL) {
            Ok(opened) => return opened,
            Err(RecvTimeoutError::Timeout) if cancel.load(Ordering::Relaxed) => {
                return Err(Error::Cancelled);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Error::Protocol(
                    "the first stream's dial ended without a result".into(),
                ));
            }
        }
    }
}
