//! `dwcp qemu send` and `dwcp qemu recv`: proxy mode, carrying QEMU's own migration through DWCP.
//!
//! ```text
//! source host:       dwcp qemu send --listen 127.0.0.1:4444 --to DEST:7800 --psk-file key
//!                    (QMP) migrate tcp:127.0.0.1:4444
//! destination host:  qemu-system-x86_64 … -incoming tcp:127.0.0.1:4445
//!                    dwcp qemu recv --listen 0.0.0.0:7800 --qemu 127.0.0.1:4445 --psk-file key
//! ```
//!
//! The tunnel is TLS 1.3 as `dwcp send`/`recv` are: keyed by `--psk-file`, or with certificates
//! (`--tls-dir`); plain text only with `--insecure-plaintext` on both proxies.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use dwcp_hde::Codec;
use dwcp_qemu::{DestinationProxy, SourceProxy, TunnelConfig, TunnelReport};

use crate::args::SecurityOpts;
use crate::transfer::{load_security, resolve};

/// `dwcp qemu`.
#[derive(Debug, Args)]
pub struct QemuArgs {
    /// Which side.
    #[command(subcommand)]
    pub command: QemuCommand,
}

/// The two proxies.
#[derive(Debug, Subcommand)]
pub enum QemuCommand {
    /// Source side: accept QEMU's `migrate tcp:ADDR` connections and carry them to `dwcp qemu recv`.
    Send(QemuSendArgs),
    /// Destination side: accept the tunnel and connect to the destination QEMU's `-incoming` address.
    Recv(QemuRecvArgs),
}

/// Options both proxies share.
#[derive(Debug, Args)]
pub struct TunnelOpts {
    /// How the tunnel's streams are secured (both proxies alike).
    #[command(flatten)]
    pub security: SecurityOpts,
    /// Compressor of the segments this side sends: none, lz4, zstd or zstd:LEVEL (1..19). Default: lz4,
    /// but none when the tunnel's round trip is under 1 ms (there compressing costs the QEMUs CPU
    /// and saves no time).
    #[arg(long, value_parser = parse_codec)]
    pub codec: Option<Codec>,
    /// Raw bytes in flight per QEMU connection and direction (bounds each proxy's buffers).
    #[arg(long, default_value_t = 32 << 20, value_parser = clap::value_parser!(u32).range(262_144..=1_073_741_824))]
    pub window: u32,
    /// Seconds to wait for the first QEMU connection (send) or for the tunnel (recv).
    #[arg(long, default_value_t = 600)]
    pub wait_secs: u64,
    /// Seconds a blocked tunnel read or write, or a credit wait, may take before the migration fails.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub io_timeout_secs: u64,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

impl TunnelOpts {
    fn config(&self) -> TunnelConfig {
        let defaults = TunnelConfig::default();
        TunnelConfig {
            codec: self.codec.unwrap_or(defaults.codec),
            local_codec: self.codec.unwrap_or(defaults.local_codec),
            window: self.window,
            accept_timeout: Duration::from_secs(self.wait_secs),
            io_timeout: Duration::from_secs(self.io_timeout_secs),
            ..TunnelConfig::default()
        }
    }
}

/// `dwcp qemu send`.
#[derive(Debug, Args)]
pub struct QemuSendArgs {
    /// Address QEMU migrates to (`migrate tcp:ADDR`), HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// Address of the `dwcp qemu recv`, HOST:PORT.
    #[arg(long, value_name = "PEER")]
    pub to: String,
    /// Parallel DWCP streams of the tunnel. Default: 4, but 1 on a path with a round trip under 1 ms
    /// (there more streams take CPU from QEMU); a value given here applies to both.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub streams: Option<u16>,
    /// Tunnel options.
    #[command(flatten)]
    pub tunnel: TunnelOpts,
}

/// `dwcp qemu recv`.
#[derive(Debug, Args)]
pub struct QemuRecvArgs {
    /// Address the `dwcp qemu send` connects to, HOST:PORT.
    #[arg(long, value_name = "PEER")]
    pub listen: String,
    /// The destination QEMU's `-incoming tcp:` address, HOST:PORT.
    #[arg(long, value_name = "QEMU_INCOMING_ADDR")]
    pub qemu: String,
    /// Tunnel options.
    #[command(flatten)]
    pub tunnel: TunnelOpts,
}

fn parse_codec(s: &str) -> Result<Codec, String> {
    Codec::parse(s).map_err(|e| e.to_string())
}

fn print_report(report: &TunnelReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!(
            "{} proxy: {} QEMU connection(s) over {} stream(s) ({} reset); QEMU bytes sent {} / \
             received {}; tunnel bytes sent {} / received {}; {:.0} ms",
            report.role,
            report.channels,
            report.streams,
            report.resets,
            report.raw_bytes_sent,
            report.raw_bytes_received,
            report.wire_bytes_sent,
            report.wire_bytes_received,
            report.duration_ms
        );
        if report.security.is_encrypted() {
            let tls = report.tls_session.as_deref().unwrap_or("TLS 1.3");
            println!("  security: {} ({tls}, encrypted)", report.security);
        } else {
            println!(
                "  security: {}: NOT ENCRYPTED, QEMU's memory crossed the network in clear text",
                report.security
            );
        }
    }
    Ok(())
}

/// Runs `dwcp qemu send|recv`.
pub fn run(args: QemuArgs) -> anyhow::Result<()> {
    match args.command {
        QemuCommand::Send(a) => {
            let security = load_security(&a.tunnel.security)?;
            let (listen, peer) = (resolve(&a.listen)?, resolve(&a.to)?);
            let defaults = a.tunnel.config();
            let config = TunnelConfig {
                streams: a.streams.unwrap_or(defaults.streams),
                local_streams: a.streams.unwrap_or(defaults.local_streams),
                ..defaults
            };
            let proxy = SourceProxy::bind(listen, peer, security, config)?;
            eprintln!("dwcp: QEMU may migrate to tcp:{}", proxy.local_addr()?);
            let report = proxy
                .run()
                .with_context(|| format!("carrying QEMU's migration to {peer}"))?;
            print_report(&report, a.tunnel.json)
        }
        QemuCommand::Recv(a) => {
            let security = load_security(&a.tunnel.security)?;
            let (listen, qemu) = (resolve(&a.listen)?, resolve(&a.qemu)?);
            let proxy = DestinationProxy::bind(listen, qemu, security, a.tunnel.config())?;
            eprintln!("dwcp: listening on {}", proxy.local_addr()?);
            let report = proxy
                .run()
                .with_context(|| format!("carrying a QEMU migration to {qemu}"))?;
            print_report(&report, a.tunnel.json)
        }
    }
}
