//! Post-copy fault service latency on loopback: the whole memory moves by post-copy while the
//! destination's vCPUs touch random pages from the first moment, so most touches fault while the
//! background push fills the link. Prints one JSON object (`cargo xtask bench postcopy` runs it).
//!
//! For reference, in the same run: the round trip of a 4 KiB request/response over a plain
//! loopback TCP connection, the floor any fault service over the network has.
//!
//! `cargo run --release -p dwcp-postcopy --example postcopy_latency -- [--size-mib 1024]
//! [--vcpus 2] [--plaintext]`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use dwcp_core::handshake::Psk;
use dwcp_core::memory::{MemorySink, MemorySource, PAGE_SIZE, VmControl};
use dwcp_core::sim::{ContentMix, SimulatedGuest, SimulatedGuestConfig};
use dwcp_postcopy::{PageSet, PostcopyConfig, PostcopyListener, PostcopyMemory, send};
use dwcp_tls::Security;
use rand::{Rng, SeedableRng};

#[derive(Parser)]
struct Args {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Destination vCPUs touching memory.
    #[arg(long, default_value_t = 2)]
    vcpus: u64,
    /// Plain text instead of TLS.
    #[arg(long)]
    plaintext: bool,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// 4 KiB request/response round trips over loopback TCP, microseconds (p50, p99).
fn tcp_round_trip() -> (f64, f64) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let (mut req, page) = ([0u8; 8], vec![7u8; PAGE_SIZE]);
        while s.read_exact(&mut req).is_ok() {
            if s.write_all(&page).is_err() {
                break;
            }
        }
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    let mut page = vec![0u8; PAGE_SIZE];
    let mut us = Vec::with_capacity(2000);
    for i in 0..2000u64 {
        let t = Instant::now();
        c.write_all(&i.to_le_bytes()).unwrap();
        c.read_exact(&mut page).unwrap();
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(c);
    server.join().unwrap();
    us.sort_by(f64::total_cmp);
    (percentile(&us, 0.5), percentile(&us, 0.99))
}

fn main() {
    let args = Args::parse();
    let (rtt_p50, rtt_p99) = tcp_round_trip();
    let guest = SimulatedGuest::new(SimulatedGuestConfig {
        size_bytes: args.size_mib << 20,
        mix: ContentMix {
            text: 0.3,
            random: 0.4,
        },
        seed: 1,
    })
    .expect("guest memory");
    guest.control().pause().unwrap();
    let psk = Psk::new(vec![9u8; 32]).unwrap();
    let security = if args.plaintext {
        Security::insecure_plaintext(psk)
    } else {
        Security::psk(psk)
    };
    let dst = Arc::new(PostcopyMemory::new(guest.layout().clone()).expect("destination memory"));
    let set = PageSet::full(guest.layout().total_pages());
    let config = PostcopyConfig::default();
    let listener = PostcopyListener::bind(
        "127.0.0.1:0".parse().unwrap(),
        security.clone(),
        config.clone(),
    )
    .expect("listener");
    let addr = listener.local_addr().unwrap();
    let done = AtomicBool::new(false);
    let touches = AtomicU64::new(0);
    let started = Instant::now();
    let (dest, source) = std::thread::scope(|s| {
        let source = s.spawn(|| send(addr, &security, &*guest, set.clone(), &config));
        let receiver = listener
            .accept(Arc::clone(&dst), Duration::from_secs(30))
            .expect("post-copy start");
        for vcpu in 0..args.vcpus {
            let (dst, done, touches) = (&dst, &done, &touches);
            s.spawn(move || {
                let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(vcpu);
                let mut buf = vec![0u8; PAGE_SIZE];
                let pages = dst.layout().total_pages();
                while !done.load(Ordering::Relaxed) {
                    dst.read_page(rng.random_range(0..pages), &mut buf);
                    std::hint::black_box(&buf);
                    touches.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let dest = receiver.wait().expect("post-copy");
        done.store(true, Ordering::Relaxed);
        (dest, source.join().unwrap().expect("post-copy source"))
    });
    let elapsed = started.elapsed();
    // Bit-exact check of the whole memory.
    let (mut a, mut b) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    let mut differing = 0u64;
    for page in 0..guest.layout().total_pages() {
        guest.read_page(page, &mut a);
        dst.read_page(page, &mut b);
        differing += u64::from(a != b);
    }
    let bytes = guest.layout().total_bytes() as f64;
    let out = serde_json::json!({
        "size_mib": args.size_mib,
        "vcpus": args.vcpus,
        "security": security.mode().name(),
        "seconds": elapsed.as_secs_f64(),
        "throughput_mb_s": bytes / elapsed.as_secs_f64() / 1e6,
        "guest_touches": touches.load(Ordering::Relaxed),
        "faults": dest.faults,
        "duplicates": dest.duplicates,
        "fault_p50_us": dest.fault_latency.p50_us,
        "fault_p99_us": dest.fault_latency.p99_us,
        "fault_max_us": dest.fault_latency.max_us,
        "served_by_source": source.served,
        "pushed_by_source": source.pushed,
        "tcp_4k_rtt_p50_us": rtt_p50,
        "tcp_4k_rtt_p99_us": rtt_p99,
        "pages_differing": differing,
    });
    println!("{out}");
    if differing != 0 {
        std::process::exit(1);
    }
}
