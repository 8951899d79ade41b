//! `dwcp-wanem`: brings an emulated WAN link up between two network namespaces and forwards across it
//! until told to stop; also the UDP probe that measures such a link. See the library docs and
//! `docs/wan-testbed.md`.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use dwcp_wanem::config::{
    DEFAULT_MTU, LinkParams, Profile, RateStep, parse_duration, parse_loss, parse_queue,
    parse_rate, parse_schedule,
};
use dwcp_wanem::link::{ActiveLink, DEFAULT_DST_NS, DEFAULT_SRC_NS, INTERFACE, LinkSpec};
use dwcp_wanem::probe::{self, ProbeOptions, ProbeServer};
use dwcp_wanem::testbed::{Ready, Stopped};
use dwcp_wanem::{netns, probe::MAX_COUNT};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "dwcp-wanem",
    about = "User-space WAN link emulator between two network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Creates the namespaces and the link, then forwards until SIGINT/SIGTERM (or stdin EOF with
    /// --exit-on-stdin-eof), and removes everything it created.
    Up(UpArgs),
    /// Deletes the two namespaces (and with them the link's interfaces) if they exist.
    Down {
        /// Source namespace.
        #[arg(long, default_value = DEFAULT_SRC_NS)]
        src_ns: String,
        /// Destination namespace.
        #[arg(long, default_value = DEFAULT_DST_NS)]
        dst_ns: String,
    },
    /// Prints a profile's parameters as JSON.
    Profile(LinkArgs),
    /// Echoes UDP probes (run it in the destination namespace).
    ProbeServer {
        /// Address to listen on.
        #[arg(long)]
        bind: SocketAddr,
        /// Stop after this long at the latest.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        max_time: Duration,
    },
    /// Measures RTT and loss against a probe server; prints one JSON object.
    Probe {
        /// The server.
        #[arg(long)]
        to: SocketAddr,
        /// Probes of the RTT phase.
        #[arg(long, default_value_t = 100)]
        rtt_count: u64,
        /// Spacing of the RTT phase.
        #[arg(long, default_value = "10ms", value_parser = parse_duration)]
        rtt_interval: Duration,
        /// Probes of the loss phase (0: none).
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Probes per second of the loss phase.
        #[arg(long, default_value_t = 20_000)]
        pps: u64,
        /// Datagram size.
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
}

#[derive(Debug, Args)]
struct LinkArgs {
    /// Starting point: lan, metro, internet, poor or shifting.
    #[arg(long, default_value = "internet")]
    profile: Profile,
    /// Rate per direction (e.g. 1gbit, 300mbit, unlimited).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u64>,
    /// Round-trip time (each direction delays by half).
    #[arg(long, value_parser = parse_duration)]
    rtt: Option<Duration>,
    /// Jitter of each direction's delay (uniform ±).
    #[arg(long, value_parser = parse_duration)]
    jitter: Option<Duration>,
    /// Loss per direction: 0.1%, 1%/burst=4, or ge:p=..,r=..[,good=..][,bad=..].
    #[arg(long, value_parser = parse_loss)]
    loss: Option<dwcp_wanem::model::LossModel>,
    /// Queue limit per direction: auto, 6MB, 60ms.
    #[arg(long, value_parser = parse_queue)]
    queue: Option<dwcp_wanem::config::QueueLimit>,
    /// Let jitter reorder packets.
    #[arg(long)]
    reorder: bool,
    /// Seed of the loss and jitter random streams.
    #[arg(long)]
    seed: Option<u64>,
}

impl LinkArgs {
    fn params(&self) -> LinkParams {
        let mut p = self.profile.params();
        if let Some(r) = self.rate {
            p.rate_bps = r;
        }
        if let Some(r) = self.rtt {
            p.rtt = r;
        }
        if let Some(j) = self.jitter {
            p.jitter = j;
        }
        if let Some(l) = self.loss {
            p.loss = l;
        }
        if let Some(q) = self.queue {
            p.queue = q;
        }
        if let Some(s) = self.seed {
            p.seed = s;
        }
        p.reorder |= self.reorder;
        p
    }
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Source namespace (10.77.0.1).
    #[arg(long, default_value = DEFAULT_SRC_NS)]
    src_ns: String,
    /// Destination namespace (10.77.0.2).
    #[arg(long, default_value = DEFAULT_DST_NS)]
    dst_ns: String,
    #[command(flatten)]
    link: LinkArgs,
    /// MTU of the link.
    #[arg(long, default_value_t = DEFAULT_MTU)]
    mtu: u32,
    /// Also write the ready line to this file once the link forwards.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Rewrite this file every second with the current rate and the counters
    /// (`{"rate_bps": .., "counters": {..}}`).
    #[arg(long)]
    stats_file: Option<PathBuf>,
    /// Rate changes after the link comes up, e.g. `5s:300mbit,12s:1gbit` (default: the profile's own,
    /// none except for `shifting`).
    #[arg(long, value_parser = parse_schedule)]
    rate_schedule: Option<Vec<RateStep>>,
    /// Tear down when standard input reaches end of file (the parent closed it or died).
    #[arg(long)]
    exit_on_stdin_eof: bool,
    /// Tear down after this long at the latest (0: never).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    max_lifetime: Duration,
}

