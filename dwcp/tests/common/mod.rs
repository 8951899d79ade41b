//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use dwcp::{Listener, MigrationConfig, ReceiveReport, ReceiverConfig};
use dwcp_core::Error;
use dwcp_core::handshake::Psk;
use dwcp_core::memory::{GuestRam, MemorySource, PAGE_SIZE};
use dwcp_core::sim::{ContentMix, SimulatedGuest, SimulatedGuestConfig};

pub fn psk(b: u8) -> Psk {
    Psk::new(vec![b; 32]).unwrap()
}

pub fn guest(size: u64, mix: ContentMix, seed: u64) -> Arc<SimulatedGuest> {
    SimulatedGuest::new(SimulatedGuestConfig {
        size_bytes: size,
        mix,
        seed,
    })
    .unwrap()
}

pub fn receiver_config() -> ReceiverConfig {
    ReceiverConfig {
        io_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

pub fn source_config() -> MigrationConfig {
    MigrationConfig {
        io_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

/// A plain-text security for tests that speak DWCP frames themselves (the TLS layer beneath the
/// same frames is tested in dwcp-tls and in tests/security.rs).
pub fn plain(n: u8) -> dwcp::Security {
    dwcp::Security::insecure_plaintext(psk(n))
}

/// A plain-text listener on loopback keyed by `psk(1)`, and its address.
pub fn listener(config: ReceiverConfig) -> (Listener, SocketAddr) {
    let l = Listener::bind("127.0.0.1:0".parse().unwrap(), plain(1), config).unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// The next frame on a hand-driven stream: its type and payload.
pub fn read<R: std::io::Read>(
    r: &mut dwcp_core::frame::FrameReader<R>,
) -> (dwcp_core::frame::FrameType, Vec<u8>) {
    let mut p = Vec::new();
    let h = r.read_frame(&mut p).unwrap();
    (h.frame_type, p)
}

/// What a test receiver ends with: its result, and the memory it received into (if it got that far).
pub type Received = (Result<ReceiveReport, Error>, Option<GuestRam>);

/// Starts a destination on loopback that receives one migration into fresh memory.
pub fn spawn_receiver(key: Psk, config: ReceiverConfig) -> (SocketAddr, JoinHandle<Received>) {
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), key, config).unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, spawn_receiver_on(listener))
}

/// Receives one migration on `listener` into fresh memory, in a thread.
pub fn spawn_receiver_on(listener: Listener) -> JoinHandle<Received> {
    std::thread::spawn(move || {
        let incoming = match listener.accept() {
            Ok(i) => i,
            Err(e) => return (Err(e), None),
        };
        let ram = GuestRam::anonymous(incoming.layout().clone()).unwrap();
        let r = incoming.receive_into(&ram);
        (r, Some(ram))
    })
}

/// Asserts that two memories are byte-identical.
pub fn assert_same_memory(a: &dyn MemorySource, b: &GuestRam) {
    let mut x = vec![0u8; PAGE_SIZE];
    let mut y = vec![0u8; PAGE_SIZE];
    for p in 0..a.layout().total_pages() {
        a.read_page(p, &mut x);
        b.copy_out(p, &mut y);
        assert!(x == y, "page {p} differs");
    }
}

/// Whether the guest writes memory again within a few seconds (it is running, not paused). Polls
/// instead of sleeping a fixed time, so a loaded machine cannot make it flaky.
pub fn guest_keeps_running(g: &SimulatedGuest) -> bool {
    let before = g.pages_written();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if g.pages_written() > before {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// A TCP relay between a source and a destination on loopback that can break the connections it
/// carries on command, as a failing network path would. It keeps accepting, so a source can reconnect
/// through it.
pub struct CuttingProxy {
    addr: SocketAddr,
    pairs: Arc<std::sync::Mutex<Vec<(std::net::TcpStream, std::net::TcpStream)>>>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl CuttingProxy {
    /// Relays every connection made to [`addr`](Self::addr) to `target`.
    pub fn start(target: SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let pairs: Arc<std::sync::Mutex<Vec<_>>> = Arc::default();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, a, s) = (Arc::clone(&pairs), Arc::clone(&accepted), Arc::clone(&stop));
        std::thread::spawn(move || {
            // Bounded: the proxy lives at most as long as a test may take.
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                a.fetch_add(1, Ordering::AcqRel);
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
                p.lock().unwrap().push((client, server));
            }
        });
        Self {
            addr,
            pairs,
            accepted,
            stop,
        }
    }

    /// Where sources connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections relayed so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Breaks the `n` oldest connections still relayed (both directions, both ends).
    pub fn cut(&self, n: usize) -> usize {
        let mut pairs = self.pairs.lock().unwrap();
        let n = n.min(pairs.len());
        for (c, s) in pairs.drain(..n) {
            let _ = c.shutdown(std::net::Shutdown::Both);
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        n
    }

    /// Stops accepting connections (new ones are refused).
    pub fn stop_accepting(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Breaks every connection relayed now.
    pub fn cut_all(&self) -> usize {
        self.cut(usize::MAX)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.cut_all();
    }
}
