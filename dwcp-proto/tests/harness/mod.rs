//! An in-memory pair for the state machines: a source machine and a destination machine joined by
//! simulated streams, a simulated guest, and virtual time. Every action is carried out for real in
//! memory (pages are read at send time, chunks are kept until acknowledged, a lost stream's chunks
//! become orphans, the destination applies pages through `PageVersions` and `ChunkLedger`), so the
//! invariants checked at the end are the protocol's, not the harness's.
//!
//! Nothing here sleeps or reads the clock after `t0`: time advances by the harness's own steps and
//! jumps to the machines' next timer when nothing else can happen, so every run is reproducible
//! from its seed.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use dwcp_core::apply::PageVersions;
use dwcp_core::error::{Error, ErrorCode};
use dwcp_core::ledger::{ChunkLedger, Claim};
use dwcp_core::messages::Finish;
use dwcp_proto::dest::{AckPolicy, DestAction, DestEvent, DestMachine, DestParams, StreamEnd};
use dwcp_proto::source::{
    BatchPages, ConvergencePolicy, Flow, LinkSample, Outcome, PassPages, SourceAction, SourceEvent,
    SourceMachine, SourceParams, StreamRange,
};
use dwcp_tcp::Mode;

/// Bytes a simulated page takes on the wire (the content is one u64).
pub const PAGE_WIRE: u64 = 64;

/// A small deterministic generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// What can go wrong, and when.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Kill the stream that carries the source's `n`-th data frame, right after it was queued.
    pub kill_after_frames: Vec<u64>,
    /// A killed stream's frames still reach the destination, late (a stream the source gave up on
    /// whose data was still in the network): they arrive after newer passes' data.
    pub zombie_streams: bool,
    /// Kill every stream after this many data frames.
    pub kill_all_after_frames: Option<u64>,
    /// Reconnection attempts that fail before one succeeds (`u32::MAX`: all fail).
    pub failed_reconnects: u32,
    /// Background joins fail.
    pub joins_fail: bool,
    /// The destination applies but never acknowledges after this many data frames.
    pub acks_stop_after: Option<u64>,
    /// The destination stops reading after this many data frames.
    pub reading_stops_after: Option<u64>,
    /// Cancel when the source machine first enters this state ...
    pub cancel_in: Option<&'static str>,
    /// ... once it has finished at least this many pre-copy passes ...
    pub cancel_after_passes: usize,
    /// ... and queued at least this many data frames ...
    pub cancel_after_frames: u64,
    /// ... while streams it opened are still joining ...
    pub cancel_while_joining: bool,
    /// ... while every stream is down and it reconnects.
    pub cancel_while_reconnecting: bool,
    /// Cancel before the shell carries out any of the source machine's first actions.
    pub cancel_before_start: bool,
    /// Once both machines have ended, cancel both (it must change nothing).
    pub cancel_after_end: bool,
    /// The operator cancels the destination when its machine first enters this state, once it
    /// has applied at least `dest_cancel_after_frames` data frames.
    pub dest_cancel_in: Option<&'static str>,
    /// (See `dest_cancel_in`.)
    pub dest_cancel_after_frames: u64,
    /// ... and while the source machine is in this state.
    pub dest_cancel_when_source_in: Option<&'static str>,
    /// The dirty log answers one step after it was asked (the source machine waits in
    /// AwaitingDirty or FinalDirty meanwhile).
    pub defer_dirty: bool,
    /// The CommitAck is lost on its way to the source (the destination took over).
    pub lose_commit_ack: bool,
    /// The hypervisor confirms a pause one step after it was asked for (the guest stops at once;
    /// the source machine waits in Pausing meanwhile).
    pub defer_pause: bool,
    /// The registry answers a handover record one step after it was asked for (the source machine
    /// waits in RecordingHandover meanwhile).
    pub defer_handover: bool,
    /// Kill the stream that carried Finish when the source machine first enters this state.
    pub kill_handover_stream_in: Option<&'static str>,
    /// Per mille chance, at each delivery, that a random stream dies (random schedules).
    pub random_loss_per_mille: u64,
    /// The destination's digest is off by one (a corrupted copy).
    pub corrupt_dest_digest: bool,
}

/// The guest's behaviour: pages written per millisecond of virtual time, by phase of the run.
#[derive(Debug, Clone)]
pub struct Workload {
    /// (from virtual time, pages per ms)
    pub rates: Vec<(Duration, u64)>,
    /// Pages the guest writes to, from 0 (a hot set); `None`: anywhere.
    pub hot_pages: Option<u64>,
}

impl Workload {
    pub fn idle() -> Self {
        Self {
            rates: vec![],
            hot_pages: None,
        }
    }
    pub fn constant(per_ms: u64) -> Self {
        Self {
            rates: vec![(Duration::ZERO, per_ms)],
            hot_pages: None,
        }
    }
    fn rate_at(&self, t: Duration) -> u64 {
        self.rates
            .iter()
            .rev()
            .find(|(from, _)| t >= *from)
            .map_or(0, |&(_, r)| r)
    }
}

