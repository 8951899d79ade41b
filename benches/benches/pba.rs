//! PBA: forecasts per second for many links at once (issue 14 target: >= 10 M link-predictions/s
//! batched on 2 cores), one batch update, and the single-link forms for comparison.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dwcp_pba::batch::LinkTable;
use dwcp_pba::predict::LinkPredictor;
use dwcp_pba::sample::RawSample;

fn table(links: usize) -> LinkTable {
    let mut t = LinkTable::new(links);
    let ids: Vec<u32> = (0..links as u32).collect();
    for k in 0..16 {
        let goodput: Vec<f64> = (0..links)
            .map(|i| 1e8 + 1e6 * ((i * 7 + k * 13) % 97) as f64)
            .collect();
        t.observe_batch(&ids, &goodput, &vec![0.25; links], &vec![false; links])
            .expect("equal lengths");
    }
    t
}

fn predict(c: &mut Criterion) {
    let mut g = c.benchmark_group("pba");
    for links in [1_000usize, 10_000, 100_000] {
        let t = table(links);
        let mut out = vec![0.0; links];
        g.throughput(Throughput::Elements(links as u64));
        g.bench_function(BenchmarkId::new("predict_batch", links), |b| {
            b.iter(|| {
                t.predict_batch(std::hint::black_box(1.0), &mut out)
                    .unwrap()
            })
        });
        let mut t2 = t.clone();
        let ids: Vec<u32> = (0..links as u32).collect();
        let goodput = vec![1.2e8; links];
        let (interval, flags) = (vec![0.25; links], vec![false; links]);
        g.bench_function(BenchmarkId::new("observe_batch", links), |b| {
            b.iter(|| t2.observe_batch(&ids, &goodput, &interval, &flags).unwrap())
        });
    }
    let mut one = LinkPredictor::new();
    let mut at = 0.0;
    let mut acked = 0.0;
    for k in 0..16 {
        at += 0.25;
        acked += 2.5e7 + 1e5 * f64::from(k % 7);
        one.push(RawSample {
            at,
            acked_bytes: acked,
            rtt: 0.05,
            app_limited: false,
        });
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("predict_single", |b| {
        b.iter(|| std::hint::black_box(&one).predict_at(std::hint::black_box(1.0)))
    });
    g.bench_function("push_single", |b| {
        b.iter(|| {
            at += 0.25;
            acked += 2.5e7;
            one.push(std::hint::black_box(RawSample {
                at,
                acked_bytes: acked,
                rtt: 0.05,
                app_limited: false,
            }))
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = criterion::Criterion::default()
        .with_profiler(dwcp_benches::FlamegraphProfiler::new(dwcp_benches::PROFILE_HZ));
    targets = predict
}
criterion_main!(benches);
