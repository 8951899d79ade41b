//! The source side's I/O shell: the [`Migration`] API, stream set-up, and the loop that carries out
//! what `dwcp_proto::source::SourceMachine` decides.
//!
//! The machine decides; this module does. [`establish`] opens stream 0 (or reuses a parked one),
//! measures the path and sends SessionInit; [`links`] owns the streams (one writer thread per lane
//! in `dwcp_tcp::Lanes`, one acknowledgement reader thread per stream, background joins); [`driver`]
//! runs the loop: it feeds the machine events stamped with the clock (acknowledgements, lost
//! streams, joins, the destination's handover frames, cancel) and carries out its actions (encode
//! and send a batch, open or retire a stream, reconnect, pause or resume the guest, send the
//! handover's frames); [`publish`] turns counters into metrics.

mod driver;
mod encoder;
mod establish;
mod links;
mod publish;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use dwcp_core::error::Error;
use dwcp_core::memory::{DirtyLog, MemorySource, VmControl};
use dwcp_core::transport::Connector;
use dwcp_tls::Security;

use crate::config::MigrationConfig;
use crate::metrics::MigrationMetrics;
use crate::pool::ConnectionPool;
use crate::report::{MigrationEvent, MigrationPhase, MigrationReport, Progress, StreamTelemetry};

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
    security: Security,
    config: MigrationConfig,
    progress: Option<&'a (dyn Fn(&Progress) + Sync)>,
    events: Option<&'a (dyn Fn(&MigrationEvent) + Sync)>,
    /// The phase last announced, for the failure event and the phase gauge.
    phase: parking_lot::Mutex<MigrationPhase>,
    metrics: Option<MigrationMetrics>,
    cancel: Arc<AtomicBool>,
    telemetry: TelemetryFeed,
    bandwidth: BandwidthHandle,
}

/// The latest `TCP_INFO` sample of every open stream of a running migration, refreshed about every
/// 250 ms. Cheap to clone; read it from any thread (the prediction component, a UI) while
/// [`Migration::run`] runs.
#[derive(Debug, Clone, Default)]
pub struct TelemetryFeed(Arc<parking_lot::RwLock<TelemetrySnapshot>>);

/// One sampling of every open stream, with when it was taken.
#[derive(Debug, Clone, Default)]
pub struct TelemetrySnapshot {
    /// Counts samplings: a reader polling faster than the engine samples sees each one once.
    pub sequence: u64,
    /// When the streams were sampled (None before the first sampling).
    pub taken: Option<std::time::Instant>,
    /// One sample per open stream.
    pub streams: Vec<StreamTelemetry>,
}

impl TelemetryFeed {
    /// The latest samples, one per open stream.
    pub fn latest(&self) -> Vec<StreamTelemetry> {
        self.0.read().streams.clone()
    }

    /// The latest sampling with its time and sequence number: what a recorder of link traces needs
    /// (`dwcp send --trace`).
    pub fn snapshot(&self) -> TelemetrySnapshot {
        self.0.read().clone()
    }

    fn publish(&self, samples: Vec<StreamTelemetry>) {
        let mut s = self.0.write();
        s.sequence += 1;
        s.taken = Some(std::time::Instant::now());
        s.streams = samples;
    }
}

/// Changes a running migration's bandwidth cap from any thread. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct BandwidthHandle(Arc<BandwidthState>);

#[derive(Debug, Default)]
struct BandwidthState {
    /// Bytes per second; 0: no cap.
    rate: std::sync::atomic::AtomicU64,
    /// Bumped on every change, so the migration notices one.
    generation: std::sync::atomic::AtomicU64,
    /// The guest is paused for the final pass.
    guest_paused: AtomicBool,
    /// Told when `guest_paused` or `path_limit` changes (the uplink the migration shares, which
    /// re-splits).
    watcher: parking_lot::Mutex<Option<Watcher>>,
    /// Bytes per second this migration's path is forecast to carry, when that is below its share
    /// (0: the path keeps up).
    path_limit: std::sync::atomic::AtomicU64,
    /// Chunk bytes the migration has put on the wire (for an uplink member's deadline).
    sent: std::sync::atomic::AtomicU64,
}

/// A forecast below this share of the cap marks the path as the limit.
const PATH_LIMITED: f64 = 0.8;
/// A path-limited migration keeps this much above its forecast, so it can show the path got faster.
const PATH_HEADROOM: f64 = 1.5;
/// A path-limited migration whose forecast reaches this share of its limited cap is released.
const PATH_RELEASE: f64 = 0.95;
/// A path limit is only moved when the forecast moved it by more than this (relative).
const PATH_LIMIT_STEP: f64 = 0.2;

