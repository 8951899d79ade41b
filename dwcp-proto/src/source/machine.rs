//! The source machine's states and its event dispatch; the data path is in `datapath.rs`, stream
//! management and recovery in `recovery.rs`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use dwcp_core::error::Error;
use dwcp_tcp::Mode;

use super::cap::Cap;
use super::convergence::{Convergence, LinkEstimate, StopReason};
use super::events::{
    Completed, Failure, Flow, PassPages, PostcopyHandoff, SourceAction, SourceEvent, SourceParams,
};
use super::streams::{Backoff, StreamCount};
use crate::report::{IterationReport, ResilienceReport};
use dwcp_pba::predict::LinkPredictor;
use dwcp_pba::sample::LinkAggregator;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Precopy,
    AwaitingDirty,
    Pausing,
    FinalDirty,
    FinalPass,
    FinishSending,
    AwaitingVerdict,
    RecordingHandover,
    AwaitingCommitAck,
    Done,
}

/// What the data path waits for, when it cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stall {
    Budget,
    Acks,
}

#[derive(Debug)]
pub(super) struct PassState {
    pub(super) iteration: u32,
    pub(super) pages: PassPages,
    /// Pages handed to the shell in batches.
    pub(super) requested: u64,
    pub(super) started: Instant,
    pub(super) wire_bytes: u64,
    pub(super) content_pages: u64,
}

#[derive(Debug)]
pub(super) enum Recovery {
    None,
    /// [`SourceAction::ResendOrphans`] is out.
    Resending,
    /// Every stream is down.
    Reconnecting {
        backoff: Backoff,
        due: Instant,
        /// An attempt is out.
        attempting: bool,
        last_error: String,
    },
}

/// The source's decisions. See the [module documentation](crate::source).
#[derive(Debug)]
pub struct SourceMachine {
    pub(super) p: SourceParams,
    pub(super) phase: Phase,
    pub(super) actions: VecDeque<SourceAction>,
    pub(super) pass: PassState,
    /// A [`SourceAction::SendBatch`] is out and [`SourceEvent::BatchSent`] has not come back.
    pub(super) batch_out: bool,
    /// A [`SourceEvent::Flow`] came after the last batch: the budget figures are current.
    pub(super) flow_fresh: bool,
    pub(super) flow: Flow,
    /// When the data path last made progress while it waited, and for what it waits.
    pub(super) stalled: Option<(Instant, Stall)>,
    pub(super) next_chunk: u64,
    pub(super) chunk_bytes: u64,
    pub(super) logical_bytes: u64,
    pub(super) passes: Vec<IterationReport>,
    pub(super) convergence: Convergence,
    pub(super) stop_reason: Option<StopReason>,
    /// Pre-copy gave up and ends in post-copy: why, and (once the guest is paused) the pages
    /// left to it.
    pub(super) postcopy_why: Option<String>,
    pub(super) postcopy_pages: Option<std::sync::Arc<[u64]>>,
    /// The last pre-copy pass's dirty pages, sent in the final pass.
    pub(super) carried: Vec<u64>,
    pub(super) streams: StreamCount,
    /// Streams taking chunks, by index.
    pub(super) live: Vec<u16>,
    pub(super) pending_joins: usize,
    pub(super) next_index: u16,
    pub(super) peak_streams: usize,
    pub(super) recovery: Recovery,
    pub(super) resilience: ResilienceReport,
    pub(super) link: LinkEstimate,
    /// PBA: the streams' telemetry summed into link samples, and the link's forecast.
    pub(super) pba_streams: LinkAggregator,
    pub(super) pba: LinkPredictor,
    /// Time zero of the samples fed to PBA.
    pub(super) epoch: Instant,
    /// The last telemetry: when, and the summed delivery rate.
    pub(super) last_link: Option<(Instant, f64)>,
    pub(super) telemetry_out: bool,
    pub(super) next_telemetry: Instant,
    pub(super) paused_at: Option<Instant>,
    pub(super) control_lane: Option<u16>,
    pub(super) our_digest: Option<(u128, Duration)>,
    pub(super) their_digest: Option<u128>,
    pub(super) deadline: Option<Instant>,
    pub(super) commit_sent: bool,
    /// The operator cancelled while the handover was being recorded: the record's answer decides
    /// whether the cancel can still be honoured.
    pub(super) cancel_pending: bool,
    /// The bandwidth cap, if any.
    pub(super) cap: Option<Cap>,
    /// What the current pass was predicted to take when it began.
    pub(super) pass_prediction: Duration,
    /// The downtime predicted when pre-copy ended.
    pub(super) predicted_downtime: Duration,
    pub(super) meter: super::progress::ProgressMeter,
}

