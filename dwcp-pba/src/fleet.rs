//! A host evacuating many guests at once, simulated: the capacity planning the real fleet demo
//! (`dwcp demo --vms N`) cannot reach on two cores.
//!
//! A fluid model in exact event time. Each migration runs pre-copy passes at the share
//! [`allocate`] gives it of the host's uplink (re-split whenever a migration starts or ends); a
//! pass dirties what the guest writes while it runs; pre-copy ends, as in the engine, when the
//! dirty set is predicted to fit the downtime limit at the rate the last pass saw (plus the
//! handover's round trips), when it stops shrinking for three passes, or after the last allowed
//! pass. The guest is then paused while its last dirty set is sent. What the model leaves out: CPU
//! (it assumes the encoder keeps up), compression (bytes are wire bytes), and rewrites of one page
//! within a pass (a pass dirties `dirty rate × its time`, at most the guest's memory).

use crate::PbaError;
use crate::alloc::{Demand, allocate, jain_index};

/// One migration of the fleet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FleetMigration {
    /// Guest memory, bytes.
    pub memory_bytes: f64,
    /// What the guest dirties while it runs, bytes/s.
    pub dirty_bytes_per_sec: f64,
    /// Its weight in the uplink's split.
    pub weight: f64,
    /// Its own cap, bytes/s (infinite: none).
    pub max_rate: f64,
    /// When it starts, seconds after the first.
    pub start_at: f64,
}

/// The host and the engine's policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FleetSpec {
    /// The host's uplink, bytes/s.
    pub uplink: f64,
    /// Round trip to the destinations, seconds.
    pub rtt: f64,
    /// The downtime each migration aims at, seconds.
    pub downtime_limit: f64,
    /// Pre-copy passes before stop-and-copy is forced.
    pub max_passes: u32,
    /// Bytes each running migration holds in buffers besides what is in flight (its batch).
    pub batch_bytes: f64,
    /// Most migrations running at once; the others wait, in order, for one to send its last byte
    /// (0: no limit).
    pub max_running: usize,
}

impl Default for FleetSpec {
    /// The engine's defaults on a 10 Gbit/s datacenter uplink.
    fn default() -> Self {
        Self {
            uplink: 1.25e9,
            rtt: 0.5e-3,
            downtime_limit: 0.05,
            max_passes: 30,
            batch_bytes: 16.0 * 1024.0 * 1024.0,
            max_running: 0,
        }
    }
}

/// How one migration went.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MigrationOutcome {
    /// From its start to the end of its handover, seconds.
    pub total_time: f64,
    /// From when it was due to start to the end of its handover (the wait for room included).
    pub completion_time: f64,
    /// The guest's pause, seconds.
    pub downtime: f64,
    /// Passes, the final one included.
    pub passes: u32,
    /// Whether pre-copy met the downtime limit (rather than being forced to stop).
    pub converged: bool,
    /// Bytes sent.
    pub bytes_sent: f64,
}

/// How the fleet went.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetOutcome {
    /// Per migration, in the order given.
    pub migrations: Vec<MigrationOutcome>,
    /// From the first start to the last end, seconds.
    pub makespan: f64,
    /// Jain's index of the migrations' throughputs (memory over total time).
    pub jain_index: f64,
    /// Most bytes the running migrations held in buffers at once: what was in flight (their rates
    /// times the round trip) and a batch each. The shared buffer pool must hold this for no
    /// migration to wait for buffers.
    pub peak_buffer_bytes: f64,
    /// Most migrations running at once.
    pub peak_running: usize,
    /// Highest sum of rates at any time, bytes/s (never above the uplink).
    pub peak_total_rate: f64,
    /// Events simulated.
    pub events: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Waiting,
    Precopy,
    Paused,
    Done,
}

#[derive(Debug, Clone, Copy)]
struct State {
    phase: Phase,
    started: f64,
    pass_started: f64,
    pass_bytes: f64,
    remaining: f64,
    smallest_dirty: f64,
    without_progress: u32,
    paused_at: f64,
    rate: f64,
    out: MigrationOutcome,
}

/// Most events a simulation may take (a guard against parameters that never finish).
pub const MAX_EVENTS: u64 = 50_000_000;

