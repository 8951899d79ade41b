//! Both machines run against each other in memory, with virtual time (see `harness`): reordering
//! across streams, streams lost at every point of a pass, every stream lost and recovered (or not),
//! acknowledgements that never come, a destination that stops reading, dirty rates that change,
//! cancel in every phase, and random schedules checked against the protocol's invariants.

mod harness;

use std::collections::BTreeMap;
use std::time::Duration;

use dwcp_core::error::Error;
use dwcp_proto::dest::{DestAction, DestEvent, DestMachine, DestParams, StreamEnd};
use dwcp_proto::source::{SourceMachine, StopReason, StreamRange};
use harness::{Faults, Run, Setup, Sim, Workload, assert_invariants};
use proptest::prelude::*;

const STEPS: u64 = 400_000;

fn run(setup: Setup) -> Run {
    let r = Sim::new(setup).run(STEPS);
    assert_invariants(&r);
    r
}

fn completed(r: &Run) -> &dwcp_proto::source::Completed {
    match &r.source {
        Some(Ok(c)) => c,
        other => panic!(
            "the migration failed: {other:?}\nlast actions: {:?}",
            r.actions.iter().rev().take(12).collect::<Vec<_>>()
        ),
    }
}

fn failure(r: &Run) -> &Error {
    match &r.source {
        Some(Err(f)) => &f.error,
        other => panic!("the migration did not fail: {other:?}"),
    }
}

fn busy() -> Workload {
    Workload {
        rates: vec![(Duration::ZERO, 40)],
        hot_pages: Some(64),
    }
}

#[test]
fn a_migration_of_a_writing_guest_is_bit_exact() {
    let r = run(Setup {
        workload: busy(),
        ..Setup::default()
    });
    let c = completed(&r);
    assert!(c.passes.len() >= 2, "{:?}", c.passes);
    assert_eq!(r.dest_memory, *r.snapshot.as_ref().unwrap());
    assert!(matches!(r.dest, Some(Ok((_, d))) if d == c.digest));
}

#[test]
fn an_older_copy_arriving_after_a_newer_one_never_wins() {
    // Four streams, a small hot set rewritten every pass, and streams that die with data still in
    // the network which reaches the destination later, after newer passes' copies of the same
    // pages. Equal memory at the end proves the newest copy won every time; the count of late copies
    // proves the race happened.
    let mut late = 0;
    for seed in 1..=12 {
        let r = run(Setup {
            seed,
            streams: StreamRange { initial: 4, max: 4 },
            chunks_per_batch: 8,
            budget_chunks: 64,
            workload: Workload {
                rates: vec![(Duration::ZERO, 60)],
                hot_pages: Some(24),
            },
            // Never converges: passes go on until the dirty set stalls, so late copies of early
            // passes meet later passes.
            downtime_limit: Duration::from_micros(50),
            faults: Faults {
                kill_after_frames: vec![6, 20, 34, 40, 46, 52],
                zombie_streams: true,
                ..Faults::default()
            },
            ..Setup::default()
        });
        completed(&r);
        assert_eq!(r.dest_memory, *r.snapshot.as_ref().unwrap(), "seed {seed}");
        late += r.late_copies_after_newer;
    }
    eprintln!("late copies delivered after a newer pass: {late}");
    assert!(
        late > 0,
        "no schedule delivered an older copy after a newer one"
    );
}

#[test]
fn a_stream_lost_at_any_point_of_a_pass_is_survived() {
    // Pass 0 has 32 data frames (256 pages, 8 a chunk).
    for k in 1..=32 {
        let r = run(Setup {
            seed: k,
            faults: Faults {
                kill_after_frames: vec![k],
                ..Faults::default()
            },
            workload: busy(),
            ..Setup::default()
        });
        let c = completed(&r);
        assert!(
            c.resilience.streams_lost >= 1,
            "frame {k}: {:?}",
            c.resilience
        );
        assert_eq!(r.dest_memory, *r.snapshot.as_ref().unwrap(), "frame {k}");
    }
}

