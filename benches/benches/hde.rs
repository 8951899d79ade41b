//! HDE, the page encoder (issue 3), on three corpora (see `dwcp_benches::corpus`): an idle guest, a
//! busy mix and second-iteration pages. For each corpus, on the same bytes and in the same run:
//!
//! * the session encoder (`SessionEncoder`, 2 threads, chunks of 256 pages in batches of 16, page
//!   hashes recorded as in a migration) under several codec policies, and its parallel decoder
//!   (`ChunkDecoder::decode_batch`, 2 threads, pages resolved but not written);
//! * the `zstd -1 -T2`, `zstd -3 -T2` and `lz4 -1` command-line tools on a file of the same bytes in
//!   /dev/shm (compression to a file in /dev/shm, decompression to /dev/null).
//!
//! It prints a table (median of several runs, logical guest bytes per second) and the targets,
//! writes the table to `target/criterion/hde-table.md`, then runs the Criterion benchmarks of the
//! main policies. `--quick` shrinks the corpora and the repetitions.
//!
//! A benchmark file: one group per corpus and codec, with the CLI references run beside them in the
//! same group.

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use dwcp_benches::{CpuOf, MIB, corpus, cpu_time};
use dwcp_core::GuestRam;
use dwcp_core::digest::PageHashes;
use dwcp_core::memory::{MemorySource, PAGE_SIZE};
use dwcp_core::pool::BufferPool;
use dwcp_hde::{
    ChunkDecoder, Codec, CodecPolicy, Dictionary, EncodeStats, Pass, SessionConfig, SessionEncoder,
};

const PAGES_PER_CHUNK: usize = 256;
const CHUNKS_PER_BATCH: usize = 16;
const POOL_BUDGET: usize = 64 << 20;
const THREADS: usize = 2;
/// Link speeds the adaptive policy is measured for.
const GBIT: u64 = 125_000_000;

/// One corpus: the memory to encode and, for second-iteration pages, the previous version.
struct Corpus {
    name: &'static str,
    ram: GuestRam,
    base: Option<GuestRam>,
    file: PathBuf,
    dictionary: OnceLock<(Arc<Dictionary>, f64)>,
}

impl Corpus {
    /// The dictionary trained from 1,024 sampled pages (64 KiB), and the training time in seconds;
    /// trained once, shared by encoder and decoder as after sending it.
    fn dictionary(&self) -> Arc<Dictionary> {
        self.dictionary
            .get_or_init(|| {
                let start = Instant::now();
                let d = Dictionary::train_from_memory(&self.ram, 1024, 64 * 1024)
                    .expect("training a dictionary");
                (Arc::new(d), start.elapsed().as_secs_f64())
            })
            .0
            .clone()
    }

    fn bytes(&self) -> u64 {
        self.ram.layout().total_bytes()
    }
    fn pages(&self) -> u64 {
        self.ram.layout().total_pages()
    }
}

/// A policy of the session encoder, as measured.
#[derive(Clone)]
struct Setup {
    name: &'static str,
    codec: CodecPolicy,
    bandwidth: u64,
    dictionary: bool,
}

fn setups() -> Vec<Setup> {
    let fixed = |name, codec| Setup {
        name,
        codec: CodecPolicy::Fixed(codec),
        bandwidth: 0,
        dictionary: false,
    };
    let adaptive = |name, bandwidth| Setup {
        name,
        codec: CodecPolicy::Adaptive {
            fallback: Codec::Lz4,
        },
        bandwidth,
        dictionary: false,
    };
    vec![
        fixed("hde lz4", Codec::Lz4),
        fixed("hde zstd-1", Codec::Zstd(1)),
        fixed("hde zstd-3", Codec::Zstd(3)),
        Setup {
            dictionary: true,
            ..fixed("hde zstd-3+dict", Codec::Zstd(3))
        },
        adaptive("hde adaptive 10 Gbit/s", 10 * GBIT),
        adaptive("hde adaptive 1 Gbit/s", GBIT),
        adaptive("hde adaptive 100 Mbit/s", GBIT / 10),
    ]
}

/// What one encoding of a corpus produced.
struct Encoded {
    payloads: Vec<Vec<u8>>,
    secs: f64,
    cpu_secs: f64,
    stats: EncodeStats,
}

