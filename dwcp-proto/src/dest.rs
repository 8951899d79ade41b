//! The destination side of a migration as a state machine: which streams a session takes, how long
//! it waits for a source that lost every stream, and the handover (Finish → Verdict → Commit →
//! CommitAck).
//!
//! ```text
//!  Receiving ──Finish──▶ Verifying ──complete──▶ Hashing ──digest──▶ Verified (Verdict sent)
//!                                                                      │ Commit, digests equal
//!                                                                      ▼
//!   Done ◀──every stream closed (bounded)── Committed ◀──CommitAck sent── Confirming ◀──flushed── Flushing
//! ```
//!
//! An operator's [`DestEvent::Cancel`] ends the session with [`Error::Cancelled`] until the Verdict
//! is sent, and is refused afterwards (see there why).
//!
//! Pages are applied by the shell, in parallel, one thread per stream; what decides which copy of a
//! page wins is `dwcp_core::apply::PageVersions` and which chunk copy is applied
//! `dwcp_core::ledger::ChunkLedger`, both sans-IO already. [`AckPolicy`] decides when a stream
//! acknowledges what it applied.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use dwcp_core::error::Error;
use dwcp_core::messages::Finish;

/// Acknowledge at least every this many applied data frames, even while more are buffered.
pub const ACK_EVERY_FRAMES: u32 = 16;
/// ... or every this many applied payload bytes: the source keeps each chunk's buffer until it is
/// acknowledged, so coarse acknowledgements would hold its buffer pool full.
pub const ACK_EVERY_BYTES: usize = 1 << 20;

/// When one stream acknowledges the data frames it applied.
#[derive(Debug, Clone, Default)]
pub struct AckPolicy {
    frames: u32,
    bytes: usize,
}

impl AckPolicy {
    /// A data frame of `payload_len` bytes was applied (or was a duplicate); `more_buffered`: the
    /// next frame is already read. Returns whether to acknowledge through this frame now: before the
    /// stream would block on the socket, or periodically during long bursts.
    pub fn on_applied(&mut self, payload_len: usize, more_buffered: bool) -> bool {
        self.frames += 1;
        self.bytes += payload_len;
        let now =
            !more_buffered || self.frames >= ACK_EVERY_FRAMES || self.bytes >= ACK_EVERY_BYTES;
        if now {
            self.frames = 0;
            self.bytes = 0;
        }
        now
    }
}

/// What a destination session is set up with.
#[derive(Debug, Clone, Copy)]
pub struct DestParams {
    /// Streams the source announced it runs at most.
    pub announced_streams: usize,
    /// How long a session without any stream waits for the source to reconnect (and, after the
    /// commit, for the source to close its streams).
    pub rejoin_window: Duration,
}

/// How a stream ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum StreamEnd {
    /// The source closed it.
    Closed,
    /// The source parked it after the handover (connection pool).
    Parked,
    /// It broke (the source may re-send what it carried and reconnect).
    Lost(Error),
    /// It carried something that ends the session.
    Fatal(Error),
}

/// What happened, as the shell tells the machine.
#[derive(Debug)]
#[non_exhaustive]
pub enum DestEvent {
    /// Time passed.
    Tick,
    /// An authenticated stream asks to join (`pooled`: a parked stream, owed SessionReady).
    StreamJoined {
        /// Its index.
        index: u16,
        /// Whether it was parked.
        pooled: bool,
    },
    /// A stream ended.
    StreamEnded {
        /// Its index.
        index: u16,
        /// How.
        end: StreamEnd,
    },
    /// The source sent Finish on `stream`.
    Finish {
        /// The message.
        finish: Finish,
        /// The stream it came on.
        stream: u16,
    },
    /// Pre-copy ended in post-copy (PostcopySwitch, Finish's payload, on `stream`): the handover
    /// goes on as after Finish (the digest covers the pages as last sent), and the session ends
    /// with the pages the source dirtied since left for post-copy to bring.
    PostcopySwitch {
        /// The message.
        finish: Finish,
        /// The stream it came on.
        stream: u16,
    },
    /// What was applied, asked for by [`DestAction::CheckReceived`].
    Received {
        /// The ledger holds exactly the data frames Finish announced.
        frames_complete: bool,
        /// Distinct chunks applied.
        distinct_chunks: u64,
        /// Chunks still being applied.
        in_progress: u64,
        /// Pages never received.
        missing_pages: u64,
    },
    /// The destination's digest.
    DigestComputed(u128),
    /// The source committed with `digest` on `stream`.
    Commit {
        /// The source's digest.
        digest: u128,
        /// The stream it came on.
        stream: u16,
    },
    /// The sink is durable (answer to [`DestAction::FlushSink`]).
    Flushed,
    /// CommitAck went out (answer to [`DestAction::SendCommitAck`]): the VM is ours.
    CommitAckSent,
    /// Something the shell did for the machine failed.
    LocalFailed(Error),
    /// The operator cancelled the session. Honoured until the Verdict is sent: the session fails
    /// with [`Error::Cancelled`], which the shell reports to the source (`ErrorCode::Cancelled`)
    /// before it discards what it received, and the source resumes its guest. From the Verdict on,
    /// the source may commit at any moment, and a cancel racing its Commit would leave neither side
    /// running the VM: the cancel is refused ([`DestMachine::cancel_refused`]) and the session runs
    /// to its end.
    Cancel,
}

