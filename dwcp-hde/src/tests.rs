use dwcp_core::memory::{GuestRam, MemoryLayout, MemorySink, PAGE_SIZE};
use dwcp_core::sim::fill_text;
use proptest::prelude::*;
use rand::{RngCore, SeedableRng};

use super::*;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Zero,
    Text,
    Random,
}

fn memory(kinds: &[Kind], seed: u64) -> GuestRam {
    let ram =
        GuestRam::anonymous(MemoryLayout::flat((kinds.len() * PAGE_SIZE) as u64).unwrap()).unwrap();
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut page = vec![0u8; PAGE_SIZE];
    for (i, k) in kinds.iter().enumerate() {
        match k {
            Kind::Zero => continue,
            Kind::Text => fill_text(&mut rng, &mut page),
            Kind::Random => rng.fill_bytes(&mut page),
        }
        ram.write_page(i as u64, &page);
    }
    ram
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Zero), Just(Kind::Text), Just(Kind::Random)]
}

fn codec() -> impl Strategy<Value = Codec> {
    prop_oneof![
        Just(Codec::None),
        Just(Codec::Lz4),
        (1i32..=19).prop_map(Codec::Zstd)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any subset of pages of any content round-trips bit-exactly through any codec.
    #[test]
    fn chunk_roundtrip(kinds in proptest::collection::vec(kind(), 1..300), pick in proptest::collection::vec(any::<bool>(), 300), codec in codec(), iteration: u32, seed: u64) {
        let ram = memory(&kinds, seed);
        let pages: Vec<u64> = (0..kinds.len() as u64).filter(|&p| pick[p as usize]).take(MAX_CHUNK_PAGES).collect();
        prop_assume!(!pages.is_empty());
        let counters = EncodeCounters::default();
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        let hashes = dwcp_core::digest::PageHashes::new(kinds.len() as u64);
        encode_chunk(codec, iteration, &pages, &ram, &mut out, &mut scratch, &counters, Some(&hashes)).unwrap();
        let mut dec = Vec::new();
        let chunk = decode_chunk(&out, kinds.len() as u64, &mut dec).unwrap();
        prop_assert_eq!(chunk.iteration, iteration);
        prop_assert_eq!(chunk.pages.len(), pages.len());
        let mut expect = vec![0u8; PAGE_SIZE];
        for ((page, data), want) in chunk.pages.iter().zip(&pages) {
            prop_assert_eq!(page, want);
            ram.copy_out(*page, &mut expect);
            prop_assert_eq!(hashes.get(*page), dwcp_core::digest::page_hash(&expect));
            match data {
                PageData::Zero => prop_assert!(expect.iter().all(|&b| b == 0)),
                PageData::Literal(d) => prop_assert_eq!(*d, &expect[..]),
            }
        }
        // Pages outside a smaller layout are refused, not applied.
        let last = *pages.last().unwrap();
        prop_assert!(decode_chunk(&out, last, &mut dec).is_err());
    }

    /// Corrupted or truncated chunks give an error, never a panic.
    #[test]
    fn corrupt_chunks_never_panic(kinds in proptest::collection::vec(kind(), 1..40), codec in codec(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
        let ram = memory(&kinds, 7);
        let pages: Vec<u64> = (0..kinds.len() as u64).collect();
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        encode_chunk(codec, 1, &pages, &ram, &mut out, &mut scratch, &EncodeCounters::default(), None).unwrap();
        let mut bad = out.clone();
        for (at, x) in flips {
            let i = at % bad.len();
            bad[i] ^= x;
        }
        let mut dec = Vec::new();
        let _ = decode_chunk(&bad, kinds.len() as u64, &mut dec);
        let _ = decode_chunk(&out[..cut % out.len()], kinds.len() as u64, &mut dec);
        prop_assert!(dec.capacity() <= MAX_CHUNK_PAGES * PAGE_SIZE);
    }
}

#[test]
fn zero_pages_cost_one_byte_and_random_goes_raw() {
    let ram = memory(&[Kind::Zero; 256], 1);
    let pages: Vec<u64> = (0..256).collect();
    let counters = EncodeCounters::default();
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    let n = encode_chunk(
        Codec::Zstd(1),
        0,
        &pages,
        &ram,
        &mut out,
        &mut scratch,
        &counters,
        None,
    )
    .unwrap();
    assert_eq!(n, 16 + 10 + 256);

    let ram = memory(&[Kind::Random; 64], 2);
    encode_chunk(
        Codec::Lz4,
        0,
        &pages[..64],
        &ram,
        &mut out,
        &mut scratch,
        &counters,
        None,
    )
    .unwrap();
    assert_eq!(out[0], 0, "incompressible literals go raw");
    let ram = memory(&[Kind::Text; 64], 3);
    encode_chunk(
        Codec::Lz4,
        0,
        &pages[..64],
        &ram,
        &mut out,
        &mut scratch,
        &counters,
        None,
    )
    .unwrap();
    assert_eq!(out[0], 1, "text compresses");
    assert!(
        out.len() < 64 * PAGE_SIZE / 2,
        "text ratio {}",
        out.len() as f64 / (64 * PAGE_SIZE) as f64
    );
    let s = counters.snapshot();
    assert_eq!(
        (
            s.zero_pages,
            s.literal_pages,
            s.raw_chunks,
            s.compressed_chunks
        ),
        (256, 128, 1, 1)
    );
}

#[test]
fn oversized_declarations_are_refused_without_allocation() {
    // A header claiming 256 literal pages with a 10-byte zstd section that expands to more.
    let mut c = vec![2u8, 0];
    c.extend_from_slice(&1u16.to_le_bytes());
    c.extend_from_slice(&0u32.to_le_bytes());
    c.extend_from_slice(&1u16.to_le_bytes());
    c.extend_from_slice(&0u16.to_le_bytes());
    let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap();
    c.extend_from_slice(&(bomb.len() as u32).to_le_bytes());
    c.extend_from_slice(&0u64.to_le_bytes());
    c.extend_from_slice(&1u16.to_le_bytes());
    c.push(1);
    c.extend_from_slice(&bomb);
    let mut dec = Vec::new();
    let err = decode_chunk(&c, 10, &mut dec).unwrap_err();
    assert!(
        matches!(err, Error::Chunk(dwcp_core::ChunkError::Decompress(_))),
        "{err}"
    );
    assert!(dec.capacity() <= 2 * PAGE_SIZE);
}

#[test]
fn parallel_batch_preserves_order() {
    let kinds: Vec<Kind> = (0..1024)
        .map(|i| [Kind::Zero, Kind::Text, Kind::Random][i % 3])
        .collect();
    let ram = memory(&kinds, 5);
    let pages: Vec<u64> = (0..1024).collect();
    let chunks: Vec<&[u64]> = pages.chunks(100).collect();
    let enc = Encoder::new(Codec::Lz4, 2).unwrap();
    let pool = BufferPool::new(64 << 20).unwrap();
    let out = enc.encode_batch(3, &chunks, &ram, &pool, None).unwrap();
    assert_eq!(out.len(), chunks.len());
    let mut dec = Vec::new();
    for (buf, want) in out.iter().zip(&chunks) {
        let c = decode_chunk(buf, 1024, &mut dec).unwrap();
        assert_eq!(c.pages.iter().map(|p| p.0).collect::<Vec<_>>(), *want);
    }
}
