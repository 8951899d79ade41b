//! The loop that runs a migration: feeds `SourceMachine` events stamped with the clock and carries
//! out its actions.
//!
//! Data flows without waiting: a batch is encoded and queued on the lanes, the machine hears of it
//! (with fresh in-flight figures) and asks for the next one at once. The loop blocks only when the
//! machine waits — for acknowledgements (on the lanes' change signal, at most 5 ms at a time), or
//! for the destination's handover frames (on the streams' event channel) — and never past the
//! machine's next timer.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dwcp_core::digest::memory_digest;
use dwcp_core::error::Error;
use dwcp_core::frame::FrameType;
use dwcp_core::memory::{DirtyLog, MemorySource, VmControl};
use dwcp_core::messages::{DigestMessage, Finish};
use dwcp_core::pool::PooledBuf;
use dwcp_hde::Pass;
use dwcp_proto::source::{
    BatchPages, Completed, Flow, LinkSample, PassPages, SourceAction, SourceEvent, SourceMachine,
    SourceParams,
};
use dwcp_tcp::{DataChunk, Outgoing, Payload};

use super::encoder::{estimate_full_digest, sent_content_pages, time_it};
use super::establish::Established;
use super::links::{LinkEvent, lane_error};
use super::publish::{Published, sample_streams};
use super::{Migration, TELEMETRY_INTERVAL};
use crate::config::{Verification, threads_or_cores};
use crate::report::{MigrationEvent, MigrationReport};
use crate::session::{error_payload, hex};
use dwcp_core::latency::LatencyOp;

/// Longest single wait for acknowledgements: the loop then looks at failures, joins and cancel.
const ACK_WAIT: Duration = Duration::from_millis(5);
/// Longest single wait for the destination's handover frames.
const PEER_WAIT: Duration = Duration::from_millis(20);

pub(super) struct Driver<'m, 'a> {
    m: &'m Migration<'a>,
    source: &'m dyn MemorySource,
    s: Established,
    published: Published,
    digest_threads: usize,
    control_lane: Option<u16>,
    /// PostcopySwitch went out instead of Finish.
    postcopy_switched: bool,
    /// Page numbers of the batch being encoded (reused).
    storage: Vec<u64>,
    /// The bandwidth handle's generation the machine knows.
    bandwidth_seen: u64,
    /// The vCPU throttle the hypervisor applied, percent (lifted if the migration fails).
    throttled: u8,
}

impl<'m, 'a> Driver<'m, 'a> {
    pub(super) fn new(m: &'m Migration<'a>, source: &'m dyn MemorySource, s: Established) -> Self {
        Self {
            m,
            source,
            published: Published::new(&s.pool),
            digest_threads: threads_or_cores(m.config.digest_threads),
            control_lane: None,
            postcopy_switched: false,
            storage: Vec::new(),
            bandwidth_seen: 0,
            throttled: 0,
            s,
        }
    }

