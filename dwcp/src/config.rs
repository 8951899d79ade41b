//! Migration parameters, with defaults for datacenter mode.

use std::time::Duration;

use dwcp_hde::Codec;
use dwcp_tcp::SocketProfile;

/// How the whole-memory digest compared before the handover is obtained on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum Verification {
    /// Hash each page when it is encoded (the bytes are in cache then) and fold those hashes at pause
    /// time. Proves the destination holds exactly what was sent, at a pause cost independent of memory
    /// size (about 1 ms per 4 GiB). Trusts the hypervisor's dirty log to report every write.
    #[default]
    SentPages,
    /// Additionally re-read and hash all of the source's memory while the guest is paused. Also catches a
    /// dirty log that missed writes, but adds a full memory pass to the downtime (about 65 ms per GiB on
    /// the reference machine, bound by memory bandwidth).
    FullMemory,
}

/// Which page classes the encoder uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum PageClasses {
    /// ZERO and LITERAL only on datacenter paths (the link is faster than the extra classes pay for:
    /// they doubled the encoder's CPU time on loopback, measured), every class elsewhere.
    #[default]
    Auto,
    /// ZERO, DUP, DELTA, INCOMPRESSIBLE and LITERAL with the adaptive codec choice, on any path.
    All,
    /// ZERO and LITERAL only.
    ZeroAndLiteral,
}

