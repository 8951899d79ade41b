//! Cancel at every phase, in the manner of QEMU's `cancel/src/after/<status>` tests: the in-memory
//! pair (see `harness`) is driven until the source machine (or the destination machine) is in the
//! phase, the operator's cancel is injected, and the outcome is checked. Before the point of no
//! return a cancel must leave the source guest running with its memory untouched but by the guest,
//! the destination must end without taking the VM over, and a new migration of the same guest to a
//! fresh destination must then complete. From the point of no return on (the commit sent, or the new
//! owner recorded) a cancel is refused and the migration completes.

mod harness;

use std::time::Duration;

use dwcp_core::HandoverDecision;
use dwcp_core::error::{Error, ErrorCode};
use dwcp_proto::source::StreamRange;
use harness::{Faults, Run, Setup, Sim, Workload, assert_invariants};

const STEPS: u64 = 400_000;

fn busy() -> Workload {
    Workload {
        rates: vec![(Duration::ZERO, 40)],
        hot_pages: Some(64),
    }
}

fn run(setup: &Setup) -> Run {
    let r = Sim::new(setup.clone()).run(STEPS);
    assert_invariants(&r);
    r
}

fn cancel_in(state: &'static str) -> Faults {
    Faults {
        cancel_in: Some(state),
        ..Faults::default()
    }
}

fn source_error(r: &Run) -> &Error {
    match &r.source {
        Some(Err(f)) => &f.error,
        other => panic!(
            "the migration did not fail: {other:?}\nlast actions: {:?}",
            r.actions.iter().rev().take(12).collect::<Vec<_>>()
        ),
    }
}

/// Source actions carried out after the cancel was injected.
fn actions_after_cancel(r: &Run) -> &[String] {
    let at = r.actions_at_cancel.expect("the cancel was injected");
    &r.actions[at..]
}

/// What every cancel before the point of no return promises, on both sides.
fn assert_guest_kept(r: &Run, phase: &str) {
    assert!(r.guest_running, "{phase}: the source guest is paused");
    assert_eq!(
        r.resumed, r.paused_ever,
        "{phase}: the guest is resumed exactly when it had been paused"
    );
    assert!(!r.commit_sent, "{phase}: a commit went out");
    // The migration only reads guest memory: every page the guest did not write is as it was.
    let touched: Vec<u64> = (0..r.initial_memory.len() as u64)
        .filter(|p| !r.guest_written.contains(p))
        .filter(|&p| r.source_memory[p as usize] != r.initial_memory[p as usize])
        .collect();
    assert!(
        touched.is_empty(),
        "{phase}: pages the guest never wrote changed: {touched:?}"
    );
    // The destination discards the session: it ended, failed, and never took the VM over.
    assert!(
        matches!(r.dest, Some(Err(_))),
        "{phase}: the destination did not discard the session: {:?}",
        r.dest
    );
    assert!(!r.dest_committed, "{phase}: the destination committed");
}

/// A cancel by the operator on the source before the point of no return.
fn assert_cancelled(setup: &Setup, r: &Run, phase: &str) {
    assert!(
        matches!(source_error(r), Error::Cancelled),
        "{phase}: {:?}",
        source_error(r)
    );
    assert_guest_kept(r, phase);
    let after = actions_after_cancel(r);
    for work in [
        "SendBatch",
        "OpenStream",
        "Reconnect",
        "PauseGuest",
        "SendFinish",
        "SendCommit",
    ] {
        assert!(
            after.iter().all(|a| !a.contains(work)),
            "{phase}: {work} carried out after the cancel: {after:?}"
        );
    }
    retry_succeeds(setup, r, phase);
}

/// The same guest, as the cancelled migration left it, migrates to a fresh destination.
fn retry_succeeds(setup: &Setup, cancelled: &Run, phase: &str) {
    let retry = Setup {
        faults: Faults::default(),
        handover: None,
        ..setup.clone()
    };
    let r = Sim::with_memory(retry, cancelled.source_memory.clone()).run(STEPS);
    assert_invariants(&r);
    assert_eq!(
        r.initial_memory, cancelled.source_memory,
        "{phase}: the retry starts from the memory the guest kept"
    );
    let done = match &r.source {
        Some(Ok(c)) => c,
        other => panic!("{phase}: the retry failed: {other:?}"),
    };
    assert!(
        matches!(r.dest, Some(Ok((_, d))) if d == done.digest),
        "{phase}: the digests differ: source {:x}, destination {:?}",
        done.digest,
        r.dest
    );
    assert_eq!(
        Some(&r.dest_memory),
        r.snapshot.as_ref(),
        "{phase}: the fresh destination holds the guest as paused"
    );
}