/// The set-up of one simulated migration.
#[derive(Debug, Clone)]
pub struct Setup {
    pub seed: u64,
    pub pages: u64,
    pub pages_per_chunk: u64,
    pub chunks_per_batch: u64,
    pub budget_chunks: u64,
    pub streams: StreamRange,
    pub downtime_limit: Duration,
    pub max_iterations: u32,
    pub io_timeout: Duration,
    pub reconnect_attempts: u32,
    /// Virtual time one delivered frame takes (the link's speed).
    pub frame_time: Duration,
    pub workload: Workload,
    pub faults: Faults,
    /// The bandwidth cap at the start (bytes/s of simulated wire bytes).
    pub max_bandwidth: Option<f64>,
    /// Cap changes at these virtual times.
    pub bandwidth_changes: Vec<(Duration, Option<f64>)>,
    /// If set, the source asks to record the handover and is answered this.
    pub handover: Option<dwcp_core::HandoverDecision>,
    /// Pre-copy that cannot converge ends in post-copy.
    pub postcopy: bool,
    /// The operator's ceiling on the pause (None: stop-and-copy whatever it costs).
    pub downtime_ceiling: Option<Duration>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            seed: 1,
            pages: 256,
            pages_per_chunk: 8,
            chunks_per_batch: 4,
            budget_chunks: 16,
            streams: StreamRange { initial: 2, max: 2 },
            downtime_limit: Duration::from_millis(5),
            max_iterations: 30,
            io_timeout: Duration::from_secs(2),
            reconnect_attempts: 4,
            frame_time: Duration::from_micros(50),
            workload: Workload::idle(),
            faults: Faults::default(),
            max_bandwidth: None,
            bandwidth_changes: Vec::new(),
            handover: None,
            postcopy: false,
            downtime_ceiling: None,
        }
    }
}

const CHUNK_BUFFER: u64 = 4096;

#[derive(Debug, Clone)]
enum Up {
    Data {
        seq: u64,
        id: u64,
        iteration: u32,
        pages: Vec<(u64, u64)>,
    },
    Finish(Finish),
    /// PostcopySwitch (Finish's payload).
    Switch(Finish),
    Commit(u128),
    /// The source's failure, with the code its shell sends.
    Error(ErrorCode),
    Close,
}

#[derive(Debug, Clone)]
enum Down {
    Ack(u64),
    /// The destination's session failed on its own: it tells the source why.
    Error(ErrorCode, String),
    Verdict(u128),
    CommitAck,
    Close,
}

#[derive(Debug, Clone)]
struct Chunk {
    id: u64,
    iteration: u32,
    pages: Vec<(u64, u64)>,
}

/// One simulated stream: both directions and the source's retained chunks.
#[derive(Debug, Default)]
struct Stream {
    up: VecDeque<Up>,
    down: VecDeque<Down>,
    /// Chunks written and not acknowledged, by stream sequence.
    unacked: BTreeMap<u64, Chunk>,
    next_seq: u64,
    /// Simulated wire bytes acknowledged on this stream (its `TCP_INFO` bytes_acked).
    acked_bytes: u64,
    retiring: bool,
    failed: bool,
    /// The destination machine accepted it (frames are read only then).
    accepted: bool,
    /// The destination machine refused it.
    refused: bool,
    acks: AckPolicy,
}

/// The outcome and history of a run.
#[derive(Debug)]
pub struct Run {
    pub source: Option<Outcome>,
    pub dest: Option<Result<(u32, u128), String>>,
    pub snapshot: Option<Vec<u64>>,
    pub source_memory: Vec<u64>,
    pub dest_memory: Vec<u64>,
    pub paused_ever: bool,
    pub resumed: bool,
    pub guest_running: bool,
    pub commit_sent: bool,
    pub handover_recorded: bool,
    pub resumed_after_commit: bool,
    pub max_in_flight: u64,
    pub budget: u64,
    pub steps: u64,
    pub virtual_time: Duration,
    pub source_states: BTreeMap<&'static str, u64>,
    pub dest_states: BTreeMap<&'static str, u64>,
    pub reconnect_attempts: u32,
    pub data_frames_delivered: u64,
    pub stale_writes_refused: u64,
    /// Late copies (from killed streams) that arrived after the destination had applied a newer pass.
    pub late_copies_after_newer: u64,
    /// Wire bytes the source released, with the virtual time of release.
    pub released: Vec<(Duration, u64)>,
    pub actions: Vec<String>,
    /// The source memory when the run began.
    pub initial_memory: Vec<u64>,
    /// Every page the guest wrote during the run.
    pub guest_written: BTreeSet<u64>,
    /// The source machine's state when the cancel was injected, and its finished passes then.
    pub cancelled_in: Option<(&'static str, usize)>,
    /// How many source actions had been carried out when the cancel was injected (into
    /// `actions`).
    pub actions_at_cancel: Option<usize>,
    /// The error code the source told the destination its failure with, if it did.
    pub dest_heard: Option<ErrorCode>,
    /// The destination machine's state when the operator cancelled it.
    pub dest_cancelled_in: Option<&'static str>,
    /// The destination machine refused the operator's cancel.
    pub dest_cancel_refused: bool,
    /// The destination machine confirmed the commit (the VM is its).
    pub dest_committed: bool,
    /// Actions either machine asked for after both had ended (with `cancel_after_end`).
    pub actions_after_end: Vec<String>,
}

/// The pair.
pub struct Sim {
    s: Setup,
    rng: Rng,
    t0: Instant,
    now: Duration,
    src: SourceMachine,
    dst: DestMachine,
    // guest
    memory: Vec<u64>,
    /// Each page's value as last encoded into a chunk (0: never): what a digest of sent pages
    /// folds, as the engine's page-hash table.
    sent: Vec<u64>,
    /// PostcopySwitch went out instead of Finish.
    switched: bool,
    dirty: BTreeSet<u64>,
    dirty_started: bool,
    paused: bool,
    snapshot: Option<Vec<u64>>,
    // source side
    streams: BTreeMap<u16, Stream>,
    orphans: Vec<Chunk>,
    in_flight: u64,
    acked_bytes: u64,
    frames_queued: u64,
    joins: Vec<(Duration, u16)>,
    reconnect_failures_left: u32,
    killed_all: bool,
    finish_lane: Option<u16>,
    handover_killed: bool,
    /// Frames of killed streams still on their way to the destination.
    zombies: Vec<(Duration, Up)>,
    // destination side
    dest_memory: Vec<u64>,
    versions: PageVersions,
    ledger: ChunkLedger,
    finish_frames: Option<u64>,
    reading_stopped: bool,
    frames_applied: u64,
    newest_applied: u32,
    // record
    run: Run,
    cancelled: bool,
    dest_cancelled: bool,
    /// A pause was carried out and its confirmation is due at the next step (`defer_pause`).
    pause_due: bool,
    /// A handover record was asked for and its answer is due at the next step (`defer_handover`).
    handover_due: bool,
    /// The dirty pages were asked for and are due at the next step (`defer_dirty`).
    dirty_due: bool,
}

fn digest(mem: &[u64]) -> u128 {
    // FNV-1a over the pages, widened: equal memories give equal digests, which is all the pair needs.
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for (i, v) in mem.iter().enumerate() {
        for b in (i as u64 ^ v.rotate_left(17)).to_le_bytes() {
            h ^= b as u128;
            h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013B);
        }
    }
    h
}