fn chunk_lists(pages: u64) -> Vec<Vec<u64>> {
    let all: Vec<u64> = (0..pages).collect();
    all.chunks(PAGES_PER_CHUNK).map(<[u64]>::to_vec).collect()
}

/// The long-lived state of the engine around the encoder: its buffer pool (warm after the first
/// batches) and the page-hash table.
struct Engine {
    pool: BufferPool,
    hashes: PageHashes,
}

impl Engine {
    fn new(pages: u64) -> Self {
        Self {
            pool: BufferPool::new(POOL_BUDGET).expect("buffer pool"),
            hashes: PageHashes::new(pages),
        }
    }
}

fn encode_pass(
    encoder: &mut SessionEncoder,
    engine: &Engine,
    source: &dyn MemorySource,
    chunks: &[Vec<u64>],
    keep: bool,
) -> Vec<Vec<u8>> {
    let (pool, hashes) = (&engine.pool, &engine.hashes);
    encoder.begin_pass(Pass::All).expect("begin_pass");
    let mut out = Vec::new();
    for batch in chunks.chunks(CHUNKS_PER_BATCH) {
        let lists: Vec<&[u64]> = batch.iter().map(Vec::as_slice).collect();
        let bufs = encoder
            .encode_batch(1, &lists, source, pool, Some(hashes))
            .expect("encoding a batch");
        for b in bufs {
            if keep {
                out.push(b.to_vec());
            } else {
                black_box(b.len());
            }
        }
    }
    encoder.end_pass();
    out
}

/// A session ready to encode the corpus as the measured pass: for second-iteration pages, the base was
/// sent (and acknowledged) in an earlier pass, so the delta cache holds it.
fn session(setup: &Setup, corpus: &Corpus, engine: &Engine, chunks: &[Vec<u64>]) -> SessionEncoder {
    let config = SessionConfig {
        codec: setup.codec,
        threads: THREADS,
        // Only the base of second-iteration pages is cached in its (earlier, untimed) first pass; the
        // measured first passes run with the default, as in a migration.
        cache_first_pass: corpus.base.is_some(),
        ..SessionConfig::default()
    };
    let mut encoder = SessionEncoder::new(config, corpus.pages()).expect("session encoder");
    encoder.set_bandwidth_hint(setup.bandwidth);
    if setup.dictionary {
        encoder.set_dictionary(Some(corpus.dictionary()));
    }
    if let Some(base) = &corpus.base {
        encode_pass(&mut encoder, engine, base, chunks, false);
    }
    encoder
}

/// Encodes the corpus as one pass of a fresh session (set up outside the measured time). With `keep`,
/// the chunks are copied out (and the time includes that copy: use it for the output, not the time).
fn hde_encode(
    setup: &Setup,
    corpus: &Corpus,
    engine: &Engine,
    chunks: &[Vec<u64>],
    keep: bool,
) -> Encoded {
    let mut encoder = session(setup, corpus, engine, chunks);
    let before = encoder.stats();
    let cpu = cpu_time(CpuOf::ThisProcess);
    let start = Instant::now();
    let payloads = encode_pass(&mut encoder, engine, &corpus.ram, chunks, keep);
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = (cpu_time(CpuOf::ThisProcess) - cpu).as_secs_f64();
    let after = encoder.stats();
    let stats = EncodeStats {
        zero_pages: after.zero_pages - before.zero_pages,
        literal_pages: after.literal_pages - before.literal_pages,
        dup_pages: after.dup_pages - before.dup_pages,
        delta_pages: after.delta_pages - before.delta_pages,
        delta_bytes: after.delta_bytes - before.delta_bytes,
        encoded_bytes: after.encoded_bytes - before.encoded_bytes,
        ..after
    };
    Encoded {
        payloads,
        secs,
        cpu_secs,
        stats,
    }
}

fn decoder(setup: &Setup, corpus: &Corpus) -> ChunkDecoder {
    let mut decoder = ChunkDecoder::new(THREADS).expect("decoder");
    if setup.dictionary {
        decoder.set_dictionary(Some(corpus.dictionary()));
    }
    decoder
}

