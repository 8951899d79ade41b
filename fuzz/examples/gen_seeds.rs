//! Writes the seed corpora of the fuzz targets: valid encodings made by the real encoders, plus a few
//! hand-made mutations of each field the decoders check.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds` (from the repository root) writes
//! `fuzz/corpus/<target>/seed-*`. Minimise afterwards with `cargo fuzz cmin`.
//!
//! A generator of seed files: one small function per target and seed, long by nature.

use std::fs;
use std::path::{Path, PathBuf};

use dwcp_core::error::ErrorCode;
use dwcp_core::frame::{FrameType, HEADER_LEN, encode_frame};
use dwcp_core::memory::{MemoryLayout, PAGE_SIZE, Region};
use dwcp_core::messages::{
    Ack, ClientHello, DigestMessage, ErrorMessage, Finish, ServerHello, SessionInit,
};
use dwcp_fuzz::chunk::{PREFIX_LEN, PageMap, SESSION_PREFIX_LEN, fuzz_dictionary, receiver_page};
use dwcp_hde::{
    Codec, CodecPolicy, Dictionary, EncodeCounters, Pass, SessionConfig, SessionEncoder,
    encode_chunk,
};

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let frames = frame_seeds();
    let messages = message_seeds();
    let chunks = chunk_seeds();
    let sessions = session_chunk_seeds();
    let dictionaries = dictionary_seeds();
    for (target, seeds) in [
        ("handshake", handshake_seeds()),
        ("qemu_wire", qemu_wire_seeds()),
        ("raft_rpc", raft_rpc_seeds()),
        ("node_control", node_control_seeds()),
        ("frame", frames),
        ("messages", messages),
        ("chunk", chunks),
        ("session_chunk", sessions),
        ("dictionary", dictionaries),
    ] {
        let dir = root.join(target);
        fs::create_dir_all(&dir).unwrap();
        let mut bytes = 0;
        for (name, data) in &seeds {
            write(&dir, name, data);
            bytes += data.len();
        }
        println!("{target}: {} seeds, {bytes} bytes", seeds.len());
    }
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    fs::write(dir.join(format!("seed-{name}")), data).unwrap();
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

fn client_hello(sid: u64, idx: u16) -> ClientHello {
    ClientHello {
        min_version: 1,
        max_version: 1,
        capabilities: 3,
        nonce: noise(1, 32).try_into().unwrap(),
        session_id: sid,
        stream_index: idx,
    }
}

fn server_hello(sid: u64) -> ServerHello {
    ServerHello {
        version: 1,
        capabilities: 3,
        nonce: noise(2, 32).try_into().unwrap(),
        session_id: sid,
        mac: noise(3, 32).try_into().unwrap(),
    }
}

fn layout(regions: &[(u64, u64)]) -> MemoryLayout {
    MemoryLayout::new(
        PAGE_SIZE as u32,
        regions
            .iter()
            .map(|&(guest_addr, pages)| Region { guest_addr, pages })
            .collect(),
    )
    .unwrap()
}

fn session_init(regions: &[(u64, u64)], streams: u16) -> Vec<u8> {
    SessionInit {
        layout: layout(regions),
        stream_count: streams,
        identity: None,
    }
    .encode()
}

fn error_message(code: ErrorCode, text: &str) -> Vec<u8> {
    ErrorMessage {
        code,
        message: text.into(),
    }
    .encode()
}