impl Sim {
    pub fn new(s: Setup) -> Self {
        let t0 = Instant::now();
        let params = SourceParams {
            total_pages: s.pages,
            pages_per_chunk: s.pages_per_chunk,
            chunks_per_batch: s.chunks_per_batch,
            chunk_buffer_bytes: CHUNK_BUFFER,
            convergence: ConvergencePolicy {
                downtime_limit: s.downtime_limit,
                max_iterations: s.max_iterations,
                stall_passes: 3,
                digest_estimate: Duration::from_micros(200),
                rtt: Duration::from_micros(100),
            },
            streams: s.streams,
            mode: Mode::Datacenter,
            mode_configured: true,
            io_timeout: s.io_timeout,
            reconnect_attempts: s.reconnect_attempts,
            reconnect_backoff: Duration::from_millis(10),
            telemetry_interval: Duration::from_millis(250),
            seed: s.seed,
            max_bandwidth: s.max_bandwidth,
            record_handover: s.handover.is_some(),
            postcopy: s.postcopy,
        };
        let mut src = SourceMachine::new(params, t0);
        src.set_convergence_aids(dwcp_proto::source::ConvergenceAids {
            throttle: None,
            downtime_ceiling: s.downtime_ceiling,
            deadline: None,
        });
        let dst = DestMachine::new(
            DestParams {
                announced_streams: s.streams.max,
                rejoin_window: s.io_timeout,
            },
            t0,
        );
        let mut rng = Rng::new(s.seed);
        let memory: Vec<u64> = (0..s.pages).map(|_| rng.next() | 1).collect();
        let mut streams = BTreeMap::new();
        streams.insert(0, Stream::default());
        let budget = s.budget_chunks * CHUNK_BUFFER;
        Sim {
            rng,
            t0,
            now: Duration::ZERO,
            src,
            dst,
            sent: vec![0; memory.len()],
            switched: false,
            memory,
            dirty: BTreeSet::new(),
            dirty_started: false,
            paused: false,
            snapshot: None,
            streams,
            orphans: Vec::new(),
            in_flight: 0,
            acked_bytes: 0,
            frames_queued: 0,
            joins: Vec::new(),
            reconnect_failures_left: s.faults.failed_reconnects,
            killed_all: false,
            finish_lane: None,
            handover_killed: false,
            zombies: Vec::new(),
            dest_memory: vec![0; s.pages as usize],
            versions: PageVersions::new(s.pages),
            ledger: ChunkLedger::new(),
            finish_frames: None,
            reading_stopped: false,
            frames_applied: 0,
            newest_applied: 0,
            run: Run {
                source: None,
                dest: None,
                snapshot: None,
                source_memory: Vec::new(),
                dest_memory: Vec::new(),
                paused_ever: false,
                resumed: false,
                guest_running: true,
                commit_sent: false,
                handover_recorded: false,
                resumed_after_commit: false,
                max_in_flight: 0,
                budget,
                steps: 0,
                virtual_time: Duration::ZERO,
                source_states: BTreeMap::new(),
                dest_states: BTreeMap::new(),
                reconnect_attempts: 0,
                data_frames_delivered: 0,
                stale_writes_refused: 0,
                late_copies_after_newer: 0,
                released: Vec::new(),
                actions: Vec::new(),
                initial_memory: Vec::new(),
                guest_written: BTreeSet::new(),
                cancelled_in: None,
                actions_at_cancel: None,
                dest_heard: None,
                dest_cancelled_in: None,
                dest_cancel_refused: false,
                dest_committed: false,
                actions_after_end: Vec::new(),
            },
            cancelled: false,
            dest_cancelled: false,
            pause_due: false,
            handover_due: false,
            dirty_due: false,
            s,
        }
    }

    /// The same pair, the source guest's memory being `memory` (a guest that ran before: the retry
    /// of a migration that failed).
    pub fn with_memory(s: Setup, memory: Vec<u64>) -> Self {
        assert_eq!(memory.len() as u64, s.pages, "the guest's size");
        let mut sim = Self::new(s);
        sim.memory = memory;
        sim
    }

    fn at(&self) -> Instant {
        self.t0 + self.now
    }

    fn budget(&self) -> u64 {
        self.s.budget_chunks * CHUNK_BUFFER
    }

    fn flow(&self) -> Flow {
        let outstanding: u64 = self
            .streams
            .values()
            .map(|s| s.unacked.len() as u64)
            .sum::<u64>()
            + self.orphans.len() as u64;
        Flow {
            outstanding_chunks: outstanding,
            acked_bytes: self.acked_bytes,
            pool_free_bytes: self.budget().saturating_sub(self.in_flight),
        }
    }

    /// Queues Finish or PostcopySwitch on the first live stream, as the shell's `send_control`.
    fn send_finish(&mut self, frame: Up) {
        match self.live_lanes().first().copied() {
            Some(lane) => {
                self.finish_lane = Some(lane);
                self.streams.get_mut(&lane).unwrap().up.push_back(frame);
                self.src_event(SourceEvent::FinishSent { lane });
            }
            None => self.src_event(SourceEvent::LocalFailed(Error::Protocol(
                "no stream for Finish".into(),
            ))),
        }
    }

