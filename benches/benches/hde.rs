//! HDE throughput: `Encoder::encode_batch` over a whole 256 MiB simulated guest, and `decode_chunk` over
//! the chunks that produced, for an idle-guest mix and incompressible memory, with LZ4 and zstd level 1.
//! Throughput is in logical guest bytes. As in a migration, the encoder records each page's hash for the
//! whole-memory digest while it encodes.

use std::hint::black_box;

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use dwcp_benches::{GUEST_BYTES, MIB, MIXES, guest};
use dwcp_core::digest::PageHashes;
use dwcp_core::memory::{MemorySource, PAGE_SIZE};
use dwcp_core::pool::{BufferPool, PooledBuf};
use dwcp_hde::{Codec, Encoder, decode_chunk};

const PAGES_PER_CHUNK: usize = 256;
const CHUNKS_PER_BATCH: usize = 16;
const POOL_BUDGET: usize = 64 << 20;
const CODECS: [(&str, Codec); 2] = [("lz4", Codec::Lz4), ("zstd1", Codec::Zstd(1))];

/// Page lists of every chunk covering `total_pages` pages in order.
fn chunk_lists(total_pages: u64) -> Vec<Vec<u64>> {
    let pages: Vec<u64> = (0..total_pages).collect();
    pages.chunks(PAGES_PER_CHUNK).map(<[u64]>::to_vec).collect()
}

/// Encodes every chunk, batch by batch, handing each encoded chunk to `sink` (which drops it, returning
/// the buffer to the pool).
fn encode_all(
    encoder: &Encoder,
    chunks: &[Vec<u64>],
    source: &dyn MemorySource,
    pool: &BufferPool,
    hashes: &PageHashes,
    mut sink: impl FnMut(PooledBuf),
) {
    for batch in chunks.chunks(CHUNKS_PER_BATCH) {
        let lists: Vec<&[u64]> = batch.iter().map(Vec::as_slice).collect();
        let encoded = encoder
            .encode_batch(0, &lists, source, pool, Some(hashes))
            .expect("encoding a batch");
        encoded.into_iter().for_each(&mut sink);
    }
}

fn hde(c: &mut Criterion) {
    let total_pages = GUEST_BYTES / PAGE_SIZE as u64;
    let chunks = chunk_lists(total_pages);
    let hashes = PageHashes::new(total_pages);
    for (mix_name, mix) in MIXES {
        let g = guest(GUEST_BYTES, mix);
        for (codec_name, codec) in CODECS {
            let encoder = Encoder::new(codec, 0).expect("building the encoder");
            let pool = BufferPool::new(POOL_BUDGET).expect("building the buffer pool");
            let id = format!("{codec_name}/{mix_name}");

            // Encoded once outside any timing: the input of the decode benchmark.
            let mut encoded: Vec<Vec<u8>> = Vec::with_capacity(chunks.len());
            encode_all(&encoder, &chunks, &*g, &pool, &hashes, |buf| {
                encoded.push(buf.to_vec())
            });
            let wire: usize = encoded.iter().map(Vec::len).sum();
            eprintln!(
                "hde {id}: {} MiB of guest memory -> {:.1} MiB in {} chunks (ratio {:.3})",
                GUEST_BYTES / MIB,
                wire as f64 / MIB as f64,
                encoded.len(),
                wire as f64 / GUEST_BYTES as f64
            );

            let mut group = c.benchmark_group("hde/encode");
            group.throughput(Throughput::Bytes(GUEST_BYTES));
            group.sampling_mode(SamplingMode::Flat);
            group.bench_function(BenchmarkId::from_parameter(&id), |b| {
                b.iter(|| {
                    let mut bytes = 0usize;
                    encode_all(&encoder, &chunks, &*g, &pool, &hashes, |buf| {
                        bytes += buf.len()
                    });
                    black_box(bytes)
                })
            });
            group.finish();

            let mut group = c.benchmark_group("hde/decode");
            group.throughput(Throughput::Bytes(GUEST_BYTES));
            group.bench_function(BenchmarkId::from_parameter(&id), |b| {
                let mut scratch = Vec::new();
                b.iter(|| {
                    let mut pages = 0usize;
                    for payload in &encoded {
                        let chunk = decode_chunk(payload, total_pages, &mut scratch)
                            .expect("decoding a chunk");
                        pages += black_box(&chunk).pages.len();
                    }
                    assert_eq!(pages as u64, total_pages);
                    pages
                })
            });
            group.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = dwcp_benches::criterion_config();
    targets = hde
}
criterion_main!(benches);