/// What the shell must do.
#[derive(Debug, PartialEq)]
#[non_exhaustive]
pub enum DestAction {
    /// Start applying stream `index`'s frames (after SessionReady, if `pooled`).
    AcceptStream {
        /// Its index.
        index: u16,
        /// Whether it was parked and is owed SessionReady.
        pooled: bool,
    },
    /// Close stream `index` without ending the session (the source re-sends what it queued on it).
    RefuseStream {
        /// Its index.
        index: u16,
        /// Why, for the log.
        why: String,
    },
    /// Any data frame from now on is a protocol violation.
    StopData,
    /// Wait for chunks still being applied, then answer with [`DestEvent::Received`].
    CheckReceived,
    /// Hash the sink; answer with [`DestEvent::DigestComputed`].
    ComputeDigest,
    /// Send Verdict with `digest` on `stream`.
    SendVerdict {
        /// The stream Finish came on.
        stream: u16,
        /// Our digest.
        digest: u128,
    },
    /// Make the sink durable; answer with [`DestEvent::Flushed`].
    FlushSink,
    /// Send CommitAck on `stream`; answer with [`DestEvent::CommitAckSent`].
    SendCommitAck {
        /// The stream Commit came on.
        stream: u16,
    },
    /// Answer the source's Park on stream `index` and keep it for the next session.
    ParkStream {
        /// Its index.
        index: u16,
    },
    /// The session ended: `Ok` after the commit, with the final iteration and the digest.
    Finished(Result<(u32, u128), DestFailure>),
}

/// Why a destination session failed (the error is not `PartialEq`, so actions compare by message).
#[derive(Debug)]
pub struct DestFailure(pub Error);

impl PartialEq for DestFailure {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Receiving,
    Verifying,
    Hashing,
    Verified,
    Flushing,
    Confirming,
    Committed,
    Done,
}

/// The destination's decisions for one session. See the [module documentation](self).
#[derive(Debug)]
pub struct DestMachine {
    p: DestParams,
    phase: Phase,
    actions: VecDeque<DestAction>,
    live: Vec<u16>,
    streams_opened: u64,
    orphaned_since: Option<Instant>,
    finish: Option<(Finish, u16)>,
    /// The source switched to post-copy instead of finishing.
    postcopy: bool,
    digest: Option<u128>,
    commit_stream: u16,
    committed: bool,
    cancel_refused: bool,
}

impl DestMachine {
    /// A session whose stream 0 was accepted at `now`.
    pub fn new(params: DestParams, _now: Instant) -> Self {
        let mut m = Self {
            p: DestParams {
                announced_streams: params.announced_streams.max(1),
                ..params
            },
            phase: Phase::Receiving,
            actions: VecDeque::new(),
            live: vec![0],
            streams_opened: 1,
            orphaned_since: None,
            finish: None,
            postcopy: false,
            digest: None,
            commit_stream: 0,
            committed: false,
            cancel_refused: false,
        };
        m.actions.push_back(DestAction::AcceptStream {
            index: 0,
            pooled: false,
        });
        m
    }

    /// Streams the source may open over the session (reconnections included) before we suspect a
    /// runaway client.
    pub fn max_joins(&self) -> u64 {
        8 * self.p.announced_streams as u64 + 64
    }

    /// Streams accepted over the session.
    pub fn streams_opened(&self) -> u64 {
        self.streams_opened
    }

    /// The next action to carry out.
    pub fn poll_action(&mut self) -> Option<DestAction> {
        self.actions.pop_front()
    }