    /// Runs the machine to its end, then ends the streams.
    pub(super) fn run(
        mut self,
        dirty: &mut dyn DirtyLog,
        vm: &mut dyn VmControl,
    ) -> Result<MigrationReport, Error> {
        let cfg = &self.m.config;
        let digest_estimate = match cfg.verification {
            Verification::SentPages => time_it(|| self.s.hashes.digest(self.digest_threads)),
            Verification::FullMemory => estimate_full_digest(self.source),
        };
        let params = SourceParams {
            total_pages: self.source.layout().total_pages(),
            pages_per_chunk: cfg.pages_per_chunk as u64,
            chunks_per_batch: cfg.chunks_per_batch as u64,
            chunk_buffer_bytes: self.s.chunk_buffer_bytes,
            convergence: dwcp_proto::source::ConvergencePolicy {
                downtime_limit: cfg.downtime_limit,
                max_iterations: cfg.max_iterations,
                stall_passes: cfg.stall_passes,
                digest_estimate,
                rtt: Duration::from_secs_f64(self.s.rtt),
            },
            streams: self.s.streams,
            mode: self.s.mode,
            mode_configured: self.s.mode_configured,
            io_timeout: cfg.io_timeout,
            reconnect_attempts: cfg.reconnect_attempts,
            reconnect_backoff: cfg.reconnect_backoff,
            telemetry_interval: TELEMETRY_INTERVAL,
            seed: self.s.links.session_id ^ dwcp_core::handshake::new_session_id(),
            max_bandwidth: self.m.bandwidth.get().map(|r| r as f64),
            record_handover: true,
            postcopy: cfg.postcopy,
        };
        self.bandwidth_seen = self.m.bandwidth.generation();
        let mut machine = SourceMachine::new(params, Instant::now());
        machine.set_convergence_aids(dwcp_proto::source::ConvergenceAids {
            throttle: cfg.throttle,
            downtime_ceiling: cfg.downtime_ceiling,
            deadline: cfg.precopy_deadline,
        });
        let outcome = self.drive(&mut machine, dirty, vm);
        let result = match outcome {
            // Ended in post-copy: the destination owns the VM, but the source's memory serves
            // post-copy until it has moved the rest; the caller says `handed_over` then.
            Ok(done) if done.postcopy.is_some() => Ok(self.report(done)),
            Ok(done) => {
                vm.handed_over();
                Ok(self.report(done))
            }
            Err(f) => {
                if self.throttled > 0 {
                    // The guest stays on the source: give it its vCPUs back.
                    if let Err(e) = vm.throttle(0) {
                        tracing::warn!(error = %e, "lifting the vCPU throttle failed");
                    }
                }
                if f.tell_peer {
                    // Tells the destination why the session ends.
                    let _ = self.s.links.lanes.send_control(Outgoing {
                        frame_type: FrameType::Error,
                        payload: Payload::Owned(error_payload(&f.error)),
                    });
                }
                Err(f.error)
            }
        };
        self.s.links.shutdown(result.is_ok());
        result
    }

    fn flow(&self) -> Flow {
        let st = self.s.pool.stats();
        Flow {
            outstanding_chunks: self.s.links.lanes.outstanding(),
            acked_bytes: self.s.links.lanes.acked_bytes(),
            pool_free_bytes: st.budget_bytes.saturating_sub(st.in_use_bytes),
        }
    }

    fn drive(
        &mut self,
        machine: &mut SourceMachine,
        dirty: &mut dyn DirtyLog,
        vm: &mut dyn VmControl,
    ) -> dwcp_proto::source::Outcome {
        machine.handle(Instant::now(), SourceEvent::Flow(self.flow()));
        loop {
            while let Some(action) = machine.poll_action() {
                let batch = matches!(action, SourceAction::SendBatch { .. });
                if let SourceAction::Finished(outcome) = action {
                    return outcome;
                }
                self.execute(machine, action, dirty, vm);
                // Between two batches, look at the streams (failures, joins, cancel) first.
                if batch {
                    break;
                }
            }
            // Announced after the actions that led to it (the pass that ended pre-copy), before
            // the progress of the new phase.
            if let Some(phase) = machine.migration_phase() {
                self.m.enter(phase);
            }
            if !machine.has_actions() {
                self.wait(machine);
            }
            self.housekeeping(machine);
        }
    }

    /// Blocks until something may have changed, never past the machine's next timer.
    fn wait(&mut self, machine: &mut SourceMachine) {
        let now = Instant::now();
        let until = machine
            .poll_timeout()
            .map_or(PEER_WAIT, |t| t.saturating_duration_since(now));
        if machine.awaits_peer() {
            if let Ok(ev) = self.s.links.events.recv_timeout(until.min(PEER_WAIT)) {
                self.link_event(machine, ev);
            }
        } else if self.s.links.lanes.outstanding() == 0 {
            // Nothing of ours in flight: another migration sharing the pool holds the buffers, or a
            // reconnection's backoff runs.
            std::thread::sleep(until.min(Duration::from_millis(1)));
        } else {
            self.s.links.lanes.wait_for_change(until.min(ACK_WAIT));
        }
    }