fn write_atomic(path: &PathBuf, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn up(args: UpArgs) -> Result<()> {
    let params = args.link.params();
    let mut spec = LinkSpec::new(&args.src_ns, &args.dst_ns, params);
    spec.mtu = args.mtu;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing a signal handler")?;
    }
    let stdin_closed = Arc::new(AtomicBool::new(false));
    if args.exit_on_stdin_eof {
        let flag = stdin_closed.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
            flag.store(true, Ordering::SeqCst);
        });
    }
    let mut link = ActiveLink::bring_up(spec.clone())?;
    let ready = Ready {
        event: "ready".into(),
        src_ns: spec.src_ns.clone(),
        dst_ns: spec.dst_ns.clone(),
        src_addr: spec.src_addr,
        dst_addr: spec.dst_addr,
        interface: INTERFACE.into(),
        mtu: spec.mtu,
        params,
        rate_bps: params.rate_bps,
        rtt_ms: params.rtt.as_secs_f64() * 1e3,
        loss: params.loss.mean_loss(),
        queue_bytes: params.queue_bytes(),
        summary: params.summary(),
        pid: std::process::id(),
    };
    let line = serde_json::to_string(&ready)?;
    println!("{line}");
    eprintln!(
        "dwcp-wanem: {} ({}) <-> {} ({}) via {INTERFACE}, MTU {}: {}",
        spec.src_ns,
        spec.src_addr,
        spec.dst_ns,
        spec.dst_addr,
        spec.mtu,
        params.summary()
    );
    if let Some(path) = &args.ready_file {
        write_atomic(path, &line)?;
    }
    let started = Instant::now();
    let mut last_stats = Instant::now();
    let schedule = args
        .rate_schedule
        .clone()
        .unwrap_or_else(|| args.link.profile.schedule().to_vec());
    let mut next_step = 0;
    let mut rate_bps = params.rate_bps;
    let reason = loop {
        std::thread::sleep(Duration::from_millis(10));
        while let Some(step) = schedule.get(next_step)
            && started.elapsed() >= step.at
        {
            link.set_rate(step.rate_bps);
            rate_bps = step.rate_bps;
            next_step += 1;
            eprintln!(
                "dwcp-wanem: at {:.3} s the rate is now {}",
                started.elapsed().as_secs_f64(),
                dwcp_wanem::config::format_rate(rate_bps)
            );
        }
        if stop.load(Ordering::SeqCst) {
            break "signal".to_string();
        }
        if stdin_closed.load(Ordering::SeqCst) {
            break "stdin closed".to_string();
        }
        if let Some(f) = link.failure() {
            break format!("forwarder failed: {f}");
        }
        if !args.max_lifetime.is_zero() && started.elapsed() >= args.max_lifetime {
            break "max lifetime reached".to_string();
        }
        if let Some(path) = &args.stats_file
            && last_stats.elapsed() >= Duration::from_secs(1)
        {
            last_stats = Instant::now();
            let stats = json!({ "rate_bps": rate_bps, "counters": link.stats() });
            let _ = write_atomic(path, &serde_json::to_string(&stats)?);
        }
    };
    let stats = link.stats();
    let torn = link.tear_down();
    if let Some(path) = &args.stats_file {
        let file = json!({ "rate_bps": rate_bps, "counters": stats });
        let _ = write_atomic(path, &serde_json::to_string(&file)?);
    }
    println!(
        "{}",
        serde_json::to_string(&Stopped {
            event: "stopped".into(),
            reason: reason.clone(),
            stats,
        })?
    );
    eprintln!("dwcp-wanem: stopped ({reason}); namespaces deleted");
    torn
}

fn down(src_ns: &str, dst_ns: &str) -> Result<()> {
    for ns in [src_ns, dst_ns] {
        if netns::delete(ns)? {
            eprintln!("dwcp-wanem: deleted namespace {ns}");
        }
    }
    Ok(())
}

fn profile(link: &LinkArgs) -> Result<()> {
    let p = link.params();
    println!(
        "{}",
        json!({
            "params": p, "rate_bps": p.rate_bps, "rtt_ms": p.rtt.as_secs_f64() * 1e3,
            "loss": p.loss.mean_loss(), "queue_bytes": p.queue_bytes(), "summary": p.summary(),
        })
    );
    Ok(())
}

fn probe_server(bind: SocketAddr, max_time: Duration) -> Result<()> {
    let server = ProbeServer::bind(bind)?;
    eprintln!("dwcp-wanem: probe server on {}", server.local_addr()?);
    let n = server.serve(max_time)?;
    eprintln!("dwcp-wanem: probe server saw {n} probes");
    Ok(())
}

fn probe_client(to: SocketAddr, opts: ProbeOptions) -> Result<()> {
    anyhow::ensure!(
        opts.loss_count <= MAX_COUNT,
        "--count is limited to {MAX_COUNT}"
    );
    let r = probe::run(to, opts)?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Up(args) => up(args),
        Cmd::Down { src_ns, dst_ns } => down(&src_ns, &dst_ns),
        Cmd::Profile(link) => profile(&link),
        Cmd::ProbeServer { bind, max_time } => probe_server(bind, max_time),
        Cmd::Probe {
            to,
            rtt_count,
            rtt_interval,
            count,
            pps,
            size,
        } => probe_client(
            to,
            ProbeOptions {
                rtt_count,
                rtt_interval,
                loss_count: count,
                loss_pps: pps,
                size,
            },
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dwcp-wanem: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