    fn src_event(&mut self, ev: SourceEvent) {
        let at = self.at();
        self.src.handle(at, ev);
        *self
            .run
            .source_states
            .entry(self.src.state_name())
            .or_default() += 1;
    }

    fn dst_event(&mut self, ev: DestEvent) {
        let at = self.at();
        self.dst.handle(at, ev);
        *self
            .run
            .dest_states
            .entry(self.dst.state_name())
            .or_default() += 1;
    }

    /// Runs the pair to the end (or `max_steps`), returning what happened.
    pub fn run(mut self, max_steps: u64) -> Run {
        *self
            .run
            .source_states
            .entry(self.src.state_name())
            .or_default() += 1;
        *self
            .run
            .dest_states
            .entry(self.dst.state_name())
            .or_default() += 1;
        self.run.initial_memory = self.memory.clone();
        if self.s.faults.cancel_before_start {
            self.cancelled = true;
            self.run.cancelled_in = Some((self.src.state_name(), 0));
            self.run.actions_at_cancel = Some(0);
            self.src_event(SourceEvent::Cancel);
        }
        let f = self.flow();
        self.src_event(SourceEvent::Flow(f));
        while self.run.steps < max_steps {
            self.run.steps += 1;
            self.drain_actions();
            if self.run.source.is_some() && self.run.dest.is_some() {
                break;
            }
            if let Some(state) = self.s.faults.kill_handover_stream_in {
                if !self.handover_killed && self.src.state_name() == state {
                    if let Some(lane) = self.finish_lane {
                        self.handover_killed = true;
                        self.kill(lane);
                        self.report_failed();
                        continue;
                    }
                }
            }
            if let Some(state) = self.s.faults.cancel_in {
                let f = &self.s.faults;
                if !self.cancelled
                    && self.src.state_name() == state
                    && self.src.passes().len() >= f.cancel_after_passes
                    && self.frames_queued >= f.cancel_after_frames
                    && (!f.cancel_while_joining || self.src.pending_joins() > 0)
                    && (!f.cancel_while_reconnecting || self.src.is_reconnecting())
                {
                    self.cancelled = true;
                    self.run.cancelled_in = Some((state, self.src.passes().len()));
                    self.run.actions_at_cancel = Some(self.run.actions.len());
                    self.src_event(SourceEvent::Cancel);
                    continue;
                }
            }
            if let Some(state) = self.s.faults.dest_cancel_in {
                let f = &self.s.faults;
                if !self.dest_cancelled
                    && self.dst.state_name() == state
                    && self.frames_applied >= f.dest_cancel_after_frames
                    && f.dest_cancel_when_source_in
                        .is_none_or(|s| self.src.state_name() == s)
                {
                    self.dest_cancelled = true;
                    self.run.dest_cancelled_in = Some(state);
                    self.dst_event(DestEvent::Cancel);
                    self.run.dest_cancel_refused = self.dst.cancel_refused();
                    continue;
                }
            }
            if self.pause_due {
                self.pause_due = false;
                self.src_event(SourceEvent::Paused);
                continue;
            }
            if self.dirty_due {
                self.dirty_due = false;
                let pages: Vec<u64> = std::mem::take(&mut self.dirty).into_iter().collect();
                self.src_event(SourceEvent::Dirty(pages));
                continue;
            }
            if self.handover_due {
                self.handover_due = false;
                let decision = self.s.handover.clone().expect("asked to record a handover");
                self.src_event(SourceEvent::HandoverRecorded(decision));
                continue;
            }
            self.bandwidth_changes();
            self.guest_writes();
            self.due_joins();
            self.due_zombies();
            if !self.deliver_one() {
                self.jump_to_timer();
            }
        }
        self.finish_run()
    }

    fn finish_run(mut self) -> Run {
        if self.s.faults.cancel_after_end && self.src.is_done() && self.dst.is_done() {
            self.src_event(SourceEvent::Cancel);
            self.dst_event(DestEvent::Cancel);
            let src = std::iter::from_fn(|| self.src.poll_action()).map(|a| format!("{a:?}"));
            let dst = std::iter::from_fn(|| self.dst.poll_action()).map(|a| format!("{a:?}"));
            self.run.actions_after_end = src.chain(dst).collect();
        }
        self.run.dest_committed = self.dst.is_committed();
        self.run.snapshot = self.snapshot.take();
        self.run.source_memory = self.memory.clone();
        self.run.dest_memory = self.dest_memory.clone();
        self.run.guest_running = !self.paused;
        self.run.virtual_time = self.now;
        self.run
    }

    fn guest_writes(&mut self) {
        if self.paused || !self.dirty_started {
            return;
        }
        let rate = self.s.workload.rate_at(self.now);
        if rate == 0 {
            return;
        }
        // Writes per step in proportion to the virtual time a step takes.
        let per_step = (rate * self.s.frame_time.as_micros() as u64)
            .div_ceil(1000)
            .max(1);
        let span = self
            .s
            .workload
            .hot_pages
            .unwrap_or(self.s.pages)
            .min(self.s.pages);
        for _ in 0..per_step {
            let p = self.rng.below(span);
            self.memory[p as usize] = self.memory[p as usize].wrapping_add(1) | 1;
            self.dirty.insert(p);
            self.run.guest_written.insert(p);
        }
    }