    /// Feeds the machine what happened on the streams, then the in-flight figures and the time.
    fn housekeeping(&mut self, machine: &mut SourceMachine) {
        if self.m.cancel.load(Ordering::Relaxed) {
            machine.handle(Instant::now(), SourceEvent::Cancel);
        }
        let generation = self.m.bandwidth.generation();
        if generation != self.bandwidth_seen {
            self.bandwidth_seen = generation;
            let rate = self.m.bandwidth.get().map(|r| r as f64);
            machine.handle(Instant::now(), SourceEvent::SetMaxBandwidth(rate));
        }
        while let Ok(ev) = self.s.links.events.try_recv() {
            self.link_event(machine, ev);
        }
        for id in self.s.links.lanes.close_retired() {
            tracing::debug!(stream = id, "retired stream closed");
        }
        self.report_lost(machine);
        let now = Instant::now();
        machine.handle(now, SourceEvent::Flow(self.flow()));
        machine.handle(now, SourceEvent::Tick);
    }

    /// Tells the machine of streams that failed, or that it believes live and the lanes do not.
    fn report_lost(&mut self, machine: &mut SourceMachine) {
        let lanes = &mut self.s.links.lanes;
        if !lanes.any_failed() && lanes.live() >= machine.live_streams().len() {
            return;
        }
        let mut lost: Vec<u16> = Vec::new();
        for l in lanes.reap_failed() {
            tracing::warn!(stream = l.id, reason = %l.reason, "stream lost");
            lost.push(l.id);
        }
        let live = lanes.live_ids();
        let vanished: Vec<u16> = machine
            .live_streams()
            .iter()
            .copied()
            .filter(|i| !live.contains(i) && !lost.contains(i))
            .collect();
        lost.extend(vanished);
        if !lost.is_empty() {
            machine.handle(Instant::now(), SourceEvent::StreamsLost { lost });
        }
    }

    fn link_event(&mut self, machine: &mut SourceMachine, ev: LinkEvent) {
        let event = match ev {
            LinkEvent::Verdict(d) => SourceEvent::Verdict(d),
            LinkEvent::CommitAck => SourceEvent::CommitAck,
            LinkEvent::Fatal(lane, e) => SourceEvent::PeerFailed(lane_error(lane, e)),
            LinkEvent::Joined(index, Ok(joined)) => {
                self.s.links.join_done();
                match self.s.links.install(joined, machine.mode()) {
                    Ok(()) => SourceEvent::StreamJoined { index },
                    Err(error) => SourceEvent::JoinFailed { index, error },
                }
            }
            LinkEvent::Joined(index, Err(error)) => {
                self.s.links.join_done();
                SourceEvent::JoinFailed { index, error }
            }
        };
        machine.handle(Instant::now(), event);
    }