/// A stream of frames numbered from 0, preceded by the control byte.
fn stream(ctl: u8, sid: u64, frames: &[(FrameType, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![ctl];
    for (seq, (ty, payload)) in frames.iter().enumerate() {
        encode_frame(*ty, sid, seq as u64, payload, &mut out);
    }
    out
}

/// A `chunk` fuzz input: layout size, scratch capacity in pages, payload.
fn input(total_pages: u64, scratch_pages: u8, payload: &[u8]) -> Vec<u8> {
    assert!((1..=1 << 20).contains(&total_pages));
    let mut v = ((total_pages - 1) as u32).to_le_bytes().to_vec();
    v.push(scratch_pages);
    assert_eq!(v.len(), PREFIX_LEN);
    v.extend_from_slice(payload);
    v
}

fn small_chunk() -> Vec<u8> {
    let source = PageMap::new(64, [(3, noise(4, PAGE_SIZE)), (4, vec![7; PAGE_SIZE])]);
    encode(&source, Codec::Lz4, 2, &[1, 2, 3, 4])
}

fn encode(source: &PageMap, codec: Codec, iteration: u32, pages: &[u64]) -> Vec<u8> {
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    encode_chunk(
        codec,
        iteration,
        pages,
        source,
        &mut out,
        &mut scratch,
        &EncodeCounters::default(),
        None,
    )
    .unwrap();
    out
}

fn frame_seeds() -> Vec<(String, Vec<u8>)> {
    let sid = 0x1122_3344_5566_7788;
    let mut seeds = Vec::new();
    let mut add = |name: &str, data: Vec<u8>| seeds.push((name.to_string(), data));

    let hello = stream(
        0x00,
        0,
        &[(FrameType::ClientHello, client_hello(0, 0).encode())],
    );
    add("client-hello", hello.clone());
    add("client-hello-trickle", {
        let mut v = hello.clone();
        v[0] = 1 << 4;
        v
    });
    add(
        "source-stream0",
        stream(
            0x81,
            0,
            &[
                (FrameType::ClientHello, client_hello(0, 0).encode()),
                (FrameType::ClientAuth, noise(5, 32)),
                (FrameType::SessionInit, session_init(&[(0, 64)], 4)),
                (FrameType::Data, small_chunk()),
                (
                    FrameType::Finish,
                    Finish {
                        final_iteration: 2,
                        data_frames: 1,
                    }
                    .encode(),
                ),
                (
                    FrameType::Commit,
                    DigestMessage { digest: 42 }.encode().to_vec(),
                ),
                (FrameType::Close, Vec::new()),
            ],
        ),
    );
    add(
        "destination-stream0",
        stream(
            0x41 | (2 << 4),
            sid,
            &[
                (FrameType::ServerHello, server_hello(sid).encode()),
                (FrameType::AuthOk, Vec::new()),
                (FrameType::SessionReady, Vec::new()),
                (FrameType::Ack, Ack { through_seq: 3 }.encode().to_vec()),
                (
                    FrameType::Verdict,
                    DigestMessage { digest: 42 }.encode().to_vec(),
                ),
                (FrameType::CommitAck, Vec::new()),
                (
                    FrameType::Error,
                    error_message(ErrorCode::Protocol, "bad chunk"),
                ),
            ],
        ),
    );
    add(
        "small-limit",
        stream(
            0x46,
            sid,
            &[
                (FrameType::Ack, Ack { through_seq: 3 }.encode().to_vec()),
                (
                    FrameType::Error,
                    error_message(ErrorCode::Layout, "too big"),
                ),
            ],
        ),
    );
    let records = |list: &[(u8, Vec<u8>)]| -> Vec<u8> {
        let mut v = Vec::new();
        for (t, payload) in list {
            v.push(*t);
            v.extend_from_slice(&(payload.len() as u16).to_le_bytes());
            v.extend_from_slice(payload);
        }
        v
    };
    add(
        "built-small-limit",
        [
            &[0x08 | 0x40 | 0x02][..],
            &records(&[
                (7, Ack { through_seq: 1 }.encode().to_vec()),
                (12, error_message(ErrorCode::Cancelled, "stop")),
            ]),
        ]
        .concat(),
    );
    add(
        "built-handshake",
        [
            &[0x08 | 0x80 | (1 << 4)][..],
            &records(&[
                (0, client_hello(0, 1).encode()),
                (2, noise(6, 32)),
                (6, small_chunk()),
                (13, Vec::new()),
            ]),
        ]
        .concat(),
    );
    add(
        "zero-limit",
        stream(0x43, sid, &[(FrameType::AuthOk, Vec::new())]),
    );
    let mut unfixed = hello.clone();
    unfixed[0] = 0x04;
    unfixed[1 + 32..1 + HEADER_LEN].fill(0);
    add("checksum-to-fix", unfixed);

    // Mutations of the ClientHello frame, one per header check.
    let mutate = |at: usize, byte: u8| {
        let mut v = hello.clone();
        v[1 + at] = byte;
        v
    };
    add("bad-magic", mutate(0, b'X'));
    add("version-2", mutate(4, 2));
    add("type-0", mutate(5, 0));
    add("type-15", mutate(5, 15));
    add("flags", mutate(6, 1));
    add("reserved", mutate(28, 1));
    add("oversize", {
        let mut v = hello.clone();
        v[1 + 24..1 + 28].copy_from_slice(&4097u32.to_le_bytes());
        v
    });
    add("wrong-sequence", mutate(16, 1));
    add("checksum-flip", {
        let mut v = hello.clone();
        *v.last_mut().unwrap() ^= 1;
        v
    });
    add("truncated-header", hello[..21].to_vec());
    add("truncated-payload", hello[..hello.len() - 5].to_vec());
    add(
        "wrong-session",
        stream(
            0x40,
            sid,
            &[
                (FrameType::ServerHello, server_hello(sid).encode()),
                (FrameType::AuthOk, Vec::new()),
            ],
        )
        .into_iter()
        .enumerate()
        .map(|(i, b)| if i == 1 + 117 + 8 { b ^ 1 } else { b })
        .collect(),
    );
    seeds
}

fn message_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut add = |name: &str, data: Vec<u8>| seeds.push((name.to_string(), data));
    add("client-hello", client_hello(0x77, 3).encode());
    add("server-hello", server_hello(0x77).encode());
    add(
        "finish",
        Finish {
            final_iteration: 9,
            data_frames: 1 << 33,
        }
        .encode(),
    );
    add(
        "digest",
        DigestMessage {
            digest: u128::MAX / 3,
        }
        .encode()
        .to_vec(),
    );
    add("ack", Ack { through_seq: 17 }.encode().to_vec());
    add("init-flat", session_init(&[(0, 262_144)], 4));
    add(
        "init-three",
        session_init(&[(0, 160), (0x10_0000, 16), (1 << 32, 1 << 20)], 8),
    );
    add("init-adjacent", session_init(&[(0, 1), (4096, 1)], 1));
    add("init-max-pages", session_init(&[(0, 1 << 40)], 64));
    add(
        "init-top-of-space",
        session_init(&[(u64::MAX - 8191, 1)], 2),
    );
    let many: Vec<(u64, u64)> = (0..1024).map(|i| (i * 8192, 1)).collect();
    add("init-1024-regions", session_init(&many, 2));
    for (i, code) in [
        ErrorCode::Protocol,
        ErrorCode::Authentication,
        ErrorCode::Version,
        ErrorCode::Layout,
        ErrorCode::Cancelled,
        ErrorCode::Internal,
        ErrorCode::DigestMismatch,
    ]
    .into_iter()
    .enumerate()
    {
        add(
            &format!("error-{i}"),
            error_message(code, "stream 2 failed"),
        );
    }
    add("error-empty", error_message(ErrorCode::Internal, ""));
    add(
        "error-utf8",
        error_message(ErrorCode::Layout, "mémoire trop petite ✗"),
    );
    add(
        "error-max",
        error_message(ErrorCode::Protocol, &"é".repeat(600)),
    );

    // Mutations.
    let init = session_init(&[(0, 16), (0x10_0000, 16)], 4);
    let patch = |at: usize, bytes: &[u8]| {
        let mut v = init.clone();
        v[at..at + bytes.len()].copy_from_slice(bytes);
        v
    };
    add("init-page-size", patch(0, &8192u32.to_le_bytes()));
    add("init-zero-streams", patch(4, &0u16.to_le_bytes()));
    add("init-zero-regions", patch(6, &0u32.to_le_bytes()));
    add("init-1025-regions", patch(6, &1025u32.to_le_bytes()));
    add("init-empty-region", patch(18, &0u64.to_le_bytes()));
    add("init-misaligned", patch(10, &7u64.to_le_bytes()));
    add("init-overlap", patch(26, &0x1000u64.to_le_bytes()));
    add("init-overflow", patch(34, &(u64::MAX / 4096).to_le_bytes()));
    add(
        "init-too-many-pages",
        patch(18, &((1u64 << 40) + 1).to_le_bytes()),
    );
    add("init-short", init[..init.len() - 1].to_vec());
    add("init-trailing", [&init[..], &[0]].concat());
    add(
        "error-1024",
        error_message(ErrorCode::Protocol, &"x".repeat(1024)),
    );
    add("error-1025", [&[1, 0][..], &[b'x'; 1025]].concat());
    add("error-bad-utf8", vec![1, 0, 0xff, 0xfe, b'a', 0xc3]);
    add("error-unknown-code", [&[0, 0][..], b"zero"].concat());
    add("error-short", vec![1]);
    seeds
}

fn chunk_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut add = |name: &str, data: Vec<u8>| seeds.push((name.to_string(), data));
    let pattern = |seed: u8| -> Vec<u8> {
        (0..PAGE_SIZE)
            .map(|i| if i % 64 < 8 { seed } else { (i / 512) as u8 })
            .collect()
    };

    let tiny = PageMap::new(16, [(1, noise(9, PAGE_SIZE))]);
    add(
        "zero-page",
        input(16, 0, &encode(&tiny, Codec::None, 0, &[0])),
    );
    let raw_one = encode(&tiny, Codec::None, 0, &[1]);
    add("raw-page", input(16, 0, &raw_one));

    let mixed = PageMap::new(
        1024,
        [
            (1, noise(10, PAGE_SIZE)),
            (2, pattern(1)),
            (5, pattern(2)),
            (9, vec![0xaa; PAGE_SIZE]),
        ],
    );
    let pages = [0, 1, 2, 5, 6, 9];
    add(
        "mixed-none",
        input(1024, 0, &encode(&mixed, Codec::None, 1, &pages)),
    );
    add(
        "mixed-lz4",
        input(1024, 1, &encode(&mixed, Codec::Lz4, 1, &pages)),
    );
    let mixed_zstd = encode(&mixed, Codec::Zstd(3), 1, &pages);
    add("mixed-zstd", input(1024, 0, &mixed_zstd));

    let full = PageMap::new(4096, (0..256).map(|p| (p + 100, pattern(p as u8))));
    let all: Vec<u64> = (100..356).collect();
    let full_lz4 = encode(&full, Codec::Lz4, 7, &all);
    add("full-lz4", input(4096, 16, &full_lz4));
    add(
        "full-zstd",
        input(4096, 0, &encode(&full, Codec::Zstd(1), 7, &all)),
    );
    add(
        "full-zero",
        input(
            4096,
            0,
            &encode(&full, Codec::None, 7, &(600..856).collect::<Vec<_>>()),
        ),
    );
    let scattered: Vec<u64> = (0..256).map(|i| 100 + 2 * i).collect();
    add(
        "scattered-lz4",
        input(4096, 0, &encode(&full, Codec::Lz4, 3, &scattered)),
    );
    let top = PageMap::new(1 << 20, [((1 << 20) - 1, pattern(5))]);
    add(
        "top-page",
        input(
            1 << 20,
            0,
            &encode(&top, Codec::Lz4, 1, &[(1 << 20) - 2, (1 << 20) - 1]),
        ),
    );

    // Mutations.
    let base = encode(&mixed, Codec::Lz4, 1, &pages);
    assert_eq!(base[0], 1, "the mixed chunk compresses with lz4");
    let patch = |bytes: &[u8], at: usize, with: &[u8]| {
        let mut v = bytes.to_vec();
        v[at..at + with.len()].copy_from_slice(with);
        input(1024, 0, &v)
    };
    add("codec-3", patch(&base, 0, &[3]));
    add("reserved-a", patch(&base, 1, &[1]));
    add("reserved-b", patch(&base, 10, &[1]));
    add("zero-pages", patch(&base, 2, &0u16.to_le_bytes()));
    add("257-pages", patch(&base, 2, &257u16.to_le_bytes()));
    add("zero-runs", patch(&base, 8, &0u16.to_le_bytes()));
    add("runs-above-pages", patch(&base, 8, &7u16.to_le_bytes()));
    add("empty-run", patch(&base, 16 + 8, &0u16.to_le_bytes()));
    add(
        "runs-descending",
        patch(&base, 16 + 10, &0u64.to_le_bytes()),
    );
    add(
        "run-overflow",
        patch(&base, 16 + 10, &(u64::MAX - 1).to_le_bytes()),
    );
    add(
        "run-out-of-range",
        patch(&base, 16 + 10, &1023u64.to_le_bytes()),
    );
    add("class-2", patch(&base, 16 + 30, &[2]));
    add("trailing", input(1024, 0, &[&base[..], &[0]].concat()));
    add("short-section", input(1024, 0, &base[..base.len() - 1]));
    add("raw-length", {
        let mut v = raw_one.clone();
        v[12..16].copy_from_slice(&4095u32.to_le_bytes());
        v.pop();
        input(16, 0, &v)
    });
    let zero_only = encode(&tiny, Codec::None, 0, &[0]);
    add(
        "section-without-literals",
        input(16, 0, &{
            let mut v = zero_only.clone();
            v[0] = 1;
            v[12..16].copy_from_slice(&2u32.to_le_bytes());
            v.extend_from_slice(&[0, 0]);
            v
        }),
    );
    add("lz4-no-literals", patch(&zero_only, 0, &[1]));
    add("zstd-no-literals", patch(&zero_only, 0, &[2]));
    add("lz4-wrong-size", {
        // Claim one more literal page than the section decompresses to.
        let at = 16 + 10 * 3 + 1;
        let mut v = base.clone();
        assert_eq!(v[at], 1);
        v[at - 1] = 1;
        input(1024, 0, &v)
    });
    add("zstd-garbage", {
        let mut v = mixed_zstd.clone();
        let n = v.len();
        v[n - 8..].fill(0x5a);
        input(1024, 0, &v)
    });
    add("full-lz4-big-scratch", input(4096, 100, &full_lz4));
    seeds
}