/// Decodes every chunk on the decoder's pool: (wall secs, CPU secs).
fn hde_decode(
    decoder: &ChunkDecoder,
    corpus: &Corpus,
    payloads: &[Vec<u8>],
    receiver: &GuestRam,
) -> (f64, f64) {
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    let cpu = cpu_time(CpuOf::ThisProcess);
    let start = Instant::now();
    let results = decoder.decode_batch(&refs, corpus.pages(), receiver, |_, chunk| {
        black_box(&chunk.pages);
        chunk.pages.len()
    });
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = (cpu_time(CpuOf::ThisProcess) - cpu).as_secs_f64();
    let pages: usize = results.into_iter().map(|r| r.expect("decoding")).sum();
    assert_eq!(pages as u64, corpus.pages());
    (secs, cpu_secs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One line of the table.
struct Line {
    corpus: &'static str,
    encoder: String,
    logical: u64,
    wire: u64,
    encode_secs: f64,
    decode_secs: f64,
    encode_cpu: f64,
    decode_cpu: f64,
    note: String,
}

impl Line {
    fn ratio(&self) -> f64 {
        self.wire as f64 / self.logical as f64
    }
    fn encode_gbs(&self) -> f64 {
        self.logical as f64 / self.encode_secs / 1e9
    }
    fn decode_gbs(&self) -> f64 {
        self.logical as f64 / self.decode_secs / 1e9
    }
    /// GB/s per CPU-second: what one dedicated core would do.
    fn encode_core(&self) -> f64 {
        self.logical as f64 / self.encode_cpu / 1e9
    }
    fn decode_core(&self) -> f64 {
        self.logical as f64 / self.decode_cpu / 1e9
    }
}

/// Runs `cmd`: (wall secs, CPU secs of the child).
fn run_timed(cmd: &mut Command) -> (f64, f64) {
    let cpu = cpu_time(CpuOf::Children);
    let start = Instant::now();
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
    let secs = start.elapsed().as_secs_f64();
    (secs, (cpu_time(CpuOf::Children) - cpu).as_secs_f64())
}

/// Medians of (wall, CPU) pairs.
fn medians(v: Vec<(f64, f64)>) -> (f64, f64) {
    (
        median(v.iter().map(|p| p.0).collect()),
        median(v.iter().map(|p| p.1).collect()),
    )
}

/// `zstd`/`lz4` on the corpus file: (compressed bytes, compression (wall, CPU) secs, decompression
/// (wall, CPU) secs).
fn cli(
    corpus: &Corpus,
    tool: &str,
    level: &str,
    threads: bool,
    reps: usize,
) -> (u64, (f64, f64), (f64, f64)) {
    let out = corpus.file.with_extension(format!("{tool}{level}"));
    let mut enc = Vec::new();
    let mut dec = Vec::new();
    for _ in 0..reps {
        let mut c = Command::new(tool);
        c.arg(level).arg("-q").arg("-f");
        if threads {
            c.arg("-T2");
        }
        if tool == "zstd" {
            c.arg(&corpus.file).arg("-o").arg(&out);
        } else {
            c.arg(&corpus.file).arg(&out);
        }
        enc.push(run_timed(&mut c));
        let mut d = Command::new(tool);
        d.args(["-d", "-q", "-f"]);
        if tool == "zstd" {
            d.arg(&out).arg("-o").arg("/dev/null");
        } else {
            d.arg(&out).arg("/dev/null");
        }
        dec.push(run_timed(&mut d));
    }
    let size = std::fs::metadata(&out).expect("compressed file").len();
    let _ = std::fs::remove_file(&out);
    (size, medians(enc), medians(dec))
}

fn measure(corpora: &[Corpus], reps: usize) -> (Vec<Line>, Vec<String>) {
    let mut lines = Vec::new();
    let mut extra = Vec::new();
    for corpus in corpora {
        let chunks = chunk_lists(corpus.pages());
        let logical = corpus.bytes();
        for (tool, level, threads) in [
            ("zstd", "-1", true),
            ("zstd", "-3", true),
            ("lz4", "-1", false),
        ] {
            let (size, e, d) = cli(corpus, tool, level, threads, reps);
            lines.push(Line {
                corpus: corpus.name,
                encoder: format!("{tool} {level}{}", if threads { " -T2" } else { "" }),
                logical,
                wire: size,
                encode_secs: e.0,
                decode_secs: d.0,
                encode_cpu: e.1,
                decode_cpu: d.1,
                note: String::new(),
            });
        }
        // The receiver: it holds the base versions for second-iteration pages, nothing otherwise.
        let empty;
        let receiver = match &corpus.base {
            Some(base) => base,
            None => {
                empty = GuestRam::anonymous(corpus.ram.layout().clone()).expect("receiver memory");
                &empty
            }
        };
        let engine = Engine::new(corpus.pages());
        for setup in setups() {
            let kept = hde_encode(&setup, corpus, &engine, &chunks, true);
            let enc: Vec<(f64, f64)> = (0..reps)
                .map(|_| {
                    let e = hde_encode(&setup, corpus, &engine, &chunks, false);
                    (e.secs, e.cpu_secs)
                })
                .collect();
            let decoder = decoder(&setup, corpus);
            let dec: Vec<(f64, f64)> = (0..reps)
                .map(|_| hde_decode(&decoder, corpus, &kept.payloads, receiver))
                .collect();
            let (enc, dec) = (medians(enc), medians(dec));
            let wire: u64 = kept.payloads.iter().map(|p| p.len() as u64).sum();
            let s = kept.stats;
            lines.push(Line {
                corpus: corpus.name,
                encoder: setup.name.to_string(),
                logical,
                wire,
                encode_secs: enc.0,
                decode_secs: dec.0,
                encode_cpu: enc.1,
                decode_cpu: dec.1,
                note: format!(
                    "zero {} / literal {} / dup {} / delta {}",
                    s.zero_pages, s.literal_pages, s.dup_pages, s.delta_pages
                ),
            });
            if corpus.base.is_some() && setup.name == "hde zstd-1" {
                extra.push(format!(
                    "second: {} DELTA pages; their deltas before compression (QEMU XBZRLE's encoding): {:.0} bytes per page",
                    s.delta_pages,
                    s.delta_bytes as f64 / s.delta_pages.max(1) as f64
                ));
            }
        }
        if let Some((d, secs)) = corpus.dictionary.get() {
            extra.push(format!(
                "{}: dictionary of {} bytes trained from 1,024 sampled pages in {:.0} ms",
                corpus.name,
                d.content().len(),
                secs * 1e3
            ));
        }
        if corpus.base.is_some() {
            // The same pages as literals: a session without the base (first pass), fixed zstd-1.
            let literal_setup = Setup {
                name: "hde zstd-1 literals",
                codec: CodecPolicy::Fixed(Codec::Zstd(1)),
                bandwidth: 0,
                dictionary: false,
            };
            let no_base = Corpus {
                name: corpus.name,
                ram: GuestRam::anonymous(corpus.ram.layout().clone()).expect("memory"),
                base: None,
                file: corpus.file.clone(),
                dictionary: OnceLock::new(),
            };
            let mut page = vec![0u8; PAGE_SIZE];
            for p in 0..corpus.pages() {
                MemorySource::read_page(&corpus.ram, p, &mut page);
                dwcp_core::memory::MemorySink::write_page(&no_base.ram, p, &page);
            }
            let e = hde_encode(&literal_setup, &no_base, &engine, &chunks, true);
            let timed = hde_encode(&literal_setup, &no_base, &engine, &chunks, false);
            let decoded = hde_decode(
                &decoder(&literal_setup, &no_base),
                &no_base,
                &e.payloads,
                &no_base.ram,
            );
            let wire: u64 = e.payloads.iter().map(|p| p.len() as u64).sum();
            lines.push(Line {
                corpus: corpus.name,
                encoder: "hde zstd-1, as literals (no base)".into(),
                logical,
                wire,
                encode_secs: timed.secs,
                decode_secs: decoded.0,
                encode_cpu: timed.cpu_secs,
                decode_cpu: decoded.1,
                note: format!("literal {}", e.stats.literal_pages),
            });
        }
    }
    (lines, extra)
}

fn table(lines: &[Line]) -> String {
    let mut t = String::new();
    writeln!(
        t,
        "| corpus | encoder | wire/logical | encode GB/s | decode GB/s | decode/encode | encode GB/s per CPU-s | decode GB/s per CPU-s | pages |"
    )
    .unwrap();
    writeln!(t, "|---|---|---:|---:|---:|---:|---:|---:|---|").unwrap();
    for l in lines {
        writeln!(
            t,
            "| {} | {} | {:.4} | {:.2} | {:.2} | {:.1}x | {:.2} | {:.2} | {} |",
            l.corpus,
            l.encoder,
            l.ratio(),
            l.encode_gbs(),
            l.decode_gbs(),
            l.decode_gbs() / l.encode_gbs(),
            l.encode_core(),
            l.decode_core(),
            l.note
        )
        .unwrap();
    }
    t
}

fn find<'a>(lines: &'a [Line], corpus: &str, encoder: &str) -> Option<&'a Line> {
    lines
        .iter()
        .find(|l| l.corpus == corpus && l.encoder == encoder)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "MISSED" }
}

