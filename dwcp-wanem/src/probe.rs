//! A UDP probe that measures a link's round-trip time and its loss in each direction.
//!
//! The client sends numbered datagrams; the server echoes each one and remembers which numbers it saw.
//! Two phases: a light one (e.g. 100 probes, 10 ms apart) gives the RTT from the echoes; a heavy one
//! (e.g. 200,000 probes at 40,000/s) gives the loss: forward loss from the server's count, reverse loss
//! from the echoes that came back out of those the server received. Every loop is bounded in count
//! and time.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 4] = b"DWPB";
const HEADER: usize = 24;
const KIND_DATA: u8 = 1;
const KIND_REPORT_REQ: u8 = 2;
const KIND_REPORT: u8 = 3;
const KIND_BYE: u8 = 4;
/// Sequence numbers of the loss phase start here (the RTT phase uses the ones below).
const LOSS_BASE: u64 = 1 << 22;
/// Highest sequence number the server tracks.
const MAX_SEQ: u64 = 1 << 23;
/// Largest probe count of the loss phase.
pub const MAX_COUNT: u64 = 2_000_000;

fn encode(kind: u8, a: u64, b: u64, size: usize) -> Vec<u8> {
    let mut p = vec![0u8; size.max(HEADER)];
    p[..4].copy_from_slice(MAGIC);
    p[4] = kind;
    p[8..16].copy_from_slice(&a.to_le_bytes());
    p[16..24].copy_from_slice(&b.to_le_bytes());
    p
}

fn decode(p: &[u8]) -> Option<(u8, u64, u64)> {
    if p.len() < HEADER || &p[..4] != MAGIC {
        return None;
    }
    let a = u64::from_le_bytes(p[8..16].try_into().ok()?);
    let b = u64::from_le_bytes(p[16..24].try_into().ok()?);
    Some((p[4], a, b))
}

fn big_buffers(sock: &UdpSocket) {
    let s = socket2::SockRef::from(sock);
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
}

/// The echo side.
#[derive(Debug)]
pub struct ProbeServer {
    sock: UdpSocket,
}

impl ProbeServer {
    /// Binds the server's socket (in the calling thread's network namespace).
    pub fn bind(addr: SocketAddr) -> Result<Self> {
        let sock = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
        big_buffers(&sock);
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Self { sock })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.sock.local_addr()?)
    }

    /// Echoes probes until a client says goodbye or `max_time` passes. Returns the number of probes seen.
    pub fn serve(&self, max_time: Duration) -> Result<u64> {
        let deadline = Instant::now() + max_time;
        let mut seen = vec![0u64; (MAX_SEQ / 64) as usize];
        let mut total = 0u64;
        let mut buf = vec![0u8; 65_536];
        while Instant::now() < deadline {
            let (n, from) = match self.sock.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("probe server: receiving"),
            };
            match decode(&buf[..n]) {
                Some((KIND_DATA, seq, _)) => {
                    if seq < MAX_SEQ {
                        let (w, bit) = ((seq / 64) as usize, seq % 64);
                        if seen[w] & (1 << bit) == 0 {
                            seen[w] |= 1 << bit;
                            total += 1;
                        }
                    }
                    let _ = self.sock.send_to(&buf[..n], from);
                }
                Some((KIND_REPORT_REQ, from_seq, to_seq)) => {
                    let count = (from_seq..to_seq.min(MAX_SEQ))
                        .filter(|&s| seen[(s / 64) as usize] & (1 << (s % 64)) != 0)
                        .count() as u64;
                    let _ = self
                        .sock
                        .send_to(&encode(KIND_REPORT, count, total, HEADER), from);
                }
                Some((KIND_BYE, _, _)) => return Ok(total),
                _ => {}
            }
        }
        Ok(total)
    }
}

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProbeOptions {
    /// Probes of the RTT phase.
    pub rtt_count: u64,
    /// Spacing of the RTT phase.
    pub rtt_interval: Duration,
    /// Probes of the loss phase (0: skip it).
    pub loss_count: u64,
    /// Probes per second of the loss phase.
    pub loss_pps: u64,
    /// Datagram payload size in bytes (at least 24).
    pub size: usize,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            rtt_count: 100,
            rtt_interval: Duration::from_millis(10),
            loss_count: 0,
            loss_pps: 20_000,
            size: 64,
        }
    }
}