/// A `session_chunk` fuzz input: layout size, dictionary choice, payload.
fn session_input(total_pages: u64, dictionary: u8, payload: &[u8]) -> Vec<u8> {
    assert!((1..=1 << 16).contains(&total_pages));
    let mut v = ((total_pages - 1) as u16).to_le_bytes().to_vec();
    v.push(dictionary);
    assert_eq!(v.len(), SESSION_PREFIX_LEN);
    v.extend_from_slice(payload);
    v
}

const SESSION_PAGES: u64 = 300;

/// The memory after the first pass: every page as the fuzz receiver holds it.
fn first_pass_memory() -> PageMap {
    PageMap::new(
        SESSION_PAGES,
        (0..SESSION_PAGES).filter(|p| p % 7 != 0).map(|p| {
            let mut page = vec![0u8; PAGE_SIZE];
            receiver_page(p, &mut page);
            (p, page)
        }),
    )
}

/// The pages of the second pass and the memory then: 1..=40 slightly changed (DELTA), 50 a copy of
/// page 100 (DUP of a page the pass does not send), 51 a copy of 50 (DUP within the chunk), 52 random
/// (INCOMPRESSIBLE), 53 zero, 54 new text-like content (LITERAL).
fn second_pass() -> (Vec<u64>, PageMap) {
    let mut pages = Vec::new();
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 1..=40u64 {
        receiver_page(p, &mut page);
        for k in 0..(p as usize % 9 + 1) {
            page[(k * 397 + p as usize * 13) % PAGE_SIZE] ^= 0x41;
        }
        pages.push((p, page.clone()));
    }
    receiver_page(100, &mut page);
    pages.push((50, page.clone()));
    pages.push((51, page.clone()));
    pages.push((52, noise(52, PAGE_SIZE)));
    let text: Vec<u8> = b"kernel: eth0 link up, 1000 Mbps full duplex\n"
        .iter()
        .copied()
        .cycle()
        .take(PAGE_SIZE)
        .collect();
    pages.push((54, text));
    let list: Vec<u64> = (1..=40).chain(50..=54).collect();
    (list, PageMap::new(SESSION_PAGES, pages))
}

