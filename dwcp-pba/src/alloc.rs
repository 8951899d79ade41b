//! Sharing a capacity (a host's uplink, a cap) among concurrent migrations: weighted max-min fair,
//! with each migration's own cap and a guaranteed minimum (what its deadline needs).
//!
//! The allocation is `rate_i = clamp(weight_i × λ, min_i, max_i)` with the one λ that spends the
//! capacity: migrations below their cap share alike per unit of weight, none gets more than it can
//! use, and what one cannot use goes to the others (work-conserving). When the minimums alone exceed
//! the capacity, they are scaled down alike: some deadline will be missed, and the caller is told.

use crate::PbaError;

/// What one migration asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Demand {
    /// Relative priority (> 0): twice the weight, twice the share.
    pub weight: f64,
    /// The most it can use (its cap, or what its link or encoder can take), bytes/s; may be infinite.
    pub max_rate: f64,
    /// The least it must get to meet its deadline (remaining bytes over time left), bytes/s.
    pub min_rate: f64,
}

impl Demand {
    /// A migration of weight 1 that can use anything and has no deadline.
    pub fn unlimited() -> Self {
        Self {
            weight: 1.0,
            max_rate: f64::INFINITY,
            min_rate: 0.0,
        }
    }
}

/// The result of [`allocate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Allocation {
    /// The rate every unconstrained migration gets per unit of weight.
    pub share_per_weight: f64,
    /// Whether every minimum (deadline) could be met.
    pub minimums_met: bool,
}

/// Splits `capacity` (bytes/s) among `demands`, writing one rate per demand into `out`.
pub fn allocate(
    capacity: f64,
    demands: &[Demand],
    out: &mut Vec<f64>,
) -> Result<Allocation, PbaError> {
    if !(capacity.is_finite() && capacity >= 0.0) {
        return Err(PbaError::InvalidParameter {
            what: "capacity",
            value: capacity,
            expected: "a finite rate >= 0",
        });
    }
    for d in demands {
        let bad = |what, value| PbaError::InvalidParameter {
            what,
            value,
            expected: "weight finite > 0, max_rate >= 0 (may be infinite), min_rate finite >= 0",
        };
        if !(d.weight.is_finite() && d.weight > 0.0) {
            return Err(bad("weight", d.weight));
        }
        if d.max_rate.is_nan() || d.max_rate < 0.0 {
            return Err(bad("max_rate", d.max_rate));
        }
        if !(d.min_rate.is_finite() && d.min_rate >= 0.0) {
            return Err(bad("min_rate", d.min_rate));
        }
    }
    out.clear();
    let lo = |d: &Demand| d.min_rate.min(d.max_rate);
    let floor: f64 = demands.iter().map(lo).sum();
    if floor >= capacity {
        let scale = if floor > 0.0 { capacity / floor } else { 0.0 };
        out.extend(demands.iter().map(|d| lo(d) * scale));
        return Ok(Allocation {
            share_per_weight: 0.0,
            minimums_met: floor <= capacity,
        });
    }
    let ceiling: f64 = demands.iter().map(|d| d.max_rate).sum();
    if ceiling <= capacity {
        // Everyone gets all it can use.
        out.extend(demands.iter().map(|d| d.max_rate));
        return Ok(Allocation {
            share_per_weight: f64::INFINITY,
            minimums_met: true,
        });
    }
    let spend = |lambda: f64| -> f64 {
        demands
            .iter()
            .map(|d| (d.weight * lambda).clamp(lo(d), d.max_rate))
            .sum()
    };
    // The spend is continuous and non-decreasing in λ: bisect between 0 and a λ that spends it all.
    let (mut a, mut b) = (0.0_f64, 1.0_f64);
    let min_weight = demands
        .iter()
        .map(|d| d.weight)
        .fold(f64::INFINITY, f64::min);
    b = b.max(capacity / min_weight);
    for _ in 0..200 {
        let mid = 0.5 * (a + b);
        if spend(mid) < capacity {
            a = mid;
        } else {
            b = mid;
        }
        if b - a <= f64::EPSILON * b {
            break;
        }
    }
    let lambda = a;
    out.extend(
        demands
            .iter()
            .map(|d| (d.weight * lambda).clamp(lo(d), d.max_rate)),
    );
    Ok(Allocation {
        share_per_weight: lambda,
        minimums_met: true,
    })
}