fn targets(lines: &[Line]) -> String {
    let mut t = String::new();
    let hde: Vec<&Line> = lines
        .iter()
        .filter(|l| l.encoder.starts_with("hde") && !l.encoder.contains("literals"))
        .collect();
    // (a)
    for l in hde.iter().filter(|l| l.corpus == "idle") {
        writeln!(
            t,
            "(a) idle, {}: {:.2} GB/s encode (target >= 4): {}",
            l.encoder,
            l.encode_gbs(),
            verdict(l.encode_gbs() >= 4.0)
        )
        .unwrap();
    }
    // (b)
    let (z1, z3) = (
        find(lines, "busy", "zstd -1 -T2"),
        find(lines, "busy", "zstd -3 -T2"),
    );
    for l in hde.iter().filter(|l| l.corpus == "busy") {
        let (Some(z1), Some(z3)) = (z1, z3) else {
            break;
        };
        let fast = l.encode_gbs() >= z1.encode_gbs();
        let small = l.wire <= z3.wire;
        writeln!(
            t,
            "(b) busy, {}: encode {:.2} vs zstd -1 -T2 {:.2} GB/s; ratio {:.4} vs zstd -3 {:.4}: {}",
            l.encoder,
            l.encode_gbs(),
            z1.encode_gbs(),
            l.ratio(),
            z3.ratio(),
            verdict(fast && small)
        )
        .unwrap();
    }
    // (c)
    let literal = find(lines, "second", "hde zstd-1, as literals (no base)");
    let cli_literal = find(lines, "second", "zstd -1 -T2");
    for l in hde.iter().filter(|l| l.corpus == "second") {
        let (Some(literal), Some(cli_literal)) = (literal, cli_literal) else {
            break;
        };
        let factor = literal.wire as f64 / l.wire as f64;
        writeln!(
            t,
            "(c) second, {}: {:.0} bytes/page vs {:.0} as zstd-1 literals (hde) and {:.0} (zstd -1 CLI): {:.2}x smaller (target >= 5): {}",
            l.encoder,
            l.wire as f64 * PAGE_SIZE as f64 / l.logical as f64,
            literal.wire as f64 * PAGE_SIZE as f64 / l.logical as f64,
            cli_literal.wire as f64 * PAGE_SIZE as f64 / l.logical as f64,
            factor,
            verdict(factor >= 5.0)
        )
        .unwrap();
    }
    // decode >= 2x encode
    for l in &hde {
        let r = l.decode_gbs() / l.encode_gbs();
        writeln!(
            t,
            "(d) {}, {}: decode {:.2} / encode {:.2} GB/s = {:.1}x (target >= 2): {}",
            l.corpus,
            l.encoder,
            l.decode_gbs(),
            l.encode_gbs(),
            r,
            verdict(r >= 2.0)
        )
        .unwrap();
    }
    t
}

