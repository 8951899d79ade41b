//! A host's uplink cap shared by the migrations leaving it: PBA's weighted max-min allocator
//! ([`dwcp_pba::alloc`]) splits the cap, and each migration's own token bucket enforces its share.
//! The split is re-run whenever a migration joins or leaves, the cap changes, a member's guest is
//! paused or resumed, or PBA's forecast says a member carries well under its share (see
//! [`BandwidthHandle::path_limit`]), so what one migration cannot use goes to the others. A
//! migration whose guest is paused for its final pass is served first (its weight counts
//! [`PAUSED_WEIGHT_FACTOR`] times): every millisecond of that pass is downtime, while the others
//! are still in pre-copy. A member with a [`Deadline`] gets at least its bytes left over its time
//! left before the others share the rest.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use dwcp_core::error::Error;
use dwcp_pba::alloc::{Demand, allocate};

use crate::source::{BandwidthHandle, Migration, Watcher};

/// How many times its weight a migration whose guest is paused counts in the split: in effect it
/// takes what it can use (up to its own cap) and the others share the rest.
pub const PAUSED_WEIGHT_FACTOR: f64 = 1000.0;

/// One host's uplink cap, shared by the migrations that [join](HostUplink::join) it. Cheap to
/// clone; every clone is the same uplink.
#[derive(Debug, Clone)]
pub struct HostUplink(Arc<parking_lot::Mutex<Uplink>>);

#[derive(Debug)]
struct Uplink {
    cap: f64,
    next_id: u64,
    members: BTreeMap<u64, Member>,
}

#[derive(Debug)]
struct Member {
    handle: BandwidthHandle,
    weight: f64,
    /// Its own cap, bytes per second (infinite: none).
    max_rate: f64,
    deadline: Option<Deadline>,
}

/// A migration that must be done by a time: the uplink gives it at least what is left of its bytes
/// over the time left, before the others share the rest (scaled down alike with other deadlines,
/// and logged, when the cap cannot serve them all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    /// When the migration must be done.
    pub at: Instant,
    /// The bytes it is expected to put on the wire in all (for example the guest's memory size:
    /// compression makes that generous, dirtied pages make it short).
    pub bytes: u64,
}

/// A migration's membership of a [`HostUplink`]; dropping it (when the migration ends) gives its
/// share back to the others.
#[derive(Debug)]
#[must_use = "the migration leaves the uplink when its share is dropped"]
pub struct UplinkShare {
    uplink: HostUplink,
    id: u64,
}

impl HostUplink {
    /// An uplink of `bytes_per_sec`; 0, or a rate beyond any link, is refused.
    pub fn new(bytes_per_sec: u64) -> Result<Self, Error> {
        let cap = check(bytes_per_sec)?;
        Ok(Self(Arc::new(parking_lot::Mutex::new(Uplink {
            cap,
            next_id: 0,
            members: BTreeMap::new(),
        }))))
    }

    /// Changes the cap; every member's share follows at its next batch.
    pub fn set_cap(&self, bytes_per_sec: u64) -> Result<(), Error> {
        let cap = check(bytes_per_sec)?;
        let mut u = self.0.lock();
        u.cap = cap;
        u.reallocate()
    }

    /// Makes `migration` (before or while it runs) a member with `weight` (> 0; twice the weight,
    /// twice the share) and at most `max_bytes_per_sec` of its own (None: no cap of its own), and
    /// re-splits the cap among all members.
    pub fn join(
        &self,
        migration: &Migration<'_>,
        weight: f64,
        max_bytes_per_sec: Option<u64>,
    ) -> Result<UplinkShare, Error> {
        self.join_with_deadline(migration, weight, max_bytes_per_sec, None)
    }