/// Parameters of the source side of a migration.
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    /// Streams to start with (1..=64); 0 lets the transport mode decide.
    pub streams: usize,
    /// Most streams the stream-count controller may open (1..=64); 0 lets the mode decide. Equal to
    /// `streams` fixes the count.
    pub max_streams: usize,
    /// Datacenter, internet or hybrid; detected from the first handshake's round trip by default.
    pub mode: dwcp_tcp::ModeSetting,
    /// When every stream has failed: reconnection attempts before the migration fails.
    pub reconnect_attempts: u32,
    /// Wait before the first reconnection attempt; doubles (with jitter) up to a few seconds.
    pub reconnect_backoff: Duration,
    /// Largest acceptable pause of the guest, from pause to the destination's confirmation.
    pub downtime_limit: Duration,
    /// Pre-copy iterations before stop-and-copy is forced even if the downtime estimate is above the limit.
    pub max_iterations: u32,
    /// Compressor of literal pages (with `adaptive_codec`: the one used until the link rate is known).
    pub codec: Codec,
    /// On internet and hybrid paths, choose the codec and level per chunk from the link rate (the
    /// streams' `TCP_INFO` delivery rate) and the measured codec speeds; `false` (and datacenter
    /// mode) always uses `codec`.
    pub adaptive_codec: bool,
    /// Memory for previous versions of sent pages, for DELTA encoding (0 disables DELTA).
    pub delta_cache_bytes: usize,
    /// Which page classes the encoder uses.
    pub page_classes: PageClasses,
    /// With the complete encoder: train a zstd dictionary from sampled pages when the session starts
    /// and send it once to the destination (about 2 % smaller output measured on idle memory, at the
    /// cost of the training time and up to 128 KiB on the wire).
    pub dictionary: bool,
    /// Encoder threads (0: one per core).
    pub encoder_threads: usize,
    /// Pages per chunk (1..=256).
    pub pages_per_chunk: usize,
    /// Chunks encoded per parallel batch.
    pub chunks_per_batch: usize,
    /// Byte budget of the buffer pool that holds chunks between encoder and sockets.
    pub buffer_budget: usize,
    /// A pool shared with other migrations of this process (its own budget applies, and must hold one
    /// batch); `None` creates a pool of `buffer_budget` bytes for this migration.
    pub buffer_pool: Option<dwcp_core::pool::BufferPool>,
    /// Socket options.
    pub socket: SocketProfile,
    /// Time allowed to connect and authenticate each stream.
    pub connect_timeout: Duration,
    /// Longest silence tolerated from the peer while it owes an answer.
    pub io_timeout: Duration,
    /// Threads computing the whole-memory digest (0: one per core).
    pub digest_threads: usize,
    /// How the source's digest is computed.
    pub verification: Verification,
    /// Stop-and-copy is forced (or the next convergence aid engaged) when the dirty set has not shrunk
    /// by at least 10 % below its smallest size for this many passes in a row (a guest dirtying
    /// memory faster than the link drains it never converges by iterating).
    pub stall_passes: u32,
    /// Most bytes per second this migration puts on the wire, over TCP and RDMA alike (None: no cap).
    /// Change it while the migration runs with [`crate::Migration::bandwidth_handle`].
    pub max_bandwidth: Option<u64>,
    /// When pre-copy stalls, throttle the guest's vCPUs in these steps (through
    /// [`dwcp_core::memory::VmControl::throttle`]; a hypervisor that cannot is skipped). QEMU's
    /// auto-converge steps by default; `None` never throttles.
    pub throttle: Option<dwcp_proto::source::ThrottleSteps>,
    /// The largest pause the operator accepts: once throttling cannot help more, the downtime
    /// limit doubles towards it, and a migration that cannot pause within it fails with
    /// [`dwcp_core::Error::NotConverged`] (the guest keeps running). `None`: a stalled pre-copy
    /// pauses the guest whatever that costs.
    pub downtime_ceiling: Option<Duration>,
    /// Pre-copy time after which a migration that has not converged fails with
    /// [`dwcp_core::Error::NotConverged`] (None: no deadline).
    pub precopy_deadline: Option<Duration>,
    /// The last resort when pre-copy cannot converge within [`downtime_ceiling`](Self::downtime_ceiling)
    /// (or by [`precopy_deadline`](Self::precopy_deadline)): instead of failing with
    /// [`dwcp_core::Error::NotConverged`], pause the guest, wait until the destination has applied
    /// everything sent, compare digests of that, hand the VM over (record and commit as usual), and
    /// return with the pages the destination does not have right in
    /// [`MigrationReport::postcopy`](crate::MigrationReport::postcopy). The guest stays paused and
    /// its memory must stay: the caller moves those pages with `dwcp_postcopy::send` while the
    /// destination runs the VM on a `PostcopyMemory` (docs/postcopy.md), and calls
    /// `VmControl::handed_over` after. Off by default: from the commit on, the VM needs both hosts
    /// until post-copy ends, and losing the source for longer than its recovery window loses it.
    pub postcopy: bool,
    /// The VM's UUID, announced to the destination with the fingerprint of the memory layout
    /// (protocol version 2), which may refuse another VM than the one it expects before any page is
    /// written. A destination speaking version 1 cannot be told: the migration goes on, with a
    /// warning and `identity_announced: false` in the report.
    pub vm_uuid: Option<dwcp_core::messages::VmUuid>,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            streams: 0,
            max_streams: 0,
            mode: dwcp_tcp::ModeSetting::Auto,
            reconnect_attempts: 6,
            reconnect_backoff: Duration::from_millis(100),
            downtime_limit: Duration::from_millis(50),
            max_iterations: 30,
            codec: Codec::Lz4,
            adaptive_codec: true,
            delta_cache_bytes: dwcp_hde::DEFAULT_DELTA_CACHE_BYTES,
            page_classes: PageClasses::Auto,
            dictionary: false,
            encoder_threads: 0,
            pages_per_chunk: 256,
            chunks_per_batch: 16,
            buffer_budget: 64 << 20,
            buffer_pool: None,
            socket: SocketProfile::datacenter(),
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            digest_threads: 0,
            verification: Verification::SentPages,
            stall_passes: 3,
            max_bandwidth: None,
            throttle: Some(dwcp_proto::source::ThrottleSteps::QEMU),
            downtime_ceiling: None,
            precopy_deadline: None,
            postcopy: false,
            vm_uuid: None,
        }
    }
}