/// Simulates `migrations` leaving one host under `spec`.
pub fn simulate(spec: &FleetSpec, migrations: &[FleetMigration]) -> Result<FleetOutcome, PbaError> {
    check_spec(spec)?;
    for m in migrations {
        check_migration(m)?;
    }
    let n = migrations.len();
    let mut st: Vec<State> = migrations
        .iter()
        .map(|_| State {
            phase: Phase::Waiting,
            started: 0.0,
            pass_started: 0.0,
            pass_bytes: 0.0,
            remaining: 0.0,
            smallest_dirty: f64::INFINITY,
            without_progress: 0,
            paused_at: 0.0,
            rate: 0.0,
            out: MigrationOutcome::default(),
        })
        .collect();
    let t0 = migrations
        .iter()
        .map(|m| m.start_at)
        .fold(f64::INFINITY, f64::min);
    let mut now = if t0.is_finite() { t0 } else { 0.0 };
    let (mut peak_buffers, mut peak_running, mut peak_rate, mut events) = (0.0f64, 0, 0.0f64, 0);
    let mut demands = Vec::with_capacity(n);
    let mut running = Vec::with_capacity(n);
    let mut rates = Vec::with_capacity(n);
    let mut reallocate = true;
    // Below this a pass is over: the model's bytes are floats.
    let epsilon = 1e-6;
    loop {
        events += 1;
        if events > MAX_EVENTS {
            return Err(PbaError::InvalidParameter {
                what: "fleet simulation events",
                value: events as f64,
                expected: "a fleet that finishes within MAX_EVENTS events",
            });
        }
        // Starts due now, while there is room.
        let mut active = st
            .iter()
            .filter(|s| matches!(s.phase, Phase::Precopy | Phase::Paused))
            .count();
        for (i, m) in migrations.iter().enumerate() {
            if spec.max_running > 0 && active >= spec.max_running {
                break;
            }
            if st[i].phase == Phase::Waiting && m.start_at <= now {
                active += 1;
                let s = &mut st[i];
                s.phase = Phase::Precopy;
                s.started = now;
                s.pass_started = now;
                s.pass_bytes = m.memory_bytes;
                s.remaining = m.memory_bytes;
                s.out.passes = 1;
                reallocate = true;
            }
        }
        if reallocate {
            running.clear();
            demands.clear();
            for (i, m) in migrations.iter().enumerate() {
                if matches!(st[i].phase, Phase::Precopy | Phase::Paused) {
                    running.push(i);
                    demands.push(Demand {
                        weight: m.weight,
                        max_rate: m.max_rate,
                        min_rate: 0.0,
                    });
                }
            }
            allocate(spec.uplink, &demands, &mut rates)?;
            for s in st.iter_mut() {
                s.rate = 0.0;
            }
            for (&i, &r) in running.iter().zip(&rates) {
                st[i].rate = r;
            }
            let total: f64 = rates.iter().sum();
            peak_rate = peak_rate.max(total);
            peak_running = peak_running.max(running.len());
            peak_buffers =
                peak_buffers.max(total * spec.rtt + running.len() as f64 * spec.batch_bytes);
            reallocate = false;
        }
        if st.iter().all(|s| s.phase == Phase::Done) {
            break;
        }
        // The next event: a pass ending, or a migration starting.
        let mut next = f64::INFINITY;
        for &i in &running {
            let s = &st[i];
            if s.rate > 0.0 {
                next = next.min(now + s.remaining / s.rate);
            }
        }
        // A migration due but waiting for room starts when one ends, which is an event already.
        for (i, m) in migrations.iter().enumerate() {
            if st[i].phase == Phase::Waiting && m.start_at > now {
                next = next.min(m.start_at);
            }
        }
        if !next.is_finite() {
            return Err(PbaError::InvalidParameter {
                what: "fleet simulation",
                value: now,
                expected: "running migrations with a rate above 0",
            });
        }
        let dt = (next - now).max(0.0);
        now = next;
        for &i in &running {
            let s = &mut st[i];
            let sent = (s.rate * dt).min(s.remaining);
            s.remaining -= sent;
            s.out.bytes_sent += sent;
        }
        for &i in &running {
            let m = &migrations[i];
            let s = &mut st[i];
            if s.remaining > epsilon * s.pass_bytes.max(1.0) {
                continue;
            }
            s.remaining = 0.0;
            match s.phase {
                Phase::Precopy => {
                    let elapsed = (now - s.pass_started).max(1e-12);
                    let dirtied = (m.dirty_bytes_per_sec * elapsed).min(m.memory_bytes);
                    // The engine's rule: the dirty set at the rate this pass saw, and the handover.
                    let seen_rate = s.pass_bytes / elapsed;
                    let handover = if dirtied > 0.0 { 3.0 } else { 2.0 } * spec.rtt;
                    let predicted = dirtied / seen_rate + handover;
                    if dirtied < s.smallest_dirty {
                        s.smallest_dirty = dirtied;
                        s.without_progress = 0;
                    } else {
                        s.without_progress += 1;
                    }
                    let converged = predicted <= spec.downtime_limit;
                    let stop =
                        converged || s.without_progress >= 3 || s.out.passes >= spec.max_passes;
                    s.pass_started = now;
                    s.pass_bytes = dirtied;
                    s.remaining = dirtied;
                    s.out.passes += 1;
                    if stop {
                        s.out.converged = converged;
                        s.phase = Phase::Paused;
                        s.paused_at = now;
                    }
                    if s.remaining <= 0.0 && s.phase == Phase::Paused {
                        finish(s, m.start_at, now, spec.rtt, 2.0);
                        reallocate = true;
                    }
                }
                Phase::Paused => {
                    finish(s, m.start_at, now, spec.rtt, 3.0);
                    reallocate = true;
                }
                Phase::Waiting | Phase::Done => {}
            }
        }
    }
    let outs: Vec<MigrationOutcome> = st.iter().map(|s| s.out).collect();
    let throughputs: Vec<f64> = migrations
        .iter()
        .zip(&outs)
        .map(|(m, o)| m.memory_bytes / o.total_time.max(1e-12))
        .collect();
    let end = st
        .iter()
        .zip(&outs)
        .map(|(s, o)| s.started + o.total_time)
        .fold(0.0, f64::max);
    Ok(FleetOutcome {
        jain_index: jain_index(&throughputs),
        makespan: if n == 0 { 0.0 } else { end - t0 },
        migrations: outs,
        peak_buffer_bytes: peak_buffers,
        peak_running,
        peak_total_rate: peak_rate,
        events,
    })
}