    fn execute(
        &mut self,
        machine: &mut SourceMachine,
        action: SourceAction,
        dirty: &mut dyn DirtyLog,
        vm: &mut dyn VmControl,
    ) {
        let event = match action {
            SourceAction::StartDirtyLog => {
                dirty.start();
                None
            }
            SourceAction::OpenStream { index } => {
                self.s.links.spawn_join(index);
                None
            }
            SourceAction::RetireStream { index } => {
                self.s.links.lanes.retire(index);
                None
            }
            SourceAction::SampleTelemetry => {
                let samples = sample_streams(&self.s.links.lanes, self.m.metrics.as_ref());
                let link = samples
                    .iter()
                    .map(|t| LinkSample {
                        stream: t.stream,
                        delivery_rate_bps: t.tcp.delivery_rate_bps,
                        app_limited: t.tcp.app_limited,
                        bytes_acked: t.tcp.bytes_acked,
                        rtt_s: t.tcp.rtt_s,
                        unsent_bytes: t.tcp.unsent_bytes,
                    })
                    .collect();
                self.m.telemetry.publish(samples);
                Some(SourceEvent::Telemetry(link))
            }
            SourceAction::SetCodecHint { bytes_per_sec } => {
                self.s.encoder.set_bandwidth_hint(bytes_per_sec);
                None
            }
            SourceAction::BeginPass { pages, .. } => {
                let pass = match &pages {
                    PassPages::All(_) => Pass::All,
                    PassPages::List(l) => Pass::Pages(l),
                };
                self.s
                    .encoder
                    .begin_pass(pass)
                    .err()
                    .map(SourceEvent::LocalFailed)
            }
            SourceAction::SendBatch {
                iteration,
                pages,
                first_chunk,
            } => return self.send_batch(machine, iteration, &pages, first_chunk),
            SourceAction::EndPass { .. } => {
                self.s.encoder.end_pass();
                None
            }
            SourceAction::PassDone(pass) => {
                if let Some(mt) = &self.m.metrics {
                    mt.iterations.inc();
                }
                tracing::info!(
                    iteration = pass.iteration,
                    pages = pass.pages,
                    dirtied = pass.dirtied_pages,
                    streams = self.s.links.lanes.live(),
                    predicted_downtime_ms = pass.predicted_downtime_ms,
                    "pass done"
                );
                self.m.emit(&MigrationEvent::Pass(pass));
                None
            }
            SourceAction::Progress(p) => {
                if let Some(mt) = &self.m.metrics {
                    mt.throughput.set(p.rate_bps);
                    mt.publish_progress(&p);
                    mt.pool_in_use.set(self.s.pool.stats().in_use_bytes as i64);
                    self.published.publish(
                        mt,
                        self.s.encoder.stats(),
                        &self.s.links.lanes,
                        &self.s.pool,
                        machine.resilience(),
                    );
                }
                if let Some(f) = self.m.progress {
                    f(&p);
                }
                self.m.emit(&MigrationEvent::Progress(p));
                None
            }
            SourceAction::TakeDirty => {
                let mut pages = Vec::new();
                dirty.take_dirty(&mut pages);
                Some(SourceEvent::Dirty(pages))
            }
            SourceAction::ResendOrphans => Some(self.resend_orphans()),
            SourceAction::Reconnect { index, attempt } => {
                let links = &mut self.s.links;
                Some(match links.dialer.open(links.session_id, index) {
                    Ok((joined, _)) => match links.install(joined, machine.mode()) {
                        Ok(()) => {
                            tracing::info!(attempt, stream = index, "reconnected");
                            SourceEvent::Reconnected { index }
                        }
                        Err(e) => SourceEvent::ReconnectFailed(e),
                    },
                    Err(e) => SourceEvent::ReconnectFailed(e),
                })
            }
            SourceAction::ThrottleGuest { percent } => match vm.throttle(percent) {
                Ok(true) => {
                    self.throttled = percent;
                    None
                }
                Ok(false) => Some(SourceEvent::ThrottleRefused),
                Err(e) => {
                    tracing::warn!(error = %e, percent, "throttling the guest failed");
                    Some(SourceEvent::ThrottleRefused)
                }
            },
            SourceAction::PauseGuest => Some(match vm.pause() {
                Ok(()) => {
                    self.m.bandwidth.set_guest_paused(true);
                    SourceEvent::Paused
                }
                Err(e) => SourceEvent::LocalFailed(e),
            }),
            SourceAction::SendFinish {
                final_iteration,
                data_frames,
            } => Some(self.send_finish(FrameType::Finish, final_iteration, data_frames)),
            SourceAction::SwitchToPostcopy {
                final_iteration,
                data_frames,
            } => {
                self.postcopy_switched = true;
                Some(self.send_finish(FrameType::PostcopySwitch, final_iteration, data_frames))
            }
            SourceAction::ComputeDigest => {
                // The destination hashes its copy while we hash ours.
                let start = Instant::now();
                let total = self.source.layout().total_pages();
                let digest = match self.m.config.verification {
                    // After a switch to post-copy the destination holds the pages as last sent,
                    // by design: re-reading memory would differ on every page left to post-copy.
                    _ if self.postcopy_switched => self.s.hashes.digest(self.digest_threads),
                    Verification::SentPages => self.s.hashes.digest(self.digest_threads),
                    Verification::FullMemory => {
                        let source = self.source;
                        memory_digest(total, self.digest_threads, &|p| source.page_digest(p))
                    }
                };
                self.s
                    .links
                    .dialer
                    .latency
                    .record(LatencyOp::Digest, start.elapsed());
                Some(SourceEvent::DigestComputed {
                    digest,
                    elapsed: start.elapsed(),
                })
            }
            SourceAction::RecordHandover => {
                Some(SourceEvent::HandoverRecorded(vm.record_handover()))
            }
            SourceAction::SendCommit { digest } => {
                let out = Outgoing {
                    frame_type: FrameType::Commit,
                    payload: Payload::Owned(DigestMessage { digest }.encode().to_vec()),
                };
                let sent = match self.control_lane {
                    Some(id) => self.s.links.lanes.send_on(id, out),
                    None => self.s.links.lanes.send_control(out).map(|_| ()),
                };
                sent.err().map(SourceEvent::LocalFailed)
            }
            SourceAction::ResumeGuest => {
                vm.resume();
                self.m.bandwidth.set_guest_paused(false);
                None
            }
            // The loop returns on Finished before it gets here.
            other => {
                tracing::debug!(action = ?other, "an action this shell does not carry out");
                None
            }
        };
        if let Some(ev) = event {
            let telemetry = matches!(ev, SourceEvent::Telemetry(_));
            machine.handle(Instant::now(), ev);
            if telemetry {
                // A migration sharing an uplink gives back what its path cannot carry.
                if let Some(goodput) = machine.link_forecast() {
                    self.m.bandwidth.report_forecast(goodput);
                }
            }
        }
    }

