//! `dwcp demo --vms N [--uplink RATE] [--max-running K] [--destination-process]`: N simulated
//! guests migrated from this process, all at once or K at a time, through one connection pool and
//! one buffer pool, optionally under one shared uplink cap, to one destination listener (here, or in
//! a second process started with the hidden `fleet-receive` command so that each side's memory is
//! measured on its own).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use dwcp::{
    Admission, ConnectionPool, HostUplink, Listener, Migration, ReceiveReport, ReceiverConfig,
};
use dwcp_core::handshake::Psk;
use dwcp_core::memory::{GuestRam, MemorySource};
use dwcp_core::pool::BufferPool;
use dwcp_core::sim::{SimulatedGuest, SimulatedGuestConfig};
use dwcp_pba::alloc::jain_index;
use serde_json::json;

use crate::args::{DemoArgs, FleetReceiveArgs};
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
    /// From admission to the end of the migration.
    elapsed: Duration,
    /// Waiting for admission.
    waited: Duration,
    result: dwcp::Result<dwcp::MigrationReport>,
}

/// The longest a migration of the demo waits for its turn.
const ADMISSION_TIMEOUT: Duration = Duration::from_secs(3600);

/// The destination side of the fleet, in this process or in a child one.
enum Destination {
    /// One listener here, one preallocated memory per migration.
    InProcess {
        listener: Listener,
        dests: Vec<GuestRam>,
    },
    /// `dwcp fleet-receive` in a child process.
    Child(ChildReceiver),
}

/// What a destination received: per migration, its session id and digest (and, in this process,
/// the memory slot it landed in).
struct Arrival {
    slot: Option<usize>,
    session_id: String,
    digest: String,
}