/// The second-pass chunk of a session that sent the first pass with `codec` (and the fuzz dictionary).
fn session_chunk(codec: Codec, dictionary: bool) -> Vec<u8> {
    let config = SessionConfig {
        codec: CodecPolicy::Fixed(codec),
        threads: 1,
        cache_first_pass: true,
        ..SessionConfig::default()
    };
    let mut encoder = SessionEncoder::new(config, SESSION_PAGES).unwrap();
    if dictionary {
        encoder.set_dictionary(Some(fuzz_dictionary()));
    }
    let all: Vec<u64> = (0..SESSION_PAGES).collect();
    encoder.begin_pass(Pass::All).unwrap();
    let first = first_pass_memory();
    let mut out = Vec::new();
    for chunk in all.chunks(256) {
        encoder
            .encode_one(1, chunk, &first, &mut out, None)
            .unwrap();
    }
    encoder.end_pass();
    let (list, second) = second_pass();
    encoder.begin_pass(Pass::Pages(&list)).unwrap();
    encoder
        .encode_one(2, &list, &second, &mut out, None)
        .unwrap();
    let s = encoder.stats();
    assert!(s.delta_pages >= 30 && s.dup_pages == 2, "{s:?}");
    out
}

fn session_chunk_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut add = |name: &str, data: Vec<u8>| seeds.push((name.to_string(), data));
    let raw = session_chunk(Codec::None, false);
    let lz4 = session_chunk(Codec::Lz4, false);
    let zstd = session_chunk(Codec::Zstd(3), false);
    let dict = session_chunk(Codec::Zstd(3), true);
    assert_eq!((raw[0], raw[1], dict[0]), (0, 1, 3));
    add("raw", session_input(SESSION_PAGES, 0, &raw));
    add("lz4", session_input(SESSION_PAGES, 0, &lz4));
    add("zstd", session_input(SESSION_PAGES, 0, &zstd));
    add("dictionary", session_input(SESSION_PAGES, 1, &dict));
    add("dictionary-missing", session_input(SESSION_PAGES, 0, &dict));
    add("dictionary-other", session_input(SESSION_PAGES, 2, &dict));
    // A first-pass chunk (only ZERO, LITERAL, INCOMPRESSIBLE and in-chunk DUP) and a format-0 chunk.
    let mut first = Vec::new();
    let config = SessionConfig {
        codec: CodecPolicy::Fixed(Codec::Zstd(1)),
        threads: 1,
        ..SessionConfig::default()
    };
    let mut encoder = SessionEncoder::new(config, SESSION_PAGES).unwrap();
    encoder.begin_pass(Pass::All).unwrap();
    let (list, second) = second_pass();
    encoder
        .encode_one(0, &list, &second, &mut first, None)
        .unwrap();
    add("first-pass", session_input(SESSION_PAGES, 0, &first));
    add(
        "format-0",
        session_input(SESSION_PAGES, 0, &encode(&second, Codec::Lz4, 1, &list)),
    );

    // Mutations of the raw chunk, one per checked field. Layout: 24-byte header, runs, classes,
    // section (literals, DUP records, DELTA records), raw area.
    let runs = usize::from(u16::from_le_bytes([raw[8], raw[9]]));
    let classes_at = 24 + 10 * runs;
    let n = usize::from(u16::from_le_bytes([raw[2], raw[3]]));
    let section_at = classes_at + n;
    let classes = &raw[classes_at..section_at];
    let literal = classes.iter().filter(|&&c| c == 1).count();
    let dup_at = section_at + literal * PAGE_SIZE;
    let delta_at = dup_at + 2 * 24;
    let patch = |at: usize, with: &[u8]| {
        let mut v = raw.clone();
        v[at..at + with.len()].copy_from_slice(with);
        session_input(SESSION_PAGES, 0, &v)
    };
    add("codec-4", patch(0, &[4]));
    add("format-2", patch(1, &[2]));
    add("reserved", patch(10, &[1]));
    add("dictionary-id-without-codec", patch(20, &[1]));
    add("section-too-long", patch(16, &u32::MAX.to_le_bytes()));
    add("section-too-short", patch(16, &1u32.to_le_bytes()));
    add("class-5", patch(classes_at, &[5]));
    add("dup-hash", patch(dup_at + 8, &[0xff]));
    add(
        "dup-source-out-of-range",
        patch(dup_at, &(SESSION_PAGES).to_le_bytes()),
    );
    add("dup-source-later", patch(dup_at, &53u64.to_le_bytes()));
    add("dup-source-itself", patch(dup_at, &50u64.to_le_bytes()));
    add("delta-base-hash", patch(delta_at, &[0xff]));
    add("delta-length", patch(delta_at + 16, &4096u16.to_le_bytes()));
    add(
        "delta-garbage",
        patch(delta_at + 18, &[0x80, 0x80, 0x80, 0x80]),
    );
    add(
        "truncated-raw-area",
        session_input(SESSION_PAGES, 0, &raw[..raw.len() - 1]),
    );
    add(
        "trailing",
        session_input(SESSION_PAGES, 0, &[&raw[..], &[0]].concat()),
    );
    add("small-layout", session_input(41, 0, &raw));
    add("zstd-garbage", {
        let mut v = zstd.clone();
        let n = v.len();
        v[n - 8..].fill(0x5a);
        session_input(SESSION_PAGES, 0, &v)
    });
    seeds
}