/// Criterion measurements of the main policies (encode and decode per corpus).
fn criterion_suite(c: &mut Criterion, corpora: &[Corpus]) {
    let main: Vec<Setup> = setups()
        .into_iter()
        .filter(|s| matches!(s.name, "hde lz4" | "hde zstd-3" | "hde adaptive 1 Gbit/s"))
        .collect();
    for corpus in corpora {
        let chunks = chunk_lists(corpus.pages());
        let empty = GuestRam::anonymous(corpus.ram.layout().clone()).expect("memory");
        let receiver = corpus.base.as_ref().unwrap_or(&empty);
        let engine = Engine::new(corpus.pages());
        for setup in &main {
            let id = format!("{}/{}", corpus.name, setup.name.trim_start_matches("hde "));
            let mut group = c.benchmark_group("hde/encode");
            group.throughput(Throughput::Bytes(corpus.bytes()));
            group.sampling_mode(SamplingMode::Flat);
            group.bench_function(BenchmarkId::from_parameter(&id), |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            Duration::from_secs_f64(
                                hde_encode(setup, corpus, &engine, &chunks, false).secs,
                            )
                        })
                        .sum()
                })
            });
            group.finish();
            let payloads = hde_encode(setup, corpus, &engine, &chunks, true).payloads;
            let decoder = decoder(setup, corpus);
            let mut group = c.benchmark_group("hde/decode");
            group.throughput(Throughput::Bytes(corpus.bytes()));
            group.sampling_mode(SamplingMode::Flat);
            group.bench_function(BenchmarkId::from_parameter(&id), |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            Duration::from_secs_f64(
                                hde_decode(&decoder, corpus, &payloads, receiver).0,
                            )
                        })
                        .sum()
                })
            });
            group.finish();
        }
    }
}