/// Runs the fleet demo and prints its report.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let rss = RssSampler::start();
    let n = args.vms as usize;
    let dirty = args
        .dirty_rate
        .checked_mul(1 << 20)
        .ok_or_else(|| anyhow!("--dirty-rate {} MiB/s is too large", args.dirty_rate))?;
    let psk = Psk::generate();
    let mut guests = Vec::with_capacity(n);
    for i in 0..n {
        guests.push(
            SimulatedGuest::new(SimulatedGuestConfig {
                size_bytes: args.size,
                mix: args.mix.content(),
                seed: args.seed + i as u64,
            })
            .with_context(|| format!("creating simulated guest {i}"))?,
        );
    }
    let destination = if args.destination_process {
        Destination::Child(ChildReceiver::start(args.vms, &psk)?)
    } else {
        let mut dests = Vec::with_capacity(n);
        for g in &guests {
            dests.push(
                GuestRam::anonymous_preallocated(g.layout().clone())
                    .context("allocating destination memory")?,
            );
        }
        let listener = Listener::bind(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            psk.clone(),
            fleet_receiver(args.vms),
        )
        .context("binding the destination listener")?;
        Destination::InProcess { listener, dests }
    };
    // A key file holds the key's text: both sides use what the file holds.
    let psk = match &destination {
        Destination::Child(c) => crate::transfer::load_psk(&c.key_file)?,
        Destination::InProcess { .. } => psk,
    };
    let addr = match &destination {
        Destination::InProcess { listener, .. } => listener.local_addr()?,
        Destination::Child(c) => c.addr,
    };
    // The guest memory this process holds: the sources', and the destinations' when they are here.
    let guest_bytes = match &destination {
        Destination::InProcess { .. } => 2 * n as u64 * args.size,
        Destination::Child(_) => n as u64 * args.size,
    };
    let connections = ConnectionPool::new(Duration::from_secs(30));
    let buffers = BufferPool::new(shared_budget(args.vms)).context("creating the buffer pool")?;
    let uplink = args.uplink.map(HostUplink::new).transpose()?;
    let admission = args
        .max_running
        .map(|k| Admission::new(k as usize))
        .transpose()?;
    let mut config = args.migrate.config();
    config.buffer_pool = Some(buffers.clone());
    config.delta_cache_bytes = config.delta_cache_bytes.min(delta_cache_share(args.vms));
    tracing::info!(%addr, vms = n, bytes = args.size, "fleet demo starting");

    let started = Instant::now();
    let (outcomes, received) = std::thread::scope(|s| -> anyhow::Result<_> {
        // The destination host: one listener, one receiving thread per incoming migration.
        let destination = &destination;
        let receiver = s.spawn(move || match destination {
            Destination::InProcess { listener, dests } => {
                receive_all(listener, n, |slot, incoming| {
                    let dest = dests
                        .get(slot)
                        .ok_or_else(|| anyhow!("more migrations than guests"))?;
                    Ok(incoming.receive_into(dest)?)
                })
            }
            Destination::Child(c) => c.wait(),
        });
        for g in &guests {
            g.start_workload(dirty, args.seed);
        }
        let mut senders = Vec::with_capacity(n);
        for (index, guest) in guests.iter().enumerate() {
            let migration = Migration::new(addr, psk.clone())
                .config(config.clone())
                .connection_pool(connections.clone());
            let (uplink, admission) = (uplink.clone(), admission.clone());
            senders.push(s.spawn(move || {
                let queued = Instant::now();
                // A waiting migration holds no share of the uplink: it joins once admitted.
                let admitted = admission
                    .as_ref()
                    .map(|a| a.wait(0, ADMISSION_TIMEOUT))
                    .transpose()
                    .and_then(|ticket| {
                        let share = uplink
                            .as_ref()
                            .map(|u| u.join(&migration, 1.0, None))
                            .transpose()?;
                        // Dropped in this order: the share first, then the slot.
                        Ok((share, ticket))
                    });
                let t = Instant::now();
                let result = admitted.and_then(|held| {
                    let result =
                        migration.run(&**guest, &mut guest.dirty_log(), &mut guest.control());
                    drop(held);
                    result
                });
                Outcome {
                    index,
                    elapsed: t.elapsed(),
                    waited: t - queued,
                    result,
                }
            }));
        }
        let outcomes: Vec<Outcome> = senders
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect();
        if outcomes.iter().any(|o| o.result.is_err()) && !receiver.is_finished() {
            // The destination waits for migrations that will not come.
            match destination {
                Destination::InProcess { .. } => {
                    for _ in 0..n {
                        crate::demo::wake_listener(addr);
                    }
                }
                Destination::Child(c) => c.kill(),
            }
        }
        let received = receiver
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
            .unwrap_or_else(|e| (Vec::new(), vec![format!("destination: {e:#}")]));
        Ok((outcomes, received))
    })?;
    let wall = started.elapsed();
    for g in &guests {
        g.stop();
    }
    let peak_rss = rss.finish();

    let destination_rss = match &destination {
        Destination::Child(c) => Some(c.peak_rss()),
        Destination::InProcess { .. } => None,
    };
    // Pair each source with what its session delivered.
    let (received, mut failures) = received;
    let by_session: HashMap<&str, &Arrival> = received
        .iter()
        .map(|a| (a.session_id.as_str(), a))
        .collect();
    let mut rows = Vec::with_capacity(n);
    for o in &outcomes {
        let report = match &o.result {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("migration {}: {e}", o.index));
                continue;
            }
        };
        let Some(arrival) = by_session.get(report.session_id.as_str()) else {
            failures.push(format!(
                "migration {}: no destination saw its session",
                o.index
            ));
            continue;
        };
        let identical = match (&destination, arrival.slot) {
            (Destination::InProcess { dests, .. }, Some(slot)) => {
                crate::demo::identical(&guests[o.index], &dests[slot])
            }
            _ => true,
        };
        if arrival.digest != report.digest || !identical {
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
    let max_wait = outcomes
        .iter()
        .map(|o| o.waited.as_secs_f64())
        .fold(0.0, f64::max);
    let downtimes: Vec<f64> = rows.iter().map(|(_, _, r)| r.downtime_ms).collect();
    let max_downtime = downtimes.iter().copied().fold(0.0, f64::max);
    let engine_rss = peak_rss.saturating_sub(guest_bytes);

    if args.output.json {
        let j = json!({
            "vms": n,
            "guest_bytes": args.size,
            "uplink_bytes_per_sec": args.uplink,
            "max_running": args.max_running,
            "max_wait_s": max_wait,
            "wall_ms": wall.as_secs_f64() * 1e3,
            "time_s": {"min": pct(0.0), "p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
            "jain_index": jain,
            "max_downtime_ms": max_downtime,
            "peak_rss_anon_bytes": peak_rss,
            "guest_memory_bytes": guest_bytes,
            "engine_rss_bytes": engine_rss,
            "destination_process": destination_rss.map(|(rss, guest)| json!({
                "peak_rss_anon_bytes": rss, "guest_memory_bytes": guest,
                "engine_rss_bytes": rss.saturating_sub(guest),
            })),
            "buffer_pool_bytes": buffers.stats().budget_bytes,
            "migrations": rows.iter().map(|(i, t, r)| json!({
                "index": i, "time_s": t.as_secs_f64(), "downtime_ms": r.downtime_ms,
                "streams": r.streams, "digest": r.digest,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        Ok(())
    } else {
        let memory = match destination_rss {
            None => format!(
                "peak anonymous RSS {} (guest memory, both sides: {}; engine, both sides: {})",
                output::bytes(peak_rss),
                output::bytes(guest_bytes),
                output::bytes(engine_rss)
            ),
            Some((rss, guest)) => format!(
                "source process: peak anonymous RSS {} (guest memory {}; engine {}); \
                 destination process: {} (guest memory {}; engine {})",
                output::bytes(peak_rss),
                output::bytes(guest_bytes),
                output::bytes(engine_rss),
                output::bytes(rss),
                output::bytes(guest),
                output::bytes(rss.saturating_sub(guest))
            ),
        };
        let text = format!(
            "fleet demo: {n} guests of {} ({} memory, dirtying {} MiB/s each) migrated {}{}\n\
             all digests match{}\n\
             wall {:.2} s; per migration: min {:.2} s, p50 {:.2} s, p99 {:.2} s, max {:.2} s; \
             max downtime {max_downtime:.1} ms\n\
             Jain's fairness index of their throughputs: {jain:.3}\n\
             {memory}; shared buffer pool {}\n",
            output::bytes(args.size),
            args.mix.name(),
            args.dirty_rate,
            match args.max_running {
                Some(k) => format!("{k} at a time (the longest wait {max_wait:.2} s)"),
                None => "at once".to_string(),
            },
            args.uplink
                .map(|u| format!(", sharing an uplink of {}/s", output::bytes(u)))
                .unwrap_or_default(),
            if destination_rss.is_none() {
                " and every destination is byte-identical"
            } else {
                " (the destination process checked by digest)"
            },
            wall.as_secs_f64(),
            pct(0.0),
            pct(0.5),
            pct(0.99),
            pct(1.0),
            output::bytes(buffers.stats().budget_bytes),
        );
        output::emit(&text)
    }
}

/// A destination that expects `vms` migrations at once from one address (this host): the
/// per-address limits, meant for strangers, scale with them.
fn fleet_receiver(vms: u32) -> ReceiverConfig {
    let d = dwcp::ListenerLimits::default();
    let vms = vms as usize;
    // Every stream a source may open, and as many reconnects.
    let per_vm = 2 * dwcp::MigrationConfig::default().max_streams.max(1);
    ReceiverConfig {
        limits: dwcp::ListenerLimits {
            max_handshakes: d.max_handshakes.max(vms * per_vm),
            max_handshakes_per_peer: d.max_handshakes_per_peer.max(vms * per_vm),
            connection_rate_per_peer: d
                .connection_rate_per_peer
                .max(u32::try_from(vms * per_vm).unwrap_or(u32::MAX)),
            max_sessions: d.max_sessions.max(vms),
            max_sessions_per_peer: d.max_sessions_per_peer.max(vms),
        },
        ..ReceiverConfig::default()
    }
}

/// Receives `n` migrations on `listener` at once, each on its own thread through `receive`, and
/// returns what arrived and what failed.
fn receive_all<F>(
    listener: &Listener,
    n: usize,
    receive: F,
) -> anyhow::Result<(Vec<Arrival>, Vec<String>)>
where
    F: Fn(usize, dwcp::Incoming<'_>) -> anyhow::Result<ReceiveReport> + Sync,
{
    let mut arrivals = Vec::with_capacity(n);
    let mut failures = Vec::new();
    std::thread::scope(|r| {
        let receive = &receive;
        let mut handles = Vec::with_capacity(n);
        for slot in 0..n {
            match listener.accept_source() {
                Ok(incoming) => handles.push((slot, r.spawn(move || receive(slot, incoming)))),
                Err(e) => {
                    failures.push(format!("destination {slot}: {e}"));
                    break;
                }
            }
        }
        for (slot, h) in handles {
            match h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)) {
                Ok(r) => arrivals.push(Arrival {
                    slot: Some(slot),
                    session_id: r.session_id,
                    digest: r.digest,
                }),
                Err(e) => failures.push(format!("destination {slot}: {e:#}")),
            }
        }
    });
    Ok((arrivals, failures))
}

/// `dwcp fleet-receive`: the destination process of `dwcp demo --vms N --destination-process`.
/// Prints `listening ADDR`, receives the migrations into fresh memory, then prints one JSON line.
pub fn receive_process(args: FleetReceiveArgs) -> anyhow::Result<()> {
    let rss = RssSampler::start();
    let psk = crate::transfer::load_psk(&args.psk_file)?;
    let listener = Listener::bind(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        psk,
        fleet_receiver(args.sessions),
    )
    .context("binding the destination listener")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {}", listener.local_addr()?)?;
        out.flush()?;
    }
    let guest_bytes = AtomicU64::new(0);
    // Every destination memory is kept to the end, as the VMs would keep it.
    let received = Mutex::new(Vec::new());
    let (arrivals, failures) = receive_all(&listener, args.sessions as usize, |_, incoming| {
        let ram = GuestRam::anonymous_preallocated(incoming.layout().clone())
            .context("allocating destination memory")?;
        guest_bytes.fetch_add(incoming.layout().total_bytes(), Ordering::Relaxed);
        let report = incoming.receive_into(&ram)?;
        lock(&received).push(ram);
        Ok(report)
    })?;
    let j = json!({
        "peak_rss_anon_bytes": rss.finish(),
        "guest_memory_bytes": guest_bytes.load(Ordering::Relaxed),
        "arrivals": arrivals.iter().map(|a| json!({"session_id": a.session_id, "digest": a.digest})).collect::<Vec<_>>(),
        "failures": failures,
    });
    println!("{j}");
    Ok(())
}

/// The child process running `dwcp fleet-receive`.
struct ChildReceiver {
    addr: SocketAddr,
    child: Mutex<Child>,
    stdout: Mutex<BufReader<ChildStdout>>,
    key_file: PathBuf,
    /// The child's peak RSS and guest memory, once it has reported.
    memory: Mutex<Option<(u64, u64)>>,
}

impl ChildReceiver {
    fn start(sessions: u32, psk: &Psk) -> anyhow::Result<Self> {
        let key_file = std::env::temp_dir().join(format!("dwcp-fleet-{}.key", std::process::id()));
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options
            .open(&key_file)
            .and_then(|mut f| writeln!(f, "{}", psk.to_hex()))
            .with_context(|| {
                format!(
                    "writing the key for the destination to {}",
                    key_file.display()
                )
            })?;
        let exe =
            std::env::current_exe().context("finding this program to start the destination")?;
        let mut child = std::process::Command::new(exe)
            .arg("fleet-receive")
            .arg("--sessions")
            .arg(sessions.to_string())
            .arg("--psk-file")
            .arg(&key_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the destination process")?;
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok());
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = std::fs::remove_file(&key_file);
            bail!("the destination process did not start listening (it said {line:?})");
        };
        Ok(Self {
            addr,
            child: Mutex::new(child),
            stdout: Mutex::new(stdout),
            key_file,
            memory: Mutex::new(None),
        })
    }

    /// Waits for the child's report.
    fn wait(&self) -> anyhow::Result<(Vec<Arrival>, Vec<String>)> {
        let mut text = String::new();
        lock(&self.stdout).read_to_string(&mut text)?;
        let status = lock(&self.child).wait()?;
        let line = text.lines().last().unwrap_or_default();
        let j: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("the destination process ({status}) did not report"))?;
        let number = |k: &str| j[k].as_u64().unwrap_or(0);
        *lock(&self.memory) = Some((number("peak_rss_anon_bytes"), number("guest_memory_bytes")));
        let text_of = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let arrivals = j["arrivals"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| Arrival {
                slot: None,
                session_id: text_of(&a["session_id"]),
                digest: text_of(&a["digest"]),
            })
            .collect();
        let failures = j["failures"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text_of)
            .collect();
        Ok((arrivals, failures))
    }

    /// Stops the child (its report is then missing).
    fn kill(&self) {
        let _ = lock(&self.child).kill();
    }

    /// The child's peak anonymous RSS and the guest memory it allocated.
    fn peak_rss(&self) -> (u64, u64) {
        lock(&self.memory).unwrap_or_default()
    }
}

impl Drop for ChildReceiver {
    fn drop(&mut self) {
        let mut child = lock(&self.child);
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.key_file);
    }
}

/// A poisoned lock still holds usable data here: a panicking thread only ever read the child.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