fn dictionary_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    // Mode byte 0: the bytes as they are; 1: length and id fixed up by the harness.
    let mut add = |name: &str, data: Vec<u8>| {
        seeds.push((name.to_string(), [&[0u8][..], &data].concat()));
        seeds.push((format!("{name}-fixed"), [&[1u8][..], &data].concat()));
    };
    let raw = fuzz_dictionary().to_bytes();
    add("raw-content", raw.clone());
    let samples: Vec<Vec<u8>> = (1..400u64)
        .filter(|p| p % 7 != 0)
        .map(|p| {
            let mut page = vec![0u8; PAGE_SIZE];
            receiver_page(p, &mut page);
            page
        })
        .collect();
    let trained = Dictionary::train(&samples, 8192).unwrap().to_bytes();
    add("trained", trained.clone());
    let small = Dictionary::from_content(b"12345678".to_vec())
        .unwrap()
        .to_bytes();
    add("smallest", small.clone());
    let patch = |bytes: &[u8], at: usize, with: &[u8]| {
        let mut v = bytes.to_vec();
        v[at..at + with.len()].copy_from_slice(with);
        v
    };
    add("bad-magic", patch(&raw, 0, b"HDEx"));
    add("wrong-id", patch(&raw, 4, &[0, 0, 0, 0]));
    add(
        "length-too-long",
        patch(&raw, 8, &(1u32 << 20).to_le_bytes()),
    );
    add("length-7", patch(&small, 8, &7u32.to_le_bytes()));
    add("truncated", raw[..raw.len() - 1].to_vec());
    add("trailing", [&raw[..], &[0]].concat());
    add("header-only", raw[..12].to_vec());
    // A trained dictionary with its entropy tables damaged (id fixed up so only zstd can object).
    let mut damaged = trained.clone();
    for b in &mut damaged[20..60] {
        *b ^= 0xa5;
    }
    let id = (dwcp_core::digest::page_hash(&damaged[12..]) as u32).max(1);
    damaged[4..8].copy_from_slice(&id.to_le_bytes());
    add("trained-damaged-tables", damaged);
    seeds
}

