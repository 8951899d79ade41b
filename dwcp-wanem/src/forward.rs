//! The I/O shell around the [`model`](crate::model): four threads move packets between two TUN
//! devices. Per direction, a reader blocks on its TUN device, stamps each packet with the monotonic
//! clock and offers it to that direction's [`Direction`] under a mutex; a writer sleeps on a condition
//! variable until the model's next event, takes every packet that is due and writes it to the other TUN
//! device. Timing is decided by the model in virtual time, so a writer that wakes up late delivers the
//! packets late but never changes the rate or loss pattern.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};
use tun_rs::{InterruptEvent, SyncDevice};

use crate::config::MAX_PACKET;
use crate::model::{Direction, DirectionConfig, DirectionStats, Nanos};

/// Packets written per lock acquisition at most.
const WRITE_BATCH: usize = 64;

/// Which IPv4 packets may cross: both source and destination inside this subnet. Anything else (IPv6,
/// other addresses) is dropped and counted, so the link never carries traffic for other hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
}

impl Subnet {
    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix.min(32)))
        };
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }

    /// Whether an IP packet may cross.
    pub fn admits(&self, packet: &[u8]) -> bool {
        if packet.len() < 20 || packet[0] >> 4 != 4 {
            return false;
        }
        let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
        let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        self.contains(src) && self.contains(dst)
    }
}

/// Counters of the whole link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Source → destination.
    pub forward: DirectionStats,
    /// Destination → source.
    pub reverse: DirectionStats,
    /// Packets refused by the subnet filter (both directions).
    pub foreign_dropped: u64,
    /// Packets the kernel refused when written (both directions).
    pub write_errors: u64,
}

struct Shared {
    dir: Mutex<Direction<Vec<u8>>>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Direction<Vec<u8>>> {
        // A panicking thread fails the forwarder anyway; the model stays consistent.
        self.dir.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Common {
    start: Instant,
    stop: AtomicBool,
    interrupt: InterruptEvent,
    foreign: AtomicU64,
    write_errors: AtomicU64,
    failure: Mutex<Option<String>>,
}

impl Common {
    fn now(&self) -> Nanos {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX / 2)
    }

    fn fail(&self, what: String) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(what);
        }
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A running forwarder between two TUN devices. Dropping it stops the threads.
pub struct Forwarder {
    common: Arc<Common>,
    dirs: [Arc<Shared>; 2],
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// Starts forwarding: packets read from `a` go through `forward` and are written to `b`; packets
    /// read from `b` go through `reverse` and are written to `a`.
    pub fn start(
        a: SyncDevice,
        b: SyncDevice,
        forward: DirectionConfig,
        reverse: DirectionConfig,
        filter: Subnet,
    ) -> Result<Self> {
        for d in [&a, &b] {
            d.set_nonblocking(true)
                .context("setting a TUN device non-blocking")?;
        }
        let a = Arc::new(a);
        let b = Arc::new(b);
        let common = Arc::new(Common {
            start: Instant::now(),
            stop: AtomicBool::new(false),
            interrupt: InterruptEvent::new().context("creating the interrupt event")?,
            foreign: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            failure: Mutex::new(None),
        });
        let dirs = [forward, reverse].map(|c| {
            Arc::new(Shared {
                dir: Mutex::new(Direction::new(c)),
                wake: Condvar::new(),
            })
        });
        let mut me = Self {
            common,
            dirs,
            threads: Vec::new(),
        };
        let plan = [
            ("fwd", a.clone(), b.clone(), me.dirs[0].clone()),
            ("rev", b, a, me.dirs[1].clone()),
        ];
        for (name, input, output, shared) in plan {
            let (c, s) = (me.common.clone(), shared.clone());
            me.threads.push(
                std::thread::Builder::new()
                    .name(format!("wanem-{name}-rx"))
                    .spawn(move || reader(&c, &input, &s, filter))
                    .context("spawning a reader")?,
            );
            let c = me.common.clone();
            me.threads.push(
                std::thread::Builder::new()
                    .name(format!("wanem-{name}-tx"))
                    .spawn(move || writer(&c, &output, &shared))
                    .context("spawning a writer")?,
            );
        }
        Ok(me)
    }

    /// The counters so far.
    pub fn stats(&self) -> LinkStats {
        LinkStats {
            forward: self.dirs[0].lock().stats(),
            reverse: self.dirs[1].lock().stats(),
            foreign_dropped: self.common.foreign.load(Ordering::Relaxed),
            write_errors: self.common.write_errors.load(Ordering::Relaxed),
        }
    }