fn corpora(quick: bool, dir: &Path) -> Vec<Corpus> {
    let big = if quick { 64 * MIB } else { 256 * MIB };
    let small = if quick { 16 * MIB } else { 64 * MIB };
    let (base, changed) = corpus::second_iteration(small);
    let list = vec![
        Corpus {
            name: "idle",
            ram: corpus::idle(big),
            base: None,
            file: dir.join("idle.bin"),
            dictionary: OnceLock::new(),
        },
        Corpus {
            name: "busy",
            ram: corpus::busy(big),
            base: None,
            file: dir.join("busy.bin"),
            dictionary: OnceLock::new(),
        },
        Corpus {
            name: "second",
            ram: changed,
            base: Some(base),
            file: dir.join("second.bin"),
            dictionary: OnceLock::new(),
        },
    ];
    // DWCP_HDE_CORPORA=idle,busy (for profiling one corpus); all three by default.
    let only = std::env::var("DWCP_HDE_CORPORA").ok();
    let list: Vec<Corpus> = list
        .into_iter()
        .filter(|c| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|n| n == c.name))
        })
        .collect();
    for c in &list {
        corpus::write_file(&c.ram, &c.file).expect("writing the corpus file");
    }
    list
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let only_table = std::env::args().any(|a| a == "--table-only");
    let dir = PathBuf::from(format!("/dev/shm/dwcp-hde-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the corpus directory");
    let corpora = corpora(quick, &dir);
    let reps = if quick { 1 } else { 3 };
    let (lines, extra) = measure(&corpora, reps);
    let sizes: Vec<String> = corpora
        .iter()
        .map(|c| format!("{} {} MiB", c.name, c.bytes() / MIB))
        .collect();
    let mut report = format!(
        "HDE on {}, {THREADS} threads, median of {reps} runs; logical bytes per second\n\n",
        sizes.join(", ")
    );
    report += &table(&lines);
    report += "\n";
    for e in &extra {
        report += e;
        report += "\n";
    }
    report += &targets(&lines);
    eprintln!("\n{report}");
    // `cargo xtask bench hde` names the file (it knows the target directory).
    let table = std::env::var_os("DWCP_HDE_TABLE").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion/hde-table.md"),
        PathBuf::from,
    );
    if let Some(dir) = table.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&table, &report) {
        eprintln!("writing {}: {e}", table.display());
    }
    if !only_table {
        let mut c = dwcp_benches::criterion_config().configure_from_args();
        criterion_suite(&mut c, &corpora);
        c.final_summary();
        eprintln!("\n{report}");
    }
    if std::env::var_os("DWCP_HDE_KEEP_CORPORA").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