#[test]
fn every_stream_lost_then_a_reconnection_resumes() {
    let r = run(Setup {
        // One stream: no background join can stand in for the reconnection.
        streams: StreamRange { initial: 1, max: 1 },
        faults: Faults {
            kill_all_after_frames: Some(12),
            failed_reconnects: 2,
            ..Faults::default()
        },
        workload: busy(),
        ..Setup::default()
    });
    let c = completed(&r);
    assert!(c.resilience.reconnects >= 1, "{:?}", c.resilience);
    assert_eq!(
        r.reconnect_attempts, 3,
        "two failed attempts, then one that worked"
    );
    // Resumed, not restarted: what was re-sent is at most what was in flight.
    assert!(c.resilience.resent_chunks <= 16, "{:?}", c.resilience);
}

#[test]
fn every_reconnection_failing_ends_with_the_guest_running() {
    let r = run(Setup {
        faults: Faults {
            kill_all_after_frames: Some(12),
            failed_reconnects: u32::MAX,
            joins_fail: true,
            ..Faults::default()
        },
        reconnect_attempts: 3,
        workload: busy(),
        ..Setup::default()
    });
    assert!(
        matches!(failure(&r), Error::StreamsLost { attempts: 3, .. }),
        "{:?}",
        failure(&r)
    );
    assert!(r.guest_running);
    assert_eq!(r.reconnect_attempts, 3);
}

#[test]
fn acknowledgements_that_never_come_time_out_and_the_guest_runs() {
    let r = run(Setup {
        faults: Faults {
            acks_stop_after: Some(5),
            ..Faults::default()
        },
        ..Setup::default()
    });
    let e = failure(&r);
    assert!(
        matches!(e, Error::Timeout(m) if m.contains("acknowledging")),
        "{e:?}"
    );
    assert!(
        r.virtual_time >= Duration::from_secs(2),
        "timed out after {:?}",
        r.virtual_time
    );
    assert!(r.guest_running && !r.paused_ever);
}

#[test]
fn a_destination_that_stops_reading_fills_the_pool_and_times_out() {
    let r = run(Setup {
        budget_chunks: 8,
        faults: Faults {
            reading_stops_after: Some(3),
            ..Faults::default()
        },
        ..Setup::default()
    });
    let e = failure(&r);
    assert!(
        matches!(e, Error::Timeout(m) if m.contains("buffer pool")),
        "{e:?}"
    );
    assert!(r.max_in_flight <= r.budget);
    assert!(r.guest_running);
}

#[test]
fn a_guest_that_calms_down_converges() {
    // Busy for the first 15 ms of virtual time, nearly idle after.
    let r = run(Setup {
        pages: 512,
        // A link of 8 pages per 200 µs: a pass over all memory takes about 13 ms.
        frame_time: Duration::from_micros(200),
        workload: Workload {
            rates: vec![(Duration::ZERO, 200), (Duration::from_millis(15), 1)],
            hot_pages: None,
        },
        ..Setup::default()
    });
    let c = completed(&r);
    assert_eq!(c.stop_reason, StopReason::Converged, "{:?}", c.passes);
    assert!(
        c.passes.len() >= 3,
        "it took passes to calm down: {:?}",
        c.passes
    );
    let last = &c.passes[c.passes.len() - 2];
    assert!(last.predicted_downtime_ms <= 5.0, "{last:?}");
}

#[test]
fn a_guest_that_never_calms_down_still_ends_correctly() {
    let r = run(Setup {
        pages: 512,
        frame_time: Duration::from_micros(200),
        workload: Workload {
            rates: vec![(Duration::ZERO, 400)],
            hot_pages: None,
        },
        max_iterations: 8,
        ..Setup::default()
    });
    let c = completed(&r);
    assert!(
        matches!(
            c.stop_reason,
            StopReason::Stalled | StopReason::IterationLimit
        ),
        "{:?} {:?}",
        c.stop_reason,
        c.passes
    );
    assert_eq!(r.dest_memory, *r.snapshot.as_ref().unwrap());
}

#[test]
fn cancel_before_the_commit_leaves_the_guest_running() {
    for state in ["Precopy", "FinalPass", "AwaitingVerdict"] {
        let r = run(Setup {
            workload: busy(),
            faults: Faults {
                cancel_in: Some(state),
                ..Faults::default()
            },
            ..Setup::default()
        });
        assert!(
            matches!(failure(&r), Error::Cancelled),
            "{state}: {:?}",
            failure(&r)
        );
        assert!(r.guest_running, "{state}");
        assert_eq!(
            r.resumed, r.paused_ever,
            "{state}: resumed exactly when paused"
        );
        assert!(
            !matches!(r.dest, Some(Ok(_))),
            "{state}: the destination took over"
        );
    }
}