/// A cancel that came too late: the migration completes as if there had been none.
fn assert_completed(r: &Run, phase: &str) {
    let done = match &r.source {
        Some(Ok(c)) => c,
        other => panic!("{phase}: the migration did not complete: {other:?}"),
    };
    assert!(
        matches!(r.dest, Some(Ok((_, d))) if d == done.digest),
        "{phase}: {:?}",
        r.dest
    );
    assert!(r.dest_committed, "{phase}: the destination runs the VM");
    assert!(
        !r.guest_running && !r.resumed,
        "{phase}: the source guest ran again"
    );
    assert_eq!(Some(&r.dest_memory), r.snapshot.as_ref(), "{phase}");
}

#[test]
fn cancel_during_setup_carries_out_nothing_of_the_migration() {
    let setup = Setup {
        workload: busy(),
        faults: Faults {
            cancel_before_start: true,
            ..Faults::default()
        },
        ..Setup::default()
    };
    let r = run(&setup);
    assert_cancelled(&setup, &r, "setup");
    // The machine's first actions (dirty log, pass 0, background streams) were withdrawn.
    assert!(
        r.actions
            .iter()
            .all(|a| !a.contains("StartDirtyLog") && !a.contains("BeginPass")),
        "{:?}",
        r.actions
    );
    assert_eq!(r.data_frames_delivered, 0);
    assert_eq!(
        r.dest_heard,
        Some(ErrorCode::Cancelled),
        "the destination hears why"
    );
}

#[test]
fn cancel_while_streams_join_the_session() {
    let setup = Setup {
        streams: StreamRange { initial: 4, max: 4 },
        faults: Faults {
            cancel_while_joining: true,
            cancel_after_frames: 1,
            ..cancel_in("Precopy")
        },
        ..Setup::default()
    };
    let r = run(&setup);
    assert_eq!(r.cancelled_in, Some(("Precopy", 0)));
    assert_cancelled(&setup, &r, "handshake");
    assert_eq!(r.dest_heard, Some(ErrorCode::Cancelled));
}

#[test]
fn cancel_during_pass_0() {
    let setup = Setup {
        workload: busy(),
        faults: Faults {
            cancel_after_frames: 12,
            ..cancel_in("Precopy")
        },
        ..Setup::default()
    };
    let r = run(&setup);
    assert_eq!(r.cancelled_in, Some(("Precopy", 0)));
    assert!(r.data_frames_delivered < 32, "pass 0 was not over");
    assert_cancelled(&setup, &r, "pass 0");
    assert_eq!(r.dest_heard, Some(ErrorCode::Cancelled));
}

#[test]
fn cancel_during_a_later_pass_of_a_dirtying_guest() {
    let setup = Setup {
        workload: busy(),
        downtime_limit: Duration::ZERO,
        faults: Faults {
            cancel_after_passes: 2,
            ..cancel_in("Precopy")
        },
        ..Setup::default()
    };
    let r = run(&setup);
    assert_eq!(r.cancelled_in, Some(("Precopy", 2)));
    assert!(!r.guest_written.is_empty(), "the guest wrote memory");
    assert_cancelled(&setup, &r, "pass 2");
}

#[test]
fn cancel_while_waiting_for_the_dirty_log_after_a_pass() {
    let setup = Setup {
        workload: busy(),
        faults: Faults {
            defer_dirty: true,
            ..cancel_in("AwaitingDirty")
        },
        ..Setup::default()
    };
    let r = run(&setup);
    assert_eq!(r.cancelled_in, Some(("AwaitingDirty", 0)));
    assert_cancelled(&setup, &r, "convergence");
}

#[test]
fn cancel_while_the_pause_is_being_carried_out_resumes_the_guest() {
    // The hypervisor has stopped the guest but not confirmed it yet: the cancel must undo the pause.
    let setup = Setup {
        workload: busy(),
        faults: Faults {
            defer_pause: true,
            ..cancel_in("Pausing")
        },
        ..Setup::default()
    };
    let r = run(&setup);
    assert!(r.paused_ever, "the guest was paused");
    assert_cancelled(&setup, &r, "pausing");
}

#[test]
fn cancel_during_stop_and_copy_resumes_the_guest() {
    for (state, defer_dirty) in [("FinalDirty", true), ("FinalPass", false)] {
        let setup = Setup {
            workload: busy(),
            faults: Faults {
                defer_dirty,
                ..cancel_in(state)
            },
            ..Setup::default()
        };
        let r = run(&setup);
        assert_eq!(r.cancelled_in.map(|c| c.0), Some(state));
        assert!(r.paused_ever && r.resumed, "{state}: paused, then resumed");
        assert_cancelled(&setup, &r, state);
        assert_eq!(r.dest_heard, Some(ErrorCode::Cancelled), "{state}");
    }
}