impl SourceMachine {
    /// A migration whose stream 0 is open and whose session the destination accepted at `now`.
    pub fn new(params: SourceParams, now: Instant) -> Self {
        let streams = StreamCount::new(
            params.streams,
            params.mode,
            params.mode_configured,
            params.convergence.rtt,
            now,
        );
        let pass = PassState {
            iteration: 0,
            pages: PassPages::All(params.total_pages),
            requested: 0,
            started: now,
            wire_bytes: 0,
            content_pages: 0,
        };
        let mut m = Self {
            phase: Phase::Precopy,
            actions: VecDeque::new(),
            batch_out: false,
            flow_fresh: false,
            flow: Flow::default(),
            stalled: None,
            next_chunk: 0,
            chunk_bytes: 0,
            logical_bytes: 0,
            passes: Vec::new(),
            convergence: Convergence::new(params.convergence),
            stop_reason: None,
            postcopy_why: None,
            postcopy_pages: None,
            carried: Vec::new(),
            streams,
            live: vec![0],
            pending_joins: 0,
            next_index: 1,
            peak_streams: 1,
            recovery: Recovery::None,
            resilience: ResilienceReport::default(),
            link: LinkEstimate::default(),
            pba_streams: LinkAggregator::new(),
            pba: LinkPredictor::new(),
            epoch: now,
            last_link: None,
            telemetry_out: false,
            next_telemetry: now + params.telemetry_interval,
            paused_at: None,
            control_lane: None,
            our_digest: None,
            their_digest: None,
            deadline: None,
            commit_sent: false,
            cancel_pending: false,
            pass_prediction: Duration::ZERO,
            predicted_downtime: Duration::ZERO,
            meter: Default::default(),
            cap: params.max_bandwidth.and_then(|rate| {
                Cap::new(rate, now)
                    .inspect_err(|e| tracing::warn!(error = %e, "bandwidth cap ignored"))
                    .ok()
            }),
            pass,
            p: params,
        };
        m.actions.push_back(SourceAction::StartDirtyLog);
        m.actions.push_back(SourceAction::BeginPass {
            iteration: 0,
            pages: m.pass.pages.clone(),
        });
        // Data flows on stream 0 while the others connect and authenticate in the background.
        for _ in 1..m.p.streams.initial {
            m.open_stream();
        }
        m
    }

    /// The next action to carry out, if any.
    pub fn poll_action(&mut self) -> Option<SourceAction> {
        self.actions.pop_front()
    }