/// Ends a migration whose last bytes are sent at `now`: its handover takes `round_trips`.
fn finish(s: &mut State, due: f64, now: f64, rtt: f64, round_trips: f64) {
    let end = now + round_trips * rtt;
    s.out.downtime = end - s.paused_at;
    s.out.total_time = end - s.started;
    s.out.completion_time = end - due;
    s.phase = Phase::Done;
    s.rate = 0.0;
}

fn check_spec(spec: &FleetSpec) -> Result<(), PbaError> {
    crate::check_rate(spec.uplink)?;
    for (what, v, ok) in [
        (
            "rtt",
            spec.rtt,
            spec.rtt.is_finite() && spec.rtt >= 0.0 && spec.rtt <= 10.0,
        ),
        (
            "downtime_limit",
            spec.downtime_limit,
            spec.downtime_limit.is_finite() && spec.downtime_limit > 0.0,
        ),
        (
            "batch_bytes",
            spec.batch_bytes,
            spec.batch_bytes.is_finite() && spec.batch_bytes >= 0.0,
        ),
        (
            "max_passes",
            f64::from(spec.max_passes),
            (1..=1000).contains(&spec.max_passes),
        ),
    ] {
        if !ok {
            return Err(PbaError::InvalidParameter {
                what,
                value: v,
                expected: "rtt 0..=10 s, downtime_limit > 0, batch_bytes >= 0, max_passes 1..=1000",
            });
        }
    }
    Ok(())
}

fn check_migration(m: &FleetMigration) -> Result<(), PbaError> {
    let ok = m.memory_bytes.is_finite()
        && m.memory_bytes > 0.0
        && m.memory_bytes <= 1e15
        && m.dirty_bytes_per_sec.is_finite()
        && m.dirty_bytes_per_sec >= 0.0
        && m.weight.is_finite()
        && m.weight > 0.0
        && m.max_rate > 0.0
        && !m.max_rate.is_nan()
        && m.start_at.is_finite()
        && m.start_at >= 0.0;
    if ok {
        Ok(())
    } else {
        Err(PbaError::InvalidParameter {
            what: "fleet migration",
            value: m.memory_bytes,
            expected: "memory 0 < bytes <= 1e15, dirty rate >= 0, weight > 0, max_rate > 0, start_at >= 0",
        })
    }
}

