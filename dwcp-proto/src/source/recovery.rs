//! The source machine's streams: joins, the stream-count window, and recovery after lost streams
//! (re-sending orphans, reconnecting with backoff when every stream is down).

use std::time::Instant;

use dwcp_core::error::{Error, HandshakeError};

use super::events::SourceAction;
use super::machine::{Recovery, SourceMachine};
use super::streams::{Backoff, StreamChange};

impl SourceMachine {
    pub(super) fn open_stream(&mut self) {
        let index = self.next_index;
        self.next_index = self.next_index.wrapping_add(1).max(1);
        self.pending_joins += 1;
        self.actions.push_back(SourceAction::OpenStream { index });
    }

    pub(super) fn on_joined(&mut self, index: u16) {
        self.pending_joins = self.pending_joins.saturating_sub(1);
        self.live.push(index);
        self.peak_streams = self.peak_streams.max(self.live.len());
        if self.control_lane.is_some() || self.live.len() > self.streams.range().max {
            self.live.pop();
            self.actions.push_back(SourceAction::RetireStream { index });
        }
        if matches!(self.recovery, Recovery::Reconnecting { .. }) && !self.live.is_empty() {
            // A stream started in the background made it while every other was down.
            self.recovery = Recovery::Resending;
            self.actions.push_back(SourceAction::ResendOrphans);
        }
    }

    pub(super) fn start_recovery(&mut self, now: Instant) {
        // Time spent recovering is not the destination's silence.
        self.stalled = None;
        if !self.live.is_empty() {
            if !matches!(self.recovery, Recovery::Resending) {
                self.recovery = Recovery::Resending;
                self.actions.push_back(SourceAction::ResendOrphans);
            }
            return;
        }
        if let Recovery::Reconnecting { .. } = self.recovery {
            return;
        }
        self.recovery = Recovery::Reconnecting {
            backoff: Backoff::new(
                self.p.reconnect_attempts,
                self.p.reconnect_backoff,
                self.p.seed ^ self.resilience.streams_lost,
            ),
            due: now,
            attempting: false,
            last_error: "every stream failed".into(),
        };
    }

    pub(super) fn on_reconnect_failed(&mut self, now: Instant, error: Error) {
        // The destination refused us outright (it dropped the session, or the key is wrong):
        // retrying cannot help.
        if matches!(
            error,
            Error::Peer { .. } | Error::Handshake(HandshakeError::AuthenticationFailed)
        ) {
            return self.fail(error);
        }
        if let Recovery::Reconnecting {
            backoff,
            due,
            attempting,
            last_error,
        } = &mut self.recovery
        {
            tracing::warn!(attempt = backoff.attempts(), error = %error, "reconnection failed");
            *last_error = error.to_string();
            *attempting = false;
            *due = now + backoff.next_delay();
        }
    }

    /// Keeps the stream count the controller wants after a recovery (joins run in the background).
    pub(super) fn top_up_streams(&mut self) {
        if !self.sending() || self.control_lane.is_some() {
            return;
        }
        let target = if self.streams.range().max > self.streams.range().initial {
            self.streams.target()
        } else {
            self.peak_streams.min(self.streams.range().max)
        };
        let have = self.live.len() + self.pending_joins;
        for _ in have..target {
            self.open_stream();
        }
    }

    pub(super) fn reconnect_if_due(&mut self, now: Instant) {
        let Recovery::Reconnecting {
            backoff,
            due,
            attempting,
            last_error,
        } = &mut self.recovery
        else {
            return;
        };
        if *attempting || now < *due {
            return;
        }
        if !backoff.try_attempt() {
            let e = Error::StreamsLost {
                attempts: self.p.reconnect_attempts,
                last: last_error.clone(),
            };
            return self.fail(e);
        }
        *attempting = true;
        let attempt = backoff.attempts();
        let index = self.next_index;
        self.next_index = self.next_index.wrapping_add(1).max(1);
        self.actions
            .push_back(SourceAction::Reconnect { index, attempt });
    }

    pub(super) fn adapt_streams(&mut self, now: Instant) {
        if self.live.is_empty() {
            return;
        }
        if self.streams.wants_probe() {
            // The probe needs a delivery rate from the window's end, not one from before it.
            let due = self.streams.window_end().is_some_and(|end| now >= end);
            let stale = self
                .last_link
                .is_none_or(|(at, _)| self.streams.window_end().is_some_and(|end| at < end));
            if due && stale {
                if !self.telemetry_out {
                    self.telemetry_out = true;
                    self.actions.push_back(SourceAction::SampleTelemetry);
                }
                return;
            }
        }
        let link_rate = self.last_link.map_or(0.0, |(_, r)| r);
        let change = self.streams.step(
            now,
            self.flow.acked_bytes,
            self.live.len(),
            self.pending_joins,
            link_rate,
        );
        match change {
            StreamChange::Keep => {}
            StreamChange::Open(n) => (0..n).for_each(|_| self.open_stream()),
            StreamChange::Retire(n) => {
                // The newest streams go first (the controller never asks to retire every stream).
                self.live.sort_unstable();
                for _ in 0..n.min(self.live.len().saturating_sub(1)) {
                    if let Some(index) = self.live.pop() {
                        self.actions.push_back(SourceAction::RetireStream { index });
                    }
                }
            }
        }
    }
}