    /// [`join`](Self::join), with a deadline: until it is done the member gets at least its
    /// remaining bytes (of `deadline.bytes`, less what it has sent) over the time left, re-computed
    /// at every re-split. A deadline already past asks for all it can get.
    pub fn join_with_deadline(
        &self,
        migration: &Migration<'_>,
        weight: f64,
        max_bytes_per_sec: Option<u64>,
        deadline: Option<Deadline>,
    ) -> Result<UplinkShare, Error> {
        if !(weight.is_finite() && weight > 0.0 && weight <= 1e6) {
            return Err(Error::Config(format!(
                "uplink weight {weight}: it must be a number above 0 and at most 1e6"
            )));
        }
        let max_rate = match max_bytes_per_sec {
            Some(r) => check(r)?,
            None => f64::INFINITY,
        };
        let handle = migration.bandwidth_handle();
        let mut u = self.0.lock();
        let id = u.next_id;
        u.next_id += 1;
        u.members.insert(
            id,
            Member {
                handle: handle.clone(),
                weight,
                max_rate,
                deadline,
            },
        );
        if let Err(e) = u.reallocate() {
            u.members.remove(&id);
            return Err(e);
        }
        // Weak: the uplink holds the handle, so a strong reference back would leak both.
        let weak = Arc::downgrade(&self.0);
        handle.watch(Some(Watcher(Arc::new(move || {
            if let Some(uplink) = weak.upgrade() {
                if let Err(e) = uplink.lock().reallocate() {
                    tracing::warn!(error = %e, "re-splitting the uplink after a pause or a forecast change");
                }
            }
        }))));
        Ok(UplinkShare {
            uplink: self.clone(),
            id,
        })
    }

    /// Each member's share now, bytes per second, in the order they joined.
    pub fn shares(&self) -> Vec<u64> {
        self.0
            .lock()
            .members
            .values()
            .map(|m| m.handle.get().unwrap_or(0))
            .collect()
    }

    /// The cap, bytes per second.
    pub fn cap(&self) -> u64 {
        self.0.lock().cap as u64
    }
}

impl UplinkShare {
    /// This migration's share now, bytes per second.
    pub fn rate(&self) -> Option<u64> {
        self.uplink
            .0
            .lock()
            .members
            .get(&self.id)
            .and_then(|m| m.handle.get())
    }
}

impl Drop for UplinkShare {
    fn drop(&mut self) {
        let mut u = self.uplink.0.lock();
        if let Some(m) = u.members.remove(&self.id) {
            // A migration that outlives its share is no longer capped by the uplink.
            m.handle.watch(None);
            let _ = m.handle.set(None);
        }
        if let Err(e) = u.reallocate() {
            tracing::warn!(error = %e, "re-splitting the uplink after a migration left");
        }
    }
}

impl Member {
    /// What the allocator is told now: the weight (boosted while the guest is paused), the cap (held
    /// to what the path carries), and the deadline's minimum (what is left over the time left; a
    /// past deadline asks for all it may have).
    fn effective_demand(&self, now: Instant, uplink_cap: f64) -> Demand {
        let weight = if self.handle.guest_paused() {
            self.weight * PAUSED_WEIGHT_FACTOR
        } else {
            self.weight
        };
        let max_rate = self
            .handle
            .path_limit()
            .map_or(self.max_rate, |p| self.max_rate.min(p as f64));
        let min_rate = self.deadline.map_or(0.0, |d| {
            let left = d.bytes.saturating_sub(self.handle.sent_bytes()) as f64;
            let secs = d.at.saturating_duration_since(now).as_secs_f64();
            match (left > 0.0, secs > 0.0) {
                (false, _) => 0.0,
                (true, true) => left / secs,
                (true, false) => f64::INFINITY,
            }
        });
        Demand {
            weight,
            max_rate,
            min_rate: min_rate.min(max_rate).min(uplink_cap),
        }
    }
}

