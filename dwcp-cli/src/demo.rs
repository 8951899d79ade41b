//! `dwcp demo`: a simulated guest migrated to a destination in the same process, over loopback.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow};
use dwcp::{Listener, Migration, MigrationEvent, ReceiveReport, ReceiverConfig};
use dwcp_core::handshake::Psk;
use dwcp_core::memory::{GuestRam, MemorySink, MemorySource, PAGE_SIZE};
use dwcp_core::sim::{SimulatedGuest, SimulatedGuestConfig};
use dwcp_postcopy::{
    DestinationReport, PageSet, PostcopyConfig, PostcopyListener, PostcopyMemory, SourceReport,
};

use crate::args::DemoArgs;
use crate::events::{EventLog, observe};
use crate::output::{self, JsonReport};
use crate::progress::ProgressView;
use crate::rss::RssSampler;

/// Runs the demo and prints its report.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.vms > 1 || args.uplink.is_some() || args.destination_process {
        return crate::fleet::run(args);
    }
    let rss = RssSampler::start();
    let metrics = crate::metrics::serve_if_asked(args.output.metrics.as_deref())?;
    let dirty_bytes_per_sec = args
        .dirty_rate
        .checked_mul(1 << 20)
        .ok_or_else(|| anyhow!("--dirty-rate {} MiB/s is too large", args.dirty_rate))?;

    let guest = SimulatedGuest::new(SimulatedGuestConfig {
        size_bytes: args.size,
        mix: args.mix.content(),
        seed: args.seed,
    })
    .with_context(|| format!("creating a simulated guest of {}", output::bytes(args.size)))?;
    // The destination VM exists before the migration starts, its RAM allocated and faulted in as a VMM
    // preallocates guest RAM; first-touch faults (about 1.2 s per GiB on the reference machine) are
    // then not part of the migration.
    let dest = if args.postcopy {
        // Fresh anonymous memory that post-copy can arm with userfaultfd.
        DestMemory::Postcopy(Arc::new(PostcopyMemory::new(guest.layout().clone())?))
    } else if args.lazy_destination {
        DestMemory::Ram(GuestRam::anonymous(guest.layout().clone())?)
    } else {
        DestMemory::Ram(GuestRam::anonymous_preallocated(guest.layout().clone())?)
    };
    let security = if args.insecure_plaintext {
        dwcp::Security::insecure_plaintext(Psk::generate())
    } else {
        dwcp::Security::psk(Psk::generate())
    };
    let security_for_postcopy = security.clone();
    let listener = Listener::bind(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        security.clone(),
        ReceiverConfig::default(),
    )
    .context("binding the destination listener")?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, bytes = args.size, mix = args.mix.name(), dirty_rate_mib_s = args.dirty_rate, "demo starting");

    let progress = ProgressView::new(!args.output.json && !args.no_progress);
    let events = EventLog::open_if_asked(args.events.as_deref(), args.output.json)?;
    let on_event = |e: &MigrationEvent| observe(e, &progress, events.as_ref());
    let (sent, received) = std::thread::scope(|s| {
        let receiver = std::thread::Builder::new()
            .name("demo-destination".into())
            .spawn_scoped(s, || -> dwcp::Result<ReceiveReport> {
                listener.accept()?.receive_into(dest.sink())
            })
            .context("starting the destination thread")?;
        guest.start_workload(dirty_bytes_per_sec, args.seed);
        let mut migration = Migration::new(addr, security)
            .config(dwcp::MigrationConfig {
                postcopy: args.postcopy,
                ..args.migrate.config()
            })
            .on_event(&on_event);
        if let Some(m) = &metrics {
            migration = migration.metrics(m.clone());
        }
        crate::events::cancel_on_signals(&migration.cancel_handle())?;
        let sent = migration.run(&*guest, &mut guest.dirty_log(), &mut guest.control());
        if sent.is_err() && !receiver.is_finished() {
            // The source may have failed before it connected; wake a destination still waiting to accept.
            wake_listener(addr);
        }
        let received = receiver
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        anyhow::Ok((sent, received))
    })?;
    progress.finish();
    guest.stop();
    let peak_rss = rss.finish();

    let sent = match sent {
        Ok(r) => r,
        Err(e) => {
            if let Err(re) = &received {
                tracing::warn!(error = %re, "the destination failed too");
            }
            return Err(e).context(format!("migrating the simulated guest to {addr}"));
        }
    };
    let received = received.context("the destination failed after the source finished")?;
    let postcopy = match (&sent.postcopy, &dest) {
        (Some(left), DestMemory::Postcopy(memory)) => Some(
            run_postcopy(&guest, memory, &security_for_postcopy, &left.pages)
                .context("post-copy of the pages pre-copy left")?,
        ),
        _ => None,
    };
    let identical = identical(&guest, dest.sink());
    if sent.digest != received.digest || !identical {
        anyhow::bail!(
            "the destination memory differs from the source after a successful migration (source digest {}, \
             destination digest {}, byte-identical: {identical}); this is a bug in the migration engine",
            sent.digest,
            received.digest
        );
    }

    if args.output.json {
        let mut j = JsonReport::migration(&sent)?;
        j.set("peak_rss_anon_bytes", peak_rss);
        j.set("mix", args.mix.name());
        j.set("dirty_rate_mib_s", args.dirty_rate);
        j.set("byte_identical", identical);
        j.set("lazy_destination", args.lazy_destination);
        j.set_serialized("receiver", &received)?;
        if let Some((source, destination, start)) = &postcopy {
            j.set_serialized("postcopy_source", source)?;
            j.set_serialized("postcopy_destination", destination)?;
            j.set("postcopy_start_ms", start.as_secs_f64() * 1e3);
        }
        j.print()
    } else {
        let mut text = output::migration_text(&sent);
        text.push_str(&format!(
            "\ndemo: {} guest ({} memory), dirtying {} MiB/s; destination verified byte-identical\n",
            args.mix.name(),
            output::bytes(args.size),
            args.dirty_rate
        ));
        text.push_str(&format!(
            "destination: {} pages applied, {} stale copies dropped; peak anonymous RSS {}\n",
            received.pages_applied,
            received.stale_pages_dropped,
            output::bytes(peak_rss)
        ));
        if let Some((source, destination, start)) = &postcopy {
            text.push_str(&format!(
                "post-copy: the destination ran {:.1} ms after the commit; {} pages in {:.1} ms \
                 while it ran ({} faults served by the source, p50 {:.0} us, p99 {:.0} us; {} \
                 pushed; {} connection(s))\n",
                start.as_secs_f64() * 1e3,
                source.pages,
                destination.duration.as_secs_f64() * 1e3,
                destination.faults,
                destination.fault_latency.p50_us,
                destination.fault_latency.p99_us,
                source.pushed,
                destination.connections
            ));
        }
        output::emit(&text)
    }
}