#[test]
fn cancel_after_finish_while_waiting_for_the_verdict() {
    let setup = Setup {
        workload: busy(),
        faults: cancel_in("AwaitingVerdict"),
        ..Setup::default()
    };
    let r = run(&setup);
    assert_eq!(r.cancelled_in.map(|c| c.0), Some("AwaitingVerdict"));
    assert!(r.paused_ever && r.resumed);
    assert_cancelled(&setup, &r, "awaiting the verdict");
}

#[test]
fn cancel_while_every_stream_is_down_stops_reconnecting() {
    let setup = Setup {
        faults: Faults {
            kill_all_after_frames: Some(8),
            failed_reconnects: u32::MAX,
            cancel_while_reconnecting: true,
            ..cancel_in("Precopy")
        },
        reconnect_attempts: 50,
        ..Setup::default()
    };
    let r = run(&setup);
    assert_eq!(r.cancelled_in, Some(("Precopy", 0)));
    assert!(
        r.reconnect_attempts < 50,
        "reconnection went on after the cancel"
    );
    // No stream is left to tell the destination: it gives up once its rejoin window is over.
    assert!(
        matches!(&r.dest, Some(Err(e)) if e.contains("did not reconnect")),
        "{:?}",
        r.dest
    );
    assert_cancelled(&setup, &r, "reconnecting");
}

#[test]
fn cancel_while_the_handover_is_recorded_waits_for_the_record() {
    // Recorded: the registry names the destination, so the cancel is refused and the VM moves.
    let setup = Setup {
        workload: busy(),
        handover: Some(HandoverDecision::Recorded),
        faults: Faults {
            defer_handover: true,
            ..cancel_in("RecordingHandover")
        },
        ..Setup::default()
    };
    let r = run(&setup);
    assert_eq!(r.cancelled_in.map(|c| c.0), Some("RecordingHandover"));
    assert_completed(&r, "recording, recorded");

    // Refused: nothing names the destination, so the cancel is honoured and the guest resumes.
    let setup = Setup {
        handover: Some(HandoverDecision::Refused("a stale fence".into())),
        ..setup
    };
    let r = run(&setup);
    assert_eq!(r.cancelled_in.map(|c| c.0), Some("RecordingHandover"));
    assert!(r.paused_ever && r.resumed);
    assert_cancelled(&setup, &r, "recording, refused");
}

#[test]
fn cancel_after_the_commit_is_refused_and_the_migration_completes() {
    let setup = Setup {
        workload: busy(),
        faults: cancel_in("AwaitingCommitAck"),
        ..Setup::default()
    };
    let r = run(&setup);
    assert_eq!(r.cancelled_in.map(|c| c.0), Some("AwaitingCommitAck"));
    assert_completed(&r, "awaiting the commit's confirmation");
}

#[test]
fn cancel_after_completion_changes_nothing() {
    let setup = Setup {
        workload: busy(),
        faults: Faults {
            cancel_after_end: true,
            ..Faults::default()
        },
        ..Setup::default()
    };
    let r = run(&setup);
    assert_completed(&r, "after completion");
    assert!(
        r.actions_after_end.is_empty(),
        "a cancel after the end asked for {:?}",
        r.actions_after_end
    );
}

#[test]
fn destination_cancel_during_pre_copy_and_stop_and_copy_resumes_the_source() {
    for (source_state, after_frames) in [("Precopy", 10), ("FinalPass", 0)] {
        let setup = Setup {
            workload: busy(),
            faults: Faults {
                dest_cancel_in: Some("Receiving"),
                dest_cancel_after_frames: after_frames,
                dest_cancel_when_source_in: Some(source_state),
                ..Faults::default()
            },
            ..Setup::default()
        };
        let r = run(&setup);
        assert_eq!(r.dest_cancelled_in, Some("Receiving"), "{source_state}");
        assert!(!r.dest_cancel_refused);
        assert!(
            matches!(&r.dest, Some(Err(e)) if e == &Error::Cancelled.to_string()),
            "{source_state}: {:?}",
            r.dest
        );
        // The source hears the destination's reason and gives the guest back to its operator.
        assert!(
            matches!(
                source_error(&r),
                Error::Peer {
                    code: ErrorCode::Cancelled,
                    ..
                }
            ),
            "{source_state}: {:?}",
            source_error(&r)
        );
        assert_eq!(r.paused_ever, source_state == "FinalPass", "{source_state}");
        assert_guest_kept(&r, source_state);
        retry_succeeds(&setup, &r, source_state);
    }
}

#[test]
fn destination_cancel_after_its_verdict_is_refused() {
    for state in ["Verified", "Committed"] {
        let setup = Setup {
            workload: busy(),
            faults: Faults {
                dest_cancel_in: Some(state),
                ..Faults::default()
            },
            ..Setup::default()
        };
        let r = run(&setup);
        assert_eq!(r.dest_cancelled_in, Some(state));
        assert!(r.dest_cancel_refused, "{state}");
        assert_completed(&r, state);
    }
}
