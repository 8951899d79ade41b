//! The source machine's data path: batches within the in-flight budget, the end of a pass, the
//! dirty set, and the convergence decision that follows it.

use std::time::Instant;

use dwcp_core::error::Error;
use dwcp_core::memory::PAGE_SIZE;

use super::convergence::{LinkSample, PassDecision, PassMeasurement, StopReason};
use super::events::{Flow, PassPages, SourceAction};
use super::machine::{PassState, Phase, Recovery, SourceMachine, Stall};
use crate::report::IterationReport;
use dwcp_pba::sample::StreamSample;

/// Link observations PBA needs before the convergence decision trusts its forecast (about a
/// second of telemetry: one sample says little about a link).
const MIN_FORECAST_OBSERVATIONS: u32 = 4;

impl SourceMachine {
    pub(super) fn on_flow(&mut self, now: Instant, f: Flow) {
        if let Some((_, why)) = self.stalled {
            if f.outstanding_chunks != self.flow.outstanding_chunks {
                self.stalled = Some((now, why));
            }
        }
        self.flow = f;
        self.flow_fresh = true;
    }

    pub(super) fn on_batch_sent(
        &mut self,
        now: Instant,
        chunks: u64,
        wire_bytes: u64,
        content_pages: u64,
    ) {
        if !self.batch_out {
            return self.fail(Error::Protocol("a batch was sent unasked".into()));
        }
        self.batch_out = false;
        self.flow_fresh = false;
        self.next_chunk += chunks;
        if let Some(cap) = &mut self.cap {
            cap.charge(now, wire_bytes);
        }
        self.chunk_bytes += wire_bytes;
        self.pass.wire_bytes += wire_bytes;
        self.pass.content_pages += content_pages;
        let progress = self.progress(now);
        self.actions.push_back(SourceAction::Progress(progress));
    }

    /// PBA's forecast of the link's goodput over the next second, bytes per second, once it has
    /// seen enough telemetry to trust it.
    pub fn link_forecast(&self) -> Option<f64> {
        let f = self.pba.forecast();
        (f.observations >= MIN_FORECAST_OBSERVATIONS && f.goodput_1s > 0.0).then_some(f.goodput_1s)
    }

    pub(super) fn on_telemetry(&mut self, now: Instant, samples: &[LinkSample]) {
        self.telemetry_out = false;
        let rate: f64 = samples
            .iter()
            .map(|s| s.delivery_rate_bps)
            .filter(|r| r.is_finite() && *r > 0.0)
            .sum();
        self.last_link = Some((now, rate));
        let streams: Vec<StreamSample> = samples
            .iter()
            .map(|s| StreamSample {
                stream: s.stream,
                acked_bytes: s.bytes_acked,
                rtt: s.rtt_s,
                app_limited: s.app_limited,
                unsent_bytes: s.unsent_bytes,
            })
            .collect();
        let at = now.saturating_duration_since(self.epoch).as_secs_f64();
        let raw = self.pba_streams.push(at, &streams);
        if let Some(observation) = self.pba.push(raw) {
            self.streams.observe_link(&observation);
        }
        // The encoder picks the codec that keeps up with the link at the least CPU. How fast the
        // link drains is PBA's forecast once it has one, the kernel's summed delivery rate before;
        // either only after the streams' start-up (see LinkEstimate).
        if let Some(link) = self.link.update(samples) {
            let bytes_per_sec = self.link_forecast().unwrap_or(link);
            tracing::debug!(
                hint_mbit = bytes_per_sec * 8e-6,
                delivery_rate_mbit = link * 8e-6,
                "codec hint"
            );
            self.actions.push_back(SourceAction::SetCodecHint {
                bytes_per_sec: bytes_per_sec as u64,
            });
        }
    }