#[test]
fn a_failure_after_the_commit_is_unconfirmed_and_the_guest_stays_paused() {
    let r = run(Setup {
        workload: busy(),
        faults: Faults {
            lose_commit_ack: true,
            ..Faults::default()
        },
        ..Setup::default()
    });
    assert!(
        matches!(failure(&r), Error::HandoverUnconfirmed(_)),
        "{:?}",
        failure(&r)
    );
    assert!(!r.guest_running && !r.resumed);
    assert!(
        matches!(r.dest, Some(Ok(_))),
        "the destination committed: {:?}",
        r.dest
    );
}

#[test]
fn losing_the_handover_stream_fails_before_the_commit_and_is_unconfirmed_after_it() {
    let before = run(Setup {
        faults: Faults {
            kill_handover_stream_in: Some("AwaitingVerdict"),
            ..Faults::default()
        },
        ..Setup::default()
    });
    let e = failure(&before);
    assert!(
        matches!(e, Error::Protocol(m) if m.contains("carrying the handover")),
        "{e:?}"
    );
    assert!(before.guest_running && before.resumed);

    let after = run(Setup {
        faults: Faults {
            kill_handover_stream_in: Some("AwaitingCommitAck"),
            ..Faults::default()
        },
        ..Setup::default()
    });
    let e = failure(&after);
    assert!(
        matches!(e, Error::HandoverUnconfirmed(m) if m.contains("no confirmation")),
        "{e:?}"
    );
    assert!(
        !after.guest_running && !after.resumed,
        "the guest must stay paused"
    );
}

#[test]
fn a_digest_mismatch_resumes_the_guest() {
    let r = run(Setup {
        workload: busy(),
        faults: Faults {
            corrupt_dest_digest: true,
            ..Faults::default()
        },
        ..Setup::default()
    });
    assert!(
        matches!(failure(&r), Error::DigestMismatch { .. }),
        "{:?}",
        failure(&r)
    );
    assert!(r.guest_running && r.resumed);
}

/// Bytes released per whole second of virtual time, from `from` on.
fn per_second(r: &Run, from: Duration, to: Duration) -> Vec<f64> {
    let mut out = Vec::new();
    let mut start = from;
    while start + Duration::from_secs(1) <= to {
        let end = start + Duration::from_secs(1);
        let bytes: u64 = r
            .released
            .iter()
            .filter(|(t, _)| *t >= start && *t < end)
            .map(|&(_, b)| b)
            .sum();
        out.push(bytes as f64);
        start = end;
    }
    out
}

#[test]
fn a_bandwidth_cap_holds_over_every_second_and_a_new_one_within_one() {
    // 4096 pages of 64 simulated wire bytes: 256 KiB for pass 0, 4 s at 64 KiB/s.
    let cap = 65536.0;
    let r = run(Setup {
        pages: 4096,
        max_bandwidth: Some(cap),
        bandwidth_changes: vec![(Duration::from_millis(2500), Some(cap / 2.0))],
        ..Setup::default()
    });
    completed(&r);
    let first = per_second(&r, Duration::ZERO, Duration::from_millis(2500));
    assert!(first.len() >= 2, "{first:?}");
    for (k, b) in first.iter().enumerate() {
        assert!(
            (b - cap).abs() <= 0.05 * cap,
            "second {k}: {b} bytes at a cap of {cap}"
        );
    }
    // Within a second of the change the new cap holds.
    let after = per_second(&r, Duration::from_millis(3500), r.virtual_time);
    assert!(
        !after.is_empty(),
        "the migration ended too soon: {:?}",
        r.virtual_time
    );
    for (k, b) in after.iter().enumerate() {
        assert!(
            (b - cap / 2.0).abs() <= 0.05 * cap / 2.0,
            "second {k} after the change: {b}"
        );
    }
    // Lifting the cap lets it run at the simulated link's speed again.
    let free = run(Setup {
        pages: 4096,
        max_bandwidth: Some(cap),
        bandwidth_changes: vec![(Duration::from_millis(1000), None)],
        ..Setup::default()
    });
    assert!(
        free.virtual_time < Duration::from_millis(1500),
        "{:?}",
        free.virtual_time
    );
}