    /// Encodes a batch and queues its chunks; a chunk no lane takes waits with the orphans.
    fn send_batch(
        &mut self,
        machine: &mut SourceMachine,
        iteration: u32,
        pages: &BatchPages,
        first_chunk: u64,
    ) {
        let per_chunk = self.m.config.pages_per_chunk;
        self.storage.clear();
        pages.extend_into(&mut self.storage);
        let chunks: Vec<&[u64]> = self.storage.chunks(per_chunk).collect();
        let content_before = sent_content_pages(&self.s.encoder.stats());
        let encoding = Instant::now();
        let bufs = match self.s.encoder.encode_batch(
            iteration,
            &chunks,
            self.source,
            &self.s.pool,
            Some(&self.s.hashes),
        ) {
            Ok(b) => b,
            Err(e) => return machine.handle(Instant::now(), SourceEvent::LocalFailed(e)),
        };
        self.s
            .links
            .dialer
            .latency
            .record(LatencyOp::Encode, encoding.elapsed());
        let content_pages = sent_content_pages(&self.s.encoder.stats()) - content_before;
        let (mut wire_bytes, count) = (0u64, bufs.len() as u64);
        let mut bounced = Vec::new();
        for (i, buf) in bufs.into_iter().enumerate() {
            let buf = self.shrink(buf);
            wire_bytes += buf.len() as u64;
            let chunk = DataChunk {
                id: first_chunk + i as u64,
                buf,
            };
            if let Err(back) = self.s.links.lanes.send_data(chunk) {
                bounced.push(back);
            }
        }
        if !bounced.is_empty() {
            // Only when no stream is left: the machine reconnects, then these are re-sent.
            self.s.links.lanes.hold_unsent(bounced);
        }
        let now = Instant::now();
        self.m.bandwidth.add_sent(wire_bytes);
        machine.handle(
            now,
            SourceEvent::BatchSent {
                chunks: count,
                wire_bytes,
                content_pages,
            },
        );
        machine.handle(now, SourceEvent::Flow(self.flow()));
    }