/// Jain's fairness index of `rates` (1: all equal; 1/n: one gets everything).
pub fn jain_index(rates: &[f64]) -> f64 {
    let n = rates.len() as f64;
    let sum: f64 = rates.iter().sum();
    let squares: f64 = rates.iter().map(|r| r * r).sum();
    if squares == 0.0 {
        1.0
    } else {
        sum * sum / (n * squares)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(weight: f64, max_rate: f64, min_rate: f64) -> Demand {
        Demand {
            weight,
            max_rate,
            min_rate,
        }
    }

    #[test]
    fn equal_migrations_share_alike_and_what_one_cannot_use_goes_to_the_others() {
        let mut out = Vec::new();
        allocate(100.0, &[Demand::unlimited(); 4], &mut out).unwrap();
        assert!(out.iter().all(|r| (r - 25.0).abs() < 1e-9), "{out:?}");
        allocate(
            100.0,
            &[d(1.0, 10.0, 0.0), Demand::unlimited(), Demand::unlimited()],
            &mut out,
        )
        .unwrap();
        assert!(
            (out[0] - 10.0).abs() < 1e-9 && (out[1] - 45.0).abs() < 1e-6,
            "{out:?}"
        );
        assert!(jain_index(&[25.0; 4]) > 0.999);
    }

    #[test]
    fn weights_and_deadlines_shape_the_shares() {
        let mut out = Vec::new();
        allocate(
            90.0,
            &[d(2.0, f64::INFINITY, 0.0), Demand::unlimited()],
            &mut out,
        )
        .unwrap();
        assert!(
            (out[0] - 60.0).abs() < 1e-6 && (out[1] - 30.0).abs() < 1e-6,
            "{out:?}"
        );
        // A deadline needs 70: it gets it, the other the rest.
        allocate(
            100.0,
            &[d(1.0, f64::INFINITY, 70.0), Demand::unlimited()],
            &mut out,
        )
        .unwrap();
        assert!(
            (out[0] - 70.0).abs() < 1e-6 && (out[1] - 30.0).abs() < 1e-6,
            "{out:?}"
        );
        // Deadlines that cannot all be met are scaled down alike, and said so.
        let a = allocate(100.0, &[d(1.0, f64::INFINITY, 80.0); 2], &mut out).unwrap();
        assert!(!a.minimums_met && (out[0] - 50.0).abs() < 1e-9, "{out:?}");
    }

    #[test]
    fn bad_input_is_refused() {
        let mut out = Vec::new();
        assert!(allocate(f64::NAN, &[Demand::unlimited()], &mut out).is_err());
        assert!(allocate(-1.0, &[Demand::unlimited()], &mut out).is_err());
        assert!(allocate(1.0, &[d(0.0, 1.0, 0.0)], &mut out).is_err());
        assert!(allocate(1.0, &[d(1.0, f64::NAN, 0.0)], &mut out).is_err());
        assert!(allocate(1.0, &[d(1.0, 1.0, f64::INFINITY)], &mut out).is_err());
        assert!(allocate(1.0, &[], &mut out).is_ok() && out.is_empty());
    }

    fn demand() -> impl Strategy<Value = Demand> {
        (
            0.1f64..10.0,
            prop_oneof![Just(f64::INFINITY), 0.0f64..1e9],
            prop_oneof![Just(0.0), 0.0f64..3e8],
        )
            .prop_map(|(weight, max_rate, min_rate)| Demand {
                weight,
                max_rate,
                min_rate,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        /// Never over the capacity; never over a demand's cap; work-conserving; weighted max-min
        /// fair: every rate is clamp(weight × λ, min, max) for one λ.
        #[test]
        fn allocations_are_capped_work_conserving_and_max_min_fair(
            capacity in 0.0f64..2e9,
            demands in prop::collection::vec(demand(), 0..40),
        ) {
            let mut out = Vec::new();
            let a = allocate(capacity, &demands, &mut out).unwrap();
            prop_assert_eq!(out.len(), demands.len());
            let total: f64 = out.iter().sum();
            let tol = 1e-6 * capacity.max(1.0);
            prop_assert!(total <= capacity + tol, "{} > {}", total, capacity);
            for (r, d) in out.iter().zip(&demands) {
                prop_assert!(*r >= 0.0 && *r <= d.max_rate + tol, "{} vs cap {}", r, d.max_rate);
            }
            let ceiling: f64 = demands.iter().map(|d| d.max_rate).sum();
            prop_assert!((total - capacity.min(ceiling)).abs() <= tol.max(1e-6 * total), "not work-conserving: {} of {}", total, capacity.min(ceiling));
            if a.minimums_met && a.share_per_weight.is_finite() && a.share_per_weight > 0.0 {
                for (r, d) in out.iter().zip(&demands) {
                    let want = (d.weight * a.share_per_weight).clamp(d.min_rate.min(d.max_rate), d.max_rate);
                    prop_assert!((r - want).abs() <= tol, "{} vs {}", r, want);
                }
            }
        }
    }
}