#[test]
fn pba_forecasts_the_link_the_passes_see_and_the_downtime_prediction_uses_it() {
    // A writing guest behind a 64 KiB/s cap: PBA, fed the streams' acknowledged bytes, must
    // forecast the cap, and the reports carry its forecast.
    let cap = 65536.0;
    let r = run(Setup {
        pages: 4096,
        max_bandwidth: Some(cap),
        workload: busy(),
        ..Setup::default()
    });
    let done = completed(&r);
    let forecasts: Vec<f64> = done
        .passes
        .iter()
        .map(|p| p.link_forecast_bps)
        .filter(|&f| f > 0.0)
        .collect();
    assert!(
        !forecasts.is_empty(),
        "no pass had a forecast: {:?}",
        done.passes
    );
    for f in &forecasts {
        assert!(
            (f - cap).abs() <= 0.15 * cap,
            "forecast {f} for a cap of {cap}"
        );
    }
}

fn dest_machine() -> (DestMachine, std::time::Instant) {
    let t0 = std::time::Instant::now();
    let mut m = DestMachine::new(
        DestParams {
            announced_streams: 2,
            rejoin_window: Duration::from_secs(1),
        },
        t0,
    );
    assert_eq!(
        m.poll_action(),
        Some(DestAction::AcceptStream {
            index: 0,
            pooled: false
        })
    );
    (m, t0)
}

/// A stream asks to join; returns the machine's answer.
fn join(
    m: &mut DestMachine,
    t0: std::time::Instant,
    index: u16,
    pooled: bool,
) -> Option<DestAction> {
    m.handle(t0, DestEvent::StreamJoined { index, pooled });
    m.poll_action()
}

fn finish(frames: u64) -> dwcp_core::messages::Finish {
    dwcp_core::messages::Finish {
        final_iteration: 1,
        data_frames: frames,
    }
}

fn finished_err(m: &mut DestMachine) -> String {
    loop {
        match m.poll_action() {
            Some(DestAction::Finished(Err(f))) => return f.0.to_string(),
            Some(_) => continue,
            None => panic!("the session did not fail"),
        }
    }
}

#[test]
fn the_destination_refuses_streams_it_should_not_take() {
    let (mut m, t0) = dest_machine();
    let refused = |a: Option<DestAction>, index: u16, why: &str| matches!(&a, Some(DestAction::RefuseStream { index: i, why: w }) if *i == index && w.contains(why));
    assert!(refused(join(&mut m, t0, 0, false), 0, "in use"));
    assert_eq!(
        join(&mut m, t0, 1, true),
        Some(DestAction::AcceptStream {
            index: 1,
            pooled: true
        })
    );
    // Twice the announced count at most.
    for index in [2, 3] {
        assert_eq!(
            join(&mut m, t0, index, false),
            Some(DestAction::AcceptStream {
                index,
                pooled: false
            })
        );
    }
    assert!(refused(join(&mut m, t0, 4, false), 4, "at most 2"));
    // After Finish, nobody joins.
    m.handle(
        t0,
        DestEvent::Finish {
            finish: finish(0),
            stream: 0,
        },
    );
    assert_eq!(m.poll_action(), Some(DestAction::StopData));
    assert_eq!(m.poll_action(), Some(DestAction::CheckReceived));
    assert!(refused(join(&mut m, t0, 5, false), 5, "ending"));
}

#[test]
fn the_destination_gives_up_on_a_source_that_never_reconnects() {
    let (mut m, t0) = dest_machine();
    m.handle(
        t0,
        DestEvent::StreamEnded {
            index: 0,
            end: StreamEnd::Lost(Error::Timeout("gone".into())),
        },
    );
    assert_eq!(m.poll_action(), None, "a lost stream alone ends nothing");
    let deadline = m.poll_timeout().expect("the rejoin window runs");
    assert_eq!(deadline, t0 + Duration::from_secs(1));
    m.handle(t0 + Duration::from_millis(999), DestEvent::Tick);
    assert_eq!(m.poll_action(), None);
    m.handle(deadline, DestEvent::Tick);
    assert!(finished_err(&mut m).contains("did not reconnect"));
}

