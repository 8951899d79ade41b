//! What a running migration tells its observer: events in order, progress that never runs
//! backwards, the reason a migration failed, and the Prometheus gauges that mirror them.

mod common;

use std::sync::Mutex;
use std::sync::atomic::Ordering;

use common::*;
use dwcp::report::LatencyOp;
use dwcp::{
    FailureReason, Migration, MigrationConfig, MigrationEvent, MigrationMetrics, MigrationPhase,
};
use dwcp_core::Error;
use dwcp_core::sim::ContentMix;

fn gauge(registry: &prometheus::Registry, name: &str, label: Option<(&str, &str)>) -> f64 {
    let family = registry
        .gather()
        .into_iter()
        .find(|f| f.name() == name)
        .unwrap_or_else(|| panic!("no metric {name}"));
    let metric = family
        .get_metric()
        .iter()
        .find(|m| {
            label.is_none_or(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == k && l.value() == v)
            })
        })
        .unwrap_or_else(|| panic!("no metric {name} {label:?}"));
    if family.get_field_type() == prometheus::proto::MetricType::COUNTER {
        metric.get_counter().get_value()
    } else {
        metric.get_gauge().get_value()
    }
}

#[test]
fn progress_never_runs_backwards_on_a_guest_that_dirties_faster_than_the_link() {
    // 8 MiB of incompressible pages through a 6 MiB/s cap, rewritten at 32 MiB/s: each pass finds
    // about the whole guest dirty again, more than it sent.
    let g = guest(8 << 20, ContentMix::RANDOM, 41);
    g.start_workload(32 << 20, 41);
    let (addr, rx) = spawn_receiver(psk(1), receiver_config());
    let registry = prometheus::Registry::new();
    let metrics = MigrationMetrics::register(&registry).unwrap();
    let events = Mutex::new(Vec::new());
    let record = |e: &MigrationEvent| events.lock().unwrap().push(e.clone());
    let report = Migration::new(addr, psk(1))
        .config(MigrationConfig {
            max_bandwidth: Some(6 << 20),
            max_iterations: 4,
            ..source_config()
        })
        .metrics(metrics)
        .on_event(&record)
        .run(&*g, &mut g.dirty_log(), &mut g.control())
        .unwrap();
    g.stop();
    let (received, _) = rx.join().unwrap();
    let received = received.unwrap();
    let events = events.into_inner().unwrap();

    // Latency of every step, on both sides, and the same counts in the Prometheus histogram.
    for op in [
        LatencyOp::StreamSetup,
        LatencyOp::Encode,
        LatencyOp::Send,
        LatencyOp::Ack,
        LatencyOp::Digest,
    ] {
        let l = report
            .latency
            .get(op)
            .unwrap_or_else(|| panic!("no {op:?}"));
        assert!(
            l.count > 0 && l.p50_us <= l.p99_us && l.p99_us <= l.max_us,
            "{l:?}"
        );
        let family = registry
            .gather()
            .into_iter()
            .find(|f| f.name() == "dwcp_latency_seconds")
            .unwrap();
        let h = family
            .get_metric()
            .iter()
            .find(|m| m.get_label().iter().any(|x| x.value() == op.as_str()))
            .unwrap()
            .get_histogram()
            .get_sample_count();
        assert_eq!(h, l.count, "{op:?}");
    }
    let acks = report.latency.get(LatencyOp::Ack).unwrap().count;
    let sends = report.latency.get(LatencyOp::Send).unwrap().count;
    assert_eq!(acks, sends, "every chunk written was acknowledged once");
    let decoded = received.latency.get(LatencyOp::Decode).unwrap().count;
    assert_eq!(
        decoded,
        received.latency.get(LatencyOp::Apply).unwrap().count
    );
    assert!(
        decoded >= acks,
        "{decoded} chunks decoded, {acks} acknowledged"
    );

    let phases: Vec<MigrationPhase> = events
        .iter()
        .filter_map(|e| match e {
            MigrationEvent::Phase { phase } => Some(*phase),
            _ => None,
        })
        .collect();
    assert_eq!(
        phases,
        [
            MigrationPhase::Connecting,
            MigrationPhase::Precopy,
            MigrationPhase::StopAndCopy,
            MigrationPhase::Handover
        ]
    );
    assert!(
        matches!(events.last(), Some(MigrationEvent::Completed { percent, .. }) if *percent == 100.0),
        "{:?}",
        events.last()
    );
    let passes = events
        .iter()
        .filter(|e| matches!(e, MigrationEvent::Pass(_)))
        .count();
    assert_eq!(
        passes as u32 + 1,
        report.iterations,
        "one event per pre-copy pass"
    );

    let progress: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            MigrationEvent::Progress(p) => Some(*p),
            _ => None,
        })
        .collect();
    assert!(progress.len() > 10, "{} progress events", progress.len());
    let mut remaining_grew = false;
    let mut ratio_fell = false;
    for w in progress.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        assert!(b.percent >= a.percent, "{} then {}", a.percent, b.percent);
        assert!(b.logical_bytes >= a.logical_bytes);
        assert!(b.percent < 100.0);
        remaining_grew |= b.remaining_bytes > a.remaining_bytes;
        let ratio = |p: &dwcp::Progress| {
            p.logical_bytes as f64 / (p.logical_bytes + p.remaining_bytes) as f64
        };
        ratio_fell |= ratio(b) < ratio(a);
        assert!(b.remaining_bytes <= b.memory_bytes);
    }
    // The case the percentage's definition is for happened: the work left grew, and the share done
    // of (done + left) fell.
    assert!(
        remaining_grew && ratio_fell,
        "the guest never outran the link"
    );
    let precopy_after_pass_0 = progress
        .iter()
        .find(|p| p.iteration == 1 && !p.paused)
        .expect("a second pre-copy pass");
    assert!(
        precopy_after_pass_0.dirty_rate_bps > 0.0,
        "the dirty rate of pass 0 is known in pass 1"
    );
    let stop_and_copy = progress.iter().find(|p| p.paused).expect("a final pass");
    assert_eq!(stop_and_copy.phase, MigrationPhase::StopAndCopy);
    assert!(stop_and_copy.eta_s.is_some());

    assert_eq!(
        gauge(&registry, "dwcp_migration_progress_percent", None),
        100.0
    );
    assert_eq!(
        gauge(
            &registry,
            "dwcp_migration_phase",
            Some(("phase", "completed"))
        ),
        1.0
    );
    assert_eq!(
        gauge(
            &registry,
            "dwcp_migration_phase",
            Some(("phase", "precopy"))
        ),
        0.0
    );
    assert!(
        gauge(
            &registry,
            "dwcp_migration_progress",
            Some(("field", "done_bytes"))
        ) > 0.0
    );
}