/// A callback run when a migration's guest is paused or resumed, or its path limit moves.
#[derive(Clone)]
pub(crate) struct Watcher(pub(crate) Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watcher")
    }
}

impl BandwidthHandle {
    /// Sets the cap in bytes per second (None lifts it); the migration applies it at its next batch.
    /// A rate of 0 or beyond any link is refused.
    pub fn set(&self, bytes_per_sec: Option<u64>) -> Result<(), Error> {
        if let Some(rate) = bytes_per_sec {
            dwcp_pba::check_rate(rate as f64)
                .map_err(|e| Error::Config(format!("max_bandwidth: {e}")))?;
        }
        self.0.rate.store(
            bytes_per_sec.unwrap_or(0),
            std::sync::atomic::Ordering::Release,
        );
        self.0
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    /// The cap now, bytes per second.
    pub fn get(&self) -> Option<u64> {
        Some(self.0.rate.load(std::sync::atomic::Ordering::Acquire)).filter(|&r| r > 0)
    }

    fn generation(&self) -> u64 {
        self.0.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the migration's guest is paused for its final pass (a [`crate::HostUplink`] serves
    /// such a migration first: every millisecond of its pass is downtime).
    pub fn guest_paused(&self) -> bool {
        self.0
            .guest_paused
            .load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn set_guest_paused(&self, paused: bool) {
        let was = self
            .0
            .guest_paused
            .swap(paused, std::sync::atomic::Ordering::AcqRel);
        if was != paused {
            // A forecast from pre-copy says nothing about what the final pass can use: the paused
            // guest is not held to it.
            self.0
                .path_limit
                .store(0, std::sync::atomic::Ordering::Release);
            self.notify_watcher();
        }
    }

    pub(crate) fn watch(&self, watcher: Option<Watcher>) {
        if watcher.is_none() {
            self.0
                .path_limit
                .store(0, std::sync::atomic::Ordering::Release);
        }
        *self.0.watcher.lock() = watcher;
    }

    fn notify_watcher(&self) {
        // Cloned out first: the watcher takes the uplink's lock, which holds this one in `watch`.
        let watcher = self.0.watcher.lock().clone();
        if let Some(w) = watcher {
            (w.0)();
        }
    }

    /// Chunk bytes the migration has put on the wire so far (re-sent chunks included).
    pub fn sent_bytes(&self) -> u64 {
        self.0.sent.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn add_sent(&self, bytes: u64) {
        self.0
            .sent
            .fetch_add(bytes, std::sync::atomic::Ordering::AcqRel);
    }

    /// The rate this migration is forecast to carry, when its path or its encoder holds it below
    /// its share of an uplink (bytes per second); a [`crate::HostUplink`] gives the rest of the
    /// share to the others. Never set while the guest is paused.
    pub fn path_limit(&self) -> Option<u64> {
        Some(self.0.path_limit.load(std::sync::atomic::Ordering::Acquire)).filter(|&r| r > 0)
    }

    /// Takes PBA's goodput forecast (bytes per second). Only a migration that shares an uplink
    /// cares: when the forecast falls well below its cap, its path (not the uplink) is the limit, and
    /// the uplink re-splits with this migration held at 1.5 × its forecast; when the forecast comes
    /// back up to that, the hold is released. The thresholds leave room between them so that a
    /// steady path does not flip the split on every sample.
    pub(crate) fn report_forecast(&self, goodput: f64) {
        if !goodput.is_finite()
            || goodput <= 0.0
            || self.guest_paused()
            || self.0.watcher.lock().is_none()
        {
            return;
        }
        let Some(cap) = self.get() else { return };
        let cap = cap as f64;
        let next = match self.path_limit() {
            None if goodput < PATH_LIMITED * cap => Some(goodput * PATH_HEADROOM),
            None => return,
            Some(_) if goodput >= PATH_RELEASE * cap => None,
            Some(limit) => {
                let wanted = goodput * PATH_HEADROOM;
                if (wanted - limit as f64).abs() <= PATH_LIMIT_STEP * limit as f64 {
                    return;
                }
                Some(wanted)
            }
        };
        let next = next.map_or(0, |r| (r as u64).max(1));
        self.0
            .path_limit
            .store(next, std::sync::atomic::Ordering::Release);
        self.notify_watcher();
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
    /// A migration over TCP to the destination listening at `addr`, its streams secured by
    /// `security` (a [`Psk`](dwcp_core::handshake::Psk) alone means TLS 1.3 keyed by it; see [`Security`]).
    pub fn new(addr: SocketAddr, security: impl Into<Security>) -> Self {
        Self {
            connector: None,
            pool: None,
            addr,
            security: security.into(),
            config: MigrationConfig::default(),
            progress: None,
            events: None,
            phase: parking_lot::Mutex::new(MigrationPhase::Connecting),
            metrics: None,
            cancel: Arc::default(),
            telemetry: TelemetryFeed::default(),
            bandwidth: BandwidthHandle::default(),
        }
    }

    /// A feed of the streams' kernel telemetry, updated while the migration runs.
    pub fn telemetry_feed(&self) -> TelemetryFeed {
        self.telemetry.clone()
    }

    /// A migration over any transport: `connector` opens each stream (TCP, RDMA, ...); the engine
    /// above it is the same.
    pub fn over(connector: Arc<dyn Connector>, security: impl Into<Security>) -> Self {
        let addr = connector.peer();
        Self {
            connector: Some(connector),
            ..Self::new(addr, security)
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

    /// Announces the VM's UUID to the destination (sets [`MigrationConfig::vm_uuid`]; call it after
    /// [`config`](Self::config), which replaces the whole configuration).
    pub fn vm_uuid(mut self, uuid: dwcp_core::messages::VmUuid) -> Self {
        self.config.vm_uuid = Some(uuid);
        self
    }

    /// Calls `f` after every batch of chunks.
    pub fn on_progress(mut self, f: &'a (dyn Fn(&Progress) + Sync)) -> Self {
        self.progress = Some(f);
        self
    }

    /// Calls `f` with every [`MigrationEvent`]: each phase entered, progress after every batch,
    /// each pass, and the end (completed, or failed with its reason). Called on the migration's own
    /// thread: keep it short.
    pub fn on_event(mut self, f: &'a (dyn Fn(&MigrationEvent) + Sync)) -> Self {
        self.events = Some(f);
        self
    }

    /// Updates `metrics` as the migration runs.
    pub fn metrics(mut self, metrics: MigrationMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// A handle that changes the bandwidth cap while the migration runs (it starts from
    /// `MigrationConfig::max_bandwidth` unless set before [`run`](Self::run)).
    pub fn bandwidth_handle(&self) -> BandwidthHandle {
        self.bandwidth.clone()
    }

    /// A flag that cancels the migration when set; the source guest then keeps (or resumes) running.
    /// A cancel after the commit was sent (or once the new owner is recorded) is refused: the
    /// migration completes.
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
        if self.bandwidth.generation() == 0 && self.config.max_bandwidth.is_some() {
            self.bandwidth.set(self.config.max_bandwidth)?;
        }
        self.emit(&MigrationEvent::Phase {
            phase: MigrationPhase::Connecting,
        });
        if let Some(m) = &self.metrics {
            m.set_phase(MigrationPhase::Connecting);
        }
        let result = establish::Established::open(&self, source)
            .and_then(|session| driver::Driver::new(&self, source, session).run(dirty, vm));
        // Handed over or resumed: no final pass is waiting for bandwidth any more.
        self.bandwidth.set_guest_paused(false);
        let failed_in = *self.phase.lock();
        let end = match &result {
            Ok(r) => MigrationEvent::Completed {
                total_ms: r.total_ms,
                downtime_ms: r.downtime_ms,
                logical_bytes: r.logical_bytes,
                wire_bytes: r.wire_bytes,
                iterations: r.iterations,
                percent: 100.0,
            },
            Err(e) => MigrationEvent::Failed {
                reason: e.reason(),
                phase: failed_in,
                message: e.to_string(),
                source_running: !matches!(e, Error::HandoverUnconfirmed(_)),
            },
        };
        if let Some(m) = &self.metrics {
            m.migrations
                .with_label_values(&[if result.is_ok() { "ok" } else { "failed" }])
                .inc();
            match &result {
                Ok(_) => {
                    m.progress_percent.set(100.0);
                    m.set_phase(MigrationPhase::Completed);
                }
                Err(e) => {
                    m.failures.with_label_values(&[e.reason().as_str()]).inc();
                    m.set_phase(MigrationPhase::Failed);
                }
            }
        }
        self.emit(&end);
        result
    }

    fn emit(&self, event: &MigrationEvent) {
        if let Some(f) = self.events {
            f(event);
        }
    }

    /// Announces `phase` if the migration was not in it already.
    fn enter(&self, phase: MigrationPhase) {
        {
            let mut current = self.phase.lock();
            if *current == phase {
                return;
            }
            *current = phase;
        }
        tracing::debug!(phase = phase.as_str(), "migration phase");
        if let Some(m) = &self.metrics {
            m.set_phase(phase);
        }
        self.emit(&MigrationEvent::Phase { phase });
    }
}
