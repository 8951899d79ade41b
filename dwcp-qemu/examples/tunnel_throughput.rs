//! Throughput of the QEMU tunnel on loopback, TLS 1.3 (PSK) against `insecure_plaintext`, in
//! alternating rounds (the order flips every round, so drift in the machine's load hits both alike).
//! Plain TCP peers stand in for the two QEMUs; the data is incompressible and the tunnel runs its
//! loopback defaults (one stream, raw segments), so the cipher's share is the largest it gets.
//!
//! ```text
//! cargo run --release -p dwcp-qemu --example tunnel_throughput -- [MIB=1024] [ROUNDS=3]
//! ```
//!
//! Per run: wall time from the first byte QEMU writes to the last one the destination QEMU reads,
//! and the CPU time of the whole process (both proxies and both stand-ins; the stand-ins' share is
//! the same in both modes) per GiB carried.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use dwcp_core::handshake::Psk;
use dwcp_qemu::{DestinationProxy, Security, SourceProxy, TunnelConfig};

/// User plus system CPU seconds of this process so far (from `/proc/self/stat`).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line (the first after the name is field 3), in
    // ticks of 1/100 s on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

fn random_block(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Carries `total` bytes through a fresh pair of proxies; returns (seconds, CPU seconds).
fn run(security: Security, block: &[u8], total: usize) -> (f64, f64) {
    let sink = TcpListener::bind("127.0.0.1:0").expect("binding the sink");
    let sink_addr = sink.local_addr().expect("the sink's address");
    let reader = std::thread::spawn(move || {
        let (mut s, _) = sink.accept().expect("accepting the tunnel's connection");
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0usize;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        (got, Instant::now())
    });
    let any: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    let cfg = TunnelConfig {
        accept_timeout: Duration::from_secs(60),
        ..TunnelConfig::default()
    };
    let dest = DestinationProxy::bind(any, sink_addr, security.clone(), cfg.clone())
        .expect("binding the destination proxy");
    let source = SourceProxy::bind(any, dest.local_addr().expect("address"), security, cfg)
        .expect("binding the source proxy");
    let addr = source.local_addr().expect("address");
    let d = std::thread::spawn(move || dest.run());
    let s = std::thread::spawn(move || source.run());
    // Let the tunnel come up first: its set-up is not what this measures.
    std::thread::sleep(Duration::from_millis(300));
    let mut qemu = TcpStream::connect(addr).expect("connecting to the source proxy");
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut sent = 0;
    while sent < total {
        let n = block.len().min(total - sent);
        qemu.write_all(&block[..n]).expect("writing to the tunnel");
        sent += n;
    }
    qemu.shutdown(Shutdown::Write).expect("closing");
    let (got, done) = reader.join().expect("the sink");
    let cpu = cpu_seconds() - cpu0;
    assert_eq!(got, total, "bytes lost");
    let mut rest = Vec::new();
    let _ = qemu.read_to_end(&mut rest);
    s.join().expect("source thread").expect("source proxy");
    d.join()
        .expect("destination thread")
        .expect("destination proxy");
    ((done - t0).as_secs_f64(), cpu)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let total = mib << 20;
    let block = random_block(8 << 20);
    let psk = Psk::generate();
    let modes = [
        ("tls-psk", Security::psk(psk.clone())),
        ("insecure-plaintext", Security::insecure_plaintext(psk)),
    ];
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); 2];
    println!("{mib} MiB per run, {rounds} rounds");
    for round in 0..rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for m in order {
            let (name, security) = &modes[m];
            let (secs, cpu) = run(security.clone(), &block, total);
            let rate = total as f64 / secs / 1e6;
            let cpu_per_gib = cpu / (total as f64 / f64::from(1u32 << 30));
            println!(
                "round {round} {name:>18}: {secs:6.2} s  {rate:7.0} MB/s  {cpu_per_gib:5.2} CPU s/GiB"
            );
            results[m].0.push(rate);
            results[m].1.push(cpu_per_gib);
        }
    }
    for (m, (rates, cpus)) in results.iter_mut().enumerate() {
        println!(
            "median {:>18}: {:7.0} MB/s  {:5.2} CPU s/GiB",
            modes[m].0,
            median(rates),
            median(cpus)
        );
    }
}