#[test]
fn a_cancelled_migration_ends_with_its_reason_and_phase() {
    let g = guest(8 << 20, ContentMix::RANDOM, 42);
    g.start_workload(16 << 20, 42);
    let (addr, rx) = spawn_receiver(psk(1), receiver_config());
    let registry = prometheus::Registry::new();
    let metrics = MigrationMetrics::register(&registry).unwrap();
    let events = Mutex::new(Vec::new());
    let migration = Migration::new(addr, psk(1)).config(MigrationConfig {
        max_bandwidth: Some(8 << 20),
        ..source_config()
    });
    let cancel = migration.cancel_handle();
    let record = |e: &MigrationEvent| {
        if matches!(e, MigrationEvent::Progress(p) if p.iteration == 1) {
            cancel.store(true, Ordering::Relaxed);
        }
        events.lock().unwrap().push(e.clone());
    };
    let err = migration
        .metrics(metrics)
        .on_event(&record)
        .run(&*g, &mut g.dirty_log(), &mut g.control())
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert!(guest_keeps_running(&g));
    g.stop();
    let (received, _) = rx.join().unwrap();
    assert!(
        received.is_err(),
        "the destination discards a cancelled session"
    );
    let events = events.into_inner().unwrap();
    match events.last() {
        Some(MigrationEvent::Failed {
            reason,
            phase,
            source_running,
            message,
        }) => {
            assert_eq!(*reason, FailureReason::Cancelled);
            assert_eq!(*phase, MigrationPhase::Precopy);
            assert!(*source_running);
            assert!(message.contains("cancelled"), "{message}");
        }
        other => panic!("last event {other:?}"),
    }
    assert_eq!(
        gauge(
            &registry,
            "dwcp_migration_failures_total",
            Some(("reason", "cancelled"))
        ),
        1.0
    );
    assert_eq!(
        gauge(&registry, "dwcp_migration_phase", Some(("phase", "failed"))),
        1.0
    );
}