    /// When to feed [`DestEvent::Tick`] at the latest.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Done => None,
            _ => self.orphaned_since.map(|t| t + self.p.rejoin_window),
        }
    }

    /// The state's name, as in the diagram of the module documentation (for logs and coverage).
    pub fn state_name(&self) -> &'static str {
        match self.phase {
            Phase::Receiving => "Receiving",
            Phase::Verifying => "Verifying",
            Phase::Hashing => "Hashing",
            Phase::Verified => "Verified",
            Phase::Flushing => "Flushing",
            Phase::Confirming => "Confirming",
            Phase::Committed => "Committed",
            Phase::Done => "Done",
        }
    }

    /// Every state's name.
    pub const STATES: [&'static str; 8] = [
        "Receiving",
        "Verifying",
        "Hashing",
        "Verified",
        "Flushing",
        "Confirming",
        "Committed",
        "Done",
    ];

    /// Whether the session ended.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Whether the session ended in a switch to post-copy: everything pre-copy sent is applied and
    /// verified, the VM is ours, and the pages the source dirtied since are for post-copy to bring.
    pub fn is_postcopy(&self) -> bool {
        self.postcopy && self.phase == Phase::Done
    }

    /// Whether the source committed and we confirmed (the VM is ours).
    pub fn is_committed(&self) -> bool {
        self.committed
    }

    /// Whether an operator's cancel came too late (after the Verdict) and was refused.
    pub fn cancel_refused(&self) -> bool {
        self.cancel_refused
    }

    /// Feeds one event that happened at `now`.
    pub fn handle(&mut self, now: Instant, event: DestEvent) {
        if self.phase == Phase::Done {
            return;
        }
        match event {
            DestEvent::Tick => {}
            DestEvent::StreamJoined { index, pooled } => self.on_joined(index, pooled),
            DestEvent::StreamEnded { index, end } => return self.on_ended(now, index, end),
            DestEvent::PostcopySwitch { finish, stream } => {
                self.postcopy = true;
                self.handle(now, DestEvent::Finish { finish, stream });
            }
            DestEvent::Finish { finish, stream } => {
                if self.finish.is_some() {
                    return self.fail(Error::Protocol("second finish".into()));
                }
                self.finish = Some((finish, stream));
                self.phase = Phase::Verifying;
                self.actions.push_back(DestAction::StopData);
                self.actions.push_back(DestAction::CheckReceived);
            }
            DestEvent::Received {
                frames_complete,
                distinct_chunks,
                in_progress,
                missing_pages,
            } => {
                let Some((finish, _)) = self.finish.filter(|_| self.phase == Phase::Verifying)
                else {
                    return self.fail(Error::Protocol("received-check unasked".into()));
                };
                if !frames_complete {
                    return self.fail(Error::Protocol(format!(
                        "source finished after {} data frames, {distinct_chunks} distinct ones were applied ({in_progress} still being applied)",
                        finish.data_frames
                    )));
                }
                if missing_pages > 0 {
                    return self.fail(Error::Protocol(format!(
                        "source finished but {missing_pages} pages were never sent"
                    )));
                }
                self.phase = Phase::Hashing;
                self.actions.push_back(DestAction::ComputeDigest);
            }
            DestEvent::DigestComputed(digest) => {
                let Some((_, stream)) = self.finish.filter(|_| self.phase == Phase::Hashing) else {
                    return self.fail(Error::Protocol("digest unasked".into()));
                };
                self.digest = Some(digest);
                self.phase = Phase::Verified;
                self.actions
                    .push_back(DestAction::SendVerdict { stream, digest });
            }
            DestEvent::Commit { digest, stream } => {
                let Some(ours) = self.digest else {
                    return self.fail(Error::Protocol("commit before finish".into()));
                };
                if self.phase != Phase::Verified {
                    return self.fail(Error::Protocol("second commit".into()));
                }
                if digest != ours {
                    return self.fail(Error::DigestMismatch {
                        source_digest: digest,
                        destination_digest: ours,
                    });
                }
                self.commit_stream = stream;
                self.phase = Phase::Flushing;
                self.actions.push_back(DestAction::FlushSink);
            }
            DestEvent::Flushed => {
                if self.phase != Phase::Flushing {
                    return self.fail(Error::Protocol("flush unasked".into()));
                }
                self.phase = Phase::Confirming;
                self.actions.push_back(DestAction::SendCommitAck {
                    stream: self.commit_stream,
                });
            }
            DestEvent::CommitAckSent => {
                if self.phase != Phase::Confirming {
                    return self.fail(Error::Protocol("CommitAck unasked".into()));
                }
                // The source may now resume nothing: from here on the VM is ours, whatever fails.
                self.phase = Phase::Committed;
                self.committed = true;
                // Wait (bounded) for the source's Close on every stream so the sockets end cleanly.
                self.orphaned_since = Some(now);
                if self.live.is_empty() {
                    return self.done();
                }
            }
            DestEvent::LocalFailed(e) => return self.fail(e),
            DestEvent::Cancel => return self.on_cancel(),
        }
        self.check_timer(now);
    }

    fn on_cancel(&mut self) {
        match self.phase {
            // The source has no verdict yet, so it cannot have committed: it resumes its guest.
            Phase::Receiving | Phase::Verifying | Phase::Hashing => self.fail(Error::Cancelled),
            _ => {
                tracing::warn!(
                    state = self.state_name(),
                    "cancel refused: the verdict was sent and the source may have committed"
                );
                self.cancel_refused = true;
            }
        }
    }

    fn on_joined(&mut self, index: u16, pooled: bool) {
        let max = self.p.announced_streams;
        let refusal = if self.phase != Phase::Receiving {
            Some("the session is ending".to_string())
        } else if self.live.contains(&index) {
            Some(format!("stream index {index} is already in use"))
        } else if self.live.len() >= 2 * max {
            // Twice the announced count: streams the source saw break may not have ended here yet
            // while their replacements join.
            Some(format!("the source announced at most {max} streams"))
        } else if self.streams_opened >= self.max_joins() {
            Some(format!(
                "{} streams opened in one session",
                self.max_joins()
            ))
        } else {
            None
        };
        if let Some(why) = refusal {
            self.actions
                .push_back(DestAction::RefuseStream { index, why });
            return;
        }
        self.live.push(index);
        self.streams_opened += 1;
        self.orphaned_since = None;
        self.actions
            .push_back(DestAction::AcceptStream { index, pooled });
    }

    fn on_ended(&mut self, now: Instant, index: u16, end: StreamEnd) {
        // Only the newest stream with an index is live; an older one ending says nothing of it.
        if let Some(at) = self.live.iter().position(|&i| i == index) {
            self.live.swap_remove(at);
        }
        let committed = self.committed;
        match end {
            StreamEnd::Closed => {}
            StreamEnd::Parked if committed => {
                self.actions.push_back(DestAction::ParkStream { index })
            }
            StreamEnd::Parked => {
                return self.fail(Error::Protocol(
                    "the source parked a stream before the handover".into(),
                ));
            }
            StreamEnd::Lost(e) if !committed => {
                tracing::warn!(stream = index, error = %e, "stream lost; waiting for the source to re-send");
            }
            StreamEnd::Lost(e) | StreamEnd::Fatal(e) if committed => {
                tracing::debug!(stream = index, error = %e, "stream ended after the handover");
            }
            StreamEnd::Lost(_) => {}
            StreamEnd::Fatal(e) => return self.fail(e),
        }
        if self.live.is_empty() {
            if committed {
                return self.done();
            }
            self.orphaned_since.get_or_insert(now);
        }
        self.check_timer(now);
    }

    fn check_timer(&mut self, now: Instant) {
        let Some(since) = self.orphaned_since else {
            return;
        };
        if now.saturating_duration_since(since) < self.p.rejoin_window {
            return;
        }
        if self.committed {
            return self.done();
        }
        let window = self.p.rejoin_window;
        self.fail(Error::Timeout(format!(
            "every stream of the session failed and the source did not reconnect within {window:?}"
        )));
    }

    fn done(&mut self) {
        let (Some((finish, _)), Some(digest)) = (self.finish, self.digest) else {
            return self.fail(Error::Protocol(
                "the session ended before the handover".into(),
            ));
        };
        self.phase = Phase::Done;
        self.actions
            .push_back(DestAction::Finished(Ok((finish.final_iteration, digest))));
    }

    fn fail(&mut self, error: Error) {
        if self.phase == Phase::Done {
            return;
        }
        if self.committed {
            // The VM is ours already; what fails now is only the goodbye.
            tracing::debug!(error = %error, "after the handover");
            return self.done();
        }
        self.phase = Phase::Done;
        self.actions
            .push_back(DestAction::Finished(Err(DestFailure(error))));
    }
}
