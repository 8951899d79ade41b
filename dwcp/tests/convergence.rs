//! Convergence without knobs: a guest that dirties pages more than twice as fast as the link
//! carries them completes within the operator's downtime ceiling when its vCPUs can be throttled,
//! and fails with the figures (the guest running at full speed on the source) when they cannot.

mod common;

use std::time::Duration;

use common::*;
use dwcp::{Migration, MigrationConfig, ThrottleSteps};
use dwcp_core::Error;
use dwcp_core::memory::VmControl;
use dwcp_core::sim::{ContentMix, SimControl, SimulatedGuest};

/// Link cap, bytes per second on the wire.
const LINK: u64 = 8 << 20;
/// The workload's bytes per second, in writes of 1920 bytes on average, each to a random page.
const WRITES: u64 = 32 << 20;
/// Throttle steps that reach the throttle the guest needs in three passes (QEMU's would take eight).
const STEPS: ThrottleSteps = ThrottleSteps {
    initial: 50,
    increment: 20,
    max: 90,
};
const CEILING: Duration = Duration::from_millis(250);

fn config(throttle: Option<ThrottleSteps>) -> MigrationConfig {
    MigrationConfig {
        max_bandwidth: Some(LINK),
        throttle,
        downtime_ceiling: Some(CEILING),
        stall_passes: 2,
        ..source_config()
    }
}

/// A SimControl that cannot throttle, like a hypervisor without the feature.
struct NoThrottle(SimControl);

impl VmControl for NoThrottle {
    fn pause(&mut self) -> Result<(), Error> {
        self.0.pause()
    }
    fn resume(&mut self) {
        self.0.resume()
    }
    fn handed_over(&mut self) {
        self.0.handed_over()
    }
}

fn busy_guest(seed: u64) -> std::sync::Arc<SimulatedGuest> {
    let g = guest(8 << 20, ContentMix::RANDOM, seed);
    g.start_workload(WRITES, seed);
    g
}

#[test]
fn a_guest_dirtying_twice_the_link_rate_converges_by_throttling() {
    let g = busy_guest(51);
    let (addr, rx) = spawn_receiver(psk(1), receiver_config());
    let report = Migration::new(addr, psk(1))
        .config(config(Some(STEPS)))
        .run(&*g, &mut g.dirty_log(), &mut g.control())
        .unwrap();
    let (received, ram) = rx.join().unwrap();
    received.unwrap();
    assert_same_memory(&*g, &ram.unwrap());
    let first = &report.passes[0];
    // Pages the workload touches per second against pages pass 0 sent per second.
    let touched = WRITES as f64 / 1920.0;
    let sent = first.pages as f64 / (first.duration_ms / 1e3);
    eprintln!(
        "the guest touches {touched:.0} pages/s, pass 0 sent {sent:.0} pages/s; downtime {:.1} ms (predicted {:.1}); (dirtied, throttle) per pass {:?}",
        report.downtime_ms,
        report.predicted_downtime_ms,
        report
            .passes
            .iter()
            .map(|p| (p.dirtied_pages, p.throttle_percent))
            .collect::<Vec<_>>()
    );
    assert!(touched >= 2.0 * sent, "the guest does not outrun the link");
    assert!(report.converged, "stop reason {}", report.stop_reason);
    assert!(report.predicted_downtime_ms <= CEILING.as_secs_f64() * 1e3);
    let throttle = report.passes.iter().map(|p| p.throttle_percent).max();
    assert!(throttle >= Some(20), "never throttled: {throttle:?}");
}

#[test]
fn without_a_throttle_the_same_guest_fails_with_the_figures_and_runs_on() {
    let g = busy_guest(52);
    let (addr, rx) = spawn_receiver(psk(1), receiver_config());
    let err = Migration::new(addr, psk(1))
        .config(config(Some(STEPS)))
        .run(&*g, &mut g.dirty_log(), &mut NoThrottle(g.control()))
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::NotConverged { .. }), "{message}");
    assert!(
        message.contains("against a ceiling of 250 ms") && message.contains("throttled 0 %"),
        "{message}"
    );
    assert_eq!(err.reason(), dwcp_core::FailureReason::NotConverged);
    assert!(rx.join().unwrap().0.is_err(), "the destination discards it");
    assert!(guest_keeps_running(&g));
    assert_eq!(g.throttle_percent(), 0);
}

#[test]
fn a_failed_migration_lifts_the_throttle_it_set() {
    // A throttle of at most 30 % leaves the guest outrunning the link: every aid is tried, then
    // the migration fails.
    let g = busy_guest(53);
    let (addr, rx) = spawn_receiver(psk(1), receiver_config());
    let err = Migration::new(addr, psk(1))
        .config(config(Some(ThrottleSteps {
            initial: 20,
            increment: 10,
            max: 30,
        })))
        .run(&*g, &mut g.dirty_log(), &mut g.control())
        .unwrap_err();
    assert!(err.to_string().contains("throttled 30 %"), "{err}");
    assert!(rx.join().unwrap().0.is_err());
    assert_eq!(g.throttle_percent(), 0, "the throttle was lifted");
    assert!(guest_keeps_running(&g));
}