/// What was measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// RTT probes sent.
    pub rtt_sent: u64,
    /// RTT probes echoed.
    pub rtt_echoed: u64,
    /// Smallest RTT, ms.
    pub rtt_min_ms: f64,
    /// Median RTT, ms.
    pub rtt_median_ms: f64,
    /// Mean RTT, ms.
    pub rtt_mean_ms: f64,
    /// 99th percentile RTT, ms.
    pub rtt_p99_ms: f64,
    /// Largest RTT, ms.
    pub rtt_max_ms: f64,
    /// Loss-phase probes sent.
    pub loss_sent: u64,
    /// Of those, received by the server.
    pub loss_received: u64,
    /// Of those, echoed back to the client.
    pub loss_echoed: u64,
    /// Forward (client → server) loss, 0..=1.
    pub forward_loss: f64,
    /// Reverse (server → client) loss, 0..=1.
    pub reverse_loss: f64,
    /// Achieved sending rate of the loss phase, probes per second.
    pub loss_pps: f64,
}

#[derive(Default)]
struct Echoes {
    rtts_ms: Vec<f64>,
    loss_echoed: u64,
    report: Option<(u64, u64)>,
}

/// Runs both phases against a [`ProbeServer`] at `server` (from the calling thread's namespace).
pub fn run(server: SocketAddr, opts: ProbeOptions) -> Result<ProbeReport> {
    if opts.loss_count > MAX_COUNT || opts.rtt_count > 100_000 {
        bail!("probe counts are limited to {MAX_COUNT} (loss) and 100000 (RTT)");
    }
    if opts.loss_count > 0 && !(1..=500_000).contains(&opts.loss_pps) {
        bail!("the loss phase runs at 1..=500000 probes per second");
    }
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sock = UdpSocket::bind(bind).context("binding the probe client")?;
    big_buffers(&sock);
    sock.connect(server)
        .with_context(|| format!("connecting UDP to {server}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let start = Instant::now();
    let now_ns = move || start.elapsed().as_nanos() as u64;
    let echoes = Arc::new(Mutex::new(Echoes::default()));
    let done = Arc::new(AtomicBool::new(false));
    let rx = {
        let sock = sock.try_clone()?;
        let echoes = echoes.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !done.load(Ordering::Relaxed) {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                let mut e = echoes.lock().unwrap_or_else(|p| p.into_inner());
                match decode(&buf[..n]) {
                    Some((KIND_DATA, seq, sent)) if seq < LOSS_BASE => {
                        e.rtts_ms.push(now_ns().saturating_sub(sent) as f64 / 1e6);
                    }
                    Some((KIND_DATA, _, _)) => e.loss_echoed += 1,
                    Some((KIND_REPORT, count, total)) => e.report = Some((count, total)),
                    _ => {}
                }
            }
        })
    };
    let send = |p: &[u8]| -> Result<()> {
        // A full socket buffer (ENOBUFS) or a refused echo (ECONNREFUSED) must not end the probe.
        match sock.send(p) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOBUFS) | Some(libc::ECONNREFUSED) | Some(libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e).context("sending a probe"),
        }
    };
    let result = (|| -> Result<ProbeReport> {
        // RTT phase.
        for i in 0..opts.rtt_count {
            send(&encode(KIND_DATA, i, now_ns(), opts.size))?;
            std::thread::sleep(opts.rtt_interval);
        }
        let wait_echoes = |want: u64, max: Duration| {
            let until = Instant::now() + max;
            while Instant::now() < until {
                let e = echoes.lock().unwrap_or_else(|p| p.into_inner());
                if e.rtts_ms.len() as u64 >= want {
                    break;
                }
                drop(e);
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        wait_echoes(opts.rtt_count, Duration::from_secs(3));
        let max_rtt = {
            let e = echoes.lock().unwrap_or_else(|p| p.into_inner());
            e.rtts_ms.iter().cloned().fold(0.0, f64::max)
        };
        // Loss phase: paced by the clock, in small bursts.
        let t0 = Instant::now();
        let mut sent = 0u64;
        while sent < opts.loss_count {
            let due = ((t0.elapsed().as_secs_f64() * opts.loss_pps as f64) as u64 + 1)
                .min(opts.loss_count);
            while sent < due {
                send(&encode(KIND_DATA, LOSS_BASE + sent, 0, opts.size))?;
                sent += 1;
            }
            std::thread::sleep(Duration::from_micros(500));
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("the loss phase did not finish within 120 s");
            }
        }
        let send_secs = t0.elapsed().as_secs_f64();
        let mut report = None;
        if opts.loss_count > 0 {
            // Let the stragglers arrive, then ask the server (the request itself may be lost).
            std::thread::sleep(Duration::from_secs_f64(0.5 + 2.0 * max_rtt / 1e3));
            for _ in 0..50 {
                send(&encode(
                    KIND_REPORT_REQ,
                    LOSS_BASE,
                    LOSS_BASE + opts.loss_count,
                    HEADER,
                ))?;
                std::thread::sleep(
                    Duration::from_millis(100).max(Duration::from_secs_f64(2.0 * max_rtt / 1e3)),
                );
                if let Some(r) = echoes.lock().unwrap_or_else(|p| p.into_inner()).report {
                    report = Some(r);
                    break;
                }
            }
            if report.is_none() {
                bail!("the probe server never answered the report request");
            }
        }
        let e = echoes.lock().unwrap_or_else(|p| p.into_inner());
        let mut rtts = e.rtts_ms.clone();
        rtts.sort_by(f64::total_cmp);
        let pct = |q: f64| -> f64 {
            if rtts.is_empty() {
                return f64::NAN;
            }
            rtts[((rtts.len() - 1) as f64 * q).round() as usize]
        };
        let received = report.map(|r| r.0).unwrap_or(0);
        let n = opts.loss_count;
        Ok(ProbeReport {
            rtt_sent: opts.rtt_count,
            rtt_echoed: rtts.len() as u64,
            rtt_min_ms: pct(0.0),
            rtt_median_ms: pct(0.5),
            rtt_mean_ms: if rtts.is_empty() {
                f64::NAN
            } else {
                rtts.iter().sum::<f64>() / rtts.len() as f64
            },
            rtt_p99_ms: pct(0.99),
            rtt_max_ms: pct(1.0),
            loss_sent: n,
            loss_received: received,
            loss_echoed: e.loss_echoed,
            forward_loss: if n == 0 {
                0.0
            } else {
                1.0 - received as f64 / n as f64
            },
            reverse_loss: if received == 0 {
                0.0
            } else {
                1.0 - (e.loss_echoed.min(received)) as f64 / received as f64
            },
            loss_pps: if send_secs > 0.0 {
                n as f64 / send_secs
            } else {
                0.0
            },
        })
    })();
    for _ in 0..3 {
        let _ = sock.send(&encode(KIND_BYE, 0, 0, HEADER));
    }
    done.store(true, Ordering::Relaxed);
    let _ = rx.join();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_probe_sees_no_loss() {
        let server = ProbeServer::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let t = std::thread::spawn(move || server.serve(Duration::from_secs(30)).unwrap());
        let r = run(
            addr,
            ProbeOptions {
                rtt_count: 20,
                rtt_interval: Duration::from_millis(1),
                // A modest rate: on a loaded two-core host a starved echo thread lets the socket
                // buffer overflow at 20,000 packets/s, which is the host, not the probe.
                loss_count: 1_000,
                loss_pps: 5_000,
                size: 64,
            },
        )
        .unwrap();
        assert_eq!(r.rtt_echoed, 20);
        assert!(r.rtt_median_ms < 50.0, "{r:?}");
        assert_eq!(r.loss_received, 1_000, "{r:?}");
        assert_eq!(r.forward_loss, 0.0);
        assert_eq!(t.join().unwrap(), 1_020);
    }

    #[test]
    fn codec() {
        let p = encode(KIND_DATA, 7, 9, 100);
        assert_eq!(p.len(), 100);
        assert_eq!(decode(&p), Some((KIND_DATA, 7, 9)));
        assert_eq!(decode(b"nope"), None);
    }
}