fn handshake_seeds() -> Vec<(String, Vec<u8>)> {
    use dwcp_fuzz::handshake::SESSION;
    let mut seeds = Vec::new();
    let mut add = |name: &str, ctl: u8, wire: Vec<u8>| {
        seeds.push((name.to_string(), [&[ctl][..], &wire].concat()))
    };
    let frame = |ty, sid, seq, payload: &[u8]| {
        let mut v = Vec::new();
        encode_frame(ty, sid, seq, payload, &mut v);
        v
    };
    let hello = frame(FrameType::ClientHello, 0, 0, &client_hello(0, 0).encode());
    let join = frame(FrameType::ClientHello, 0, 0, &client_hello(77, 3).encode());
    let auth = frame(FrameType::ClientAuth, SESSION, 1, &[0x5a; 32]);
    add("server", 0, [&hello[..], &auth[..]].concat());
    add(
        "server-join",
        0,
        [
            &join[..],
            &frame(FrameType::ClientAuth, 77, 1, &[1; 32])[..],
        ]
        .concat(),
    );
    add("server-refused", 4, hello.clone());
    add(
        "server-short-auth",
        0,
        [
            &hello[..],
            &frame(FrameType::ClientAuth, SESSION, 1, &[1; 31])[..],
        ]
        .concat(),
    );
    add(
        "server-error",
        0,
        frame(
            FrameType::Error,
            0,
            0,
            &error_message(ErrorCode::Version, "no"),
        ),
    );
    let mut old = client_hello(0, 0);
    old.min_version = 7;
    old.max_version = 9;
    add(
        "server-version",
        0,
        frame(FrameType::ClientHello, 0, 0, &old.encode()),
    );
    // Built streams: records type ‖ len ‖ payload (type byte t is frame type t % 14 + 1).
    let record = |ty: FrameType, payload: &[u8]| {
        let t = (ty as u8 + 13) % 14;
        [&[t][..], &(payload.len() as u16).to_le_bytes(), payload].concat()
    };
    add(
        "server-built",
        2,
        [
            record(FrameType::ClientHello, &client_hello(0, 0).encode()),
            record(FrameType::ClientAuth, &[7; 32]),
        ]
        .concat(),
    );
    let sh = server_hello(SESSION).encode();
    add(
        "client",
        1,
        [
            frame(FrameType::ServerHello, SESSION, 0, &sh),
            frame(FrameType::AuthOk, SESSION, 1, &[]),
        ]
        .concat(),
    );
    add(
        "client-error",
        1,
        frame(
            FrameType::Error,
            0,
            0,
            &error_message(ErrorCode::Authentication, "bad key"),
        ),
    );
    add(
        "client-built",
        3,
        [
            record(FrameType::ServerHello, &sh),
            record(FrameType::AuthOk, &[]),
        ]
        .concat(),
    );
    add(
        "client-zero-session",
        1,
        frame(FrameType::ServerHello, 0, 0, &server_hello(1).encode()[..]),
    );
    seeds
}