impl Uplink {
    fn reallocate(&mut self) -> Result<(), Error> {
        let now = Instant::now();
        let demands: Vec<Demand> = self
            .members
            .values()
            .map(|m| m.effective_demand(now, self.cap))
            .collect();
        let mut rates = Vec::with_capacity(demands.len());
        let allocation = allocate(self.cap, &demands, &mut rates)
            .map_err(|e| Error::Config(format!("splitting the uplink: {e}")))?;
        if !allocation.minimums_met {
            tracing::warn!(
                cap = self.cap,
                "the uplink cannot meet every migration's deadline: they are served alike, short"
            );
        }
        for (m, rate) in self.members.values().zip(rates) {
            // A share rounds down to whole bytes (past the allocator's float noise, so an exact
            // share stays exact), and never to 0 (a bucket needs a rate).
            m.handle.set(Some(((rate + 1e-3).floor() as u64).max(1)))?;
        }
        Ok(())
    }
}

fn check(bytes_per_sec: u64) -> Result<f64, Error> {
    dwcp_pba::check_rate(bytes_per_sec as f64)
        .map_err(|e| Error::Config(format!("uplink cap: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_core::handshake::Psk;

    fn migration() -> Migration<'static> {
        Migration::new("127.0.0.1:9".parse().unwrap(), Psk::generate())
    }

    #[test]
    fn members_share_alike_by_weight_and_a_leaver_gives_its_share_back() {
        let up = HostUplink::new(90_000_000).unwrap();
        let (a, b, c) = (migration(), migration(), migration());
        let sa = up.join(&a, 1.0, None).unwrap();
        assert_eq!(a.bandwidth_handle().get(), Some(90_000_000));
        let sb = up.join(&b, 2.0, None).unwrap();
        assert_eq!(up.shares(), vec![30_000_000, 60_000_000]);
        // A member capped below its share leaves the rest to the others.
        let sc = up.join(&c, 1.0, Some(10_000_000)).unwrap();
        assert_eq!(up.shares(), vec![26_666_666, 53_333_333, 10_000_000]);
        assert!(up.shares().iter().sum::<u64>() <= up.cap());
        drop(sb);
        assert_eq!(up.shares(), vec![80_000_000, 10_000_000]);
        assert_eq!(
            b.bandwidth_handle().get(),
            None,
            "a leaver is no longer capped"
        );
        up.set_cap(20_000_000).unwrap();
        assert_eq!(sa.rate(), Some(10_000_000));
        assert_eq!(sc.rate(), Some(10_000_000));
    }

    #[test]
    fn a_paused_guest_is_served_first_and_gives_back_when_resumed() {
        let up = HostUplink::new(100_000_000).unwrap();
        let (a, b) = (migration(), migration());
        let _sa = up.join(&a, 1.0, None).unwrap();
        let sb = up.join(&b, 1.0, None).unwrap();
        assert_eq!(up.shares(), vec![50_000_000, 50_000_000]);
        a.bandwidth_handle().set_guest_paused(true);
        let shares = up.shares();
        assert!(shares[0] >= 99_800_000, "{shares:?}");
        assert!(shares[1] > 0 && shares.iter().sum::<u64>() <= up.cap());
        a.bandwidth_handle().set_guest_paused(false);
        assert_eq!(up.shares(), vec![50_000_000, 50_000_000]);
        // A leaver's pause no longer moves the others.
        drop(sb);
        b.bandwidth_handle().set_guest_paused(true);
        assert_eq!(up.shares(), vec![100_000_000]);
        // Nor does one after the uplink itself is gone.
        let _leak_check = a.bandwidth_handle();
        drop(up);
        a.bandwidth_handle().set_guest_paused(true);
    }

    #[test]
    fn a_member_held_back_by_its_path_gives_the_rest_to_the_others() {
        let up = HostUplink::new(100_000_000).unwrap();
        let (a, b) = (migration(), migration());
        let _sa = up.join(&a, 1.0, None).unwrap();
        let _sb = up.join(&b, 1.0, None).unwrap();
        let (ha, hb) = (a.bandwidth_handle(), b.bandwidth_handle());
        // a's path carries 10 MB/s of its 50: it keeps 15 (room to show more), b gets the rest.
        ha.report_forecast(10e6);
        assert_eq!(ha.path_limit(), Some(15_000_000));
        assert_eq!(up.shares(), vec![15_000_000, 85_000_000]);
        // Small moves of the forecast do not re-split; a large one does.
        ha.report_forecast(11e6);
        assert_eq!(up.shares(), vec![15_000_000, 85_000_000]);
        ha.report_forecast(5e6);
        assert_eq!(up.shares(), vec![7_500_000, 92_500_000]);
        // The path got faster: a fills its 7.5 and is released to its fair share.
        ha.report_forecast(7.2e6);
        assert_eq!(ha.path_limit(), None);
        assert_eq!(up.shares(), vec![50_000_000, 50_000_000]);
        // A paused guest is never held to its pre-copy forecast.
        ha.report_forecast(10e6);
        assert_eq!(ha.path_limit(), Some(15_000_000));
        ha.set_guest_paused(true);
        assert_eq!(ha.path_limit(), None);
        ha.report_forecast(10e6);
        assert_eq!(ha.path_limit(), None);
        assert!(up.shares()[0] >= 99_000_000, "{:?}", up.shares());
        ha.set_guest_paused(false);
        assert_eq!(up.shares(), vec![50_000_000, 50_000_000]);
        // A forecast at the share, garbage, or no uplink at all change nothing.
        hb.report_forecast(49e6);
        ha.report_forecast(f64::NAN);
        ha.report_forecast(-1.0);
        assert_eq!(up.shares(), vec![50_000_000, 50_000_000]);
        let alone = migration();
        alone.bandwidth_handle().set(Some(1_000_000)).unwrap();
        alone.bandwidth_handle().report_forecast(1.0);
        assert_eq!(alone.bandwidth_handle().path_limit(), None);
    }

    #[test]
    fn a_deadline_is_served_first_and_follows_what_is_left() {
        let up = HostUplink::new(100_000_000).unwrap();
        let (a, b) = (migration(), migration());
        let _sb = up.join(&b, 1.0, None).unwrap();
        // 600 MB due in about 10 s needs 60 MB/s: more than an equal half.
        let deadline = Deadline {
            at: Instant::now() + std::time::Duration::from_secs(10),
            bytes: 600_000_000,
        };
        let _sa = up
            .join_with_deadline(&a, 1.0, None, Some(deadline))
            .unwrap();
        let shares = up.shares();
        assert!((59_000_000..=61_000_000).contains(&shares[1]), "{shares:?}");
        assert!(shares.iter().sum::<u64>() <= up.cap());
        // Once it has sent its bytes, it is an ordinary member again.
        a.bandwidth_handle().add_sent(600_000_000);
        up.set_cap(100_000_000).unwrap();
        assert_eq!(up.shares(), vec![50_000_000, 50_000_000]);
        // A deadline that cannot be met takes everything, and the split stays within the cap.
        let c = migration();
        let late = Deadline {
            at: Instant::now(),
            bytes: 1_000_000_000,
        };
        let _sc = up.join_with_deadline(&c, 1.0, None, Some(late)).unwrap();
        let shares = up.shares();
        assert!(shares[2] >= 99_000_000, "{shares:?}");
        // (A share is never below 1 byte/s: a bucket needs a rate.)
        assert!(shares.iter().sum::<u64>() <= up.cap() + 2, "{shares:?}");
    }

    #[test]
    fn bad_caps_and_weights_are_refused() {
        assert!(HostUplink::new(0).is_err());
        assert!(HostUplink::new(u64::MAX).is_err());
        let up = HostUplink::new(1_000_000).unwrap();
        let m = migration();
        for w in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(up.join(&m, w, None).is_err(), "weight {w}");
        }
        assert!(up.join(&m, 1.0, Some(0)).is_err());
        assert!(up.set_cap(0).is_err());
        assert_eq!(up.cap(), 1_000_000);
    }
}
