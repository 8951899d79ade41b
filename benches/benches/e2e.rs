//! End to end: a whole migration of a 256 MiB simulated guest (no dirtying) over loopback TCP with the
//! default configuration, into anonymous memory on a destination thread. Throughput is in guest bytes.

use std::time::Duration;

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use dwcp::MigrationConfig;
use dwcp_benches::{GUEST_BYTES, MIXES, guest, loopback_migration};

fn e2e(c: &mut Criterion) {
    let mut group = c.benchmark_group("e2e/loopback");
    group.throughput(Throughput::Bytes(GUEST_BYTES));
    group.sampling_mode(SamplingMode::Flat);
    for (mix_name, mix) in MIXES {
        let g = guest(GUEST_BYTES, mix);
        group.bench_function(
            BenchmarkId::from_parameter(format!("{mix_name}/256MiB")),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let run = loopback_migration(&g, MigrationConfig::default())
                            .expect("loopback migration");
                        assert!(run.source.digest_match, "source reports a digest mismatch");
                        assert!(
                            run.destination.digest_match,
                            "destination reports a digest mismatch"
                        );
                        assert_eq!(run.source.memory_bytes, GUEST_BYTES);
                        total += run.elapsed;
                        // The destination's memory is unmapped here, outside the measured time.
                        drop(run);
                    }
                    total
                })
            },
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = dwcp_benches::criterion_config();
    targets = e2e
}
criterion_main!(benches);