impl MigrationConfig {
    /// Checks the parameters; [`crate::Migration::run`] does this too, before connecting.
    pub fn validate(&self) -> Result<(), dwcp_core::Error> {
        let bad = |m: String| Err(dwcp_core::Error::Config(m));
        if let Some(rate) = self.max_bandwidth {
            if let Err(e) = dwcp_pba::check_rate(rate as f64) {
                return bad(format!("max_bandwidth: {e}"));
            }
        }
        if let Some(ceiling) = self.downtime_ceiling {
            if ceiling < self.downtime_limit {
                return bad(format!(
                    "downtime_ceiling {ceiling:?} is below downtime_limit {:?}",
                    self.downtime_limit
                ));
            }
        }
        if let Some(t) = self.throttle {
            if !(1..=99).contains(&t.initial) || !(t.initial..=99).contains(&t.max) {
                return bad(format!(
                    "throttle steps {t:?}: the initial and the largest step are percentages in 1..=99, the largest at least the initial"
                ));
            }
        }
        if self.streams > 64 || self.max_streams > 64 {
            return bad(format!(
                "streams = {}, max_streams = {} (0 for automatic, else 1..=64)",
                self.streams, self.max_streams
            ));
        }
        if self.streams > 0 && self.max_streams > 0 && self.max_streams < self.streams {
            return bad(format!(
                "max_streams = {} is below streams = {}",
                self.max_streams, self.streams
            ));
        }
        if !(1..=dwcp_hde::MAX_CHUNK_PAGES).contains(&self.pages_per_chunk) {
            return bad(format!(
                "pages_per_chunk = {} (1..=256)",
                self.pages_per_chunk
            ));
        }
        if self.chunks_per_batch == 0 || !(1..=1_000_000).contains(&self.max_iterations) {
            return bad(
                "chunks_per_batch must be positive and max_iterations in 1..=1000000".into(),
            );
        }
        // The encoder holds a whole batch of chunk buffers at once; a smaller budget would block forever.
        let chunk = dwcp_hde::format::max_extended_len(self.pages_per_chunk, self.pages_per_chunk);
        let class =
            dwcp_core::pool::SizeClass::for_len(chunk).expect("a chunk fits the largest class");
        let needed = (self.chunks_per_batch * class.capacity()).max(dwcp_core::pool::MIN_BUDGET);
        let budget = self
            .buffer_pool
            .as_ref()
            .map_or(self.buffer_budget, |p| p.stats().budget_bytes as usize);
        if budget < needed {
            return bad(format!(
                "buffer budget = {budget} bytes; {} chunks of {} pages per batch need at least {needed}",
                self.chunks_per_batch, self.pages_per_chunk
            ));
        }
        Ok(())
    }
}

/// Parameters of the destination side.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Largest guest memory accepted from a source.
    pub max_memory_bytes: u64,
    /// Socket options.
    pub socket: SocketProfile,
    /// Longest silence tolerated from the source.
    pub io_timeout: Duration,
    /// Time allowed to authenticate each stream, and for a session whose streams all failed to be
    /// reconnected by the source before it is abandoned (with `io_timeout`, whichever is longer).
    pub connect_timeout: Duration,
    /// Threads computing the whole-memory digest (0: one per core).
    pub digest_threads: usize,
    /// How long a stream parked by a source (connection pool) is kept without being reused.
    pub pool_idle_timeout: Duration,
    /// Handshakes and sessions the listener allows at once, in total and per peer address.
    pub limits: crate::dest::ListenerLimits,
    /// What every source must announce about its VM (nothing by default); a source announcing
    /// another VM, or none (protocol version 1) when a UUID is required, is refused with
    /// [`dwcp_core::ErrorCode::Identity`] before its session starts. For an expectation per
    /// migration, see [`crate::Incoming::require`].
    pub expected_identity: dwcp_core::messages::ExpectedIdentity,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            max_memory_bytes: 1 << 40,
            socket: SocketProfile::datacenter(),
            io_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            digest_threads: 0,
            pool_idle_timeout: Duration::from_secs(60),
            limits: crate::dest::ListenerLimits::default(),
            expected_identity: dwcp_core::messages::ExpectedIdentity::default(),
        }
    }
}

pub(crate) fn threads_or_cores(n: usize) -> usize {
    if n > 0 {
        n
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}
