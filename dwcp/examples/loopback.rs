//! The smallest complete use of the library: migrate a simulated guest to a destination on loopback.
//!
//! `cargo run --release -p dwcp --example loopback -- [SIZE_MIB] [idle|random|zero] [DIRTY_MIB_S] [lazy]`
//!
//! The destination's memory is allocated and faulted in before the migration starts (as a VMM
//! preallocates guest RAM) unless `lazy` is given, in which case first-touch faults land in the migration.

use dwcp::{Listener, Migration, MigrationConfig, ReceiverConfig};
use dwcp_core::handshake::Psk;
use dwcp_core::memory::GuestRam;
use dwcp_core::sim::{ContentMix, SimulatedGuest, SimulatedGuestConfig};

fn main() -> Result<(), dwcp::Error> {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(256);
    let mix = match args.get(2).map(String::as_str) {
        Some("random") => ContentMix::RANDOM,
        Some("zero") => ContentMix::ZERO,
        _ => ContentMix::IDLE_GUEST,
    };
    let dirty: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
    let lazy = args.get(4).is_some_and(|s| s == "lazy");

    let guest = SimulatedGuest::new(SimulatedGuestConfig {
        size_bytes: mib << 20,
        mix,
        seed: 1,
    })?;
    let psk = Psk::generate();
    // The destination VM exists before the migration starts: its RAM is allocated up front.
    let layout = guest.ram().layout().clone();
    let memory = if lazy {
        GuestRam::anonymous(layout)?
    } else {
        GuestRam::anonymous_preallocated(layout)?
    };
    let listener = Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        psk.clone(),
        ReceiverConfig::default(),
    )?;
    let addr = listener.local_addr()?;
    let destination = std::thread::spawn(move || {
        let incoming = listener.accept()?;
        incoming.receive_into(&memory)
    });
    guest.start_workload(dirty << 20, 2);
    let report = Migration::new(addr, psk)
        .config(MigrationConfig::default())
        .run(&*guest, &mut guest.dirty_log(), &mut guest.control())?;
    destination.join().expect("destination thread")?;
    println!(
        "{} MiB in {:.1} ms ({:.2} GB/s), downtime {:.1} ms (digest {:.1} ms), {} passes, stop: {}, wire {} bytes, digest match {}",
        mib,
        report.total_ms,
        report.logical_throughput_bps / 1e9,
        report.downtime_ms,
        report.digest_ms,
        report.iterations,
        report.stop_reason,
        report.wire_bytes,
        report.digest_match
    );
    for p in &report.passes {
        println!(
            "  pass {}: {} pages, {} wire bytes, {:.1} ms, dirtied {}, predicted downtime {:.1} ms",
            p.iteration,
            p.pages,
            p.wire_bytes,
            p.duration_ms,
            p.dirtied_pages,
            p.predicted_downtime_ms
        );
    }
    Ok(())
}
