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