#[test]
fn the_destination_refuses_a_commit_with_another_digest_and_a_second_finish() {
    let (mut m, t0) = dest_machine();
    m.handle(
        t0,
        DestEvent::Finish {
            finish: finish(3),
            stream: 0,
        },
    );
    m.handle(
        t0,
        DestEvent::Received {
            frames_complete: true,
            distinct_chunks: 3,
            in_progress: 0,
            missing_pages: 0,
        },
    );
    m.handle(t0, DestEvent::DigestComputed(42));
    let actions: Vec<_> = std::iter::from_fn(|| m.poll_action()).collect();
    assert!(
        actions.contains(&DestAction::SendVerdict {
            stream: 0,
            digest: 42
        }),
        "{actions:?}"
    );
    m.handle(
        t0,
        DestEvent::Commit {
            digest: 41,
            stream: 0,
        },
    );
    assert!(finished_err(&mut m).contains("digest"));
    assert!(!m.is_committed());

    let (mut m, t0) = dest_machine();
    m.handle(
        t0,
        DestEvent::Finish {
            finish: finish(0),
            stream: 0,
        },
    );
    m.handle(
        t0,
        DestEvent::Finish {
            finish: finish(0),
            stream: 0,
        },
    );
    assert!(finished_err(&mut m).contains("second finish"));

    // Finish with frames missing is refused before any digest.
    let (mut m, t0) = dest_machine();
    m.handle(
        t0,
        DestEvent::Finish {
            finish: finish(5),
            stream: 0,
        },
    );
    m.handle(
        t0,
        DestEvent::Received {
            frames_complete: false,
            distinct_chunks: 4,
            in_progress: 0,
            missing_pages: 0,
        },
    );
    assert!(finished_err(&mut m).contains("5 data frames, 4 distinct"));
}

fn merge(into: &mut BTreeMap<&'static str, u64>, from: &BTreeMap<&'static str, u64>) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

#[test]
fn the_scenarios_visit_every_state_of_both_machines() {
    let scenarios = [
        Setup {
            workload: busy(),
            ..Setup::default()
        },
        Setup {
            faults: Faults {
                kill_all_after_frames: Some(8),
                failed_reconnects: 1,
                ..Faults::default()
            },
            workload: busy(),
            ..Setup::default()
        },
        Setup {
            faults: Faults {
                cancel_in: Some("AwaitingCommitAck"),
                ..Faults::default()
            },
            ..Setup::default()
        },
        Setup {
            faults: Faults {
                corrupt_dest_digest: true,
                ..Faults::default()
            },
            ..Setup::default()
        },
    ];
    let (mut src, mut dst) = (BTreeMap::new(), BTreeMap::new());
    for s in scenarios {
        let r = run(s);
        merge(&mut src, &r.source_states);
        merge(&mut dst, &r.dest_states);
    }
    eprintln!("source machine states visited (events handled in each): {src:?}");
    eprintln!("destination machine states visited: {dst:?}");
    for s in SourceMachine::STATES {
        assert!(
            src.contains_key(s),
            "source state {s} never visited: {src:?}"
        );
    }
    for s in DestMachine::STATES {
        assert!(
            dst.contains_key(s),
            "destination state {s} never visited: {dst:?}"
        );
    }
}

fn schedule() -> impl Strategy<Value = Setup> {
    (
        any::<u64>(),
        1usize..=4,
        0usize..=2,
        4u64..=32,
        0u64..=150,
        prop::option::of(8u64..=200),
        0u64..=15,
        0u32..=3,
        any::<bool>(),
    )
        .prop_map(
            |(seed, initial, extra, budget, rate, hot, loss, failed_reconnects, joins_fail)| {
                Setup {
                    seed,
                    streams: StreamRange {
                        initial,
                        max: initial + extra,
                    },
                    budget_chunks: budget.max(4),
                    workload: Workload {
                        rates: vec![(Duration::ZERO, rate)],
                        hot_pages: hot,
                    },
                    faults: Faults {
                        random_loss_per_mille: loss,
                        failed_reconnects,
                        joins_fail,
                        ..Faults::default()
                    },
                    ..Setup::default()
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        failure_persistence: None,
        rng_algorithm: proptest::test_runner::RngAlgorithm::ChaCha,
        ..ProptestConfig::default()
    })]

    /// Whatever the schedule: the destination's memory equals the source's at pause time when both
    /// finished; the guest runs whenever the migration did not commit; memory in flight stays within
    /// the budget; both machines finish.
    #[test]
    fn random_schedules_keep_the_invariants(setup in schedule()) {
        let lossless = setup.faults.random_loss_per_mille == 0;
        let r = Sim::new(setup).run(STEPS);
        assert_invariants(&r);
        prop_assert!(r.dest.is_some(), "the destination never finished");
        if lossless {
            prop_assert!(matches!(r.source, Some(Ok(_))), "a lossless schedule failed: {:?}", r.source);
        }
    }
}