    /// Late frames of killed streams arrive: data only, applied as the destination's data path would
    /// (the ledger and the page versions decide; nobody is there to acknowledge).
    fn due_zombies(&mut self) {
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.zombies)
            .into_iter()
            .partition(|(t, _)| *t <= now);
        self.zombies = later;
        for (_, frame) in due {
            // A dead stream's last bytes reach the destination before its end-of-stream, so only
            // while the session still receives data.
            if self.dst.state_name() != "Receiving" {
                continue;
            }
            if let Up::Data {
                id,
                iteration,
                pages,
                ..
            } = frame
            {
                if self.newest_applied > iteration {
                    self.run.late_copies_after_newer += 1;
                }
                self.apply_data(id, iteration, &pages);
            }
        }
    }

    fn apply_data(&mut self, id: u64, iteration: u32, pages: &[(u64, u64)]) {
        self.run.data_frames_delivered += 1;
        match self
            .ledger
            .claim(id)
            .expect("chunk ids within the ledger's window")
        {
            Claim::New => {
                self.newest_applied = self.newest_applied.max(iteration);
                for (page, content) in pages {
                    let mem = &mut self.dest_memory;
                    let applied = self.versions.apply(*page, iteration, |_| {
                        mem[*page as usize] = *content;
                    });
                    if applied == dwcp_core::apply::Applied::Stale {
                        self.run.stale_writes_refused += 1;
                    }
                }
                self.ledger.complete(id);
            }
            Claim::Duplicate => {}
        }
    }

    fn bandwidth_changes(&mut self) {
        let now = self.now;
        let due: Vec<Option<f64>> = self
            .s
            .bandwidth_changes
            .iter()
            .filter(|(t, _)| *t <= now)
            .map(|&(_, r)| r)
            .collect();
        self.s.bandwidth_changes.retain(|(t, _)| *t > now);
        for rate in due {
            self.src_event(SourceEvent::SetMaxBandwidth(rate));
        }
    }

    fn due_joins(&mut self) {
        let now = self.now;
        let due: Vec<u16> = self
            .joins
            .iter()
            .filter(|(t, _)| *t <= now)
            .map(|&(_, i)| i)
            .collect();
        self.joins.retain(|(t, _)| *t > now);
        for index in due {
            if self.s.faults.joins_fail || self.run.source.is_some() {
                self.src_event(SourceEvent::JoinFailed {
                    index,
                    error: Error::Timeout("the simulated join failed".into()),
                });
                continue;
            }
            self.open_stream(index);
            self.src_event(SourceEvent::StreamJoined { index });
        }
    }

    /// A new stream on both sides; the destination machine decides whether it takes it.
    fn open_stream(&mut self, index: u16) {
        if let Some(old) = self.streams.remove(&index) {
            // An index reused by a reconnection: the old stream is gone for good.
            self.orphans.extend(old.unacked.into_values());
        }
        self.streams.insert(index, Stream::default());
        self.dst_event(DestEvent::StreamJoined {
            index,
            pooled: false,
        });
    }

    fn drain_actions(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(a) = self.src.poll_action() {
                progressed = true;
                self.source_action(a);
            }
            while let Some(a) = self.dst.poll_action() {
                progressed = true;
                self.dest_action(a);
            }
            if !progressed {
                return;
            }
        }
    }

    fn live_lanes(&self) -> Vec<u16> {
        self.streams
            .iter()
            .filter(|(_, s)| !s.failed && !s.retiring)
            .map(|(&i, _)| i)
            .collect()
    }

    /// Queues a chunk on the live stream with the least queued; the chunk back when none is live.
    fn schedule(&mut self, chunk: Chunk) -> Result<u16, Chunk> {
        let Some(&lane) = self
            .live_lanes()
            .iter()
            .min_by_key(|i| self.streams[i].up.len())
        else {
            return Err(chunk);
        };
        let st = self.streams.get_mut(&lane).expect("live lane");
        let seq = st.next_seq;
        st.next_seq += 1;
        st.up.push_back(Up::Data {
            seq,
            id: chunk.id,
            iteration: chunk.iteration,
            pages: chunk.pages.clone(),
        });
        st.unacked.insert(seq, chunk);
        Ok(lane)
    }

    fn source_action(&mut self, a: SourceAction) {
        self.run.actions.push(format!("{:?}", short(&a)));
        match a {
            SourceAction::StartDirtyLog => self.dirty_started = true,
            SourceAction::OpenStream { index } => {
                let delay = Duration::from_micros(200 + self.rng.below(800));
                self.joins.push((self.now + delay, index));
            }
            SourceAction::RetireStream { index } => {
                if let Some(s) = self.streams.get_mut(&index) {
                    s.retiring = true;
                }
            }
            SourceAction::SampleTelemetry => {
                let samples = self
                    .live_lanes()
                    .iter()
                    .map(|&stream| {
                        let st = &self.streams[&stream];
                        LinkSample {
                            stream,
                            delivery_rate_bps: 1e8,
                            app_limited: false,
                            bytes_acked: st.acked_bytes,
                            rtt_s: 0.001,
                            unsent_bytes: st.unacked.len() as u64 * CHUNK_BUFFER,
                        }
                    })
                    .collect();
                self.src_event(SourceEvent::Telemetry(samples));
            }
            SourceAction::SetCodecHint { .. } | SourceAction::EndPass { .. } => {}
            SourceAction::BeginPass { pages, .. } => {
                if let PassPages::List(l) = &pages {
                    assert!(
                        l.windows(2).all(|w| w[0] < w[1]),
                        "a pass's pages are sorted and distinct"
                    );
                    assert!(l.iter().all(|&p| p < self.s.pages));
                }
            }
            SourceAction::SendBatch {
                iteration,
                pages,
                first_chunk,
            } => self.send_batch(iteration, &pages, first_chunk),
            SourceAction::PassDone(_) | SourceAction::Progress(_) => {}
            SourceAction::TakeDirty if self.s.faults.defer_dirty => self.dirty_due = true,
            SourceAction::TakeDirty => {
                let pages: Vec<u64> = std::mem::take(&mut self.dirty).into_iter().collect();
                self.src_event(SourceEvent::Dirty(pages));
            }
            SourceAction::ResendOrphans => {
                let (mut chunks, mut bytes) = (0, 0);
                let orphans = std::mem::take(&mut self.orphans);
                for c in orphans {
                    let len = c.pages.len() as u64 * PAGE_WIRE;
                    match self.schedule(c) {
                        Ok(_) => {
                            chunks += 1;
                            bytes += len;
                        }
                        Err(c) => self.orphans.push(c),
                    }
                }
                self.src_event(SourceEvent::Resent { chunks, bytes });
                self.report_failed();
            }
            SourceAction::Reconnect { index, .. } => {
                self.run.reconnect_attempts += 1;
                if self.reconnect_failures_left > 0 {
                    self.reconnect_failures_left = self.reconnect_failures_left.saturating_sub(1);
                    self.src_event(SourceEvent::ReconnectFailed(Error::Timeout(
                        "the simulated destination did not answer".into(),
                    )));
                } else {
                    self.open_stream(index);
                    self.src_event(SourceEvent::Reconnected { index });
                }
            }
            SourceAction::PauseGuest => {
                assert!(!self.paused, "paused twice");
                self.paused = true;
                self.run.paused_ever = true;
                self.snapshot = Some(self.memory.clone());
                if self.s.faults.defer_pause {
                    self.pause_due = true;
                } else {
                    self.src_event(SourceEvent::Paused);
                }
            }
            SourceAction::SendFinish {
                final_iteration,
                data_frames,
            } => self.send_finish(Up::Finish(Finish {
                final_iteration,
                data_frames,
            })),
            SourceAction::SwitchToPostcopy {
                final_iteration,
                data_frames,
            } => {
                self.switched = true;
                self.send_finish(Up::Switch(Finish {
                    final_iteration,
                    data_frames,
                }))
            }
            SourceAction::ComputeDigest => {
                // After a switch the destination holds the pages as last sent, by design.
                let d = digest(if self.switched {
                    &self.sent
                } else {
                    &self.memory
                });
                self.src_event(SourceEvent::DigestComputed {
                    digest: d,
                    elapsed: Duration::from_micros(100),
                });
            }
            SourceAction::RecordHandover => {
                assert!(
                    self.paused,
                    "the handover was recorded with the guest running"
                );
                self.run.handover_recorded = true;
                if self.s.faults.defer_handover {
                    self.handover_due = true;
                } else {
                    let decision = self.s.handover.clone().expect("asked to record a handover");
                    self.src_event(SourceEvent::HandoverRecorded(decision));
                }
            }
            SourceAction::SendCommit { digest } => {
                if self.s.handover.is_some() {
                    assert!(
                        self.run.handover_recorded,
                        "committed before recording the handover"
                    );
                }
                self.run.commit_sent = true;
                // On the stream that carried Finish, as the shell does.
                let lane = self
                    .finish_lane
                    .filter(|l| self.streams.get(l).is_some_and(|s| !s.failed));
                match lane {
                    Some(l) => self
                        .streams
                        .get_mut(&l)
                        .unwrap()
                        .up
                        .push_back(Up::Commit(digest)),
                    None => self.src_event(SourceEvent::LocalFailed(Error::Protocol(
                        "the handover's stream is gone".into(),
                    ))),
                }
            }
            SourceAction::ResumeGuest => {
                assert!(self.paused, "resumed a running guest");
                if self.run.commit_sent {
                    self.run.resumed_after_commit = true;
                }
                self.paused = false;
                self.run.resumed = true;
            }
            SourceAction::Finished(outcome) => {
                let tell = match &outcome {
                    Err(f) if f.tell_peer => Some(f.error.wire_code()),
                    _ => None,
                };
                self.run.source = Some(outcome);
                // Shutdown: the destination hears why (if it should) and every stream closes.
                for s in self.streams.values_mut().filter(|s| !s.failed) {
                    if let Some(code) = tell {
                        s.up.push_back(Up::Error(code));
                    }
                    s.up.push_back(Up::Close);
                }
            }
            other => panic!("an action this harness does not know: {other:?}"),
        }
    }

    fn send_batch(&mut self, iteration: u32, pages: &BatchPages, first_chunk: u64) {
        let mut list = Vec::new();
        pages.extend_into(&mut list);
        let chunks: Vec<Vec<u64>> = list
            .chunks(self.s.pages_per_chunk as usize)
            .map(|c| c.to_vec())
            .collect();
        let need = chunks.len() as u64 * CHUNK_BUFFER;
        assert!(
            self.in_flight + need <= self.budget(),
            "the machine sent a batch the pool cannot hold: {} + {need} > {}",
            self.in_flight,
            self.budget()
        );
        let (count, mut wire) = (chunks.len() as u64, 0);
        for (i, c) in chunks.into_iter().enumerate() {
            let chunk = Chunk {
                id: first_chunk + i as u64,
                iteration,
                // Read at send time, as the encoder does: the guest may write again right after.
                pages: c
                    .iter()
                    .map(|&p| {
                        self.sent[p as usize] = self.memory[p as usize];
                        (p, self.memory[p as usize])
                    })
                    .collect(),
            };
            wire += chunk.pages.len() as u64 * PAGE_WIRE;
            self.in_flight += CHUNK_BUFFER;
            self.frames_queued += 1;
            match self.schedule(chunk) {
                Ok(lane) => self.faults_after_frame(lane),
                Err(c) => self.orphans.push(c),
            }
        }
        self.run.max_in_flight = self.run.max_in_flight.max(self.in_flight);
        self.run.released.push((self.now, wire));
        self.src_event(SourceEvent::BatchSent {
            chunks: count,
            wire_bytes: wire,
            content_pages: list.len() as u64,
        });
        let f = self.flow();
        self.src_event(SourceEvent::Flow(f));
        self.report_failed();
    }

    fn faults_after_frame(&mut self, lane: u16) {
        let n = self.frames_queued;
        if self.s.faults.kill_after_frames.contains(&n) {
            self.kill(lane);
        }
        if self.s.faults.kill_all_after_frames == Some(n) && !self.killed_all {
            self.killed_all = true;
            let all: Vec<u16> = self.streams.keys().copied().collect();
            for s in all {
                self.kill(s);
            }
        }
    }

    /// The stream breaks: frames in flight on it are gone in both directions.
    fn kill(&mut self, index: u16) {
        let Some(st) = self.streams.get_mut(&index) else {
            return;
        };
        if st.failed {
            return;
        }
        st.failed = true;
        let in_flight: Vec<Up> = st.up.drain(..).collect();
        st.down.clear();
        if self.s.faults.zombie_streams && st.accepted {
            let due = self.now + Duration::from_micros(300 + self.rng.below(2700));
            self.zombies.extend(
                in_flight
                    .into_iter()
                    .filter(|f| matches!(f, Up::Data { .. }))
                    .map(|f| (due, f)),
            );
        }
        let st = self.streams.get_mut(&index).expect("stream");
        // The destination's thread of this stream ends too (unless it refused the stream).
        if !st.refused {
            self.dst_event(DestEvent::StreamEnded {
                index,
                end: StreamEnd::Lost(Error::Timeout("the simulated stream broke".into())),
            });
        }
    }

    /// Tells the source machine of failed streams (as the shell reaps failed lanes).
    fn report_failed(&mut self) {
        let failed: Vec<u16> = self
            .streams
            .iter()
            .filter(|(_, s)| s.failed)
            .map(|(&i, _)| i)
            .collect();
        if failed.is_empty() {
            return;
        }
        for i in &failed {
            let st = self.streams.remove(i).expect("failed stream");
            self.orphans.extend(st.unacked.into_values());
        }
        self.orphans.sort_by_key(|c| c.id);
        self.src_event(SourceEvent::StreamsLost { lost: failed });
    }

    fn dest_action(&mut self, a: DestAction) {
        match a {
            DestAction::AcceptStream { index, .. } => {
                if let Some(s) = self.streams.get_mut(&index) {
                    s.accepted = true;
                }
            }
            DestAction::RefuseStream { index, .. } => {
                if let Some(s) = self.streams.get_mut(&index) {
                    s.refused = true;
                    s.down.push_back(Down::Close);
                }
            }
            DestAction::StopData => {}
            DestAction::CheckReceived => {
                let n = self.finish_frames.unwrap_or(u64::MAX);
                self.dst_event(DestEvent::Received {
                    frames_complete: self.ledger.is_complete(n),
                    distinct_chunks: self.ledger.claimed(),
                    in_progress: self.ledger.in_progress(),
                    missing_pages: self.versions.missing(),
                });
            }
            DestAction::ComputeDigest => {
                let mut d = digest(&self.dest_memory);
                if self.s.faults.corrupt_dest_digest {
                    d ^= 1;
                }
                self.dst_event(DestEvent::DigestComputed(d));
            }
            DestAction::SendVerdict { stream, digest } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.down.push_back(Down::Verdict(digest));
                }
            }
            DestAction::FlushSink => self.dst_event(DestEvent::Flushed),
            DestAction::SendCommitAck { stream } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.down.push_back(Down::CommitAck);
                }
                self.dst_event(DestEvent::CommitAckSent);
            }
            DestAction::ParkStream { .. } => {}
            DestAction::Finished(r) => {
                if let Err(f) = &r {
                    // As the shell's `fail_all`: every stream that still takes a frame hears why,
                    // unless the source caused the failure.
                    if !matches!(f.0, Error::Peer { .. }) {
                        let (code, message) = (f.0.wire_code(), f.0.to_string());
                        for st in self
                            .streams
                            .values_mut()
                            .filter(|s| s.accepted && !s.failed)
                        {
                            st.down.push_back(Down::Error(code, message.clone()));
                        }
                    }
                }
                self.run.dest = Some(r.map_err(|f| f.0.to_string()));
            }
            other => panic!("an action this harness does not know: {other:?}"),
        }
    }

    /// Delivers one frame, on a stream and in a direction picked at random: streams interleave in
    /// any order, each stays in order. Returns whether anything moved.
    fn deliver_one(&mut self) -> bool {
        let mut options: Vec<(u16, bool)> = Vec::new();
        for (&i, s) in &self.streams {
            if s.failed {
                continue;
            }
            if s.accepted && !s.up.is_empty() && !self.reading_stopped {
                options.push((i, true));
            }
            if !s.down.is_empty() {
                options.push((i, false));
            }
        }
        if options.is_empty() {
            return false;
        }
        let (lane, up) = options[self.rng.below(options.len() as u64) as usize];
        self.now += self.s.frame_time;
        if self.s.faults.random_loss_per_mille > 0
            && self.run.source.is_none()
            && self.rng.chance(self.s.faults.random_loss_per_mille)
        {
            let victims: Vec<u16> = self.streams.keys().copied().collect();
            let v = victims[self.rng.below(victims.len() as u64) as usize];
            self.kill(v);
            self.report_failed();
            return true;
        }
        if up {
            self.deliver_up(lane);
        } else {
            self.deliver_down(lane);
        }
        true
    }

    fn deliver_up(&mut self, lane: u16) {
        let st = self.streams.get_mut(&lane).expect("stream");
        let frame = st.up.pop_front().expect("a frame");
        let more_buffered = !st.up.is_empty();
        match frame {
            Up::Data {
                seq,
                id,
                iteration,
                pages,
            } => {
                self.apply_data(id, iteration, &pages);
                self.frames_applied += 1;
                if self.s.faults.reading_stops_after == Some(self.frames_applied) {
                    self.reading_stopped = true;
                }
                let acks_on = self
                    .s
                    .faults
                    .acks_stop_after
                    .is_none_or(|n| self.frames_applied < n);
                let st = self.streams.get_mut(&lane).expect("stream");
                if st
                    .acks
                    .on_applied(pages.len() * PAGE_WIRE as usize, more_buffered)
                    && acks_on
                {
                    st.down.push_back(Down::Ack(seq));
                }
            }
            Up::Finish(f) => {
                self.finish_frames = Some(f.data_frames);
                self.dst_event(DestEvent::Finish {
                    finish: f,
                    stream: lane,
                });
            }
            Up::Switch(f) => {
                self.finish_frames = Some(f.data_frames);
                self.dst_event(DestEvent::PostcopySwitch {
                    finish: f,
                    stream: lane,
                });
            }
            Up::Commit(d) => self.dst_event(DestEvent::Commit {
                digest: d,
                stream: lane,
            }),
            Up::Error(code) => {
                self.run.dest_heard.get_or_insert(code);
                self.dst_event(DestEvent::StreamEnded {
                    index: lane,
                    end: StreamEnd::Fatal(Error::Peer {
                        code,
                        message: "the source failed".into(),
                    }),
                })
            }
            Up::Close => {
                // Closed on purpose (retired, or the session ended): not a loss.
                self.streams.remove(&lane);
                self.dst_event(DestEvent::StreamEnded {
                    index: lane,
                    end: StreamEnd::Closed,
                });
            }
        }
    }

    fn deliver_down(&mut self, lane: u16) {
        let st = self.streams.get_mut(&lane).expect("stream");
        match st.down.pop_front().expect("a frame") {
            Down::Ack(through) => {
                let acked: Vec<u64> = st.unacked.range(..=through).map(|(&s, _)| s).collect();
                for s in acked {
                    let c = st.unacked.remove(&s).expect("acked chunk");
                    self.acked_bytes += c.pages.len() as u64 * PAGE_WIRE;
                    st.acked_bytes += c.pages.len() as u64 * PAGE_WIRE;
                    self.in_flight -= CHUNK_BUFFER;
                }
                // A retired stream closes once everything on it is acknowledged.
                if st.retiring && st.unacked.is_empty() {
                    st.up.push_back(Up::Close);
                }
                let f = self.flow();
                self.src_event(SourceEvent::Flow(f));
            }
            Down::Verdict(d) => self.src_event(SourceEvent::Verdict(d)),
            Down::Error(code, message) => {
                self.src_event(SourceEvent::PeerFailed(Error::Peer { code, message }))
            }
            Down::CommitAck if self.s.faults.lose_commit_ack => {}
            Down::CommitAck => self.src_event(SourceEvent::CommitAck),
            Down::Close => {
                st.failed = true;
                st.up.clear();
                self.report_failed();
            }
        }
    }

    /// Nothing can move: time jumps to the machines' next timer (or a join that is due).
    fn jump_to_timer(&mut self) {
        let timers = [
            self.src.poll_timeout(),
            self.dst.poll_timeout(),
            self.joins.iter().map(|&(t, _)| self.t0 + t).min(),
            self.s
                .bandwidth_changes
                .iter()
                .map(|&(t, _)| self.t0 + t)
                .min(),
        ];
        let next = timers.into_iter().flatten().min();
        // Always forward, so that a timer that is due now cannot stop the clock.
        let soonest = self.now + Duration::from_micros(1);
        self.now = match next {
            Some(t) => t.saturating_duration_since(self.t0).max(soonest),
            None => self.now + Duration::from_millis(1),
        };
        self.src_event(SourceEvent::Tick);
        self.dst_event(DestEvent::Tick);
    }
}