    /// Whether actions are waiting to be polled.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    /// When to feed [`SourceEvent::Tick`] at the latest, if the machine waits for time.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::Done {
            return None;
        }
        let mut next: Option<Instant> = self.deadline;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some((since, _)) = self.stalled {
            consider(since + self.p.io_timeout);
        }
        if let Recovery::Reconnecting {
            due,
            attempting: false,
            ..
        } = &self.recovery
        {
            consider(*due);
        }
        if self.sending() {
            consider(self.next_telemetry);
            if let Some(t) = self.cap.as_ref().and_then(Cap::not_before) {
                consider(t);
            }
            if self.phase == Phase::Precopy {
                if let Some(end) = self.streams.window_end() {
                    consider(end);
                }
            }
        }
        next
    }

    /// The state's name, as in the diagram of the module documentation (for logs and coverage).
    pub fn state_name(&self) -> &'static str {
        match self.phase {
            Phase::Precopy => "Precopy",
            Phase::AwaitingDirty => "AwaitingDirty",
            Phase::Pausing => "Pausing",
            Phase::FinalDirty => "FinalDirty",
            Phase::FinalPass => "FinalPass",
            Phase::FinishSending => "FinishSending",
            Phase::AwaitingVerdict => "AwaitingVerdict",
            Phase::RecordingHandover => "RecordingHandover",
            Phase::AwaitingCommitAck => "AwaitingCommitAck",
            Phase::Done => "Done",
        }
    }

    /// Every state's name.
    pub const STATES: [&'static str; 9] = [
        "Precopy",
        "AwaitingDirty",
        "Pausing",
        "FinalDirty",
        "FinalPass",
        "FinishSending",
        "AwaitingVerdict",
        "AwaitingCommitAck",
        "Done",
    ];

    /// Whether a reconnection is under way (every stream was lost).
    pub fn is_reconnecting(&self) -> bool {
        matches!(self.recovery, Recovery::Reconnecting { .. })
    }

    /// Whether the migration has ended.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Whether the machine waits for the destination's handover frames (not for acknowledgements).
    pub fn awaits_peer(&self) -> bool {
        matches!(
            self.phase,
            Phase::AwaitingVerdict | Phase::AwaitingCommitAck
        )
    }

    /// Whether the guest is paused right now (as far as the machine asked).
    pub fn guest_paused(&self) -> bool {
        self.paused_at.is_some()
    }

    /// The transport mode (the bandwidth probe may change it).
    pub fn mode(&self) -> Mode {
        self.streams.mode()
    }

    /// Streams taking chunks now, by index.
    pub fn live_streams(&self) -> &[u16] {
        &self.live
    }

    /// Streams being opened in the background.
    pub fn pending_joins(&self) -> usize {
        self.pending_joins
    }

    /// Passes so far.
    pub fn passes(&self) -> &[IterationReport] {
        &self.passes
    }

    /// Stream failures so far.
    pub fn resilience(&self) -> ResilienceReport {
        self.resilience
    }

    /// Guest bytes covered by all passes so far.
    pub fn logical_bytes(&self) -> u64 {
        self.logical_bytes
    }

    /// Chunk bytes sent so far.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    /// Feeds one event that happened at `now`.
    pub fn handle(&mut self, now: Instant, event: SourceEvent) {
        if self.phase == Phase::Done {
            return;
        }
        match event {
            SourceEvent::Tick => {}
            SourceEvent::Flow(f) => self.on_flow(now, f),
            SourceEvent::BatchSent {
                chunks,
                wire_bytes,
                content_pages,
            } => self.on_batch_sent(now, chunks, wire_bytes, content_pages),
            SourceEvent::Telemetry(samples) => self.on_telemetry(now, &samples),
            SourceEvent::StreamJoined { index } => self.on_joined(index),
            SourceEvent::JoinFailed { index, error } => {
                self.pending_joins = self.pending_joins.saturating_sub(1);
                match error {
                    e @ Error::Peer { .. } => return self.fail(e),
                    e => tracing::warn!(stream = index, error = %e, "a stream could not join"),
                }
            }
            SourceEvent::StreamsLost { lost } => {
                if let Some(control) = self.control_lane {
                    if lost.contains(&control) {
                        return self.fail(Error::Protocol(format!(
                            "the stream carrying the handover failed while waiting for {}",
                            self.awaited()
                        )));
                    }
                }
                self.resilience.streams_lost += lost.len() as u64;
                self.live.retain(|i| !lost.contains(i));
                self.start_recovery(now);
            }
            SourceEvent::Resent { chunks, bytes } => {
                self.resilience.resent_chunks += chunks;
                self.resilience.resent_bytes += bytes;
                if let Some(cap) = &mut self.cap {
                    cap.charge(now, bytes);
                }
                if matches!(self.recovery, Recovery::Resending) {
                    self.recovery = Recovery::None;
                }
                self.top_up_streams();
            }
            SourceEvent::Reconnected { index } => {
                self.resilience.reconnects += 1;
                self.live.push(index);
                self.peak_streams = self.peak_streams.max(self.live.len());
                tracing::info!(stream = index, "reconnected; resuming");
                self.recovery = Recovery::Resending;
                self.actions.push_back(SourceAction::ResendOrphans);
            }
            SourceEvent::ReconnectFailed(error) => self.on_reconnect_failed(now, error),
            SourceEvent::Dirty(pages) => self.on_dirty(now, pages),
            SourceEvent::ThrottleRefused => self.convergence.throttle_unavailable(),
            SourceEvent::Paused => {
                if self.phase != Phase::Pausing {
                    return self.fail(Error::Protocol("the guest paused unasked".into()));
                }
                self.paused_at = Some(now);
                self.phase = Phase::FinalDirty;
                self.actions.push_back(SourceAction::TakeDirty);
            }
            SourceEvent::FinishSent { lane } => {
                self.control_lane = Some(lane);
                self.phase = Phase::AwaitingVerdict;
                self.actions.push_back(SourceAction::ComputeDigest);
            }
            SourceEvent::DigestComputed { digest, elapsed } => {
                self.our_digest = Some((digest, elapsed));
                self.deadline = Some(now + self.p.io_timeout);
            }
            SourceEvent::Verdict(_) if self.phase == Phase::AwaitingCommitAck => {
                return self.fail(Error::HandoverUnconfirmed(
                    "the destination answered the commit with something else".into(),
                ));
            }
            SourceEvent::Verdict(d) => {
                if self.phase != Phase::AwaitingVerdict || self.their_digest.is_some() {
                    return self.fail(Error::Protocol(
                        "destination sent a verdict outside the handover".into(),
                    ));
                }
                self.their_digest = Some(d);
            }
            SourceEvent::HandoverRecorded(decision) => {
                self.handover_recorded(now, decision);
                if self.phase == Phase::Done {
                    return;
                }
            }
            SourceEvent::CommitAck => {
                if self.phase != Phase::AwaitingCommitAck {
                    return self.fail(Error::Protocol(
                        "destination confirmed a handover that was not committed".into(),
                    ));
                }
                return self.complete(now);
            }
            SourceEvent::PeerFailed(e) | SourceEvent::LocalFailed(e) => return self.fail(e),
            SourceEvent::Cancel => self.on_cancel(),
            SourceEvent::SetMaxBandwidth(rate) => self.set_cap(now, rate),
        }
        self.drive(now);
    }

    /// The operator's cancel is honoured until the point of no return: the new owner recorded, or
    /// the commit sent. From there on the destination may already run the VM, so resuming here
    /// could run it twice; the migration goes on to its end instead, as if the cancel came late.
    fn on_cancel(&mut self) {
        if self.commit_sent {
            tracing::warn!(
                "cancel refused: the commit was sent and the destination may run the VM already"
            );
            return;
        }
        if self.phase == Phase::RecordingHandover {
            // The registry call is out and may record the destination as the owner: only its
            // answer says whether resuming here is still safe.
            tracing::info!("cancel asked while the handover is recorded; its answer decides");
            self.cancel_pending = true;
            return;
        }
        self.fail(Error::Cancelled);
    }

    fn set_cap(&mut self, now: Instant, rate: Option<f64>) {
        let Some(rate) = rate else {
            self.cap = None;
            return;
        };
        let changed = match &mut self.cap {
            Some(cap) => cap.set_rate(now, rate),
            None => Cap::new(rate, now).map(|c| self.cap = Some(c)),
        };
        match changed {
            Ok(()) => tracing::info!(bytes_per_sec = rate, "bandwidth cap set"),
            Err(e) => tracing::warn!(error = %e, "bandwidth cap change ignored"),
        }
    }

    pub(super) fn awaited(&self) -> &'static str {
        match self.phase {
            Phase::AwaitingCommitAck => "the destination's handover confirmation",
            _ => "the destination's digest",
        }
    }

    pub(super) fn sending(&self) -> bool {
        matches!(self.phase, Phase::Precopy | Phase::FinalPass)
    }

    pub(super) fn try_commit(&mut self, now: Instant) {
        let (Some((ours, _)), Some(theirs)) = (self.our_digest, self.their_digest) else {
            return;
        };
        if ours != theirs {
            return self.fail(Error::DigestMismatch {
                source_digest: ours,
                destination_digest: theirs,
            });
        }
        if self.p.record_handover {
            // No deadline: the shell bounds the registry call, and the destination, waiting for
            // the commit, bounds it again with its own timeout.
            self.phase = Phase::RecordingHandover;
            self.deadline = None;
            self.actions.push_back(SourceAction::RecordHandover);
            return;
        }
        self.send_commit(now, ours);
    }

    fn send_commit(&mut self, now: Instant, digest: u128) {
        self.phase = Phase::AwaitingCommitAck;
        self.commit_sent = true;
        self.deadline = Some(now + self.p.io_timeout);
        self.actions.push_back(SourceAction::SendCommit { digest });
    }

    fn handover_recorded(&mut self, now: Instant, decision: dwcp_core::HandoverDecision) {
        use dwcp_core::HandoverDecision;
        if self.phase != Phase::RecordingHandover {
            return self.fail(Error::Protocol(
                "a handover record arrived outside the handover".into(),
            ));
        }
        match decision {
            HandoverDecision::Recorded => {
                if self.cancel_pending {
                    tracing::warn!(
                        "cancel refused: the registry names the destination as the owner already"
                    );
                }
                let (digest, _) = self.our_digest.unwrap_or_default();
                self.send_commit(now, digest);
            }
            HandoverDecision::Refused(reason) if self.cancel_pending => {
                tracing::info!(%reason, "the handover record was refused after a cancel");
                self.fail(Error::Cancelled)
            }
            HandoverDecision::Refused(reason) => self.fail(Error::HandoverRefused(reason)),
            HandoverDecision::Unknown(reason) => {
                // Whoever the registry names owns the VM now; resuming here could run it twice,
                // so the guest stays paused. No Commit went out: the destination is told the
                // session is over (else it waits out its timeout) and its side asks the registry.
                self.phase = Phase::Done;
                self.actions.push_back(SourceAction::Finished(Err(Failure {
                    error: Error::HandoverUnconfirmed(format!(
                        "the cluster registry did not say whether the new owner was recorded: {reason}"
                    )),
                    tell_peer: true,
                })));
            }
        }
    }

    pub(super) fn complete(&mut self, now: Instant) {
        let (digest, digest_elapsed) = self.our_digest.unwrap_or_default();
        let downtime = self
            .paused_at
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        self.phase = Phase::Done;
        self.actions.push_back(SourceAction::Finished(Ok(Completed {
            stop_reason: self.stop_reason.unwrap_or(StopReason::Converged),
            passes: self.passes.clone(),
            downtime,
            predicted_downtime: self.predicted_downtime,
            digest,
            digest_elapsed,
            resilience: self.resilience,
            peak_streams: self.peak_streams,
            mode: self.streams.mode(),
            logical_bytes: self.logical_bytes,
            chunk_bytes: self.chunk_bytes,
            data_frames: self.next_chunk,
            postcopy: self.postcopy_pages.clone().map(|pages| PostcopyHandoff {
                pages,
                why: self.postcopy_why.clone().unwrap_or_default(),
            }),
        })));
    }

    pub(super) fn fail(&mut self, error: Error) {
        if self.phase == Phase::Done {
            return;
        }
        let error = if self.commit_sent {
            match error {
                e @ Error::HandoverUnconfirmed(_) => e,
                e => Error::HandoverUnconfirmed(format!(
                    "no confirmation after the commit was sent: {e}"
                )),
            }
        } else {
            error
        };
        if !self.commit_sent {
            // A pause asked for but not carried out yet is withdrawn; one carried out but not yet
            // confirmed is undone like a confirmed one (the shell carries out actions in order).
            let pause_queued = self
                .actions
                .iter()
                .any(|a| matches!(a, SourceAction::PauseGuest));
            // Nothing queued before the failure may start new work once the shell polls it: no
            // batch, stream, pause or handover frame after a cancel. Reports still go out.
            self.actions
                .retain(|a| matches!(a, SourceAction::Progress(_) | SourceAction::PassDone(_)));
            let pause_out = self.phase == Phase::Pausing && !pause_queued;
            if self.paused_at.take().is_some() || pause_out {
                tracing::warn!(error = %error, "migration failed after the pause; resuming the source guest");
                self.actions.push_back(SourceAction::ResumeGuest);
            }
        }
        let tell_peer = !matches!(
            error,
            Error::Peer { .. } | Error::HandoverUnconfirmed(_) | Error::StreamsLost { .. }
        );
        self.phase = Phase::Done;
        self.actions
            .push_back(SourceAction::Finished(Err(Failure { error, tell_peer })));
    }
}