#[test]
fn a_recorded_handover_commits_and_the_destination_takes_over() {
    let r = run(Setup {
        workload: busy(),
        handover: Some(dwcp_core::HandoverDecision::Recorded),
        ..Setup::default()
    });
    assert!(r.handover_recorded && r.commit_sent);
    assert!(r.source.as_ref().unwrap().is_ok(), "{:?}", r.source);
    assert!(matches!(r.dest, Some(Ok(_))), "{:?}", r.dest);
    assert_eq!(r.dest_memory, *r.snapshot.as_ref().unwrap());
}

#[test]
fn a_refused_handover_resumes_the_source_and_the_destination_never_takes_over() {
    let r = run(Setup {
        workload: busy(),
        handover: Some(dwcp_core::HandoverDecision::Refused("stale fence".into())),
        ..Setup::default()
    });
    assert!(
        matches!(failure(&r), Error::HandoverRefused(reason) if reason == "stale fence"),
        "{:?}",
        failure(&r)
    );
    assert!(r.handover_recorded && !r.commit_sent);
    assert!(r.guest_running && r.resumed);
    assert!(!matches!(r.dest, Some(Ok(_))), "{:?}", r.dest);
}

#[test]
fn an_unknown_handover_record_leaves_both_sides_stopped() {
    let r = run(Setup {
        workload: busy(),
        handover: Some(dwcp_core::HandoverDecision::Unknown("no leader".into())),
        ..Setup::default()
    });
    assert!(
        matches!(failure(&r), Error::HandoverUnconfirmed(_)),
        "{:?}",
        failure(&r)
    );
    assert!(!r.commit_sent);
    assert!(
        !r.guest_running && !r.resumed,
        "the source must not run a VM the registry may have moved"
    );
    assert!(!matches!(r.dest, Some(Ok(_))), "{:?}", r.dest);
}

/// A guest writing 400 pages per ms of virtual time anywhere in its 256, over a link delivering
/// a frame (8 pages) every 50 µs: its dirty set never shrinks below what a pause within the
/// operator's ceiling of 200 µs could send.
fn faster_than_the_link(postcopy: bool) -> Setup {
    Setup {
        workload: Workload::constant(400),
        downtime_limit: Duration::from_micros(50),
        downtime_ceiling: Some(Duration::from_micros(200)),
        postcopy,
        ..Setup::default()
    }
}

#[test]
fn a_guest_faster_than_the_link_fails_without_post_copy_and_completes_with_it() {
    let r = run(faster_than_the_link(false));
    assert!(
        matches!(failure(&r), Error::NotConverged { .. }),
        "{}",
        failure(&r)
    );
    assert!(r.guest_running, "the guest runs on at the source");

    let r = run(faster_than_the_link(true));
    let c = completed(&r);
    assert_eq!(c.stop_reason, StopReason::Postcopy);
    let handoff = c.postcopy.as_ref().expect("handed to post-copy");
    assert!(
        !handoff.pages.is_empty(),
        "a guest this busy leaves pages behind"
    );
    assert!(handoff.why.contains("converge"), "{}", handoff.why);
    assert!(
        handoff.pages.windows(2).all(|w| w[0] < w[1]),
        "sorted, distinct"
    );
    assert!(
        !r.guest_running && !r.resumed,
        "paused, never resumed: the VM moves on"
    );
    assert!(matches!(r.dest, Some(Ok(_))), "{:?}", r.dest);
    // assert_invariants (in `run`) checked that every other page is right at the destination.
    let differing = r
        .snapshot
        .as_ref()
        .unwrap()
        .iter()
        .zip(&r.dest_memory)
        .filter(|(a, b)| a != b)
        .count();
    assert!(differing as u64 <= handoff.pages.len() as u64);
}