/// Makes a blocked `accept` return (with a handshake error) by connecting and hanging up.
pub(crate) fn wake_listener(addr: SocketAddr) {
    let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
}

/// Whether the destination holds exactly the guest's memory (compared byte by byte, independently of
/// the engine's digest). Only meaningful once the guest no longer writes.
pub(crate) fn identical(guest: &SimulatedGuest, dest: &dyn MemorySink) -> bool {
    let mut a = vec![0u8; PAGE_SIZE];
    let mut b = vec![0u8; PAGE_SIZE];
    (0..guest.layout().total_pages()).all(|p| {
        guest.read_page(p, &mut a);
        dest.read_page(p, &mut b);
        a == b
    })
}

/// The destination's memory: ordinary, or armable by post-copy.
enum DestMemory {
    Ram(GuestRam),
    Postcopy(Arc<PostcopyMemory>),
}

impl DestMemory {
    fn sink(&self) -> &dyn MemorySink {
        match self {
            DestMemory::Ram(r) => r,
            DestMemory::Postcopy(m) => &**m,
        }
    }
}

/// Moves the pages pre-copy left by post-copy, in this process over loopback, while a thread
/// standing in for the destination's vCPU reads random pages (each touch of a missing page is a
/// fault the source serves).
fn run_postcopy(
    guest: &SimulatedGuest,
    memory: &Arc<PostcopyMemory>,
    security: &dwcp::Security,
    pages: &[u64],
) -> anyhow::Result<(SourceReport, DestinationReport, Duration)> {
    let started = std::time::Instant::now();
    let total = guest.layout().total_pages();
    let set = PageSet::from_pages(total, pages.iter().copied())
        .ok_or_else(|| anyhow!("the engine handed back a page outside the memory"))?;
    let config = PostcopyConfig::default();
    let listener = PostcopyListener::bind(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        security.clone(),
        config.clone(),
    )?;
    let addr = listener.local_addr()?;
    let running = AtomicBool::new(true);
    let touches = AtomicU64::new(0);
    std::thread::scope(|s| {
        let source = s.spawn(|| dwcp_postcopy::send(addr, security, guest, set, &config));
        let receiver = listener.accept(Arc::clone(memory), Duration::from_secs(30))?;
        let start_delay = started.elapsed();
        let vcpu = s.spawn(|| {
            let mut buf = vec![0u8; PAGE_SIZE];
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            while running.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                memory.read_page(x % total, &mut buf);
                std::hint::black_box(&buf);
                touches.fetch_add(1, Ordering::Relaxed);
            }
        });
        let destination = receiver.wait();
        running.store(false, Ordering::Relaxed);
        let _ = vcpu.join();
        let source = source
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        let destination = destination?;
        tracing::info!(
            touches = touches.load(Ordering::Relaxed),
            "destination vCPU stopped"
        );
        anyhow::Ok((source?, destination, start_delay))
    })
}
