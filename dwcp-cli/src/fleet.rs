//! `dwcp demo --vms N [--uplink RATE]`: N simulated guests migrated at once, in one process,
//! through one connection pool and one buffer pool, optionally under one shared uplink cap.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use dwcp::{ConnectionPool, HostUplink, Listener, Migration, ReceiveReport, ReceiverConfig};
use dwcp_core::handshake::Psk;
use dwcp_core::memory::{GuestRam, MemorySource, PAGE_SIZE};
use dwcp_core::pool::BufferPool;
use dwcp_core::sim::{SimulatedGuest, SimulatedGuestConfig};
use dwcp_pba::alloc::jain_index;
use serde_json::json;

use crate::args::DemoArgs;
use crate::output;
use crate::rss::RssSampler;

/// The buffer pool all the migrations share: 64 MiB per migration as a single one has, at most
/// 512 MiB, at least the 64 MiB one migration needs.
fn shared_budget(vms: u32) -> usize {
    (u64::from(vms) * (64 << 20)).clamp(64 << 20, 512 << 20) as usize
}

/// The delta caches of all the migrations together hold what one migration's does by default
/// (previous versions of sent pages, for XBZRLE-style deltas); each gets its share, at least 2 MiB.
fn delta_cache_share(vms: u32) -> usize {
    (dwcp_hde::DEFAULT_DELTA_CACHE_BYTES / vms.max(1) as usize).max(2 << 20)
}

struct Outcome {
    index: usize,
    elapsed: Duration,
    result: dwcp::Result<dwcp::MigrationReport>,
}

