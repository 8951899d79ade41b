//! Placement decisions per second: the index against the full scan, on 100- and 1000-node views.
//!
//! `cargo bench -p dwcp-itp --bench placement -- --quick`
//!
//! Every measured iteration makes 1000 decisions on a fresh clone of the placer (the clone is set
//! up outside the measurement), so the throughput in elements/s is decisions/s, reservations
//! included.
//!
//! * `place/*`: mixed requests, 70 % migrations from 8 busy sources, 30 % new VMs, 20 % with an
//!   anti-affinity group.
//! * `evacuate/*`: `evacuate` of one node with 1000 VMs (`place_batch`, hardest first).
//! * `best/*`: one decision without reservation, the same request over and over.
//!
//! `zoned` views have 100-node zones, fast links inside a zone and slow ones across (what a real
//! cluster looks like); `flat` views have independent random bandwidths for every pair, the index's
//! worst realistic case (bandwidth and the rest of the score uncorrelated).

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dwcp_itp::{NodeView, Placer, VmRequest, Weights};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use std::hint::black_box;
use std::time::Duration;

const GIB: u64 = 1 << 30;

fn cluster(n: usize, zoned: bool, rng: &mut Xoshiro256PlusPlus) -> Vec<NodeView> {
    let zone_size = 100.min(n / 4).max(1);
    let zone = |i: usize| i / zone_size;
    (0..n)
        .map(|i| {
            let total = [256, 512, 768][rng.random_range(0..3)] * GIB;
            let link_to = (0..n)
                .filter(|&j| j != i)
                .map(|j| {
                    let b = if !zoned {
                        rng.random_range(1.25e8..1.5e9)
                    } else if zone(i) == zone(j) {
                        rng.random_range(1.0e9..1.5e9)
                    } else {
                        rng.random_range(1.25e8..3.75e8)
                    };
                    (j as u64, b)
                })
                .collect();
            NodeView {
                id: i as u64,
                name: format!("node-{i}"),
                alive: rng.random_bool(0.99),
                cordoned: rng.random_bool(0.01),
                memory_total: total,
                memory_free: (total as f64 * rng.random_range(0.3..0.9)) as u64,
                cpu_load: rng.random_range(0.0..1.0),
                vcpus_free: rng.random_range(16..128),
                zone: format!("z{}", zone(i)),
                link_to,
                vms: rng.random_range(0..40),
                anti_affinity_groups: if rng.random_bool(0.2) {
                    vec![format!("g{}", rng.random_range(0..10))]
                } else {
                    vec![]
                },
            }
        })
        .collect()
}

fn mixed(rng: &mut Xoshiro256PlusPlus, n: usize) -> Vec<VmRequest> {
    (0..1000)
        .map(|i| VmRequest {
            vm: format!("vm-{i}"),
            memory: [2, 4, 8, 16, 32][rng.random_range(0..5)] * GIB,
            vcpus: [1, 2, 4, 8][rng.random_range(0..4)],
            source: rng
                .random_bool(0.7)
                .then(|| (rng.random_range(0..8) * n / 8) as u64),
            dirty_rate: rng.random_range(1e7..3e8),
            anti_affinity: rng
                .random_bool(0.2)
                .then(|| format!("g{}", rng.random_range(0..10))),
            forbidden: vec![],
        })
        .collect()
}

fn evacuees(rng: &mut Xoshiro256PlusPlus) -> Vec<VmRequest> {
    (0..1000)
        .map(|i| VmRequest {
            vm: format!("evac-{i}"),
            memory: [1, 2, 4, 8][rng.random_range(0..4)] * GIB,
            vcpus: rng.random_range(1..3),
            source: Some(0),
            dirty_rate: rng.random_range(1e7..3e8),
            anti_affinity: rng
                .random_bool(0.1)
                .then(|| format!("e{}", rng.random_range(0..50))),
            forbidden: vec![],
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    for &(n, zoned) in &[(100, true), (1000, true), (1000, false)] {
        let tag = format!("{n}-{}", if zoned { "zoned" } else { "flat" });
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(n as u64);
        let mut placer = Placer::new(cluster(n, zoned, &mut rng), Weights::default());
        let reqs = mixed(&mut rng, n);
        let evac = evacuees(&mut rng);
        for r in reqs.iter().chain(&evac[..1]) {
            let _ = placer.best(r); // build the per-source indexes outside the measurement
        }

        let mut g = c.benchmark_group("place");
        g.throughput(Throughput::Elements(reqs.len() as u64));
        g.bench_function(BenchmarkId::new("indexed", &tag), |b| {
            b.iter_batched(
                || placer.clone(),
                |mut p| {
                    for r in &reqs {
                        let _ = black_box(p.place(r));
                    }
                    p
                },
                BatchSize::LargeInput,
            )
        });
        g.bench_function(BenchmarkId::new("scan", &tag), |b| {
            b.iter_batched(
                || placer.clone(),
                |mut p| {
                    for r in &reqs {
                        let _ = black_box(p.place_by_scan(r));
                    }
                    p
                },
                BatchSize::LargeInput,
            )
        });
        g.finish();

        let mut g = c.benchmark_group("evacuate");
        g.throughput(Throughput::Elements(evac.len() as u64));
        g.bench_function(BenchmarkId::new("indexed", &tag), |b| {
            b.iter_batched(
                || placer.clone(),
                |mut p| {
                    black_box(p.evacuate(0, &evac).unwrap());
                    p
                },
                BatchSize::LargeInput,
            )
        });
        // The scan in the same order place_batch uses (largest first).
        let mut sorted = evac.clone();
        sorted.sort_by(|a, b| b.memory.cmp(&a.memory).then(b.vcpus.cmp(&a.vcpus)));
        g.bench_function(BenchmarkId::new("scan", &tag), |b| {
            b.iter_batched(
                || {
                    let mut p = placer.clone();
                    p.set_cordoned(0, true).unwrap();
                    p
                },
                |mut p| {
                    for r in &sorted {
                        let _ = black_box(p.place_by_scan(r));
                    }
                    p
                },
                BatchSize::LargeInput,
            )
        });
        g.finish();

        let mut g = c.benchmark_group("best");
        g.throughput(Throughput::Elements(1));
        let one = &reqs[0..8];
        let mut p = placer.clone();
        g.bench_function(BenchmarkId::new("indexed", &tag), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % one.len();
                black_box(p.best(&one[i]))
            })
        });
        g.bench_function(BenchmarkId::new("scan", &tag), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % one.len();
                black_box(placer.best_by_scan(&one[i]))
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = placement;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(placement);
