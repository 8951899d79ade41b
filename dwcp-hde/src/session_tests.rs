//! Round trips and refusals of the session encoder and decoder (every class, codec and policy).
//!
//! A test module: one round trip or refusal per class, codec and policy; splitting it would scatter
//! the shared fixtures.

use std::sync::Arc;

use dwcp_core::error::ChunkError;
use dwcp_core::memory::{GuestRam, MemoryLayout, MemorySink, MemorySource, PAGE_SIZE};
use dwcp_core::pool::BufferPool;
use dwcp_core::sim::fill_text;
use proptest::prelude::*;
use rand::{Rng, RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use super::*;

#[derive(Debug, Clone, Copy)]
enum Content {
    Zero,
    Text,
    Random,
    /// A copy of another page (index modulo the page count).
    CopyOf(usize),
}

fn content() -> impl Strategy<Value = Content> {
    prop_oneof![
        Just(Content::Zero),
        Just(Content::Text),
        Just(Content::Random),
        any::<usize>().prop_map(Content::CopyOf),
    ]
}

fn ram(pages: usize) -> GuestRam {
    GuestRam::anonymous(MemoryLayout::flat((pages * PAGE_SIZE) as u64).unwrap()).unwrap()
}

fn fill(ram: &GuestRam, contents: &[Content], rng: &mut Xoshiro256PlusPlus) {
    let mut page = vec![0u8; PAGE_SIZE];
    for (i, c) in contents.iter().enumerate() {
        match c {
            Content::Zero => page.fill(0),
            Content::Text => fill_text(rng, &mut page),
            Content::Random => rng.fill_bytes(&mut page),
            Content::CopyOf(j) => {
                MemorySource::read_page(ram, (*j % contents.len()) as u64, &mut page)
            }
        }
        ram.write_page(i as u64, &page);
    }
}

/// Changes `pages` of `ram` the way a running guest does: a few scattered writes of 1..16 bytes, or a
/// rewrite of the whole page, or a copy of another page, or zeroing.
fn dirty(ram: &GuestRam, pages: &[u64], rng: &mut Xoshiro256PlusPlus) {
    let total = ram.layout().total_pages();
    let mut page = vec![0u8; PAGE_SIZE];
    for &p in pages {
        MemorySource::read_page(ram, p, &mut page);
        match rng.random_range(0..10) {
            0 => page.fill(0),
            1 => rng.fill_bytes(&mut page),
            2 => MemorySource::read_page(ram, rng.random_range(0..total), &mut page),
            _ => {
                for _ in 0..rng.random_range(1..40) {
                    let at = rng.random_range(0..PAGE_SIZE);
                    let len = rng.random_range(1..16).min(PAGE_SIZE - at);
                    rng.fill_bytes(&mut page[at..at + len]);
                }
            }
        }
        ram.write_page(p, &page);
    }
}

fn policy() -> impl Strategy<Value = CodecPolicy> {
    prop_oneof![
        Just(CodecPolicy::Fixed(Codec::None)),
        Just(CodecPolicy::Fixed(Codec::Lz4)),
        (1i32..=19).prop_map(|l| CodecPolicy::Fixed(Codec::Zstd(l))),
        Just(CodecPolicy::Adaptive {
            fallback: Codec::Zstd(1)
        }),
    ]
}

/// Encodes `pages` of `source` as one pass, decodes every chunk against `sink` and applies it there.
fn pass(
    encoder: &mut SessionEncoder,
    decoder: &ChunkDecoder,
    source: &GuestRam,
    sink: &GuestRam,
    pages: Option<&[u64]>,
    chunk_pages: usize,
) -> Vec<Vec<u8>> {
    let all: Vec<u64> = (0..source.layout().total_pages()).collect();
    let list = pages.unwrap_or(&all);
    encoder
        .begin_pass(pages.map_or(Pass::All, Pass::Pages))
        .unwrap();
    let chunks: Vec<&[u64]> = list.chunks(chunk_pages).collect();
    let buffers = BufferPool::new(64 << 20).unwrap();
    let hashes = dwcp_core::digest::PageHashes::new(all.len() as u64);
    let encoded: Vec<Vec<u8>> = encoder
        .encode_batch(7, &chunks, source, &buffers, Some(&hashes))
        .unwrap()
        .into_iter()
        .map(|b| b.to_vec())
        .collect();
    let mut scratch = DecodeScratch::default();
    for (payload, want) in encoded.iter().zip(&chunks) {
        let chunk = decoder
            .decode(payload, all.len() as u64, sink, &mut scratch)
            .unwrap();
        assert_eq!(chunk.iteration, 7);
        assert_eq!(chunk.pages.iter().map(|p| p.0).collect::<Vec<_>>(), *want);
        for (page, data) in &chunk.pages {
            match data {
                PageData::Zero => sink.write_zero_page(*page),
                PageData::Literal(bytes) => sink.write_page(*page, bytes),
            }
        }
        assert!(scratch.capacity() <= DecodeScratch::MAX_BYTES);
    }
    for &p in list {
        let mut expect = vec![0u8; PAGE_SIZE];
        MemorySource::read_page(source, p, &mut expect);
        assert_eq!(hashes.get(p), dwcp_core::digest::page_hash(&expect));
    }
    encoder.end_pass();
    encoded
}

fn same_memory(a: &GuestRam, b: &GuestRam) -> bool {
    let (mut x, mut y) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    (0..a.layout().total_pages()).all(|p| {
        MemorySource::read_page(a, p, &mut x);
        MemorySource::read_page(b, p, &mut y);
        x == y
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Three passes over random memory with random changes in between: after each pass the receiver
    /// holds exactly the sender's memory, whatever the policy, the dictionary, the chunk size and the
    /// cache settings.
    #[test]
    fn passes_roundtrip_every_class(
        contents in proptest::collection::vec(content(), 1..160),
        policy in policy(),
        bandwidth in prop_oneof![Just(0u64), 1_000_000u64..10_000_000_000],
        with_dictionary: bool,
        cache_first_pass: bool,
        tiny_cache: bool,
        chunk_pages in 1usize..=256,
        seed: u64,
    ) {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let source = ram(contents.len());
        fill(&source, &contents, &mut rng);
        let sink = ram(contents.len());
        let adaptive = matches!(policy, CodecPolicy::Adaptive { .. });
        let config = SessionConfig {
            codec: policy,
            threads: 2,
            delta_cache_bytes: if tiny_cache { 64 * PAGE_SIZE } else { DEFAULT_DELTA_CACHE_BYTES },
            dedup_entries: 1024,
            cache_first_pass,
        };
        let mut encoder = SessionEncoder::new(config, contents.len() as u64).unwrap();
        encoder.set_bandwidth_hint(bandwidth);
        let mut decoder = ChunkDecoder::new(1).unwrap();
        if with_dictionary {
            // Random dictionaries: raw content from random memory, or trained from the pages.
            let dict = Dictionary::train_from_memory(&source, 64, 8192)
                .or_else(|_| {
                    let mut bytes = vec![0u8; 64 + (seed % 4000) as usize];
                    rng.fill_bytes(&mut bytes);
                    bytes[..4].copy_from_slice(b"rand");
                    Dictionary::from_content(bytes)
                })
                .unwrap();
            let sent = Dictionary::from_bytes(&dict.to_bytes()).unwrap();
            prop_assert_eq!(sent.id(), dict.id());
            encoder.set_dictionary(Some(Arc::new(dict)));
            decoder.set_dictionary(Some(Arc::new(sent)));
        }
        pass(&mut encoder, &decoder, &source, &sink, None, chunk_pages);
        prop_assert!(same_memory(&source, &sink));
        let mut sent = contents.len() as u64;
        for _ in 0..2 {
            let mut dirty_pages: Vec<u64> = (0..contents.len() as u64).filter(|_| rng.random_bool(0.5)).collect();
            if dirty_pages.is_empty() {
                dirty_pages.push(0);
            }
            dirty(&source, &dirty_pages, &mut rng);
            pass(&mut encoder, &decoder, &source, &sink, Some(&dirty_pages), chunk_pages);
            prop_assert!(same_memory(&source, &sink));
            sent += dirty_pages.len() as u64;
        }
        let s = encoder.stats();
        prop_assert_eq!(s.zero_pages + s.literal_pages + s.dup_pages + s.delta_pages, sent);
        // The report says what the adaptive policy chose, and only for it; DUP and DELTA records
        // always make a section to choose for.
        let choices: u64 = s.adaptive_choices.iter().sum();
        if !adaptive {
            prop_assert_eq!(choices, 0);
        } else if s.dup_pages + s.delta_pages > 0 {
            prop_assert!(choices > 0, "{:?}", s);
        }
    }

    /// Corrupted or truncated extended chunks are refused or decode to something, never panic, and the
    /// scratch stays within its bound.
    #[test]
    fn corrupt_extended_chunks_never_panic(
        contents in proptest::collection::vec(content(), 1..40),
        policy in policy(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
        seed: u64,
    ) {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let source = ram(contents.len());
        fill(&source, &contents, &mut rng);
        let sink = ram(contents.len());
        let config = SessionConfig { codec: policy, threads: 1, cache_first_pass: true, ..SessionConfig::default() };
        let mut encoder = SessionEncoder::new(config, contents.len() as u64).unwrap();
        let decoder = ChunkDecoder::new(1).unwrap();
        pass(&mut encoder, &decoder, &source, &sink, None, 256);
        let pages: Vec<u64> = (0..contents.len() as u64).collect();
        dirty(&source, &pages, &mut rng);
        encoder.begin_pass(Pass::All).unwrap();
        let mut out = Vec::new();
        encoder.encode_one(2, &pages, &source, &mut out, None).unwrap();
        let mut bad = out.clone();
        for (at, x) in flips {
            let i = at % bad.len();
            bad[i] ^= x;
        }
        let mut scratch = DecodeScratch::default();
        let _ = decoder.decode(&bad, contents.len() as u64, &sink, &mut scratch);
        let _ = decoder.decode(&out[..cut % out.len()], contents.len() as u64, &sink, &mut scratch);
        prop_assert!(scratch.capacity() <= DecodeScratch::MAX_BYTES);
        // The intact chunk still decodes to the source's pages.
        let chunk = decoder.decode(&out, contents.len() as u64, &sink, &mut scratch).unwrap();
        let mut expect = vec![0u8; PAGE_SIZE];
        for (page, data) in &chunk.pages {
            MemorySource::read_page(&source, *page, &mut expect);
            match data {
                PageData::Zero => prop_assert!(expect.iter().all(|&b| b == 0)),
                PageData::Literal(b) => prop_assert_eq!(*b, &expect[..]),
            }
        }
    }

    /// Serialised dictionaries from the network: arbitrary bytes are refused or accepted, never panic,
    /// and an accepted one re-serialises to the same bytes.
    #[test]
    fn dictionary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), fix_header: bool) {
        let mut bytes = bytes;
        if fix_header && bytes.len() >= 20 {
            let content_len = bytes.len() - 12;
            bytes[..4].copy_from_slice(b"HDEd");
            bytes[8..12].copy_from_slice(&(content_len as u32).to_le_bytes());
            let id = (dwcp_core::digest::page_hash(&bytes[12..]) as u32).max(1);
            bytes[4..8].copy_from_slice(&id.to_le_bytes());
        }
        if let Ok(d) = Dictionary::from_bytes(&bytes) {
            prop_assert_eq!(d.to_bytes(), bytes);
        }
    }
}

/// Memory of `n` text pages, and a copy of it with 5% of each page's bytes changed.
fn text_and_changed(n: usize, seed: u64) -> (GuestRam, GuestRam) {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let base = ram(n);
    fill(&base, &vec![Content::Text; n], &mut rng);
    let changed = ram(n);
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..n as u64 {
        MemorySource::read_page(&base, p, &mut page);
        for _ in 0..200 {
            page[rng.random_range(0..PAGE_SIZE)] ^= 0x20;
        }
        changed.write_page(p, &page);
    }
    (base, changed)
}

#[test]
fn second_pass_uses_delta_and_dup_and_the_receiver_checks_their_bases() {
    let n = 64;
    let (base, changed) = text_and_changed(n, 3);
    let sink = ram(n);
    let config = SessionConfig {
        codec: CodecPolicy::Fixed(Codec::Zstd(3)),
        threads: 2,
        cache_first_pass: true,
        ..SessionConfig::default()
    };
    let mut encoder = SessionEncoder::new(config, n as u64).unwrap();
    let decoder = ChunkDecoder::new(1).unwrap();
    pass(&mut encoder, &decoder, &base, &sink, None, 16);
    assert_eq!(encoder.stats().delta_pages, 0, "no base in the first pass");

    // Pass 2: pages 0..32 changed (DELTA); page 40 now equals page 50, which this pass does not send
    // (DUP across passes).
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..32u64 {
        MemorySource::read_page(&changed, p, &mut page);
        base.write_page(p, &page);
    }
    MemorySource::read_page(&base, 50, &mut page);
    base.write_page(40, &page);
    let dirty: Vec<u64> = (0..32).chain([40]).collect();
    let before = sink_copy(&sink);
    let chunks = pass(&mut encoder, &decoder, &base, &sink, Some(&dirty), 11);
    assert!(same_memory(&base, &sink));
    let s = encoder.stats();
    assert_eq!((s.delta_pages, s.dup_pages), (32, 1));
    let literal_size = zstd::bulk::compress(&page, 1).unwrap().len();
    let wire: usize = chunks.iter().map(Vec::len).sum();
    assert!(
        wire < 33 * literal_size / 2,
        "{wire} bytes for 33 pages (a zstd-1 literal page is {literal_size})"
    );

    // The same chunks against a receiver that does not hold the bases: refused, typed.
    let mut scratch = DecodeScratch::default();
    let stale = before; // the receiver as it was before pass 2 ...
    let mut wrong = vec![0u8; PAGE_SIZE];
    MemorySource::read_page(&stale, 3, &mut wrong);
    wrong[9] ^= 1;
    stale.write_page(3, &wrong); // ... with page 3 (a DELTA base) damaged
    MemorySource::read_page(&stale, 50, &mut wrong);
    wrong[0] ^= 1;
    stale.write_page(50, &wrong); // ... and page 50 (the DUP source) damaged
    let mut kinds = Vec::new();
    for payload in &chunks {
        match decoder.decode(payload, n as u64, &stale, &mut scratch) {
            Err(DecodeError::BaseMismatch {
                page,
                base_page,
                kind,
                ..
            }) => kinds.push((page, base_page, kind)),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => {}
        }
    }
    assert_eq!(
        kinds,
        [(3, 3, PageKind::Delta), (40, 50, PageKind::Dup)],
        "each damaged base is caught"
    );
    let err: Error = DecodeError::BaseMismatch {
        page: 1,
        base_page: 2,
        kind: PageKind::Dup,
        expected: 1,
        found: 2,
    }
    .into();
    assert!(matches!(err, Error::Chunk(_)), "{err}");
}

fn sink_copy(sink: &GuestRam) -> GuestRam {
    let copy = ram(sink.layout().total_pages() as usize);
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..sink.layout().total_pages() {
        MemorySource::read_page(sink, p, &mut page);
        copy.write_page(p, &page);
    }
    copy
}

#[test]
fn duplicates_within_a_chunk_and_never_on_pages_of_the_current_pass() {
    let n = 8;
    let source = ram(n);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
    let mut contents = [Content::Zero; 8];
    contents[..4].copy_from_slice(&[
        Content::Random,
        Content::CopyOf(0),
        Content::Random,
        Content::Random,
    ]);
    fill(&source, &contents, &mut rng);
    let sink = ram(n);
    let mut encoder = SessionEncoder::new(SessionConfig::default(), n as u64).unwrap();
    let decoder = ChunkDecoder::new(1).unwrap();
    // Chunks [0,1,2], [3,4,5], [6,7]: page 1 copies page 0 of its own chunk.
    pass(&mut encoder, &decoder, &source, &sink, None, 3);
    assert_eq!(encoder.stats().dup_pages, 1);
    // Pass 2 sends pages 2 and 3; page 2 becomes a copy of page 3, which this pass also sends: a DUP
    // would race with page 3's own chunk on another stream, so it must not be one.
    let mut page = vec![0u8; PAGE_SIZE];
    MemorySource::read_page(&source, 3, &mut page);
    source.write_page(2, &page);
    page[0] ^= 0xff;
    source.write_page(3, &page);
    encoder.begin_pass(Pass::Pages(&[2, 3])).unwrap();
    let mut a = Vec::new();
    encoder.encode_one(1, &[2], &source, &mut a, None).unwrap();
    let mut b = Vec::new();
    encoder.encode_one(1, &[3], &source, &mut b, None).unwrap();
    assert_eq!(
        encoder.stats().dup_pages,
        1,
        "no DUP of a page of the current pass"
    );
    let mut scratch = DecodeScratch::default();
    // Applied in the "wrong" order: page 3's chunk first.
    for payload in [&b, &a] {
        let chunk = decoder
            .decode(payload, n as u64, &sink, &mut scratch)
            .unwrap();
        for (p, d) in &chunk.pages {
            if let PageData::Literal(bytes) = d {
                sink.write_page(*p, bytes);
            }
        }
    }
    encoder.end_pass();
    assert!(same_memory(&source, &sink));
    // Pass 3: page 5 becomes a copy of page 2 (sent in pass 2, not in pass 3): a DUP across passes.
    MemorySource::read_page(&source, 2, &mut page);
    source.write_page(5, &page);
    pass(&mut encoder, &decoder, &source, &sink, Some(&[5]), 1);
    assert_eq!(encoder.stats().dup_pages, 2);
    assert!(same_memory(&source, &sink));
}

#[test]
fn the_pass_protocol_is_enforced() {
    let source = ram(4);
    let buffers = BufferPool::new(16 << 20).unwrap();
    let mut encoder = SessionEncoder::new(SessionConfig::default(), 4).unwrap();
    let chunk: &[u64] = &[0, 1];
    assert!(
        encoder
            .encode_batch(0, &[chunk], &source, &buffers, None)
            .is_err(),
        "outside a pass"
    );
    encoder.begin_pass(Pass::Pages(&[0])).unwrap();
    assert!(encoder.begin_pass(Pass::All).is_err(), "pass still open");
    let err = encoder
        .encode_batch(0, &[chunk], &source, &buffers, None)
        .unwrap_err();
    assert!(
        err.to_string().contains("page 1 was not announced"),
        "{err}"
    );
    assert!(
        encoder
            .encode_batch(0, &[&[0, 0][..]], &source, &buffers, None)
            .is_err(),
        "pages must ascend"
    );
    encoder.end_pass();
    assert!(
        encoder.begin_pass(Pass::Pages(&[4])).is_err(),
        "outside the layout"
    );
    let other = ram(5);
    encoder.begin_pass(Pass::All).unwrap();
    assert!(
        encoder
            .encode_batch(0, &[&[0][..]], &other, &buffers, None)
            .is_err(),
        "a source of another size"
    );
}

#[test]
fn a_missing_or_different_dictionary_is_a_typed_error() {
    let n = 32;
    let (base, _) = text_and_changed(n, 9);
    let dict = Arc::new(Dictionary::train_from_memory(&base, 32, 4096).unwrap());
    let config = SessionConfig {
        codec: CodecPolicy::Fixed(Codec::Zstd(3)),
        threads: 1,
        ..SessionConfig::default()
    };
    let mut encoder = SessionEncoder::new(config, n as u64).unwrap();
    encoder.set_dictionary(Some(dict.clone()));
    encoder.begin_pass(Pass::All).unwrap();
    let pages: Vec<u64> = (0..n as u64).collect();
    let mut out = Vec::new();
    encoder
        .encode_one(0, &pages, &base, &mut out, None)
        .unwrap();
    assert_eq!(out[0], StoredCodec::ZstdDictionary as u8);
    let sink = ram(n);
    let mut decoder = ChunkDecoder::new(1).unwrap();
    let mut scratch = DecodeScratch::default();
    let err = decoder
        .decode(&out, n as u64, &sink, &mut scratch)
        .unwrap_err();
    assert!(
        matches!(err, DecodeError::DictionaryMismatch { wanted, held: None } if wanted == dict.id()),
        "{err}"
    );
    decoder.set_dictionary(Some(Arc::new(
        Dictionary::from_content(b"another dictionary entirely".to_vec()).unwrap(),
    )));
    assert!(matches!(
        decoder.decode(&out, n as u64, &sink, &mut scratch),
        Err(DecodeError::DictionaryMismatch { .. })
    ));
    decoder.set_dictionary(Some(dict));
    assert_eq!(
        decoder
            .decode(&out, n as u64, &sink, &mut scratch)
            .unwrap()
            .pages
            .len(),
        n
    );
}

#[test]
fn hostile_extended_headers_are_refused_before_any_allocation() {
    // One LITERAL page announcing a 1 MiB zstd section: refused by the bound on U.
    let mut c = vec![2u8, 1];
    c.extend_from_slice(&1u16.to_le_bytes());
    c.extend_from_slice(&0u32.to_le_bytes());
    c.extend_from_slice(&1u16.to_le_bytes());
    c.extend_from_slice(&0u16.to_le_bytes());
    let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap();
    c.extend_from_slice(&(bomb.len() as u32).to_le_bytes());
    c.extend_from_slice(&(1u32 << 20).to_le_bytes());
    c.extend_from_slice(&0u32.to_le_bytes());
    c.extend_from_slice(&0u64.to_le_bytes());
    c.extend_from_slice(&1u16.to_le_bytes());
    c.push(PageKind::Literal as u8);
    c.extend_from_slice(&bomb);
    let decoder = ChunkDecoder::new(1).unwrap();
    let sink = ram(4);
    let mut scratch = DecodeScratch::default();
    let err = decoder.decode(&c, 4, &sink, &mut scratch).unwrap_err();
    assert!(
        err.to_string().contains("section of 1048576 bytes"),
        "{err}"
    );
    assert_eq!(scratch.capacity(), 0);
    // With U = 4096 the stream decompresses to more than announced: a decompression error.
    c[16..20].copy_from_slice(&4096u32.to_le_bytes());
    let err = decoder.decode(&c, 4, &sink, &mut scratch).unwrap_err();
    assert!(
        matches!(err, DecodeError::Chunk(ChunkError::Decompress(_))),
        "{err}"
    );
    assert!(scratch.capacity() <= 2 * PAGE_SIZE);
    // A DUP whose source lies outside the layout.
    let mut d = vec![0u8, 1];
    d.extend_from_slice(&1u16.to_le_bytes());
    d.extend_from_slice(&0u32.to_le_bytes());
    d.extend_from_slice(&1u16.to_le_bytes());
    d.extend_from_slice(&0u16.to_le_bytes());
    d.extend_from_slice(&24u32.to_le_bytes());
    d.extend_from_slice(&24u32.to_le_bytes());
    d.extend_from_slice(&0u32.to_le_bytes());
    d.extend_from_slice(&0u64.to_le_bytes());
    d.extend_from_slice(&1u16.to_le_bytes());
    d.push(PageKind::Dup as u8);
    d.extend_from_slice(&9u64.to_le_bytes());
    d.extend_from_slice(&0u128.to_le_bytes());
    let err = decoder.decode(&d, 4, &sink, &mut scratch).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Chunk(ChunkError::PageOutOfRange { page: 9, .. })
        ),
        "{err}"
    );
    // A DUP of itself.
    d[24 + 10 + 1..24 + 10 + 9].copy_from_slice(&0u64.to_le_bytes());
    let err = decoder.decode(&d, 4, &sink, &mut scratch).unwrap_err();
    assert!(err.to_string().contains("sends later"), "{err}");
}