/// Runs the fleet demo and prints its report.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let rss = RssSampler::start();
    let n = args.vms as usize;
    let dirty = args
        .dirty_rate
        .checked_mul(1 << 20)
        .ok_or_else(|| anyhow!("--dirty-rate {} MiB/s is too large", args.dirty_rate))?;
    let mut guests = Vec::with_capacity(n);
    let mut dests = Vec::with_capacity(n);
    for i in 0..n {
        let g = SimulatedGuest::new(SimulatedGuestConfig {
            size_bytes: args.size,
            mix: args.mix.content(),
            seed: args.seed + i as u64,
        })
        .with_context(|| format!("creating simulated guest {i}"))?;
        dests.push(
            GuestRam::anonymous_preallocated(g.layout().clone())
                .with_context(|| format!("allocating destination memory {i}"))?,
        );
        guests.push(g);
    }
    let guest_bytes = 2 * n as u64 * args.size;
    let psk = Psk::generate();
    let listener = Listener::bind(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        psk.clone(),
        ReceiverConfig::default(),
    )
    .context("binding the destination listener")?;
    let addr = listener.local_addr()?;
    let connections = ConnectionPool::new(Duration::from_secs(30));
    let buffers = BufferPool::new(shared_budget(args.vms)).context("creating the buffer pool")?;
    let uplink = args.uplink.map(HostUplink::new).transpose()?;
    let mut config = args.migrate.config();
    config.buffer_pool = Some(buffers.clone());
    config.delta_cache_bytes = config.delta_cache_bytes.min(delta_cache_share(args.vms));
    tracing::info!(%addr, vms = n, bytes = args.size, "fleet demo starting");

    let started = Instant::now();
    let (outcomes, received) = std::thread::scope(|s| -> anyhow::Result<_> {
        // The destination host: one listener, one receiving thread per incoming migration, each
        // into the next free destination memory.
        let dests = &dests;
        let listener = &listener;
        let receiver = s.spawn(move || {
            let mut done: Vec<(usize, dwcp::Result<ReceiveReport>)> = Vec::new();
            std::thread::scope(|r| {
                let mut handles = Vec::new();
                for (slot, dest) in dests.iter().enumerate() {
                    match listener.accept_source() {
                        Ok(incoming) => {
                            handles.push((slot, r.spawn(move || incoming.receive_into(dest))));
                        }
                        Err(e) => {
                            done.push((slot, Err(e)));
                            break;
                        }
                    }
                }
                for (slot, h) in handles {
                    let res = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                    done.push((slot, res));
                }
            });
            done
        });
        for g in &guests {
            g.start_workload(dirty, args.seed);
        }
        let mut senders = Vec::with_capacity(n);
        for (index, guest) in guests.iter().enumerate() {
            let migration = Migration::new(addr, psk.clone())
                .config(config.clone())
                .connection_pool(connections.clone());
            let share = uplink
                .as_ref()
                .map(|u| u.join(&migration, 1.0, None))
                .transpose()?;
            senders.push(s.spawn(move || {
                let t = Instant::now();
                let result = migration.run(&**guest, &mut guest.dirty_log(), &mut guest.control());
                drop(share);
                Outcome {
                    index,
                    elapsed: t.elapsed(),
                    result,
                }
            }));
        }
        let outcomes: Vec<Outcome> = senders
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect();
        if outcomes.iter().any(|o| o.result.is_err()) && !receiver.is_finished() {
            for _ in 0..n {
                crate::demo::wake_listener(addr);
            }
        }
        let received = receiver
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        Ok((outcomes, received))
    })?;
    let wall = started.elapsed();
    for g in &guests {
        g.stop();
    }
    let peak_rss = rss.finish();

    // Pair each source with the destination memory its session landed in.
    let mut by_session: HashMap<String, (usize, ReceiveReport)> = HashMap::new();
    let mut failures = Vec::new();
    for (slot, r) in received {
        match r {
            Ok(r) => {
                by_session.insert(r.session_id.clone(), (slot, r));
            }
            Err(e) => failures.push(format!("destination {slot}: {e}")),
        }
    }
    let mut rows = Vec::with_capacity(n);
    for o in &outcomes {
        let report = match &o.result {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("migration {}: {e}", o.index));
                continue;
            }
        };
        let Some((slot, recv)) = by_session.get(&report.session_id) else {
            failures.push(format!(
                "migration {}: no destination saw its session",
                o.index
            ));
            continue;
        };
        if recv.digest != report.digest || !identical(&guests[o.index], &dests[*slot]) {
            failures.push(format!(
                "migration {}: the destination memory differs from the source",
                o.index
            ));
        }
        rows.push((o.index, o.elapsed, report.clone()));
    }
    if !failures.is_empty() {
        bail!(
            "{} of {n} migrations failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    let rates: Vec<f64> = rows
        .iter()
        .map(|(_, t, _)| args.size as f64 / t.as_secs_f64())
        .collect();
    let jain = jain_index(&rates);
    let mut times: Vec<f64> = rows.iter().map(|(_, t, _)| t.as_secs_f64()).collect();
    times.sort_by(f64::total_cmp);
    let pct = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let downtimes: Vec<f64> = rows.iter().map(|(_, _, r)| r.downtime_ms).collect();
    let max_downtime = downtimes.iter().copied().fold(0.0, f64::max);
    let engine_rss = peak_rss.saturating_sub(guest_bytes);

    if args.output.json {
        let j = json!({
            "vms": n,
            "guest_bytes": args.size,
            "uplink_bytes_per_sec": args.uplink,
            "wall_ms": wall.as_secs_f64() * 1e3,
            "time_s": {"min": pct(0.0), "p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
            "jain_index": jain,
            "max_downtime_ms": max_downtime,
            "peak_rss_anon_bytes": peak_rss,
            "guest_memory_bytes": guest_bytes,
            "engine_rss_bytes": engine_rss,
            "buffer_pool_bytes": buffers.stats().budget_bytes,
            "migrations": rows.iter().map(|(i, t, r)| json!({
                "index": i, "time_s": t.as_secs_f64(), "downtime_ms": r.downtime_ms,
                "streams": r.streams, "digest": r.digest,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        Ok(())
    } else {
        let text = format!(
            "fleet demo: {n} guests of {} ({} memory, dirtying {} MiB/s each) migrated at once{}\n\
             all digests match and every destination is byte-identical\n\
             wall {:.2} s; per migration: min {:.2} s, p50 {:.2} s, p99 {:.2} s, max {:.2} s; \
             max downtime {max_downtime:.1} ms\n\
             Jain's fairness index of their throughputs: {jain:.3}\n\
             peak anonymous RSS {} (guest memory, both sides: {}; engine: {}); shared buffer pool {}\n",
            output::bytes(args.size),
            args.mix.name(),
            args.dirty_rate,
            args.uplink
                .map(|u| format!(", sharing an uplink of {}/s", output::bytes(u)))
                .unwrap_or_default(),
            wall.as_secs_f64(),
            pct(0.0),
            pct(0.5),
            pct(0.99),
            pct(1.0),
            output::bytes(peak_rss),
            output::bytes(guest_bytes),
            output::bytes(engine_rss),
            output::bytes(buffers.stats().budget_bytes),
        );
        output::emit(&text)
    }
}

fn identical(guest: &SimulatedGuest, dest: &GuestRam) -> bool {
    let mut a = vec![0u8; PAGE_SIZE];
    let mut b = vec![0u8; PAGE_SIZE];
    (0..guest.layout().total_pages()).all(|p| {
        guest.read_page(p, &mut a);
        dest.copy_out(p, &mut b);
        a == b
    })
}