    /// Changes both directions' rate from now on (bits per second of IP packets, 0: unlimited), with
    /// the token bucket depth that [`LinkParams::burst_bytes`](crate::config::LinkParams::burst_bytes)
    /// gives that rate. Packets already released keep their times; queued ones leave at the new rate.
    pub fn set_rate(&self, rate_bps: u64) {
        let rate = rate_bps / 8;
        let burst = crate::config::burst_bytes_of(rate_bps);
        for d in &self.dirs {
            let now = self.common.now();
            d.lock().set_rate(now, rate, burst);
            d.wake.notify_all();
        }
    }

    /// Why a thread stopped, if one did.
    pub fn failure(&self) -> Option<String> {
        self.common
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops the threads and waits for them (at most about a second).
    pub fn stop(&mut self) {
        self.common.stop.store(true, Ordering::SeqCst);
        let _ = self.common.interrupt.trigger();
        for d in &self.dirs {
            let _guard = d.lock();
            d.wake.notify_all();
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for t in self.threads.drain(..) {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop();
    }
}

fn reader(common: &Common, input: &SyncDevice, shared: &Shared, filter: Subnet) {
    let mut buf = vec![0u8; MAX_PACKET + 1];
    while !common.stop.load(Ordering::Relaxed) {
        let n = match input.recv_intr(&mut buf, &common.interrupt) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                if !common.stop.load(Ordering::Relaxed) {
                    common.fail(format!("reading a TUN device: {e}"));
                }
                return;
            }
        };
        let packet = &buf[..n];
        if n == 0 || n > MAX_PACKET || !filter.admits(packet) {
            common.foreign.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let packet = packet.to_vec();
        let now = common.now();
        let mut dir = shared.lock();
        dir.offer(now, n as u64, packet);
        drop(dir);
        shared.wake.notify_one();
    }
}

/// Asks the kernel to wake this thread's timed sleeps with 1 µs of slack instead of the default 50 µs:
/// the writer's sleeps end at packet release times, and every bit of slack is added delay.
fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument (nanoseconds) and affects only the calling
    // thread; the unused trailing arguments are zero as prctl(2) asks.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong, 0, 0, 0) };
}

fn writer(common: &Common, output: &SyncDevice, shared: &Shared) {
    tighten_timer_slack();
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(WRITE_BATCH);
    loop {
        {
            let mut dir = shared.lock();
            loop {
                if common.stop.load(Ordering::Relaxed) {
                    return;
                }
                let now = common.now();
                while batch.len() < WRITE_BATCH {
                    match dir.poll(now) {
                        Some((p, _)) => batch.push(p),
                        None => break,
                    }
                }
                if !batch.is_empty() {
                    break;
                }
                dir = match dir.next_event() {
                    Some(t) => {
                        let wait = Duration::from_nanos(t.saturating_sub(now).max(1));
                        shared
                            .wake
                            .wait_timeout(dir, wait)
                            .map(|(g, _)| g)
                            .unwrap_or_else(|e| e.into_inner().0)
                    }
                    None => shared
                        .wake
                        .wait_timeout(dir, Duration::from_millis(200))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0),
                };
            }
        }
        for p in batch.drain(..) {
            if let Err(e) = write_packet(common, output, &p) {
                common.fail(format!("writing a TUN device: {e}"));
                return;
            }
        }
    }
}

fn write_packet(common: &Common, output: &SyncDevice, p: &[u8]) -> Result<()> {
    // The device is non-blocking; a TUN write does not block in practice, but be ready for it.
    for _ in 0..1000 {
        match output.send(p) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The kernel refused this packet (e.g. no buffer space): drop it, as a router would.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOBUFS) | Some(libc::ENOMEM)) => {
                common.write_errors.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Err(e) => return Err(anyhow!(e)),
        }
    }
    common.write_errors.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn subnet_filter() {
        let s = Subnet {
            addr: Ipv4Addr::new(10, 77, 0, 0),
            prefix: 24,
        };
        assert!(s.admits(&packet([10, 77, 0, 1], [10, 77, 0, 2])));
        assert!(!s.admits(&packet([10, 77, 0, 1], [10, 78, 0, 2])));
        assert!(!s.admits(&packet([8, 8, 8, 8], [10, 77, 0, 2])));
        let mut v6 = packet([10, 77, 0, 1], [10, 77, 0, 2]);
        v6[0] = 0x60;
        assert!(!s.admits(&v6));
        assert!(!s.admits(&[0x45; 10]));
    }
}