    pub(super) fn on_dirty(&mut self, now: Instant, mut pages: Vec<u64>) {
        pages.sort_unstable();
        pages.dedup();
        // A page beyond the guest's memory is a dirty log's bug; never send it.
        if pages.last().is_some_and(|&p| p >= self.p.total_pages) {
            return self.fail(Error::Protocol(format!(
                "the dirty log reported page {} of a guest with {} pages",
                pages.last().copied().unwrap_or_default(),
                self.p.total_pages
            )));
        }
        match self.phase {
            Phase::AwaitingDirty => {
                let m = PassMeasurement {
                    iteration: self.pass.iteration,
                    pages: self.pass.pages.len(),
                    content_pages: self.pass.content_pages,
                    elapsed: now.saturating_duration_since(self.pass.started),
                    dirtied: pages.len() as u64,
                    wire_bytes: self.pass.wire_bytes,
                    link_forecast: self.link_forecast(),
                };
                let (decision, predicted) = self.convergence.decide(&m);
                self.meter.pass_measured(&m);
                let (limit, throttle) = self.convergence.aids_in_force();
                let report = IterationReport {
                    iteration: m.iteration,
                    pages: m.pages,
                    wire_bytes: self.pass.wire_bytes,
                    duration_ms: m.elapsed.as_secs_f64() * 1e3,
                    dirtied_pages: m.dirtied,
                    predicted_downtime_ms: predicted.as_secs_f64() * 1e3,
                    predicted_duration_ms: self.pass_prediction.as_secs_f64() * 1e3,
                    link_forecast_bps: m.link_forecast.unwrap_or(0.0),
                    downtime_limit_ms: limit.as_secs_f64() * 1e3,
                    throttle_percent: throttle,
                };
                self.pass_prediction = self.convergence.predicted_next_pass(&m);
                self.predicted_downtime = predicted;
                self.passes.push(report);
                self.actions.push_back(SourceAction::PassDone(report));
                match decision {
                    PassDecision::Stop(r) => {
                        if r != StopReason::Converged {
                            tracing::warn!(
                                reason = r.as_str(),
                                "stop-and-copy without meeting the downtime limit"
                            );
                        }
                        self.stop_reason = Some(r);
                        // What the guest dirtied during the last pass goes in the final one, with
                        // what it dirties until the pause.
                        self.carried = pages;
                        self.phase = Phase::Pausing;
                        self.actions.push_back(SourceAction::PauseGuest);
                    }
                    PassDecision::Continue => {
                        self.begin_pass(now, self.pass.iteration + 1, pages, Phase::Precopy)
                    }
                    PassDecision::Throttle(percent) => {
                        tracing::info!(percent, "pre-copy stalled: throttling the guest");
                        self.actions
                            .push_back(SourceAction::ThrottleGuest { percent });
                        self.begin_pass(now, self.pass.iteration + 1, pages, Phase::Precopy)
                    }
                    PassDecision::Fail(error @ Error::NotConverged { .. }) if self.p.postcopy => {
                        tracing::warn!(error = %error, "pre-copy cannot converge: switching to post-copy");
                        self.postcopy_why = Some(error.to_string());
                        self.stop_reason = Some(StopReason::Postcopy);
                        self.carried = pages;
                        self.phase = Phase::Pausing;
                        self.actions.push_back(SourceAction::PauseGuest);
                    }
                    PassDecision::Fail(error) => self.fail(error),
                }
            }
            Phase::FinalDirty => {
                let mut all = std::mem::take(&mut self.carried);
                all.extend_from_slice(&pages);
                all.sort_unstable();
                all.dedup();
                if self.postcopy_why.is_some() {
                    // Post-copy moves these; the final pass only waits until every chunk already
                    // sent is acknowledged, so that nothing of pre-copy lands after the switch.
                    self.postcopy_pages = Some(all.into());
                    return self.begin_pass(
                        now,
                        self.pass.iteration + 1,
                        Vec::new(),
                        Phase::FinalPass,
                    );
                }
                self.begin_pass(now, self.pass.iteration + 1, all, Phase::FinalPass)
            }
            _ => self.fail(Error::Protocol("dirty pages handed over unasked".into())),
        }
    }

    pub(super) fn begin_pass(
        &mut self,
        now: Instant,
        iteration: u32,
        pages: Vec<u64>,
        phase: Phase,
    ) {
        self.pass = PassState {
            iteration,
            pages: PassPages::List(pages.into()),
            requested: 0,
            started: now,
            wire_bytes: 0,
            content_pages: 0,
        };
        self.phase = phase;
        self.actions.push_back(SourceAction::BeginPass {
            iteration,
            pages: self.pass.pages.clone(),
        });
    }