fn short(a: &SourceAction) -> String {
    match a {
        SourceAction::SendBatch {
            iteration, pages, ..
        } => {
            format!("SendBatch(pass {iteration}, {} pages)", pages.len())
        }
        SourceAction::BeginPass { iteration, pages } => {
            format!("BeginPass({iteration}, {} pages)", pages.len())
        }
        SourceAction::Progress(_) => "Progress".into(),
        other => {
            let s = format!("{other:?}");
            s.chars().take(80).collect()
        }
    }
}

/// Checks the invariants every run must keep, whatever happened.
pub fn assert_invariants(run: &Run) {
    assert!(
        run.source.is_some(),
        "the source never finished ({} steps)",
        run.steps
    );
    assert!(
        run.max_in_flight <= run.budget,
        "memory in flight {} exceeded the budget {}",
        run.max_in_flight,
        run.budget
    );
    assert!(
        !run.resumed_after_commit,
        "the guest was resumed after the commit was sent"
    );
    let source_ok = matches!(run.source, Some(Ok(_)));
    let dest_ok = matches!(run.dest, Some(Ok(_)));
    let unconfirmed = matches!(
        &run.source,
        Some(Err(f)) if matches!(f.error, Error::HandoverUnconfirmed(_))
    );
    if source_ok {
        assert!(
            dest_ok,
            "the source handed over but the destination did not commit: {:?}",
            run.dest
        );
        let snap = run
            .snapshot
            .as_ref()
            .expect("a completed migration paused the guest");
        match &run.source {
            // Ended in post-copy: every page but those handed to it is right already.
            Some(Ok(c)) if c.postcopy.is_some() => {
                let left = &c.postcopy.as_ref().unwrap().pages;
                for (p, (a, b)) in snap.iter().zip(&run.dest_memory).enumerate() {
                    assert!(
                        a == b || left.binary_search(&(p as u64)).is_ok(),
                        "page {p} differs after pre-copy and is not left to post-copy"
                    );
                }
            }
            _ => assert!(
                *snap == run.dest_memory,
                "the destination's memory differs from the source's at pause time"
            ),
        }
        assert!(
            !run.guest_running,
            "the source guest runs after the handover"
        );
    } else if !unconfirmed {
        // Failed before the commit: the guest runs here, and the destination never took over.
        assert!(
            run.guest_running,
            "the migration failed and the guest stays paused"
        );
        assert!(
            !dest_ok,
            "the destination committed although the source failed before the commit"
        );
        if run.paused_ever {
            assert!(
                run.resumed,
                "a paused guest was not resumed after a failure"
            );
        }
    }
    // Never two owners: a committed destination and a running source guest.
    assert!(!(dest_ok && run.guest_running), "two hosts run the guest");
}