fn qemu_wire_seeds() -> Vec<(String, Vec<u8>)> {
    use dwcp_qemu::segment;
    use dwcp_qemu::wire::{Encoding, Message, TunnelInit, TunnelReady};
    let record = |m: &Message<'_>| {
        let t = match m.frame_type() {
            FrameType::Close => 8,
            ty => ty as u8 - 32,
        };
        let p = m.encode();
        [&[t][..], &(p.len() as u16).to_le_bytes(), &p].concat()
    };
    let data = |channel, seq, raw: &[u8], codec| {
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        let encoding = segment::encode(codec, raw, &mut out, &mut scratch);
        let body = if encoding == Encoding::Raw {
            raw.to_vec()
        } else {
            out
        };
        let m = Message::Data {
            channel,
            seq,
            encoding,
            raw_len: raw.len() as u32,
            body: &body,
        };
        record(&m)
    };
    let text: Vec<u8> = b"QEMU migration stream "
        .iter()
        .copied()
        .cycle()
        .take(5000)
        .collect();
    let mut seeds = Vec::new();
    let mut add = |name: &str, ctl: u8, records: Vec<Vec<u8>>| {
        seeds.push((name.to_string(), [vec![ctl], records.concat()].concat()))
    };
    add(
        "destination-channel",
        6,
        vec![
            record(&Message::Open { channel: 0 }),
            data(0, 1, &text[..3000], Codec::Lz4),
            data(0, 0, &noise(3, 2000), Codec::None),
            data(0, 2, &[0; 4096], Codec::Lz4),
            data(0, 3, &text, Codec::Zstd(1)),
            record(&Message::End {
                channel: 0,
                segments: 4,
                bytes: 3000 + 2000 + 4096 + 5000,
            }),
            record(&Message::Ack {
                channel: 0,
                delivered: 0,
            }),
            record(&Message::Keepalive),
            record(&Message::Reset {
                channel: 0,
                reason: "qemu went away".into(),
            }),
            data(0, 4, &text[..10], Codec::None),
            record(&Message::Close),
        ],
    );
    add(
        "destination-two-channels",
        2,
        vec![
            data(1, 0, &text[..100], Codec::None),
            record(&Message::Open { channel: 1 }),
            record(&Message::Open { channel: 2 }),
            data(2, 0, &text[..200], Codec::Lz4),
            record(&Message::End {
                channel: 2,
                segments: 1,
                bytes: 200,
            }),
            record(&Message::Open { channel: 3 }),
        ],
    );
    add(
        "source-acks",
        1,
        vec![
            record(&Message::Ack {
                channel: 0,
                delivered: 10,
            }),
            record(&Message::Open { channel: 0 }),
        ],
    );
    add(
        "setup-messages",
        0,
        vec![
            record(&Message::Init(TunnelInit {
                version: 1,
                streams: 4,
                window: 1 << 20,
            })),
            record(&Message::Ready(TunnelReady { window: 1 << 20 })),
        ],
    );
    let mut bad = data(0, 0, &text[..3000], Codec::Zstd(3));
    let n = bad.len();
    bad[n - 6..].fill(0x5a);
    add("zstd-garbage", 0, vec![bad]);
    add(
        "error-frame",
        0,
        vec![[&[9u8, 6, 0][..], &[1, 0], b"oops"].concat()],
    );
    seeds
}