    /// Moves the data path on as far as it can at `now`.
    pub(super) fn drive(&mut self, now: Instant) {
        if self.phase == Phase::Done {
            return;
        }
        if let Some((since, why)) = self.stalled {
            if now.saturating_duration_since(since) >= self.p.io_timeout {
                return self.fail(Error::Timeout(match why {
                    Stall::Budget => {
                        "the destination stopped acknowledging data (the buffer pool stayed full)"
                            .into()
                    }
                    Stall::Acks => "the destination stopped acknowledging data".into(),
                }));
            }
        }
        if let Some(deadline) = self.deadline {
            if now >= deadline {
                return self.fail(Error::Timeout(format!("waiting for {}", self.awaited())));
            }
        }
        if self.phase == Phase::AwaitingVerdict {
            return self.try_commit(now);
        }
        if !self.sending() {
            return;
        }
        self.reconnect_if_due(now);
        if now >= self.next_telemetry && !self.telemetry_out {
            self.next_telemetry = now + self.p.telemetry_interval;
            self.telemetry_out = true;
            self.actions.push_back(SourceAction::SampleTelemetry);
        }
        if !matches!(self.recovery, Recovery::None) {
            return;
        }
        if self.phase == Phase::Precopy {
            self.adapt_streams(now);
        }
        if self.batch_out || !self.flow_fresh {
            return;
        }
        let total = self.pass.pages.len();
        if self.pass.requested < total {
            if self.cap.as_ref().is_some_and(|c| !c.ready(now)) {
                // Waiting for the cap is not the destination's silence.
                self.stalled = None;
                return;
            }
            let per_chunk = self.p.pages_per_chunk.max(1);
            let chunks = match &self.cap {
                Some(c) => c.batch_chunks(per_chunk * PAGE_SIZE as u64, self.p.chunks_per_batch),
                None => self.p.chunks_per_batch.max(1),
            };
            let n = (per_chunk * chunks).min(total - self.pass.requested);
            let need = n.div_ceil(per_chunk) * self.p.chunk_buffer_bytes;
            if self.flow.pool_free_bytes < need {
                return self.stall(now, Stall::Budget);
            }
            self.stalled = None;
            let pages = self.pass.pages.slice(self.pass.requested, n);
            self.pass.requested += n;
            self.logical_bytes += n * PAGE_SIZE as u64;
            self.batch_out = true;
            self.actions.push_back(SourceAction::SendBatch {
                iteration: self.pass.iteration,
                pages,
                first_chunk: self.next_chunk,
            });
            return;
        }
        // Measure delivery, not queueing: the pass ends when the destination has applied all of it.
        if self.flow.outstanding_chunks > 0 {
            return self.stall(now, Stall::Acks);
        }
        self.stalled = None;
        // Only now may later passes encode deltas against (and refer to) what this pass sent.
        self.actions.push_back(SourceAction::EndPass {
            iteration: self.pass.iteration,
        });
        if self.phase == Phase::Precopy {
            self.phase = Phase::AwaitingDirty;
            self.actions.push_back(SourceAction::TakeDirty);
            return;
        }
        let (limit, throttle) = self.convergence.aids_in_force();
        self.passes.push(IterationReport {
            iteration: self.pass.iteration,
            pages: total,
            wire_bytes: self.pass.wire_bytes,
            duration_ms: now
                .saturating_duration_since(self.pass.started)
                .as_secs_f64()
                * 1e3,
            dirtied_pages: 0,
            predicted_downtime_ms: 0.0,
            predicted_duration_ms: self.pass_prediction.as_secs_f64() * 1e3,
            link_forecast_bps: self.link_forecast().unwrap_or(0.0),
            downtime_limit_ms: limit.as_secs_f64() * 1e3,
            throttle_percent: throttle,
        });
        // The handover's frames all travel on one stream: if that stream fails now, the migration
        // fails (the guest resumes) rather than guessing which of them arrived.
        self.phase = Phase::FinishSending;
        if self.postcopy_pages.is_some() {
            self.actions.push_back(SourceAction::SwitchToPostcopy {
                final_iteration: self.pass.iteration,
                data_frames: self.next_chunk,
            });
            return;
        }
        self.actions.push_back(SourceAction::SendFinish {
            final_iteration: self.pass.iteration,
            data_frames: self.next_chunk,
        });
    }

    pub(super) fn stall(&mut self, now: Instant, why: Stall) {
        match self.stalled {
            Some((_, w)) if w == why => {}
            _ => self.stalled = Some((now, why)),
        }
    }
}