/// The per-migration completion time (from when it was due, waiting for room included) at
/// quantile `q` (0..=1).
pub fn time_quantile(outcome: &FleetOutcome, q: f64) -> f64 {
    let mut t: Vec<f64> = outcome
        .migrations
        .iter()
        .map(|m| m.completion_time)
        .collect();
    if t.is_empty() {
        return 0.0;
    }
    t.sort_by(f64::total_cmp);
    t[((t.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1024.0 * 1024.0;

    fn guest(memory: f64, dirty: f64) -> FleetMigration {
        FleetMigration {
            memory_bytes: memory,
            dirty_bytes_per_sec: dirty,
            weight: 1.0,
            max_rate: f64::INFINITY,
            start_at: 0.0,
        }
    }

    #[test]
    fn one_static_guest_takes_its_memory_over_the_uplink_and_the_handover() {
        let spec = FleetSpec::default();
        let o = simulate(&spec, &[guest(1024.0 * MIB, 0.0)]).unwrap();
        let m = o.migrations[0];
        let expected = 1024.0 * MIB / spec.uplink + 2.0 * spec.rtt;
        assert!((m.total_time - expected).abs() < 1e-9, "{m:?}");
        assert!(m.converged);
        assert!((m.downtime - 2.0 * spec.rtt).abs() < 1e-9);
    }

    #[test]
    fn equal_guests_share_alike_and_never_exceed_the_uplink() {
        let spec = FleetSpec::default();
        let fleet = vec![guest(256.0 * MIB, 10.0 * MIB); 1000];
        let o = simulate(&spec, &fleet).unwrap();
        assert!(o.jain_index > 0.999, "{}", o.jain_index);
        assert!(o.peak_total_rate <= spec.uplink * (1.0 + 1e-9));
        assert_eq!(o.peak_running, 1000);
        // 1000 × 1.25 MB/s against 10 MiB/s of dirtying each: none can converge, all are forced.
        assert!(o.migrations.iter().all(|m| !m.converged && m.passes >= 4));
    }

    #[test]
    fn a_departure_gives_its_share_to_the_others() {
        let spec = FleetSpec {
            uplink: 100.0 * MIB,
            ..FleetSpec::default()
        };
        let o = simulate(&spec, &[guest(100.0 * MIB, 0.0), guest(300.0 * MIB, 0.0)]).unwrap();
        // Both at 50 MiB/s for 2 s; then the second alone at 100 MiB/s for its last 200 MiB.
        let (a, b) = (o.migrations[0].total_time, o.migrations[1].total_time);
        assert!((a - (2.0 + 2.0 * spec.rtt)).abs() < 1e-6, "{a}");
        assert!((b - (4.0 + 2.0 * spec.rtt)).abs() < 1e-6, "{b}");
    }

    #[test]
    fn weights_and_caps_shape_the_shares() {
        let spec = FleetSpec {
            uplink: 90.0 * MIB,
            ..FleetSpec::default()
        };
        let mut heavy = guest(120.0 * MIB, 0.0);
        heavy.weight = 2.0;
        let mut capped = guest(10.0 * MIB, 0.0);
        capped.max_rate = 10.0 * MIB;
        let o = simulate(&spec, &[guest(60.0 * MIB, 0.0), heavy, capped]).unwrap();
        // Shares 26.7 / 53.3 / 10 MiB/s: the capped one ends at 1 s, then 30 / 60.
        let capped_time = o.migrations[2].total_time;
        assert!(
            (capped_time - (1.0 + 2.0 * spec.rtt)).abs() < 1e-6,
            "{capped_time}"
        );
        assert!(o.peak_total_rate <= spec.uplink * (1.0 + 1e-9));
    }

    #[test]
    fn a_dirty_rate_above_the_share_is_forced_to_stop() {
        let spec = FleetSpec {
            uplink: 10.0 * MIB,
            ..FleetSpec::default()
        };
        let o = simulate(&spec, &[guest(64.0 * MIB, 20.0 * MIB)]).unwrap();
        let m = o.migrations[0];
        assert!(!m.converged);
        // The whole memory is dirty after every pass: it stops shrinking, and the pause sends it all.
        assert!(m.downtime > 6.0, "{m:?}");
    }

    #[test]
    fn admission_runs_at_most_the_limit_and_starts_the_next_when_one_ends() {
        let spec = FleetSpec {
            uplink: 100.0 * MIB,
            max_running: 2,
            ..FleetSpec::default()
        };
        let o = simulate(&spec, &[guest(100.0 * MIB, 0.0); 4]).unwrap();
        assert_eq!(o.peak_running, 2);
        // Two at a time at 50 MiB/s: 2 s each; the last two wait 2 s for room (a migration's room
        // and bandwidth free up with its last byte: the handover's round trips carry no data).
        for (i, m) in o.migrations.iter().enumerate() {
            assert!(
                (m.total_time - (2.0 + 2.0 * spec.rtt)).abs() < 1e-6,
                "{i}: {m:?}"
            );
            let wait = if i < 2 { 0.0 } else { 2.0 };
            assert!(
                (m.completion_time - m.total_time - wait).abs() < 1e-6,
                "{i}: {m:?}"
            );
        }
    }

    #[test]
    fn bad_parameters_are_refused() {
        let spec = FleetSpec::default();
        assert!(
            simulate(
                &FleetSpec {
                    uplink: 0.0,
                    ..spec
                },
                &[guest(MIB, 0.0)]
            )
            .is_err()
        );
        assert!(
            simulate(
                &FleetSpec {
                    rtt: f64::NAN,
                    ..spec
                },
                &[guest(MIB, 0.0)]
            )
            .is_err()
        );
        assert!(simulate(&spec, &[guest(0.0, 0.0)]).is_err());
        assert!(simulate(&spec, &[guest(MIB, -1.0)]).is_err());
        let mut late = guest(MIB, 0.0);
        late.start_at = f64::INFINITY;
        assert!(simulate(&spec, &[late]).is_err());
        assert_eq!(simulate(&spec, &[]).unwrap().migrations.len(), 0);
    }
}