fn raft_rpc_seeds() -> Vec<(String, Vec<u8>)> {
    let frame = |p: &[u8]| [&(p.len() as u32).to_be_bytes()[..], p].concat();
    // postcard: Hello { magic: [u8; 4], version: u16, from: u64, to: u64, nonce: [u8; 32] }.
    let hello = |magic: &[u8; 4], from: u8, to: u8| {
        frame(&[&magic[..], &[1, from, to], &noise(4, 32)].concat())
    };
    let proof = frame(&[0x11; 32]);
    let mut seeds = Vec::new();
    let mut add = |name: &str, mode: u8, bytes: Vec<u8>| {
        seeds.push((name.to_string(), [vec![mode], bytes].concat()))
    };
    add("server", 0, [hello(b"DACP", 2, 1), proof.clone()].concat());
    add("server-unknown-peer", 0, hello(b"DACP", 9, 1));
    add("server-wrong-node", 0, hello(b"DACP", 2, 5));
    add("server-bad-magic", 0, hello(b"DWCP", 2, 1));
    add("server-oversize", 0, (1u32 << 20).to_be_bytes().to_vec());
    add("server-truncated", 0, hello(b"DACP", 2, 1)[..20].to_vec());
    // ServerHello::Challenge { nonce, mac } is variant 0; Refused(String) variant 1.
    let challenge = frame(&[&[0][..], &noise(5, 64)].concat());
    add("client", 1, [challenge.clone(), frame(&[0])].concat());
    add(
        "client-refused",
        1,
        frame(&[&[1, 7][..], b"go away"].concat()),
    );
    add("client-garbage", 1, frame(&[9, 9, 9]));
    // Envelope { id: u64 (varint), body: enum (variant varint, fields) }.
    add(
        "requests",
        2,
        [
            frame(&[1, 0]),
            frame(&[0xff, 0x01, 0]),
            frame(&[2, 2, 1, 2, 3, 4, 5]),
            frame(&[3, 4, 0, 0, 0]),
        ]
        .concat(),
    );
    add(
        "request-write",
        2,
        frame(&[5, 4, 0, 5, b'v', b'm', b'-', b'1', 2, 0x90, 0x4e]),
    );
    add("request-oversize", 2, (64u32 << 20).to_be_bytes().to_vec());
    add(
        "responses",
        3,
        [
            frame(&[1, 0]),
            frame(&[&[2, 6, 8][..], b"starting"].concat()),
            frame(&[3, 4, 0, 0, 0]),
            frame(&[4, 5, 1, 0]),
        ]
        .concat(),
    );
    seeds
}

fn node_control_seeds() -> Vec<(String, Vec<u8>)> {
    use dwcp_node::fuzzing::signed_line;
    let bodies = [
        r#"{"op":"status"}"#,
        r#"{"op":"evacuate"}"#,
        r#"{"op":"migrate","vm":"vm-1","to":"auto"}"#,
        r#"{"op":"migrate","vm":"vm-1","to":{"node":3}}"#,
        r#"{"op":"create_vm","vm":"web-01","size":1073741824,"dirty_rate":1000000}"#,
        r#"{"op":"prepare","vm":"db","from":2,"fence":7,"size":4096,"dirty_rate":0}"#,
        r#"{"op":"reboot"}"#,
    ];
    let mut seeds = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        seeds.push((
            format!("signed-{i}"),
            [&[0u8][..], signed_line(body).as_bytes(), b"\n"].concat(),
        ));
        seeds.push((
            format!("body-{i}"),
            [&[1u8][..], body.as_bytes(), b"\n"].concat(),
        ));
    }
    let mut add = |name: &str, mode: u8, line: &str| {
        seeds.push((name.to_string(), [&[mode][..], line.as_bytes()].concat()))
    };
    add(
        "bad-mac",
        0,
        &format!(
            "{{\"mac\":\"{}\",\"request\":{{\"op\":\"status\"}}}}\n",
            "ab".repeat(32)
        ),
    );
    add(
        "odd-mac",
        0,
        "{\"mac\":\"abc\",\"request\":{\"op\":\"status\"}}\n",
    );
    add("not-utf8", 0, "\u{fffd}");
    add("challenge", 2, "{\"nonce\":\"000102\"}\n");
    add("answer-ok", 3, "{\"ok\":true,\"result\":{\"vms\":[1,2]}}\n");
    add(
        "answer-error",
        3,
        "{\"ok\":false,\"error\":\"no such vm\"}\n",
    );
    add("answer-bare", 3, "{\"ok\":true}");
    seeds
}
