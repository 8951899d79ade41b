//! Goodput of dwcp's RDMA streams on the local device: N connections through a
//! `DatacenterAcceptor` (RDMA required, no TCP fallback), each written with fixed-size messages by
//! one thread and read by another, timed from the first write until the last byte was read.
//!
//! Prints one line, `DWCP-RDMA-BENCH {json}`, which `cargo xtask bench rdma` reads and sets next to
//! `ib_write_bw` with the same message size. Run it the same way on real hardware:
//! `dwcp-rdma-bench --message-bytes 1048576 --total-bytes 4294967296 --connections 4`.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use dwcp_core::transport::{Acceptor, Connector};
use dwcp_rdma::{DatacenterAcceptor, DatacenterConnector, RdmaConfig};

struct Args {
    message: usize,
    total: u64,
    connections: usize,
    device: Option<String>,
    ring_slots: u32,
    spin: Duration,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        message: 1 << 20,
        total: 256 << 20,
        connections: 1,
        device: None,
        ring_slots: RdmaConfig::default().ring_slots,
        spin: RdmaConfig::default().poll_spin,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--message-bytes" => {
                a.message = value()?.parse().map_err(|e| format!("{flag}: {e}"))?
            }
            "--total-bytes" => a.total = value()?.parse().map_err(|e| format!("{flag}: {e}"))?,
            "--connections" => {
                a.connections = value()?.parse().map_err(|e| format!("{flag}: {e}"))?
            }
            "--device" => a.device = Some(value()?),
            "--poll-spin-us" => {
                a.spin =
                    Duration::from_micros(value()?.parse().map_err(|e| format!("{flag}: {e}"))?)
            }
            "--ring-slots" => {
                a.ring_slots = value()?.parse().map_err(|e| format!("{flag}: {e}"))?
            }
            "--help" | "-h" => {
                return Err(
                    "usage: dwcp-rdma-bench [--message-bytes N] [--total-bytes N] \
                            [--connections N] [--device NAME] [--ring-slots N] [--poll-spin-us N]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.message == 0 || a.connections == 0 || !(1..=64).contains(&a.connections) {
        return Err("--message-bytes must be positive and --connections in 1..=64".into());
    }
    Ok(a)
}

fn run(a: &Args) -> Result<(), String> {
    let config = RdmaConfig {
        device: a.device.clone(),
        fallback_to_tcp: false,
        setup_timeout: Duration::from_secs(60),
        ring_slots: a.ring_slots,
        poll_spin: a.spin,
        queue_depth: RdmaConfig::default().queue_depth.max(2 * a.ring_slots + 2),
        buffer_budget: (a.connections + 1)
            * 2
            * a.ring_slots as usize
            * dwcp_core::pool::SizeClass::Large.capacity(),
        ..Default::default()
    };
    let acceptor = DatacenterAcceptor::bind("127.0.0.1:0".parse().unwrap(), config.clone())
        .map_err(|e| e.to_string())?;
    let connector =
        DatacenterConnector::new(acceptor.local_addr().map_err(|e| e.to_string())?, config)
            .map_err(|e| e.to_string())?;
    let mut pairs = Vec::new();
    for _ in 0..a.connections {
        let w = connector
            .connect(Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
        let r = acceptor
            .accept_timeout(Duration::from_secs(60))
            .map_err(|e| e.to_string())?
            .ok_or("the acceptor got no connection")?;
        if w.transport() != "rdma" || r.transport() != "rdma" {
            return Err("a connection is not RDMA".into());
        }
        pairs.push((w, r));
    }
    let per_conn = a.total / a.connections as u64;
    let message = a.message;
    let start = Instant::now();
    let mut threads = Vec::new();
    for (mut w, mut r) in pairs {
        threads.push(std::thread::spawn(move || -> Result<u64, String> {
            let buf = vec![0xa5u8; message];
            let mut left = per_conn;
            while left > 0 {
                let n = (left as usize).min(message);
                w.write_all(&buf[..n]).map_err(|e| format!("write: {e}"))?;
                left -= n as u64;
            }
            w.flush().map_err(|e| format!("flush: {e}"))?;
            Ok(0)
        }));
        threads.push(std::thread::spawn(move || -> Result<u64, String> {
            let mut buf = vec![0u8; message];
            let mut got = 0u64;
            while got < per_conn {
                let n = r.read(&mut buf).map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    return Err(format!("stream ended after {got} of {per_conn} bytes"));
                }
                got += n as u64;
            }
            Ok(got)
        }));
    }
    let mut received = 0;
    for t in threads {
        received += t.join().map_err(|_| "a benchmark thread panicked")??;
    }
    let secs = start.elapsed().as_secs_f64();
    let mib_per_s = received as f64 / secs / f64::from(1 << 20);
    println!(
        "DWCP-RDMA-BENCH {{\"transport\":\"rdma\",\"device\":\"{}\",\"connections\":{},\"ring_slots\":{},\"poll_spin_us\":{},\"message_bytes\":{},\"bytes\":{received},\"seconds\":{secs:.3},\"mib_per_s\":{mib_per_s:.2},\"memcpy_mib_per_s\":{:.0}}}",
        connector.rdma_status().unwrap_or("?"),
        a.connections,
        a.ring_slots,
        a.spin.as_micros(),
        a.message,
        memcpy_speed(a.message),
    );
    Ok(())
}

/// How fast this CPU copies `message`-byte buffers (MiB/s): the transport copies every byte twice
/// (into a registered staging buffer, out of the receive ring), so this bounds what it can reach.
fn memcpy_speed(message: usize) -> f64 {
    let src = vec![1u8; message];
    let mut dst = vec![0u8; message];
    let rounds = (64 << 20) / message.max(1) + 1;
    let start = Instant::now();
    for _ in 0..rounds {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    (rounds * message) as f64 / start.elapsed().as_secs_f64() / f64::from(1 << 20)
}

fn main() -> ExitCode {
    match parse().and_then(|a| run(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dwcp-rdma-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