    /// Re-sends the chunks of lost streams on the live ones.
    fn resend_orphans(&mut self) -> SourceEvent {
        let lanes = &mut self.s.links.lanes;
        let (mut chunks, mut bytes) = (0, 0);
        let mut back = Vec::new();
        for chunk in lanes.take_orphans() {
            let len = chunk.wire_len();
            match lanes.resend(chunk) {
                Ok(_) => {
                    chunks += 1;
                    bytes += len;
                }
                Err(c) => back.push(c),
            }
        }
        // Every stream failed again while re-sending: these wait for the next recovery.
        lanes.requeue_orphans(back);
        SourceEvent::Resent { chunks, bytes }
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
        match self.s.pool.acquire_timeout(buf.len(), Duration::ZERO) {
            Ok(Some(mut small)) => {
                small.extend_from_slice(&buf);
                small
            }
            _ => buf,
        }
    }

    /// Sends Finish, or PostcopySwitch (the same payload), on the control stream, which then
    /// carries the rest of the handover.
    fn send_finish(
        &mut self,
        frame_type: FrameType,
        final_iteration: u32,
        data_frames: u64,
    ) -> SourceEvent {
        let sent = self.s.links.lanes.send_control(Outgoing {
            frame_type,
            payload: Payload::Owned(
                Finish {
                    final_iteration,
                    data_frames,
                }
                .encode(),
            ),
        });
        match sent {
            Ok(lane) => {
                self.control_lane = Some(lane);
                SourceEvent::FinishSent { lane }
            }
            Err(e) => SourceEvent::LocalFailed(e),
        }
    }

    fn report(&mut self, done: Completed) -> MigrationReport {
        let s = &self.s;
        let total_time = s.t0.elapsed().as_secs_f64();
        let memory_bytes = self.source.layout().total_bytes();
        let stream_telemetry = sample_streams(&s.links.lanes, self.m.metrics.as_ref());
        self.m.telemetry.publish(stream_telemetry.clone());
        if let Some(mt) = &self.m.metrics {
            mt.downtime.set(done.downtime.as_secs_f64());
            mt.publish_latency(&s.links.dialer.latency);
            self.published.publish(
                mt,
                s.encoder.stats(),
                &s.links.lanes,
                &s.pool,
                done.resilience,
            );
        }
        for st in s.links.lanes.stats() {
            tracing::debug!(
                stream = st.id,
                frames = st.frames,
                bytes = st.bytes,
                "stream totals"
            );
        }
        MigrationReport {
            session_id: format!("{:016x}", s.links.session_id),
            total_ms: total_time * 1e3,
            downtime_ms: done.downtime.as_secs_f64() * 1e3,
            predicted_downtime_ms: done.predicted_downtime.as_secs_f64() * 1e3,
            digest_ms: done.digest_elapsed.as_secs_f64() * 1e3,
            iterations: done.passes.len() as u32,
            converged: done.stop_reason == dwcp_proto::source::StopReason::Converged,
            stop_reason: done.stop_reason.as_str().to_string(),
            verification: self.m.config.verification,
            memory_bytes,
            logical_bytes: done.logical_bytes,
            wire_bytes: s.links.lanes.wire_bytes(),
            logical_throughput_bps: memory_bytes as f64 / total_time,
            digest_match: true,
            digest: hex(done.digest),
            streams: s.links.lanes.live(),
            peak_streams: done.peak_streams,
            mode: done.mode,
            rtt_ms: s.rtt * 1e3,
            congestion: s.congestion.clone(),
            security: self.m.security.mode(),
            identity_announced: s.identity_announced,
            resilience: done.resilience,
            stream_telemetry,
            encode: s.encoder.stats(),
            pool: s.pool.stats(),
            passes: done.passes,
            latency: s.links.dialer.latency.report(),
            postcopy: done.postcopy.map(|h| crate::report::PostcopyPages {
                count: h.pages.len() as u64,
                why: h.why,
                pages: h.pages,
            }),
        }
    }
}