#[test]
fn decode_batch_preserves_order_and_format0_chunks_decode_too() {
    let n = 600;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(4);
    let contents: Vec<Content> = (0..n)
        .map(|i| [Content::Zero, Content::Text, Content::Random][i % 3])
        .collect();
    let source = ram(n);
    fill(&source, &contents, &mut rng);
    let pages: Vec<u64> = (0..n as u64).collect();
    let chunks: Vec<&[u64]> = pages.chunks(64).collect();
    let mut encoder = SessionEncoder::new(SessionConfig::default(), n as u64).unwrap();
    encoder.begin_pass(Pass::All).unwrap();
    let buffers = BufferPool::new(64 << 20).unwrap();
    let mut payloads: Vec<Vec<u8>> = encoder
        .encode_batch(0, &chunks, &source, &buffers, None)
        .unwrap()
        .into_iter()
        .map(|b| b.to_vec())
        .collect();
    // One old-format chunk in the middle.
    let mut old = Vec::new();
    encode_chunk(
        Codec::Lz4,
        0,
        chunks[3],
        &source,
        &mut old,
        &mut Vec::new(),
        &EncodeCounters::default(),
        None,
    )
    .unwrap();
    payloads[3] = old;
    let s = encoder.stats();
    assert_eq!(
        (s.zero_pages, s.incompressible_pages),
        (200, 200),
        "every random page skips the compressor"
    );
    let sink = ram(n);
    let decoder = ChunkDecoder::new(2).unwrap();
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    let results = decoder.decode_batch(&refs, n as u64, &sink, |i, chunk| {
        for (p, d) in &chunk.pages {
            if let PageData::Literal(b) = d {
                sink.write_page(*p, b);
            }
        }
        (i, chunk.pages.first().map(|p| p.0))
    });
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap(), (i, Some(chunks[i][0])));
    }
    assert!(same_memory(&source, &sink));
}
